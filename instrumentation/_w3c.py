"""The W3C header values a trace carries between processes: ``traceparent`` and
``tracestate`` (Trace Context, levels 1 and 2) and ``baggage`` (W3C Baggage).

String work only (the core and the OpenTelemetry bridge read and write them through
here, the same way), none of it per span.
"""

from __future__ import annotations

import re

from instrumentation import telemetry

#: The trace-flags bits this library knows: ``sampled`` (level 1) and
#: ``random-trace-id`` (level 2). The others are reserved, and W3C asks that they be
#: sent as zero: a received one is not forwarded.
SAMPLED = 0x01
RANDOM_TRACE_ID = 0x02
KNOWN_FLAGS = SAMPLED | RANDOM_TRACE_ID

#: Longer ``traceparent`` values are refused (a later version may add fields, not
#: kilobytes); OpenTelemetry's propagator has the same limit.
MAX_TRACEPARENT_LENGTH = 512

# Version 00 is exactly its four fields. A higher version (never ``ff``) is read as
# 00 is, when the flags are followed by the end or by a '-' (its own fields, which
# are neither read nor forwarded).
_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL
)

#: tracestate: at most 32 members, each ``key=value`` (W3C Trace Context; the same
#: grammar as OpenTelemetry's ``TraceState``), empty members allowed.
MAX_TRACESTATE_MEMBERS = 32
MAX_TRACESTATE_LENGTH = 8192
_TRACESTATE_KEY = r"[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}"
_TRACESTATE_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_TRACESTATE_MEMBER = re.compile(f"({_TRACESTATE_KEY})=(?:{_TRACESTATE_VALUE})")

#: baggage: members ``key=value`` with ``;property`` metadata (W3C Baggage, RFC 7230
#: tokens, values of baggage-octets). W3C asks for at least 64 members and 8192
#: bytes; OpenTelemetry keeps up to 180 members within those bytes, and so do we.
MAX_BAGGAGE_MEMBERS = 180
MAX_BAGGAGE_LENGTH = 8192
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_BAGGAGE_VALUE = r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
_OWS = r"[ \t]*"
_BAGGAGE_MEMBER = re.compile(
    f"{_TOKEN}{_OWS}={_OWS}{_BAGGAGE_VALUE}"
    f"(?:{_OWS};{_OWS}{_TOKEN}(?:{_OWS}={_OWS}{_BAGGAGE_VALUE})?)*{_OWS}"
)
_MEMBER_SPLIT = re.compile(r"[ \t]*,[ \t]*")

#: Members of a received ``tracestate`` or ``baggage`` left out for not being W3C's.
ENTRIES_DROPPED = telemetry.counter("propagation.entries_dropped")


def format_traceparent(trace_id: str, span_hex: str, sampled: bool = True, flags: int = 0) -> str:
    """A version-00 ``traceparent``. ``flags``: the other trace-flags bits to send
    (those received with the trace, kept when it is forwarded; reserved bits are left
    out); the sampled bit is ``sampled``."""
    return f"00-{trace_id}-{span_hex}-{(flags & KNOWN_FLAGS & ~SAMPLED) | bool(sampled):02x}"


def read_traceparent(value: str) -> tuple[str, str, int]:
    """``(trace_id, span_hex, flags)`` from a W3C ``traceparent``; ``flags`` keeps the
    known bits (sampled, random-trace-id). Raises ValueError for what W3C says to ignore."""
    if not isinstance(value, str):
        raise TypeError(
            f"traceparent must be a string (the W3C header value) or None, "
            f"got {type(value).__name__}"
        )
    text = value.strip()
    if len(text) > MAX_TRACEPARENT_LENGTH:
        raise ValueError(
            f"traceparent is longer than {MAX_TRACEPARENT_LENGTH} characters: {value[:80]!r}..."
        )
    match = _TRACEPARENT.fullmatch(text)
    if match is None:
        raise ValueError(
            f"not a W3C traceparent (expected '00-<32 hex>-<16 hex>-<2 hex>', lowercase): {value!r}"
        )
    version, trace_id, span_hex, flags, rest = match.groups()
    if version == "ff":
        raise ValueError(f"traceparent version ff is invalid (W3C): {value!r}")
    if version == "00" and rest is not None:
        raise ValueError(
            f"a version-00 traceparent has exactly four fields, this one has more: {value!r}"
        )
    if trace_id == "0" * 32 or span_hex == "0" * 16:
        raise ValueError(f"traceparent has an all-zero trace or span id: {value!r}")
    return trace_id, span_hex, int(flags, 16) & KNOWN_FLAGS


def parse_traceparent(value: str) -> tuple[str, str, bool]:
    """``(trace_id, span_hex, sampled)`` from a W3C ``traceparent`` header value.

    Version 00 exactly; a higher version (not ``ff``) by its first four fields, as W3C
    asks. Raises ValueError for a value W3C says to ignore (malformed, uppercase hex,
    all-zero ids).
    """
    trace_id, span_hex, flags = read_traceparent(value)
    return trace_id, span_hex, bool(flags & SAMPLED)


def _header(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a string (the W3C {name} header value) or None, "
            f"got {type(value).__name__}: pass the header as received, or leave the key out"
        )
    return value.strip(" \t") or None


def read_tracestate(value: object) -> str | None:
    """The ``tracestate`` to keep: ``value`` as received when W3C's, else None.

    A malformed one is dropped whole (as OpenTelemetry does), and counted; it never
    makes the ``traceparent`` beside it refused (W3C). TypeError for a non-string.
    """
    text = _header("tracestate", value)
    if text is None:
        return None
    members = [m for m in _MEMBER_SPLIT.split(text) if m]
    keys = []
    for member in members:
        match = _TRACESTATE_MEMBER.fullmatch(member)
        if match is None:
            break
        keys.append(match.group(1))
    else:
        if (
            len(text) <= MAX_TRACESTATE_LENGTH
            and len(members) <= MAX_TRACESTATE_MEMBERS
            and len(set(keys)) == len(keys)
        ):
            return text if members else None
    ENTRIES_DROPPED.add(len(members))
    return None


def read_baggage(value: object) -> str | None:
    """The ``baggage`` to keep: ``value`` as received when W3C's; otherwise its
    well-formed members, within the limits (W3C lets a system remove the others;
    they are counted). TypeError for a non-string."""
    text = _header("baggage", value)
    if text is None:
        return None
    members = [m for m in _MEMBER_SPLIT.split(text) if m]
    kept = [m for m in members if _BAGGAGE_MEMBER.fullmatch(m)][:MAX_BAGGAGE_MEMBERS]
    if len(kept) == len(members) and len(text.encode()) <= MAX_BAGGAGE_LENGTH:
        return text if members else None
    out: list[str] = []
    length = -1
    for member in kept:
        length += 1 + len(member)
        if length > MAX_BAGGAGE_LENGTH:
            break
        out.append(member)
    ENTRIES_DROPPED.add(len(members) - len(out))
    return ",".join(out) or None


__all__ = [
    "ENTRIES_DROPPED",
    "KNOWN_FLAGS",
    "RANDOM_TRACE_ID",
    "SAMPLED",
    "format_traceparent",
    "parse_traceparent",
    "read_baggage",
    "read_traceparent",
    "read_tracestate",
]
