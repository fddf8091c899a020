"""The backbone in bfloat16 (or float16) against float32: features and the demo's pointing accuracy.

Runs ``multigrounding demo`` (``--quick`` or the full preset) twice — or more, one run per
``--dtypes`` entry — identical but for the image backbone's compute dtype (``extract images
--dtype``), on the device given (the CPU here, where bfloat16 runs), then compares:

- the features: relative L2 error ‖x − x_fp32‖ / ‖x_fp32‖ of every level over the test and the
  training images (as stored: float16), and the share of values that differ at all;
- what the heads trained on them do: pointing accuracy, attention correctness and retrieval
  R@1 on the same held-out phrases (the text features and everything else are identical).

    python benchmarks/compare_dtypes.py --quick                 # ~3 min on 2 free cores
    python benchmarks/compare_dtypes.py --dtypes float32,bfloat16,float16 --out /tmp/dtypes
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, table  # noqa: E402


def run(out: Path, dtype: str, quick: bool, device: str) -> dict:
    from multigrounding import demo
    from multigrounding.pipeline.image_task import ImageExtraction

    started = time.perf_counter()
    with mock.patch.object(demo, "ImageExtraction", functools.partial(ImageExtraction, dtype=dtype)):
        summary = demo.run_demo(out / dtype, quick, device=device)
    return {"dtype": dtype, "root": summary.out, "metrics": summary.metrics,
            "seconds": time.perf_counter() - started}


def level_errors(reference: Path, other: Path) -> list[tuple[float, float]]:
    """Per level: relative L2 error and the share of values that differ."""
    from multigrounding.cache.image_store import ImageFeatureStore

    a, b = ImageFeatureStore.open(reference), ImageFeatureStore.open(other)
    out = []
    for x, y in zip(a.levels, b.levels):
        x, y = x[:].astype(np.float32), y[:].astype(np.float32)
        out.append((float(np.linalg.norm(y - x) / max(np.linalg.norm(x), 1e-12)), float((x != y).mean())))
    return out


def pick(metrics: dict, *path, default=None):
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return default
        metrics = metrics[key]
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo's quick preset")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="keep the demo folders here (default: a temp dir)")
    args = p.parse_args(argv)
    print("compare_dtypes:", machine_line())
    out = args.out or Path(tempfile.mkdtemp(prefix="compare-dtypes-"))
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    runs = [run(out, dtype, args.quick, args.device) for dtype in dtypes]
    reference = runs[0]
    rows = []
    for r in runs:
        m = r["metrics"]
        row = [r["dtype"], f"{r['seconds']:.0f}",
               f"{100 * pick(m, 'pointing', 'accuracy', default=float('nan')):.1f}",
               f"{100 * pick(m, 'pointing', 'attention_correctness', default=float('nan')):.1f}",
               f"{pick(m, 'retrieval', 'text_to_image', 'r1', default=float('nan')):.1f}"]
        if r is reference:
            row += ["-", "-"]
        else:
            errors = {split: level_errors(reference["root"] / "cache" / f"{split}-images",
                                          r["root"] / "cache" / f"{split}-images")
                      for split in ("train", "test")}
            row += [" / ".join(f"{e:.1e}" for e, _ in errors["test"]),
                    " / ".join(f"{100 * d:.0f}%" for _, d in errors["test"])]
            r["feature_errors"] = errors
        rows.append(row)
    print(table(["backbone dtype", "demo s", "pointing %", "attention correctness %",
                 "R@1 caption->image %", "features: rel. L2 error per level vs " + reference["dtype"],
                 "values that differ"], rows))
    (out / "compare_dtypes.json").write_text(json.dumps(
        [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in runs],
        indent=1, default=str))
    print(f"demo folders and compare_dtypes.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
