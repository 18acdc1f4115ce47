"""The demo model: a tiny transformer with random weights and a tokenizer trained on the spot.

It lets anyone try exod, and every test run a real model through mlx-lm's real loading code,
without downloading anything. Its output is gibberish by construction. Everything is derived
from the architecture's parameter layout in mlx-lm (qwen2, llama) with numpy, safetensors and
tokenizers only: importing MLX here would make the daemon pay for it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import save as save_safetensors
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DEMO_NAME = "demo"

Arch = Literal["qwen2", "llama"]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML, as Qwen2 instruct models ship it (without the default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Byte-level BPE needs all 256 bytes plus the special tokens before it can merge anything.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1

# Training text for the tokenizer. Non-ASCII scripts are here so that multi-byte characters get
# merged tokens of their own and prompts in them exercise the streaming detokenizer.
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A model that runs on your own machine answers "
    "without sending a single word anywhere else. Start the daemon, ask it a question, and read "
    "the answer as it streams back one token at a time. When the machine is short of memory the "
    "runner is stopped, the reason is written to the log, and the next request loads it again.",
    "Once upon a time there was a little computer that wanted to write stories. It read every "
    "book in the library, counted the words, and learned which ones liked to stand together. "
    "Then it wrote: the cat sat on the mat, the dog ran in the park, and the sun rose over the "
    "hills while the birds were singing in the trees near the river.",
    "Events are appended to the log and never changed. At start the daemon replays them in "
    "order and rebuilds what it knew: which runners were alive, which requests were running, "
    "which models were added by whom and when. Nothing is lost when the power goes out.",
    "How many tokens are in this sentence? Count them, then count them again with another "
    "tokenizer; the numbers differ, because every model splits text in its own way. Numbers "
    "such as 0, 1, 2, 3, 42, 100, 2048 and 65536 are split too, digit by digit or in groups.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München und Köln!",
    "Le cœur a ses raisons que la raison ne connaît point. Où est la bibliothèque? Très bien.",
    "El niño comió una manzana en la mañana. ¿Dónde está el baño? ¡Qué día tan bonito!",
    "Ο γρήγορος καφέ αλεπού πηδάει πάνω από το τεμπέλικο σκυλί. Καλημέρα κόσμε.",  # noqa: RUF001  # Greek on purpose
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир!",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ。こんにちは、世界。",
    "我能吞下玻璃而不伤身体。你好，世界。今天天气很好。",  # noqa: RUF001  # Chinese punctuation on purpose
    "Emoji travel as four bytes each: 🦊 🐕 🌞 🚀 ✨ and so do some symbols like € £ ¥ ° ± ∞.",
)

# Weights are normal with std GAIN / sqrt(fan_in) (embeddings: EMBED_STD). With tied embeddings a
# small random model tends to echo its input token forever (the logit of a token is its
# embedding's product with the residual stream, which mostly holds that same embedding); a gain
# well above 1 lets the layers outweigh the embedding, so greedy decoding wanders instead.
GAIN = 4.0
EMBED_STD = 0.05
BIAS_STD = 0.1
# Rows of the (tied) embedding that are shrunk so that their logits stay near zero and greedy
# decoding avoids them: the special tokens (a random model would otherwise often end at once) and
# tokens that are not whole UTF-8 text on their own (they would print as replacement characters)
# and tokens holding control characters other than a newline (they would garble a terminal).
QUIET_ROW_SCALE = 0.01


def write_demo_model(
    dest: Path,
    *,
    arch: Arch = "qwen2",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    chat_template: bool = True,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a demo model to dest (which must not exist yet) and return dest.

    The same arguments give the same bytes. The files are written into a temporary directory
    beside dest and renamed into place, so dest is either absent or a complete model.
    """
    _check_sizes(hidden_size, num_layers, intermediate_size, vocab_size)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    tokenizer = train_tokenizer(vocab_size)
    config = model_config(
        arch,
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=_token_id(tokenizer, IM_END if chat_template else ENDOFTEXT),
    )
    weights = random_weights(config, seed=seed, quiet_ids=quiet_token_ids(tokenizer))
    files: dict[str, bytes] = {
        "config.json": _json_bytes(config),
        "model.safetensors": save_safetensors(weights, metadata={"format": "mlx"}),
        "tokenizer.json": tokenizer.to_str(pretty=False).encode(),
        "tokenizer_config.json": _json_bytes(tokenizer_config(chat_template, tokenizer)),
        "README.md": _readme(arch, seed).encode(),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name, data in files.items():
            _write_durably(tmp / name, data)
        try:
            tmp.rename(dest)
        except OSError as e:
            # Someone else finished writing dest first (rename onto a non-empty dir fails).
            raise FileExistsError(f"{dest} already exists") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _check_sizes(hidden_size: int, num_layers: int, intermediate_size: int, vocab: int) -> None:
    if hidden_size < 16 or hidden_size % 16:
        raise ValueError("hidden_size must be a positive multiple of 16 (heads of 16 dims)")
    if num_layers < 1 or intermediate_size < 1:
        raise ValueError("num_layers and intermediate_size must be positive")
    if vocab < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB}")


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly vocab_size tokens, trained on CORPUS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    size = tokenizer.get_vocab_size()
    if size != vocab_size:
        # The corpus ran out of pairs to merge; the model's vocabulary must match the tokenizer's.
        raise ValueError(f"vocab_size {vocab_size} is too large for the demo corpus (max {size})")
    return tokenizer


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise AssertionError(f"special token {token} missing from the trained tokenizer")
    return token_id


