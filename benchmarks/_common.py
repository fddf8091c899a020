"""Small helpers shared by the benchmark scripts: statistics, tables, verdicts, machine facts.

Every figure the scripts report is a ratio of two measurements taken side by side in the same
run (alternated, repeated); the median and the spread (min..max) of the repeats are printed,
never an absolute timing compared with a constant.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Iterator, Sequence


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_line() -> str:
    """One line saying where and when the figures were measured."""
    import torch

    gpu = "GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = "load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return (f"{datetime.datetime.now().isoformat(timespec='minutes')}  {platform.machine()}, "
            f"{cores()} cores, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}; {load}")


class Stat:
    """Median and spread of repeated measurements."""

    def __init__(self, values: Sequence[float]):
        self.values = list(values)
        self.median = statistics.median(self.values)
        self.low = min(self.values)
        self.high = max(self.values)

    def fmt(self, spec: str = ".3g", unit: str = "") -> str:
        med = format(self.median, spec)
        if len(self.values) == 1:
            return f"{med}{unit}"
        return f"{med}{unit} [{format(self.low, spec)}..{format(self.high, spec)}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def verdict(what: str, stat: Stat, target: str, ok: bool) -> str:
    """One line: MET / MISSED, the measured median and spread, and the target."""
    return (f"{'MET   ' if ok else 'MISSED'}  {what}: median {stat.fmt('.3f')} "
            f"(target {target})")


@contextlib.contextmanager
def work_folder(workdir: str | Path | None, prefix: str) -> Iterator[Path]:
    """The benchmark's working folder: ``--workdir`` when given (kept, to look at or reuse), else
    a temporary folder removed at the end, whatever happens."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


def batch_recomputer(records, backbone, text_model, text_store):
    """``recompute(image_rows, caption_rows) -> Batch``: a training batch made from the images and
    captions themselves, the frozen backbone and text encoder run again — training without a
    cache, the other arm of the cache-vs-recompute comparisons (bench_train, gpu_check)."""
    import numpy as np
    import torch

    from multigrounding.datasets.images import load_rgb
    from multigrounding.heads.data import Batch

    words = text_store.group["words"][:]
    starts = text_store.group["captions/start"][:]
    lengths = text_store.group["captions/length"][:]

    def recompute(image_rows, caption_rows) -> Batch:
        pixels = np.stack([load_rgb(records[r].image, backbone.spec.input_size)[0] for r in image_rows])
        with torch.inference_mode():
            levels = [level.to(torch.float16).cpu().numpy() for level in backbone(torch.from_numpy(pixels))]
        sentences = [list(words[starts[c]:starts[c] + lengths[c]]) for c in caption_rows]
        encoded = text_model.encode(sentences)
        width = max(len(s) for s in sentences)
        tokens = np.zeros((len(sentences), width) + encoded[0].tokens.shape[1:], np.float16)
        mask = np.zeros((len(sentences), width), bool)
        for i, e in enumerate(encoded):
            tokens[i, :len(e.tokens)] = e.tokens
            mask[i, :len(e.tokens)] = True
        sentence = np.stack([e.sentence for e in encoded]).astype(np.float16)
        return Batch(image_rows, caption_rows, levels, tokens, mask, sentence)

    return recompute
