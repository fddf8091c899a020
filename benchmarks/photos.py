"""Photo-sized JPEG files for benchmarks: the one real photo in shared/data, re-encoded many ways.

The 256 px synthetic images decode far faster than real photos and hide the data path's cost.
These are COCO val2017 image 39769 (640×480) resized to the sizes datasets hold (640×480 and
640×427 for COCO, 500×375 and 500×333 for Flickr30k, portrait ones too), each with its own
noise, crop, flip and brightness and one of several JPEG qualities, so no two files are alike.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# where the photo is: shared/ beside the checkout or inside it, or the copy gpu_wheels.sh puts in
# .whl/ (which travels to a GPU machine with the tree)
PLACES = (REPO.parent / "shared" / "data" / "coco-39769" / "000000039769.png",
          REPO / "shared" / "data" / "coco-39769" / "000000039769.png",
          REPO / ".whl" / "000000039769.png")
COCO_IMAGE = next((p for p in PLACES if p.is_file()), PLACES[0])
SIZES = ((640, 480), (500, 375), (640, 427), (480, 640), (500, 333), (375, 500))
QUALITIES = (75, 85, 90, 95)


def photo_jpegs(folder: Path, count: int, seed: int = 0, source: Path = COCO_IMAGE) -> Path:
    """``count`` JPEG files under ``folder/images`` and their manifest (``folder/manifest.jsonl``,
    returned); made once per folder, count and seed."""
    from PIL import Image

    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    stamp = folder / ".made"
    wanted = f"{count} {seed} {source}"
    if manifest.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return manifest
    if not source.is_file():
        raise FileNotFoundError(f"the photo these benchmarks re-encode is missing (looked in "
                                f"{', '.join(str(p) for p in PLACES)})")
    rng = np.random.default_rng(seed)
    base = Image.open(source).convert("RGB")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        quality = QUALITIES[(i // len(SIZES)) % len(QUALITIES)]
        w, h = base.size
        left, top = int(rng.integers(0, w // 8)), int(rng.integers(0, h // 8))
        image = base.crop((left, top, w - int(rng.integers(0, w // 8)), h - int(rng.integers(0, h // 8))))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = pixels * rng.uniform(0.8, 1.2) + rng.normal(0, 4.0, pixels.shape)
        name = f"photo-{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / "images" / name, quality=quality)
        records.append({"id": f"photo-{i:05d}", "image": f"images/{name}", "width": width,
                        "height": height, "captions": ["two cats on a blanket"]})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    stamp.write_text(wanted)
    return manifest
