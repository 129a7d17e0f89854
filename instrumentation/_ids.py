"""Cheap identifiers of W3C sizes.

Every traced call needs a span id, and every root span and event a 128-bit id.
``uuid.uuid4()`` costs about a microsecond and reads the OS entropy pool, and even
``hex()`` of a fresh random number costs a third of a microsecond, mostly in making
strings. Ids need to be unique, not secret, so they are made in batches from a
private Mersenne Twister's bytes (hex-encoded and split in C), and handed out by
``list.pop``.

A forked child empties the pools and re-seeds, so that it never hands out an id its
parent also holds. Span ids are 64 bits and trace ids 128 bits, as in W3C Trace
Context; none is all zeros.
"""

from __future__ import annotations

import os
import random

_rng = random.Random()

#: How many ids one refill makes: enough to make the per-id cost of the refill small,
#: few enough that the pools stay a few tens of kilobytes.
BATCH = 512

_SPAN_BYTES = 8
_TRACE_BYTES = 16

# The pools are never replaced, only emptied and refilled, so that the hot paths can
# keep their bound ``pop`` methods.
span_hexes: list[str] = []
trace_hexes: list[str] = []
pop_span_hex = span_hexes.pop
pop_trace_hex = trace_hexes.pop


def _refill(pool: list[str], size: int) -> str:
    # bytes.hex puts a space between ids and str.split cuts there: both in C.
    ids = _rng.randbytes(size * BATCH).hex(" ", size).split()
    zero = "00" * size
    while zero in ids:  # one chance in 2**64 per span id
        ids.remove(zero)
    # The id handed out comes from the new batch, not the pool: other threads may
    # empty the pool between the two steps.
    mine = ids.pop()
    pool.extend(ids)
    return mine


def refill_span_hex() -> str:
    """Refill the span id pool and take one id (the hot path's fallback)."""
    return _refill(span_hexes, _SPAN_BYTES)


def refill_trace_hex() -> str:
    """Refill the trace id pool and take one id (the hot path's fallback)."""
    return _refill(trace_hexes, _TRACE_BYTES)


def new_span_hex() -> str:
    """A random, non-zero 64-bit id as 16 lowercase hex digits."""
    try:
        return pop_span_hex()
    except IndexError:
        return refill_span_hex()


def new_trace_id() -> str:
    """A random, non-zero 128-bit id as 32 lowercase hex digits."""
    try:
        return pop_trace_hex()
    except IndexError:
        return refill_trace_hex()


#: Event ids are trace-sized (what ``uuid.UUID(hex=...)`` accepts).
new_event_id = new_trace_id


def _after_fork_in_child() -> None:
    span_hexes.clear()
    trace_hexes.clear()
    _rng.seed()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = [
    "BATCH",
    "new_event_id",
    "new_span_hex",
    "new_trace_id",
    "pop_span_hex",
    "pop_trace_hex",
    "refill_span_hex",
    "refill_trace_hex",
]
