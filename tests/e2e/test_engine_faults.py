"""The engine with the real demo model, in this process, with faults injected through the
engine thread's test hook (`EngineThread.fault`): one broken request, one broken step or one
broken thread must end the affected streams with an error event, never leave them waiting,
and never hurt the others (issue 13, items 2 and 5)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.core.types import Finish, GenerationRequest, SamplingParams
from app.engine.engine import Engine, GenerationStream
from app.errors import EngineFailure, InvalidRequest, Overloaded
from app.limits.admission import Admission
from app.limits.breaker import BreakerState, CircuitBreaker
from app.limits.window import InProcessLimiter
from app.models.registry import ModelRegistry
from app.settings import Settings
from tests.e2e.conftest import DEMO_ID

pytestmark = pytest.mark.e2e
# Nothing here should take long; a hang shows up as this timeout, not as a stuck suite.
DEADLINE = 60.0
WARM = SamplingParams(temperature=0.8, seed=7)


@pytest.fixture
async def engine(demo_float32_dir: Path, tmp_path: Path) -> AsyncIterator[Engine]:
    settings = Settings(cache_dir=tmp_path, config_dir=tmp_path, state_dir=tmp_path,
                        models=[{"id": DEMO_ID, "path": str(demo_float32_dir)}],
                        # cpu_tuning's compiled steps break when a third MLX thread appears
                        # in one process (a pre-existing problem, not what is tested here).
                        engine={"default_max_tokens": 8, "cpu_tuning": False})
    # One engine failure opens this breaker: any failure wrongly blamed on the engine shows.
    breaker = CircuitBreaker(InProcessLimiter(), global_rpm=0, failures=1, cooldown=60)
    engine = Engine(settings, ModelRegistry.from_settings(settings),
                    admission=Admission(8, 8), breaker=breaker)
    await engine.start()
    await engine.ensure_loaded(DEMO_ID)
    try:
        yield engine
    finally:
        engine._thread.fault = None
        await engine.stop()


def request(text: str = "Count to ten:", *, max_tokens: int = 8,
            sampling: SamplingParams = WARM) -> GenerationRequest:
    return GenerationRequest(model=DEMO_ID, request_id=f"t-{time.monotonic_ns()}",
                             prompt=text, max_tokens=max_tokens, sampling=sampling)


async def outcome(stream: GenerationStream) -> Finish | Exception:
    """How the stream ended: its Finish, or the error its Failed event carried."""
    try:
        async with asyncio.timeout(DEADLINE):
            return (await stream.collect())[1]
    except TimeoutError:
        raise
    except Exception as error:
        return error


class Raise:
    """A fault hook: raises at `point`, `times` times (forever when None). Until `go()`,
    the engine thread waits, so every stream submitted before it shares one batch."""

    def __init__(self, point: str, times: int | None = 1) -> None:
        self.point = point
        self.left = times
        self.hits = 0
        self._gate = threading.Event()

    def go(self) -> None:
        self._gate.set()

    def __call__(self, point: str) -> None:
        if point == "add":
            self._gate.wait(DEADLINE)
        if point != self.point or self.left == 0:
            return
        self.hits += 1
        if self.left is not None:
            self.left -= 1
        raise RuntimeError(f"injected fault at {point}")


async def assert_healthy(engine: Engine) -> None:
    """The engine serves a sampled (temperature > 0) request and holds nothing after."""
    assert isinstance(await outcome(await engine.submit(request())), Finish)
    assert engine.admission is not None
    for _ in range(100):  # the release runs on the loop right after the Finish event
        if engine.admission.inflight == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.admission.inflight == 0
    assert engine.dead is None


async def test_a_request_whose_sampling_breaks_fails_alone(engine: Engine) -> None:
    """min_p out of range passes no door when sent in-process; mlx-lm raises inside a
    compiled filter (which also left the global PRNG unusable: every later sampled request
    answered "eval an array without a primitive"). Only that request may fail."""
    engine._thread.fault = hook = Raise("none")  # only to start both in one batch
    victim = await engine.submit(request(max_tokens=12))
    culprit = await engine.submit(request(sampling=SamplingParams(temperature=0.8, min_p=5.0)))
    hook.go()
    victim_end, culprit_end = await asyncio.gather(outcome(victim), outcome(culprit))
    assert isinstance(victim_end, Finish), victim_end
    assert isinstance(culprit_end, InvalidRequest), culprit_end
    assert "min_p" in culprit_end.message
    assert engine.breaker is not None and engine.breaker.state is BreakerState.CLOSED
    await assert_healthy(engine)


async def test_top_k_beyond_the_vocabulary_is_refused_before_it_starts(engine: Engine) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await engine.submit(request(sampling=SamplingParams(temperature=0.8, top_k=100_000)))
    assert refused.value.param == "top_k" and "49152" in refused.value.message
    bias = SamplingParams(logit_bias=((10**6, 1.0),))
    with pytest.raises(InvalidRequest) as refused:
        await engine.submit(request(sampling=bias))
    assert refused.value.param == "logit_bias"
    # top_k equal to the vocabulary keeps every token (mlx-lm alone would refuse it).
    whole = SamplingParams(temperature=0.8, top_k=49152)
    assert isinstance(await outcome(await engine.submit(request(sampling=whole))), Finish)
    await assert_healthy(engine)


async def test_failed_step_fails_its_batch_and_the_engine_goes_on(engine: Engine) -> None:
    engine._thread.fault = hook = Raise("step")
    streams = [await engine.submit(request()) for _ in range(2)]
    hook.go()
    ends = await asyncio.gather(*(outcome(s) for s in streams))
    assert all(isinstance(end, EngineFailure) for end in ends), ends
    assert engine.breaker is not None and engine.breaker.state is BreakerState.OPEN  # counted
    engine.breaker.record_success()
    await assert_healthy(engine)  # a fresh generator, not the half-updated one


@pytest.mark.parametrize("point", ["advance", "forget"])
async def test_fault_outside_the_step_ends_streams_with_an_error(engine: Engine,
                                                                 point: str) -> None:
    """Detokenizing ("advance") fails that sequence alone; removing a finished sequence
    ("forget") fails the batch. Before, either ended the thread and every stream hung."""
    hook = Raise(point)
    engine._thread.fault = hook
    short = await engine.submit(request(max_tokens=2))
    long = await engine.submit(request(max_tokens=12))
    hook.go()
    ends = await asyncio.gather(outcome(short), outcome(long))
    assert hook.hits == 1
    failed = [end for end in ends if isinstance(end, EngineFailure)]
    assert failed and all(isinstance(end, Finish | EngineFailure) for end in ends), ends
    if point == "advance":
        assert len(failed) == 1  # the other sequence finished
    assert engine.breaker is not None
    engine.breaker.record_success()
    await assert_healthy(engine)


async def test_failed_prompt_cache_insert_costs_nothing(engine: Engine) -> None:
    engine._thread.fault = hook = Raise("cache_insert", times=None)
    streams = [await engine.submit(request()) for _ in range(2)]
    hook.go()
    ends = await asyncio.gather(*(outcome(s) for s in streams))
    # A finished sequence's KV goes into the cache right after its last events are sent: one
    # round trip to the engine thread is after that step.
    await engine._thread.call(lambda: None)
    assert hook.hits == 2, ends
    assert all(isinstance(end, Finish) for end in ends), ends
    await assert_healthy(engine)


async def test_failed_add_fails_that_request_and_frees_its_slot(engine: Engine) -> None:
    engine._thread.fault = hook = Raise("add")
    hook.go()
    end = await outcome(await engine.submit(request()))
    assert isinstance(end, EngineFailure), end
    assert engine.breaker is not None
    engine.breaker.record_success()
    await assert_healthy(engine)  # inflight is back to 0: the slot was not kept


async def test_dead_thread_fails_every_stream_and_says_so(engine: Engine) -> None:
    gate = threading.Event()

    def hold_then_die(point: str) -> None:
        if point == "loop":
            gate.wait(DEADLINE)
            raise RuntimeError("injected: the engine loop itself broke")

    running = await engine.submit(request(max_tokens=12))
    engine._thread.fault = hold_then_die
    queued = await engine.submit(request())
    gate.set()
    ends = await asyncio.gather(outcome(running), outcome(queued))
    assert all(isinstance(end, Overloaded) and end.code == "engine_stopped" for end in ends), ends
    assert engine.dead is not None and "engine loop itself broke" in engine.dead
    with pytest.raises(Overloaded):
        await engine.submit(request())
    with pytest.raises(Overloaded):  # nothing waits on a thread that is gone
        await asyncio.wait_for(engine._thread.call(lambda: 1), DEADLINE)
    assert engine.admission is not None and engine.admission.inflight == 0


async def test_unread_stream_gives_back_slot_and_lease_when_the_engine_finishes(
        engine: Engine) -> None:
    stream = await engine.submit(request(max_tokens=4))  # and never read
    assert engine.admission is not None
    for _ in range(int(DEADLINE / 0.02)):
        if engine.admission.inflight == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.admission.inflight == 0
    resident = engine.pool.policy.get(DEMO_ID)
    assert resident is not None and resident.leases == 0
    assert isinstance(await outcome(stream), Finish)  # the events are all still there
