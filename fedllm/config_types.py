"""Generic type checks of config sections, from their dataclass annotations.

Hydra turns ``train.local_steps=1.5`` into a float, ``seed=abc`` and ``storage.encrypt=no``
into strings, and ``inf`` / ``nan`` into floats; none of these is caught by a range check
such as ``> 0`` (issue 13). Every section of :mod:`fedllm.config` calls :func:`check_types`
first in ``__post_init__``, so one rule covers every field, present and future:

- an ``int`` field takes an integer only (a float, even ``2.0``, or a bool is an error);
- a ``float`` field takes any finite int or float and stores a float;
- a ``bool`` field takes exactly ``true`` or ``false``;
- a ``str`` field takes text only; a ``Literal[...]`` field (a mode) exactly one of its strings;
- a ``tuple[X, ...]`` field takes a list or tuple of ``X``;
- ``X | None`` also takes ``None``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from fedllm.errors import ConfigError


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


_HINTS: dict[type, dict[str, Any]] = {}  # resolved annotations, once per section class


def _field_types(section_type: type) -> dict[str, Any]:
    if section_type not in _HINTS:
        _HINTS[section_type] = typing.get_type_hints(section_type)
    return _HINTS[section_type]


def check_types(section: Any, prefix: str) -> None:
    """Check every field of the dataclass ``section`` against its annotation, in place.

    Values are normalised where that loses nothing: an int in a float field becomes a float, a
    list in a tuple field a tuple (the frozen dataclass is updated from ``__post_init__``).

    Args:
        section: a dataclass instance, in its ``__post_init__``.
        prefix: the section's key (``train``, ``privacy.client_caps``; empty for the top level).

    Raises:
        ConfigError: naming the first offending key (``prefix.field``) and what was given.
    """
    hints = _field_types(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        conformed = _conform(value, hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
        if conformed is not value:
            object.__setattr__(section, f.name, conformed)  # frozen: normalising, not mutating


def _conform(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against ``hint`` (and normalised: int -> float, list -> tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]  # our Optionals wrap exactly one type
        return _conform(value, inner, key)
    if origin is typing.Literal:  # a mode: one of the listed strings (from YAML, so checked here)
        _require(isinstance(value, str) and value in args, key, f"got {value!r}; choose one of {', '.join(args)}")
        return value
    if origin is tuple:
        _require(isinstance(value, (tuple, list)), key, f"expected a list, got {value!r}")
        return tuple(_conform(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        _require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
    elif hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
    elif hint is float:
        return _finite(value, key)
    elif hint is str:
        _require(
            isinstance(value, str),
            key,
            f"expected text, got {value!r}; quote it if it is meant as text, e.g. '{value}'",
        )
    elif isinstance(hint, type):
        _require(isinstance(value, hint), key, f"expected a {hint.__name__}, got {value!r}")
    return value


def _finite(value: Any, key: str) -> float:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    _require(math.isfinite(number), key, f"must be a finite number, got {value!r}")
    return number
