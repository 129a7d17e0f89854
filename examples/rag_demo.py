"""A small retrieval-and-answer app on OfflineLLM, printing its trace tree with tokens.

Run it with ``make demo`` (or ``python examples/rag_demo.py``). Nothing leaves the
machine: the LLM is :class:`~instrumentation.llms.OfflineLLM`. The app is three
traced steps - ``retrieve`` (keyword search over a few documents), ``answer`` (one
chat call with the retrieved context) and ``answer_streaming`` (the same, streamed) -
and the demo attaches two handlers to the root dispatcher: a ``SimpleSpanHandler``
for the tree, and a handler collecting the LLM end events for the token counts.

Import it to reuse the pieces: ``build_app()`` makes the app, ``run_demo()`` runs the
questions with any extra handlers and returns what it printed.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from instrumentation import (
    BaseEventHandler,
    BaseSpanHandler,
    SimpleSpanHandler,
    get_dispatcher,
    root_dispatcher,
)
from instrumentation.events.base import BaseEvent
from instrumentation.llms import (
    LLM_END_EVENTS,
    ChatMessage,
    MessageRole,
    OfflineLLM,
)
from instrumentation.span.simple import SimpleSpan
from instrumentation.tree import draw_tree, fitted_stream, format_duration

dispatcher = get_dispatcher("examples.rag_demo")

DOCUMENTS: dict[str, str] = {
    "paris": "Paris is the capital of France and sits on the Seine.",
    "tokens": "A token is a piece of a word; LLM providers bill per token.",
    "spans": "A span records one step of a program: its start, end, parent and result.",
    "seine": "The Seine flows through Paris into the English Channel.",
}

ANSWERS: dict[str, str] = {
    "capital": "The capital of France is Paris, on the Seine.",
    "span": "A span is one traced step of a program, with a start, an end and a parent.",
}

QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "What is a span?",
)

_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2}


@dataclass
class RagApp:
    """Documents, an LLM, and the traced steps that answer questions with them."""

    llm: OfflineLLM
    documents: dict[str, str] = field(default_factory=lambda: dict(DOCUMENTS))
    top_k: int = 2

    @dispatcher.span
    def retrieve(self, question: str) -> list[str]:
        """The ``top_k`` documents sharing the most words with ``question``."""
        wanted = _words(question)
        scored = sorted(
            ((len(wanted & _words(text)), name) for name, text in self.documents.items()),
            reverse=True,
        )
        return [self.documents[name] for score, name in scored[: self.top_k] if score > 0]

    def _messages(self, question: str, context: Sequence[str]) -> list[ChatMessage]:
        return [
            ChatMessage(
                role=MessageRole.SYSTEM,
                content="Answer from the context.\nContext:\n" + "\n".join(context),
            ),
            ChatMessage(role=MessageRole.USER, content=question),
        ]

    @dispatcher.span
    def answer(self, question: str) -> str:
        """Retrieve, then ask the LLM in one call."""
        context = self.retrieve(question)
        return self.llm.chat(self._messages(question, context)).message.content or ""

    @dispatcher.span
    def answer_streaming(self, question: str, out: TextIO) -> str:
        """Retrieve, then stream the LLM's answer to ``out`` chunk by chunk."""
        context = self.retrieve(question)
        parts: list[str] = []
        for chunk in self.llm.stream_chat(self._messages(question, context)):
            parts.append(chunk.delta or "")
            out.write(chunk.delta or "")
        out.write("\n")
        return "".join(parts)


class LLMEndCollector(BaseEventHandler):
    """Keeps every LLM end event, by the id of the span it belongs to."""

    by_span: dict[str, list[BaseEvent]] = {}

    def model_post_init(self, __context: Any) -> None:
        self.by_span = {}

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, LLM_END_EVENTS) and event.span_id is not None:
            self.by_span.setdefault(event.span_id, []).append(event)


def build_app(llm: OfflineLLM | None = None) -> RagApp:
    """The demo app on an OfflineLLM with canned answers (or on ``llm``)."""
    if llm is None:
        llm = OfflineLLM(
            model="offline-rag",
            answers=ANSWERS,
            words_per_chunk=2,
            latency_s=0.02,
            chunk_delay_s=0.005,
        )
    return RagApp(llm=llm)


