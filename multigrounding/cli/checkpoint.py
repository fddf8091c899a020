"""``multigrounding convert-checkpoint``."""
from __future__ import annotations

from pathlib import Path

import click

from multigrounding.cli.group import main


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
