"""Tokenizer metadata for tiny GGUF files, laid out as llama.cpp's convert_hf_to_gguf.py writes it.

Two kinds, each trained on the spot: a byte-level BPE vocabulary (`tokenizer.ggml.model` "gpt2",
as SmolLM2 and Qwen2 ship) and a SentencePiece-style one ("llama": "▁" for spaces, <0xNN> byte
tokens, scores, and usually no merges), plus a writer for a GGUF file that holds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from exod.models.demo import CHAT_TEMPLATE, CORPUS
from exod.models.gguf.reader import MetaValue
from tests.gguf_files import add_value

CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
USER_DEFINED_TOKENS = ("<think>", "</think>")

# More training text, so that code, Arabic and long whitespace get merged tokens of their own.
TRAINING = (
    *CORPUS,
    "def main(argv: list[str]) -> int:\n    for i in range(10):\n        print(i ** 2)\n"
    "    return 0\n\n\nif __name__ == '__main__':\n\tsys.exit(main())\n",
    "مرحبا بالعالم. كيف حالك اليوم؟ الطقس جميل جدا.",
    "Numbers: 3.14159, 2.71828, 1,000,000 and 2024-06-30; prices $19.99 and €5.",
)

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def byte_level_meta(pre: str = "gpt-2", size: int = 1100) -> dict[str, MetaValue]:
    """A gpt2-model vocabulary (BPE over GPT-2's byte alphabet) with ChatML control tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[*CONTROL_TOKENS, *USER_DEFINED_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = _in_id_order(model["vocab"])
    types = [
        CONTROL if t in CONTROL_TOKENS else USER_DEFINED if t in USER_DEFINED_TOKENS else NORMAL
        for t in tokens
    ]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": list(tokens),
        "tokenizer.ggml.token_type": list(types),
        "tokenizer.ggml.merges": [" ".join(pair) for pair in model["merges"]],
        "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def sentencepiece_meta(size: int = 700, *, with_merges: bool = False) -> dict[str, MetaValue]:
    """A llama-model vocabulary: <unk> <s> </s>, 256 byte tokens, pieces scored best first, and
    ChatML control tokens at the end (as chat fine-tunes of Llama 2 add them)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=1, show_progress=False)
    tokenizer.train_from_iterator(TRAINING, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    pieces = _in_id_order(model["vocab"])
    head = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tail = ["<|im_start|>", "<|im_end|>"]
    tokens = [*head, *pieces, *tail]
    types = [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256, *[NORMAL] * len(pieces), CONTROL, CONTROL]
    # SentencePiece scores: the earlier a piece was learned, the higher (merges follow them).
    scores = [0.0] * len(head) + [-float(i) for i in range(len(pieces))] + [0.0] * len(tail)
    meta: dict[str, MetaValue] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": list(tokens),
        "tokenizer.ggml.scores": list(scores),
        "tokenizer.ggml.token_type": list(types),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    if with_merges:
        meta["tokenizer.ggml.merges"] = [" ".join(pair) for pair in model["merges"]]
    return meta


def write_gguf(path: Path, meta: dict[str, MetaValue], arch: str = "llama") -> Path:
    """A GGUF file holding meta (typed as llama.cpp types these keys) and one small tensor."""
    writer = GGUFWriter(path, arch)
    for key, value in meta.items():
        if key == "general.architecture":
            continue  # GGUFWriter writes it from arch
        add_value(writer, key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _in_id_order(vocab: dict[str, int]) -> list[str]:
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "the vocabulary has holes"
    return tokens