def format_trace(spans: Iterable[SimpleSpan], collector: LLMEndCollector) -> str:
    """The span tree, each LLM call labelled with its tokens (``~`` marks an estimate)."""

    def label(span: SimpleSpan) -> str:
        text = f"{span.name}  {format_duration(span.duration if span.end_time else None)}"
        for event in collector.by_span.get(span.id_, []):
            usage = getattr(event, "usage", None)
            if usage is not None:
                mark = "~" if usage.estimated else ""
                text += (
                    f"  [{getattr(event, 'model', None)}: {mark}{usage.prompt_tokens} in"
                    f" + {mark}{usage.completion_tokens} out = {usage.total_tokens} tokens]"
                )
        if span.metadata and span.metadata.get("error"):
            text += f"  ✗ {span.metadata['error']}"
        return text

    return draw_tree(spans, lambda s: s.id_, lambda s: s.parent_id, label, lambda s: s.start_time)


def run_demo(
    app: RagApp | None = None,
    *,
    out: TextIO | None = None,
    span_handlers: Iterable[BaseSpanHandler[Any]] = (),
    event_handlers: Iterable[BaseEventHandler] = (),
) -> str:
    """Answer the demo questions (the last one streamed), print the trace tree, return it.

    ``span_handlers``/``event_handlers`` are attached to the root for the run, beside
    the demo's own (e.g. a storage handler); all of them are detached afterwards.
    """
    out = fitted_stream(out or sys.stdout)  # ASCII look-alikes where the output lacks ├
    app = app or build_app()
    spans = SimpleSpanHandler()
    collector = LLMEndCollector()
    extra_spans, extra_events = list(span_handlers), list(event_handlers)
    root_dispatcher.add_span_handler(spans)
    root_dispatcher.add_event_handler(collector)
    for sh in extra_spans:
        root_dispatcher.add_span_handler(sh)
    for eh in extra_events:
        root_dispatcher.add_event_handler(eh)
    try:
        for question in QUESTIONS[:-1]:
            out.write(f"Q: {question}\nA: {app.answer(question)}\n")
        out.write(f"Q: {QUESTIONS[-1]}\nA (streamed): ")
        app.answer_streaming(QUESTIONS[-1], out)
    finally:
        root_dispatcher.remove_span_handler(spans)
        root_dispatcher.remove_event_handler(collector)
        for sh in extra_spans:
            root_dispatcher.remove_span_handler(sh)
        for eh in extra_events:
            root_dispatcher.remove_event_handler(eh)
    tree = format_trace(spans.spans_by_start(), collector)
    total = sum(
        e.usage.total_tokens  # type: ignore[attr-defined]
        for events in collector.by_span.values()
        for e in events
        if getattr(e, "usage", None) is not None
    )
    out.write(f"\nTrace:\n{tree}\n\nLLM calls: {len(collector.by_span)}, tokens: {total}\n")
    return tree


def _python() -> str:
    """How to name this interpreter from here (``.venv/bin/python`` under ``make demo``)."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo, record it into SQLite, and print the traces read back from the file."""
    import argparse

    from instrumentation import storage

    parser = argparse.ArgumentParser(description="Retrieval-and-answer demo on OfflineLLM.")
    parser.add_argument("--db", default="demo-traces.db", help="SQLite file to record into")
    parser.add_argument("--no-store", action="store_true", help="only print, record nothing")
    args = parser.parse_args(argv)
    if args.no_store:
        run_demo()
        return 0
    with storage.SQLiteStore(args.db) as store:
        recorder = storage.StorageHandler(store=store, metadata={"application": "rag_demo"})
        try:
            run_demo(span_handlers=[recorder], event_handlers=[recorder])
        finally:
            recorder.shutdown()
        read_back = storage.format_traces(store, limit=10)
        fitted_stream(sys.stdout).write(
            f"\nRead back from {args.db}:\n{read_back}\n\n{more_commands(args.db)}"
        )
    return 0


def more_commands(db: str) -> str:
    """What to run next, one command a line, each ready to paste into a shell."""
    cli = f"{shlex.quote(_python())} -m instrumentation --db {shlex.quote(db)}"
    commands = [
        ("list", "one line per trace"),
        ("show latest --events", "the newest trace's tree, with its events"),
        ("export --limit 1", "the newest trace as one JSON line"),
        ("tail", "traces as they finish (Ctrl-C stops)"),
    ]
    # What each does on a line of its own: a trailing "# ..." is a comment in bash, but
    # more words of the command in zsh (macOS's shell) unless interactivecomments is on.
    lines = [f"  {what}:\n    {cli} {command}" for command, what in commands]
    return "More, each a command to run:\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
