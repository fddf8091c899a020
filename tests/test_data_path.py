"""The extraction data path: per-level codecs, compute dtype, the torchvision decoder, the
stand-in backbone across spawned workers, ``cache plan``'s estimate, and the GPU check's
CPU smoke run (so that it never rots)."""
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_image, write_jsonl, write_truncated_jpeg

from multigrounding.cache.image_store import OK, ImageFeatureStore
from multigrounding.cli import main
from multigrounding.datasets.synth import generate_synth
from multigrounding.pipeline.backbones import get_backbone_spec, list_backbones
from multigrounding.pipeline.data_path import FIGURES, choose_codecs, raw_bytes
from multigrounding.pipeline.image_task import ImageExtraction

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BACKBONE = ["--backbone", "efficientnet_lite0", "--weights", "random", "--seed", "3"]


def extract(manifest, cache, *extra):
    args = ["extract", "images", str(manifest), "--cache", str(cache), *BACKBONE,
            "--scheduler", "synchronous", "--shard-size", "4", "--batch-size", "2", *extra]
    return CliRunner().invoke(main, args)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "zarr.json"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synth(root, 6, seed=2, size=64)
    return root / "manifest.jsonl"


def test_auto_codecs_follow_the_measured_figures_for_the_reference_machine():
    for name in FIGURES:
        spec = get_backbone_spec(name)
        sizes = raw_bytes(spec.grid, [lv.channels for lv in spec.levels])
        auto = ImageExtraction(manifest="m", cache="c", backbone=name).level_codecs(len(spec.levels))
        assert auto == list(choose_codecs(name, len(spec.levels), grid_bytes=sizes))
    # one core and a disk that never waits: compressing vgg16's levels (1 ms each) cannot pay
    vgg = get_backbone_spec("vgg16")
    assert choose_codecs("vgg16", 4, cores=1, disk=1e12,
                         grid_bytes=raw_bytes(vgg.grid, [lv.channels for lv in vgg.levels])) == ("none",) * 4
    # the 1.08x levels of efficientnet_lite0 are not worth zstd on a 3 GB/s disk, its head is
    spec = get_backbone_spec("efficientnet_lite0")
    fast = choose_codecs("efficientnet_lite0", 4, 16, 3e9, raw_bytes(18, [lv.channels for lv in spec.levels]))
    assert fast == ("none", "none", "none", "zstd1")
    assert ImageExtraction(manifest="m", cache="c", backbone="unlisted", codecs="auto").level_codecs(3) \
        == ["zstd1"] * 3


def test_codecs_per_level_are_stored_checked_and_part_of_the_fingerprint(synth, tmp_path):
    result = extract(synth, tmp_path / "a", "--codecs", "none,lz4,zstd1,none")
    assert result.exit_code == 0, result.output
    store = ImageFeatureStore.open(tmp_path / "a")
    assert store.config.codecs == ["none", "lz4", "zstd1", "none"]
    names = [[c["name"] for c in level.metadata.codecs[0].to_dict()["configuration"]["codecs"]]
             for level in store.levels]
    assert names == [["bytes", "crc32c"], ["bytes", "blosc", "crc32c"], ["bytes", "zstd", "crc32c"],
                     ["bytes", "crc32c"]]
    assert CliRunner().invoke(main, ["cache", "verify", str(tmp_path / "a")]).exit_code == 0
    # byte-identical run to run
    assert extract(synth, tmp_path / "b", "--codecs", "none,lz4,zstd1,none").exit_code == 0
    assert snapshot(tmp_path / "a" / "visual") == snapshot(tmp_path / "b" / "visual")
    # the same values whatever the codecs
    assert extract(synth, tmp_path / "c", "--codecs", "zstd1").exit_code == 0
    for x, y in zip(store.levels, ImageFeatureStore.open(tmp_path / "c").levels):
        assert x[:].tobytes() == y[:].tobytes()
    other = extract(synth, tmp_path / "a", "--codecs", "zstd1")
    assert other.exit_code == 1 and "codecs" in other.output and "--overwrite" in other.output
    bad = extract(synth, tmp_path / "d", "--codecs", "none,gzip")
    assert bad.exit_code != 0 and "gzip" in bad.output and "Traceback" not in bad.output
    short = extract(synth, tmp_path / "e", "--codecs", "none,none")
    assert short.exit_code != 0 and "2 codecs for 4 levels" in short.output


