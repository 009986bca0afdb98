"""Speculative decoding with the real demo model, in process.

At temperature 0 a speculating batch writes exactly what plain decoding writes, token for token,
with non-speculating sequences in the same batch; a rejected draft leaves the KV cache as if it
had never been fed; a sequence cancelled while it carries drafted tokens leaves the batch and the
prefix cache sound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import greedy_sampler

from app.core.types import Finish, GenerationEvent, SamplingParams, TextDelta
from app.engine.decode import use_logits_decode
from app.engine.sampling import TemperatureSampler
from app.engine.scheduler import ModelBatch, Sequence
from app.engine.speculative import (
    NgramDrafter,
    RowOutlook,
    SpeculationPolicy,
    SpeculativeGenerationBatch,
    use_speculative_decode,
)
from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import GatewayProcess
from tests.e2e.test_operations import metric

pytestmark = pytest.mark.e2e

CODE = ("def area(width, height):\n    return width * height\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n\n"
        "def volume(width, height, depth):\n    return width * height * depth\n")
QUESTIONS = [
    f"Repeat this code exactly, nothing else:\n\n{CODE}",  # drafts from the prompt get accepted
    "What is the capital of France?",
    "Copy this line three times: the quick brown fox jumps over the lazy dog.",
    "Name three primary colors.",
]
MAX_TOKENS = 40


class Eager(SpeculationPolicy):
    """Drafts as long as it may whenever there is a draft (the default policy waits for every
    row to have one, and weighs the expected gain): these tests are about correctness."""

    def draft_length(self, rows: list[RowOutlook]) -> int:
        return self.max_draft if any(row.available for row in rows) else 0


EAGER = Eager()


@pytest.fixture(scope="module")
def demo(demo_float32_dir: Path) -> Iterator[tuple[Any, Any]]:
    model, tokenizer = load(str(demo_float32_dir))
    yield model, tokenizer


def prompts_of(tokenizer: Any) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True) for q in QUESTIONS]


def generate(demo: tuple[Any, Any], *, spec_rows: list[int] | None,
             policy: SpeculationPolicy = EAGER, samplers: list[Any] | None = None,
             count: int = len(QUESTIONS)) -> tuple[list[list[int]], Any]:
    """Greedy outputs of every prompt, decoded together in one batch; spec_rows None: plain."""
    model, tokenizer = demo
    generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8,
                               stop_tokens=[[t] for t in tokenizer.eos_token_ids])
    allowed: set[int] = set()
    if spec_rows is None:
        batch: Any = use_logits_decode(generator)
    else:
        batch = use_speculative_decode(generator, set(), allowed, policy)
    prompts = prompts_of(tokenizer)[:count]
    uids = generator.insert(prompts, max_tokens=[MAX_TOKENS] * len(prompts),
                            samplers=samplers)
    allowed.update(uids[i] for i in spec_rows or [])
    got: dict[int, list[int]] = {uid: [] for uid in uids}
    finished: set[int] = set()
    while len(finished) < len(uids):
        for response in generator.next_generated():
            assert response.uid not in finished
            got[response.uid].append(response.token)
            if response.finish_reason is not None:
                finished.add(response.uid)
    generator.close()
    return [got[uid] for uid in uids], batch


def test_greedy_speculation_writes_what_plain_decoding_writes(demo: tuple[Any, Any]) -> None:
    plain, _ = generate(demo, spec_rows=None)
    assert "width" in demo[1].decode(plain[0])  # the copy prompt does copy: drafts can land

    # Speculating rows batched with rows that must not speculate (logprobs, grammars...).
    mixed, batch = generate(demo, spec_rows=[0, 2])
    assert batch.accepted > 0 and batch.drafted > batch.accepted
    assert mixed == plain

    # Every row allowed to, under the default policy (which drafts when the batch gains).
    every, _ = generate(demo, spec_rows=[0, 1, 2, 3], policy=SpeculationPolicy())
    assert every == plain
    alone, batch = generate(demo, spec_rows=[0], policy=SpeculationPolicy(), count=1)
    assert batch.drafted > 0
    assert alone == plain[:1]


def test_sampled_rows_verify_drafts_by_rejection_sampling(demo: tuple[Any, Any]) -> None:
    """Temperature > 0 through the real model: drafts are accepted at a low temperature and the
    sampled answer still quotes the prompt; a seeded row is reproducible. (That the rule
    keeps the distribution: tests/unit/test_speculative.py.)"""
    def samplers() -> list[Any]:
        return [TemperatureSampler(SamplingParams(temperature=0.3, seed=5 + i))
                for i in range(len(QUESTIONS))]

    first, batch = generate(demo, spec_rows=[0, 1, 2, 3], samplers=samplers())
    assert batch.accepted > 0
    assert "def area(" in demo[1].decode(first[0])
    again, _ = generate(demo, spec_rows=[0, 1, 2, 3], samplers=samplers())
    assert again == first


class FixedDrafter(NgramDrafter):
    """Proposes given drafts when the row's history has a given length (prompt + generated)."""

    def __init__(self, drafts: dict[int, list[int]]) -> None:
        super().__init__()
        self.drafts = drafts

    def propose(self, k: int) -> list[int]:
        n = len(self.history)
        if n in self.drafts:
            return self.drafts[n][:k]
        # The batch's cheap check before it reads the last sampled token back.
        return [0] if n + 1 in self.drafts else []


