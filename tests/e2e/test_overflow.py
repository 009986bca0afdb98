"""Requests bigger than the model (issue 19), on the 48-token alias of the demo model: the
window in /v1/models, the `error` wording of each protocol, and `pack` on each protocol."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e

SHORT = "smollm2-short"  # max_context 48 (tests/e2e/conftest.py)
LONG = [{"role": "user", "content": "Tell me about Paris. " * 20}]


def test_models_list_carries_the_window(gateway: GatewayProcess) -> None:
    listed = httpx.get(gateway.base_url + "/v1/models", timeout=30).json()
    assert listed["object"] == "list"
    short = next(m for m in listed["data"] if m["id"] == SHORT)
    assert short["object"] == "model"
    assert short["context_length"] == short["max_model_len"] == 48
    assert short["max_context_length"] == 48 and short["max_output_tokens"] == 48
    demo = next(m for m in listed["data"] if m["id"] != SHORT)
    assert demo["context_length"] == 8192 and demo["max_output_tokens"] == 2048
    one = httpx.get(f"{gateway.base_url}/v1/models/{SHORT}", timeout=30).json()
    assert one["context_length"] == 48


def test_a_turn_too_long_to_pack_is_refused_in_each_protocols_words(
        gateway: GatewayProcess) -> None:
    url = gateway.base_url
    counted = httpx.post(url + "/v1/messages/count_tokens", timeout=60,
                         json={"model": SHORT, "messages": LONG}).json()["input_tokens"]
    # One turn: nothing packing may drop, and no tool outputs or descriptions to shorten.
    anthropic = httpx.post(url + "/v1/messages", timeout=60,
                           json={"model": SHORT, "max_tokens": 4, "messages": LONG})
    assert anthropic.status_code == 400
    assert anthropic.json() == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": f"prompt is too long: {counted} tokens > 48 maximum"}}

    chat = httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": SHORT, "max_tokens": 4, "messages": LONG})
    assert chat.status_code == 400
    error = chat.json()["error"]
    assert error == {
        "message": f"This model's maximum context length is 48 tokens, but the prompt has "
                   f"{counted} tokens. Shorten the prompt or the conversation.",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}

    responses = httpx.post(url + "/v1/responses", timeout=60, json={
        "model": SHORT, "max_output_tokens": 4, "input": LONG[0]["content"]})
    assert responses.status_code == 400
    assert responses.json()["error"]["code"] == "context_length_exceeded"


def _history() -> list[dict[str, str]]:
    """Two old turns that cannot fit beside the newest one in 48 tokens."""
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about Paris and its museums."},
            {"role": "assistant", "content": "Paris has the Louvre and the Orsay museums."},
            {"role": "user", "content": "And Rome, and its museums?"},
            {"role": "assistant", "content": "Rome has the Vatican and the Capitoline museums."},
            {"role": "user", "content": "Capital of France?"}]


def test_pack_drops_the_oldest_turns_in_every_protocol_and_says_so(
        gateway: GatewayProcess) -> None:
    url = gateway.base_url
    history = _history()
    chat = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": SHORT, "max_tokens": 4, "temperature": 0, "messages": history})
    assert chat.status_code == 200, chat.text
    packed = int(chat.headers["x-mlxgw-packed-tokens"])
    assert packed > 0 and chat.json()["usage"]["prompt_tokens"] <= 44

    messages = httpx.post(url + "/v1/messages", timeout=60, json={
        "model": SHORT, "max_tokens": 4, "system": "Be brief.", "messages": history[1:]})
    assert messages.status_code == 200, messages.text
    assert int(messages.headers["x-mlxgw-packed-tokens"]) > 0
    assert messages.json()["usage"]["input_tokens"] <= 44

    stream = httpx.post(url + "/v1/responses", timeout=60, json={
        "model": SHORT, "max_output_tokens": 4, "stream": True,
        "instructions": "Be brief.", "input": history[1:]})
    assert stream.status_code == 200 and int(stream.headers["x-mlxgw-packed-tokens"]) > 0
    assert "response.completed" in stream.text or "response.incomplete" in stream.text

    lines = [json.loads(line) for line in gateway.logs().splitlines() if line.startswith("{")]
    packs = [e for e in lines if e.get("event") == "prompt packed" and e.get("model") == SHORT]
    assert len(packs) >= 3
    # The two old turns, whole, in every protocol; what is left fits.
    assert [e["dropped_messages"] for e in packs[-3:]] == [4, 4, 4]
    assert all(e["kept_tokens"] <= e["limit"] == 44 for e in packs[-3:])
    metrics = httpx.get(url + "/metrics", timeout=30).text
    found = re.search(r'mlxgw_packed_requests_total\{model="smollm2-short"\} (\d+)', metrics)
    assert found is not None and float(found.group(1)) >= 3
