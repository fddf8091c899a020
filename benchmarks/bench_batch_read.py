"""Random batch reads from a visual feature store, against a plain read of the same bytes.

One batch = 32 random rows (drawn without replacement, unsorted), all 4 levels, as float16
arrays [32, M, M, C_k]. Readers, alternated batch by batch (the order rotates every batch):

* cache  — ``VisualBatchReader(store).read(rows)`` (tensorstore ``zarr3`` driver over the store,
           zstd-compressed shards of 128 images, one image per inner chunk), no chunk cache:
           every read decompresses (a first epoch);
* cache, warm — the same with the trainer's default chunk cache (``--cache-gb``, 2 GB) after one
           pass over the store: what every later epoch reads when the training set fits;
* npy    — the same arrays saved uncompressed as one ``.npy`` file per level, opened once with
           ``np.load(mmap_mode="r")`` (default; ``--npy-mode memory`` loads them into RAM
           instead) and fancy-indexed with the 32 rows;
* zarr   — zarr-python's own integer-array indexing on the sharded arrays
           (``level.oindex[rows]``), on the first ``--zarr-batches`` batches only (it is slow):
           it shows why the reader uses tensorstore.

All files were just written, so every reader reads from the page cache (warm); no reader keeps
a cache of its own (tensorstore's cache pool is off by default). The store comes from a real
extraction (``--store extract``, default: efficientnet_lite0 with ``--weights random`` over
synthetic 96 px images; ``--weights imagenet`` gives the real features, which compress far
less, ~2.4x against ~13x, so they cost more to decode) or is written
directly with ``ImageFeatureStore.create_or_resume`` + ``write_shard`` from random float16
normal data of the real shapes (``--store random``: faster, but that data hardly compresses, so
decompression costs less than on real features).

Reported: ms per batch of each reader (median [min..max]) and the per-batch ratios
npy/cache (target ≥ 0.5: the cache at most 2× slower than reading raw arrays), judged for the
plain reader and for the warm one, and zarr/cache.

    python benchmarks/bench_batch_read.py                      # ~1-2 minutes on 2 cores
    python benchmarks/bench_batch_read.py --weights imagenet           # real features
    python benchmarks/bench_batch_read.py --weights imagenet --codecs none,zstd1,lz4,dense-none
    python benchmarks/bench_batch_read.py --store random --images 1024 --batches 200
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stat, machine_line, table, verdict, work_folder  # noqa: E402

TARGET = 0.5
CODECS = ("none", "zstd1", "zstd3", "lz4", "dense-none")   # dense-none: levels with zstd < 1.2x stored raw


def _codec(name: str, level_ratio: float):
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "none" or (name == "dense-none" and level_ratio < 1.2):
        return None
    if name in ("zstd1", "zstd3"):
        return ZstdCodec(level=int(name[-1]))
    if name == "lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2)
    if name == "dense-none":
        return ZstdCodec(level=3)
    raise ValueError(f"unknown codec {name!r}: choose from {', '.join(CODECS)}")


def copy_with_codec(cache: Path, out: Path, name: str) -> tuple[Path, float]:
    """The visual levels of ``cache`` rewritten with codec ``name``; (folder, raw bytes / bytes on disk)."""
    import zarr

    from multigrounding.cache.image_store import ImageFeatureStore

    store = ImageFeatureStore.open(cache)
    group = zarr.open_group(str(out), mode="w")
    raw = disk = 0
    for k, level in enumerate(store.levels):
        level_dir = cache / "visual" / f"level{k}"
        level_disk = sum(p.stat().st_size for p in level_dir.rglob("*") if p.is_file())
        level_raw = int(np.prod(level.shape)) * 2
        copy = group.create_array(f"level{k}", shape=level.shape, dtype="float16", chunks=level.chunks,
                                  shards=level.shards, compressors=_codec(name, level_raw / level_disk),
                                  fill_value=0)
        copy[:] = level[:]
        raw += level_raw
        disk += sum(p.stat().st_size for p in (out / f"level{k}").rglob("*") if p.is_file())
    return out, raw / disk


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", choices=("extract", "random"), default="extract",
                   help="how the store is made (default: %(default)s)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="random",
                   help="for --store extract: random (default, quick to state) or imagenet (the "
                        "real features: they compress ~2.4x, random-init ones ~13x, and the zstd "
                        "decoding is most of the read time)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=96, help="side of the synthetic images")
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="rows per batch")
    p.add_argument("--batches", type=int, default=50, help="alternated cache/npy batches")
    p.add_argument("--zarr-batches", type=int, default=10,
                   help="of those, how many also read with zarr-python (0 to skip)")
    p.add_argument("--npy-mode", choices=("mmap", "memory"), default="mmap")
    p.add_argument("--codecs", default="",
                   help="also read copies of the store with other codecs for the visual levels, "
                        "comma-separated, of: " + ", ".join(CODECS) + " (same chunks and shards, "
                        "same tensorstore reader)")
    p.add_argument("--cache-gb", type=float, default=2.0,
                   help="chunk cache of the 'cache, warm' reader (default: the trainer's, 2 GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep the data and stores here (default: a temp dir)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- building the store

def build_by_extraction(root: Path, args) -> Path:
    from multigrounding.datasets.synth import generate_synth
    from multigrounding.pipeline.image_task import ImageExtraction, extract_images

    generate_synth(root / "synth", args.images, seed=args.seed, size=args.image_size)
    cache = root / "cache"
    job = ImageExtraction(manifest=root / "synth" / "manifest.jsonl", cache=cache,
                          backbone=args.backbone, weights=args.weights, seed=args.seed,
                          shard_size=args.shard_size, device="cpu", scheduler="synchronous",
                          overwrite=True)
    summary = extract_images(job)
    if not summary.ok:
        raise RuntimeError(f"extraction failed: {summary.failed_items[:3]} {summary.failed_shards}")
    return cache


def build_random(root: Path, args) -> Path:
    from multigrounding.cache.image_store import (OK, ImageFeatureStore, ImageLayout,
                                                  ImageStoreConfig, LevelInfo)
    from multigrounding.pipeline.backbones import get_backbone_spec

    spec = get_backbone_spec(args.backbone)
    config = ImageStoreConfig(
        manifest_path="-", manifest={"sha256": "-", "images": args.images}, backbone=spec.name,
        weights={"weights": "random float16 data (benchmark)"},
        levels=[LevelInfo(lv.name, lv.module, lv.channels, lv.stride) for lv in spec.levels],
        grid=spec.grid, input_size=spec.input_size, resize="-", dtype="float16",
        shard_size=args.shard_size, versions={})
    ids = [f"img{i:06d}" for i in range(args.images)]
    cache = root / "cache"
    if cache.exists():
        shutil.rmtree(cache)
    store, _ = ImageFeatureStore.create_or_resume(cache, config, ImageLayout(ids, []))
    rng = np.random.default_rng(args.seed)
    for shard in range(store.num_shards):
        rows = store.shard_slice(shard)
        n = rows.stop - rows.start
        features = [rng.standard_normal((n, spec.grid, spec.grid, lv.channels), np.float32).astype(np.float16)
                    for lv in spec.levels]
        store.write_shard(shard, features, np.full(n, OK, np.uint8), [""] * n,
                          np.full((n, 2), args.image_size, np.int32))
    return cache


# --------------------------------------------------------------------------- readers

def make_readers(cache: Path, npy_dir: Path, args):
    from multigrounding.cache.image_store import ImageFeatureStore
    from multigrounding.cache.reader import VisualBatchReader

    store = ImageFeatureStore.open(cache)
    npy_dir.mkdir(parents=True, exist_ok=True)
    for k, level in enumerate(store.levels):
        np.save(npy_dir / f"level{k}.npy", level[:])
    mmap = "r" if args.npy_mode == "mmap" else None
    npy_levels = [np.load(npy_dir / f"level{k}.npy", mmap_mode=mmap) for k in range(len(store.levels))]
    reader = VisualBatchReader(cache)
    warm = VisualBatchReader(cache, cache_bytes=int(args.cache_gb * 1e9))
    for first in range(0, store.num_images, args.batch):      # one pass: the first epoch
        warm.read(np.arange(first, min(first + args.batch, store.num_images)))
    zarr_levels = store.levels

    def read_cache(rows):
        return reader.read(rows)

    def read_warm(rows):
        return warm.read(rows)

    def read_npy(rows):
        return [np.asarray(level[rows]) for level in npy_levels]

    def read_zarr(rows):
        return [level.oindex[rows] for level in zarr_levels]

    readers = {"cache": read_cache, "cache, warm": read_warm, "npy": read_npy, "zarr": read_zarr}
    ratios = {}
    for name in [c.strip() for c in args.codecs.split(",") if c.strip()]:
        import tensorstore as ts

        folder, ratio = copy_with_codec(cache, cache.parent / f"codec-{name}", name)
        levels = [ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder / f"level{k}")}},
                          read=True).result() for k in range(len(store.levels))]

        def read_copy(rows, levels=levels):
            index = np.asarray(rows, dtype=np.int64)
            futures = [level[index].read() for level in levels]
            return [future.result() for future in futures]

        readers[f"cache, {name}"] = read_copy
        ratios[f"cache, {name}"] = ratio
    return readers, store, ratios


def main(argv=None) -> int:
    args = parse_args(argv)
    print("bench_batch_read:", machine_line())
    with work_folder(args.workdir, "bench-read-") as root:
        started = time.perf_counter()
        cache = build_by_extraction(root, args) if args.store == "extract" else build_random(root, args)
        readers, store, codec_ratios = make_readers(cache, root / "npy", args)
        mb_per_image = store.bytes_per_image / 1e6
        disk = sum(p.stat().st_size for p in (cache / "visual").rglob("*") if p.is_file())
        raw = store.bytes_per_image * store.num_images
        how = (f"extracted: {args.backbone} --weights {args.weights} over synthetic "
               f"{args.image_size}px images" if args.store == "extract"
               else "written directly: random float16 normal data of the real shapes")
        print(f"store ({how}, {time.perf_counter() - started:.0f} s to build): {store.num_images} "
              f"images, levels {[tuple(lv.shape[1:]) for lv in store.levels]}, "
              f"{mb_per_image:.2f} MB/image, {args.batch * mb_per_image:.1f} MB per batch, "
              f"zstd ratio {raw / disk:.2f}x; npy: uncompressed, "
              f"{'memory-mapped (np.load mmap_mode=r)' if args.npy_mode == 'mmap' else 'loaded into RAM'}")

        rng = np.random.default_rng(args.seed + 1)
        first = rng.choice(store.num_images, args.batch, replace=False)
        reference = readers["npy"](first)
        for name, read in readers.items():   # warm-up, and every reader returns the same values
            got = read(first)
            if not all(np.array_equal(a, b) for a, b in zip(got, reference)):
                raise AssertionError(f"reader {name} returned other values than npy")

        times = {name: [] for name in readers}
        for i in range(args.batches):
            rows = rng.choice(store.num_images, args.batch, replace=False)
            names = ["cache", "cache, warm", "npy"] + list(codec_ratios) + (["zarr"] if i < args.zarr_batches else [])
            names = names[i % len(names):] + names[:i % len(names)]
            batch_times = {}
            for name in names:
                t = time.perf_counter()
                readers[name](rows)
                batch_times[name] = (time.perf_counter() - t) * 1e3
            for name, ms in batch_times.items():
                times[name].append(ms)
        npy_over_cache = Stat([n / c for n, c in zip(times["npy"], times["cache"])])
        npy_over_warm = Stat([n / c for n, c in zip(times["npy"], times["cache, warm"])])
        rows_out = [["cache (tensorstore)", len(times["cache"]), Stat(times["cache"]).fmt(".1f"), "1"],
                    [f"cache, warm {args.cache_gb:g} GB chunk cache", len(times["cache, warm"]),
                     Stat(times["cache, warm"]).fmt(".1f"),
                     Stat([w / c for w, c in zip(times["cache, warm"], times["cache"])]).fmt(".3f")],
                    [f"npy ({args.npy_mode})", len(times["npy"]), Stat(times["npy"]).fmt(".1f"),
                     npy_over_cache.fmt(".3f")]]
        for name, ratio in codec_ratios.items():
            rows_out.append([f"{name} (disk ratio {ratio:.2f}x)", len(times[name]), Stat(times[name]).fmt(".1f"),
                             Stat([t / c for t, c in zip(times[name], times["cache"])]).fmt(".3f")])
        if times["zarr"]:
            zarr_over_cache = Stat([z / c for z, c in zip(times["zarr"], times["cache"])])
            rows_out.append(["zarr-python oindex", len(times["zarr"]), Stat(times["zarr"]).fmt(".1f"),
                             zarr_over_cache.fmt(".3g")])
        print(f"\n== {args.batch}-image random batches, all {len(store.levels)} levels "
              f"(median [min..max] over alternated batches)")
        print(table(["reader", "batches", "ms per batch", "its time / cache time (per batch)"], rows_out))
        print(verdict("npy time / cache time (no chunk cache: a first epoch)", npy_over_cache,
                      f">= {TARGET}", npy_over_cache.median >= TARGET))
        print(verdict(f"npy time / cache time (warm {args.cache_gb:g} GB chunk cache: later epochs)",
                      npy_over_warm, f">= {TARGET}", npy_over_warm.median >= TARGET))
        for name in codec_ratios:
            alt = Stat([n / c for n, c in zip(times["npy"], times[name])])
            print(f"        with {name.split(', ')[1]}: npy time / its time {alt.fmt('.3f')}")
        if times["zarr"]:
            print(f"        zarr-python integer indexing takes {zarr_over_cache.median:.1f}x the cache "
                  f"reader's time per batch (why the reader uses tensorstore)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