def test_a_layout_the_streamed_writer_does_not_take_goes_through_zarr_with_the_same_bytes(
        tmp_path, monkeypatch):
    from multigrounding.cache.shard_file import UnsupportedLayout
    from multigrounding.pipeline import image_task

    generate_synth(tmp_path / "data", 5, seed=4, size=64)
    manifest = tmp_path / "data" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    lines[2] = lines[2].replace(".jpg", "-gone.jpg")               # a failed image: zero rows
    manifest.write_text("\n".join(lines) + "\n")
    assert extract(manifest, tmp_path / "streamed").exit_code == 1

    def refuse(*args, **kwargs):
        raise UnsupportedLayout("as a layout the writer does not handle")

    monkeypatch.setattr(image_task, "ShardFile", refuse)
    assert extract(manifest, tmp_path / "zarr").exit_code == 1
    assert snapshot(tmp_path / "streamed") == snapshot(tmp_path / "zarr")
    assert CliRunner().invoke(main, ["cache", "verify", str(tmp_path / "zarr")]).exit_code == 0


def test_a_flipped_bit_in_an_uncompressed_level_is_still_caught(synth, tmp_path):
    assert extract(synth, tmp_path / "a", "--codecs", "none").exit_code == 0
    shard = tmp_path / "a" / "visual" / "level1" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[300] ^= 0x04
    shard.write_bytes(bytes(data))
    verify = CliRunner().invoke(main, ["cache", "verify", str(tmp_path / "a")])
    assert verify.exit_code == 1 and "visual/level1" in verify.output


def test_bfloat16_features_are_close_to_float32_and_recorded(synth, tmp_path):
    assert extract(synth, tmp_path / "fp32").exit_code == 0
    assert extract(synth, tmp_path / "bf16", "--dtype", "bfloat16").exit_code == 0
    a, b = ImageFeatureStore.open(tmp_path / "fp32"), ImageFeatureStore.open(tmp_path / "bf16")
    assert a.config.compute_dtype == "float32" and b.config.compute_dtype == "bfloat16"
    assert a.header.fingerprint != b.header.fingerprint
    x = np.concatenate([level[:].astype(np.float32).ravel() for level in a.levels])
    y = np.concatenate([level[:].astype(np.float32).ravel() for level in b.levels])
    assert not np.array_equal(x, y) and np.isfinite(y).all()
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < 0.1   # (random weights: some levels ~1e-5)
    again = extract(synth, tmp_path / "fp32", "--dtype", "bfloat16")
    assert again.exit_code == 1 and "compute_dtype: (absent) -> \"bfloat16\"" in again.output


def test_a_float16_forward_that_overflows_fails_its_shard_with_a_message(tmp_path):
    import torch

    from multigrounding.pipeline.backbones import create_backbone

    net = create_backbone("vgg16", "random", seed=0).net
    state = {k: v * (1e3 if k == "features.0.weight" else 1) for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "loud.pt")
    for i in range(2):
        write_image(tmp_path / "images" / f"{i}.jpg", 64, 48, seed=i)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": str(i), "image": f"images/{i}.jpg",
                                                   "captions": ["x"]} for i in range(2)])
    args = ["extract", "images", str(manifest), "--backbone", "vgg16", "--weights",
            str(tmp_path / "loud.pt"), "--scheduler", "synchronous", "--batch-size", "2"]
    result = CliRunner().invoke(main, args + ["--cache", str(tmp_path / "c16"), "--dtype", "float16"])
    assert result.exit_code == 1
    assert "overflowed float16" in result.output and "--dtype bfloat16" in result.output
    assert not ImageFeatureStore.open(tmp_path / "c16").done_shards().any()


