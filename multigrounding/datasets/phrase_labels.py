"""Phrase-level semantic labels (SSAMT): the entities and triples of every caption.

An **entity** is a noun phrase with its attributes ("a red shirt", "two young men"); a **triple**
is subject-relation-object ("man riding horse", "dog runs on beach", "man in shirt"). Both come
from a spaCy dependency parse of the caption; Flickr30k Entities captions bring their own
annotated phrases, which replace the parser's noun chunks as entities. A label's ``words`` index
the caption split on whitespace, so every parse is made on those words (one token per word).

Triple rules, on word positions (the label's words ascending, so its text reads in caption order):

- a predicate with a nominal subject (nsubj/nsubjpass) and a direct object (dobj/obj):
  subject, verb, object ("a man rides a horse" → "man rides horse");
- a predicate with a subject and a prepositional phrase (prep or agent → pobj): subject, verb,
  preposition, object ("two dogs play on the beach" → "dogs play on beach");
- a noun with a prepositional phrase: noun, preposition, object ("man in shirt");
- the subject of a participial or relative clause (acl/relcl) is the noun it modifies ("a woman
  holding an umbrella" → "woman holding umbrella"; "who"/"that" are replaced by that noun);
  a verb joined to another by "and" (conj) without its own subject takes that verb's subject;
- subjects and objects joined by "and" (conj) give one triple each; a verb particle is kept
  ("man picks up ball");
- a triple whose subject or object is a pronoun ("they", "it") is left out, as are entities that
  are only a pronoun. Within a caption, labels with the same kind and key appear once.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from multigrounding.datasets.manifest import iter_manifest, write_manifest
from multigrounding.datasets.records import ENTITY, TRIPLE, Label, Record, RecordError
from multigrounding.errors import DatasetError, MultigroundingError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "en_core_web_sm"
INSTALL_HINT = ("install spaCy and an English model: `pip install spacy` then "
                "`python -m spacy download en_core_web_sm`")

SUBJECTS = frozenset({"nsubj", "nsubjpass"})
OBJECTS = frozenset({"dobj", "obj"})
PREPOSITIONS = frozenset({"prep", "agent"})  # agent: "by" of a passive ("ridden by a man")
CLAUSES = frozenset({"acl", "relcl"})
NOUNS = frozenset({"NOUN", "PROPN"})
RELATIVE = frozenset({"who", "which", "that", "whom"})
# Flickr30k phrases come without part-of-speech tags when there is no parse.
PRONOUNS = frozenset({"i", "me", "you", "he", "him", "she", "her", "it", "we", "us", "they",
                      "them", "this", "that", "these", "those", "someone", "something",
                      "somebody", "one", "who", "which"})


class ParserNotFoundError(MultigroundingError, ImportError):
    """spaCy or its English model is not installed."""


@dataclass
class PhraseLabelSummary:
    output: Path
    records: int
    captions: int
    entities: int
    triples: int
    seconds: float


def load_parser(name: str = DEFAULT_MODEL):
    """``spacy.load(name)``, or a ParserNotFoundError that says how to install what is missing."""
    try:
        import spacy
    except ImportError:
        raise ParserNotFoundError(f"spaCy is not installed; {INSTALL_HINT} "
                                  "(or `pip install multigrounding[phrases]`)") from None
    try:
        nlp = spacy.load(name)
    except OSError as exc:  # spaCy's E050: no package, link or folder of that name
        log.debug("spacy.load(%r) failed: %s", name, exc)
        raise ParserNotFoundError(f"spaCy model {name!r} not found; {INSTALL_HINT} "
                                  "(or name another installed model or a model folder)") from None
    if not any(pipe in nlp.pipe_names for pipe in ("parser", "depparse")):
        raise ParserNotFoundError(f"spaCy model {name!r} has no dependency parser (its pipes: "
                                  f"{', '.join(nlp.pipe_names) or 'none'}); {INSTALL_HINT}")
    return nlp


def labels_from_doc(doc, caption_index: int, *, entities: bool = True) -> list[Label]:
    """The entities (noun chunks) and triples of one parsed caption; ``entities=False`` keeps
    only the triples. The Doc's tokens must be the caption's whitespace words."""
    if len(doc) and not doc.has_annotation("DEP"):
        raise ParserNotFoundError("the caption was not parsed (no dependency labels): use a spaCy "
                                  f"pipeline with a parser; {INSTALL_HINT}")
    labels: list[Label] = []
    if entities:
        for chunk in doc.noun_chunks:
            if chunk.root.pos_ == "PRON" or all(t.pos_ == "PRON" for t in chunk):
                continue
            labels.append(_label(doc, caption_index, ENTITY, range(chunk.start, chunk.end)))
    for positions in _triples(doc):
        if positions is not None:
            labels.append(_label(doc, caption_index, TRIPLE, positions))
    return _unique(labels)


def labels_for_record(record: Record, nlp=None) -> list[Label]:
    """Every caption's labels; Flickr30k phrases (with ``caption``/``start``) are that caption's
    entities. Without ``nlp`` only captions with such phrases can be labelled (entities alone)."""
    docs: list[Any] = []
    for i, caption in enumerate(record.captions):
        words = caption.split()
        docs.append(_check_doc(nlp(_doc(nlp, words)), words, record, i)
                    if nlp is not None and words else None)
    return _record_labels(record, docs, parsed=nlp is not None)


def add_phrase_labels(manifest: str | os.PathLike, out: str | os.PathLike, *, nlp=None,
                      model: str | None = DEFAULT_MODEL, batch_records: int = 256,
                      progress: Callable[[int], None] | None = None) -> PhraseLabelSummary:
    """Read ``manifest``, label every record (replacing its labels) and write ``out`` atomically.

    ``nlp`` is a loaded spaCy pipeline; without it ``model`` is loaded (``model=None``: no parser,
    entities from Flickr30k phrases only, and an error for a caption without them).
    """
    started = time.perf_counter()
    manifest = Path(manifest)
    if nlp is None and model is not None:
        nlp = load_parser(model)
    counts = {"records": 0, "captions": 0, ENTITY: 0, TRIPLE: 0}

    def labelled() -> Iterator[Record]:
        for batch in _batches(_records(manifest), batch_records):
            for record, labels in zip(batch, _label_batch(batch, nlp, manifest)):
                record.labels = labels
                counts["records"] += 1
                counts["captions"] += len(record.captions)
                for label in labels:
                    counts[label.kind] += 1
                if progress is not None:
                    progress(1)
                yield record

    write_manifest(labelled(), out)
    return PhraseLabelSummary(Path(out), counts["records"], counts["captions"], counts[ENTITY],
                              counts[TRIPLE], time.perf_counter() - started)


def _records(manifest: Path) -> Iterator[Record]:
    for number, item in iter_manifest(manifest):
        if isinstance(item, RecordError):
            raise DatasetError(f"{manifest}:{number}: {item.field}: {item.message} "
                               f"(run `multigrounding datasets validate {manifest}`)")
        yield item


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _label_batch(records: Sequence[Record], nlp, manifest: Path) -> list[list[Label]]:
    """Label a batch of records, parsing all their captions in one ``nlp.pipe`` call."""
    try:
        todo = [(k, i, c.split()) for k, r in enumerate(records) for i, c in enumerate(r.captions)
                if c.split()]
        parsed: dict[tuple[int, int], Any] = {}
        if nlp is not None and todo:
            docs = nlp.pipe(_doc(nlp, words) for _, _, words in todo)
            for (k, i, words), doc in zip(todo, docs, strict=True):
                parsed[k, i] = _check_doc(doc, words, records[k], i)
        return [_record_labels(record, [parsed.get((k, i)) for i in range(len(record.captions))],
                               parsed=nlp is not None)
                for k, record in enumerate(records)]
    except MultigroundingError as exc:
        raise type(exc)(f"{manifest}: {exc}") from None


def _record_labels(record: Record, docs: Sequence[Any], parsed: bool) -> list[Label]:
    flickr = _flickr_entities(record)
    labels: list[Label] = []
    for i, caption in enumerate(record.captions):
        if not caption.split():
            continue
        if i in flickr:
            labels.extend(flickr[i])
        elif not parsed:
            raise ParserNotFoundError(f"record {record.id}: caption {i} has no Flickr30k phrases "
                                      f"and there is no parser to find its entities; {INSTALL_HINT}")
        if docs[i] is not None:
            labels.extend(labels_from_doc(docs[i], i, entities=i not in flickr))
    return _unique(labels)


def _flickr_entities(record: Record) -> dict[int, list[Label]]:
    """Caption index → the entities its annotated phrases make (their contiguous word spans)."""
    out: dict[int, list[Label]] = {}
    for j, phrase in enumerate(record.phrases):
        if phrase.caption is None:
            continue
        words = record.captions[phrase.caption].split() if 0 <= phrase.caption < len(record.captions) else []
        span = range(phrase.start, phrase.start + len(phrase.words))
        if not phrase.words or span.stop > len(words) or words[span.start:span.stop] != phrase.words:
            raise DatasetError(f"record {record.id}: phrases[{j}]: {phrase.text!r} is not the words "
                               f"{phrase.start}.. of caption {phrase.caption} (run `multigrounding "
                               "datasets validate` and fix the record)")
        if all(w.lower() in PRONOUNS for w in phrase.words):
            continue
        out.setdefault(phrase.caption, []).append(
            Label(phrase.caption, ENTITY, list(span), " ".join(words[k] for k in span)))
    return out


def _triples(doc) -> Iterator[list[int] | None]:
    """Word positions of every triple; None where the subject or the object is a pronoun."""
    for token in doc:
        subjects = _subjects(token) if token.pos_ not in NOUNS or _has(token, SUBJECTS) else []
        relation = [token.i] + [c.i for c in token.children if c.dep_ == "prt"]
        for subject in subjects:
            for obj in _conjoined(c for c in token.children if c.dep_ in OBJECTS):
                yield _positions(subject, relation, obj)
            for prep, obj in _prepositional(token):
                yield _positions(subject, relation + [prep.i], obj)
        if token.pos_ in NOUNS:  # "man in shirt"
            for prep, obj in _prepositional(token):
                yield _positions(token, [prep.i], obj)


def _subjects(token) -> list:
    """The nominal subjects of a predicate token (conjoined ones included), or []."""
    own = [c for c in token.children if c.dep_ in SUBJECTS]
    if own:
        subjects = _conjoined(own)
        if token.dep_ == "relcl":  # "a man who rides a horse": who → man
            subjects = [token.head if s.lower_ in RELATIVE else s for s in subjects]
        return subjects
    if token.dep_ in CLAUSES and token.head.pos_ in NOUNS:  # "a woman holding an umbrella"
        return [token.head]
    if token.dep_ == "conj" and token.head.i != token.i and token.head.pos_ in ("VERB", "AUX"):
        return _subjects(token.head)  # "a man sits and reads a book"
    return []


def _prepositional(token) -> Iterator[tuple[Any, Any]]:
    for prep in token.children:
        if prep.dep_ in PREPOSITIONS:
            for obj in _conjoined(c for c in prep.children if c.dep_ == "pobj"):
                yield prep, obj


def _conjoined(tokens: Iterable) -> list:
    """The tokens and every token joined to them by conj ("a man and a woman")."""
    out = []
    for token in tokens:
        stack = [token]
        while stack:
            current = stack.pop(0)
            out.append(current)
            stack.extend(c for c in current.children if c.dep_ == "conj")
    return out


def _has(token, deps: frozenset) -> bool:
    return any(c.dep_ in deps for c in token.children)


def _positions(subject, relation: list[int], obj) -> list[int] | None:
    if _pronoun(subject) or _pronoun(obj):
        return None
    return sorted({subject.i, *relation, obj.i})


def _pronoun(token) -> bool:
    return token.pos_ == "PRON" or (not token.pos_ and token.lower_ in PRONOUNS)


def _label(doc, caption: int, kind: str, positions: Iterable[int]) -> Label:
    positions = list(positions)
    return Label(caption, kind, positions, " ".join(doc[k].text for k in positions))


def _unique(labels: Iterable[Label | None]) -> list[Label]:
    """Drop repeats (same caption, kind and key) and labels with no word but articles."""
    seen: set[tuple[int, str, str]] = set()
    out = []
    for label in labels:
        if label is None or not label.key:
            continue
        identity = (label.caption, label.kind, label.key)
        if identity not in seen:
            seen.add(identity)
            out.append(label)
    return out


def _doc(nlp, words: list[str]):
    from spacy.tokens import Doc

    return Doc(nlp.vocab, words=words)


def _check_doc(doc, words: list[str], record: Record, caption: int):
    if [t.text for t in doc] != words:
        raise DatasetError(f"record {record.id}: the parser changed the words of caption {caption} "
                           f"({len(words)} words, {len(doc)} tokens); use a pipeline that keeps the "
                           "given tokens (no merging or splitting components)")
    return doc
