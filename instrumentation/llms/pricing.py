"""Turning token usage into a price, for models whose price is known.

Prices are US dollars per million tokens. A model that is not in the table gets
no price (``None``), never a guessed one: "gpt-4o-mini" is not priced as "gpt-4o".
A provider prefix is dropped ("openai/gpt-4o" is "gpt-4o"). A dated snapshot is
priced as its alias only when it is listed in :data:`SNAPSHOT_ALIASES`, the snapshots
known to cost what the alias costs ("gpt-4o-2024-08-06" is "gpt-4o"); snapshots that
cost something else have their own entry ("gpt-4o-2024-05-13"), and any other
snapshot has no price, since a snapshot's price is not its alias's by rule. Prices
change: override them with :func:`set_model_price` (or give an LLM its own
:class:`PriceTable`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from instrumentation.events.llm import TokenUsage


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Dollars per million tokens; cached prompt tokens cost ``cached_input`` when given.

    Finite numbers only: a NaN or infinite price would make every cost NaN or infinite,
    which no end event can carry."""

    input: float
    output: float = 0.0
    cached_input: float | None = None

    def __post_init__(self) -> None:
        for field in ("input", "output", "cached_input"):
            value = getattr(self, field)
            if value is None and field == "cached_input":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"ModelPrice.{field} is dollars per million tokens, a finite number >= 0; "
                    f"got {value!r}"
                )


#: Published list prices (USD per 1M tokens) of well-known models; override as needed.
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "gpt-4o": ModelPrice(2.50, 10.00, 1.25),
    "gpt-4o-2024-05-13": ModelPrice(5.00, 15.00),  # the first gpt-4o: no cached rate
    "gpt-4o-mini": ModelPrice(0.15, 0.60, 0.075),
    "gpt-4.1": ModelPrice(2.00, 8.00, 0.50),
    "gpt-4.1-mini": ModelPrice(0.40, 1.60, 0.10),
    "gpt-4.1-nano": ModelPrice(0.10, 0.40, 0.025),
    "gpt-4-turbo": ModelPrice(10.00, 30.00),
    "gpt-4": ModelPrice(30.00, 60.00),
    "gpt-3.5-turbo": ModelPrice(0.50, 1.50),
    "o1": ModelPrice(15.00, 60.00, 7.50),
    "o1-mini": ModelPrice(1.10, 4.40, 0.55),
    "o3-mini": ModelPrice(1.10, 4.40, 0.55),
    "text-embedding-3-small": ModelPrice(0.02),
    "text-embedding-3-large": ModelPrice(0.13),
    "text-embedding-ada-002": ModelPrice(0.10),
}

#: Snapshots (dated versions) whose list price is their alias's (snapshot -> alias). The alias's
#: entry prices them, so overriding the alias's price overrides theirs; a snapshot
#: not here has no price unless the table has its own entry.
SNAPSHOT_ALIASES: Mapping[str, str] = {
    "gpt-4o-2024-08-06": "gpt-4o",
    "gpt-4o-2024-11-20": "gpt-4o",
    "gpt-4o-mini-2024-07-18": "gpt-4o-mini",
    "gpt-4.1-2025-04-14": "gpt-4.1",
    "gpt-4.1-mini-2025-04-14": "gpt-4.1-mini",
    "gpt-4.1-nano-2025-04-14": "gpt-4.1-nano",
    "gpt-4-turbo-2024-04-09": "gpt-4-turbo",
    "o1-2024-12-17": "o1",
    "o1-mini-2024-09-12": "o1-mini",
    "o3-mini-2025-01-31": "o3-mini",
    "gpt-4-0613": "gpt-4",
    "gpt-3.5-turbo-0125": "gpt-3.5-turbo",
}


class PriceTable:
    """A thread-safe model -> :class:`ModelPrice` table."""

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self._lock = threading.Lock()
        self._prices: dict[str, ModelPrice] = dict(
            DEFAULT_PRICES if prices is None else _checked_prices(prices)
        )

    def set(
        self,
        model: str,
        input: float,
        output: float = 0.0,
        cached_input: float | None = None,
    ) -> None:
        """Price ``model`` (dollars per million input/output/cached-input tokens)."""
        if not isinstance(model, str) or not model:
            raise TypeError(f"the model name is a non-empty str, got {model!r}")
        price = ModelPrice(input, output, cached_input)
        with self._lock:
            self._prices[model] = price

    def remove(self, model: str) -> None:
        """Forget ``model``'s price: its calls then have no cost."""
        with self._lock:
            self._prices.pop(model, None)

    def reset(self) -> None:
        """Back to :data:`DEFAULT_PRICES`."""
        with self._lock:
            self._prices = dict(DEFAULT_PRICES)

    def get(self, model: str | None) -> ModelPrice | None:
        """The price of ``model`` (without a provider prefix), or of its alias when it is
        a snapshot of :data:`SNAPSHOT_ALIASES`; None when unknown."""
        if model is not None and not isinstance(model, str):
            raise TypeError(f"the model name is a str or None, got {type(model).__name__}")
        if not model:
            return None
        prices = self._prices
        found = prices.get(model)
        if found is None and "/" in model:
            model = model.rpartition("/")[2]
            found = prices.get(model)
        if found is None and model in SNAPSHOT_ALIASES:
            found = prices.get(SNAPSHOT_ALIASES[model])
        return found

    def cost(self, model: str | None, usage: TokenUsage | None) -> float | None:
        """The dollar cost of ``usage`` on ``model``; None when either is unknown."""
        if usage is None:
            return None
        if not isinstance(usage, TokenUsage):
            raise TypeError(
                "cost() takes the usage as a TokenUsage: "
                f"TokenUsage(prompt_tokens=..., completion_tokens=...); got {type(usage).__name__}"
            )
        price = self.get(model)
        if price is None:
            return None
        cached = usage.cached_tokens or 0
        fresh = max(usage.prompt_tokens - cached, 0)
        cached_rate = price.input if price.cached_input is None else price.cached_input
        dollars = (
            fresh * price.input + cached * cached_rate + usage.completion_tokens * price.output
        )
        return dollars / 1_000_000


def _checked_prices(prices: object) -> Mapping[str, ModelPrice]:
    """``prices``, if it maps model names to :class:`ModelPrice`: checked when the table
    is made, not when a call is priced (where it could only be logged)."""
    if not isinstance(prices, Mapping):
        raise TypeError(
            f"prices maps model names to ModelPrice(input, output), got {type(prices).__name__}"
        )
    for model, price in prices.items():
        if not isinstance(model, str) or not isinstance(price, ModelPrice):
            raise TypeError(
                "prices maps model names (str) to ModelPrice(input, output, cached_input); "
                f"got {model!r}: {price!r}"
            )
    return prices


#: The table every LLM uses unless given its own.
default_price_table = PriceTable()


def set_model_price(
    model: str, input: float, output: float = 0.0, cached_input: float | None = None
) -> None:
    """Price ``model`` in the default table (dollars per million tokens)."""
    default_price_table.set(model, input, output, cached_input)


def cost_usd(model: str | None, usage: TokenUsage | None) -> float | None:
    """The cost of ``usage`` on ``model`` by the default table (None when unknown)."""
    return default_price_table.cost(model, usage)


__all__ = [
    "DEFAULT_PRICES",
    "SNAPSHOT_ALIASES",
    "ModelPrice",
    "PriceTable",
    "cost_usd",
    "default_price_table",
    "set_model_price",
]
