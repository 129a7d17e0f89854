"""Database addresses as they may be shown: without the password.

Error messages and the command line name the database they could not open, and
those lines end up in terminals, CI logs and bug reports. A PostgreSQL DSN may hold
a password (``postgresql://app:secret@db/traces``, ``password=secret`` in key-value
form, or ``?password=secret``; ``sslpassword``, the passphrase of a client key, as
well); it is shown as ``***``.
"""

from __future__ import annotations

import re

_KEY_VALUE = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&#]*)", re.IGNORECASE)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)$", re.DOTALL)


def redacted(address: str) -> str:
    """``address`` with any password in it replaced by ``***``."""
    match = _URL.match(address)
    if match is None:
        return _KEY_VALUE.sub(r"\1***", address)
    scheme, netloc, rest = match.groups()
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = userinfo.split(":", 1)[0] + ":***@" + host
    return scheme + netloc + _KEY_VALUE.sub(r"\1***", rest)


__all__: list[str] = []