def test_the_torchvision_decoder_matches_pillow_and_falls_back_for_other_files(tmp_path):
    images = tmp_path / "images"
    for i in range(3):
        write_image(images / f"p{i}.jpg", 120 + 10 * i, 90, seed=i)
    write_image(images / "q.png", 50, 40, seed=9)
    write_image(images / "gray.jpg", 40, 30, mode="L")
    write_image(images / "cmyk.jpg", 40, 30, mode="CMYK")
    write_truncated_jpeg(images / "cut.jpg")
    names = ["p0.jpg", "q.png", "p1.jpg", "cut.jpg", "missing.jpg", "gray.jpg", "cmyk.jpg", "p2.jpg"]
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": n, "image": f"images/{n}", "captions": ["x"]}
                                                  for n in names])
    pillow = extract(manifest, tmp_path / "pillow", "--batch-size", "4")
    device = extract(manifest, tmp_path / "tv", "--batch-size", "4", "--decoder", "torchvision")
    assert pillow.exit_code == device.exit_code == 1, device.output     # two images fail
    a, b = ImageFeatureStore.open(tmp_path / "pillow"), ImageFeatureStore.open(tmp_path / "tv")
    assert b.config.decoder == "torchvision" and a.header.fingerprint != b.header.fingerprint
    assert {i for _, i, _ in b.failures()} == {"cut.jpg", "missing.jpg"}
    assert (a.status() == b.status()).all() and (a.original_sizes() == b.original_sizes()).all()
    ok = a.status() == OK
    x = np.concatenate([level[:][ok].astype(np.float32).ravel() for level in a.levels])
    y = np.concatenate([level[:][ok].astype(np.float32).ravel() for level in b.levels])
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < 0.05
    # the pixels themselves: the same images, within rounding of the two decoders and resizers
    from multigrounding.datasets.images import load_rgb
    from multigrounding.pipeline.image_task import _Clock, _decode_torchvision

    paths = [str(images / n) for n in names]
    batch = _decode_torchvision(paths, range(len(paths)), 32, _Clock(), "cpu")
    assert batch.ok_rows == [0, 1, 2, 5, 6, 7]
    for row, pixels in zip(batch.ok_rows, batch.pixels.numpy()):
        want = load_rgb(paths[row], 32)[0].astype(int)
        assert np.abs(pixels.astype(int) - want).mean() < 2.0, names[row]
    png = names.index("q.png")                                        # Pillow decoded it either way
    assert all(x[png].tobytes() == y[png].tobytes() for x, y in zip(a.levels, b.levels))


def test_the_stand_in_runs_on_spawned_workers_and_is_not_offered(tmp_path):
    """The benchmarks' zero-cost backbone: the pipeline's model cache builds it in each spawned
    worker (dask's processes scheduler, 1 and 2 workers); no user can pick it."""
    from multigrounding.pipeline.image_task import extract_images

    # spawned workers get this process's sys.path: they import standin as it does
    sys.path.insert(0, str(BENCHMARKS))
    from standin import StandInKey

    assert not any("stand" in name for name in list_backbones())
    spec = get_backbone_spec("vgg16")
    bank = tmp_path / "bank.npz"
    rng = np.random.default_rng(0)
    np.savez(bank, **{f"level{k}": np.maximum(rng.normal(size=(2, spec.grid, spec.grid, lv.channels)), 0)
                      .astype(np.float16) for k, lv in enumerate(spec.levels)})
    for i in range(5):
        write_image(tmp_path / "images" / f"{i}.jpg", 64, 48, seed=i)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": str(i), "image": f"images/{i}.jpg",
                                                   "captions": ["x"]} for i in range(5)])

    class StandIn(ImageExtraction):
        def model_key(self, device, torch_threads):
            return StandInKey("vgg16", str(bank), 2, device, torch_threads)

    try:
        for workers in (1, 2):
            summary = extract_images(StandIn(manifest=manifest, cache=tmp_path / f"c{workers}",
                                             backbone="vgg16", weights="random", shard_size=2,
                                             batch_size=2, device="cpu", scheduler="processes",
                                             workers=workers))
            assert summary.ok and summary.shards_run == 3
            store = ImageFeatureStore.open(tmp_path / f"c{workers}")
            assert store.config.weights["weights"] == "stand-in"
            with np.load(bank) as data:
                assert np.array_equal(store.levels[3][:][4], data["level3"][0])   # row 4: batch row 0
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert "stand" not in CliRunner().invoke(main, ["extract", "images", "--help"]).output.lower()


