"""Built-in audit handlers: a file per request, the terminal, and ``logging``."""

from __future__ import annotations

from instrumentation.audit.handlers.cli import CLIEventHandler
from instrumentation.audit.handlers.file import FileContext, FileEventHandler
from instrumentation.audit.handlers.logging_handler import LoggingEventHandler

__all__ = ["CLIEventHandler", "FileContext", "FileEventHandler", "LoggingEventHandler"]
