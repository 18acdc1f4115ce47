"""The tokenizer rebuilt from a GGUF's metadata splits text into the ids the model was trained on.

The reference is transformers' own GGUF tokenizer conversion (`convert_gguf_tokenizer`), run on
the same metadata, over a multilingual corpus kept here: tiny GGUF files written by the tests (a
trained byte-level BPE vocabulary under several pre-tokenizers, a SentencePiece-style one with
and without merges) and SmolLM2's real GGUF when it is cached. Where transformers does not know a
pre-tokenizer (SmolLM2's "smollm") it falls back to GPT-2's split, which is not the model's: the
reference there is transformers' conversion with the split of SmolLM2's own tokenizer.json
(digits one by one, then GPT-2's), and plain transformers must agree wherever the two splits do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, cast

import pytest
from tokenizers import Tokenizer, pre_tokenizers

from exod.errors import ExoError
from exod.models.gguf.reader import MetaValue, open_gguf
from exod.models.gguf.tokenizer import PRE_TOKENIZERS, tokenizer_files
from tests.gguf_vocab import byte_level_meta, sentencepiece_meta, write_gguf
from tests.smollm2 import smollm2_gguf

CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it? We'll see; they've.",
    "Le cœur a ses raisons que la raison ne connaît point. L'été dernier, c'était très beau.",
    "Grüße aus München! Die Straße ist 3,5 km lang; Äpfel, Öl und Übung machen den Meister.",
    "我能吞下玻璃而不伤身体。北京是中国的首都，人口约2100万。",  # noqa: RUF001  # on purpose
    "いろはにほへと、カタカナとひらがな。東京タワーは333メートルです。",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Москва — столица России.",
    "مرحبا بالعالم. القاهرة هي عاصمة مصر، وعدد سكانها ٢٠ مليون نسمة.",
    "Emoji: 🦊🐕 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨ and symbols € £ ¥ ° ± ∞ ≠ ≤.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i * i); }\t// C\r\n',
    "   leading spaces, and trailing ones   ",
    "tabs\t\tand\n\n\nnewlines \n \n  mixed   runs    of     spaces",
    "x  5, a   2048 b, 1 000 000, 3.14159, 2024-06-30, 0x1F, 1e-9, 12345678901234567890",
    "Ⅻ ½ ² ٣ ৫ are numbers too; so is 42.",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n<think>Hmm.</think> Hi",
    " ",
    "",
)

BYTE_LEVEL_PRES = ("gpt-2", "qwen2", "llama-bpe", "qwen35", "tekken", "gpt-4o")


def read_meta(path: Path) -> dict[str, MetaValue]:
    """The metadata as the converter gets it: through the project's GGUF reader."""
    return open_gguf(path).meta


@cache
def tiny_byte_level(tmp: Path, pre: str) -> dict[str, MetaValue]:
    return read_meta(write_gguf(tmp / f"byte-level-{pre}.gguf", byte_level_meta(pre)))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-tokenizer")


def ours(meta: Mapping[str, MetaValue]) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_files(meta)["tokenizer.json"].decode())


def transformers_tokenizer(meta: Mapping[str, MetaValue]) -> Tokenizer:
    """transformers' conversion of the same metadata, keyed as its GGUF loader keys it."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    renames: dict[str, str] = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {
        name: meta[f"tokenizer.{key}"]
        for key, name in renames.items()
        if f"tokenizer.{key}" in meta
    }
    converted = cast(tuple[Tokenizer, Any], convert_gguf_tokenizer("llama", tokenizer_dict))
    return converted[0]


def with_smollm_split(tokenizer: Tokenizer) -> Tokenizer:
    """The split of SmolLM2's own tokenizer.json: digits one by one, then GPT-2's."""
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return tokenizer


def ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def same_split(a: Tokenizer, b: Tokenizer, text: str) -> bool:
    """Whether two tokenizers' pre-tokenizers cut text into the same pieces."""
    assert a.pre_tokenizer is not None and b.pre_tokenizer is not None
    return bool(a.pre_tokenizer.pre_tokenize_str(text) == b.pre_tokenizer.pre_tokenize_str(text))


# --- tiny byte-level BPE ---------------------------------------------------------------------


@pytest.mark.parametrize("pre", BYTE_LEVEL_PRES)
@pytest.mark.parametrize("text", CORPUS)
def test_byte_level_ids_equal_transformers(tmp: Path, pre: str, text: str) -> None:
    meta = tiny_byte_level(tmp, pre)
    assert ids(ours(meta), text) == ids(transformers_tokenizer(meta), text)


@pytest.mark.parametrize("text", CORPUS)
def test_smollm_split_equals_its_own_tokenizer(tmp: Path, text: str) -> None:
    meta = tiny_byte_level(tmp, "smollm")
    assert ids(ours(meta), text) == ids(with_smollm_split(transformers_tokenizer(meta)), text)


@pytest.mark.parametrize("text", CORPUS)
def test_byte_level_decodes_back_to_the_text(tmp: Path, text: str) -> None:
    tokenizer = ours(tiny_byte_level(tmp, "qwen2"))
    assert tokenizer.decode(ids(tokenizer, text), skip_special_tokens=False) == text


