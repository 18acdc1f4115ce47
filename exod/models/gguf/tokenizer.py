"""The tokenizer files of an MLX model directory, rebuilt from a GGUF's metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary, the merges, each token's type and the
name of the pre-tokenizer under llama.cpp's `tokenizer.ggml.*` keys. This module rebuilds the
tokenizer those keys describe with the `tokenizers` package, the way transformers'
`convert_gguf_tokenizer` does, so that mlx-lm (through transformers) splits text into the same ids
as the model was trained on:

- `gpt2`: byte-level BPE (SmolLM2, Qwen2, Llama 3, Mistral Nemo...). How text is cut into words
  before merging differs per model family; `tokenizer.ggml.pre` names it, and a name not in
  PRE_TOKENIZERS is refused rather than guessed: a wrong split gives the model ids it never saw.
- `llama`: SentencePiece-style BPE over "▁"-spelled words with byte fallback (Llama 2, Mistral 7B,
  TinyLlama...). Files without merges get them derived from the token scores.

Where transformers and llama.cpp (whose tokenizer every GGUF was made and tested with) disagree,
this follows llama.cpp: the pre-tokenizers transformers does not know (`smollm`, `default`...) get
llama.cpp's split rather than GPT-2's, the llama3 family keeps whole-word tokens
(`ignore_merges`), control or user-defined tokens outside the byte alphabet are kept whole
rather than dropped, and BOS is added by llama.cpp's defaults when the file does not say. The
SentencePiece vocabularies of Gemma and Phi-3, which need rules of their own, are refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from exod.errors import ExoError

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The word-splitting rules, as in the original tokenizer.json of each family (llama.cpp spells
# the same rules without `(?i:...)`, which its regex engine lacks).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """How one family cuts text into words: regexes applied in turn, each splitting the pieces
    the previous one left (llama.cpp's `unicode_regex_split`), then byte-level spelling."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a word that is a token stays whole (llama.cpp does the same)
    clean_spaces: bool = True  # transformers' clean_up_tokenization_spaces, as llama.cpp sets it


_GPT2_FAMILY = PreTokenizer((_GPT2,))
_STARCODER = PreTokenizer((r"\p{N}", _GPT2), clean_spaces=False)

# tokenizer.ggml.pre -> its rule, from llama.cpp's llama-vocab.cpp (the families it names).
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # llama.cpp's rule for files written before tokenizer.ggml.pre existed.
    "default": PreTokenizer(
        (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    ),
    **dict.fromkeys(
        ["gpt-2", "phi-2", "mpt", "olmo", "jais", "gigachat", "mellum", "a.x-4.0", "exaone4"],
        _GPT2_FAMILY,
    ),
    **dict.fromkeys(["trillion", "granite-docling"], PreTokenizer((_GPT2,), clean_spaces=False)),
    **dict.fromkeys(
        ["starcoder", "refact", "codeshell", "exaone", "minerva-7b"],
        PreTokenizer((r"\p{N}", _GPT2)),
    ),
    **dict.fromkeys(["smollm", "command-r"], _STARCODER),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
        PreTokenizer((_LLAMA3,), ignore_merges=True),
    ),
    **dict.fromkeys(["dbrx", "smaug-bpe", "glm4", "chatglm-bpe"], PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(
        ["qwen2", "deepseek-r1-qwen", "kormo", "hunyuan", "solar-open", "grok-2"],
        PreTokenizer((_QWEN2,), clean_spaces=False),
    ),
    **dict.fromkeys(["stablelm2", "megrez"], PreTokenizer((_QWEN2,))),
    "qwen35": PreTokenizer((_QWEN35,), clean_spaces=False),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, clean_spaces=False),
    **dict.fromkeys(
        ["gpt-4o", "llama4", "minimax-m2"], PreTokenizer((_GPT4O,), clean_spaces=False)
    ),
}

MODELS = ("gpt2", "llama")

# Architectures whose SentencePiece vocabulary transformers rebuilds with rules of its own (Gemma
# stores spaces and orders merges differently, Phi-3 prefixes spaces in a normalizer).
SENTENCEPIECE_EXCEPTIONS = ("gemma", "gemma2", "gemma3", "gemma3n", "gemma4", "phi3")


