"""A recipe: one row of a table stated completely, in a small TOML file that a user can copy and
edit, typed and checked when it is read.

```toml
title = "ELMo + VGG16, trained on COCO train2014 captions"
notes = "..."
[train]        dataset = "coco", split = "train2014"
[validation]   dataset = "flickr30k", split = "val"       (model selection; optional)
[images]       fields of pipeline.image_task.ImageExtraction   (backbone, weights, ...)
[text]         fields of pipeline.text_task.TextExtraction     (encoder, elmo_options, ...)
[training]     fields of heads.config.TrainConfig              (dim, epochs, lr, ...)
[evaluation]   fields of evaluation.report.Evaluation          (checkpoint, pictures, ...)
[[test]]       dataset, split, and any Evaluation field (mode, protocol) for this test set
[test.published]  pointing (omitted: unknown), center, random, source, note
```

The sections take exactly the fields of the stages' own config dataclasses and are checked by the
same rules (``settings.from_mapping``), less the fields the reproduction sets itself (manifests,
stores, run folders). Relative file paths in ``[images]`` and ``[text]`` (ELMo's files, a weights
file) are relative to DATA_ROOT. Every mistake is a one-line ``RecipeError`` naming the file,
the section and the key.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from multigrounding.errors import MultigroundingError, UnknownNameError
from multigrounding.evaluation.report import Evaluation
from multigrounding.heads.config import TrainConfig
from multigrounding.pipeline.image_task import ImageExtraction
from multigrounding.pipeline.text_task import TextExtraction
from multigrounding.reproduce.sources import SOURCES, get_source
from multigrounding.settings import ConfigError, from_mapping

RECIPES_PACKAGE = "multigrounding.reproduce"
RECIPES_FOLDER = "recipes"

# fields each section may not set: the reproduction decides them
RESERVED = {"images": {"manifest", "cache"},
            "text": {"manifest", "cache", "phrases_alone"},
            "training": {"images", "text", "out", "val_images", "val_text", "val_manifest"},
            "evaluation": {"run", "manifest", "images", "text", "out"}}
TOP_KEYS = ("title", "notes", "train", "validation", "images", "text", "training", "evaluation",
            "test")
PUBLISHED_KEYS = ("pointing", "center", "random", "source", "note")


class RecipeError(MultigroundingError, ValueError):
    """A recipe that cannot be used: not found, not TOML, an unknown key, a wrong value."""


@dataclass(frozen=True)
class DataSplit:
    """A dataset of DATA_ROOT and one of its splits."""

    dataset: str
    split: str

    @property
    def key(self) -> str:
        return f"{self.dataset}-{self.split}"


@dataclass(frozen=True)
class Published:
    """The published figures of one test set for this row, in %, and where they come from.
    ``pointing`` None: not published, or not confirmed (``note`` says which)."""

    source: str
    pointing: float | None = None
    center: float | None = None
    random: float | None = None
    note: str = ""


@dataclass(frozen=True)
class TestSet:
    """One test set of the row: the data, how it is evaluated, what was published."""

    data: DataSplit
    evaluation: dict[str, Any]        # checked Evaluation fields for this set (mode, protocol ...)
    published: Published

    @property
    def mode(self) -> str:
        return self.evaluation.get("mode", "sentence")

    @property
    def protocol(self) -> str:
        return self.evaluation.get("protocol", "paper")


@dataclass(frozen=True)
class Recipe:
    """One table row, completely: data, models, training, test sets and published numbers."""

    name: str
    path: str                          # the file it was read from
    title: str
    notes: str
    train: DataSplit
    validation: DataSplit | None
    images: dict[str, Any]             # checked ImageExtraction fields
    text: dict[str, Any]               # checked TextExtraction fields
    training: dict[str, Any]           # checked TrainConfig fields
    evaluation: dict[str, Any]         # checked Evaluation fields, for every test set
    tests: tuple[TestSet, ...]
    toml: str = ""                     # the file's text, as read

    @property
    def command_name(self) -> str:
        """How ``multigrounding reproduce`` names it: the packaged name, or the file."""
        return self.name if self.path.endswith("(packaged)") else self.path

    def image_job(self, manifest: Path, cache: Path, data_root: Path, **overrides) -> ImageExtraction:
        fields = {**self.images, **overrides}
        weights = fields.get("weights")
        if weights is not None and _is_file_value(weights, "weights"):
            fields["weights"] = str(_under(data_root, weights))
        return ImageExtraction(manifest=manifest, cache=cache, **fields)

    def text_job(self, manifest: Path, cache: Path, data_root: Path, **overrides) -> TextExtraction:
        fields = {**self.text, **overrides}
        for name in ("elmo_options", "elmo_weights"):
            if fields.get(name) is not None:
                fields[name] = _under(data_root, fields[name])
        return TextExtraction(manifest=manifest, cache=cache, **fields)

    def train_config(self, **fields) -> TrainConfig:
        return TrainConfig(**{**self.training, **fields})

    def evaluation_job(self, test: TestSet, **fields) -> Evaluation:
        return Evaluation(**{**self.evaluation, **test.evaluation, **fields})

    def data_files(self) -> list[tuple[str, str]]:
        """Files of DATA_ROOT the models need besides the datasets: (path, what)."""
        files = []
        for name, what in (("elmo_options", "ELMo options"), ("elmo_weights", "ELMo weights")):
            if self.text.get(name):
                files.append((str(self.text[name]), what))
        weights = self.images.get("weights")
        if weights is not None and _is_file_value(weights, "weights"):
            files.append((str(weights), f"{self.images.get('backbone')} weights"))
        return files


def _under(root: Path, value) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path


def _is_file_value(value: str, field: str) -> bool:
    """Whether an [images] weights value names a file rather than named weights."""
    return field == "weights" and value not in ("imagenet", "random") and (
        "/" in value or "\\" in value or Path(value).suffix in (".pt", ".pth", ".safetensors", ".bin"))


# --------------------------------------------------------------------------- finding recipes

def recipes_folder():
    return resources.files(RECIPES_PACKAGE) / RECIPES_FOLDER


def list_recipes() -> list[str]:
    """The names of the packaged recipes, sorted."""
    return sorted(entry.name[:-len(".toml")] for entry in recipes_folder().iterdir()
                  if entry.name.endswith(".toml"))


def recipe_text(name_or_path: str | Path) -> tuple[str, str]:
    """(the recipe's text, where it was read from): a packaged recipe's name or a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        try:
            return path.read_text(encoding="utf-8-sig"), str(path)
        except FileNotFoundError:
            raise RecipeError(f"{path}: no such recipe file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: cannot be read as a recipe ({exc})") from None
    name = str(name_or_path)
    if name not in list_recipes():
        raise UnknownNameError("recipe", name, list_recipes())
    entry = recipes_folder() / f"{name}.toml"
    return entry.read_text(encoding="utf-8"), f"{name}.toml (packaged)"


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read and check a recipe, by packaged name or file path."""
    text, source = recipe_text(name_or_path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{source}: not valid TOML ({exc})") from None
    name = Path(str(name_or_path)).stem
    return dataclasses.replace(parse_recipe(data, name, source), toml=text)


def parse_recipe(data: dict, name: str, source: str) -> Recipe:
    """A Recipe from parsed TOML; every key known and every value of its field's type."""
    _known(data, TOP_KEYS, source, "")
    for key in ("title", "train", "test"):
        if key not in data:
            raise RecipeError(f"{source}: the recipe needs {_what(key)}")
    title = _string(data, "title", source, "")
    notes = _string(data, "notes", source, "", default="")
    train = _split(data["train"], source, "train", boxes=False)
    validation = _split(data["validation"], source, "validation", boxes=True) \
        if "validation" in data else None
    images = _section(data, "images", ImageExtraction, source)
    text = _section(data, "text", TextExtraction, source)
    training = _section(data, "training", TrainConfig, source)
    evaluation = _section(data, "evaluation", Evaluation, source)
    _check_models(images, text, training, source)
    tests = data["test"]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) for t in tests):
        raise RecipeError(f"{source}: [[test]] must be one or more tables (a [[test]] per test set)")
    checked_tests = tuple(_test(t, source, f"test[{i}]") for i, t in enumerate(tests))
    # each test set's evaluation settings: the recipe's [evaluation], then its own
    checked_tests = tuple(dataclasses.replace(t, evaluation={**evaluation, **t.evaluation})
                          for t in checked_tests)
    keys = [t.data.key for t in checked_tests]
    if len(set(keys)) != len(keys):
        raise RecipeError(f"{source}: [[test]]: a test set is listed twice ({keys})")
    return Recipe(name, source, title, notes, train, validation, images, text, training,
                  evaluation, checked_tests)


