"""A zero-cost stand-in backbone, for benchmarks only: the data path timed without the model.

``StandInKey(shape_of, bank, ...)`` builds, through the pipeline's own model cache
(``pipeline.models.get_model``), a model that has the real backbone's spec (levels, channels,
grid, input size: ``get_backbone_spec(shape_of)``) and answers every batch at once with float16
features a real forward produced earlier — as a GPU backbone hands them over after its on-device
cast. So an extraction with it times exactly the work around the model: decoding, resizing, the
copies, encoding, writing, scheduling.

Why here and not in the package: it is not a backbone anyone could extract real features with,
so nothing a user reaches may offer it — it is not registered (``list_backbones()`` and the
command line never list it) and no module of the package imports it. It must still be
importable by name in spawned worker processes (dask's ``processes`` scheduler pickles the key
by reference): multiprocessing's spawn hands the parent's ``sys.path`` to each child, so the
benchmark puts this folder on ``sys.path`` once and children import ``standin`` like the parent.

The features ("bank") are made once per backbone by ``make_bank``: the real backbone (its
ImageNet weights where they ship offline, efficientnet_lite0; random weights otherwise) over a
few photos, tiled to ``rows`` rows so that a batch is a view, never a copy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BANK_WEIGHTS = {"efficientnet_lite0": "imagenet", "vgg16": "random", "pnasnet5large": "random"}


@dataclass(frozen=True)
class StandInKey:
    """Picklable, hashable: the pipeline builds one stand-in per process from it."""

    shape_of: str            # the real backbone whose features it hands out
    bank: str                # the .npz file make_bank wrote
    rows: int                # rows of the bank (at least the batch size)
    device: str = "cpu"
    torch_threads: int = 1

    def build(self) -> "StandInBackbone":
        return StandInBackbone(self.shape_of, Path(self.bank), self.rows)


class StandInBackbone:
    """What the image task needs of a backbone: ``spec``, ``weights_info``, ``compute_dtype``
    and a call that maps uint8 images to one float16 ``[B, M, M, C]`` tensor per level."""

    def __init__(self, shape_of: str, bank: Path, rows: int):
        import torch

        from multigrounding.pipeline.backbones import get_backbone_spec

        self.spec = get_backbone_spec(shape_of)
        self.compute_dtype = "float16"
        with np.load(bank) as data:
            real = [data[f"level{k}"] for k in range(len(self.spec.levels))]
        self.weights_info = {"weights": "stand-in", "record": None, "source": str(bank),
                             "sha256": None, "seed": None, "normalisation": None}
        self.levels = [torch.from_numpy(np.ascontiguousarray(np.resize(level, (rows,) + level.shape[1:])))
                       for level in real]
        self.calls = 0

    def __call__(self, images):
        count = len(images)
        self.calls += 1
        if count > len(self.levels[0]):
            raise ValueError(f"stand-in bank holds {len(self.levels[0])} rows, batch has {count}")
        return [level[:count] for level in self.levels]


def make_bank(shape_of: str, photos: list[str], path: Path, threads: int = 2) -> tuple[Path, float]:
    """Features of the real backbone over ``photos``, float16, per level (made once; returns the
    file and the seconds the forward took per image, 0 when it was already there)."""
    import torch

    from multigrounding.datasets.images import load_rgb
    from multigrounding.pipeline.backbones import create_backbone

    path = Path(path)
    if path.is_file():
        return path, 0.0
    torch.set_num_threads(threads)
    model = create_backbone(shape_of, BANK_WEIGHTS[shape_of], seed=0)
    pixels = np.stack([load_rgb(p, model.spec.input_size)[0] for p in photos])
    started = time.perf_counter()
    with torch.inference_mode():
        outputs = model(torch.from_numpy(pixels))
    per_image = (time.perf_counter() - started) / len(photos)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"level{k}": out.to(torch.float16).numpy() for k, out in enumerate(outputs)})
    return path, per_image
