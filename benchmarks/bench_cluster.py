"""Extraction on a dask cluster: 2 worker processes against 1 on this machine, writing to a local
store and to an object store (S3), beside the same extraction with no cluster at all.

The cluster is what a user starts (``dask scheduler``, ``dask worker --nthreads 1``, from dask's
own command line; ``tests/dask_cluster.py``), the extraction what ``multigrounding extract images
--scheduler tcp://...`` runs (``extract_images`` called in this process, the client). Three
clusters run side by side: 1 worker with torch on every core, 2 workers with torch on half the
cores each (the machine's cores used alike: what differs is the cluster's overhead and how 2
processes share the work), and 1 worker on one core (what a second process adds). Torch threads
are set with ``OMP_NUM_THREADS``, which the workers honour. The object store is moto's S3 server
in a child process (``tests/s3_server.py``).

Arms, each a full extraction of the same manifest into a fresh store (efficientnet_lite0,
``--weights random``, synthetic images), rotated round by round:

* ``none, local``        — ``--scheduler synchronous``: no cluster, torch on every core;
* ``1 worker, local``    — the store in a local folder (a shared disk);
* ``1 worker x1, local`` — the same, torch on one core;
* ``2 workers, local``   — 2 workers, torch on cores/2 each;
* ``1 worker, s3`` / ``2 workers, s3`` — the store on S3, the images on the local disk;
* ``2 workers, s3+urls`` — images read from the bucket too (the manifest names them by URL):
  workers that share no disk with anyone.

Judged ratios (per round, median [min..max]): throughput of 2 workers ÷ 1 worker for each
target; the S3 store's time ÷ the local store's for each cluster size; the 1-worker cluster ÷
no cluster. Beside them the time the workers report for read, compute and write, and the
requests the S3 server answered per store.

    python benchmarks/bench_cluster.py                  # ~5-10 minutes on 2 loaded cores
    python benchmarks/bench_cluster.py --images 128 --rounds 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import Stat, cores, machine_line, table  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep the data, stores and logs here")
    return p.parse_args(argv)


def start_cluster(folder: Path, workers: int, threads_each: int):
    from dask_cluster import Cluster

    folder.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(folder).start()
    for i in range(workers):
        cluster.add_worker(f"w{i}", env={"OMP_NUM_THREADS": str(threads_each)})
    cluster.wait_for_workers(workers)
    return cluster


def main(argv=None) -> int:
    args = parse_args(argv)
    from s3_server import S3ServerProcess

    from multigrounding.datasets.synth import generate_synth
    from multigrounding.pipeline.image_task import ImageExtraction, extract_images

    print("bench_cluster:", machine_line())
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    for name in list(os.environ):
        if name.startswith("AWS_") or name == "OMP_NUM_THREADS":
            del os.environ[name]
    n_cores = cores()
    server = S3ServerProcess().start()
    clusters = {}
    try:
        generate_synth(root / "data", args.images, seed=args.seed, size=args.image_size)
        manifest = root / "data" / "manifest.jsonl"
        bucket = server.new_bucket("bench")
        client = server.client()
        urls = []
        for line in manifest.read_text().splitlines():
            record = json.loads(line)
            name = Path(record["image"]).name
            client.put_object(Bucket=bucket, Key=f"images/{name}",
                              Body=(root / "data" / "images" / name).read_bytes())
            record["image"] = f"s3://{bucket}/images/{name}"
            urls.append(json.dumps(record))
        url_manifest = root / "data" / "urls.jsonl"
        url_manifest.write_text("\n".join(urls) + "\n")
        options = json.dumps(server.storage_options)

        half = max(1, n_cores // 2)
        for workers, threads in ((1, n_cores), (1, 1), (2, half)):
            clusters[workers, threads] = start_cluster(root / f"cluster-{workers}x{threads}",
                                                       workers, threads)
        arms = {"none, local": (None, "local", manifest),
                "1 worker, local": ((1, n_cores), "local", manifest),
                "1 worker x1, local": ((1, 1), "local", manifest),
                "2 workers, local": ((2, half), "local", manifest),
                "1 worker, s3": ((1, n_cores), "s3", manifest),
                "2 workers, s3": ((2, half), "s3", manifest),
                "2 workers, s3+urls": ((2, half), "s3", url_manifest)}
        seconds = {arm: [] for arm in arms}
        stages = {arm: [] for arm in arms}
        requests = {arm: [] for arm in arms}
        counter = 0

        def run(arm: str) -> None:
            nonlocal counter
            workers, target, which = arms[arm]
            counter += 1
            cache = (str(root / "stores" / f"{counter}") if target == "local"
                     else f"s3://{bucket}/stores/{counter}")
            scheduler = "synchronous" if workers is None else clusters[workers].address
            job = ImageExtraction(manifest=which, cache=cache, weights="random", seed=3,
                                  shard_size=args.shard_size, batch_size=args.batch_size,
                                  scheduler=scheduler, device="cpu", storage_options=options)
            before = server.traffic()
            summary = extract_images(job)
            if not summary.ok or summary.shards_done != summary.shards:
                raise RuntimeError(f"{arm}: the extraction failed: {summary}")
            seconds[arm].append(summary.seconds)
            stages[arm].append((summary.read_seconds, summary.compute_seconds, summary.write_seconds))
            requests[arm].append((server.traffic() - before).requests)
            if target == "local":
                shutil.rmtree(cache)

        for arm in arms:                  # warm up: every worker loads its model once
            run(arm)
        for arm in arms:
            seconds[arm].clear(), stages[arm].clear(), requests[arm].clear()
        names = list(arms)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for arm in order:
                run(arm)

        def ratio(a: str, b: str) -> Stat:   # a's time over b's: > 1 means a is slower
            return Stat([x / y for x, y in zip(seconds[a], seconds[b])])

        def speedup(a: str, b: str) -> Stat:  # b's time over a's: a's throughput ÷ b's
            return Stat([y / x for x, y in zip(seconds[a], seconds[b])])

        print(f"\n== extracting {args.images} images of {args.image_size} px (shards of "
              f"{args.shard_size}, batches of {args.batch_size}), {args.rounds} rotated rounds "
              f"after a warm-up; {n_cores} cores; 1 worker with {n_cores} torch threads (x1: "
              f"one), 2 workers with {half} each")
        rows = []
        for arm in names:
            read, compute, write = (Stat([s[i] for s in stages[arm]]).fmt(".1f") for i in range(3))
            rows.append([arm, Stat(seconds[arm]).fmt(".1f"),
                         Stat([args.images / s for s in seconds[arm]]).fmt(".1f"),
                         read, compute, write, Stat(requests[arm]).fmt(".0f")])
        print(table(["arm", "seconds", "images/s", "read s (workers)", "compute s", "write s",
                     "S3 requests"], rows))
        print("\n== ratios (per round, median [min..max])")
        print(table(["what", "ratio"], [
            ["throughput, 2 workers ÷ 1 worker, local store",
             speedup("2 workers, local", "1 worker, local").fmt(".2f")],
            ["throughput, 2 workers ÷ 1 worker on one core, local store",
             speedup("2 workers, local", "1 worker x1, local").fmt(".2f")],
            ["throughput, 2 workers ÷ 1 worker, S3 store",
             speedup("2 workers, s3", "1 worker, s3").fmt(".2f")],
            ["time, S3 store ÷ local store, 1 worker", ratio("1 worker, s3", "1 worker, local").fmt(".2f")],
            ["time, S3 store ÷ local store, 2 workers", ratio("2 workers, s3", "2 workers, local").fmt(".2f")],
            ["time, images from S3 too ÷ from the local disk, 2 workers, S3 store",
             ratio("2 workers, s3+urls", "2 workers, s3").fmt(".2f")],
            ["time, 1-worker cluster ÷ no cluster (synchronous), local store",
             ratio("1 worker, local", "none, local").fmt(".2f")],
        ]))
    finally:
        for cluster in clusters.values():
            cluster.stop()
        server.stop()
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