def _what(key: str) -> str:
    return {"title": "a title", "train": "a [train] table", "test": "at least one [[test]]"}[key]


def _known(data: dict, allowed, source: str, where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RecipeError(f"{source}: {where}unknown key {unknown[0]!r} (known keys: "
                          f"{', '.join(allowed)})")


def _string(data: dict, key: str, source: str, where: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise RecipeError(f"{source}: {where}{key}: expected a string, got {type(value).__name__}")
    return value


def _split(table: Any, source: str, section: str, boxes: bool) -> DataSplit:
    where = f"[{section}] "
    if not isinstance(table, dict):
        raise RecipeError(f"{source}: {section} must be a table ([{section}] with dataset and split)")
    _known(table, ("dataset", "split"), source, where)
    for key in ("dataset", "split"):
        if key not in table:
            raise RecipeError(f"{source}: {where}needs {key!r}")
    dataset = _string(table, "dataset", source, where)
    split = _string(table, "split", source, where)
    if dataset not in SOURCES:
        raise RecipeError(f"{source}: {where}dataset: {UnknownNameError('dataset', dataset, SOURCES)}")
    data_source = get_source(dataset)
    problem = data_source.check_split(split)
    if problem:
        raise RecipeError(f"{source}: {where}split: {problem}")
    if boxes and not data_source.boxes:
        raise RecipeError(f"{source}: {where}dataset: {dataset} has no boxed phrases, so it cannot "
                          f"score pointing; use flickr30k, referit or vg")
    return DataSplit(dataset, split)


def _section(data: dict, section: str, cls, source: str, table: Any = None,
             where: str | None = None) -> dict[str, Any]:
    """The section's keys, checked as fields of ``cls`` by its own rules."""
    table = data.get(section, {}) if table is None else table
    where = where or f"[{section}]"
    if not isinstance(table, dict):
        raise RecipeError(f"{source}: {where} must be a table")
    reserved = sorted(RESERVED[section] & set(table))
    if reserved:
        raise RecipeError(f"{source}: {where} {reserved[0]}: set by the reproduction itself; "
                          f"leave it out of the recipe")
    try:
        checked = from_mapping(cls, table, f"{source}: {where}")
    except ConfigError as exc:
        raise RecipeError(_key_message(str(exc))) from None
    return {name: getattr(checked, name) for name in table}


def _key_message(text: str) -> str:
    """from_mapping says "SOURCE: [section]: key: problem"; recipes read "[section] key: ..."."""
    return text.replace("]: ", "] ", 1)


def _check_models(images: dict, text: dict, training: dict, source: str) -> None:
    from multigrounding.pipeline.backbones import list_backbones

    backbone = images.get("backbone", "efficientnet_lite0")
    if backbone not in list_backbones():
        raise RecipeError(f"{source}: [images] backbone: "
                          f"{UnknownNameError('backbone', backbone, list_backbones())}")
    encoder = text.get("encoder", "hf:all-MiniLM-L6-v2")
    if encoder != "elmo" and not encoder.startswith("hf:"):
        raise RecipeError(f"{source}: [text] encoder: {encoder!r} is not elmo or hf:NAME")
    if encoder == "elmo":
        for name in ("elmo_options", "elmo_weights"):
            if not text.get(name):
                raise RecipeError(f"{source}: [text] {name}: the elmo encoder needs it (a path "
                                  f"relative to DATA_ROOT)")
    try:
        TrainConfig(images="-", text="-", out="-", **training).check()
    except ConfigError as exc:
        raise RecipeError(f"{source}: [training] {exc}") from None


def _test(table: dict, source: str, where: str) -> TestSet:
    label = f"[{where}] "
    data = _split({k: table[k] for k in ("dataset", "split") if k in table}, source, where, boxes=True)
    published = table.get("published")
    if not isinstance(published, dict):
        raise RecipeError(f"{source}: {label}needs a [test.published] table (source, and pointing "
                          f"when a figure was published)")
    _known(published, PUBLISHED_KEYS, source, f"{label}published: ")
    values = {}
    for key in ("pointing", "center", "random"):
        value = published.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 100):
            raise RecipeError(f"{source}: {label}published.{key}: expected a percentage (0-100), "
                              f"got {value!r}")
        values[key] = None if value is None else float(value)
    if "source" not in published:
        raise RecipeError(f"{source}: {label}published: needs 'source' (where the figures come from)")
    checked = Published(_string(published, "source", source, f"{label}published."),
                        note=_string(published, "note", source, f"{label}published.", default=""),
                        **values)
    rest = {k: v for k, v in table.items() if k not in ("dataset", "split", "published")}
    evaluation = _section({}, "evaluation", Evaluation, source, table=rest, where=f"[{where}]")
    return TestSet(data, evaluation, checked)


def describe(recipe: Recipe) -> str:
    """A few lines saying what the recipe runs, for ``reproduce list`` and the results."""
    images, text, training = recipe.images, recipe.text, recipe.training
    tests = ", ".join(f"{t.data.key} ({t.mode}, {t.protocol})" for t in recipe.tests)
    return (f"{recipe.title}\n"
            f"  train {recipe.train.key}; validation "
            f"{recipe.validation.key if recipe.validation else 'none (last checkpoint)'}; "
            f"{images.get('backbone', 'efficientnet_lite0')} ({images.get('weights', 'imagenet')}) + "
            f"{text.get('encoder', 'hf:all-MiniLM-L6-v2')}; D {training.get('dim', 1024)}, "
            f"{training.get('epochs', 20)} epochs of batch {training.get('batch_size', 32)}, lr "
            f"{training.get('lr', 1e-3):g}\n  test {tests}")
