"""The dataset formats ``datasets convert`` reads, by name: their sources and their reader.

Each reader is ``read(*sources, split=None, problems=ProblemLog) -> Iterator[Record]``; this table
is what the CLI's choices and help text come from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from multigrounding.datasets.coco import read_coco
from multigrounding.datasets.flickr30k import read_flickr30k
from multigrounding.datasets.manifest import read_manifest
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import Record
from multigrounding.datasets.referit import read_referit
from multigrounding.datasets.visual_genome import read_visual_genome
from multigrounding.errors import UnknownNameError


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    read: Callable[..., Iterator[Record]]
    sources: tuple[str, ...]
    optional_sources: tuple[str, ...] = ()
    split_help: str | None = None  # None: --split does not apply
    description: str = ""

    @property
    def usage(self) -> str:
        optional = "".join(f" [{name}]" for name in self.optional_sources)
        return f"{self.name} {' '.join(self.sources)}{optional}"

    def check_call(self, sources, split: str | None) -> None:
        """Raise ValueError when the number of sources or the use of --split is wrong."""
        low, high = len(self.sources), len(self.sources) + len(self.optional_sources)
        if not low <= len(sources) <= high:
            raise ValueError(f"{self.name} takes {self.usage.split(' ', 1)[1]}; "
                             f"{len(sources)} source(s) given")
        if split is not None and self.split_help is None:
            raise ValueError(f"--split does not apply to {self.name}: its files are one split already")


def _read_manifest(path, *, split=None, problems: ProblemLog) -> Iterator[Record]:
    return read_manifest(path, problems)


FORMATS: dict[str, DatasetFormat] = {f.name: f for f in [
    DatasetFormat("manifest", _read_manifest, ("MANIFEST",),
                  description="our JSON Lines manifest (re-checks it, rewrites image paths)"),
    DatasetFormat("coco", read_coco, ("CAPTIONS_JSON", "IMAGE_DIR"),
                  description="COCO captions_{train,val}2014.json and its image folder"),
    DatasetFormat("flickr30k", read_flickr30k, ("ENTITIES_DIR", "IMAGE_DIR"),
                  split_help="reads ENTITIES_DIR/SPLIT.txt (train, val, test)",
                  description="Flickr30k Entities: Sentences/, Annotations/, split files"),
    DatasetFormat("vg", read_visual_genome, ("REGIONS_JSON", "IMAGE_DATA_JSON", "IMAGE_DIR"),
                  ("SPLIT_PICKLE",),
                  split_help="a key of SPLIT_PICKLE ({'train': ids, 'test': ids})",
                  description="Visual Genome region_descriptions.json + image_data.json"),
    DatasetFormat("referit", read_referit, ("REFS_PICKLE", "INSTANCES_JSON", "IMAGE_DIR"),
                  ("SPLIT_DIR",),
                  split_help="reads SPLIT_DIR/referit_SPLIT_imlist.txt, else each ref's split",
                  description="ReferIt (refclef) refs(berkeley|unc).p + instances.json"),
]}


def get_format(name: str) -> DatasetFormat:
    """The format called ``name``; an unknown name lists the valid ones and the closest."""
    if name not in FORMATS:
        raise UnknownNameError("dataset format", name, FORMATS)
    return FORMATS[name]
