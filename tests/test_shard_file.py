"""The streamed shard writer stores exactly the bytes zarr-python writes, for every level codec."""
import numpy as np
import pytest
import tensorstore as ts
import zarr
from zarr.codecs import ZstdCodec

from multigrounding.cache.image_store import LEVEL_CODECS, level_compressors
from multigrounding.cache.shard_file import ShardFile, UnsupportedLayout

SHAPE = (11, 3, 3, 40)     # the last of three shards of 4 rows is partial
SHARD = 4


def features(seed: int) -> np.ndarray:
    """ReLU-like float16 values (zeros, repeats: every codec has something to find), one row
    all zeros as a failed image has."""
    rng = np.random.default_rng(seed)
    values = np.maximum(rng.normal(size=SHAPE), 0).astype(np.float16)
    values[5] = 0
    return values


def make(root, name: str, compressors) -> zarr.Array:
    """An array as the extraction opens its levels: every chunk stored, zeros too."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(root if isinstance(root, zarr.storage.MemoryStore) else str(root),
                                mode="a")
        return group.create_array(name, shape=SHAPE, dtype="float16", chunks=(1,) + SHAPE[1:],
                                  shards=(SHARD,) + SHAPE[1:], compressors=compressors, fill_value=0)


def stream(array: zarr.Array, values: np.ndarray) -> None:
    for shard in range(-(-SHAPE[0] // SHARD)):
        out = ShardFile(array, shard)
        for row in range(shard * SHARD, min((shard + 1) * SHARD, SHAPE[0])):
            out.append(out.encode(values[row]))
        out.finish()


@pytest.mark.parametrize("codec", list(LEVEL_CODECS) + ["zstd3-no-crc32c"])
def test_streamed_shards_are_the_bytes_zarr_writes(tmp_path, codec):
    compressors = (ZstdCodec(level=3),) if codec == "zstd3-no-crc32c" else level_compressors(codec)
    values = features(1)
    by_zarr, streamed = make(tmp_path, "zarr", compressors), make(tmp_path, "ours", compressors)
    by_zarr[:] = values
    stream(streamed, values)
    for shard in range(3):
        key = "c/%d/0/0/0" % shard
        assert (tmp_path / "ours" / key).read_bytes() == (tmp_path / "zarr" / key).read_bytes()
    assert not list(tmp_path.rglob("*.partial"))
    view = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "ours")}},
                   read=True).result()
    assert view.read().result().tobytes() == values.tobytes()


def test_a_store_that_is_not_a_folder_gets_the_same_bytes_in_one_request():
    values = features(2)
    stores = zarr.storage.MemoryStore(), zarr.storage.MemoryStore()
    arrays = [make(store, "x", level_compressors("zstd1")) for store in stores]
    arrays[0][:] = values
    stream(arrays[1], values)
    assert stores[0]._store_dict.keys() == stores[1]._store_dict.keys()
    for key, buffer in stores[0]._store_dict.items():
        assert stores[1]._store_dict[key].to_bytes() == buffer.to_bytes(), key
    np.testing.assert_array_equal(arrays[1][:], values)


def test_a_discarded_shard_leaves_nothing_and_a_short_one_is_refused(tmp_path):
    array = make(tmp_path, "x", level_compressors("none"))
    out = ShardFile(array, 0)
    out.append(out.encode(features(3)[0]))
    assert list(tmp_path.rglob("*.partial"))
    with pytest.raises(ValueError, match="1 of 4 rows"):
        out.finish()
    out.discard()
    assert [p.name for p in (tmp_path / "x").rglob("*") if p.is_file()] == ["zarr.json"]


def test_zeros_are_stored_chunks_as_the_strict_readers_need(tmp_path):
    """A failed image's zeros are stored like any values: a chunk missing from a shard reads as
    lost data on the strict (tensorstore) paths."""
    array = make(tmp_path, "x", level_compressors("zstd1"))
    out = ShardFile(array, 2)
    for _ in range(3):
        out.append(out.encode(np.zeros(SHAPE[1:], np.float16)))
    out.finish()
    view = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "x")},
                    "fill_missing_data_reads": False}, read=True).result()
    assert not view[8:].read().result().any()


def test_layouts_it_cannot_write_are_named(tmp_path):
    group = zarr.open_group(str(tmp_path), mode="a")
    whole = group.create_array("whole", shape=(8, 4), dtype="float16", chunks=(8, 4))
    rows_of_two = group.create_array("two", shape=(8, 4), dtype="float16", chunks=(2, 4), shards=(4, 4))
    for array in (whole, rows_of_two):
        assert not ShardFile.supports(array)
        with pytest.raises(UnsupportedLayout):
            ShardFile(array, 0)
