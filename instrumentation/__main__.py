"""``python -m instrumentation`` (and the ``instrumentation`` console script): the trace CLI.

See :mod:`instrumentation.storage.cli`.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    # The arguments are read before storage is imported: ``--help`` and a mistyped
    # argument take no time to answer. Only a command that runs loads the stores.
    from instrumentation._cli_args import parse_arguments

    args = parse_arguments(argv)
    from instrumentation.storage.cli import run

    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
