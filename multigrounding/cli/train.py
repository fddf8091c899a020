"""``multigrounding train``, in one process or several (``--nproc``)."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from multigrounding.cli.group import main
from multigrounding.cli.options import SettingsCommand, _storage_options, storage_options_option


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
        from multigrounding.heads.level_selection import level_choice

        validate = pointing_validator(Location.parse(config.val_images, store_options),
                                      Location.parse(config.val_text, store_options),
                                      config.val_manifest, batch_size=config.batch_size,
                                      heatmap=config.heatmap,
                                      level_choice=level_choice(config.level_selection))
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