def prefilled(demo: tuple[Any, Any], spec: bool) -> tuple[BatchGenerator, Any, list[int]]:
    """A batch of two prompts (different lengths: left padding) past their first token."""
    model, tokenizer = demo
    generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
    allowed: set[int] = set()
    if spec:
        use_speculative_decode(generator, set(), allowed, EAGER)
    else:
        use_logits_decode(generator)
    uids = generator.insert(prompts_of(tokenizer)[:2], max_tokens=[64, 64])
    allowed.update(uids)
    while len(generator._generation_batch) < 2:
        generator.next()
    return generator, generator._generation_batch, uids


def assert_same_cache(a: Any, b: Any) -> None:
    for layer_a, layer_b in zip(a.prompt_cache, b.prompt_cache, strict=True):
        assert layer_a._idx == layer_b._idx
        assert layer_a.offset.tolist() == layer_b.offset.tolist()
        assert layer_a.left_padding.tolist() == layer_b.left_padding.tolist()
        keys_a, values_a = layer_a.keys_and_values()
        keys_b, values_b = layer_b.keys_and_values()
        assert mx.allclose(keys_a, keys_b, atol=1e-4).item()
        assert mx.allclose(values_a, values_b, atol=1e-4).item()


def test_rejected_drafts_leave_the_cache_as_if_never_fed(demo: tuple[Any, Any]) -> None:
    _, plain, _ = prefilled(demo, spec=False)
    _, spec, _ = prefilled(demo, spec=True)
    assert isinstance(spec, SpeculativeGenerationBatch)
    assert [r.token for r in spec.next()] == [r.token for r in plain.next()]
    # The next step drafts what the model will not pick (ids of rare pieces) in both rows.
    at = [len(tokens) + 1 for tokens in spec.tokens]
    spec._rows[0].drafter = FixedDrafter({at[0]: [9001, 9002, 9003]})
    spec._rows[1].drafter = FixedDrafter({at[1]: [9004, 9005]})
    spec.drafted = 0
    for _ in range(3):
        assert [r.token for r in spec.next()] == [r.token for r in plain.next()]
        assert spec.tokens == plain.tokens
        assert all(not row.carry for row in spec._rows)
        assert_same_cache(spec, plain)
    assert spec.drafted == 5 and spec.accepted == 0
    assert spec._next_tokens.tolist() == plain._next_tokens.tolist()