def test_every_known_pre_tokenizer_builds_and_splits(tmp: Path) -> None:
    base = tiny_byte_level(tmp, "gpt-2")
    for pre in PRE_TOKENIZERS:
        tokenizer = ours({**base, "tokenizer.ggml.pre": pre})
        text = " ".join(CORPUS)
        assert tokenizer.decode(ids(tokenizer, text), skip_special_tokens=False) == text, pre


# --- tiny SentencePiece-style ----------------------------------------------------------------


@pytest.mark.parametrize("with_merges", [False, True], ids=["scores", "merges"])
@pytest.mark.parametrize("text", CORPUS)
def test_sentencepiece_ids_equal_transformers(tmp: Path, with_merges: bool, text: str) -> None:
    meta = tiny_sentencepiece(tmp, with_merges)
    assert ids(ours(meta), text) == ids(transformers_tokenizer(meta), text)


@cache
def tiny_sentencepiece(tmp: Path, with_merges: bool = False) -> dict[str, MetaValue]:
    name = f"sentencepiece-{'merges' if with_merges else 'scores'}.gguf"
    return read_meta(write_gguf(tmp / name, sentencepiece_meta(with_merges=with_merges)))


def test_sentencepiece_falls_back_to_bytes(tmp: Path) -> None:
    tokenizer = ours(tiny_sentencepiece(tmp))
    text = "Москва 🐙"
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert "<0xF0>" in encoded.tokens  # the octopus's first byte: no piece holds it
    assert tokenizer.decode(encoded.ids) == text


def test_sentencepiece_starts_with_bos(tmp: Path) -> None:
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    meta = tiny_sentencepiece(tmp)
    assert "tokenizer.ggml.add_bos_token" not in meta
    assert ours(meta).encode("Hello").ids[0] == 1
    config = json.loads(tokenizer_files(meta)["tokenizer_config.json"])
    assert (config["add_bos_token"], config["bos_token"], config["eos_token"]) == (
        True,
        "<s>",
        "</s>",
    )
    no_bos = {**meta, "tokenizer.ggml.add_bos_token": False}
    assert ours(no_bos).encode("Hello").ids[0] != 1


# --- through mlx-lm, as a runner loads it ----------------------------------------------------


def wrapper(meta: Mapping[str, MetaValue], where: Path) -> Any:
    """mlx-lm's TokenizerWrapper over the files written into a model directory."""
    from mlx_lm.tokenizer_utils import load

    where.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files(meta).items():
        (where / name).write_bytes(data)
    return load(where)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHATML_PROMPT = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_chat_template_and_special_tokens_through_mlx_lm(tmp: Path, kind: str) -> None:
    meta = tiny_byte_level(tmp, "qwen2") if kind == "byte-level" else tiny_sentencepiece(tmp)
    tokens = cast(list[str], meta["tokenizer.ggml.tokens"])
    w = wrapper(meta, tmp / f"mlx-{kind}")
    assert w.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == CHATML_PROMPT
    specials = ["<|im_start|>", "<|im_end|>"] + (["<s>", "</s>"] if kind == "sentencepiece" else [])
    for special in specials:
        assert w.encode(special, add_special_tokens=False) == [tokens.index(special)], special
    assert tokens.index("<|im_end|>" if kind == "byte-level" else "</s>") in w.eos_token_ids
    prompt: list[int] = w.apply_chat_template(CHAT, add_generation_prompt=True)
    assert prompt.count(tokens.index("<|im_start|>")) == 2
    assert w.decode(prompt, skip_special_tokens=True).startswith(
        "user\nWhat is the capital of France?"
    )


def test_user_defined_tokens_stay_whole_but_are_text(tmp: Path) -> None:
    meta = tiny_byte_level(tmp, "qwen2")
    tokens = cast(list[str], meta["tokenizer.ggml.tokens"])
    tokenizer = ours(meta)
    assert ids(tokenizer, "<think>") == [tokens.index("<think>")]
    assert tokenizer.decode(ids(tokenizer, "<think>a</think>"), skip_special_tokens=True) == (
        "<think>a</think>"
    )


# --- refused -----------------------------------------------------------------------------------


def refusal(meta: Mapping[str, MetaValue]) -> ExoError:
    with pytest.raises(ExoError) as caught:
        tokenizer_files(meta)
    return caught.value


def test_unknown_tokenizer_model_is_refused_by_name(tmp: Path) -> None:
    e = refusal({**tiny_byte_level(tmp, "gpt-2"), "tokenizer.ggml.model": "rwkv"})
    assert e.reason == "model_unsupported"
    assert "'rwkv' (tokenizer.ggml.model)" in e.message
    assert "gpt2, llama" in e.message


def test_unknown_pre_tokenizer_is_refused_by_name(tmp: Path) -> None:
    e = refusal({**tiny_byte_level(tmp, "gpt-2"), "tokenizer.ggml.pre": "kimi-k2"})
    assert e.reason == "model_unsupported"
    assert "'kimi-k2' (tokenizer.ggml.pre)" in e.message
    assert "smollm" in e.message  # the known ones are listed


