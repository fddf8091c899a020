"""``multigrounding evaluate`` (a run on a test set) and ``ground`` (one image)."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from multigrounding.cli.group import main
from multigrounding.cli.options import _storage_options, level_choice_option, storage_options_option
from multigrounding.cli.output import _echo_evaluation


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