@dataclass(frozen=True)
class Vocabulary:
    """The `tokenizer.ggml.*` keys, checked and typed."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    add_space_prefix: bool


def tokenizer_files(meta: Mapping[str, object]) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json for the model directory, by file name.

    Raises ExoError (model_unsupported) for a tokenizer model or pre-tokenizer this cannot
    rebuild, and (weights_corrupt) for tokenizer keys of the wrong type or out of range.
    """
    vocab = vocabulary(meta)
    tokenizer = build_tokenizer(meta, vocab)
    config = tokenizer_config(meta, vocab)
    return {
        "tokenizer.json": tokenizer.to_str(pretty=False).encode(),
        "tokenizer_config.json": (
            json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        ).encode(),
    }


def vocabulary(meta: Mapping[str, object]) -> Vocabulary:
    """The tokenizer keys, checked: ExoError for what cannot be rebuilt or is garbled."""
    if "tokenizer.ggml.model" not in meta or "tokenizer.ggml.tokens" not in meta:
        raise ExoError(
            "model_unsupported",
            "the GGUF has no tokenizer (tokenizer.ggml.model/tokens missing): use a GGUF file "
            "that carries its vocabulary",
        )
    model = _str(meta, "tokenizer.ggml.model")
    pre = _str(meta, "tokenizer.ggml.pre") if "tokenizer.ggml.pre" in meta else None
    tokens = _strs(meta, "tokenizer.ggml.tokens")
    types = _ints(meta, "tokenizer.ggml.token_type") if "tokenizer.ggml.token_type" in meta else []
    scores = _floats(meta, "tokenizer.ggml.scores") if "tokenizer.ggml.scores" in meta else None
    merges = _strs(meta, "tokenizer.ggml.merges") if "tokenizer.ggml.merges" in meta else None
    _check_kind(model, pre, meta.get("general.architecture"), has_merges=merges is not None)
    if model == "llama" and scores is None and merges is None:
        raise ExoError(
            "model_unsupported",
            "the GGUF's SentencePiece tokenizer has neither merges nor scores "
            "(tokenizer.ggml.merges, tokenizer.ggml.scores)",
        )
    if not tokens:
        raise ExoError("weights_corrupt", "the GGUF's tokenizer.ggml.tokens is empty")
    for key, values in (("token_type", types), ("scores", scores or [])):
        if values and len(values) != len(tokens):
            raise ExoError(
                "weights_corrupt",
                f"the GGUF's tokenizer.ggml.{key} has {len(values)} entries for "
                f"{len(tokens)} tokens",
            )
    space = meta.get("tokenizer.ggml.add_space_prefix", model == "llama")
    return Vocabulary(
        model=model,
        pre=pre,
        tokens=[t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)],  # as llama.cpp names them
        types=types,
        scores=scores,
        merges=merges,
        add_space_prefix=_bool(space, "tokenizer.ggml.add_space_prefix"),
    )


def _check_kind(model: str, pre: str | None, arch: object, *, has_merges: bool) -> None:
    if model not in MODELS:
        raise ExoError(
            "model_unsupported",
            f"the GGUF's tokenizer model {model!r} (tokenizer.ggml.model) cannot be converted: "
            f"exod rebuilds {', '.join(MODELS)} tokenizers",
        )
    if model == "llama" and arch in SENTENCEPIECE_EXCEPTIONS:
        raise ExoError(
            "model_unsupported",
            f"the SentencePiece tokenizer of a {arch} GGUF follows rules of its own that exod "
            "does not rebuild yet",
        )
    if model != "gpt2":
        return
    if not has_merges:
        raise ExoError(
            "model_unsupported",
            "the GGUF's byte-level BPE tokenizer has no merges (tokenizer.ggml.merges)",
        )
    if (pre or "default") not in PRE_TOKENIZERS:
        raise ExoError(
            "model_unsupported",
            f"the GGUF's pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one exod knows, "
            f"and guessing would feed the model ids it never saw; known: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}",
        )


