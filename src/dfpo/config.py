"""Typed configuration from dataclasses and ``key=value`` overrides.

Every field carries its help text in ``metadata["help"]``. Overrides are parsed by the field's type; an unknown
key or a value of the wrong type is refused with a message that names the key and the valid keys or type. A
``dict`` field takes sub-keys (``task.digits=1``), passed on as keyword options to whatever the field configures.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and its help text."""
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


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """A copy of dataclass ``config`` with ``key=value`` overrides applied."""
    hints = typing.get_type_hints(type(config))
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r}: overrides are key=value, e.g. steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        head, _, sub = key.partition(".")
        if head not in fields:
            raise ConfigError(f"unknown key {head!r}; valid keys: {', '.join(fields)}")
        if sub:
            if typing.get_origin(hints[head]) is not dict and hints[head] is not dict:
                raise ConfigError(f"{key!r}: {head!r} takes no sub-keys")
            current = changes.get(head, dict(getattr(config, head)))
            current[sub] = parse_scalar(text)
            changes[head] = current
        elif hints[head] is dict or typing.get_origin(hints[head]) is dict:
            raise ConfigError(f"{key!r} takes sub-keys: {key}.<name>=value")
        else:
            changes[head] = _convert(key, text, hints[head])
    return dataclasses.replace(config, **changes)


def describe(config_type: type) -> str:
    """One line per field: ``name = default  help``."""
    lines = []
    for f in dataclasses.fields(config_type):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
