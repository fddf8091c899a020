"""What several commands print: the progress bar, the evaluation summary."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import click
from tqdm import tqdm


@contextmanager
def _progress(unit: str, total: int | None = None):
    with tqdm(total=total, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True,
              disable=None, leave=False) as bar:
        yield bar


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
