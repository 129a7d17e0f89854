"""Where LlamaIndex's core package keeps ``BaseInstrumentationHandler``
(``llama_index.core.instrumentation.base_handler``), so that imports switch by name."""

from __future__ import annotations

from instrumentation.base.handler import BaseInstrumentationHandler

__all__ = ["BaseInstrumentationHandler"]