def test_accepted_drafts_fill_the_cache_as_plain_steps_do(demo: tuple[Any, Any]) -> None:
    _, reference, _ = prefilled(demo, spec=False)
    written = [[r.token for r in reference.next()] for _ in range(10)]  # ten plain steps
    _, plain, _ = prefilled(demo, spec=False)
    _, spec, _ = prefilled(demo, spec=True)
    spec.next()  # the first token of each row
    spec.drafted = spec.accepted = 0
    at = [len(tokens) + 1 for tokens in spec.tokens]
    # Step 2 drafts: row 0 the next four tokens plain decoding wrote (all accepted), row 1 two
    # right then a wrong one: the batch's KV advances 3 (row 1's pending + 2) and row 0 carries
    # the two tokens beyond that (emitted, KV not kept).
    spec._rows[0].drafter = FixedDrafter({at[0]: [written[k][0] for k in range(2, 6)]})
    spec._rows[1].drafter = FixedDrafter({at[1]: [written[2][1], written[3][1], 9001]})
    out = spec.next()
    assert spec.drafted == 7 and spec.accepted == 6
    by_row: dict[int, list[int]] = {}
    for response in out:
        by_row.setdefault(spec.uids.index(response.uid), []).append(response.token)
    assert by_row[0] == [written[k][0] for k in range(1, 6)]
    assert by_row[1] == [written[k][1] for k in range(1, 4)]
    assert [len(row.carry) for row in spec._rows] == [2, 0]
    # Its cache is that of four plain steps, the surplus rolled back.
    for _ in range(4):
        plain.next()
    assert spec.tokens == plain.tokens
    assert_same_cache(spec, plain)
    # Both rows go on as plain decoding does, row 0 feeding its carried tokens again.
    for _ in range(3):
        spec.next()
        plain.next()
        assert spec.tokens == plain.tokens
        assert spec.tokens[0] + spec._rows[0].carry == reference.tokens[0][: len(spec.tokens[0])
                                                                          + 2]
    assert_same_cache(spec, plain)


def sequence(name: str, prompt: list[int], loop: asyncio.AbstractEventLoop,
             sink: list[GenerationEvent], speculative: bool = True) -> Sequence:
    return Sequence(request_id=name, prompt=prompt, max_tokens=MAX_TOKENS,
                    sampler=greedy_sampler, processors=[], stop=[], deliver=sink.extend,
                    loop=loop, speculative=speculative)


def text_of(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_cancelling_a_sequence_mid_draft_is_clean(demo: tuple[Any, Any]) -> None:
    model, tokenizer = demo
    loop = asyncio.new_event_loop()
    stream = mx.default_stream(mx.default_device())

    def run(batch: ModelBatch, seqs: list[Sequence], cancel: Sequence | None = None) -> None:
        for seq in seqs:
            batch.add(seq)
        while len(batch):
            generation = batch._generator._generation_batch
            if cancel is not None and any(row.carry for row in getattr(generation, "_rows", [])):
                cancel.cancelled.set()  # it carries drafted tokens the KV does not hold yet
                cancel = None
            batch.step()
            loop.run_until_complete(asyncio.sleep(0))

    prompts = prompts_of(tokenizer)
    plain = ModelBatch(model, tokenizer, max_batch_size=8, prefill_chunk=512,
                       prompt_cache_bytes=0, stream=stream)
    sinks: list[list[GenerationEvent]] = [[] for _ in prompts]
    run(plain, [sequence(f"p{i}", p, loop, sinks[i]) for i, p in enumerate(prompts)])
    expected = [text_of(s) for s in sinks]
    plain.close()

    batch = ModelBatch(model, tokenizer, max_batch_size=8, prefill_chunk=512,
                       prompt_cache_bytes=64_000_000, stream=stream, speculation=EAGER)
    sinks = [[] for _ in prompts]
    seqs = [sequence(f"s{i}", p, loop, sinks[i], speculative=i in (0, 2))
            for i, p in enumerate(prompts)]
    run(batch, seqs, cancel=seqs[0])
    finish = [e for e in sinks[0] if isinstance(e, Finish)]
    assert seqs[0].cancelled.is_set() and [f.reason for f in finish] == ["cancelled"]
    assert expected[0].startswith(text_of(sinks[0]))
    assert [text_of(s) for s in sinks[1:]] == expected[1:]

    # What the cancelled sequence left in the prefix cache is its KV as computed: the same
    # prompt again reuses it and answers as the plain run did.
    again: list[GenerationEvent] = []
    retry = sequence("again", prompts[0], loop, again)
    run(batch, [retry])
    assert retry.cached_tokens > 0
    assert text_of(again) == expected[0]
    batch.close()
    loop.close()


def answers_with_speculation_off_and_auto(server: GatewayProcess, model: str, source: str
                                          ) -> tuple[dict[str, str], dict[str, float]]:
    """The greedy answer to one question with `speculative` off, then auto, and how many
    tokens each drafted (from /metrics, by draft source)."""
    url = server.base_url + "/v1/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[0]}],
            "max_tokens": MAX_TOKENS, "temperature": 0}

    def drafted_so_far() -> float:
        return metric(httpx.get(server.base_url + "/metrics").text,
                      "mlxgw_speculative_drafted_tokens_total", source=source)

    texts, drafted = {}, {}
    for mode in ("off", "auto"):
        before = drafted_so_far()
        response = httpx.post(url, json={**body, "speculative": mode}, timeout=300)
        assert response.status_code == 200, response.text
        texts[mode] = response.json()["choices"][0]["message"]["content"]
        drafted[mode] = drafted_so_far() - before
    return texts, drafted