def test_cache_plan_prints_the_bytes_and_the_time_before_any_work(synth, tmp_path):
    result = CliRunner().invoke(main, ["cache", "plan", str(synth), "--backbone", "vgg16",
                                       "--cache", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "stored with zstd1,zstd1,zstd1,zstd1: about 0.8" in result.output
    assert "measured now on 6 of its images" in result.output and "MB/s (measured now" in result.output
    assert "estimate:" in result.output and "plus the backbone's forward" in result.output
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())   # nothing left behind


def test_unpacked_wheels_are_imported_when_a_module_is_missing(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from gpu_check import use_wheels
    finally:
        sys.path.remove(str(BENCHMARKS))
    folder = tmp_path / "whl"
    folder.mkdir()
    with zipfile.ZipFile(folder / "mg_wheel_probe-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("mg_wheel_probe/__init__.py", "VALUE = 42\n")
    try:
        assert use_wheels(folder, ("mg_wheel_probe",)) == ["mg_wheel_probe-1.0-py3-none-any.whl"]
        import mg_wheel_probe

        assert mg_wheel_probe.VALUE == 42 and str(folder) in mg_wheel_probe.__file__
    finally:
        sys.modules.pop("mg_wheel_probe", None)
        sys.path[:] = [p for p in sys.path if str(folder) not in p]


def test_gpu_check_smoke_runs_every_code_path_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = [row["check"] for row in report["rows"]]
    assert report["smoke"] and report["device"] == "cpu"
    for expected in ("extraction vgg16", "extraction pnasnet5large", "extraction efficientnet_lite0",
                     "decoder torchvision", "features vgg16: bfloat16", "features pnasnet5large: float16",
                     "cache / in-memory", "recomputing VGG16", "loss after", "phrases/s"):
        assert any(expected in check for check in checks), expected
    assert all(np.isfinite(row["value"]) for row in report["rows"])


def test_stores_made_before_the_codec_keys_resume_and_new_default_stores_match_them(synth, tmp_path):
    """A header records codecs, compute dtype and decoder only where they differ from what every
    store meant before those keys (zstd 1, float32, Pillow): an upgrade must not refuse a user's
    existing caches as "made with other settings", and a new default store is byte-identical."""
    first = extract(synth, tmp_path / "a")
    assert first.exit_code == 0, first.output
    header = json.loads((tmp_path / "a" / "zarr.json").read_text())["attributes"]["multigrounding"]
    assert not {"codecs", "compute_dtype", "decoder"} & set(header["config"])
    store = ImageFeatureStore.open(tmp_path / "a")
    assert (store.config.compute_dtype, store.config.decoder) == ("float32", "pillow")
    explicit = extract(synth, tmp_path / "a", "--codecs", "zstd1", "--dtype", "float32",
                       "--decoder", "pillow")
    assert explicit.exit_code == 0 and "were done before" in explicit.output, explicit.output
    other = extract(synth, tmp_path / "a", "--codecs", "none")
    assert other.exit_code == 1 and "codecs: (absent)" in other.output
