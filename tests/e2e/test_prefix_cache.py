"""The prefix cache with the real engine and the real demo model, in process.

For every way a turn can end, the next turn of the same owner reuses exactly the KV that was
computed, and answers (temperature 0) as a cold run does; another owner never reuses it; and the
bytes the cache counts are the bytes MLX really holds for it.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from prometheus_client import REGISTRY

from app.core.types import (
    ChatMessage,
    Failed,
    Finish,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from app.engine.engine import Engine, GenerationStream
from app.engine.prompt import prompt_tokens
from app.engine.scheduler import EARLY_INSERT_MIN_TOKENS, ModelBatch
from app.models.registry import ModelRegistry
from app.settings import Settings
from tests.e2e.conftest import DEMO_ID

pytestmark = pytest.mark.e2e
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
async def engine(demo_float32_dir: Path) -> AsyncIterator[Engine]:
    settings = Settings(models=[{"id": DEMO_ID, "path": demo_float32_dir}],  # type: ignore[list-item]
                        # cpu_tuning's side stream belongs to the first MLX thread of a process;
                        # other in-process engines (test_engine_faults) run without it too.
                        engine={"prompt_cache_bytes": "256MB",  # type: ignore[arg-type]
                                "cpu_tuning": False,
                                # The memory tier alone (its byte accounting is measured
                                # here); the disk tier has tests/e2e/test_disk_cache.py.
                                "disk_cache_bytes": 0})
    engine = Engine(settings, ModelRegistry.build(settings, demo_path=None))
    await engine.start()
    await engine.ensure_loaded(DEMO_ID)
    yield engine
    await engine.stop()


def history(notes: int) -> list[ChatMessage]:
    """A conversation nobody sent before (a fresh nonce), about 25 tokens per note."""
    nonce = uuid.uuid4().hex[:8]
    messages = [ChatMessage("system", f"Session {nonce}. You keep a logbook of animals.")]
    for i in range(notes):
        messages.append(ChatMessage("user", f"Log note {i}: a heron carried {i + 3} stones "
                                            f"to the mill near the marsh."))
        messages.append(ChatMessage("assistant", f"Logged note {i}."))
    return messages


def request(messages: list[ChatMessage], owner: str, *, max_tokens: int = 12,
            stop: list[str] | None = None) -> GenerationRequest:
    return GenerationRequest(model=DEMO_ID, request_id=uuid.uuid4().hex, messages=messages,
                             max_tokens=max_tokens, sampling=GREEDY, stop=stop or [],
                             owner=owner)


async def run(engine: Engine, req: GenerationRequest) -> tuple[str, Finish]:
    stream = await engine.submit(req)
    return await stream.collect()


async def first_delta(stream: GenerationStream) -> None:
    async for event in stream:
        if isinstance(event, TextDelta) and event.text:
            return
        assert not isinstance(event, Finish | Failed), event
    raise AssertionError("the stream ended without text")


def tokens_of(engine: Engine, req: GenerationRequest) -> list[int]:
    return prompt_tokens(engine.loaded_models()[DEMO_ID].tokenizer, req)


def inserts(reason: str) -> float:
    value = REGISTRY.get_sample_value("mlxgw_prefix_cache_inserts_total", {"reason": reason})
    return value or 0.0


async def wait_for_insert(reason: str, before: float) -> None:
    deadline = time.monotonic() + 60
    while inserts(reason) <= before:
        assert time.monotonic() < deadline, f"no prefix-cache insert ({reason})"
        await asyncio.sleep(0.05)


def batch_of(engine: Engine) -> ModelBatch:
    return engine.loaded_models()[DEMO_ID].batch


async def end_by_natural_stop(engine: Engine, req: GenerationRequest) -> None:
    req.max_tokens = 200
    _, finish = await run(engine, req)
    assert finish.reason == "stop"


async def end_by_max_tokens(engine: Engine, req: GenerationRequest) -> None:
    req.max_tokens = 3
    _, finish = await run(engine, req)
    assert finish.reason == "length" and finish.usage.completion_tokens == 3


async def end_by_stop_string(engine: Engine, req: GenerationRequest) -> None:
    cold, _ = await run(engine, request(req.messages or [], f"cold-{uuid.uuid4().hex}",
                                        max_tokens=24))
    req.stop = [cold.split()[1]]  # its second word: it stops after a few tokens
    req.max_tokens = 24
    text, finish = await run(engine, req)
    assert finish.reason == "stop" and len(text) < len(cold)


async def end_by_client_disconnect(engine: Engine, req: GenerationRequest) -> None:
    before = inserts("cancelled")
    req.max_tokens = 200
    stream = await engine.submit(req)
    await first_delta(stream)
    await stream.aclose()  # what the API does when the client goes away
    await wait_for_insert("cancelled", before)


async def end_by_drain(engine: Engine, req: GenerationRequest) -> None:
    req.max_tokens = 200
    stream = await engine.submit(req)
    await first_delta(stream)
    await engine.end_all_streams("The server is shutting down; retry shortly.")  # SIGTERM
    events = [event async for event in stream]
    assert isinstance(events[-1], Failed)


async def end_by_failed_step(engine: Engine, req: GenerationRequest) -> None:
    """A batch step that raises (what a bad request in another sequence does)."""
    req.max_tokens = 200
    stream = await engine.submit(req)
    await first_delta(stream)
    batch = batch_of(engine)
    real_next = batch._generator.next

    def broken_once() -> Any:
        batch._generator.next = real_next
        raise RuntimeError("injected step failure")

    await engine._thread.call(lambda: setattr(batch._generator, "next", broken_once))
    async for _ in stream:
        pass


ENDINGS: dict[str, Callable[[Engine, GenerationRequest], Awaitable[None]]] = {
    "natural stop": end_by_natural_stop,
    "max_tokens": end_by_max_tokens,
    "stop string": end_by_stop_string,
    "client disconnect": end_by_client_disconnect,
    "SIGTERM drain": end_by_drain,
    "failed step": end_by_failed_step,
}


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_next_turn_reuses_what_the_first_computed(engine: Engine, ending: str) -> None:
    owner = f"key-{uuid.uuid4().hex}"
    first_messages = [*history(6), ChatMessage("user", "What is 2 + 2? Answer with a number.")]
    first = request(first_messages, owner)
    await ENDINGS[ending](engine, first)
    # The next turn renders an assistant message the model did not write (an edited answer):
    # it shares exactly the first prompt, whatever was generated after it.
    second = request([*first_messages, ChatMessage("assistant", "Zebra."),
                      ChatMessage("user", "Which animal did I log?")], owner)
    text, finish = await run(engine, second)
    assert finish.usage.cached_tokens == len(tokens_of(engine, first))
    cold_text, cold = await run(engine, request(second.messages or [], f"cold-{owner}"))
    assert cold.usage.cached_tokens == 0
    assert text == cold_text


async def test_a_stopped_turn_keeps_its_generated_tokens_too(engine: Engine) -> None:
    """Stopped after a few tokens, then continued with what was shown: the generated tokens
    the client saw are reused as well, not only the prompt."""
    owner = f"key-{uuid.uuid4().hex}"
    first_messages = [*history(8), ChatMessage("user", "Describe a heron in two sentences.")]
    first = request(first_messages, owner, max_tokens=200)
    stream = await engine.submit(first)
    shown: list[str] = []
    before = inserts("cancelled")
    async for event in stream:
        if isinstance(event, TextDelta):
            shown.append(event.text)
            if len("".join(shown).split()) >= 4:
                break
    await stream.aclose()
    await wait_for_insert("cancelled", before)
    second = request([*first_messages, ChatMessage("assistant", "".join(shown)),
                      ChatMessage("user", "Go on.")], owner)
    _, finish = await run(engine, second)
    assert finish.usage.cached_tokens > len(tokens_of(engine, first))


async def test_another_owner_never_reuses_a_prefix(engine: Engine) -> None:
    messages = [*history(8), ChatMessage("user", "Name one bird.")]
    alice, mallory = f"key-{uuid.uuid4().hex}", f"key-{uuid.uuid4().hex}"
    await run(engine, request(messages, alice, max_tokens=2))
    _, other = await run(engine, request(messages, mallory, max_tokens=2))
    assert other.usage.cached_tokens == 0
    _, again = await run(engine, request(messages, alice, max_tokens=2))
    assert again.usage.cached_tokens == len(tokens_of(engine, request(messages, alice))) - 1


async def test_a_long_prompt_is_reusable_while_its_answer_is_generated(engine: Engine) -> None:
    owner = f"key-{uuid.uuid4().hex}"
    shared = history(14)
    first = request([*shared, ChatMessage("user", "List every note.")], owner, max_tokens=200)
    second = request([*shared, ChatMessage("user", "Which place?")], owner, max_tokens=4)
    a, b = tokens_of(engine, first), tokens_of(engine, second)
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert common >= EARLY_INSERT_MIN_TOKENS
    before = inserts("prefilled")
    stream = await engine.submit(first)
    await first_delta(stream)  # prefill done, the answer is being generated
    assert inserts("prefilled") > before
    _, finish = await run(engine, second)
    assert finish.usage.cached_tokens == common
    await stream.aclose()


async def test_the_counted_bytes_are_the_bytes_held(engine: Engine) -> None:
    """Rows finishing out of a wide batch: dropping the cache frees what it counted, not the
    batch-wide buffers its entries used to pin."""
    batch = batch_of(engine)
    await engine._thread.call(batch._prefix.clear)
    owner = f"key-{uuid.uuid4().hex}"
    reqs = [request([*history(1 + 2 * i), ChatMessage("user", "Name a bird.")], owner,
                    max_tokens=2 + i) for i in range(5)]
    await asyncio.gather(*(run(engine, r) for r in reqs))

    def drop() -> tuple[int, int]:
        gc.collect()
        counted, before = batch.prompt_cache_bytes, int(mx.get_active_memory())
        batch._prefix.clear()
        gc.collect()
        return counted, before - int(mx.get_active_memory())

    counted, freed = await engine._thread.call(drop)
    assert counted > 0
    assert abs(freed - counted) <= 0.05 * counted, (counted, freed)


async def test_requests_arriving_together_compute_a_shared_prefix_once(engine: Engine) -> None:
    """The second waits for the first's prefill instead of prefilling the same prefix beside
    it, then answers as a cold run does."""
    owner = f"key-{uuid.uuid4().hex}"
    shared = history(14)
    first = request([*shared, ChatMessage("user", "List every note.")], owner, max_tokens=4)
    second = request([*shared, ChatMessage("user", "Which place?")], owner, max_tokens=8)
    a, b = tokens_of(engine, first), tokens_of(engine, second)
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    (_, one), (text, two) = await asyncio.gather(run(engine, first), run(engine, second))
    assert one.usage.cached_tokens == 0
    assert two.usage.cached_tokens == common
    cold_text, _ = await run(engine, request(second.messages or [], f"cold-{owner}",
                                              max_tokens=8))
    assert text == cold_text
