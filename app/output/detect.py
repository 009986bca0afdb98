"""Which output format a model writes, found once per tokenizer.

mlx-lm's own detection comes first (the TokenizerWrapper's `tool_parser` / `tool_call_start`,
inferred from the chat template); families it does not know (Llama, DeepSeek, gpt-oss) are
recognised by their template markers. A template with no tool support gets the gateway's
generic format, which the gateway also renders into the prompt.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

from app.output.formats import FORMATS, MLX_LM_PARSERS, Format, mlx_lm_format


@dataclass(frozen=True)
class ModelOutput:
    """What one model's output looks like."""

    format: Format | None  # None: gpt-oss (Harmony), parsed by app/output/harmony.py
    harmony: bool = False
    template_tools: bool = True  # False: the gateway renders the tools (generic format)
    think: tuple[tuple[str, str], ...] = (("<think>", "</think>"),)


_CACHE: weakref.WeakKeyDictionary[Any, ModelOutput] = weakref.WeakKeyDictionary()


def model_output(tokenizer: Any) -> ModelOutput:
    try:
        return _CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    found = _detect(tokenizer)
    with contextlib.suppress(TypeError):
        _CACHE[tokenizer] = found
    return found


def _template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers keep named templates
        template = template.get("tool_use") or template.get("default")
    return template if isinstance(template, str) else ""


def _think_pairs(tokenizer: Any, fmt: Format | None) -> tuple[tuple[str, str], ...]:
    start = getattr(tokenizer, "think_start", None)
    end = getattr(tokenizer, "think_end", None)
    pairs = list(fmt.think) if fmt is not None else []
    if isinstance(start, str) and isinstance(end, str) and (start, end) not in pairs:
        pairs.insert(0, (start, end))
    if not pairs:
        pairs = [("<think>", "</think>")]
    return tuple(pairs)


def _with_think(fmt: Format, think: tuple[tuple[str, str], ...]) -> Format:
    return Format(fmt.name, fmt.blocks, fmt.wrappers, think, fmt.leading_call, fmt.extra_markers)


def _detect(tokenizer: Any) -> ModelOutput:
    template = _template(tokenizer)
    if "<|channel|>" in template and "<|message|>" in template:
        return ModelOutput(format=None, harmony=True)
    fmt: Format | None = None
    parser_name = _mlx_lm_parser_name(tokenizer)
    if parser_name in MLX_LM_PARSERS:
        fmt = FORMATS[MLX_LM_PARSERS[parser_name]]
    elif parser_name is not None:
        start = getattr(tokenizer, "tool_call_start", None)
        end = getattr(tokenizer, "tool_call_end", None) or ""
        parse = getattr(tokenizer, "tool_parser", None)
        if isinstance(start, str) and parse is not None:
            fmt = mlx_lm_format(parser_name, start, end, parse)
    if fmt is None:
        if "tool▁calls▁begin" in template or "｜DSML｜" in template:
            fmt = FORMATS["deepseek"]
        elif "<|python_tag|>" in template or "<|python_start|>" in template or (
                "ipython" in template and "tools" in template):
            fmt = FORMATS["llama"]
        elif "<tool_call>" in template:
            fmt = FORMATS["hermes"]
    if fmt is None:
        generic = FORMATS["generic"]
        return ModelOutput(format=_with_think(generic, _think_pairs(tokenizer, generic)),
                           template_tools=False)
    think = _think_pairs(tokenizer, fmt) if fmt.think else ()
    return ModelOutput(format=_with_think(fmt, think), think=think)


def _mlx_lm_parser_name(tokenizer: Any) -> str | None:
    """The mlx_lm.tool_parsers module mlx-lm chose for this tokenizer, if any."""
    parse = getattr(tokenizer, "tool_parser", None)
    module = getattr(parse, "__module__", "") or ""
    if module.startswith("mlx_lm.tool_parsers."):
        return module.rsplit(".", 1)[-1]
    return None


def starts_in_reasoning(prompt: str, think: tuple[tuple[str, str], ...]) -> bool:
    """True when the prompt ends inside an open think block (the template opened it)."""
    tail = prompt[-200:]
    for start, end in think:
        opened = tail.rfind(start)
        if opened >= 0 and tail.rfind(end) < opened:
            return True
    return False