def model_config(
    arch: Arch,
    *,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    vocab_size: int,
    max_position_embeddings: int,
    eos_token_id: int,
) -> dict[str, Any]:
    """config.json: every field mlx-lm's ModelArgs for arch requires, in Hugging Face naming."""
    heads = hidden_size // 16
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": heads,
        # Grouped-query attention when the heads allow it, as in the real models.
        "num_key_value_heads": heads // 2 if heads % 2 == 0 else heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = False
        config["mlp_bias"] = False
    return config


def parameter_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes as mlx-lm's qwen2/llama modules lay them out (tied embeddings).

    qwen2 has biases on q/k/v; llama has none (attention_bias and mlp_bias are false).
    """
    h = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config["num_key_value_heads"])
    head_dim = h // heads
    qkv_bias = config["model_type"] == "qwen2"
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (int(config["vocab_size"]), h),
        "model.norm.weight": (h,),
    }
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (heads * head_dim, h)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_heads * head_dim, h)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_heads * head_dim, h)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, heads * head_dim)
        if qkv_bias:
            shapes[f"{p}.self_attn.q_proj.bias"] = (heads * head_dim,)
            shapes[f"{p}.self_attn.k_proj.bias"] = (kv_heads * head_dim,)
            shapes[f"{p}.self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, inter)
    return shapes


def quiet_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Special tokens, and tokens that would not print as plain text by themselves."""
    byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
    quiet = []
    for token, token_id in tokenizer.get_vocab().items():
        if token in SPECIAL_TOKENS:
            quiet.append(token_id)
            continue
        try:
            text = bytes(byte_of[c] for c in token).decode("utf-8")
        except UnicodeDecodeError:
            quiet.append(token_id)
            continue
        if any(not c.isprintable() and c != "\n" for c in text.replace(" ", "")):
            quiet.append(token_id)
    return sorted(quiet)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character that stands for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def random_weights(
    config: dict[str, Any], *, seed: int, quiet_ids: list[int]
) -> dict[str, np.ndarray[Any, np.dtype[np.float32]]]:
    """Float32 random normal weights (norms: ones); the same seed gives the same values."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = {}
    # Sorted so that the draw order, and with it every value, does not depend on dict order.
    for name, shape in sorted(parameter_shapes(config).items()):
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, dtype=np.float32)
        else:
            std = _std(name, shape)
            draw = rng.standard_normal(shape, dtype=np.float32)
            draw *= np.float32(std)  # in place: a 1 GiB test model needs no second GiB
            weights[name] = draw
    embed = weights["model.embed_tokens.weight"]
    embed[quiet_ids] *= np.float32(QUIET_ROW_SCALE)
    return weights


def _std(name: str, shape: tuple[int, ...]) -> float:
    if name == "model.embed_tokens.weight":
        return EMBED_STD
    if name.endswith(".bias"):
        return BIAS_STD
    return GAIN / float(np.sqrt(shape[-1]))


def tokenizer_config(chat_template: bool, tokenizer: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast over tokenizer.json."""
    added = {
        str(_token_id(tokenizer, t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END if chat_template else ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    return config


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _readme(arch: Arch, seed: int) -> str:
    return (
        "# exod demo model\n\n"
        f"A tiny {arch} transformer with **random weights** (seed {seed}) and a byte-level BPE\n"
        "tokenizer trained on a few paragraphs. Its output is gibberish by design.\n\n"
        "It exists so that you can try exod, and so that the tests can run a real model through\n"
        "mlx-lm, without downloading anything. Use a real model for real answers.\n"
    )
