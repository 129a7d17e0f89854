"""docs/audit.md: its typed handler is the example file's, and its typed code passes
``mypy --strict`` (tests/test_docs.py runs every block)."""

from __future__ import annotations

import re
from pathlib import Path

import instrumentation.audit.examples.typed_handler as typed_handler

from .helpers import mypy_strict

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "audit.md"
_BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)

#: The blocks written with types, as a user of mypy --strict would copy them.
TYPED = (
    "class TypedFileEventHandler",
    "async def answer(",
    "def ask(question: str)",
    "async def ask_async(",
    "handlers: list[audit.AnyEventHandler]",
    "def stream_answer(",
)

PRELUDE = """\
import shutil
from pathlib import Path

from instrumentation import audit
from instrumentation.audit import AnyEventHandler
from instrumentation.llms import ChatMessage, OfflineLLM

llm = OfflineLLM(answers={"pasta": "Carbonara, with guanciale."})
"""


def _blocks() -> list[str]:
    return [code for flags, code in _BLOCK.findall(PAGE.read_text(encoding="utf-8"))]


def test_the_typed_handler_shown_is_the_example_file() -> None:
    (shown,) = [code for code in _blocks() if "class TypedFileEventHandler" in code]
    source = Path(typed_handler.__file__).read_text(encoding="utf-8")
    body = source.split("from __future__ import annotations\n", 1)[1]
    body = body[: body.index("\n\nclass SyncTypedHandler")]
    assert shown.strip() == body.strip()


def test_the_typed_blocks_pass_mypy_strict(tmp_path: Path) -> None:
    picked = [code for code in _blocks() if any(marker in code for marker in TYPED)]
    assert len(picked) == len(TYPED)
    module = tmp_path / "docs_audit_typed.py"
    module.write_text(PRELUDE + "\n\n".join(picked), encoding="utf-8")
    proc = mypy_strict(tmp_path / "cache", module, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
