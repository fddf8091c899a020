"""``multigrounding cache``: plan, info, verify, repair."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from multigrounding.cli.group import _Group, main
from multigrounding.cli.options import RegistryChoice, _backbone_names, _store, storage_options_option
from multigrounding.cli.output import _progress


@main.group(cls=_Group)
def cache() -> None:
    """Look inside feature caches: size before extracting, contents, soundness.

    \b
    Examples:
      multigrounding cache plan coco.jsonl --backbone vgg16
      multigrounding cache info cache/synth-images
      multigrounding cache verify cache/synth-images
    """


@cache.command("plan")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backbone", default="efficientnet_lite0", show_default=True,
              type=RegistryChoice("backbone", _backbone_names))
@click.option("--codecs", default="auto", show_default=True,
              help="As for extract images: auto, none, lz4, zstd1, or one per level.")
@click.option("--cache", help="Where the cache would go: a folder (to show the free space there and "
                             "measure its disk) or a URL.")
def cache_plan(manifest, backbone, codecs, cache) -> None:
    """Print how large the visual cache of MANIFEST will be and how long its data path will
    take on this machine, before starting.

    Decoding is measured on a few of the manifest's images, the disk (with --cache) by a short
    write that reaches it; compression ratios and costs are the measured figures behind
    --codecs auto (benchmarks/README.md). The backbone's forward comes on top.

    \b
    Example:
      multigrounding cache plan coco-train.jsonl --backbone vgg16 --cache cache/coco-vgg
    """
    from multigrounding.cache.info import plan_size
    from multigrounding.datasets.manifest import read_manifest
    from multigrounding.pipeline.backbones import get_backbone_spec
    from multigrounding.pipeline.data_path import estimate
    from multigrounding.pipeline.image_task import ImageExtraction

    spec = get_backbone_spec(backbone)
    records = list(read_manifest(manifest))
    count = len(records)
    plan = plan_size(count, spec.grid, [lv.channels for lv in spec.levels], cache)
    click.echo(f"{manifest}: {plan.images} images")
    click.echo(f"{backbone}: {len(spec.levels)} levels at {spec.grid}x{spec.grid} "
               f"({', '.join(f'{lv.name} {lv.channels}' for lv in spec.levels)} channels), "
               f"input {spec.input_size}x{spec.input_size}")
    click.echo(f"  {plan.bytes_per_image / 1e6:.3f} MB per image in float16; "
               f"{_size(plan.total_bytes)} before compression")
    chosen = ImageExtraction(manifest=manifest, cache=cache or Path("cache"), backbone=backbone,
                             codecs=codecs).level_codecs(len(spec.levels))
    guess = estimate([r.image for r in records], backbone, spec.grid,
                     [lv.channels for lv in spec.levels], spec.input_size, chosen, cache)
    if guess.figures_known:
        click.echo(f"  stored with {','.join(chosen)}: about {guess.bytes_per_image / 1e6:.3f} MB per "
                   f"image, {_size(int(guess.total_bytes))} in all (measured compression ratios)")
    else:
        click.echo(f"  stored with {','.join(chosen)}: no measured ratios for {backbone}; count on "
                   f"up to the size before compression")
    if plan.free_bytes is not None:
        verdict = "enough" if plan.free_bytes > guess.total_bytes else "NOT enough"
        click.echo(f"  {_size(plan.free_bytes)} free at {cache}: {verdict}")
    decode = (f"{guess.decode_ms:.1f} ms per image (measured now on {guess.decode_sample} of its images)"
              if guess.decode_ms is not None else "not measured (no image could be read)")
    disk = (f"{guess.disk_bytes_per_s / 1e6:.0f} MB/s (measured now at {cache})"
            if guess.disk_bytes_per_s else "not measured (give --cache)")
    click.echo(f"  data path on this machine ({guess.cores} cores): decode + resize {decode}; "
               f"compression {guess.encode_ms:.1f} ms per image (measured figures); disk {disk}")
    seconds, limit = guess.seconds()
    click.echo(f"  estimate: {_duration(seconds)} for the data path ({count / max(seconds, 1e-9):.0f} "
               f"images/s, limited by the {limit}), plus the backbone's forward")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@cache.command("info")
@click.argument("store")
@click.option("--show", default=20, show_default=True, help="How many failures to print.")
@storage_options_option
def cache_info(store, show, storage_options) -> None:
    """Print what STORE (a folder or a URL) holds: its config, progress and failures.

    \b
    Examples:
      multigrounding cache info cache/synth-images
      multigrounding cache info s3://my-bucket/caches/synth-images
    """

    from multigrounding.cache.info import describe

    info = describe(_store(store, storage_options))
    click.echo(f"{info.path}: {info.kind} store, fingerprint {info.fingerprint}, created {info.created}, "
               f"{_size(info.bytes)} {'on disk' if isinstance(info.path, Path) else 'stored'}")
    click.echo("progress: " + ", ".join(f"{k} {v}" for k, v in info.progress.items()))
    click.echo("config:")
    for line in json.dumps(info.config, indent=2, sort_keys=True).splitlines():
        click.echo("  " + line)
    if info.failures:
        click.echo(f"failures ({len(info.failures)}):")
        for row, image_id, reason in info.failures[:show]:
            click.echo(f"  row {row} image {image_id}: {reason}")


@cache.command("verify")
@click.argument("store")
@click.option("--show", default=20, show_default=True, help="How many problems to print.")
@storage_options_option
def cache_verify(store, show, storage_options) -> None:
    """Read every shard of STORE back: all its files there, every chunk's checksum right, shapes
    and dtypes as declared, no NaN or Inf.

    Exit status 1 when anything is wrong; `cache repair` then marks the damaged shards for
    extraction again.

    \b
    Example:
      multigrounding cache verify cache/synth-images
    """
    from multigrounding.cache.info import verify

    with _progress("shards") as bar:
        report = verify(_store(store, storage_options), progress=bar.update)
    _echo_report(store, report, show)
    click.echo(f"{store}: {report.checked_shards} shards checked, {len(report.problems)} problems")
    if report.damaged:
        click.echo(f"{store}: {len(report.damaged)} finished shards are damaged; `multigrounding "
                   f"cache repair {store}` marks them for extraction again", err=True)
    if not report.ok:
        sys.exit(1)


@cache.command("repair")
@click.argument("store")
@click.option("--show", default=20, show_default=True, help="How many problems to print.")
@storage_options_option
def cache_repair(store, show, storage_options) -> None:
    """Mark every damaged shard of STORE for extraction again.

    Checks the store as `cache verify` does; for each finished shard whose data files are gone
    or fail their checksums, deletes the shard's files and clears its done flag. Run the same
    `multigrounding extract` command afterwards: it extracts exactly those shards again.

    \b
    Example:
      multigrounding cache repair cache/synth-images
      multigrounding extract images data/synth/manifest.jsonl --cache cache/synth-images
    """
    from multigrounding.cache.info import repair

    with _progress("shards") as bar:
        report = repair(_store(store, storage_options), progress=bar.update)
    _echo_report(store, report, show)
    if report.damaged:
        click.echo(f"{store}: {len(report.damaged)} damaged shards marked for extraction again "
                   f"({', '.join(map(str, report.damaged[:10]))}{' ...' if len(report.damaged) > 10 else ''}); "
                   f"now run the same `multigrounding extract` command that made the store")
    else:
        click.echo(f"{store}: nothing to repair ({report.checked_shards} shards checked)")


def _echo_report(store, report, show: int) -> None:
    for note in report.notes:
        click.echo(f"{store}: note: {note}", err=True)
    for problem in report.problems[:show]:
        click.echo(f"{store}: {problem}", err=True)
    if len(report.problems) > show:
        click.echo(f"... and {len(report.problems) - show} more problems", err=True)


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1000
    return f"{count} B"
