"""db-ally's how-to FileEventHandler, with only its imports changed, runs here.

The class is assembled from the how-to's snippets as written (the later snippet of
``event_end`` with ``event_context`` replaces the first stub, as the guide intends).
Its ``event_end`` subtracts an ISO string from a datetime: that ``TypeError`` must be
reported and survived, and the file must still get its output and be closed.
"""

from __future__ import annotations

import os

from instrumentation import telemetry

HOWTO_SOURCE = """
from instrumentation.audit import EventHandler, RequestStart, RequestEnd
from pathlib import Path
from datetime import datetime

class FileEventHandler(EventHandler):

    def __init__(self):
        self.log_dir = Path('logs')
        self.log_dir.mkdir(exist_ok=True)

    async def request_start(self, user_request: RequestStart):
        file_name = f'{datetime.now().isoformat()}.log'
        log_file = open(self.log_dir / file_name, 'w')
        log_file.write(f'Collection: {user_request.collection}\\n')
        log_file.write(f'Question: {user_request.question}\\n')

        return log_file

    async def event_start(self, event, request_context):
        event_time = datetime.now().isoformat()
        request_context.write(f'{event}\\n')
        return event_time

    async def event_end(self, event, request_context, event_context):
        end_time = datetime.now()
        elapsed_time = end_time - event_context
        request_context.write(f'Elapsed Time: {elapsed_time.microseconds} ms\\n')
        request_context.write(f'{event}\\n')

    async def request_end(self, output: RequestEnd, request_context):
        request_context.write(f'Output: {output.result}\\n')
        request_context.close()
"""


def test_howto_file_handler_runs_with_changed_imports(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(HOWTO_SOURCE, "howto.py", "exec"), namespace)
    handler = namespace["FileEventHandler"]()  # type: ignore[operator]

    from instrumentation import audit
    from instrumentation.llms import ChatMessage, OfflineLLM

    llm = OfflineLLM(answers={"pasta": "carbonara"})
    with audit.request(question="best pasta?", collection="recipes", handlers=[handler]) as req:
        req.result = llm.chat([ChatMessage(role="user", content="best pasta?")]).message.content

    files = os.listdir(tmp_path / "logs")
    assert len(files) == 1
    text = (tmp_path / "logs" / files[0]).read_text()
    assert text.startswith("Collection: recipes\nQuestion: best pasta?\n")
    assert "LLMEvent(prompt=({'role': 'user', 'content': 'best pasta?'},)" in text
    assert text.endswith("Output: carbonara\n")  # request_end ran and closed the file
    # The how-to's bug, reported rather than raised:
    assert [(e.method, type(e.error).__name__) for e in req.errors] == [("event_end", "TypeError")]
    assert telemetry.counter("audit.handler_errors").value == 1
