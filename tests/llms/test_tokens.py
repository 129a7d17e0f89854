"""Token counting and chunking: the estimates streams fall back on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from instrumentation.llms import ChatMessage, ToolCall, count_tokens
from instrumentation.llms.tokens import count_message_tokens, split_chunks


def test_words_and_punctuation_are_tokens() -> None:
    """A word, a number or a punctuation mark is one token; nothing is zero."""
    assert count_tokens("Hello, world 42!") == 5
    assert count_tokens("") == count_tokens(None) == 0


def test_message_tokens_include_tool_call_arguments() -> None:
    """Prompt estimates count message text and tool-call arguments."""
    messages = [
        ChatMessage(role="user", content="two words"),
        ChatMessage(role="assistant", tool_calls=[ToolCall(name="f", arguments='{"a": 1}')]),
    ]
    # "two words" is 2 tokens; '{"a": 1}' is {, ", a, ", :, 1, } -- 7 (each mark is
    # one token, the word "a" and the number "1" one each): 9 in all.
    assert count_message_tokens(messages) == 9


@given(st.text(), st.integers(min_value=1, max_value=5))
def test_chunks_join_back_to_the_text(text: str, per_chunk: int) -> None:
    """However the text is cut, the chunks put together are the text."""
    chunks = split_chunks(text, per_chunk)
    assert "".join(chunks) == text
    assert all(chunks)


def test_chunk_size_must_be_positive() -> None:
    """words_per_chunk < 1 is refused with a message naming it."""
    with pytest.raises(ValueError, match="words_per_chunk"):
        split_chunks("a b", 0)


def test_counting_what_is_not_text_is_a_type_error_saying_so() -> None:
    """Was "expected string or bytes-like object" from inside the regex."""
    with pytest.raises(TypeError, match=r"count_tokens takes a str .*got int"):
        count_tokens(5)  # type: ignore[arg-type]
    assert count_tokens(None) == count_tokens("") == 0
