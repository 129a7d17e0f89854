"""What the interpreter's exit does before the exit flushes take what they hold.

``atexit`` runs its handlers last registered first: a hook an integration registered
when it was imported (``instrumentation.llms`` ends the streams still open) ran after
the exit flush of a store's writer or an exporter made later, and what it emitted then
found them shut down. Such a hook registers here instead (:func:`before_exit_flush`),
and every exit flush runs the hooks first (:func:`run_exit_hooks`): the storage
writers', the OpenTelemetry export's, the audit's last wait and the dispatcher tree's
last drain, whichever of them ``atexit`` runs first. A hook does its work once and
finds none left when run again.

Only ``atexit`` runs them, once the non-daemon threads are joined: before that, a
thread may still be using what a hook would end. The core imports no integration:
integrations register here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from instrumentation import telemetry

logger = logging.getLogger("instrumentation")

_HOOK_ERRORS = telemetry.counter("exit.hook_errors")

_hooks: list[Callable[[], object]] = []


def before_exit_flush(hook: Callable[[], object]) -> None:
    """Have ``hook`` run at the interpreter's exit, before any exit flush."""
    _hooks.append(hook)


def run_exit_hooks() -> None:
    """Run the hooks (each exit flush calls this first); one that fails is logged and
    counted in ``exit.hook_errors``, and the others and the flush go on."""
    for hook in tuple(_hooks):
        try:
            hook()
        except Exception:
            _HOOK_ERRORS.inc()
            logger.exception("instrumentation: an exit hook (%r) failed", hook)


__all__ = ["before_exit_flush", "run_exit_hooks"]
