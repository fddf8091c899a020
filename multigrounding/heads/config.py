"""What a training run depends on: one flat, typed config, the single source of its defaults.

Every field declares its command-line help, range or choices in its metadata (``setting``), so
the ``train`` command's options are generated from this class and a new field appears on the
command line without a second edit. ``from_dict`` type-checks a JSON config field by field (an
``"epochs": 1.5`` or a negative ``lr`` is an error naming the key, never a silent cast), and
``merged`` lays command-line options over a ``--config`` file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multigrounding.settings import ConfigError, from_mapping, read_json_object, setting

LOSSES = ("multigrounding", "npair", "triplet-hard")
HEATMAPS = ("relu", "softmax")
LOSS_TERMS = ("both", "word", "sentence")
PATH_FIELDS = ("images", "text", "val_images", "val_text", "val_manifest")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json in the run directory."""

    images: str = setting(None, "Visual feature store of the training set (a folder or a URL, "
                                "s3://bucket/prefix).", kind="path", path="store", required=True)
    text: str = setting(None, "Text feature store of the same manifest.", kind="path",
                        path="store", required=True)
    out: str = setting(None, "The run directory to write.", kind="path", path="dir", required=True)
    val_images: str | None = setting(None, "Visual feature store of the validation set.",
                                     kind="path", path="store")
    val_text: str | None = setting(None, "Text feature store of the validation set.",
                                   kind="path", path="store")
    val_manifest: str | None = setting(
        None, "With --val-images/--val-text: pointing accuracy each epoch, best.pt kept.",
        kind="path", path="file")
    epochs: int = setting(20, "Epochs to train.", kind="int", minimum=1)
    batch_size: int = setting(32, "Image-caption pairs per batch (B; the global batch, split "
                                  "among the processes of a torchrun run).", kind="int", minimum=2)
    lr: float = setting(1e-3, "Adam's learning rate.", kind="float", above=0)
    lr_milestones: list[int] | None = setting(
        None, "Comma-separated epochs (1-based) at whose start lr is multiplied by --lr-factor "
              "[default: 10,15 of 20, scaled to --epochs].", kind="ints", minimum=1)
    lr_factor: float = setting(0.5, "What lr is multiplied by at each milestone.", kind="float",
                               above=0)
    dim: int = setting(1024, "The common space D.", kind="int", minimum=1)
    visual_widths: list[int] | None = setting(
        None, "Widths of each level's 1x1 convs, the last equal to --dim [default: D, D, D].",
        kind="ints", minimum=1)
    levels: list[int] | None = setting(
        None, "Comma-separated cached levels to use (e.g. 3: one fixed level) [default: all].",
        kind="ints", minimum=0)
    linear_visual: bool = setting(False, "Ablation: linear visual mapping.", kind="bool")
    linear_text: bool = setting(False, "Ablation: linear text mappings.", kind="bool")
    heatmap: str = setting("relu", "How relevance becomes a heatmap.", kind="str", choices=HEATMAPS)
    loss_terms: str = setting("both", "Which scores are trained: the word-based, the sentence, or "
                                      "both.", kind="str", choices=LOSS_TERMS)
    loss: str = setting("multigrounding", "The paper's two-way softmax per score; the "
                        "bidirectional N-pair loss (Das et al.); or VSE++'s hardest-negative "
                        "triplet loss — the last two on one score.", kind="str", choices=LOSSES)
    margin: float = setting(0.2, "triplet-hard: the margin.", kind="float", above=0)
    triplet_warmup: int = setting(2, "triplet-hard: epochs that sum the hinge over every negative "
                                     "before the hardest only.", kind="int", minimum=0)
    npair_scale: float = setting(10.0, "npair: the scale of the cosine scores.", kind="float", above=0)
    phrase_loss: float = setting(0.0, "Weight of the phrase-level term (SSAMT labels; needs a text "
                                      "cache of a manifest labelled by `datasets phrases`); 0 is "
                                      "off.", kind="float", minimum=0)
    level_selection: str = setting(
        "aux+soft+focus", "How training selects among the levels, and grounding picks one: paper "
                          "(the hard max, the paper's exact loss and choice) or parts of aux (a "
                          "per-level loss), dropout (hide levels at random), soft (softmax over "
                          "levels annealed to the max), calibrate (pin the levels' mean mismatched "
                          "relevance together), guide (train the max to pick the level that best "
                          "retrieves the image), focus (ground each word at the level whose "
                          "heatmap is most focused, not the most relevant) joined by +; the "
                          "default measured best over seeds (README, \"Level selection\").",
        kind="str")
    level_aux_weight: float = setting(1.0, "aux: weight of the per-level loss.", kind="float",
                                      above=0)
    level_dropout: float = setting(0.25, "dropout: chance that a level of a batch image is hidden "
                                         "(below 1).", kind="float", minimum=0)
    level_temperature: float = setting(0.1, "soft: the starting temperature (it falls to 1/20 of "
                                            "it).", kind="float", above=0)
    level_anneal: float = setting(0.5, "soft: the share of training (at most 1) with the soft "
                                       "selection; the hard max after it.", kind="float", above=0)
    level_calibration: float = setting(10.0, "calibrate: weight of the calibration term.",
                                       kind="float", above=0)
    level_guide: float = setting(1.0, "guide: weight of the level-choice guidance term.",
                                 kind="float", above=0)
    gamma1: float = setting(5.0, "Sharpness of the log-sum-exp over words (METHOD.md γ1).",
                            kind="float", above=0)
    gamma2: float = setting(10.0, "Scale of the two-way softmax (METHOD.md γ2).", kind="float",
                            above=0)
    weight_decay: float = setting(5e-4, "Weight of the L2 penalty on the visual kernels.",
                                  kind="float", minimum=0)
    seed: int = setting(0, "Seed of the heads' initialisation and of the batches.", kind="int")
    device: str = setting("auto", "auto (cuda when there is one), cpu, cuda, cuda:1 ...", kind="str")
    prefetch: int = setting(3, "Batches read ahead on a background thread.", kind="int", minimum=1)
    read_cache_gb: float = setting(2.0, "Decoded image and text features kept in memory across "
                                        "epochs (0: none); a training set that fits is "
                                        "decompressed (and, from an object store, fetched) once.",
                                   kind="float", minimum=0)
    log_every: int = setting(10, "Steps between log lines.", kind="int", minimum=1, cli=False)

    def __post_init__(self):
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is not None and item.metadata.get("kind") == "path":
                setattr(self, item.name, str(value))

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> "TrainConfig":
        """A config from JSON-like data, every key known and every value of its field's type."""
        return from_mapping(cls, data, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Read a JSON config file (``--config``, a run's config.json); a clear error for a
        missing file, a BOM, bad JSON or a value of the wrong type."""
        return cls.from_dict(read_json_object(path), str(path))

    @classmethod
    def merged(cls, file: str | Path | None, options: dict[str, Any]) -> "TrainConfig":
        """``options`` (the command line's explicit values) over ``file`` over the defaults."""
        data = read_json_object(file) if file else {}
        data.update(options)
        config = cls.from_dict(data, str(file) if file else "options")
        missing = [f"--{name}" for name in ("images", "text", "out") if not getattr(config, name)]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (or --resume RUN)")
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ derived
    def milestones(self) -> list[int]:
        if self.lr_milestones is not None:
            return list(self.lr_milestones)
        return [max(1, round(self.epochs * 10 / 20)), max(1, round(self.epochs * 15 / 20))]

    def level_selection_recipe(self):
        """The parsed ``level_selection`` and its parameters (heads/level_selection.py); a
        ConfigError for a bad recipe or parameter."""
        from multigrounding.heads.level_selection import LevelSelection, LevelSelectionError

        try:
            return LevelSelection.of(self.level_selection, aux_weight=self.level_aux_weight,
                                     dropout=self.level_dropout, temperature=self.level_temperature,
                                     anneal=self.level_anneal, calibration=self.level_calibration,
                                     guide=self.level_guide)
        except LevelSelectionError as err:
            raise ConfigError(str(err)) from None

    def check(self) -> None:
        """What no single field can say: fields that only make sense together."""
        self.level_selection_recipe()
        for name in ("images", "text", "out"):
            if not getattr(self, name):
                raise ConfigError(f"the config needs {name!r}")
        vals = (self.val_images, self.val_text, self.val_manifest)
        if any(v is None for v in vals) and not all(v is None for v in vals):
            raise ConfigError("validation needs all three of --val-images, --val-text and "
                              "--val-manifest")
        if self.visual_widths is not None and self.visual_widths[-1] != self.dim:
            raise ConfigError(f"visual_widths ends with {self.visual_widths[-1]} but dim is "
                              f"{self.dim}: the last 1x1 conv outputs the common space")


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate of 0-based ``epoch``: multiplied by lr_factor at each milestone epoch."""
    passed = sum(1 for milestone in config.milestones() if epoch + 1 >= milestone)
    return config.lr * config.lr_factor ** passed
