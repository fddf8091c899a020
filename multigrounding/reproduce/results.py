"""WORK_DIR/results.json and results.md: our figures beside the published ones, per test set.

For each test set: our pointing accuracy under the recipe's protocol (mean, min, max, standard
deviation and every run when several seeds were trained), the published figure and the
difference (ours − published, in points), the center and random-point baselines on the same
phrases (and the published ones), attention correctness, how many phrases (or entities) were
scored and skipped and why, the other protocol's figure, and the exact split files used, with
their sha256. Figures are in %.
"""
from __future__ import annotations

import datetime
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from multigrounding import __version__
from multigrounding.atomic import atomic_open
from multigrounding.evaluation.protocols import PROTOCOL_TITLES, plural
from multigrounding.reproduce.recipe import Recipe, TestSet
from multigrounding.reproduce.sources import get_source

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
MODE_WORDS = {"sentence": "phrases inside their sentence", "query": "standalone queries"}


@dataclass
class SeedResult:
    """One trained run and its metrics.json per test set (keyed ``dataset-split``)."""

    seed: int
    run: Path
    reports: dict[str, dict]


def spread(values: list[float]) -> dict:
    """Mean, min, max and sample standard deviation (0 for one run) of the runs, and the runs."""
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": list(values)}


def test_result(test: TestSet, seeds: list[SeedResult], convert: dict, work: Path) -> dict:
    """The results.json entry of one test set."""
    key = test.data.key
    metrics = [s.reports[key] for s in seeds]
    headline = [m["protocols"][test.protocol] for m in metrics]
    first = headline[0]          # the phrases, their skips and baselines do not depend on the run
    pointing = spread([100 * h["accuracy"] for h in headline])
    published = test.published
    others = {name: spread([100 * m["protocols"][name]["accuracy"] for m in metrics])
              for name in metrics[0]["protocols"] if name != test.protocol}
    return {
        "dataset": test.data.dataset, "split": test.data.split,
        "title": f"{get_source(test.data.dataset).title} {test.data.split}",
        "mode": test.mode, "protocol": test.protocol,
        "protocol_title": PROTOCOL_TITLES[test.protocol],
        "pointing": pointing,
        "published": {"pointing": published.pointing, "center": published.center,
                      "random": published.random, "source": published.source,
                      "note": published.note},
        "difference": (pointing["mean"] - published.pointing
                       if published.pointing is not None else None),
        "center_baseline": 100 * first["center_baseline"],
        "random_baseline": 100 * first["random_baseline"],
        "attention_correctness": spread([100 * m["pointing"]["attention_correctness"]
                                         for m in metrics]),
        "unit": first["unit"], "scored": first["scored"], "phrases_in_scored": first["phrases"],
        "skipped": first["skipped"], "skipped_by_reason": first["skipped_by_reason"],
        "other_protocols": others,
        "records": convert.get("written"), "skipped_at_conversion": convert.get("skipped"),
        "split_files": convert.get("split_files", []),
        "runs": [{"seed": s.seed, "pointing": 100 * m["protocols"][test.protocol]["accuracy"],
                  "attention_correctness": 100 * m["pointing"]["attention_correctness"],
                  "checkpoint": m["checkpoint"], "epoch": m["epoch"],
                  "report": str(work / "reports" / f"seed{s.seed}" / key / "report.md")}
                 for s, m in zip(seeds, metrics)],
    }


