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
from collections import deque
from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from instrumentation._classcache import lives_for_good, remember

#: Types holding nothing pydantic reads out, known at once (most values are of these);
#: those found so (an enum, a chat message's role) are added once, unless made at run
#: time (kept here, such a class would live for good), up to :data:`_MORE_LEAVES`.
_leaves = {str, int, float, bool, type(None), bytes, datetime, date, time, timedelta, UUID, Decimal}
_MORE_LEAVES = 1024
#: How :func:`holds_an_iterator` looks into a value of a type, by ``id(type)`` (see
#: ``remember``): worked out once per type.
_LEAF, _MAPPING, _SEQUENCE, _DATACLASS, _ITERATOR, _MODEL, _COMPUTING = range(7)
_ways: dict[int, int] = {}
#: Containers a model's field often holds empty, not walked then.
_EMPTIABLE = frozenset({list, dict})
#: Past this many values looked into (text and numbers are not), the walk stops and
#: answers True: the caller then takes the way that reads out nothing (a value that
#: holds itself is never walked to its end).
MAX_VALUES = 100_000


def holds_an_iterator(value: Any, exclude: Mapping[str, Any] | None = None) -> bool:
    """Whether pydantic, writing ``value`` as JSON, could read out an iterator in it: in
    a model's fields (and extra and computed fields) but those ``exclude`` leaves out
    (as pydantic's ``exclude`` does), a dataclass's fields, and the values of the
    dicts, lists, tuples, sets and deques among them, at any depth. True too past
    :data:`MAX_VALUES` values looked into, without walking on.

    A field's value is looked at whatever the field declares: pydantic writes one
    assigned past validation (``model_construct``, assignment without
    ``validate_assignment``) as it finds it, and a model's subclass with its own
    fields (``SerializeAsAny``, ``polymorphic_serialization``)."""
    stack = _included(value, exclude) if exclude else [value]
    left = MAX_VALUES
    leaves = _leaves
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in leaves:
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
        way = _way_of(kind)
        if way == _MODEL:
            for field in item.__dict__.values():
                # Not text, a number or None, nor an empty list or dict (most are).
                # Only those are asked for their truth: an array's raises.
                held = type(field)
                if held not in leaves and (held not in _EMPTIABLE or field):
                    stack.append(field)
            if item.__pydantic_extra__:
                stack.extend(item.__pydantic_extra__.values())
        elif way == _MAPPING:
            stack.extend(item.values())
        elif way == _SEQUENCE:
            stack.extend(item)
        elif way == _DATACLASS:
            stack.extend(getattr(item, f.name, None) for f in dataclasses.fields(item))
        elif way == _COMPUTING:
            stack.extend(_model_values(item))
        elif way == _ITERATOR:
            return True
    return False


def _way_of(kind: type) -> int:
    try:
        return _ways[id(kind)]
    except KeyError:
        way = _way_into(kind)
        if way == _LEAF and len(_leaves) < _MORE_LEAVES and lives_for_good(kind):
            _leaves.add(kind)
        return remember(_ways, kind, way)


def _included(model: Any, exclude: Mapping[str, Any]) -> list[Any]:
    """The field values of ``model`` (a model) that ``exclude`` does not leave out whole,
    those of a nested model it names (``{"response": {"message": True}}``) looked at
    the same way: a streamed chunk's event leaves out the messages, which are long."""
    if _way_of(type(model)) != _MODEL:
        return [model]
    found: list[Any] = []
    for name, field in model.__dict__.items():
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


def _way_into(kind: type) -> int:
    if issubclass(kind, dict):
        return _MAPPING
    if issubclass(kind, (list, tuple, set, frozenset, deque)):
        return _SEQUENCE
    if issubclass(kind, BaseModel):
        return _COMPUTING if kind.model_computed_fields else _MODEL
    if dataclasses.is_dataclass(kind):
        return _DATACLASS
    if hasattr(kind, "__next__"):
        return _ITERATOR
    return _LEAF


def _model_values(model: BaseModel) -> list[Any]:
    """What pydantic writes of ``model``: its fields, extra fields and computed fields
    (each computed as pydantic will; one that raises is left to pydantic's dump)."""
    values = list(model.__dict__.values())
    values.extend((model.__pydantic_extra__ or {}).values())
    for name in type(model).model_computed_fields:
        try:
            values.append(getattr(model, name))
        except Exception:
            pass
    return values


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
    except BaseException as exc:
        _raise_if_panic(exc)
        raise


def dump(model: BaseModel, **options: Any) -> Any:
    """``model.model_dump(**options)`` warning of nothing, in Python mode rather than
    JSON mode (``mode="json"``) when ``model`` holds an iterator: JSON mode would read
    it out, Python mode leaves it as it is. ``RuntimeError`` for a panic of
    pydantic-core."""
    if options.get("mode") == "json" and holds_an_iterator(model, options.get("exclude")):
        options = {**options, "mode": "python"}
    try:
        return model.model_dump(**options, warnings=False)
    except BaseException as exc:
        _raise_if_panic(exc)
        raise


def _raise_if_panic(exc: BaseException) -> None:
    """A ``RuntimeError`` in place of pyo3's ``PanicException`` (a ``BaseException``,
    whose module is not importable); anything else is the caller's to raise."""
    if type(exc).__name__ == "PanicException":
        raise RuntimeError(f"pydantic-core panicked: {exc}") from exc


__all__ = ["MAX_VALUES", "dump", "dump_json", "holds_an_iterator"]
