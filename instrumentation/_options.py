"""A misspelt option of the library's handlers is refused naming the option meant.

``SimpleSpanHandler(max_completed_span=5)`` and ``storage.record_to(..., batchsize=3)``
were refused with pydantic's "Extra inputs are not permitted" alone: the error now adds
"did you mean 'max_completed_spans'?" when a field's name is close. It stays pydantic's
``ValidationError``, of the same type (``extra_forbidden``) and location.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

_EXTRA = "extra_forbidden"
_EXTRA_MESSAGE = "Extra inputs are not permitted"


def unknown_option(name: str, value: Any, fields: Iterable[str]) -> InitErrorDetails:
    """The error for an option ``name`` that none of ``fields`` is, with the closest of
    them suggested (if one is close)."""
    import difflib  # here, not at import: only a misspelt option needs it

    close = difflib.get_close_matches(name, list(fields), n=1)
    if not close:
        return InitErrorDetails(type=_EXTRA, loc=(name,), input=value)
    # ``{`` and ``}`` would be read as placeholders of the message template.
    meant = repr(close[0]).replace("{", "{{").replace("}", "}}")
    hint = PydanticCustomError(_EXTRA, f"{_EXTRA_MESSAGE}; did you mean {meant}?")
    return InitErrorDetails(type=hint, loc=(name,), input=value)


def option_names(model: type[BaseModel]) -> list[str]:
    """The keywords ``model`` takes for its fields: a field's alias, where it has one,
    and its name where it has none or the model takes names too (``populate_by_name``).
    A name taken by its alias alone is refused like a misspelt one: it is not meant."""
    config = model.model_config
    by_name = config.get("populate_by_name") or config.get("validate_by_name")
    by_alias = config.get("validate_by_alias", True)
    names = []
    for name, field in model.model_fields.items():
        alias = field.validation_alias if field.validation_alias is not None else field.alias
        if alias is None or by_name:
            names.append(name)
        if by_alias and isinstance(alias, str):
            names.append(alias)
        elif by_alias and isinstance(alias, AliasChoices):
            names.extend(choice for choice in alias.choices if isinstance(choice, str))
    return names


def with_suggestions(error: ValidationError, model: type[BaseModel]) -> ValidationError:
    """``error`` with the closest of ``model``'s options suggested for each unknown one;
    itself when there is none to suggest (or its errors cannot be made again). Inputs
    stay hidden where the model hides them (``hide_input_in_errors``)."""
    names = option_names(model)
    details: list[InitErrorDetails] = []
    suggested = False
    for found in error.errors():
        loc = found["loc"]
        if found["type"] == _EXTRA and len(loc) == 1 and isinstance(loc[0], str):
            detail = unknown_option(loc[0], found["input"], names)
            suggested = suggested or not isinstance(detail["type"], str)
        else:
            detail = InitErrorDetails(type=found["type"], loc=loc, input=found["input"])
            if "ctx" in found:
                detail["ctx"] = found["ctx"]
        details.append(detail)
    if not suggested:
        return error
    try:
        hide_input = bool(model.model_config.get("hide_input_in_errors"))
        return ValidationError.from_exception_data(error.title, details, hide_input=hide_input)
    except (KeyError, TypeError, ValueError):  # an error type of a validator's own
        return error


class SpellCheckedOptions(BaseModel):
    """A model whose keyword arguments are options (a handler's): an unknown one is
    refused by pydantic as before, with the field's name it is close to suggested.

    Only what is made by calling the class goes through here, never an event: events
    are made on the application's hot path and take no options.
    """

    if not TYPE_CHECKING:  # type checkers see pydantic's keyword form, field by field

        def __init__(self, /, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as exc:
                raise with_suggestions(exc, type(self)) from None


__all__ = ["SpellCheckedOptions", "option_names", "unknown_option", "with_suggestions"]
