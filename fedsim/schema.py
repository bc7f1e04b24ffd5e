"""The ground floor of every scenario section and every one-line error.

- :class:`ScenarioError`: bad input; its message is one line ``file: dotted.key: message``.
- :class:`Section`: the base of every section: unknown keys, booleans posing as numbers
  and infinite or NaN numbers are errors. Pydantic's lax mode turns ``true`` into ``1`` for
  an ``int`` field and accepts ``.inf`` and ``.nan`` for a ``float`` field; YAML writes both
  easily (``rounds: yes``, ``lr: .inf``), and neither is ever meant. Other lax conversions
  stay (``lr: 1e-3`` is a *string* in YAML 1.1 and must still read as a number).
- :func:`validation_error_line`: a pydantic error as that one line, with a did-you-mean
  for unknown keys.

This module imports nothing of fedsim, so every schema module and loader builds on it.
"""

from __future__ import annotations

import difflib
import reprlib
import types
from collections.abc import Iterable
from typing import Annotated, Any, Literal, NoReturn, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

MAX_SEED = 2**64 - 1
"""torch.manual_seed takes 64 bits."""

MAX_MESSAGE = 400
"""Characters of an error message; longer ones end in ``...`` (values can be huge)."""

MAX_PATH = 4096


class ScenarioError(ValueError):
    """Bad input in a scenario file or an override; the message is one line of at most
    :data:`MAX_MESSAGE` characters."""

    def __init__(self, message: object = "") -> None:
        text = " ".join(str(message).split("\n"))
        if len(text) > MAX_MESSAGE:
            text = text[: MAX_MESSAGE - 3] + "..."
        super().__init__(text)


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 6, 6, 3


def short_repr(value: Any) -> str:
    """``repr`` bounded in length and depth, for echoing user input in a message."""
    return _repr.repr(value)


def check_path_text(value: str | None) -> str | None:
    """A path given in a scenario: no NUL byte, not absurdly long."""
    if value is None:
        return value
    if "\0" in value:
        raise ValueError("a path must not contain a NUL byte")
    if len(value) > MAX_PATH:
        raise ValueError(f"a path of {len(value)} characters (at most {MAX_PATH})")
    return value


def fail(source: str, key: str, message: str) -> NoReturn:
    """Raise the one-line error ``source: key: message``."""
    raise ScenarioError(f"{source}: {key}: {message}")


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


def _format_location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    return ".".join(parts) if parts else "(top level)"


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The section class inside ``X``, ``X | None``, ``dict[k, X]`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType, Annotated, list, dict):
        for arg in get_args(annotation):
            found = _section_class(arg)
            if found is not None:
                return found
    return None


def known_keys(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    """The keys the section at ``loc`` (a pydantic error location) accepts."""
    cls: type[BaseModel] | None = root
    for part in loc:
        if cls is None:
            return []
        field = cls.model_fields.get(str(part))
        if field is None:
            continue  # a dict key or list index between sections
        cls = _section_class(field.annotation)
    return list(cls.model_fields) if cls is not None else []


def _format_message(err: dict[str, Any], root: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key" + did_you_mean(str(err["loc"][-1]), known_keys(tuple(err["loc"][:-1]), root))
    if kind == "missing":
        return "required key is missing"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        return f"must be {op} {bound} (got {short_repr(err.get('input'))})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {short_repr(err.get('input'))})"
    if kind == "finite_number":
        return f"must be a finite number (got {short_repr(err.get('input'))})"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{msg} (got {short_repr(err.get('input'))})" if "input" in err and kind.endswith("_type") else msg


def validation_error_line(source: str, exc: ValidationError, root: type[BaseModel]) -> str:
    """The first error of a pydantic ValidationError as ``file: dotted.key: message``."""
    err = exc.errors()[0]
    message = _format_message(err, root)
    loc = _format_location(err["loc"])
    if (
        loc == "(top level)"
        and ": " in message
        and message.split(": ", 1)[0].replace(".", "").replace("_", "").isalnum()
    ):
        loc, message = message.split(": ", 1)
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{short_source(source)}: {loc}: {message}{suffix}"


def short_source(source: str) -> str:
    """A file name fit for a one-line message (names can be 4096 characters)."""
    text = source.replace("\n", " ").replace("\0", "\\0")
    return text if len(text) <= 200 else text[:197] + "..."
