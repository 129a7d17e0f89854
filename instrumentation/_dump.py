"""Pydantic's serialisation of the application's models, made safe to run on them.

Three ways it harmed what it was given:

- In JSON mode, pydantic-core writes an iterator (a generator, ``iter(...)``, an open
  file, the ``ValidatorIterator`` of a field typed ``Iterable[...]``) as the list of what
  it yields: it reads it out. The storage writer did so on its own thread, racing the
  application for the items, and an event holding an open file had the file read to
  its end. :func:`dump_json` refuses such a model (``ValueError``), and :func:`dump`
  dumps it in Python mode, which leaves iterators as they are, untouched.
- A container changed while pydantic-core reads it (by another thread, in the moment
  a field serialiser, an enum's ``value`` or a ``fallback`` runs Python code) makes it
  panic: ``pyo3_runtime.PanicException`` derives from ``BaseException``, so no
  ``except Exception`` caught it; it stopped the storage writer thread for good, and
  reached the application from the OpenTelemetry handler. Both functions raise it as
  a ``RuntimeError``.
- A field holding what its type does not say (assigned after the model was made, an
  OpenAI-compatible server's reply of another shape) made pydantic warn, from the
  storage writer's thread onto the application's stderr; where warnings are errors
  (``-W error``, pytest's ``filterwarnings = error``) the warning was raised, and the
  storage stored a marker for the value, OpenTelemetry the model's ``str``. Both
  functions ask for no warning: such a value is written as it is.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections import deque
from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, Union
from uuid import UUID

from pydantic import BaseModel

from instrumentation._classcache import remember

#: Types holding nothing pydantic reads out, known at once (most values are of these).
_LEAVES = frozenset(
    {str, int, float, bool, type(None), bytes, datetime, date, time, timedelta, UUID, Decimal}
)
#: How :func:`holds_an_iterator` looks into a value of a type, by ``id(type)`` (see
#: ``remember``): worked out once per type. A model's way is the tuple of its fields
#: that may hold an iterator (see :func:`_open_fields`).
_LEAF, _MAPPING, _SEQUENCE, _DATACLASS, _ITERATOR = range(5)
_ways: dict[int, int | tuple[str, ...]] = {}
#: Containers a model's field often holds empty, not walked then.
_EMPTIABLE = frozenset({list, dict})
#: Past this many values looked into (text and numbers are not), the walk stops and
#: answers True: the caller then takes the way that reads out nothing (a value that
#: holds itself is never walked to its end).
MAX_VALUES = 100_000


def holds_an_iterator(value: Any, exclude: Mapping[str, Any] | None = None) -> bool:
    """Whether pydantic, writing ``value`` as JSON, could read out an iterator in it: in
    a model's fields (and extra fields) but those ``exclude`` leaves out (as pydantic's
    ``exclude`` does), a dataclass's fields, and the values of the dicts, lists,
    tuples, sets and deques among them, at any depth. True too past
    :data:`MAX_VALUES` values looked into, without walking on."""
    stack = _included(value, exclude) if exclude else [value]
    left = MAX_VALUES
    ways = _ways
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _LEAVES:
            continue
        left -= 1
        if left < 0:
            return True
        if kind is dict:
            stack.extend(item.values())
            continue
        if kind is list:
            stack.extend(item)
            continue
        try:
            way = ways[id(kind)]
        except KeyError:
            way = remember(ways, kind, _way_into(kind))
        if way == _LEAF:
            continue
        if type(way) is tuple:  # a model: the fields that may hold one
            values = item.__dict__
            for name in way:
                field = values.get(name)
                # Not None, nor an empty list or dict (most are). Only those are
                # asked for their truth: an array's raises.
                if field is not None and (type(field) not in _EMPTIABLE or field):
                    stack.append(field)
            if item.__pydantic_extra__:
                stack.extend(item.__pydantic_extra__.values())
        elif way == _MAPPING:
            stack.extend(item.values())
        elif way == _SEQUENCE:
            stack.extend(item)
        elif way == _DATACLASS:
            stack.extend(getattr(item, f.name, None) for f in dataclasses.fields(item))
        else:
            return True
    return False


def _included(model: Any, exclude: Mapping[str, Any]) -> list[Any]:
    """The field values of ``model`` (a model) that ``exclude`` does not leave out whole,
    those of a nested model it names (``{"response": {"message": True}}``) looked at
    the same way: a streamed chunk's event leaves out the messages, which are long."""
    kind = type(model)
    try:
        way = _ways[id(kind)]
    except KeyError:
        way = remember(_ways, kind, _way_into(kind))
    if type(way) is not tuple:
        return [model]
    values = model.__dict__
    found: list[Any] = []
    for name in way:
        field = values.get(name)
        if field is None or (type(field) in _EMPTIABLE and not field):
            continue
        inner = exclude.get(name)
        if inner is None:
            found.append(field)
        elif type(inner) is dict:
            found.extend(_included(field, inner))
    extra = model.__pydantic_extra__
    if extra:
        found.extend(extra.values())
    return found


