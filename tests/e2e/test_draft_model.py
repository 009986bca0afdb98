"""Speculative decoding with a draft model (`[[models]] draft = "<id>"`), with real models.

The demo model is the only model here, so the drafts come from it: a shallow copy (20 of its 30
layers, `make_layer_skip_variant`) that agrees with it on a few tokens in ten, so drafts are
often rejected and the draft model's cache must roll back; or the same weights, which agree on
nearly every token. At temperature 0 a batch drafting with either writes exactly what plain
decoding writes, with rows that do not speculate in the same batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from app.core.types import SamplingParams
from app.engine.decode import use_logits_decode
from app.engine.draft_model import DraftModel
from app.engine.sampling import TemperatureSampler
from app.engine.scheduler import _vocab_size
from app.engine.speculative import (
    SpeculationPolicy,
    SpeculativeGenerationBatch,
    use_speculative_decode,
)
from app.models.draft_check import draft_problems
from app.models.registry import ModelRegistry
from app.models.variants import make_layer_skip_variant
from app.settings import load_settings
from tests.e2e.gateway_process import GatewayProcess
from tests.e2e.test_speculative import (
    QUESTIONS,
    Eager,
    answers_with_speculation_off_and_auto,
    prompts_of,
)

pytestmark = pytest.mark.e2e

MAX_TOKENS = 24
SHALLOW_LAYERS = [*range(10), *range(20, 30)]


@pytest.fixture(scope="session")
def shallow_dir(demo_float32_dir: Path) -> Path:
    target = demo_float32_dir.parent / f"{demo_float32_dir.name}-skip20"
    return make_layer_skip_variant(demo_float32_dir, target, SHALLOW_LAYERS, exist_ok=True)


@pytest.fixture(scope="module")
def target(demo_float32_dir: Path) -> Iterator[tuple[Any, Any]]:
    model, tokenizer = load(str(demo_float32_dir))[:2]
    yield model, tokenizer


@pytest.fixture(scope="module")
def shallow(target: tuple[Any, Any], shallow_dir: Path) -> DraftModel:
    model = load(str(shallow_dir))[0]
    return DraftModel(model, vocab=_vocab_size(*target), model_id="shallow")


def generate(target: tuple[Any, Any], *, spec_rows: list[int] | None,
             draft: DraftModel | None = None, samplers: list[Any] | None = None,
             policy: SpeculationPolicy | None = None, check_every: int = 0,
             ) -> tuple[list[list[int]], Any]:
    """Every prompt's output, decoded together in one batch; spec_rows None: plain decoding.
    `check_every` n: every n steps, each row's draft cache is compared with a fresh prefill."""
    model, tokenizer = target
    generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8,
                               stop_tokens=[[t] for t in tokenizer.eos_token_ids])
    allowed: set[int] = set()
    if spec_rows is None:
        batch: Any = use_logits_decode(generator)
    else:
        batch = use_speculative_decode(generator, set(), allowed, policy or Eager(max_draft=4),
                                       draft)
    prompts = prompts_of(tokenizer)
    uids = generator.insert(prompts, max_tokens=[MAX_TOKENS] * len(prompts), samplers=samplers)
    allowed.update(uids[i] for i in spec_rows or [])
    got: dict[int, list[int]] = {uid: [] for uid in uids}
    finished: set[int] = set()
    steps = 0
    while len(finished) < len(uids):
        for response in generator.next_generated():
            got[response.uid].append(response.token)
            if response.finish_reason is not None:
                finished.add(response.uid)
        steps += 1
        if check_every and steps % check_every == 0 and draft is not None:
            assert_draft_caches_hold_their_tokens(generator._generation_batch, draft)
    generator.close()
    return [got[uid] for uid in uids], batch


def assert_draft_caches_hold_their_tokens(batch: Any, draft: DraftModel) -> None:
    """A row's draft-model KV after rollbacks equals the KV of prefilling the tokens it says it
    holds, and those tokens are the row's own (what the target accepted) plus at most the
    drafts of the last step."""
    if not isinstance(batch, SpeculativeGenerationBatch):
        return
    for i, state in enumerate(batch._rows):
        row = state.drafted_by
        if row is None or row.cache is None or not row.tokens:
            continue
        assert row.tokens[: row.sure] == [*batch.tokens[i], *state.carry][: row.sure]
        fresh = make_prompt_cache(draft.model)
        draft.model(mx.array(row.tokens)[None], cache=fresh)
        for held, expected in zip(row.cache, fresh, strict=True):
            assert held.offset == expected.offset == len(row.tokens)
            n = held.offset
            assert mx.allclose(held.keys[..., :n, :], expected.keys[..., :n, :],
                               atol=1e-3).item()
            assert mx.allclose(held.values[..., :n, :], expected.values[..., :n, :],
                               atol=1e-3).item()


