"""Whether a `[[models]] draft` can draft for its model: the same tokenizer, so a draft token id
means the same text to both (speculative decoding compares ids, never text).

Checked at start (`serve` refuses the config) and by `doctor`, on the files; and again when the
pair is loaded (a GGUF model's tokenizer exists only once converted).
"""

from __future__ import annotations

from typing import Any

from app.models.registry import ModelRegistry, ModelSpec

# Code, prose, digits, whitespace runs and non-ASCII: two tokenizers that agree on this agree
# on their merges and special handling, not only on their size.
PROBE = ("def total(items):\n    return sum(i.price * 2 for i in items)  # 42\n"
         "Der Bär aß 12 Äpfel — ¿qué? 东京 🙂\t\n\n")


def vocabulary_size(tokenizer: Any) -> int:
    """Token ids the tokenizer knows (added tokens included)."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        return len(inner)
    except TypeError:
        return int(getattr(inner, "vocab_size", 0) or 0)


def tokenizer_mismatch(target: Any, draft: Any) -> str | None:
    """Why `draft`'s tokenizer cannot stand in for `target`'s; None when they agree."""
    sizes = vocabulary_size(target), vocabulary_size(draft)
    if sizes[0] != sizes[1]:
        return f"vocabularies differ ({sizes[0]} vs {sizes[1]} tokens)"
    if list(target.encode(PROBE)) != list(draft.encode(PROBE)):
        return "the same text encodes to different token ids"
    return None


def draft_problems(registry: ModelRegistry) -> list[str]:
    """One line per model whose draft cannot draft for it (MLX folders; a GGUF pair is
    checked when loaded)."""
    problems: list[str] = []
    for spec in registry:
        if spec.draft is None:
            continue
        draft = registry.get(spec.draft)
        if draft is None or draft.id == spec.id:
            problems.append(f"model {spec.id!r}: draft {spec.draft!r} is not another "
                            "configured model")
            continue
        if spec.format != "mlx" or draft.format != "mlx":
            continue
        try:
            why = tokenizer_mismatch(_tokenizer(spec), _tokenizer(draft))
        except Exception as error:  # unreadable files: say so, as a config problem
            why = f"its tokenizer cannot be read ({error})"
        if why is not None:
            problems.append(f"model {spec.id!r}: draft {draft.id!r} cannot draft for it: "
                            f"{why}; a draft model must share the model's tokenizer")
    return problems


def _tokenizer(spec: ModelSpec) -> Any:
    from mlx_lm.tokenizer_utils import load

    return load(spec.path)
