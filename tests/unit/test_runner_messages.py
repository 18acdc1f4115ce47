"""How the runner turns a Generate into a prompt: a conversation goes through the chat template
(and needs one), a prompt through the template unless raw, and what is refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from exod.errors import ExoError
from exod.proto.exo.v1 import runner_pb2
from exod.runners.requests import check_request, encode_prompt


@dataclass
class FakeTokenizer:
    """Records what the runner asks of mlx-lm's TokenizerWrapper."""

    has_chat_template: bool = True
    bos_token: str | None = None
    templated: list[list[dict[str, str]]] = field(default_factory=list)
    refuse: str = ""

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool
    ) -> list[int]:
        assert add_generation_prompt
        if self.refuse:
            raise ValueError(self.refuse)  # what a template's raise_exception() does, in effect
        self.templated.append(messages)
        return [1] * (10 + sum(len(m["content"]) for m in messages))

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [0] * (len(text) + (1 if add_special_tokens else 0))


def chat(*pairs: tuple[str, str], **fields: Any) -> runner_pb2.Generate:
    messages = [runner_pb2.ChatMessage(role=r, content=c) for r, c in pairs]
    return runner_pb2.Generate(request_id="r", max_tokens=5, messages=messages, **fields)


def test_a_conversation_goes_through_the_chat_template_whole() -> None:
    tok = FakeTokenizer()
    req = chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"))
    prompt, count = encode_prompt(req, tok)
    assert tok.templated == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ]
    ]
    assert prompt == [1] * count
    assert count == 10 + len("Be brief.HiHelloBye")


def test_a_conversation_ignores_prompt_and_raw() -> None:
    tok = FakeTokenizer()
    encode_prompt(chat(("user", "Hi"), prompt="ignored", raw=True), tok)
    assert tok.templated == [[{"role": "user", "content": "Hi"}]]


def test_one_user_message_without_a_template_goes_as_it_is_like_a_prompt() -> None:
    plain = FakeTokenizer(has_chat_template=False)
    assert encode_prompt(chat(("user", "Hi")), plain) == ("Hi", 3)
    assert encode_prompt(runner_pb2.Generate(prompt="Hi", max_tokens=5), plain) == ("Hi", 3)
    assert plain.templated == []


@pytest.mark.parametrize(
    "turns",
    [
        (("system", "Be brief."), ("user", "Hi")),
        (("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")),
        (("assistant", "Hi"),),
    ],
)
def test_a_conversation_without_a_template_is_an_invalid_argument(
    turns: tuple[tuple[str, str], ...],
) -> None:
    with pytest.raises(ExoError) as err:
        encode_prompt(chat(*turns), FakeTokenizer(has_chat_template=False))
    assert err.value.reason == "invalid_argument"
    assert err.value.message.startswith("this model has no chat template")
    assert "send one user message, or a completion (/v1/completions)" in err.value.message


def test_a_conversation_the_template_refuses_is_an_invalid_argument() -> None:
    tok = FakeTokenizer(refuse="Conversation roles must alternate user/assistant")
    with pytest.raises(ExoError) as err:
        encode_prompt(chat(("assistant", "Hi"), ("assistant", "Hi")), tok)
    assert err.value.reason == "invalid_argument"
    assert "roles must alternate" in err.value.message


def test_a_prompt_is_templated_unless_raw_as_before() -> None:
    tok = FakeTokenizer()
    req = runner_pb2.Generate(prompt="Hi", max_tokens=5)
    assert encode_prompt(req, tok) == ([1] * 12, 12)
    assert tok.templated == [[{"role": "user", "content": "Hi"}]]
    raw = runner_pb2.Generate(prompt="Hi", max_tokens=5, raw=True)
    assert encode_prompt(raw, tok) == ("Hi", 3)
    assert encode_prompt(req, FakeTokenizer(has_chat_template=False)) == ("Hi", 3)


def test_a_conversation_counts_as_a_prompt() -> None:
    check_request(chat(("user", "")), prompt_tokens=10, limit=None)
    with pytest.raises(ExoError) as err:
        check_request(runner_pb2.Generate(max_tokens=5), prompt_tokens=1, limit=None)
    assert err.value.reason == "prompt_empty"


def test_an_empty_stop_sequence_is_refused() -> None:
    req = runner_pb2.Generate(prompt="Hi", max_tokens=5, stop=["ok", ""])
    with pytest.raises(ExoError) as err:
        check_request(req, prompt_tokens=3, limit=None)
    assert err.value.reason == "invalid_argument"
