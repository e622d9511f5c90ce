"""Type checks of a config read from a file (``--config`` JSON, a bench spec's TOML tables): every key
known, every value of its field's type, nested tables included, refused in one line naming the key.

The field types come from the dataclasses' annotations: ``int`` takes integers (not booleans), ``float``
takes integers or floats, ``str`` strings, ``bool`` booleans, ``Optional[X]`` also None, a dataclass a
table of its own fields (checked the same way); other annotations are not checked here.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

__all__ = ["check_config_types"]

_SCALARS = {bool: ("a boolean", lambda v: isinstance(v, bool)),
            int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
            float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
            str: ("a string", lambda v: isinstance(v, str))}


def check_config_types(cls: type, values: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse a key of ``values`` that ``cls`` (a dataclass) lacks, or a value of the wrong type."""
    if not isinstance(values, Mapping):
        where = f"config key {prefix.rstrip('.')}" if prefix else "a config"
        raise ValueError(f"{where} must be a table of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown config keys: {[prefix + k for k in unknown]}")
    for key, value in values.items():
        _check_value(hints[key], value, prefix + key)


def _check_value(want, value, name: str) -> None:
    if typing.get_origin(want) is typing.Union:
        args = [a for a in typing.get_args(want) if a is not type(None)]
        if value is None or len(args) != 1:
            return
        want = args[0]
    if dataclasses.is_dataclass(want):
        if not isinstance(value, want):
            check_config_types(want, value, name + ".")
        return
    if want in _SCALARS and not _SCALARS[want][1](value):
        raise ValueError(f"config key {name} must be {_SCALARS[want][0]}, got {value!r}")