def _way_into(kind: type) -> int | tuple[str, ...]:
    if issubclass(kind, dict):
        return _MAPPING
    if issubclass(kind, (list, tuple, set, frozenset, deque)):
        return _SEQUENCE
    if issubclass(kind, BaseModel):
        return _open_fields(kind)
    if dataclasses.is_dataclass(kind):
        return _DATACLASS
    if hasattr(kind, "__next__"):
        return _ITERATOR
    return _LEAF


#: Declared types whose validated values hold no iterator.
_CLOSED = (str, int, float, bool, bytes, date, time, timedelta, UUID, Decimal, enum.Enum)
_UNIONS = (Union, types.UnionType)


def _open_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``model`` whose declared type may hold an iterator: not those of
    text, numbers, times, enums, literals, or models of such fields only (a chat
    message's role and content, an event's ids, times and token counts), which the
    walk skips. A value assigned past validation (``model_construct``, or assignment
    without ``validate_assignment``) is taken to be what its field declares."""
    return tuple(
        name for name, info in model.model_fields.items() if not _closed(info.annotation, {model})
    )


def _closed(annotation: Any, seen: set[type]) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _closed(typing.get_args(annotation)[0], seen)
    if origin is Literal or annotation is None or annotation is type(None):
        return True
    if origin in _UNIONS:
        return all(_closed(arg, seen) for arg in typing.get_args(annotation))
    if not isinstance(annotation, type) or origin is not None:
        return False  # Any, containers, type variables, forward references
    if issubclass(annotation, _CLOSED):
        return True
    if issubclass(annotation, BaseModel) and annotation not in seen:
        if annotation.model_config.get("extra") == "allow":
            return False
        inner = seen | {annotation}
        return all(_closed(info.annotation, inner) for info in annotation.model_fields.values())
    return False


def dump_json(
    model: BaseModel, exclude: Mapping[str, Any] | None, fallback: Callable[[Any], Any]
) -> str:
    """``model.model_dump_json(exclude=exclude, fallback=fallback)`` warning of nothing;
    ``ValueError`` rather than read out an iterator ``model`` holds, ``RuntimeError``
    for a panic of pydantic-core (see the module docstring)."""
    if holds_an_iterator(model, exclude):
        raise ValueError(f"{type(model).__qualname__} holds an iterator, which JSON reads out")
    try:
        return model.model_dump_json(exclude=exclude, fallback=fallback, warnings=False)
    except Exception:
        raise
    except BaseException as exc:
        if not _is_panic(exc):  # SystemExit, KeyboardInterrupt
            raise
        raise RuntimeError(f"pydantic-core panicked: {exc}") from exc


def dump(model: BaseModel, **options: Any) -> Any:
    """``model.model_dump(**options)`` warning of nothing, in Python mode rather than
    JSON mode (``mode="json"``) when ``model`` holds an iterator: JSON mode would read
    it out, Python mode leaves it as it is. ``RuntimeError`` for a panic of
    pydantic-core."""
    if options.get("mode") == "json" and holds_an_iterator(model, options.get("exclude")):
        options = {**options, "mode": "python"}
    try:
        return model.model_dump(**options, warnings=False)
    except Exception:
        raise
    except BaseException as exc:
        if not _is_panic(exc):  # SystemExit, KeyboardInterrupt
            raise
        raise RuntimeError(f"pydantic-core panicked: {exc}") from exc


def _is_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is pyo3's ``PanicException`` (its module is not importable)."""
    return type(exc).__name__ == "PanicException"


__all__ = ["MAX_VALUES", "dump", "dump_json", "holds_an_iterator"]
