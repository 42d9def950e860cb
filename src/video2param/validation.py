"""One generic check of dataclass fields against their type annotations and bounds.

`check_fields(instance, where)` reads each field's annotation (``bool``, ``int``, ``float``, ``str``, ``list[X]``,
``tuple[X, ...]``, ``dict[str, X]``, ``X | None``, ``Literal[...]``, ``Any``, or a class) and the optional bounds in
the field's metadata, and raises one ``ValueError`` naming the first field that does not fit::

    merge: bool = field(default=True, metadata={"help": "..."})
    hidden_dim: int = field(default=512, metadata={"help": "...", "min": 1, "max": 8192})

    check_fields(options, "options")   # ValueError: options.merge: expected a bool, got 'false' (str)

The rules are strict on purpose, because configs arrive from JSON files and keyword arguments:

* ``bool`` accepts only ``True``/``False`` (not ``"false"``, not ``0``);
* ``int`` accepts an ``int`` that is not a ``bool`` (not ``1e9``, not ``2.0``);
* ``float`` accepts an ``int`` or ``float`` that is finite (not ``Infinity``/``NaN``, not ``"x"``);
* ``list[X]`` / ``tuple[X, ...]`` accept a list or a tuple whose every item fits ``X`` (not a string);
* bounds (metadata ``min``/``max`` inclusive, ``gt``/``lt`` exclusive) apply to a number, or to each number
  inside a list/tuple, so that absurd sizes fail before anything is allocated.

Checking never converts values; callers normalise (e.g. ``float(alpha)``) after the check.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

__all__ = ["BOUND_KEYS", "check_fields", "check_kwargs", "check_value", "describe_type"]

#: Metadata keys read as bounds: ``min``/``max`` inclusive, ``gt``/``lt`` exclusive.
BOUND_KEYS = ("min", "max", "gt", "lt")

_REPR_LIMIT = 60


def check_fields(instance: Any, where: str) -> None:
    """Check every field of the dataclass `instance` against its annotation and metadata bounds.

    Args:
        instance: a dataclass instance (annotations may be strings, as under ``from __future__ import
            annotations``; they are resolved in the class's module).
        where: prefix of the field names in messages (``"options"`` gives ``options.merge: ...``); ``""`` for none.

    Raises:
        ValueError: a value does not fit its annotation or its bounds; the message names ``where.field``, says
            what was expected and shows the value with its type.
        TypeError: `instance` is not a dataclass instance, or an annotation is of a kind this module cannot check
            (a programming error, not bad input).
    """
    if not dataclasses.is_dataclass(instance) or isinstance(instance, type):
        raise TypeError(f"check_fields: expected a dataclass instance, got {type(instance).__name__}")
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        name = f"{where}.{field.name}" if where else field.name
        check_value(getattr(instance, field.name), hints.get(field.name, Any), name, field.metadata)


def check_kwargs(cls: type, values: typing.Mapping[str, Any], where: str) -> None:
    """Check the given constructor arguments of the dataclass `cls` before it is built.

    The same rules as `check_fields`, applied to the keys present in `values` that name fields of `cls` (other
    keys are left to the constructor, which names them). Useful when ``cls.__post_init__`` would otherwise meet a
    wrongly typed value first and fail with a confusing ``TypeError``.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"check_kwargs: expected a dataclass type, got {cls!r}")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in values:
            name = f"{where}.{field.name}" if where else field.name
            check_value(values[field.name], hints.get(field.name, Any), name, field.metadata)


def check_value(value: Any, annotation: Any, name: str, bounds: typing.Mapping[str, Any] | None = None) -> None:
    """Check one value against a type annotation and optional bounds; raise ValueError naming `name`."""
    if not _fits(value, annotation, name, bounds or {}):
        raise ValueError(f"{name}: expected {describe_type(annotation)}, got {_show(value)}")


def describe_type(annotation: Any) -> str:
    """An English description of an annotation: ``list[float] | None`` → ``a list of floats or None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return "any value"
    if annotation is type(None):
        return "None"
    if _is_union(origin):
        parts = [describe_type(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("None")
        return " or ".join(parts)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        item = args[0] if args else Any
        return f"a list of {_plural(item)}"
    if origin is dict:
        return "a dict (JSON object)"
    return _SINGULAR.get(annotation, f"a {getattr(annotation, '__name__', annotation)}")


# ---- internals ---------------------------------------------------------------------------------------------------
_SINGULAR = {bool: "a bool", int: "an int", float: "a finite number", str: "a string", dict: "a dict (JSON object)"}
_PLURAL = {bool: "bools", int: "ints", float: "finite numbers", str: "strings"}


def _plural(annotation: Any) -> str:
    if annotation in _PLURAL:
        return _PLURAL[annotation]
    return f"values ({describe_type(annotation)})"


def _is_union(origin: Any) -> bool:
    return origin is Union or origin is types.UnionType


def _fits(value: Any, annotation: Any, name: str, bounds: typing.Mapping[str, Any]) -> bool:
    """True when `value` fits; raises ValueError itself for a nested item or a bound (more precise message)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if _is_union(origin):
        if value is None:
            return type(None) in args
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # `X | None`: report X's own problem (an item, a bound) precisely
            return _fits(value, candidates[0], name, bounds)
        return any(_fits_quietly(value, a) for a in candidates) and _check_bounds(value, name, bounds)
    if origin is Literal:
        # `True == 1`: compare types as well, so Literal[1] does not admit True.
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        item = _item_annotation(annotation, origin, args)
        for i, element in enumerate(value):
            check_value(element, item, f"{name}[{i}]", bounds)
        return True
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            return False
        key_type, value_type = (args + (Any, Any))[:2] if args else (Any, Any)
        for key, element in value.items():
            if not _fits_quietly(key, key_type):
                raise ValueError(f"{name}: keys must be {describe_type(key_type)}, got {_show(key)}")
            check_value(element, value_type, f"{name}[{key!r}]")
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool) and _check_bounds(value, name, bounds)
    if annotation is float:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and _check_bounds(value, name, bounds)
        )
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    raise TypeError(f"check_fields: cannot check {name} against the annotation {annotation!r}")


def _fits_quietly(value: Any, annotation: Any) -> bool:
    try:
        return _fits(value, annotation, "", {})
    except ValueError:
        return False


def _item_annotation(annotation: Any, origin: Any, args: tuple) -> Any:
    if not args:
        return Any
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(set(args)) != 1:
            raise TypeError(f"check_fields: fixed-length tuples of mixed types are not supported ({annotation!r})")
    return args[0]


def _check_bounds(value: Any, name: str, bounds: typing.Mapping[str, Any]) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True  # bounds are about numbers; a list's items are checked one by one
    low, high = bounds.get("min"), bounds.get("max")
    above, below = bounds.get("gt"), bounds.get("lt")
    if low is not None and value < low:
        raise ValueError(f"{name}: must be >= {low}, got {_show(value)}")
    if above is not None and not value > above:
        raise ValueError(f"{name}: must be > {above}, got {_show(value)}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {_show(value)}")
    if below is not None and not value < below:
        raise ValueError(f"{name}: must be < {below}, got {_show(value)}")
    return True


def _show(value: Any) -> str:
    """``'false' (str)``: the value (shortened) and its type, so a look-alike such as ``'1'`` vs ``1`` is visible."""
    text = repr(value)
    if len(text) > _REPR_LIMIT:
        text = text[: _REPR_LIMIT - 3] + "..."
    return f"{text} ({type(value).__name__})"