def test_greedy_with_a_draft_model_writes_what_plain_decoding_writes(
        target: tuple[Any, Any], shallow: DraftModel) -> None:
    plain, _ = generate(target, spec_rows=None)
    # A shallow draft, often wrong: its cache rolls back; rows 1 and 3 do not speculate.
    mixed, batch = generate(target, spec_rows=[0, 2], draft=shallow, check_every=3)
    assert batch.source == "draft_model"
    assert batch.accepted > 0 and batch.drafted > batch.accepted
    assert mixed == plain
    # The target's own weights as the draft: nearly every draft lands, every row speculates.
    same = DraftModel(target[0], vocab=_vocab_size(*target), model_id="same")
    every, batch = generate(target, spec_rows=[0, 1, 2, 3], draft=same)
    assert batch.accepted >= 0.9 * batch.drafted > 0
    assert every == plain


def test_sampled_rows_draw_drafts_from_the_draft_model(target: tuple[Any, Any]) -> None:
    """Temperature > 0: the draft is sampled from the draft model and verified with its q
    (`rejection_inputs`); with q == p every draft stands. A seeded row is reproducible. (That
    the rule keeps the target's distribution: tests/unit/test_speculative.py.)"""
    def samplers() -> list[Any]:
        return [TemperatureSampler(SamplingParams(temperature=0.3, seed=5 + i))
                for i in range(len(QUESTIONS))]

    same = DraftModel(target[0], vocab=_vocab_size(*target), model_id="same")
    first, batch = generate(target, spec_rows=[0, 1, 2, 3], draft=same, samplers=samplers())
    assert batch.drafted > 0 and batch.accepted >= 0.9 * batch.drafted
    assert "def area(" in target[1].decode(first[0])
    again, _ = generate(target, spec_rows=[0, 1, 2, 3], draft=same, samplers=samplers())
    assert again == first


def tampered_copy(folder: Path, where: Path) -> Path:
    """`folder` with one token added to its tokenizer: a different vocabulary."""
    where.mkdir()
    for item in folder.iterdir():
        if item.name != "tokenizer.json":
            (where / item.name).symlink_to(item)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    size = len(tokenizer["model"]["vocab"])
    tokenizer["added_tokens"].append({
        "id": size + 1000, "content": "<|tampered|>", "single_word": False, "lstrip": False,
        "rstrip": False, "normalized": False, "special": True})
    (where / "tokenizer.json").write_text(json.dumps(tokenizer))
    return where


def test_a_draft_with_another_tokenizer_is_refused_at_start(
        tmp_path: Path, demo_float32_dir: Path, demo_model_dir: Path) -> None:
    def problems(draft_path: Path) -> list[str]:
        settings = load_settings(models=[
            {"id": "big", "path": str(demo_float32_dir), "draft": "small"},
            {"id": "small", "path": str(draft_path)}])
        return draft_problems(ModelRegistry.build(settings, demo_path=None,
                                                  log_warnings=False))

    assert problems(demo_model_dir) == []  # the 4-bit weights: the same tokenizer
    other = tampered_copy(demo_float32_dir, tmp_path / "other")
    (problem,) = problems(other)
    assert "model 'big': draft 'small' cannot draft for it: vocabularies differ" in problem

    (tmp_path / "gw").mkdir()
    server = GatewayProcess(tmp_path / "gw", {"auth": {"enabled": False}, "models": [
        {"id": "big", "path": str(demo_float32_dir), "draft": "small"},
        {"id": "small", "path": str(other)}]})
    with pytest.raises(RuntimeError, match="exited with 2") as failure:
        server.start(timeout=120)
    assert "config error: model 'big': draft 'small' cannot draft for it" in str(failure.value)


def test_through_http_a_configured_draft_model_drafts(tmp_path: Path, demo_float32_dir: Path
                                                      ) -> None:
    """`[[models]] draft`: the same greedy answer with speculation on and off; the drafts are
    counted under source="draft_model". The draft is 4 of the demo's 30 layers (cheap enough
    for the policy to try it; it is rarely right)."""
    four = make_layer_skip_variant(demo_float32_dir, tmp_path / "four", [0, 1, 28, 29])
    server = GatewayProcess(tmp_path, {
        "auth": {"enabled": False},
        "models": [{"id": "target", "path": str(demo_float32_dir), "draft": "four"},
                   {"id": "four", "path": str(four)}]}).start()
    try:
        texts, drafted = answers_with_speculation_off_and_auto(server, "target", "draft_model")
        assert texts["auto"] == texts["off"]
        assert drafted["off"] == 0 and drafted["auto"] > 0
    finally:
        server.stop()
