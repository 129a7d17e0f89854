"""The price table: known models priced, unknown ones not, overrides honoured."""

from __future__ import annotations

import pytest

from instrumentation.llms import (
    DEFAULT_PRICES,
    SNAPSHOT_ALIASES,
    LLMChatEndEvent,
    ModelPrice,
    OfflineLLM,
    PriceTable,
    TokenUsage,
    cost_usd,
    default_price_table,
    set_model_price,
)
from instrumentation.testing import Capture

USAGE = TokenUsage(prompt_tokens=1_000_000, completion_tokens=1_000_000)


def test_known_model_is_priced_and_snapshots_share_the_price() -> None:
    """gpt-4o: $2.50 in + $10 out per million; a snapshot known to cost the same, and a
    prefix, price the same."""
    assert cost_usd("gpt-4o", USAGE) == pytest.approx(12.5)
    assert cost_usd("gpt-4o-2024-08-06", USAGE) == pytest.approx(12.5)
    assert cost_usd("openai/gpt-4o-2024-11-20", USAGE) == pytest.approx(12.5)
    assert cost_usd("openai/gpt-4o", USAGE) == pytest.approx(12.5)


def test_a_snapshot_is_priced_as_its_alias_only_when_known_to_cost_the_same() -> None:
    """gpt-4o-2024-05-13 lists at $5 in + $15 out (not gpt-4o's price); a snapshot not
    known to cost its alias's price has none; every alias listed is priced."""
    assert cost_usd("gpt-4o-2024-05-13", USAGE) == pytest.approx(20.0)
    cached = TokenUsage(prompt_tokens=1_000_000, cached_tokens=1_000_000)
    assert cost_usd("gpt-4o-2024-05-13", cached) == pytest.approx(5.0)  # no cached rate
    assert cost_usd("gpt-4o-2099-01-01", USAGE) is None
    assert cost_usd("gpt-4o-mini-2099-01-01", USAGE) is None
    assert cost_usd("o1-preview-2024-09-12", USAGE) is None
    for snapshot, alias in SNAPSHOT_ALIASES.items():
        assert alias in DEFAULT_PRICES and snapshot not in DEFAULT_PRICES
        assert cost_usd(snapshot, USAGE) == cost_usd(alias, USAGE)
    set_model_price("gpt-4o", 1.0, 2.0)  # the alias's price is the listed snapshot's
    assert cost_usd("gpt-4o-2024-08-06", USAGE) == pytest.approx(3.0)
    assert cost_usd("gpt-4o-2024-05-13", USAGE) == pytest.approx(20.0)


def test_unknown_model_has_no_price_not_a_neighbours() -> None:
    """A model not in the table, even one sharing a prefix, costs None."""
    assert cost_usd("gpt-4o-turbo-ultra", USAGE) is None
    assert cost_usd("my-local-model", USAGE) is None
    assert cost_usd(None, USAGE) is None
    assert cost_usd("gpt-4o", None) is None


def test_cached_tokens_use_the_cached_price() -> None:
    """Cached prompt tokens are charged at the cached rate."""
    usage = TokenUsage(prompt_tokens=1_000_000, completion_tokens=0, cached_tokens=400_000)
    assert cost_usd("gpt-4o", usage) == pytest.approx(0.6 * 2.5 + 0.4 * 1.25)


def test_override_changes_the_price_and_reset_restores() -> None:
    """set_model_price overrides or adds; reset() goes back to the defaults."""
    set_model_price("gpt-4o", 1.0, 2.0)
    set_model_price("offline", 0.5)
    assert cost_usd("gpt-4o", USAGE) == pytest.approx(3.0)
    assert cost_usd("offline", USAGE) == pytest.approx(0.5)
    default_price_table.reset()
    assert cost_usd("gpt-4o", USAGE) == pytest.approx(12.5)
    assert cost_usd("offline", USAGE) is None


def test_end_events_carry_the_cost(cap: Capture) -> None:
    """An LLM's end event is priced by its table; an unpriced model reports None."""
    OfflineLLM().chat("a b c")
    table = PriceTable({"offline": ModelPrice(1_000_000.0, 2_000_000.0)})
    OfflineLLM(price_table=table).chat("a b c")
    first, second = cap.events_of(LLMChatEndEvent)
    assert first.cost_usd is None
    usage = second.usage
    assert usage is not None
    assert second.cost_usd == pytest.approx(usage.prompt_tokens + 2 * usage.completion_tokens)


@pytest.mark.parametrize("bad", [-1, "cheap", True])
def test_bad_price_is_rejected(bad: object) -> None:
    """Prices are numbers >= 0; anything else is a ValueError naming the field."""
    with pytest.raises(ValueError, match="input"):
        ModelPrice(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        default_price_table.set("", 1.0)


def test_usage_as_a_dict_is_a_type_error_that_names_token_usage() -> None:
    """A usage dict (as providers return it) gets a TypeError saying what to pass, not an
    AttributeError from inside the table."""
    with pytest.raises(TypeError, match=r"TokenUsage\(prompt_tokens=.*got dict"):
        cost_usd("gpt-4o", {"prompt_tokens": 5})  # type: ignore[arg-type]
    assert cost_usd("gpt-4o", None) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_price_that_is_not_finite_is_rejected(bad: float) -> None:
    """NaN and the infinities were accepted, made every cost NaN, and then every traced
    call of the model failed (its end event could not hold the cost) once a handler
    listened: they are refused up front, for each field, saying a finite number is due."""
    for args in ((bad,), (1.0, bad), (1.0, 1.0, bad)):
        with pytest.raises(ValueError, match="a finite number >= 0"):
            ModelPrice(*args)
        with pytest.raises(ValueError, match="a finite number >= 0"):
            set_model_price("gpt-4o", *args)
        with pytest.raises(ValueError, match="a finite number >= 0"):
            PriceTable().set("offline", *args)
    assert cost_usd("gpt-4o", USAGE) == pytest.approx(12.5)  # the price is unchanged


@pytest.mark.parametrize(
    "prices",
    [{"offline": 5}, {"offline": (1.0, 2.0)}, {5: ModelPrice(1.0)}, [("offline", 1.0)]],
    ids=["number", "tuple", "non-str-model", "list"],
)
def test_a_table_of_anything_but_model_prices_is_rejected(prices: object) -> None:
    """PriceTable(prices={"x": 5}) was accepted; pricing a call then raised an
    AttributeError."""
    with pytest.raises(TypeError, match=r"prices maps model names .*ModelPrice"):
        PriceTable(prices)  # type: ignore[arg-type]
    assert PriceTable({}).get("gpt-4o") is None  # an empty table is a table


def test_a_model_name_that_is_not_a_str_is_a_type_error_saying_so() -> None:
    """Was "argument of type 'int' is not iterable"."""
    with pytest.raises(TypeError, match="the model name is a str or None, got int"):
        default_price_table.get(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="the model name is a str or None, got int"):
        cost_usd(5, USAGE)  # type: ignore[arg-type]
    assert default_price_table.get(None) is None
