"""Typed configuration from dataclasses and ``key=value`` overrides.

Every field carries its help text in ``metadata["help"]``. Overrides are parsed by the field's type; an unknown
key or a value of the wrong type is refused with a message that names the key and the valid keys or type. A
``dict`` field takes sub-keys (``task.digits=1``), passed on as keyword options to whatever the field configures;
a field that is itself a config dataclass takes dotted keys into it (``critic.lr=1e-5``).

A YAML file is a nested mapping of the same keys; :func:`flatten` turns it into overrides, so a file and the
command line are checked by the same rules.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and its help text."""
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help})
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def parse_scalar(text: str) -> Any:
    """``true``/``false``, ``none``, an int, a float, or the string itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _convert(key: str, text: str, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null") and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        value = parse_scalar(text)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={text!r}: expected true or false")
        return value
    if hint in (int, float):
        try:
            return hint(text) if hint is float else int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected {hint.__name__}") from None
    return text


def _is_dict(hint: Any) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def apply_overrides(config: Any, overrides: list[str], prefix: str = "") -> Any:
    """A copy of dataclass ``config`` with ``key=value`` overrides applied (later ones win)."""
    hints = typing.get_type_hints(type(config))
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    nested: dict[str, list[str]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r}: overrides are key=value, e.g. steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        head, _, sub = key.partition(".")
        if head not in fields:
            raise ConfigError(f"unknown key {prefix + head!r}; valid keys: {', '.join(prefix + f for f in fields)}")
        if dataclasses.is_dataclass(hints[head]):
            if not sub:
                raise ConfigError(f"{prefix + key!r} is a group of keys: set {prefix + key}.<name>=value")
            nested.setdefault(head, []).append(f"{sub}={text}")
        elif sub:
            if not _is_dict(hints[head]):
                raise ConfigError(f"{prefix + key!r}: {prefix + head!r} takes no sub-keys")
            current = changes.get(head, dict(getattr(config, head)))
            current[sub] = parse_scalar(text)
            changes[head] = current
        elif _is_dict(hints[head]):
            raise ConfigError(f"{prefix + key!r} takes sub-keys: {prefix + key}.<name>=value")
        else:
            changes[head] = _convert(prefix + key, text, hints[head])
    for head, items in nested.items():
        changes[head] = apply_overrides(getattr(config, head), items, f"{prefix}{head}.")
    return dataclasses.replace(config, **changes)


def flatten(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"critic": {"lr": 1e-5}}`` -> ``["critic.lr=1e-05"]``: a nested mapping (a YAML file) as overrides."""
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={'none' if value is None else value}")
    return items


def describe(config_type: type, prefix: str = "") -> str:
    """One entry per field, nested groups expanded: ``name = default`` and the help text."""
    lines = []
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"  {prefix}{f.name}.*   {f.metadata.get('help', '')}")
            lines.append(describe(hints[f.name], f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {prefix}{f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def check_mapping_types(config: Any, mapping: dict[str, Any], prefix: str, source: str) -> None:
    """A value of a nested mapping (a YAML file, named by ``source``) of the wrong kind for its key (a list or
    mapping where one value belongs, a mapping missing where a group is) is refused naming the key; scalars are
    converted by the key's type later, as on the command line. Unknown keys are left to the override parser, which
    names the valid ones."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for key, value in mapping.items():
        if key not in fields:
            continue
        current = fields[key]
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}{key} is a group of keys: give a mapping, not {value!r}")
            check_mapping_types(current, value, f"{prefix}{key}.", source)
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}{key} takes a mapping of options, not {value!r}")
        elif isinstance(value, (list, dict)):
            kind = "a list" if isinstance(value, list) else "a mapping"
            raise ConfigError(f"{source}: {prefix}{key} takes one {type(current).__name__} value, got {kind} {value!r}")


def check_writable(path: Path, key: str, folder: bool = False) -> None:
    """Refuse an output ``path`` (a ``folder``, or a file whose folder) that cannot be created or written, before
    any work: a :class:`ConfigError` naming ``key`` and the reason."""
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{key} {str(path)!r} cannot be written ({error.strerror}); choose another {key}") from None
