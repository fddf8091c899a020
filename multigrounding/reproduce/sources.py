"""Where each dataset lives under a reproduction's DATA_ROOT, in its native form as distributed,
and where the dataset's own instructions say to get each part.

One folder per dataset, laid out the way its archives unpack, so that a user downloads, unzips
and points ``--data`` at the parent folder:

```
DATA_ROOT/
  coco/
    annotations/captions_train2014.json      annotations_trainval2014.zip
    train2014/                               train2014.zip (COCO_train2014_*.jpg)
  flickr30k/
    Annotations/  Sentences/                 annotations.zip of Flickr30k Entities
    train.txt  val.txt  test.txt             the same repository's split files
    flickr30k-images/                        the Flickr30k images (<id>.jpg)
  visual_genome/
    region_descriptions.json  image_data.json
    VG_100K/  VG_100K_2/                     images.zip, images2.zip
    data_splits.pickle                       the reference split ({'train', 'test'})
  referit/
    refclef/refs(berkeley).p  refclef/instances.json   refclef.zip
    saiapr_tc-12/                            saiapr_tc-12.zip (<n>/images/<id>.jpg)
    imlists/referit_{train,val,test}_imlist.txt          Hu et al.'s image lists
  elmo/
    elmo_2x4096_512_2048cnn_2xhighway_options.json
    elmo_2x4096_512_2048cnn_2xhighway_weights.hdf5
```

Each ``DatasetSource`` names the files one split needs (``needed``), the arguments of
``datasets convert`` that read them (``convert_call``) and the files that define the split
(``split_files``), which results.json records with their sha256.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from multigrounding.errors import UnknownNameError

COCO_PAGE = "https://cocodataset.org/#download"
FLICKR30K_ENTITIES_PAGE = "https://github.com/BryanPlummer/flickr30k_entities"
FLICKR30K_PAGE = "https://shannon.cs.illinois.edu/DenotationGraph/"
VG_PAGE = "https://visualgenome.org/api/v0/api_home.html"
VG_SPLIT_PAGE = ("https://github.com/hassanhub/MultiGrounding (data/visual_genome/VG_Splits/"
                 "data_splits.pickle)")
REFER_PAGE = "https://github.com/lichengunc/refer"
HU_PAGE = "https://github.com/ronghanghu/natural-language-object-retrieval (data/split/)"
ELMO_PAGE = ("https://allennlp.org/elmo (the Original model, elmo_2x4096_512_2048cnn_2xhighway, "
             "trained on the 1 Billion Word Benchmark)")


@dataclass(frozen=True)
class NeededFile:
    """One file or folder a split needs: its path under DATA_ROOT, what it is, and where the
    dataset's own instructions say to get it."""

    path: str
    what: str
    get: str
    folder: bool = False

    def present(self, root: Path) -> bool:
        target = root / self.path
        return target.is_dir() if self.folder else target.is_file()


@dataclass(frozen=True)
class DatasetSource:
    """A dataset as it is distributed: its folder, splits, files, and how ``convert`` reads it."""

    name: str
    title: str
    format: str                       # the ``datasets convert`` format
    folder: str
    splits: tuple[str, ...] | None    # None: any name (COCO: the file is the split)
    boxes: bool                       # has boxed phrases: can be a test or validation set
    _needed: Callable[[str], list[NeededFile]]
    _convert: Callable[[str], tuple[list[str], str | None]]
    _split_files: Callable[[str], list[str]]

    def check_split(self, split: str) -> str | None:
        """Why ``split`` is not a split of this dataset, or None."""
        if self.splits is not None and split not in self.splits:
            return f"{self.name} has the splits {', '.join(self.splits)}, not {split!r}"
        if self.splits is None and not split.replace("_", "").isalnum():
            return f"{split!r} is not a COCO split name (train2014, val2014)"
        return None

    def needed(self, split: str) -> list[NeededFile]:
        return self._needed(split)

    def convert_call(self, root: Path, split: str) -> tuple[list[Path], str | None]:
        """The sources and ``--split`` of ``datasets convert FORMAT`` for this split."""
        sources, split_arg = self._convert(split)
        return [root / s for s in sources], split_arg

    def split_files(self, root: Path, split: str) -> list[Path]:
        """The files that say which images are in the split."""
        return [root / s for s in self._split_files(split)]


