"""Random-batch reads from an object-store (S3) copy of a feature cache against the local cache,
and the bytes each training epoch pulls over the wire with and without the chunk cache.

The store is made the way a user makes one: ``multigrounding datasets synth`` then
``multigrounding extract images --weights random --scheduler synchronous`` (efficientnet_lite0,
synthetic images; ``--weights imagenet`` for the real features, which compress far less). It is copied into a bucket of a local S3 server (moto's ThreadedMotoServer,
``tests/s3_server.py``, run in a child process so it does not share the reader's interpreter)
with fsspec's ``put`` (s3fs), and every copied object is checked byte for byte.

Readers, one batch = 32 random rows (drawn without replacement), all 4 levels, alternated batch
by batch with the order rotated:

* local        — ``VisualBatchReader(cache)``: tensorstore ``zarr3`` over the ``file`` kvstore,
                 no chunk cache (what every epoch costs without one);
* local, warm  — the same with a ``--cache-gb`` chunk cache (cache_pool) after one pass;
* s3           — ``VisualBatchReader`` on the ``s3://`` location: tensorstore ``zarr3`` over its
                 ``s3`` kvstore (``Location.kvstore_spec``), no chunk cache;
* s3, warm     — tensorstore with the chunk cache after one pass, cached chunks revalidated with
                 the server on every read (tensorstore's default);
* s3, warm, no recheck — ``VisualBatchReader(s3, cache_bytes)``, as training reads: cached chunks
                 trusted (``recheck_cached_data: "open"``; a finished store does not change);
* s3, zarr     — zarr-python over ``Location.zarr_store()`` (zarr's ObjectStore, obstore),
                 one ``getitem`` per image and level, all issued at once: the route for schemes
                 that tensorstore has no kvstore for;
* s3, zarr+s3fs — the same over zarr's FsspecStore (s3fs), for the choice of zarr store.

Then real training (``multigrounding.heads.trainer.train``, the text store beside the image
store, both local or both on S3) with ``--read-cache-gb 0`` and the default: per epoch its
seconds, the time it waited for data, and the bytes the server sent (text included; the first
epoch also opens the stores).

Judged ratios (per batch, median [min..max]): s3 / local cold, s3 warm / local warm,
s3-zarr / s3; beside them the reader process's own CPU time per batch (``time.process_time``,
all its threads), which does not include the server's. Bytes on the wire come from the server's own count of response bodies
(``GET /_traffic``), cross-checked against tensorstore's ``/tensorstore/kvstore/s3/bytes_read``
counter for the tensorstore readers; per epoch = every row once, in random batches.

The moto server is Python on the same 2 cores: each request costs it ~1-4 ms of CPU, which a
real S3 endpoint does not take from the client, while a real network adds 10-50 ms of latency
per request that the loopback does not. The request counts transfer to a real deployment; the
times are an upper bound of the client's CPU cost plus moto's.

    python benchmarks/bench_object_store.py                      # ~3-5 minutes on 2 cores
    python benchmarks/bench_object_store.py --images 512 --batches 40
    python benchmarks/bench_object_store.py --weights imagenet        # real features
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import Stat, machine_line, table  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--weights", default="random",
                   help="random (default; its features compress ~12x) or imagenet (the real "
                        "EfficientNet-Lite0 features, ~2.4x: more bytes per batch)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=30, help="alternated timed batches")
    p.add_argument("--zarr-batches", type=int, default=10,
                   help="of those, how many also read with zarr-python (slow)")
    p.add_argument("--cache-gb", type=float, default=2.0, help="the warm readers' chunk cache")
    p.add_argument("--write-repeats", type=int, default=3,
                   help="alternated shard-write rounds per zarr store (obstore, s3fs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-epochs", type=int, default=3,
                   help="epochs of each real training run (0: no training section)")
    p.add_argument("--train-dim", type=int, default=16, help="D of those runs (small: data-bound)")
    p.add_argument("--workdir", type=Path, help="keep the data and the store here")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the store
def build_cache(root: Path, args) -> Path:
    """A store made with the command line, as a user would."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cli = [sys.executable, "-m", "multigrounding"]
    cache = root / "cache"
    if not (root / "synth" / "manifest.jsonl").exists():
        subprocess.run(cli + ["datasets", "synth", str(root / "synth"), "--images",
                              str(args.images), "--seed", str(args.seed), "--size",
                              str(args.image_size)], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(cli + ["extract", "images", str(root / "synth" / "manifest.jsonl"), "--cache",
                          str(cache), "--weights", args.weights, "--scheduler", "synchronous",
                          "--device", "cpu", "--shard-size", str(args.shard_size)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    if args.train_epochs:
        subprocess.run(cli + ["extract", "text", str(root / "synth" / "manifest.jsonl"), "--cache",
                              str(root / "text"), "--scheduler", "synchronous", "--device", "cpu"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    return cache


def upload(cache: Path, server, bucket: str, name: str = "cache") -> tuple[str, float, int]:
    """Copy the store into the bucket with fsspec's put; (url, seconds, bytes)."""
    import fsspec

    fs = fsspec.filesystem("s3", **server.storage_options)
    files = [p for p in sorted(cache.rglob("*")) if p.is_file() and p.name != ".lock"]
    remote = [f"{bucket}/{name}/{p.relative_to(cache).as_posix()}" for p in files]
    started = time.perf_counter()
    fs.put([str(p) for p in files], remote)
    return f"s3://{bucket}/{name}", time.perf_counter() - started, sum(p.stat().st_size for p in files)


def training_epochs(images, text, options, server, args, out: Path) -> list[dict]:
    """One real training run; per epoch: seconds, seconds waiting for data, MB and requests the
    server answered. An epoch's reads all happen before its last step is reported (its
    prefetcher is closed before the next epoch's starts), so the counts split cleanly there."""
    from multigrounding.heads.config import TrainConfig
    from multigrounding.heads.trainer import train

    config = TrainConfig(images=str(images), text=str(text), out=str(out),
                         epochs=args.train_epochs, batch_size=args.batch, dim=args.train_dim,
                         seed=args.seed, device="cpu", read_cache_gb=args.cache_gb if options[
                             "cache"] else 0.0)
    epochs: list[dict] = []
    state = {"traffic": server.traffic(), "time": time.perf_counter(), "wait": 0.0, "steps": 0}

    def progress(metrics: dict) -> None:
        state["wait"] += metrics["data_wait_seconds"]
        state["steps"] += 1
        if state["steps"] == options["steps"]:
            now, traffic = time.perf_counter(), server.traffic()
            used = traffic - state["traffic"]
            epochs.append({"seconds": now - state["time"], "wait": state["wait"],
                           "mb": used.bytes_out / 1e6, "requests": used.requests})
            state.update(traffic=traffic, time=now, wait=0.0, steps=0)

    train(config, progress=progress, storage_options=options["storage_options"])
    return epochs


# --------------------------------------------------------------------------- readers
def tensorstore_reader(location, levels: int, cache_bytes: int, recheck=True):
    """``recheck``: tensorstore's ``recheck_cached_data`` (True: revalidate cached chunks on
    every read, one conditional request per shard touched; "open": trust them once read)."""
    import tensorstore as ts

    context = ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)}})
    arrays = [ts.open({"driver": "zarr3", "kvstore": location.kvstore_spec(f"visual/level{k}"),
                       "recheck_cached_data": recheck},
                      read=True, context=context).result() for k in range(levels)]

    def read(rows):
        index = np.asarray(rows, dtype=np.int64)
        futures = [array[index].read() for array in arrays]
        return [future.result() for future in futures]
    return read


def zarr_reader(store, levels: int):
    """zarr-python (``multigrounding.cache.zarr_rows``): one getitem per image and level, all
    awaited together."""
    import zarr

    from multigrounding.cache.zarr_rows import read_rows

    group = zarr.open_group(store, mode="r")
    arrays = [group[f"visual/level{k}"] for k in range(levels)]
    return lambda rows: read_rows(arrays, rows)


def write_shards(store, levels, shard_size: int) -> None:
    """Write every visual level shard by shard through zarr-python, as an extraction worker does
    (whole shards, ``write_empty_chunks`` on)."""
    import zarr

    group = zarr.open_group(store, mode="w")
    with zarr.config.set({"array.write_empty_chunks": True}):
        for k, level in enumerate(levels):
            values = level[:]
            array = group.create_array(f"level{k}", shape=level.shape, dtype="float16",
                                       chunks=level.chunks, shards=level.shards,
                                       compressors=level.compressors, fill_value=0)
            for first in range(0, values.shape[0], shard_size):
                array[first:first + shard_size] = values[first:first + shard_size]


def epoch_traffic(read, server, num_images: int, batch: int, rng) -> tuple[float, int, float]:
    """One epoch (every row once, random batches): (MB sent by the server, requests, seconds)."""

    before, started = server.traffic(), time.perf_counter()
    order = rng.permutation(num_images)
    for first in range(0, num_images, batch):
        read(order[first:first + batch])
    seconds = time.perf_counter() - started
    used = server.traffic() - before
    return used.bytes_out / 1e6, used.requests, seconds


def _s3_bytes_read() -> int:
    import tensorstore as ts

    for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/s3/bytes_read"):
        return int(metric["values"][0]["value"])
    return 0


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    from s3_server import S3ServerProcess
    from zarr.storage import FsspecStore

    from multigrounding.cache.image_store import ImageFeatureStore
    from multigrounding.cache.location import Location
    from multigrounding.cache.reader import VisualBatchReader
    from multigrounding.heads.data import PairedCaches

    print("bench_object_store:", machine_line())
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-s3-"))
    root.mkdir(parents=True, exist_ok=True)
    server = S3ServerProcess().start()
    try:
        started = time.perf_counter()
        cache = build_cache(root, args)
        store = ImageFeatureStore.open(cache)
        n, levels = store.num_images, len(store.levels)
        print(f"store: {n} images, levels {[tuple(lv.shape[1:]) for lv in store.levels]}, "
              f"{store.bytes_per_image / 1e6:.3f} MB/image raw, made in "
              f"{time.perf_counter() - started:.0f} s")
        bucket = server.new_bucket("bench")
        before = server.traffic()
        url, upload_s, upload_bytes = upload(cache, server, bucket)
        sent = server.traffic() - before
        s3 = Location.parse(url, server.storage_options)
        local = Location.parse(cache)
        mismatched = [k for k in local.keys() if k != ".lock" and s3.read_bytes(k) != local.read_bytes(k)]
        if mismatched or sorted(s3.keys()) != sorted(k for k in local.keys() if k != ".lock"):
            raise AssertionError(f"the copy differs from the local store: {mismatched[:5]}")
        visual_mb = sum(p.stat().st_size for p in (cache / "visual").rglob("*") if p.is_file()) / 1e6
        print(f"copied with fsspec put: {upload_bytes / 1e6:.1f} MB in {upload_s:.1f} s "
              f"({sent.requests} requests); every object equal to its file; visual levels "
              f"{visual_mb:.1f} MB compressed")

        cache_bytes = int(args.cache_gb * 1e9)
        readers = {
            "local": VisualBatchReader(cache).read,
            "local, warm": VisualBatchReader(cache, cache_bytes=cache_bytes).read,
            "s3": VisualBatchReader(s3).read,
            "s3, warm": tensorstore_reader(s3, levels, cache_bytes),
            "s3, warm, no recheck": VisualBatchReader(s3, cache_bytes=cache_bytes).read,
            "s3, zarr": zarr_reader(s3.zarr_store(read_only=True), levels),
            "s3, zarr+s3fs": zarr_reader(FsspecStore.from_url(url, storage_options=dict(
                server.storage_options), read_only=True), levels),
        }
        rng = np.random.default_rng(args.seed + 1)

        # writing shards through zarr-python: obstore (zarr's ObjectStore) against s3fs
        writes = {"obstore": [], "s3fs": []}
        write_requests = {}
        for repeat in range(args.write_repeats):
            for name in (["obstore", "s3fs"] if repeat % 2 == 0 else ["s3fs", "obstore"]):
                target = Location.parse(f"s3://{bucket}/write-{name}-{repeat}", server.storage_options)
                zstore = target.zarr_store() if name == "obstore" else FsspecStore.from_url(
                    target.url, storage_options=dict(server.storage_options))
                before, t = server.traffic(), time.perf_counter()
                write_shards(zstore, store.levels, args.shard_size)
                writes[name].append(time.perf_counter() - t)
                write_requests[name] = (server.traffic() - before).requests
                target.delete_all()

        # bytes on the wire per epoch (the warm reader's first epoch fills its cache)
        rows_traffic = []
        for name, label in (("s3", "no chunk cache, any epoch"),
                            ("s3, warm", "chunk cache, first epoch"),
                            ("s3, warm", "chunk cache, later epochs"),
                            ("s3, warm, no recheck", "chunk cache, first epoch"),
                            ("s3, warm, no recheck", "chunk cache, later epochs"),
                            ("s3, zarr", "zarr-python, any epoch")):
            ts_before = _s3_bytes_read()
            mb, requests, seconds = epoch_traffic(readers[name], server, n, args.batch, rng)
            ts_mb = (_s3_bytes_read() - ts_before) / 1e6
            rows_traffic.append([name, label, f"{mb:.2f}", f"{mb / visual_mb:.3f}", requests,
                                 f"{ts_mb:.2f}" if name != "s3, zarr" else "-", f"{seconds:.1f}"])
        readers["local, warm"](np.arange(n))  # one pass fills the local warm cache too

        first = rng.choice(n, args.batch, replace=False)
        reference = readers["local"](first)
        for name, read in readers.items():   # every reader returns the same values
            if not all(np.array_equal(a, b) for a, b in zip(read(first), reference)):
                raise AssertionError(f"reader {name} returned other values than the local one")

        times = {name: [] for name in readers}
        cpu = {name: [] for name in readers}      # this process's CPU (all its threads)
        for i in range(args.batches):
            rows = rng.choice(n, args.batch, replace=False)
            names = ["local", "local, warm", "s3", "s3, warm", "s3, warm, no recheck"]
            if i < args.zarr_batches:
                names += ["s3, zarr", "s3, zarr+s3fs"]
            names = names[i % len(names):] + names[:i % len(names)]
            for name in names:
                c, t = time.process_time(), time.perf_counter()
                readers[name](rows)
                times[name].append((time.perf_counter() - t) * 1e3)
                cpu[name].append((time.process_time() - c) * 1e3)

        def ratio(a, b):
            return Stat([x / y for x, y in zip(times[a], times[b])])

        def cpu_ms(name, against=None):
            shown = Stat(cpu[name]).fmt(".1f")
            if against is None:
                return shown
            return shown + " (ratio " + Stat([x / max(y, 1e-3) for x, y in zip(
                cpu[name], cpu[against])]).fmt(".2f") + ")"

        print(f"\n== {args.batch}-image random batches, all {levels} levels (median [min..max] "
              f"over {args.batches} alternated batches; zarr readers on the first "
              f"{args.zarr_batches})")
        print(table(["reader", "ms per batch", "ratio (per batch)", "against",
                     "reader CPU ms per batch"], [
            ["local (tensorstore file)", Stat(times["local"]).fmt(".1f"), "1", "",
             cpu_ms("local")],
            ["s3 (tensorstore s3)", Stat(times["s3"]).fmt(".1f"),
             ratio("s3", "local").fmt(".2f"), "local", cpu_ms("s3", "local")],
            [f"local, warm {args.cache_gb:g} GB chunk cache", Stat(times["local, warm"]).fmt(".1f"),
             "1", "", cpu_ms("local, warm")],
            [f"s3, warm {args.cache_gb:g} GB chunk cache", Stat(times["s3, warm"]).fmt(".1f"),
             ratio("s3, warm", "local, warm").fmt(".2f"), "local, warm", cpu_ms("s3, warm", "local, warm")],
            ["s3, warm, recheck_cached_data=open", Stat(times["s3, warm, no recheck"]).fmt(".1f"),
             ratio("s3, warm, no recheck", "local, warm").fmt(".2f"), "local, warm",
             cpu_ms("s3, warm, no recheck", "local, warm")],
            ["s3, zarr-python (obstore)", Stat(times["s3, zarr"]).fmt(".1f"),
             ratio("s3, zarr", "s3").fmt(".2f"), "s3 (tensorstore)", cpu_ms("s3, zarr", "s3")],
            ["s3, zarr-python (s3fs)", Stat(times["s3, zarr+s3fs"]).fmt(".1f"),
             ratio("s3, zarr+s3fs", "s3, zarr").fmt(".2f"), "s3, zarr-python (obstore)",
             cpu_ms("s3, zarr+s3fs", "s3, zarr")],
        ]))
        print("(reader CPU: this process only, every thread; the S3 server runs in its own "
              "process, so its CPU is not counted here)")
        if args.write_repeats:
            write_ratio = Stat([f / o for f, o in zip(writes["s3fs"], writes["obstore"])])
            print(f"\n== writing the visual levels shard by shard through zarr-python "
                  f"({args.write_repeats} alternated rounds)")
            print(table(["zarr store", "seconds", "requests", "ratio"], [
                ["ObjectStore (obstore)", Stat(writes["obstore"]).fmt(".2f"),
                 write_requests["obstore"], "1"],
                ["FsspecStore (s3fs)", Stat(writes["s3fs"]).fmt(".2f"), write_requests["s3fs"],
                 write_ratio.fmt(".2f")]]))
        print(f"\n== bytes on the wire per epoch ({n} images in batches of {args.batch}; the "
              f"visual levels are {visual_mb:.1f} MB)")
        print(table(["reader", "when", "MB sent by the server", "÷ store", "requests",
                     "MB tensorstore counted", "seconds"], rows_traffic))

        if args.train_epochs:
            text_url, _, _ = upload(root / "text", server, bucket, "text")
            steps = len(PairedCaches(cache, root / "text")) // args.batch
            runs = {}
            arms = [("local", cache, root / "text", False), ("local", cache, root / "text", True),
                    ("s3", url, text_url, False), ("s3", url, text_url, True)]
            for i, (where, images, text, cached) in enumerate(arms):
                options = {"cache": cached, "steps": steps,
                           "storage_options": dict(server.storage_options)}
                runs[where, cached] = training_epochs(images, text, options, server, args,
                                                      root / f"run-{i}")
            rows = []
            for (where, cached), epochs in runs.items():
                for e, epoch in enumerate(epochs, 1):
                    rows.append([where, f"{args.cache_gb:g} GB" if cached else "0", e,
                                 f"{epoch['seconds']:.2f}", f"{epoch['wait']:.2f}",
                                 f"{epoch['mb']:.2f}", epoch["requests"]])
            print(f"\n== real training, {args.train_epochs} epochs of {steps} batches of "
                  f"{args.batch} (D = {args.train_dim}, CPU), image and text stores both local or "
                  f"both on S3; --read-cache-gb as shown")
            print(table(["stores", "--read-cache-gb", "epoch", "seconds", "waiting for data s",
                         "MB sent by the server", "requests"], rows))
            later = lambda key, cached: Stat([e["seconds"] for e in runs[key, cached][1:]])  # noqa: E731
            if args.train_epochs > 1:
                print(f"later epochs, seconds: S3 ÷ local, no chunk cache "
                      f"{later('s3', False).median / later('local', False).median:.2f}; with it "
                      f"{later('s3', True).median / later('local', True).median:.2f}; S3 without "
                      f"÷ with the chunk cache "
                      f"{later('s3', False).median / later('s3', True).median:.2f}")
    finally:
        server.stop()
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
