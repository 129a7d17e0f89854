"""Audit handlers the docs show in full; import each from its module (``typed_handler``)."""

__all__: list[str] = []
