"""Typed configuration: dataclasses with named presets, overridable from the command line.

Every stage declares a dataclass of its options. `add_config_args` turns each field into a `--field` flag
(`--field value`; booleans take true/false), `build_config` starts from a preset and applies only the flags
the user gave, so `gptlab pretrain --preset tiny --lr 3e-3` means "the tiny preset, but this learning rate".
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from .common import GptlabError

C = TypeVar("C")


def option(default: Any, help_text: str) -> Any:
    """A dataclass field with a default and the help text its `--flag` shows."""
    return dataclasses.field(default=default, metadata={"help": help_text})


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_parser(tp: Any):
    """The argparse `type` for a dataclass field annotation (str, int, float, bool, and Optional of them)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _field_parser(args[0])
        return lambda s: None if s.lower() in ("none", "null") else inner(s)
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    raise TypeError(f"unsupported config field type {tp!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type, presets: dict[str, Any] | None = None) -> None:
    """Add a `--preset` flag (if presets are given) and one `--name` flag per dataclass field."""
    # the defaults shown are the default preset's values: what a run without flags uses
    shown = presets[next(iter(presets))] if presets else None
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=next(iter(presets)),
                            help="starting point; the other flags override it; the defaults below are this "
                                 "preset's (default: %(default)s)")
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if shown is not None:
            default = getattr(shown, field.name)
        else:
            default = field.default if field.default is not dataclasses.MISSING else None
        doc = field.metadata.get("help", "")
        # a help text that already says what the default means (e.g. "(default: all)" for a None that is
        # resolved later) keeps its own words; appending the raw value would show "(default: None)" too
        if "(default:" not in doc:
            doc = f"{doc} (default: {default})".strip()
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=f"cfg_{field.name}",
                           type=_field_parser(hints[field.name]), default=None,
                           metavar=getattr(hints[field.name], "__name__", "VALUE"), help=doc)


def build_config(cls: type[C], args: argparse.Namespace, presets: dict[str, C] | None = None) -> C:
    """The preset named by `args.preset` (or the class defaults) with every flag the user gave applied."""
    base = presets[args.preset] if presets else cls()
    overrides = {f.name: getattr(args, f"cfg_{f.name}") for f in dataclasses.fields(cls)
                 if f.init and getattr(args, f"cfg_{f.name}", None) is not None}
    try:
        return dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as e:
        raise GptlabError(f"invalid {cls.__name__}: {e}") from None


def register_config_command(sub, name: str, help: str, description: str, cls: type[C], presets: dict[str, C],
                            run: Callable[[C], Any]) -> argparse.ArgumentParser:
    """A subcommand whose flags are the fields of `cls` (with `--preset`): it builds the config and prints
    what `run(config)` returns (a stage's output path). The one shape every training stage's CLI has."""
    parser = sub.add_parser(name, help=help, description=description)
    add_config_args(parser, cls, presets)
    parser.set_defaults(func=lambda args: print(run(build_config(cls, args, presets))))
    return parser