def test_through_http_speculation_is_invisible_but_counted(gateway: GatewayProcess) -> None:
    """The gateway speculates by default: the same greedy answer as a request that opts out,
    drafts counted in /metrics only for the one that speculated; a bad value is a 400."""
    texts, drafted = answers_with_speculation_off_and_auto(gateway, DEMO_ID, "prompt_lookup")
    assert texts["auto"] == texts["off"]
    assert drafted["off"] == 0 and drafted["auto"] > 0

    url = gateway.base_url + "/v1/chat/completions"
    body = {"model": DEMO_ID, "messages": [{"role": "user", "content": QUESTIONS[0]}],
            "max_tokens": MAX_TOKENS, "temperature": 0}
    refused = httpx.post(url, json={**body, "speculative": "always"}, timeout=60)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "speculative"


def test_stop_strings_and_max_tokens_cut_inside_an_accepted_run(demo: tuple[Any, Any]) -> None:
    """Accepted drafts reach the stop-string matcher and the max_tokens count one by one: a
    speculating sequence ends exactly where a plain one does."""
    model, tokenizer = demo
    loop = asyncio.new_event_loop()
    stream = mx.default_stream(mx.default_device())
    prompt = prompts_of(tokenizer)[0]

    accepted = []

    def answer(speculation: SpeculationPolicy | None, stop: list[str], max_tokens: int
               ) -> tuple[str, list[Finish]]:
        batch = ModelBatch(model, tokenizer, max_batch_size=4, prefill_chunk=512,
                           prompt_cache_bytes=0, stream=stream, speculation=speculation)
        sink: list[GenerationEvent] = []
        seq = sequence("s", prompt, loop, sink)
        seq.stop, seq.max_tokens = stop, max_tokens
        batch.add(seq)
        while len(batch):
            batch.step()
            loop.run_until_complete(asyncio.sleep(0))
        if speculation is not None:
            accepted.append(batch._generator._generation_batch.accepted)
        batch.close()
        return text_of(sink), [e for e in sink if isinstance(e, Finish)]

    full, _ = answer(None, [], MAX_TOKENS)
    lines = [line for line in full.split("\n")[:-1] if len(line) >= 4]
    stop = lines[-1][-4:]  # four characters from late in the answer
    for stops, limit in (([stop], MAX_TOKENS), ([], MAX_TOKENS - 7)):
        plain_text, plain_finish = answer(None, stops, limit)
        spec_text, spec_finish = answer(EAGER, stops, limit)
        assert spec_text == plain_text and len(plain_text) < len(full)
        assert [(f.reason, f.usage.completion_tokens) for f in spec_finish] == \
            [(f.reason, f.usage.completion_tokens) for f in plain_finish]
    assert all(accepted)  # drafts were accepted on the way to both ends
    loop.close()
