"""Rebuild a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from GGUF metadata.

GGUF stores the vocabulary, merges, token types and special ids but not the
pre-tokenizer; `tokenizer.ggml.pre` names it, and the splits below mirror what
llama.cpp does for each name. Two vocab kinds exist for llama models:
"gpt2" (byte-level BPE with merges) and "llama" (SentencePiece BPE with scores,
byte fallback), rebuilt the way transformers converts a sentencepiece model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

# token_type values from llama.cpp's vocab
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre value -> pre-tokenizer recipe. "digits": every digit alone, then
# the GPT-2 split (SmolLM/StarCoder style); "llama3": Llama 3's split, digits in threes.
_PRE_RECIPES = {
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "llama-bpe": "llama3", "llama3": "llama3",
}


def check_tokenizer(meta: dict[str, Any]) -> str | None:
    """A reason the vocab cannot be rebuilt, or None."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_RECIPES:
            return (f"tokenizer pre-tokenizer {pre!r} is not supported "
                    f"(supported: {', '.join(sorted(_PRE_RECIPES))})")
        if "tokenizer.ggml.merges" not in meta:
            return "byte-level BPE tokenizer without merges"
        return None
    if model == "llama":
        if "tokenizer.ggml.scores" not in meta:
            return "sentencepiece tokenizer without scores"
        return None
    return f"tokenizer model {model!r} is not supported (supported: gpt2, llama)"


def build_tokenizer_files(meta: dict[str, Any], out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    if meta.get("tokenizer.ggml.model") == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, types)
    else:
        tokenizer = _byte_level_bpe(meta, tokens)
    _add_special_tokens(tokenizer, tokens, types)
    _set_post_processor(tokenizer, meta, tokens)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(meta, tokens)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> Any:
    vocab = _vocab(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    recipe = _PRE_RECIPES[meta.get("tokenizer.ggml.pre", "default")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                     ignore_merges=recipe == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=recipe != "llama3")
    if recipe == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif recipe == "llama3":
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Any:
    scores: list[float] = list(meta["tokenizer.ggml.scores"])
    vocab = _vocab(tokens)
    # SentencePiece BPE merges the adjacent pair whose union scores highest;
    # spelling that out as ranked merges gives the same segmentation.
    ranked: list[tuple[float, int, int, str, str]] = []
    for token_id, piece in enumerate(tokens):
        if types[token_id] != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id],
                                     fuse_unk=True, byte_fallback=True))
    steps: list[Any] = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode_steps: list[Any] = [
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()
    ]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    return tokenizer


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token_id, piece in enumerate(tokens):
        vocab.setdefault(piece, token_id)  # first id wins if a piece repeats
    return vocab


def _add_special_tokens(tokenizer: Any, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens (never split, skipped on decode);
    user-defined ones are added tokens too so the BPE never breaks them apart."""
    added = [
        AddedToken(tokens[i], special=types[i] in (_CONTROL, _UNKNOWN), normalized=False)
        for i in range(len(tokens))
        if types[i] in (_CONTROL, _USER_DEFINED, _UNKNOWN) and tokens[i]
    ]
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])


def _set_post_processor(tokenizer: Any, meta: dict[str, Any], tokens: list[str]) -> None:
    """Prepend BOS / append EOS when the GGUF says so; transformers' generic fast
    tokenizer ignores add_bos_token, so it has to live in tokenizer.json."""
    bos = _special(meta, tokens, "bos") if meta.get("tokenizer.ggml.add_bos_token") else None
    eos = _special(meta, tokens, "eos") if meta.get("tokenizer.ggml.add_eos_token") else None
    steps: list[Any] = []
    if meta.get("tokenizer.ggml.model") == "gpt2":
        steps.append(processors.ByteLevel(trim_offsets=False))
    if bos or eos:
        first = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
        pair = first + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
        specials = [(t, tokens.index(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
        steps.append(processors.TemplateProcessing(
            single=" ".join(first), pair=" ".join(pair), special_tokens=specials
        ))
    if len(steps) == 1:
        tokenizer.post_processor = steps[0]
    elif steps:
        tokenizer.post_processor = processors.Sequence(steps)


def _special(meta: dict[str, Any], tokens: list[str], kind: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{kind}_token_id")
    if isinstance(token_id, int) and 0 <= token_id < len(tokens):
        return tokens[token_id]
    return None


def tokenizer_config(meta: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 4096)),
    }
    for kind, key in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"),
                      ("unknown", "unk_token")):
        token = _special(meta, tokens, kind)
        if token is not None:
            config[key] = token
    template = meta.get("tokenizer.chat_template")
    named = {k.removeprefix("tokenizer.chat_template."): v for k, v in meta.items()
             if k.startswith("tokenizer.chat_template.") and isinstance(v, str)}
    if named and isinstance(template, str):
        config["chat_template"] = [{"name": "default", "template": template}] + [
            {"name": name, "template": text} for name, text in sorted(named.items())
        ]
    elif isinstance(template, str):
        config["chat_template"] = template
    return config
