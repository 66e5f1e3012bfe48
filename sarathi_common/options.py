"""Typed configuration from the command line, the environment and a YAML file.

Each config dataclass names its options once, in its fields' metadata: the parser is built from
the fields, the parsed values become the dataclass, and the flags that start another process with
the same settings are derived from the dataclass again. Nothing below the CLI sees a Namespace.

Precedence, highest first: a flag given on the command line, the environment variable
`SARATHI_<OPTION>` (the option's name upper-cased, e.g. SARATHI_CHUNK_SIZE), the YAML file named
by `--config` (or $SARATHI_CONFIG; keys are option names, `chunk-size` or `chunk_size`), then the
field's default. Flags left out parse to a `_Default` marker so that `settle` can tell them apart
from flags given with the default value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

ENV_PREFIX = "SARATHI_"
_DESTS = "_option_names"   # in the Namespace: the options this command has (keys a file may set)
CONFIG_ENV = "SARATHI_CONFIG"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclasses.dataclass(frozen=True)
class _Default:
    """What argparse holds for an option not given on the command line."""

    field: dataclasses.Field

    @property
    def value(self) -> Any:
        return self.field.default


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def option(default: Any, help: str, *, flag: str | None = None, choices: Iterable[str] | None = None,
           group: str | None = None) -> Any:
    """A config field that is also a command-line option. `flag` overrides `--field-name`; a bool
    field whose default is True is switched off by its flag (e.g. `--no-overlap`), one whose
    default is False switched on."""
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "choices": list(choices) if choices is not None else None,
        "group": group})


def _options(cls: type) -> list[dataclasses.Field]:
    """The option fields of `cls`, its own first and then those of the option sets it inherits
    (sarathi_common.auth's), so that --help reads from the role's own settings down."""
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    own = set(cls.__dict__.get("__annotations__", {}))
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


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
    names = set(parser.get_default(_DESTS) or ())
    for f in _options(cls):
        if f.name in skip or (wanted is not None and f.name not in wanted):
            continue
        names.add(f.name)
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group) if group else parser
        target = groups[group]
        text = f"{f.metadata['help']} [${env_name(f.name)}]"
        if isinstance(f.default, bool):
            action = "store_false" if f.default else "store_true"
            target.add_argument(flag_of(f), dest=f.name, action=action, default=_Default(f),
                                help=text)
        else:
            target.add_argument(flag_of(f), dest=f.name, type=_scalar_type(f), default=_Default(f),
                                choices=f.metadata["choices"], help=text)
    parser.set_defaults(**{_DESTS: frozenset(names)})


PRECEDENCE = ("Each option can also be set by the environment variable shown after it, or in "
              "the YAML file given by --config: a flag wins over the variable, which wins over the "
              "file.")


def add_config_file_option(parser: argparse.ArgumentParser) -> None:
    parser.epilog = PRECEDENCE
    parser.add_argument("--config", dest="config_file", metavar="FILE", default=None,
                        help=f"a YAML file of settings (option names as keys); flags and "
                             f"{ENV_PREFIX}* variables override it [${CONFIG_ENV}]")


def settle(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Fills every option not given as a flag from the environment, then the YAML file, then
    its default (in place; returns `args`). Bad values end the process with one line."""
    environ = os.environ if environ is None else environ
    unset = {name: value.field for name, value in vars(args).items() if isinstance(value, _Default)}
    path = getattr(args, "config_file", None) or environ.get(CONFIG_ENV)
    from_file = _read_yaml(path, set(getattr(args, _DESTS, ()))) if path else {}
    for name, f in unset.items():
        if env_name(name) in environ:
            value = _parse_text(f, environ[env_name(name)], env_name(name))
        elif name in from_file:
            value = _check_value(f, from_file[name], f"{name} in {path}")
        else:
            value = f.default
        setattr(args, name, value)
    return args


def _read_yaml(path: str, known: set[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise SystemExit(f"sarathi: cannot read the config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"sarathi: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"sarathi: {path} must hold a mapping of option names to values")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"sarathi: {path}: unknown setting {', '.join(unknown)} for this command "
                         f"(see --help for its options)")
    return values


def _parse_text(f: dataclasses.Field, text: str, where: str) -> Any:
    """A value from an environment variable's text."""
    if isinstance(f.default, bool):
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise SystemExit(f"sarathi: {where}={text!r}: expected true or false")
    kind = _scalar_type(f)
    try:
        value = kind(text)
    except ValueError:
        raise SystemExit(f"sarathi: {where}={text!r}: expected {kind.__name__}") from None
    return _check_value(f, value, where)


def _check_value(f: dataclasses.Field, value: Any, where: str) -> Any:
    """`value` (from YAML or converted text) if it suits the field's type and choices."""
    if value is None:
        return None
    kind = bool if isinstance(f.default, bool) else _scalar_type(f)
    ok = (isinstance(value, bool) if kind is bool
          else isinstance(value, int) and not isinstance(value, bool) if kind is int
          else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else isinstance(value, (str, int, float)) and not isinstance(value, bool))
    if not ok:
        raise SystemExit(f"sarathi: {where}: {value!r} is not a{'n' if kind is int else ''} "
                         f"{kind.__name__}")
    value = kind(value)
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        raise SystemExit(f"sarathi: {where}: {value!r} is not one of {', '.join(choices)}")
    return value


def without_option_variables(environ: Mapping[str, str], *classes: type) -> dict[str, str]:
    """`environ` less the SARATHI_* variables of `classes`' options and the config file: for a
    process started with explicit flags, whose settings must not be changed under it by
    variables meant for its parent."""
    drop = {CONFIG_ENV} | {env_name(f.name) for cls in classes for f in _options(cls)}
    return {k: v for k, v in environ.items() if k not in drop}


def from_namespace(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The dataclass of the fields `args` holds (the others keep their defaults)."""
    values = {f.name: _plain(getattr(args, f.name)) for f in dataclasses.fields(cls)
              if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, _Default) else value


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