def build_tokenizer(meta: Mapping[str, object], vocab: Vocabulary) -> Tokenizer:
    """The `tokenizers` tokenizer the GGUF's metadata describes, special tokens and all."""
    tokenizer = _byte_level(vocab) if vocab.model == "gpt2" else _sentencepiece(vocab, meta)
    _add_special_tokens(tokenizer, vocab)
    bos, eos = special_id(meta, vocab, "bos"), special_id(meta, vocab, "eos")
    tokenizer.post_processor = _post_processor(
        [(vocab.tokens[bos], bos)] if bos is not None and adds_bos(meta, vocab) else [],
        [(vocab.tokens[eos], eos)] if eos is not None and adds_eos(meta) else [],
    )
    return tokenizer


def tokenizer_config(meta: Mapping[str, object], vocab: Vocabulary) -> dict[str, object]:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast over tokenizer.json."""
    bos, eos = special_token(meta, vocab, "bos"), special_token(meta, vocab, "eos")
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": special_token(meta, vocab, "unknown"),
        "pad_token": special_token(meta, vocab, "padding"),
        "add_bos_token": adds_bos(meta, vocab) and bos is not None,
        "add_eos_token": adds_eos(meta) and eos is not None,
        "clean_up_tokenization_spaces": (
            vocab.model == "gpt2" and PRE_TOKENIZERS[vocab.pre or "default"].clean_spaces
        ),
    }
    template = chat_template(meta)
    if template is not None:
        config["chat_template"] = template
    return config


def chat_template(meta: Mapping[str, object]) -> str | list[dict[str, str]] | None:
    """The GGUF's Jinja chat template; with named ones too (tool_use, rag...), in the list
    form transformers reads."""
    default = meta.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}
    if "tokenizer.chat_templates" in meta:  # llama.cpp lists the names of the named ones here
        named = {n: meta.get(prefix + n) for n in _strs(meta, "tokenizer.chat_templates")}
    if default is not None and not isinstance(default, str):
        raise ExoError("weights_corrupt", "the GGUF's tokenizer.chat_template is not text")
    templates = {n: t for n, t in named.items() if isinstance(t, str)}
    if not templates:
        return default
    listed = [{"name": "default", "template": default}] if default is not None else []
    return listed + [{"name": n, "template": t} for n, t in sorted(templates.items())]


def special_token(meta: Mapping[str, object], vocab: Vocabulary, name: str) -> str | None:
    """The text of the bos/eos/unknown/padding token the GGUF names by id, if any."""
    token_id = special_id(meta, vocab, name)
    return None if token_id is None else vocab.tokens[token_id]


def special_id(meta: Mapping[str, object], vocab: Vocabulary, name: str) -> int | None:
    key = f"tokenizer.ggml.{name}_token_id"
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(vocab.tokens):
        raise ExoError(
            "weights_corrupt",
            f"the GGUF's {key} is {value!r}, not a token id below {len(vocab.tokens)}",
        )
    return value


def adds_bos(meta: Mapping[str, object], vocab: Vocabulary) -> bool:
    """Whether a prompt starts with BOS: the file says, else llama.cpp's default for its kind."""
    if "tokenizer.ggml.add_bos_token" in meta:
        return _bool(meta["tokenizer.ggml.add_bos_token"], "tokenizer.ggml.add_bos_token")
    if vocab.model == "llama":
        return True
    rule = PRE_TOKENIZERS[vocab.pre or "default"]
    return rule.ignore_merges  # the llama3 and tekken families: llama.cpp adds BOS for them


def adds_eos(meta: Mapping[str, object]) -> bool:
    value = meta.get("tokenizer.ggml.add_eos_token", False)
    return _bool(value, "tokenizer.ggml.add_eos_token")


