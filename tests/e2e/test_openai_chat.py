"""The OpenAI surface end to end: the official SDK against the real server and demo model."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import DEMO_ID, THINKING_ID
from tests.e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def sse_payloads(raw: str) -> list[str]:
    return [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]


def test_capital_of_france(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEMO_ID, messages=FRANCE, temperature=0, max_tokens=20  # type: ignore[arg-type]
    )
    assert reply.object == "chat.completion"
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 10 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_usage_counts_reasoning_tokens(client: openai.OpenAI) -> None:
    """Asked to think, the thinking variant opens a think block the demo model never closes:
    every token it writes is reasoning, in the answer's usage and the stream's alike; not asked,
    none is."""
    ask = {"model": THINKING_ID, "messages": FRANCE, "temperature": 0, "max_tokens": 12}
    think = {"chat_template_kwargs": {"enable_thinking": True}}
    reply = client.chat.completions.create(**ask, extra_body=think)  # type: ignore[call-overload]
    usage = reply.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens > 0
    assert reply.choices[0].message.model_extra["reasoning_content"]  # type: ignore[index]
    chunks = list(client.chat.completions.create(**ask, extra_body=think, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = chunks[-1].usage
    assert streamed is not None and streamed.completion_tokens_details is not None
    assert streamed.completion_tokens_details.model_dump() == \
        usage.completion_tokens_details.model_dump()
    plain = client.chat.completions.create(**ask)
    assert plain.usage is not None and plain.usage.completion_tokens > 0
    assert plain.usage.completion_tokens_details is not None
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0
    assert plain.choices[0].message.content


def test_stream_helper_and_chunk_contract(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    with client.chat.completions.stream(
        model=DEMO_ID, messages=FRANCE, temperature=0, max_tokens=20  # type: ignore[arg-type]
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert "Paris" in "".join(deltas)
    assert final.choices[0].message.content == "".join(deltas)
    assert final.choices[0].message.role == "assistant"  # not "assistantassistant"

    raw = httpx.post(gateway.base_url + "/v1/chat/completions", timeout=120, json={
        "model": DEMO_ID, "messages": FRANCE, "temperature": 0, "max_tokens": 4, "stream": True,
    }).text
    payloads = sse_payloads(raw)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], DEMO_ID)}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    roles = [c["choices"][0]["delta"].get("role") for c in chunks]
    assert roles[0] == "assistant" and not any(roles[1:])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes.count(None) == len(chunks) - 1 and finishes[-1] == "length"
    assert not any("usage" in c and c["usage"] for c in chunks)  # not asked for


def test_usage_chunk_only_when_asked(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=DEMO_ID, messages=FRANCE, temperature=0, max_tokens=5, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    ))
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEMO_ID, messages=FRANCE, temperature=0, max_completion_tokens=3  # type: ignore[arg-type]
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_stop_string_is_excluded(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEMO_ID, messages=FRANCE, temperature=0, max_tokens=20, stop=["Paris"],  # type: ignore[arg-type]
    )
    text = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop"
    assert "Paris" not in text and text.startswith("The capital of France is")

    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=DEMO_ID, messages=FRANCE, temperature=0, max_tokens=20, stop="France",  # type: ignore[arg-type]
            stream=True) if c.choices
    )
    assert streamed == "The capital of "


def test_history_shapes_are_accepted(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEMO_ID, temperature=0, max_tokens=5,
        messages=[  # type: ignore[list-item]
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "user", "content": "So?"},
        ],
        extra_body={"reasoning_content": "ignored", "unknown_field": 1},
    )
    assert reply.choices[0].message.content


def test_text_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=DEMO_ID, prompt="The capital of France is", temperature=0, max_tokens=4
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    streamed = [c for c in client.completions.create(
        model=DEMO_ID, prompt="The capital of France is", temperature=0, max_tokens=4,
        stream=True)]
    assert all(c.object == "text_completion" for c in streamed)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    assert [c.choices[0].finish_reason for c in streamed][-1] == "length"
    # The continuation keeps its first space: prompt + text reads as the model wrote it.
    assert reply.choices[0].text.startswith(" Paris"), reply.choices[0].text


def test_models_listing(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    ids = [m.id for m in client.models.list()]
    assert DEMO_ID in ids
    assert client.models.retrieve(DEMO_ID).id == DEMO_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(gateway.base_url + "/v1/models/..%2F..%2Fetc%2Fpasswd").status_code == 404


@pytest.mark.parametrize(("body", "status", "needle", "param"), [
    ({"model": DEMO_ID}, 400, "messages", "messages"),
    ({"model": DEMO_ID, "messages": FRANCE, "temperature": 9}, 400, "temperature", "temperature"),
    ({"model": DEMO_ID, "messages": FRANCE, "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"model": DEMO_ID, "messages": FRANCE, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     "stop"),
    ({"model": DEMO_ID, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role", None),
    ({"model": "nope", "messages": FRANCE}, 404, "nope", "model"),
    ({"model": "../../etc/passwd", "messages": FRANCE}, 404, "does not exist", "model"),
    ({"model": DEMO_ID, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "image_url", None),
])
def test_bad_requests_get_openai_errors(gateway: GatewayProcess, body: dict[str, object],
                                        status: int, needle: str, param: str | None) -> None:
    response = httpx.post(gateway.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if param is not None:
        assert error["param"] == param


def test_malformed_json_and_non_object(gateway: GatewayProcess) -> None:
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(gateway.base_url + "/v1/chat/completions", content=content,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400, content
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_context_length_errors_name_both_numbers(client: openai.OpenAI) -> None:
    long_history = [{"role": "user", "content": "Tell me about Paris. " * 20}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2-short", messages=long_history)  # type: ignore[arg-type]
    message = caught.value.body["message"]  # type: ignore[index]
    assert "48" in message and re.search(r"prompt has \d+ tokens", message)
    assert caught.value.code == "context_length_exceeded"
    # A max_tokens beyond the room left is capped to it (agents ask for 32k by habit).
    capped = client.chat.completions.create(model="smollm2-short", messages=FRANCE,  # type: ignore[arg-type]
                                            max_tokens=40, temperature=0)
    assert capped.usage is not None
    assert capped.usage.prompt_tokens + capped.usage.completion_tokens <= 48
    assert capped.choices[0].finish_reason in ("length", "stop")


def test_unknown_route_and_method(gateway: GatewayProcess) -> None:
    missing = httpx.get(gateway.base_url + "/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx.get(gateway.base_url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_request_id_is_echoed_and_logged(gateway: GatewayProcess) -> None:
    response = httpx.get(gateway.base_url + "/v1/models", headers={"X-Request-ID": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    generated = httpx.get(gateway.base_url + "/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", generated)
    lines = [json.loads(line) for line in gateway.logs().splitlines() if line.startswith("{")]
    entry = next(e for e in lines if e.get("request_id") == "trace-42" and e["event"] == "request")
    assert entry["method"] == "GET" and entry["path"] == "/v1/models" and entry["status"] == 200


def test_generation_log_line_has_usage_and_ttft(client: openai.OpenAI,
                                                gateway: GatewayProcess) -> None:
    reply = client.chat.completions.with_raw_response.create(
        model=DEMO_ID, messages=FRANCE, temperature=0, max_tokens=4,  # type: ignore[arg-type]
        extra_headers={"X-Request-ID": "usage-line"},
    )
    assert reply.headers["x-request-id"] == "usage-line"
    time.sleep(0.2)
    lines = [json.loads(line) for line in gateway.logs().splitlines() if line.startswith("{")]
    entry = next(e for e in lines
                 if e.get("request_id") == "usage-line" and e["event"] == "request")
    assert entry["model"] == DEMO_ID and entry["completion_tokens"] == 4
    assert entry["prompt_tokens"] > 10 and entry["ttft_ms"] > 0 and entry["duration_ms"] > 0


def _cancelled_count(gateway: GatewayProcess) -> float:
    text = httpx.get(gateway.base_url + "/metrics").text
    match = re.search(r"^mlxgw_sequences_cancelled_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_disconnect_cancels_generation(gateway: GatewayProcess) -> None:
    before = _cancelled_count(gateway)
    with httpx.Client(timeout=120) as http, http.stream(
        "POST", gateway.base_url + "/v1/chat/completions",
        headers={"X-Request-ID": "walks-away"},
        json={"model": DEMO_ID, "messages": [{"role": "user", "content": "Write a long story."}],
              "max_tokens": 400, "stream": True, "temperature": 0},
    ) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 6:
                break
    deadline = time.monotonic() + 30
    while _cancelled_count(gateway) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _cancelled_count(gateway) == before + 1
    lines = [json.loads(line) for line in gateway.logs().splitlines() if line.startswith("{")]
    cancelled = [e for e in lines if e["event"] == "sequence cancelled"
                 and e.get("request_id") == "walks-away"]
    assert len(cancelled) == 1 and cancelled[0]["generated"] < 400


def test_health_answers_while_generating(gateway: GatewayProcess) -> None:
    """The event loop is never blocked by MLX: /health returns mid-generation."""
    progress: list[str] = []
    finished = threading.Event()

    def generate() -> None:
        with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", timeout=300, json={
            "model": DEMO_ID, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 200, "min_tokens": 200, "stream": True,
        }) as response:
            for line in response.iter_lines():
                progress.append(line)
        finished.set()

    worker = threading.Thread(target=generate)
    worker.start()
    while len(progress) < 4 and worker.is_alive():
        time.sleep(0.01)
    answered_mid_stream = 0
    for _ in range(5):
        health = httpx.get(gateway.base_url + "/health", timeout=5)
        assert health.status_code == 200
        answered_mid_stream += not finished.is_set()
    worker.join()
    assert answered_mid_stream == 5
