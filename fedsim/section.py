"""The base of every scenario section: unknown keys, booleans posing as numbers, and
infinite or NaN numbers are errors.

Pydantic's lax mode turns ``true`` into ``1`` for an ``int`` field and accepts ``.inf`` and
``.nan`` for a ``float`` field; YAML writes both easily (``rounds: yes``, ``lr: .inf``), and
neither is ever meant. Other lax conversions stay (``lr: 1e-3`` is a *string* in YAML 1.1
and must still read as a number).

This module imports nothing of fedsim, so every schema module can build on it.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _allows_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return _allows_bool(get_args(annotation)[0])
    if origin is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_allows_bool(a) for a in get_args(annotation))
    return False


def misplaced_bool(annotation: Any, value: Any) -> str | None:
    """Where in ``value`` a boolean stands that ``annotation`` does not admit: ``""`` for
    ``value`` itself, ``"[2]"`` / ``"[key]"`` for an item, ``None`` if there is none.
    Nested sections check themselves."""
    if isinstance(value, bool):
        return None if _allows_bool(annotation) else ""
    origin = get_origin(annotation)
    if origin is Annotated:
        return misplaced_bool(get_args(annotation)[0], value)
    if origin in (Union, types.UnionType):
        arms = get_args(annotation)
        kind = list if isinstance(value, list) else dict if isinstance(value, dict) else None
        for arm in arms:
            if kind is not None and (get_origin(arm) or arm) is kind:
                return misplaced_bool(arm, value)
        return None
    if origin is list and isinstance(value, list):
        (item,) = get_args(annotation) or (Any,)
        for i, v in enumerate(value):
            where = misplaced_bool(item, v)
            if where is not None:
                return f"[{i}]{where}"
    if origin is dict and isinstance(value, dict):
        key_type, item = get_args(annotation) or (Any, Any)
        for k, v in value.items():
            if isinstance(k, bool) and not _allows_bool(key_type):
                return f"[{k}]"
            where = misplaced_bool(item, v)
            if where is not None:
                return f"[{k}]{where}"
    return None


class Section(BaseModel):
    """A scenario section: ``extra="forbid"``, finite numbers only, no bool-as-number."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None:
            where = misplaced_bool(field.annotation, value)
            if where is not None:
                if where:
                    raise ValueError(f"item {where} is a boolean, which is not allowed here")
                raise ValueError(f"a boolean is not allowed here (got {value!r})")
        return value


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'rounds'?)`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


__all__ = ["Section", "did_you_mean", "misplaced_bool"]
