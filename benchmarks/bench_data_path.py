"""The extraction data path without the model: decoding, resizing, casting, encoding, writing.

On a GPU the backbone runs hundreds to thousands of images a second, and the work around it is
the whole cost. This runs the real pipeline (``extract_images``, dask's ``processes``
scheduler, 1 and 2 worker processes) with a zero-cost stand-in model (``standin.py``: the real
backbone's shapes, features a real forward made earlier, handed over at once) on photo-sized
JPEG files (``photos.py``), per backbone shape: vgg16, pnasnet5large and efficientnet_lite0.

Two ratios, each measured side by side in every repeat (the arms alternated, the order rotated):

1. data path ÷ its irreducible work: the pipeline's images/s over the images/s of the same work
   done alone on the same cores in tight loops — decoding and resizing the same images (one
   process per core), encoding the same features with the same codecs and crc32c (one process
   per core), and a plain sequential write of the same number of bytes to the same disk, one
   after the other. What it shows is the cost of the pipeline's own machinery: copies, casts,
   scheduling, shard assembly, waiting. Target >= 0.8.
2. write throughput ÷ a plain sequential write: the pipeline's bytes on disk over its wall time
   (1 worker), against one file of the same size written in 4 MiB blocks to the same folder.
   Both sides end with an fsync of what they wrote (timed: a disk's speed, not the page
   cache's; ``--page-cache`` leaves it out), and every arm starts after an untimed ``os.sync()``
   so that none pays for the last one's dirty pages. Target >= 0.8 for the pnasnet-shaped
   features (9.4 MB an image raw), where writing dominates. The writer thread's own rate (bytes
   ÷ the seconds it spent in write calls) is printed beside it.

Also printed: per-stage seconds (decode, resize, cast, compress, write; summed over threads
and workers, so CPU-like seconds), bytes per image on disk, and per level a codec table —
bytes and single-core CPU milliseconds per image for none, lz4 and zstd 1 (each with the crc32c
checksum every chunk carries; its cost alone too) — with the break-even disk speed per core: a
codec pays when the disk writes slower than that many MB/s for each core spent compressing.
The last table is the arithmetic for a 16-core machine with a 1 GB/s disk (an estimate).

    python benchmarks/bench_data_path.py                        # ~10 min on 2 busy cores
    python benchmarks/bench_data_path.py --backbones pnasnet5large --images 64 --repeats 2
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import Stat, cores, machine_line, table, verdict, work_folder  # noqa: E402
from photos import photo_jpegs  # noqa: E402
from standin import StandInKey, make_bank  # noqa: E402

TARGET_MACHINERY = 0.8
TARGET_WRITE = 0.8
BACKBONES = ("vgg16", "pnasnet5large", "efficientnet_lite0")
CODECS = ("none", "lz4", "zstd1")
REFERENCE = {"cores": 16, "disk_bytes_per_s": 1e9}   # the README's GPU machine (an estimate)
BLOCK = 4 << 20
STAGES = ("decode", "resize", "forward", "cast", "compress", "write", "records")
CPU_STAGES = ("decode_cpu", "resize_cpu", "compress_cpu", "write_cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--images", type=int, default=192, help="photos per run (pnasnet: half)")
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", default="1,2", help="worker processes to measure")
    p.add_argument("--codecs", default="auto", help="the pipeline's --codecs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--page-cache", dest="fsync", action="store_false",
                   help="leave out the timed fsync that ends every arm (page-cache speed)")
    p.add_argument("--bank-photos", type=int, default=4, help="photos the real backbone runs once")
    p.add_argument("--workdir", type=Path, help="keep photos, banks and stores here")
    p.add_argument("--json", type=Path, help="also write every figure here")
    return p.parse_args(argv)


# ----------------------------------------------------------------- worker-process helpers

def _warm(key: StandInKey) -> None:
    """Pool initializer: imports, the stand-in built in the pipeline's model cache."""
    from multigrounding.pipeline.models import get_model
    from multigrounding.pipeline import image_task  # noqa: F401

    get_model(key)


