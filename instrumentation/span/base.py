"""The span: a stretch of the application's execution, as a pydantic model."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class BaseSpan(BaseModel):
    """Subclass it for your own span data; a span handler makes them.

    ``trace_id`` and ``name`` (the decorated function's qualified name) are filled in
    by :class:`BaseSpanHandler` when the handler that made the span did not set them.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    # Handlers pass the dispatcher's id; one made by hand gets a unique id, as in LlamaIndex.
    id_: str = Field(default_factory=lambda: str(uuid.uuid4()), description="Id of the span.")
    parent_id: str | None = Field(default=None, description="Id of the parent span.")
    tags: dict[str, Any] = Field(default_factory=dict)
    trace_id: str | None = Field(default=None, description="Id shared by the whole call tree.")
    name: str | None = Field(default=None, description="What the span covers.")

    @classmethod
    def class_name(cls) -> str:
        return cls.__name__


__all__ = ["BaseSpan"]