def _byte_level(vocab: Vocabulary) -> Tokenizer:
    # Normal tokens are stored spelled in GPT-2's byte alphabet; a few files hold one in plain
    # text, which is respelled as transformers does. Control and user-defined tokens are plain
    # text by design (llama.cpp matches them whole in the input) and stay as they are.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spelling = _bytes_to_unicode()
    ids: dict[str, int] = {}
    for i, text in enumerate(vocab.tokens):
        kind = vocab.types[i] if vocab.types else NORMAL
        plain = kind not in (CONTROL, USER_DEFINED) and not set(text) <= alphabet
        ids["".join(spelling[b] for b in text.encode()) if plain else text] = i
    merges = _merge_pairs(vocab.merges or [])
    rule = PRE_TOKENIZERS[vocab.pre or "default"]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=ids,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=rule.ignore_merges,
        )
    )
    if rule.splits == (_GPT2,):
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=False, trim_offsets=True, use_regex=True
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rule.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(vocab: Vocabulary, meta: Mapping[str, object]) -> Tokenizer:
    ids = {token: i for i, token in enumerate(vocab.tokens)}
    if vocab.merges is not None:
        merges = _merge_pairs(vocab.merges)
    else:
        merges = derive_merges(ids, dict(zip(vocab.tokens, vocab.scores or [], strict=True)))
    tokenizer = Tokenizer(
        models.BPE(
            vocab=ids,
            merges=merges,
            unk_token=special_token(meta, vocab, "unknown"),
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if vocab.add_space_prefix else "never", split=False
    )
    steps: list[decoders.Decoder] = [
        decoders.Replace("▁", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def derive_merges(ids: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary stored without them: every way to build a token
    from two others, best-scored token first (transformers' `generate_merges`)."""
    found: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        pairs = [
            (token[:cut], token[cut:], score)
            for cut in range(1, len(token))
            if token[:cut] in ids and token[cut:] in ids
        ]
        found.extend(sorted(pairs, key=lambda p: (ids[p[0]], ids[p[1]])))
    found.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_special_tokens(tokenizer: Tokenizer, vocab: Vocabulary) -> None:
    # Control tokens (<|im_start|>, <s>) are special: matched whole and skipped when decoding
    # with skip_special_tokens. User-defined ones (<think>) are matched whole but are text.
    types = vocab.types or [NORMAL] * len(vocab.tokens)
    known = tokenizer.get_vocab()
    control = [t for t, k in zip(vocab.tokens, types, strict=True) if k == CONTROL and t in known]
    user = [t for t, k in zip(vocab.tokens, types, strict=True) if k == USER_DEFINED and t in known]
    if control:
        tokenizer.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in control]
        )
    if user:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _post_processor(
    first: list[tuple[str, int]], last: list[tuple[str, int]]
) -> processors.TemplateProcessing:
    """BOS and EOS around each sequence, as the GGUF asks (llama.cpp adds them the same way)."""

    def around(sequence: str, type_id: int) -> list[str]:
        return [
            *(f"{t}:{type_id}" for t, _ in first),
            f"${sequence}:{type_id}",
            *(f"{t}:{type_id}" for t, _ in last),
        ]

    return processors.TemplateProcessing(
        single=around("A", 0),
        pair=around("A", 0) + around("B", 1),
        special_tokens=list(dict.fromkeys(first + last)),
    )


def _merge_pairs(merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        # Split at the first space after the first character, as llama.cpp does: a merge of a
        # space token ("▁" in plain text vocabularies) may itself start with a space.
        cut = merge.find(" ", 1)
        if cut < 0:
            raise ExoError(
                "weights_corrupt",
                f"the GGUF's tokenizer.ggml.merges has a malformed entry {merge!r}",
            )
        pairs.append((merge[:cut], merge[cut + 1 :]))
    return pairs


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible spelling of bytes as printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _str(meta: Mapping[str, object], key: str) -> str:
    value = meta[key]
    if not isinstance(value, str):
        raise ExoError("weights_corrupt", f"the GGUF's {key} is not text")
    return value


def _strs(meta: Mapping[str, object], key: str) -> list[str]:
    value = meta[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ExoError("weights_corrupt", f"the GGUF's {key} is not a list of text")
    return [str(v) for v in value]


def _ints(meta: Mapping[str, object], key: str) -> list[int]:
    value = meta[key]
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ExoError("weights_corrupt", f"the GGUF's {key} is not a list of integers")
    return [int(v) for v in value]


def _floats(meta: Mapping[str, object], key: str) -> list[float]:
    value = meta[key]
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise ExoError("weights_corrupt", f"the GGUF's {key} is not a list of numbers")
    return [float(v) for v in value]


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ExoError("weights_corrupt", f"the GGUF's {key} is not true or false")
    return value
