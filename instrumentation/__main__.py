"""``python -m instrumentation`` (and the ``instrumentation`` console script): the trace CLI.

See :mod:`instrumentation.storage.cli`.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from instrumentation.storage.cli import main as storage_main

    return storage_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