def test_a_gguf_without_tokenizer_is_refused(tmp: Path) -> None:
    meta = {k: v for k, v in tiny_byte_level(tmp, "gpt-2").items() if not k.startswith("tok")}
    e = refusal(meta)
    assert e.reason == "model_unsupported"
    assert "no tokenizer" in e.message


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries"),
        ({"tokenizer.ggml.eos_token_id": 10**6}, "eos_token_id is 1000000"),
        ({"tokenizer.ggml.tokens": "abc"}, "tokens is not a list of text"),
        ({"tokenizer.ggml.merges": ["nospace"]}, "malformed entry 'nospace'"),
        ({"tokenizer.ggml.add_bos_token": 1}, "add_bos_token is not true or false"),
    ],
)
def test_garbled_tokenizer_keys_are_named(
    tmp: Path, change: dict[str, MetaValue], words: str
) -> None:
    e = refusal({**tiny_byte_level(tmp, "gpt-2"), **change})
    assert e.reason == "weights_corrupt"
    assert words in e.message


# --- SmolLM2's real GGUF, when cached ------------------------------------------------------------


@cache
def smollm2_meta() -> dict[str, MetaValue]:
    return read_meta(smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2() -> dict[str, MetaValue]:
    return smollm2_meta()


def test_smollm2_ids_equal_transformers(smollm2: dict[str, MetaValue]) -> None:
    assert smollm2["tokenizer.ggml.pre"] == "smollm"
    mine, theirs = ours(smollm2), transformers_tokenizer(smollm2)
    own_split = with_smollm_split(transformers_tokenizer(smollm2))
    compared = 0
    for text in CORPUS:
        assert ids(mine, text) == ids(own_split, text), text
        if same_split(theirs, own_split, text):
            assert ids(mine, text) == ids(theirs, text), text
            compared += 1
    assert compared >= 8  # most of the corpus has no number after a space


def test_smollm2_round_trips_the_corpus(smollm2: dict[str, MetaValue]) -> None:
    tokenizer = ours(smollm2)
    for text in CORPUS:
        assert tokenizer.decode(ids(tokenizer, text), skip_special_tokens=False) == text


def test_smollm2_chat_template_through_mlx_lm(smollm2: dict[str, MetaValue], tmp: Path) -> None:
    w = wrapper(smollm2, tmp / "mlx-smollm2")
    prompt = w.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n" + CHATML_PROMPT
    )
    tokens = cast(list[str], smollm2["tokenizer.ggml.tokens"])
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert w.encode(special, add_special_tokens=False) == [tokens.index(special)]
    assert w.eos_token_ids == {tokens.index("<|im_end|>")}
    assert w.encode("Hi", add_special_tokens=True) == w.encode("Hi", add_special_tokens=False)


def test_named_chat_templates_are_kept(tmp: Path) -> None:
    tool_use = "{{ 'tools: ' + (tools | length | string) }}"
    meta: dict[str, MetaValue] = {
        **tiny_byte_level(tmp, "qwen2"),
        "tokenizer.chat_templates": ["tool_use"],
        "tokenizer.chat_template.tool_use": tool_use,
    }
    config = json.loads(tokenizer_files(meta)["tokenizer_config.json"])
    assert config["chat_template"] == [
        {"name": "default", "template": meta["tokenizer.chat_template"]},
        {"name": "tool_use", "template": tool_use},
    ]
    w = wrapper(meta, tmp / "mlx-named-templates")
    assert w.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == CHATML_PROMPT


def test_sentencepiece_without_space_prefix(tmp: Path) -> None:
    # tokenizer.ggml.add_space_prefix false: llama.cpp puts no "▁" before the first word.
    meta = tiny_sentencepiece(tmp)
    with_prefix = ours(meta).encode("Hello", add_special_tokens=False).tokens
    without = ours({**meta, "tokenizer.ggml.add_space_prefix": False})
    tokens = without.encode("Hello", add_special_tokens=False).tokens
    assert with_prefix[0].startswith("▁")
    assert not tokens[0].startswith("▁")
    assert without.decode(without.encode("Hello world").ids, skip_special_tokens=True) == (
        "Hello world"
    )


def test_smollm2_tokenizer_config(smollm2: dict[str, MetaValue]) -> None:
    config = json.loads(tokenizer_files(smollm2)["tokenizer_config.json"])
    assert {k: v for k, v in config.items() if k != "chat_template"} == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    assert config["chat_template"] == smollm2["tokenizer.chat_template"]


def test_sentencepiece_of_gemma_is_refused(tmp: Path) -> None:
    e = refusal({**tiny_sentencepiece(tmp), "general.architecture": "gemma2"})
    assert e.reason == "model_unsupported"
    assert "gemma2" in e.message


def test_eos_is_appended_when_the_file_asks(tmp: Path) -> None:
    meta = {**tiny_sentencepiece(tmp), "tokenizer.ggml.add_eos_token": True}
    encoded = ours(meta).encode("Hello").ids
    assert (encoded[0], encoded[-1]) == (1, 2)