def _coco_needed(split: str) -> list[NeededFile]:
    return [NeededFile(f"coco/annotations/captions_{split}.json", f"COCO captions, {split}",
                       f"annotations_trainval2014.zip from {COCO_PAGE} (2014 Train/Val annotations)"),
            NeededFile(f"coco/{split}", f"COCO {split} images",
                       f"{split}.zip from {COCO_PAGE} (2014 images)", folder=True)]


def _flickr_needed(split: str) -> list[NeededFile]:
    return [NeededFile("flickr30k/Annotations", "Flickr30k Entities boxes (one XML per image)",
                       f"annotations.zip from {FLICKR30K_ENTITIES_PAGE}", folder=True),
            NeededFile("flickr30k/Sentences", "Flickr30k Entities sentences with phrase markup",
                       f"annotations.zip from {FLICKR30K_ENTITIES_PAGE}", folder=True),
            NeededFile(f"flickr30k/{split}.txt", f"Flickr30k Entities {split} split (image ids)",
                       f"{split}.txt from {FLICKR30K_ENTITIES_PAGE}"),
            NeededFile("flickr30k/flickr30k-images", "Flickr30k images",
                       f"flickr30k-images, by the request form on {FLICKR30K_PAGE}", folder=True)]


def _vg_needed(split: str) -> list[NeededFile]:
    return [NeededFile("visual_genome/region_descriptions.json", "Visual Genome region descriptions",
                       f"region_descriptions.json.zip (v1.2) from {VG_PAGE}"),
            NeededFile("visual_genome/image_data.json", "Visual Genome image sizes and URLs",
                       f"image_data.json.zip (v1.2) from {VG_PAGE}"),
            NeededFile("visual_genome/VG_100K", "Visual Genome images, part 1",
                       f"images.zip from {VG_PAGE}", folder=True),
            NeededFile("visual_genome/VG_100K_2", "Visual Genome images, part 2",
                       f"images2.zip from {VG_PAGE}", folder=True),
            NeededFile("visual_genome/data_splits.pickle",
                       "the reference train/test split (test = the VG images of COCO val)",
                       VG_SPLIT_PAGE)]


def _referit_needed(split: str) -> list[NeededFile]:
    return [NeededFile("referit/refclef/refs(berkeley).p", "ReferIt (refclef) referring expressions",
                       f"refclef.zip from {REFER_PAGE}"),
            NeededFile("referit/refclef/instances.json", "ReferIt (refclef) boxes and image sizes",
                       f"refclef.zip from {REFER_PAGE}"),
            NeededFile("referit/saiapr_tc-12", "ReferIt images (the IAPR TC-12 subset)",
                       f"saiapr_tc-12.zip from {REFER_PAGE}", folder=True),
            NeededFile(f"referit/imlists/referit_{split}_imlist.txt",
                       f"Hu et al.'s ReferIt {split} image list", f"referit_{split}_imlist.txt from {HU_PAGE}")]


SOURCES: dict[str, DatasetSource] = {s.name: s for s in [
    DatasetSource(
        "coco", "MS COCO 2014 captions", "coco", "coco", None, False, _coco_needed,
        lambda split: ([f"coco/annotations/captions_{split}.json", f"coco/{split}"], None),
        lambda split: [f"coco/annotations/captions_{split}.json"]),
    DatasetSource(
        "flickr30k", "Flickr30k Entities", "flickr30k", "flickr30k", ("train", "val", "test"), True,
        _flickr_needed, lambda split: (["flickr30k", "flickr30k/flickr30k-images"], split),
        lambda split: [f"flickr30k/{split}.txt"]),
    DatasetSource(
        "vg", "Visual Genome (region descriptions)", "vg", "visual_genome", ("train", "test"), True,
        _vg_needed,
        lambda split: (["visual_genome/region_descriptions.json", "visual_genome/image_data.json",
                        "visual_genome", "visual_genome/data_splits.pickle"], split),
        lambda split: ["visual_genome/data_splits.pickle"]),
    DatasetSource(
        "referit", "ReferIt (refclef)", "referit", "referit", ("train", "val", "test", "trainval"),
        True, _referit_needed,
        lambda split: (["referit/refclef/refs(berkeley).p", "referit/refclef/instances.json",
                        "referit/saiapr_tc-12", "referit/imlists"], split),
        lambda split: [f"referit/imlists/referit_{split}_imlist.txt"]),
]}


def get_source(name: str) -> DatasetSource:
    """The dataset called ``name``; an unknown name lists the valid ones and the closest."""
    if name not in SOURCES:
        raise UnknownNameError("dataset", name, SOURCES)
    return SOURCES[name]