def _pause(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def warm_pool(workers: int, key: StandInKey) -> concurrent.futures.ProcessPoolExecutor:
    """A spawned pool with every process started and its model built (startup is not timed)."""
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_warm, initargs=(key,))
    pids = {f.result() for f in [pool.submit(_pause, 2.0) for _ in range(workers)]}
    if len(pids) != workers:
        print(f"  (warm-up reached {len(pids)} of {workers} processes)")
    return pool


_BANK: dict = {}


def _decode_slice(paths: list[str], size: int) -> float:
    """Decode and resize ``paths`` in a tight loop; the CPU seconds it took."""
    from multigrounding.datasets.images import load_rgb

    started = time.process_time()
    for path in paths:
        load_rgb(path, size)
    return time.process_time() - started


def _encode_slice(bank: str, codecs: list[str], rows: list[int]) -> tuple[float, int]:
    """Encode bank rows (the images' features) with each level's codec + crc32c, as the
    pipeline's encoder does; (CPU seconds, bytes)."""
    levels, encoders = _bank_and_encoders(bank, codecs)
    started, total = time.process_time(), 0
    for row in rows:
        for level, encode in zip(levels, encoders):
            parts = encode(level[row % len(level)])
            total += sum(len(memoryview(p).cast("B")) for p in parts)
    return time.process_time() - started, total


def _bank_and_encoders(bank: str, codecs: list[str]):
    key = (bank, tuple(codecs))
    if key not in _BANK:
        from numcodecs import blosc

        from multigrounding.cache.image_store import level_compressors

        blosc.use_threads = False   # as in the pipeline, whose encoding threads are not the main one
        from multigrounding.cache.shard_file import ChunkCodec

        with np.load(bank) as data:
            levels = [data[f"level{k}"] for k in range(len(codecs))]
        encoders = []
        for codec in codecs:
            dicts = [{"name": "bytes", "configuration": {"endian": "little"}}]
            dicts += [c.to_dict() for c in level_compressors(codec)]
            encoders.append(ChunkCodec.from_codecs(dicts, np.dtype("float16")).encode)
        _BANK[key] = (levels, encoders)
    return _BANK[key]


# --------------------------------------------------------------------------- the arms

def run_pipeline(manifest: Path, cache: Path, shape_of: str, bank: Path, rows: int, workers: int,
                 pool, args) -> tuple[float, object]:
    import dask

    from multigrounding.pipeline.image_task import ImageExtraction, extract_images

    class StandInExtraction(ImageExtraction):
        def model_key(self, device, torch_threads):
            return StandInKey(self.backbone, str(bank), rows, device, torch_threads)

    if cache.exists():
        shutil.rmtree(cache)
    job = StandInExtraction(manifest=manifest, cache=cache, backbone=shape_of, weights="random",
                            shard_size=args.shard_size, batch_size=args.batch_size, device="cpu",
                            scheduler="processes", workers=workers, codecs=args.codecs)
    os.sync()
    started = time.perf_counter()
    with dask.config.set(pool=pool):
        summary = extract_images(job)
    if args.fsync:
        fsync_tree(cache)
    seconds = time.perf_counter() - started
    if not summary.ok:
        raise RuntimeError(f"extraction failed: {summary.failed_items[:3]} {summary.failed_shards}")
    return seconds, summary


