"""The stores' bytes are pinned: an image store and a text store written from fixed data equal,
file for file, the digests recorded here. A change to the layout, the codecs, the metadata or the
order of keys in a header fails this test, so a format change is always a decision (bump the
store format, say why, record the new digests with ``python tests/test_store_format.py``).

Recorded with store format 2 (crc32c per chunk). The restructure before it (one driver, typed
configs) was checked the same way against the stores of the version before it: identical.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import zarr

from multigrounding.cache.image_store import ImageFeatureStore, ImageLayout, ImageStoreConfig
from multigrounding.cache.text_store import TextFeatureStore, TextLayout, TextStoreConfig

DIGESTS = Path(__file__).with_name("store_format_digests.json")


def write_stores(root: Path) -> None:
    rng = np.random.default_rng(7)
    ids = [f"img{i}" for i in range(5)]
    levels = [{"name": "a", "module": "m.a", "channels": 3, "stride": 8},
              {"name": "b", "module": "m.b", "channels": 2, "stride": 16}]
    config = ImageStoreConfig.from_json({
        "manifest_path": "/x/manifest.jsonl", "manifest": {"sha256": "ab" * 32, "images": 5},
        "backbone": "tiny", "weights": {"weights": "random", "record": None, "source": "random init",
                                        "sha256": None, "seed": 0, "normalisation": {}},
        "levels": levels, "grid": 2, "input_size": 8, "resize": "bilinear", "dtype": "float16",
        "shard_size": 2, "versions": {"multigrounding": "test"}})
    store, _ = ImageFeatureStore.create_or_resume(root / "images", config, ImageLayout(ids, []))
    features = [rng.standard_normal((5, 2, 2, lv["channels"])).astype(np.float16) for lv in levels]
    with zarr.config.set({"array.write_empty_chunks": True}):       # as the extraction writes
        for shard in range(store.num_shards):
            rows = store.shard_slice(shard)
            n = rows.stop - rows.start
            store.write_shard(shard, [f[rows] for f in features], np.ones(n, np.uint8), [""] * n,
                              np.full((n, 2), 8, np.int32))
    words = [["a", "red", "cat"], ["two", "dogs"], ["a", "bird"]]
    text_config = TextStoreConfig.from_json({
        "manifest_path": "/x/manifest.jsonl", "manifest": {"sha256": "ab" * 32, "images": 2,
                                                           "sequences": 3},
        "encoder": {"name": "tiny"}, "encoder_files": {"elmo_options": None, "elmo_weights": None},
        "num_layers": 2, "dim": 4, "num_sentence_vectors": 1, "words": "caption split on whitespace",
        "max_words": 64, "dtype": "float16", "shard_size": 2, "token_shard": 4,
        "versions": {"multigrounding": "test"}})
    layout = TextLayout(["img0", "img1"], words, np.array([0, 0, 1], np.int32),
                        np.array([1, 1, 1], np.uint8),
                        {k: np.array([0], np.int64) for k in ("record", "index", "caption", "start",
                                                              "length", "alone")}, 2, 4)
    text, _ = TextFeatureStore.create_or_resume(root / "text", text_config, layout)
    with zarr.config.set({"array.write_empty_chunks": True}):
        for shard in range(text.num_shards):
            sequences = words[text.shard_slice(shard)]
            flat = [w for sequence in sequences for w in sequence]
            text.write_shard(shard, rng.standard_normal((len(flat), 2, 4)).astype(np.float16), flat,
                             rng.standard_normal((len(sequences), 1, 4)).astype(np.float16))


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file; the root headers without their creation time."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock"):
        data = path.read_bytes()
        if path.name == "zarr.json" and path.parent.parent == root:
            header = json.loads(data)
            header["attributes"]["multigrounding"]["created"] = None
            data = json.dumps(header).encode()
        out[path.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


def test_stores_are_byte_identical_to_the_recorded_format(tmp_path):
    write_stores(tmp_path)
    recorded = json.loads(DIGESTS.read_text())
    found = digests(tmp_path)
    assert sorted(found) == sorted(recorded), "files added or gone"
    changed = [name for name in found if found[name] != recorded[name]]
    assert not changed, f"bytes changed: {changed}"


def test_the_same_data_written_twice_gives_the_same_bytes(tmp_path):
    write_stores(tmp_path / "a")
    write_stores(tmp_path / "b")
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


if __name__ == "__main__":      # record the digests (a deliberate format change only)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_stores(Path(folder))
        DIGESTS.write_text(json.dumps(digests(Path(folder)), indent=1, sort_keys=True) + "\n")
    print(f"recorded {DIGESTS}", file=sys.stderr)
