"""Typed configuration from the command line.

Each config dataclass names its options once, in its fields' metadata: the parser is built from
the fields, the parsed values become the dataclass, and the flags that start another process with
the same settings are derived from the dataclass again. Nothing below the CLI sees a Namespace.
Environment variables and a YAML file can fill the same fields later (`from_mapping`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, *, flag: str | None = None, choices: Iterable[str] | None = None,
           group: str | None = None) -> Any:
    """A config field that is also a command-line option. `flag` overrides `--field-name`; a bool
    field whose default is True is switched off by its flag (e.g. `--no-overlap`), one whose
    default is False switched on."""
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "choices": list(choices) if choices is not None else None,
        "group": group})


def _options(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _scalar_type(f: dataclasses.Field) -> type:
    """int, float or str from the field's annotation (`int | None` and the like)."""
    annotation = str(f.type)
    for name, kind in (("int", int), ("float", float)):
        if annotation.split(" | ")[0] == name:
            return kind
    return str


def add_options(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = (),
                only: Iterable[str] | None = None) -> None:
    """Adds one option per field of `cls` (those in `only`, but not in `skip`), grouped as the
    fields say."""
    skip, wanted = set(skip), set(only) if only is not None else None
    groups: dict[str | None, Any] = {}
    for f in _options(cls):
        if f.name in skip or (wanted is not None and f.name not in wanted):
            continue
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group) if group else parser
        target = groups[group]
        if isinstance(f.default, bool):
            action = "store_false" if f.default else "store_true"
            target.add_argument(flag_of(f), dest=f.name, action=action, default=f.default,
                                help=f.metadata["help"])
        else:
            target.add_argument(flag_of(f), dest=f.name, type=_scalar_type(f), default=f.default,
                                choices=f.metadata["choices"], help=f.metadata["help"])


def from_namespace(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The dataclass of the fields `args` holds (the others keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def from_mapping(cls: type[T], values: Mapping[str, Any]) -> T:
    """The dataclass from plain values (environment variables, a YAML file): unknown keys fail."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    return cls(**values)


def to_flags(config: Any, only: Iterable[str] | None = None) -> list[str]:
    """The command-line flags that give another process the same settings as `config` (the
    fields in `only`, or all options); fields left at None are left out."""
    wanted = set(only) if only is not None else None
    flags: list[str] = []
    for f in _options(type(config)):
        if wanted is not None and f.name not in wanted:
            continue
        value = getattr(config, f.name)
        if isinstance(f.default, bool):
            if value != f.default:
                flags.append(flag_of(f))
        elif value is not None:
            flags += [flag_of(f), str(value)]
    return flags