def run_irreducible(pool, paths: list[str], size: int, bank: Path, codecs: list[str], rows: int,
                    total_bytes: int, folder: Path, fsync: bool) -> dict:
    """Decode+resize, then encode, then a plain write: each alone, one process per core."""
    n = cores()
    os.sync()
    slices = [paths[i::n] for i in range(n)]
    started = time.perf_counter()
    decode_cpu = sum(pool.map(_decode_slice, slices, [size] * n))
    decode = time.perf_counter() - started
    image_rows = [[i % rows for i in range(len(paths))][j::n] for j in range(n)]
    started = time.perf_counter()
    encoded = list(pool.map(_encode_slice, [str(bank)] * n, [codecs] * n, image_rows))
    encode = time.perf_counter() - started
    write = plain_write(folder, total_bytes, fsync)
    return {"decode": decode, "encode": encode, "write": write, "decode_cpu": decode_cpu,
            "encode_cpu": sum(s for s, _ in encoded), "encoded_bytes": sum(b for _, b in encoded)}


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` (what the store wrote reaches the disk)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def plain_write(folder: Path, total: int, fsync: bool = False) -> float:
    """Seconds to write ``total`` bytes to one new file in ``folder`` in 4 MiB blocks (from a
    synced state; with ``fsync``, until they are on the disk)."""
    block = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8)
    target = folder / "plain-write.bin"
    os.sync()
    started = time.perf_counter()
    with open(target, "wb", buffering=0) as handle:
        left = total
        while left > 0:
            view = memoryview(block)[:min(left, BLOCK)]
            while view:
                view = view[handle.write(view):]
            left -= min(left, BLOCK)
        if fsync:
            os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def visual_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "visual").rglob("*") if p.is_file())


# ------------------------------------------------------------------------- codec table

def codec_table(bank: Path, spec) -> list[dict]:
    """Per level and codec: bytes and CPU ms per image (this thread's CPU time, so other load on
    the machine does not count; crc32c included), on the bank's real rows; and what crc32c
    alone costs."""
    import google_crc32c

    with np.load(bank) as data:
        levels = [data[f"level{k}"] for k in range(len(spec.levels))]
    rows = []
    for k, (level, info) in enumerate(zip(levels, spec.levels)):
        raw = level[0].nbytes
        entry = {"level": info.name, "channels": info.channels, "raw": raw, "codecs": {}}
        for codec in CODECS:
            _, encoders = _bank_and_encoders(str(bank), [codec] * len(levels))
            encode = encoders[k]
            count, started, total = 0, time.thread_time(), 0
            while count < len(level) or time.thread_time() - started < 0.3:
                total += sum(len(memoryview(p).cast("B")) for p in encode(level[count % len(level)]))
                count += 1
            entry["codecs"][codec] = {"bytes": total / count,
                                      "ms": (time.thread_time() - started) / count * 1e3}
        count, started = 0, time.thread_time()
        while count < len(level) or time.thread_time() - started < 0.1:
            google_crc32c.extend(0, level[count % len(level)].reshape(-1).view(np.uint8))
            count += 1
        entry["crc_ms"] = (time.thread_time() - started) / count * 1e3
        rows.append(entry)
    return rows


def break_even(entry: dict, codec: str) -> float | None:
    """MB/s per compressing core below which ``codec`` beats storing raw (None: never)."""
    none, other = entry["codecs"]["none"], entry["codecs"][codec]
    saved = none["bytes"] - other["bytes"]
    extra = (other["ms"] - none["ms"]) / 1e3
    if saved <= 0:
        return None
    return saved / 1e6 / extra if extra > 0 else float("inf")


def reference_choice(entries: list[dict], decode_ms: float) -> tuple[tuple[str, ...], float, float]:
    """The codec per level that minimises the data path's time per image on the reference
    machine (max of CPU over its cores and bytes over its disk): (codecs, ms, bytes)."""
    best = None
    for combo in itertools.product(CODECS, repeat=len(entries)):
        cpu = decode_ms + sum(e["codecs"][c]["ms"] for e, c in zip(entries, combo))
        size = sum(e["codecs"][c]["bytes"] for e, c in zip(entries, combo))
        ms = max(cpu / REFERENCE["cores"], size / REFERENCE["disk_bytes_per_s"] * 1e3)
        if best is None or ms < best[1] - 1e-9:
            best = (combo, ms, size)
    return best


# --------------------------------------------------------------------------------- main

def bench_backbone(shape_of: str, root: Path, args, photos_manifest: Path) -> dict:
    from multigrounding.datasets.manifest import read_manifest
    from multigrounding.pipeline.backbones import get_backbone_spec
    from multigrounding.pipeline.image_task import ImageExtraction
    from multigrounding.pipeline.scheduler import plan_workers

    spec = get_backbone_spec(shape_of)
    count = args.images // 2 if shape_of == "pnasnet5large" else args.images
    lines = photos_manifest.read_text().splitlines()[:count]
    manifest = photos_manifest.parent / f"manifest-{count}.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    paths = [r.image for r in read_manifest(manifest)]
    bank, forward_s = make_bank(shape_of, paths[:args.bank_photos], root / f"bank-{shape_of}.npz")
    codecs = ImageExtraction(manifest=manifest, cache=root / "x", backbone=shape_of,
                             codecs=args.codecs).level_codecs(len(spec.levels), shape_of)
    raw_per_image = sum(spec.grid * spec.grid * lv.channels * 2 for lv in spec.levels)
    print(f"\n== {shape_of}: {count} photos, {len(spec.levels)} levels at {spec.grid}x{spec.grid} "
          f"({raw_per_image / 1e6:.2f} MB an image raw), codecs {','.join(codecs)}, shard "
          f"{args.shard_size}, batch {args.batch_size}"
          + (f"; bank made by the real forward, {forward_s:.2f} s an image" if forward_s else ""))
    workers_list = [int(w) for w in args.workers.split(",")]
    pools = {}
    for workers in workers_list:
        plan = plan_workers("processes", workers, "cpu")
        key = StandInKey(shape_of, str(bank), args.batch_size, "cpu", plan.torch_threads)
        pools[workers] = warm_pool(workers, key)
    irreducible_pool = warm_pool(cores(), StandInKey(shape_of, str(bank), args.batch_size, "cpu", 1))
    arms = [f"pipeline-{w}" for w in workers_list] + ["irreducible"]
    runs = {arm: [] for arm in arms}
    try:
        # warm-up run per worker count (first zarr writes, page cache of the photos)
        for workers in workers_list:
            run_pipeline(manifest, root / "store", shape_of, bank, args.batch_size, workers,
                         pools[workers], args)
        disk = visual_bytes(root / "store")
        for r in range(args.repeats):
            order = arms[r % len(arms):] + arms[:r % len(arms)]
            for arm in order:
                if arm == "irreducible":
                    runs[arm].append(run_irreducible(irreducible_pool, paths, spec.input_size, bank,
                                                     codecs, args.batch_size, disk, root, args.fsync))
                    continue
                workers = int(arm.split("-")[1])
                seconds, summary = run_pipeline(manifest, root / "store", shape_of, bank,
                                                args.batch_size, workers, pools[workers], args)
                runs[arm].append({"seconds": seconds, "stages": dict(summary.stages),
                                  "bytes": visual_bytes(root / "store"),
                                  "write_wait": summary.write_seconds})
            print(f"  repeat {r + 1}: " + ", ".join(
                f"{arm} {count / runs[arm][-1]['seconds']:.1f} img/s" for arm in arms if arm != "irreducible")
                + f"; irreducible decode {runs['irreducible'][-1]['decode']:.2f} s, encode "
                f"{runs['irreducible'][-1]['encode']:.2f} s, write {runs['irreducible'][-1]['write']:.2f} s")
    finally:
        for pool in list(pools.values()) + [irreducible_pool]:
            pool.shutdown()
        shutil.rmtree(root / "store", ignore_errors=True)
    irreducible = [sum(x[s] for s in ("decode", "encode", "write")) for x in runs["irreducible"]]
    result = {"backbone": shape_of, "images": count, "codecs": codecs, "raw_per_image": raw_per_image,
              "irreducible_rate": Stat([count / s for s in irreducible]), "workers": {}}
    for workers in workers_list:
        arm = runs[f"pipeline-{workers}"]
        result["workers"][workers] = {
            "rate": Stat([count / x["seconds"] for x in arm]),
            "ratio": Stat([irr / x["seconds"] for irr, x in zip(irreducible, arm)]),
            "bytes_per_image": arm[-1]["bytes"] / count,
            "stages": {stage: Stat([x["stages"].get(stage, 0.0) for x in arm])
                       for stage in STAGES + CPU_STAGES},
            "write_ratio": Stat([x["bytes"] / x["stages"]["write"] / (x["bytes"] / irr_run["write"])
                                 for x, irr_run in zip(arm, runs["irreducible"])]),
            "end_to_end_write_ratio": Stat([x["bytes"] / x["seconds"] / (x["bytes"] / irr_run["write"])
                                            for x, irr_run in zip(arm, runs["irreducible"])]),
            "write_mb_s": Stat([x["bytes"] / x["stages"]["write"] / 1e6 for x in arm]),
        }
    result["plain_write_mb_s"] = Stat([disk / x["write"] / 1e6 for x in runs["irreducible"]])
    result["per_core_ms"] = {      # CPU time: what a core spends, whatever else runs
        "decode_resize": Stat([x["decode_cpu"] / count * 1e3 for x in runs["irreducible"]]),
        "encode": Stat([x["encode_cpu"] / count * 1e3 for x in runs["irreducible"]])}
    result["codec_table"] = codec_table(bank, spec)
    return result


def report(results: list[dict], args) -> None:
    workers_list = [int(w) for w in args.workers.split(",")]
    print(f"\n== data path (stand-in model), median [min..max] of {args.repeats} alternated repeats")
    rows = []
    for r in results:
        for w in workers_list:
            x = r["workers"][w]
            rows.append([r["backbone"], ",".join(r["codecs"]), w, x["rate"].fmt(".1f"),
                         r["irreducible_rate"].fmt(".1f"), x["ratio"].fmt(".3f"),
                         f"{x['bytes_per_image'] / 1e6:.2f}", f"{r['raw_per_image'] / 1e6:.2f}"])
    print(table(["backbone", "codecs", "workers", "pipeline img/s", "irreducible img/s",
                 "pipeline / irreducible", "MB/image on disk", "MB/image raw"], rows))
    print("\nper-stage wall seconds of one run (summed over threads and workers; under other load "
          "a thread's wall time includes waiting for a core):")
    rows = []
    for r in results:
        for w in workers_list:
            stages = r["workers"][w]["stages"]
            rows.append([r["backbone"], w] + [stages[s].fmt(".2f") for s in STAGES])
    print(table(["backbone", "workers", "decode", "resize", "forward (stand-in)", "cast", "compress",
                 "write (shard files)", "records + done"], rows))
    print("\nper-stage CPU ms per image inside the pipeline (its threads' CPU time) against the same "
          "work alone in a tight loop:")
    rows = []
    for r in results:
        for w in workers_list:
            stages, n = r["workers"][w]["stages"], r["images"]
            rows.append([r["backbone"], w] + [f"{stages[s].median / n * 1e3:.2f}" for s in CPU_STAGES]
                        + [r["per_core_ms"]["decode_resize"].fmt(".2f"), r["per_core_ms"]["encode"].fmt(".2f")])
    print(table(["backbone", "workers", "decode", "resize", "compress", "write", "alone: decode + resize",
                 "alone: encode"], rows))
    print("\nwrite throughput over a plain sequential write of the same bytes (end to end: bytes on "
          "disk / the run's wall time; writer: bytes / the seconds its thread spent in write calls)"
          + (", every side ending with an fsync:" if args.fsync else ", page cache (no fsync):"))
    rows = []
    for r in results:
        for w in workers_list:
            x = r["workers"][w]
            rows.append([r["backbone"], w, x["write_mb_s"].fmt(".0f"), r["plain_write_mb_s"].fmt(".0f"),
                         x["write_ratio"].fmt(".3f"), x["end_to_end_write_ratio"].fmt(".3f")])
    print(table(["backbone", "workers", "writer MB/s", "plain write MB/s", "writer / plain",
                 "end to end / plain (judged)"], rows))
    print("\nper-core cost of the irreducible work (CPU ms an image):")
    print(table(["backbone", "decode + resize", "encode (chosen codecs + crc32c)"],
                [[r["backbone"], r["per_core_ms"]["decode_resize"].fmt(".2f"),
                  r["per_core_ms"]["encode"].fmt(".2f")] for r in results]))
    for r in results:
        print(f"\ncodec per level, {r['backbone']} (single core; every codec includes the crc32c "
              "checksum; break-even: MB/s of disk per compressing core below which the codec "
              "beats none)")
        rows = []
        for e in r["codec_table"]:
            row = [e["level"], e["channels"], f"{e['raw'] / 1e6:.3f}"]
            for codec in CODECS:
                c = e["codecs"][codec]
                row.append(f"{c['bytes'] / 1e6:.3f} MB ({e['raw'] / c['bytes']:.2f}x), {c['ms']:.2f} ms")
            for codec in ("lz4", "zstd1"):
                be = break_even(e, codec)
                row.append("never" if be is None else f"{be:.0f}")
            row.append(f"{e['crc_ms']:.3f}")
            rows.append(row)
        print(table(["level", "channels", "raw MB", "none", "lz4", "zstd1", "lz4 pays below MB/s/core",
                     "zstd1 pays below MB/s/core", "crc32c alone ms"], rows))
    print(f"\n== estimate for a GPU machine with {REFERENCE['cores']} cores and a "
          f"{REFERENCE['disk_bytes_per_s'] / 1e9:.0f} GB/s disk (per-core rates measured here; the "
          "GPU itself not counted)")
    rows = []
    for r in results:
        decode = r["per_core_ms"]["decode_resize"].median
        combo, ms, size = reference_choice(r["codec_table"], decode)
        chosen = tuple(r["codecs"])
        cpu = decode + sum(e["codecs"][c]["ms"] for e, c in zip(r["codec_table"], chosen))
        chosen_bytes = sum(e["codecs"][c]["bytes"] for e, c in zip(r["codec_table"], chosen))
        cpu_rate = REFERENCE["cores"] / cpu * 1e3
        disk_rate = REFERENCE["disk_bytes_per_s"] / chosen_bytes
        limit = "cores" if cpu_rate < disk_rate else "disk"
        rows.append([r["backbone"], ",".join(chosen), f"{cpu:.1f}", f"{chosen_bytes / 1e6:.2f}",
                     f"{cpu_rate:.0f}", f"{disk_rate:.0f}", limit, ",".join(combo), f"{1e3 / ms:.0f}"])
    print(table(["backbone", "codecs", "CPU ms/image (1 core)", "MB/image", "img/s the cores allow",
                 "img/s the disk allows", "limit", "best codecs there", "img/s with them"], rows))
    print()
    for r in results:
        for w in workers_list:
            x = r["workers"][w]
            print(verdict(f"{r['backbone']} {w} worker(s): data path / irreducible work", x["ratio"],
                          f">= {TARGET_MACHINERY}", x["ratio"].median >= TARGET_MACHINERY))
        x = r["workers"][workers_list[0]]
        if r["backbone"] == "pnasnet5large":
            ratio = x["end_to_end_write_ratio"]
            print(verdict(f"{r['backbone']}: write throughput / plain sequential write"
                          + ("" if args.fsync else " (page cache)"), ratio,
                          f">= {TARGET_WRITE}", ratio.median >= TARGET_WRITE))


def _plain(value):
    if isinstance(value, Stat):
        return {"median": value.median, "min": value.low, "max": value.high, "values": value.values}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    print("bench_data_path:", machine_line())
    with work_folder(args.workdir, "bench-data-path-") as root:
        photos = photo_jpegs(root / "photos", args.images)
        sizes = [os.path.getsize(p) for p in (root / "photos" / "images").glob("*.jpg")]
        print(f"photos: {len(sizes)} JPEG files of COCO 39769 at {len({s for s in sizes})} different "
              f"sizes in bytes, {np.mean(sizes) / 1e3:.0f} kB on average")
        results = [bench_backbone(name.strip(), root, args, photos)
                   for name in args.backbones.split(",") if name.strip()]
        report(results, args)
        if args.json:
            args.json.write_text(json.dumps(_plain(results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
