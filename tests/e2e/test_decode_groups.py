"""A long prompt that joins running streams decodes in a group of its own (decode_groups.py),
with the real demo model, in process: every stream's greedy answer is what it is without the
long prompt, and the long prompt's answer is what it is alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.sample_utils import greedy_sampler

from app import metrics
from app.core.types import Finish, GenerationEvent, TextDelta
from app.engine.decode_groups import DecodeGroups
from app.engine.scheduler import ModelBatch, Sequence
from app.engine.speculative import SpeculationPolicy

pytestmark = pytest.mark.e2e

SHORT = ["What is the capital of France?", "Name three primary colors.",
         "Count from one to ten."]
LONG = ("Read these notes, then say what the heron carried.\n"
        + "\n".join(f"Note {i}: the heron carried {i % 7 + 2} stones to the mill." for i in
                    range(40)))
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def demo(demo_float32_dir: Path) -> Iterator[tuple[Any, Any]]:
    model, tokenizer = load(str(demo_float32_dir))
    yield model, tokenizer


def chat(tokenizer: Any, question: str) -> list[int]:
    ids: list[int] = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True)
    return ids


def answers(demo: tuple[Any, Any], short: list[str], long: str | None, *,
            separate: bool, speculation: SpeculationPolicy | None = None
            ) -> tuple[dict[str, str], int]:
    """Every prompt's greedy answer; the long one (if any) is added once the short ones
    decode. `separate`: any padding is worth a group of its own. Also returns the most
    groups that decoded at once."""
    model, tokenizer = demo
    loop = asyncio.new_event_loop()
    batch = ModelBatch(model, tokenizer, max_batch_size=8, prefill_chunk=512,
                       prompt_cache_bytes=0, stream=mx.default_stream(mx.default_device()),
                       speculation=speculation)
    groups = batch._generator._generation_batch
    assert isinstance(groups, DecodeGroups)
    if separate:
        groups.forward_bytes = 0
    sinks: dict[str, list[GenerationEvent]] = {}

    def add(name: str, question: str) -> None:
        sinks[name] = []
        batch.add(Sequence(request_id=name, prompt=chat(tokenizer, question),
                           max_tokens=MAX_TOKENS, sampler=greedy_sampler, processors=[],
                           stop=[], deliver=sinks[name].extend, loop=loop, owner=name))

    for i, question in enumerate(short):
        add(f"s{i}", question)
    most = 0
    steps = 0
    while len(batch) or (long is not None and "long" not in sinks):
        if long is not None and steps == (4 if short else 0):
            add("long", long)
        batch.step()
        steps += 1
        most = max(most, sum(1 for g in groups.groups if len(g)))
        loop.run_until_complete(asyncio.sleep(0))
    batch.close()
    loop.close()
    texts = {}
    for name, sink in sinks.items():
        assert isinstance(sink[-1], Finish)
        texts[name] = "".join(e.text for e in sink if isinstance(e, TextDelta))
    return texts, most


def test_a_long_prompt_in_its_own_group_changes_no_answer(demo: tuple[Any, Any]) -> None:
    alone, _ = answers(demo, SHORT, None, separate=True)
    long_alone, _ = answers(demo, [], LONG, separate=True)
    mixed, most = answers(demo, SHORT, LONG, separate=True)
    assert most == 2  # the long prompt decoded beside the short ones, in its own group
    assert all(alone.values())
    assert {k: v for k, v in mixed.items() if k != "long"} == alone
    assert mixed["long"] == long_alone["long"]
    # The old way (one group, the short rows padded to the long one) answers the same.
    merged, most = answers(demo, SHORT, LONG, separate=False)
    assert most == 1
    assert merged == mixed


def test_speculating_groups_answer_as_plain_decoding(demo: tuple[Any, Any]) -> None:
    """Each group is a speculative batch of its own (drafts verified per group)."""
    plain, _ = answers(demo, SHORT, LONG, separate=True)
    counter = metrics.SPEC_DRAFTED.labels("prompt_lookup")
    drafted = counter._value.get()
    speculating, most = answers(demo, SHORT, LONG, separate=True,
                                speculation=SpeculationPolicy())
    assert most == 2
    assert counter._value.get() > drafted  # drafts were verified
    assert speculating == plain
