"""The span: a stretch of the application's execution, as a pydantic model."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class BaseSpan(BaseModel):
    """Subclass it for your own span data; a span handler makes them.

    ``trace_id`` and ``name`` (the decorated function's qualified name) are filled in
    by :class:`BaseSpanHandler` when the handler that made the span did not set them.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    id_: str = Field(default_factory=str, description="Id of the span.")
    parent_id: str | None = Field(default=None, description="Id of the parent span.")
    tags: dict[str, Any] = Field(default_factory=dict)
    trace_id: str | None = Field(default=None, description="Id shared by the whole call tree.")
    name: str | None = Field(default=None, description="What the span covers.")

    @classmethod
    def class_name(cls) -> str:
        return cls.__name__


__all__ = ["BaseSpan"]
