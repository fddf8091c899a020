"""``multigrounding extract``: images, text."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from multigrounding.cli.group import _Group, main
from multigrounding.cli.options import SettingsCommand
from multigrounding.cli.output import _progress


@main.group(cls=_Group)
def extract() -> None:
    """Run the frozen backbone (or text encoder) once over a manifest into a feature cache.

    The cache is a zarr store written shard by shard; run the same command again after an
    interruption and it finishes only what is left. A cache made with other settings is
    refused (--overwrite replaces it).

    \b
    Examples:
      multigrounding extract images data/synth/manifest.jsonl --cache cache/synth-images
      multigrounding extract images coco.jsonl --backbone vgg16 --weights imagenet --cache cache/coco-vgg
    """


def _image_job():
    from multigrounding.pipeline.image_task import ImageExtraction

    return ImageExtraction, {}


def _text_job():
    from multigrounding.pipeline.text_task import TextExtraction

    return TextExtraction, {}


@extract.command("images", cls=SettingsCommand, settings=_image_job)
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--show", default=20, show_default=True, help="How many failures to print.")
def extract_images_command(manifest, show, **options) -> None:
    """Extract the backbone's four feature levels for every image of MANIFEST.

    Images that cannot be read are recorded as failed (`cache info` lists them), their rows
    masked; the run goes on and exits 1 at the end.

    \b
    Example:
      multigrounding extract images data/synth/manifest.jsonl --cache cache/synth-images --scheduler threads
    """
    from multigrounding.pipeline.image_task import ImageExtraction, extract_images

    _check_scheduler(options["scheduler"])
    job = ImageExtraction(manifest=manifest, **options)
    summary = _run_extraction(extract_images, job, "images")
    _echo_extraction(summary, show)
    if not summary.ok:
        sys.exit(1)


@extract.command("text", cls=SettingsCommand, settings=_text_job)
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
def extract_text_command(manifest, **options) -> None:
    """Encode every caption of MANIFEST (and every standalone query phrase) into a text cache.

    Words are the caption split on whitespace; every layer of the encoder is kept per word (the
    heads learn the mix), with the encoder's sentence vectors and each phrase's word span.

    \b
    Examples:
      multigrounding extract text data/synth/manifest.jsonl --cache cache/synth-text --scheduler threads
      multigrounding extract text coco.jsonl --encoder elmo --elmo-options options.json --elmo-weights weights.hdf5 --cache cache/coco-elmo
    """
    from multigrounding.pipeline.text_task import TextExtraction, extract_text

    _check_scheduler(options["scheduler"])
    job = TextExtraction(manifest=manifest, **options)
    summary = _run_extraction(extract_text, job, "sequences")
    _echo_extraction(summary, 20)
    if not summary.ok:
        sys.exit(1)


def _run_extraction(extract, job, unit: str):
    """Run ``extract(job)`` with a progress bar. Ctrl-C while the shards run is reported by the
    driver (how many it keeps); one that lands just before or after them gets the same line."""
    from multigrounding.pipeline.driver import ExtractionInterrupted

    try:
        with _progress(unit) as bar:
            return extract(job, progress=_counter(bar))
    except ExtractionInterrupted:
        raise
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted: {job.cache} keeps its finished shards; run the "
                                   f"same command again to resume") from None


def _check_scheduler(scheduler: str) -> None:
    from multigrounding.pipeline.scheduler import check_scheduler

    try:
        check_scheduler(scheduler)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--scheduler") from None


def _counter(bar):
    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.refresh()
    return update


def _echo_extraction(summary, show: int) -> None:
    for item, reason in summary.failed_items[:show]:
        click.echo(f"failed: {summary.unit[:-1]} {item}: {reason}", err=True)
    if len(summary.failed_items) > show:
        click.echo(f"... and {len(summary.failed_items) - show} more failed {summary.unit}", err=True)
    for shard, error in summary.failed_shards:
        click.echo(f"failed: shard {shard}: {error}", err=True)
    rate = summary.items_run / summary.seconds if summary.seconds else 0.0
    counts = ", ".join(f"{count} {name}" for name, count in summary.counts.items())
    counts = f" ({counts})" if counts else ""
    click.echo(f"{summary.cache}: {summary.items} {summary.unit}{counts}; {summary.shards_done}"
               f"/{summary.shards} shards done ({summary.shards_already_done} were done before), "
               f"{len(summary.failed_items)} {summary.unit} failed, {len(summary.failed_shards)} "
               f"shards failed; {summary.seconds:.1f} s ({rate:.1f} {summary.unit}/s), "
               f"{summary.bytes / 1e6:.1f} MB {'on disk' if isinstance(summary.cache, Path) else 'stored'}")
    click.echo(f"  time in workers: read {summary.read_seconds:.1f} s, compute "
               f"{summary.compute_seconds:.1f} s, write {summary.write_seconds:.1f} s")
    if summary.disk_full:
        click.echo(f"{summary.cache}: the disk is full: {len(summary.failed_shards)} shards were not "
                   f"written (nothing half-written is kept); free space and run the same command "
                   f"again: it writes only those", err=True)
