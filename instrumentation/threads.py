"""Threads and executors that carry the current span and tags with them.

A plain ``threading.Thread`` starts with an empty context, so spans started in it
become roots of new traces. These start from a copy of the creator's context.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from typing_extensions import ParamSpec

P = ParamSpec("P")
R = TypeVar("R")


class Thread(threading.Thread):
    """A ``threading.Thread`` whose target runs in a copy of the creator's context."""

    def __init__(
        self,
        group: None = None,
        target: Callable[..., object] | None = None,
        name: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        daemon: bool | None = None,
    ) -> None:
        context = contextvars.copy_context()
        run_target: Callable[..., object] | None = None
        if target is not None:
            bound_target = target

            def run_target(*a: Any, **k: Any) -> object:
                return context.run(bound_target, *a, **k)

        super().__init__(
            group=group, target=run_target, name=name, args=args, kwargs=kwargs, daemon=daemon
        )


class ContextThreadPoolExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` that runs each task in a copy of the submitter's context."""

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        context = contextvars.copy_context()
        return super().submit(context.run, fn, *args, **kwargs)  # type: ignore[arg-type]


__all__ = ["ContextThreadPoolExecutor", "Thread"]
