"""What several commands declare: shared options, parameter types, and the options generated
from a settings dataclass (``multigrounding.settings.setting``)."""
from __future__ import annotations

from pathlib import Path

import click


def storage_options_option(command):
    """``--storage-options JSON``: for stores and images named by URL (never saved)."""
    from multigrounding.cache.location import STORAGE_OPTIONS_HELP

    return click.option("--storage-options", "storage_options", metavar="JSON",
                        help=STORAGE_OPTIONS_HELP)(command)


def level_choice_option(command):
    """``--level-choice``: how grounding picks each word's level (heads/scores.choose_levels)."""
    return click.option("--level-choice", type=click.Choice(["relevance", "focus"]), default=None,
                        help="How each word's level is chosen for its heatmap: relevance (the "
                             "paper's max) or focus (the level whose map is most focused) "
                             "[default: the run's, from its --level-selection].")(command)


def _storage_options(text: str | None) -> dict:
    from multigrounding.cache.location import parse_storage_options

    return parse_storage_options(text)


def _store(where: str, options_text: str | None):
    """A store argument: a local folder or a URL, with ``--storage-options``."""
    from multigrounding.cache.location import Location

    return Location.parse(where, _storage_options(options_text))


class RegistryChoice(click.Choice):
    """A choice whose names come from a registry, loaded only when needed (help or a call),
    so ``multigrounding --help`` does not import torch. An unknown name says the closest one."""

    def __init__(self, kind: str, loader):
        self.kind = kind
        self._loader = loader
        self.case_sensitive = True

    @property
    def choices(self):
        return tuple(self._loader())

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        from multigrounding.errors import UnknownNameError

        self.fail(str(UnknownNameError(self.kind, value, self.choices)), param, ctx)


def _backbone_names():
    from multigrounding.pipeline.backbones import list_backbones

    return list_backbones()


REGISTRIES = {"backbones": ("backbone", _backbone_names)}


class SettingType(click.ParamType):
    """A config field's value on the command line, checked by the field's own rule (type,
    range, finite), so the command line and a JSON config refuse the same values."""

    def __init__(self, item):
        self.item = item
        self.name = item.metadata["kind"]

    def convert(self, value, param, ctx):
        from multigrounding.settings import ConfigError, check_value

        if not isinstance(value, str):
            return value
        kind = self.item.metadata["kind"]
        try:
            if kind == "ints":
                parsed = [int(v) for v in value.split(",") if v.strip()]
            elif kind == "int":
                parsed = int(value)
            elif kind == "float":
                parsed = float(value)
            else:
                parsed = value
        except ValueError:
            self.fail(f"{value!r} is not {'a list of integers' if kind == 'ints' else 'a ' + kind}",
                      param, ctx)
        try:
            return check_value(self.item, parsed, "option")
        except ConfigError as exc:
            self.fail(str(exc).split(": ", 2)[-1], param, ctx)


def config_options(cls, *, exclude: tuple[str, ...] = (), defaults: bool = True):
    """click options generated from a settings dataclass (``multigrounding.settings.setting``):
    one option per field, with its help, type, range or choices, and default — so a new field
    appears on the command line without a second edit. ``defaults=False`` leaves every default
    None, for commands that merge the options over a config file (the help still shows them)."""
    import dataclasses

    def decorate(command):
        for item in reversed(dataclasses.fields(cls)):
            meta = item.metadata
            if not meta.get("cli") or item.name in exclude:
                continue
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            name = "--" + item.name.replace("_", "-")
            help_text = meta["help"]
            if not defaults and default not in (None, False):
                help_text += f"  [default: {_show(default)}]"
            kwargs = {"help": help_text, "show_default": defaults and default not in (None, False)}
            if meta["kind"] == "bool":
                option = click.option(name, item.name, is_flag=True,
                                      default=default if defaults else None, **kwargs)
            else:
                if meta.get("registry"):
                    kind = RegistryChoice(*REGISTRIES[meta["registry"]])
                elif meta["choices"]:
                    kind = click.Choice(meta["choices"])
                elif meta["kind"] == "path" and meta["path"] == "store":
                    kind = SettingType(item)     # a folder or a URL: click.Path would mangle s3://
                elif meta["kind"] == "path":
                    kind = click.Path(file_okay=meta["path"] != "dir", dir_okay=meta["path"] != "file",
                                      path_type=Path)
                else:
                    kind = SettingType(item)
                required = meta.get("required") and defaults
                option = click.option(name, item.name, type=kind, required=required,
                                      default=default if defaults else None, **kwargs)
            command = option(command)
        return command
    return decorate


class SettingsCommand(click.Command):
    """A command whose options are generated from a settings dataclass on first use (parsing or
    help), so that building the command line imports no stage: ``multigrounding --help`` stays
    fast. ``settings`` returns ``(cls, config_options keyword arguments)``."""

    def __init__(self, *args, settings=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._settings = settings
        self._placed = len(self.params)       # options declared by hand come first

    def get_params(self, ctx):
        if self._settings is not None:
            cls, kwargs = self._settings()
            self._settings = None
            generated = config_options(cls, **kwargs)(lambda: None).__click_params__
            self.params[self._placed:self._placed] = list(reversed(generated))
        return super().get_params(ctx)


def _show(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
