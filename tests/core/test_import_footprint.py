"""What importing the library loads: not what only some programs use.

``import instrumentation`` took 0.3 s, a third more than LlamaIndex's own module, for
short scripts and command lines: asyncio (with ``ssl`` and ``subprocess``) for programs
without an event loop, the handlers nobody had asked for, and, for storage, the LLM
events. Each check runs in a fresh interpreter, and counts only what the library adds
to what pydantic (and, for ``instrumentation.otel``, the OpenTelemetry SDK) loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Prints, as JSON, the modules ``import {module}`` loaded beyond ``{floor}``.
_LOADED_BY = """
import json, sys
import pydantic
class _Built(pydantic.BaseModel):
    a: int
{floor}
floor = set(sys.modules)
import {module}
print(json.dumps(sorted(set(sys.modules) - floor)))
"""

_OTEL_SDK = (
    "import opentelemetry.sdk.trace.export, opentelemetry.sdk.resources, "
    "opentelemetry.baggage.propagation"
)

#: What only some programs use: an event loop, a misspelt option's suggestion, threads
#: that carry the context, the handlers and spans the core does not use.
_NOT_AT_IMPORT = (
    "asyncio",
    "ssl",
    "subprocess",
    "concurrent.futures",
    "difflib",
    "sqlite3",
    "instrumentation.event_handlers.null",
    "instrumentation.span.simple",
    "instrumentation.span_handlers.null",
    "instrumentation.span_handlers.simple",
    "instrumentation.threads",
    "instrumentation.tree",
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def _output(code: str) -> str:
    done = _run(code)
    assert done.returncode == 0, done.stderr
    return done.stdout


def loaded_by(module: str, floor: str = "") -> set[str]:
    return set(json.loads(_output(_LOADED_BY.format(module=module, floor=floor))))


@pytest.mark.parametrize(
    ("module", "floor", "not_loaded"),
    [
        ("instrumentation", "", _NOT_AT_IMPORT),
        ("instrumentation.storage", "", ("asyncio", "ssl", "instrumentation.events.llm")),
        ("instrumentation.llms", "", ("asyncio", "ssl", "difflib")),
        ("instrumentation.otel", _OTEL_SDK, ("asyncio", "ssl", "difflib")),
    ],
)
def test_importing_loads_only_what_every_program_uses(
    module: str, floor: str, not_loaded: tuple[str, ...]
) -> None:
    loaded = loaded_by(module, floor)
    assert module in loaded  # the floor did not load it already
    assert sorted(loaded.intersection(not_loaded)) == []


def test_names_imported_at_first_use_read_as_they_did() -> None:
    """``dir()``, submodules the package's import used to load, and Python's "Did you
    mean" for a misspelt name are as they were before those names waited."""
    out = _output(
        textwrap.dedent(
            """
            import instrumentation
            from instrumentation import span_handlers

            print("SimpleSpanHandler" in dir(instrumentation))
            print("NullSpanHandler" in dir(span_handlers))
            print(instrumentation.tree.__name__, span_handlers.simple.__name__)
            print(instrumentation.SimpleSpanHandler is span_handlers.simple.SimpleSpanHandler)
            """
        )
    )
    assert out.splitlines() == [
        "True",
        "True",
        "instrumentation.tree instrumentation.span_handlers.simple",
        "True",
    ]
    misspelt = _run("import instrumentation\ninstrumentation.SimpleSpanHandlr")
    assert misspelt.stderr.splitlines()[-1] == (
        "AttributeError: module 'instrumentation' has no attribute 'SimpleSpanHandlr'. "
        "Did you mean: 'SimpleSpanHandler'?"
    )


def test_asyncio_imported_after_the_library_is_seen() -> None:
    """asyncio is looked up when it is needed: imported after the library (as most
    programs do), its futures are awaited in their call's span, its running loop tells
    an ``aclose()`` apart, and a ``CancelledError`` out of a handler is the handler's."""
    out = _output(
        textwrap.dedent(
            """
            import sys
            import instrumentation
            from instrumentation import SimpleSpanHandler, get_dispatcher, telemetry
            from instrumentation.span_handlers.null import NullSpanHandler
            assert "asyncio" not in sys.modules
            import asyncio

            class Cancelling(NullSpanHandler):
                def span_enter(self, *args, **kwargs):
                    raise asyncio.CancelledError()

            spans = SimpleSpanHandler()
            instrumentation.root_dispatcher.add_span_handler(spans)
            instrumentation.root_dispatcher.add_span_handler(Cancelling())
            d = get_dispatcher("late.asyncio")

            @d.span
            def returns_future(loop):
                return loop.create_future()

            @d.span
            async def stream():
                async with d.span("block"):
                    yield 1
                    yield 2

            async def main():
                future = returns_future(asyncio.get_running_loop())
                print(len(spans.completed_spans))  # open until the future is done
                future.set_result(1)
                await future
                await asyncio.sleep(0)
                print(len(spans.completed_spans))
                gen = stream()
                await gen.__anext__()
                await gen.aclose()

            asyncio.run(main())
            print(sorted(s.name.split(".")[-1] for s in spans.completed_spans))
            print(sorted(s.name.split(".")[-1] for s in spans.dropped_spans))
            print(telemetry.handler_errors())
            """
        )
    )
    assert out.splitlines() == [
        "0",
        "1",
        "['returns_future']",
        "['block', 'stream']",  # closed before their end: dropped
        "{'Cancelling': 3}",
    ]
