"""``multigrounding demo``: the command around ``multigrounding.demo``."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from multigrounding.cli.group import main
from multigrounding.cli.output import _echo_evaluation


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