def write_results(recipe: Recipe, data_root: Path, work: Path, seeds: list[SeedResult],
                  converts: dict[str, dict]) -> dict:
    """Write results.json and results.md into ``work`` (atomically); returns the JSON."""
    def split_entry(split) -> dict | None:
        if split is None:
            return None
        convert = converts.get(split.key, {})
        return {"dataset": split.dataset, "split": split.split, "records": convert.get("written"),
                "skipped_at_conversion": convert.get("skipped"),
                "split_files": convert.get("split_files", [])}

    results = {
        "recipe": {"name": recipe.name, "title": recipe.title, "file": recipe.path,
                   "notes": recipe.notes},
        "data_root": str(data_root), "work": str(work), "multigrounding": __version__,
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "units": "pointing, baselines and attention correctness in %; difference in points",
        "seeds": [s.seed for s in seeds],
        "train": split_entry(recipe.train), "validation": split_entry(recipe.validation),
        "tests": [test_result(test, seeds, converts.get(test.data.key, {}), work)
                  for test in recipe.tests],
    }
    with atomic_open(work / RESULTS_JSON, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with atomic_open(work / RESULTS_MD, "w", encoding="utf-8") as handle:
        handle.write(render_results(results))
    return results


def _figure(values: dict) -> str:
    if len(values["runs"]) == 1:
        return f"{values['mean']:.2f}"
    return f"{values['mean']:.2f} [{values['min']:.2f}..{values['max']:.2f}]"


def _published(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def render_results(results: dict) -> str:
    """results.md: one table of ours beside the published figures, then each test set's details."""
    recipe = results["recipe"]
    seeds = results["seeds"]
    runs = (f"{len(seeds)} runs (seeds {', '.join(map(str, seeds))}): ours is the mean "
            f"[min..max]" if len(seeds) > 1 else f"one run (seed {seeds[0]})")
    lines = [f"# {recipe['title']}", "",
             f"Recipe `{recipe['name']}` ({recipe['file']}), multigrounding {results['multigrounding']}, "
             f"written {results['written']}. DATA_ROOT `{results['data_root']}`. {runs}. "
             "Pointing accuracy, baselines and attention correctness in %; the difference is ours "
             "minus the published figure, in points.", ""]
    if recipe["notes"]:
        lines += [recipe["notes"], ""]
    lines += ["| test set | protocol | ours | published | difference | center baseline (published) "
              "| random baseline (published) | attention correctness | scored | skipped |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t in results["tests"]:
        p = t["published"]
        difference = "—" if t["difference"] is None else f"{t['difference']:+.2f}"
        lines.append(
            f"| {t['title']} ({MODE_WORDS.get(t['mode'], t['mode'])}) | {t['protocol']}: "
            f"{t['protocol_title']} | **{_figure(t['pointing'])}** | {_published(p['pointing'])} | "
            f"{difference} | {t['center_baseline']:.2f} ({_published(p['center'])}) | "
            f"{t['random_baseline']:.2f} ({_published(p['random'])}) | "
            f"{_figure(t['attention_correctness'])} | {t['scored']} {plural(t['unit'])} | {t['skipped']} |")
    for t in results["tests"]:
        p = t["published"]
        lines += ["", f"## {t['title']}", ""]
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(t["skipped_by_reason"].items()))
        phrases = f" ({t['phrases_in_scored']} phrases)" if t["unit"] != "phrase" else ""
        lines.append(f"- Counted under protocol `{t['protocol']}` ({t['protocol_title']}): "
                     f"{t['scored']} {plural(t['unit'])} scored{phrases}, "
                     f"{t['skipped']} skipped" + (f" ({reasons})" if reasons else "") + ".")
        for name, values in t["other_protocols"].items():
            lines.append(f"- The same groundings under protocol `{name}` ({PROTOCOL_TITLES[name]}): "
                         f"{_figure(values)}.")
        lines.append(f"- Published: {_published(p['pointing'])}; {p['source']}."
                     + (f" Note: {p['note']}." if p["note"] else ""))
        lines.append(f"- Test data: {t['records']} images"
                     + (f" ({t['skipped_at_conversion']} records skipped at conversion)"
                        if t["skipped_at_conversion"] else "") + "; split files: "
                     + (", ".join(f"`{f['path']}` (sha256 {f['sha256'][:16]}…)" for f in t["split_files"])
                        or "none recorded") + ".")
        if len(t["runs"]) > 1:
            lines.append(f"- Spread over {len(t['runs'])} runs: standard deviation "
                         f"{t['pointing']['std']:.2f} points.")
        for run in t["runs"]:
            lines.append(f"- Seed {run['seed']}: {run['pointing']:.2f} (attention correctness "
                         f"{run['attention_correctness']:.2f}), checkpoint `{run['checkpoint']}` "
                         f"(epoch {run['epoch']}); report `{run['report']}`.")
    lines += ["", "## Training data", ""]
    for role in ("train", "validation"):
        entry = results[role]
        if entry is None:
            lines.append(f"- {role}: none (the last checkpoint is evaluated)")
            continue
        files = ", ".join(f"`{f['path']}` (sha256 {f['sha256'][:16]}…)" for f in entry["split_files"])
        lines.append(f"- {role}: {entry['dataset']} {entry['split']}, {entry['records']} images"
                     + (f" ({entry['skipped_at_conversion']} records skipped at conversion)"
                        if entry["skipped_at_conversion"] else "") + f"; split files: {files}.")
    return "\n".join(lines) + "\n"
