"""Daemon worker threads started ahead of need, taking work until the process ends.

Two integrations need threads when Python may refuse to make them: the audit loop
runs plain ``def`` handler methods during interpreter exit, when every
``ThreadPoolExecutor`` refuses new work ("cannot schedule new futures after
interpreter shutdown"), and the OTLP exit flush runs where CPython 3.12.0-3.12.2
refuse to start a thread at all. So the threads start with the pool, are daemons
(how long an exit waits is its caller's bound, never a stuck call's doing), and
stop only when :meth:`ThreadPool.shutdown` asks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class ThreadPool(Executor):
    """``workers`` daemon threads running submitted calls in order of submission."""

    def __init__(self, workers: int, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._work, name=f"{name}_{index}", daemon=True)
            for index in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        self._calls.put(_Call(future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the threads once the calls already submitted have run."""
        for _ in self.threads:
            self._calls.put(None)
        if wait:
            for thread in self.threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            call.run()
            del call  # its result and arguments are not kept alive while idle


class _Call:
    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(
        self,
        future: Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # the caller's to report: it is in the future
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


__all__ = ["ThreadPool"]
