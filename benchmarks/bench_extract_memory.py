"""Peak resident memory of ``extract images`` for a small and a large dataset: it must not grow.

Each extraction runs in a fresh subprocess, exactly as a user runs it:

    python -m multigrounding extract images MANIFEST --cache DIR --backbone efficientnet_lite0
        --weights random --scheduler synchronous --device cpu

on synthetic images (``generate_synth``, 64 px by default to keep it quick; the backbone still
resizes them to its 288 px input, so the compute is that of real images). The small run's
manifest is the prefix of the large one's. The peak RSS of each child is its own
``ru_maxrss`` (``os.wait4`` on that child, so one run's peak never leaks into the other's),
cross-checked by polling ``/proc/PID/status`` (VmRSS) every ``--poll`` seconds, which also gives
the RSS at 25/50/75/100 % of the run. Runs alternate small, large (``--repeats`` pairs); the
ratio large/small is taken per pair. Target: ratio ≈ 1 (within ``--tolerance``, 10 %).

Defaults (500 vs 2,000 images) take a few minutes on 2 cores; the full figure:

    python benchmarks/bench_extract_memory.py --large 5000
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stat, machine_line, table, verdict, work_folder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=500)
    p.add_argument("--large", type=int, default=2000, help="5000 for the full figure")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="random")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--scheduler", default="synchronous")
    p.add_argument("--repeats", type=int, default=1, help="small/large pairs")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed |large/small - 1|")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between /proc samples")
    p.add_argument("--workdir", type=Path, help="keep the data and stores here (default: a temp dir)")
    return p.parse_args(argv)


def prefix_manifest(full: Path, count: int) -> Path:
    lines = full.read_text().splitlines()
    if len(lines) < count:
        raise ValueError(f"{full} has {len(lines)} images, not {count}")
    out = full.with_name(f"manifest-{count}.jsonl")   # same folder: relative image paths hold
    out.write_text("\n".join(lines[:count]) + "\n")
    return out


def _vm_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def run_extraction(manifest: Path, cache: Path, args, log: Path) -> dict:
    """One extraction in a fresh process; its own peak RSS, an RSS timeline, its summary line."""
    if cache.exists():
        shutil.rmtree(cache)
    command = [sys.executable, "-m", "multigrounding", "extract", "images", str(manifest),
               "--cache", str(cache), "--backbone", args.backbone, "--weights", args.weights,
               "--scheduler", args.scheduler, "--device", "cpu", "--batch-size", str(args.batch_size),
               "--shard-size", str(args.shard_size)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    samples = []
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid == child.pid:
                break
            rss = _vm_rss_kb(child.pid)
            if rss is not None:
                samples.append((time.perf_counter() - started, rss))
            time.sleep(args.poll)
    child.returncode = os.waitstatus_to_exitcode(status)   # reaped by wait4, tell Popen
    seconds = time.perf_counter() - started
    text = log.read_text()
    if child.returncode != 0:
        raise RuntimeError(f"extraction exited {child.returncode}; see {log}:\n{text[-2000:]}")
    rate = re.search(r"\(([\d.]+) images/s\)", text)
    stages = re.search(r"read ([\d.]+) s, compute ([\d.]+) s, write ([\d.]+) s", text)
    timeline = []
    for fraction in (0.25, 0.5, 0.75, 1.0):
        before = [rss for t, rss in samples if t <= fraction * seconds]
        timeline.append(before[-1] / 1024 if before else float("nan"))
    return {"peak_mb": usage.ru_maxrss / 1024,   # Linux: kilobytes
            "polled_mb": max((rss for _, rss in samples), default=0) / 1024,
            "timeline": timeline, "seconds": seconds,
            "rate": float(rate.group(1)) if rate else float("nan"),
            "stages": tuple(float(x) for x in stages.groups()) if stages else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    print("bench_extract_memory:", machine_line())
    with work_folder(args.workdir, "bench-memory-") as root:
        from multigrounding.datasets.synth import generate_synth

        full = root / "synth" / "manifest.jsonl"
        have = len(full.read_text().splitlines()) if full.is_file() else 0
        started = time.perf_counter()
        if have < max(args.small, args.large):
            generate_synth(root / "synth", max(args.small, args.large), seed=0, size=args.image_size)
        print(f"{max(args.small, args.large)} synthetic {args.image_size}px images "
              f"({time.perf_counter() - started:.0f} s); {args.backbone} --weights {args.weights}, "
              f"--scheduler {args.scheduler}, batch {args.batch_size}, shard {args.shard_size}; "
              f"small {args.small} vs large {args.large} images, {args.repeats} pair(s)")
        manifests = {"small": prefix_manifest(full, args.small), "large": prefix_manifest(full, args.large)}
        counts = {"small": args.small, "large": args.large}

        runs, rows = {"small": [], "large": []}, []
        for r in range(args.repeats):
            order = ("small", "large") if r % 2 == 0 else ("large", "small")
            for which in order:
                result = run_extraction(manifests[which], root / f"cache-{which}", args,
                                        root / f"extract-{which}-{r}.log")
                runs[which].append(result)
                read, compute, write = result["stages"] or (float("nan"),) * 3
                rows.append([r + 1, which, counts[which], f"{result['peak_mb']:.0f}",
                             f"{result['polled_mb']:.0f}",
                             " / ".join(f"{x:.0f}" for x in result["timeline"]),
                             f"{result['seconds']:.0f}", f"{result['rate']:.1f}",
                             f"{read:.0f} / {compute:.0f} / {write:.0f}"])
                print(f"  run {r + 1} {which}: peak {result['peak_mb']:.0f} MB, {result['seconds']:.0f} s",
                      flush=True)
        print("\n== peak resident memory of `extract images` (each run a fresh process)")
        print(table(["pair", "run", "images", "peak RSS MB (ru_maxrss)", "max polled VmRSS MB",
                     "VmRSS MB at 25/50/75/100 %", "seconds", "images/s", "read/compute/write s"], rows))
        ratio = Stat([big["peak_mb"] / small["peak_mb"] for small, big in zip(runs["small"], runs["large"])])
        peaks = {which: Stat([x["peak_mb"] for x in runs[which]]) for which in runs}
        print(f"peak RSS: small {peaks['small'].fmt('.0f', ' MB')}, large {peaks['large'].fmt('.0f', ' MB')}; "
              f"large/small {ratio.fmt('.3f')} for {args.large / args.small:.0f}x the images")
        print(verdict(f"peak RSS large/small ({args.large} vs {args.small} images)", ratio,
                      f"1 +/- {args.tolerance:.2f}", abs(ratio.median - 1) <= args.tolerance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
