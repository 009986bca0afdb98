"""Continuous batching and the prefix cache, through the real server and the openai SDK."""

from __future__ import annotations

import concurrent.futures
import re
import uuid

import httpx
import openai
import pytest

from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e
QUESTIONS = [
    "What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
    "Say hello in Spanish.", "What do bees make?", "What is the largest ocean?",
    "Name a fruit that is yellow.", "How many legs does a spider have?",
    "What is frozen water called?", "What colour is the sky on a clear day?",
]


def ask(client: openai.OpenAI, question: str, max_tokens: int = 16) -> str:
    pieces = []
    for chunk in client.chat.completions.create(
            model=DEMO_ID, messages=[{"role": "user", "content": question}], stream=True,
            temperature=0, max_tokens=max_tokens):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces)


def metric(gateway: GatewayProcess, name: str) -> float:
    text = httpx.get(gateway.base_url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_ten_concurrent_streams_match_ten_sequential(client: openai.OpenAI) -> None:
    sequential = [ask(client, q) for q in QUESTIONS]
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        concurrent_answers = list(pool.map(lambda q: ask(client, q), QUESTIONS))
    assert all(sequential)
    assert concurrent_answers == sequential


def test_a_cancelled_stream_does_not_disturb_the_others(client: openai.OpenAI,
                                                        gateway: GatewayProcess) -> None:
    keep = QUESTIONS[:3]
    expected = [ask(client, q, 24) for q in keep]
    cancelled_before = metric(gateway, "mlxgw_sequences_cancelled_total")

    def walk_away() -> None:
        with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", timeout=300, json={
                "model": DEMO_ID, "stream": True, "max_tokens": 400, "temperature": 0,
                "messages": [{"role": "user", "content": "Write a long story."}]}) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i >= 4:
                    return

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        leaving = pool.submit(walk_away)
        answers = list(pool.map(lambda q: ask(client, q, 24), keep))
        leaving.result()
    assert answers == expected
    assert metric(gateway, "mlxgw_sequences_cancelled_total") >= cancelled_before + 1


def test_second_turn_hits_the_prefix_cache(client: openai.OpenAI,
                                           gateway: GatewayProcess) -> None:
    history = [
        {"role": "system", "content": "You are a geography tutor. " * 20},
        {"role": "user", "content": "What is the capital of Italy?"},
    ]
    first = client.chat.completions.create(model=DEMO_ID, messages=history,  # type: ignore[arg-type]
                                           temperature=0, max_tokens=12)
    reused = 'mlxgw_prefix_cache_lookups_total{outcome="partial"}'
    hits_before = metric(gateway, reused)
    second = client.chat.completions.create(
        model=DEMO_ID, temperature=0, max_tokens=12,
        messages=[*history,  # type: ignore[list-item]
                  {"role": "assistant", "content": first.choices[0].message.content},
                  {"role": "user", "content": "And of Spain?"}],
    )
    assert metric(gateway, reused) == hits_before + 1
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    # At least the whole first prompt was reused; only the new turn was prefilled.
    assert details.cached_tokens >= first.usage.prompt_tokens
    assert details.cached_tokens < second.usage.prompt_tokens


def test_heartbeats_while_prefilling(gateway: GatewayProcess) -> None:
    """Prefill on this CPU takes longer than the fixture's 0.2 s heartbeat: the stream says
    `: ping` before the first token (a fresh prompt, so no prefix-cache shortcut)."""
    prompt = f"Request {uuid.uuid4()}: " + "Describe the sea at night in detail. " * 12
    with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", timeout=300, json={
            "model": DEMO_ID, "stream": True, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]}) as response:
        lines = [line for line in response.iter_lines() if line]
    first_content = next(i for i, line in enumerate(lines) if '"content":"' in line
                         and '"content":""' not in line)
    assert ": ping" in lines[:first_content], "no heartbeat during prefill"
    assert lines[-1] == "data: [DONE]"
