"""Malformed input at every route of the real server: never a 5xx, never a hang.

Routes come from the server's own OpenAPI document, so a new route is fuzzed without editing
this file. Three kinds of body: random bytes, random JSON, and a valid body with one field
replaced by random JSON (which reaches the deeper validation a random document never does).
"""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
# A generous bound: a hang shows up as a timeout, a slow but correct answer does not.
TIMEOUT = httpx.Timeout(60.0)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                  max_size=4),
    max_leaves=12,
)
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": DEMO_ID, "max_tokens": 1,
                             "messages": [{"role": "user", "content": "Hi"}]},
    "/v1/completions": {"model": DEMO_ID, "max_tokens": 1, "prompt": "Hi"},
    "/v1/responses": {"model": DEMO_ID, "max_output_tokens": 16, "input": "Hi", "store": False},
    "/v1/messages": {"model": DEMO_ID, "max_tokens": 1,
                     "messages": [{"role": "user", "content": "Hi"}]},
}
# Token limits the mutation may pick: invalid ones, and nothing that makes a long generation.
LIMIT_VALUES = [-1, 0, 10**12, "ten", None, 1.5, [], {}]


def routes(gateway: GatewayProcess) -> list[tuple[str, str]]:
    spec = httpx.get(gateway.base_url + "/openapi.json").json()
    return sorted((method.upper(), path) for path, item in spec["paths"].items()
                  for method in item if method in ("get", "post", "delete"))


def fill(path: str, value: str) -> str:
    """Put a (hostile) value into every {param} of a path template."""
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + quote(value, safe="") + path[end + 1:]
    return path


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]


@pytest.fixture(scope="module")
def all_routes(gateway: GatewayProcess) -> list[tuple[str, str]]:
    found = routes(gateway)
    assert ("POST", "/v1/chat/completions") in found and ("GET", "/v1/models") in found
    return found


@FUZZ
@given(body=st.binary(max_size=300), param=st.text(max_size=30))
def test_random_bytes(gateway: GatewayProcess, all_routes: list[tuple[str, str]],
                      body: bytes, param: str) -> None:
    with httpx.Client(base_url=gateway.base_url, timeout=TIMEOUT) as http:
        for method, path in all_routes:
            check(http.request(method, fill(path, param), content=body,
                               headers={"content-type": "application/json"}))


@FUZZ
@given(document=json_values)
def test_random_json(gateway: GatewayProcess, all_routes: list[tuple[str, str]],
                     document: Any) -> None:
    with httpx.Client(base_url=gateway.base_url, timeout=TIMEOUT) as http:
        for method, path in all_routes:
            if method == "POST":
                check(http.post(fill(path, "x"), content=json.dumps(document),
                                headers={"content-type": "application/json"}))


@FUZZ
@given(route=st.sampled_from(sorted(VALID_BODIES)), data=st.data())
def test_valid_bodies_with_one_field_broken(gateway: GatewayProcess, route: str,
                                            data: st.DataObject) -> None:
    body = dict(VALID_BODIES[route])
    field = data.draw(st.sampled_from([*body, "stream", "stop", "temperature", "top_p", "n",
                                       "tools", "stream_options", "previous_response_id"]))
    limits = ("max_tokens", "max_output_tokens")
    body[field] = data.draw(st.sampled_from(LIMIT_VALUES) if field in limits else json_values)
    with httpx.Client(base_url=gateway.base_url, timeout=TIMEOUT) as http:
        response = http.post(route, json=body)
        check(response)
        if response.status_code == 200 and body.get("stream") is True:
            assert response.text.rstrip().endswith("data: [DONE]")


# --- sampling fields, while someone else streams (issue 13, item 2) ---------------------------

SAMPLING_FIELDS = ["top_k", "seed", "logit_bias", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "temperature", "top_p", "min_p", "stop"]
# Values of the right type near the edges that matter (the vocabulary is 49152 tokens; int64 and
# uint64; the [-2, 2] penalties), so most examples get past the schema to the model-dependent
# checks and the engine; arbitrary JSON now and then for the schema itself.
EDGE_INTS = [0, 1, -1, 2, 49151, 49152, 49153, 100_000, 2**31, 2**63 - 1, 2**63, 2**64 - 1,
             2**64, -(2**63), -(2**63) - 1]
EDGE_FLOATS = [0.0, 1e-9, 0.5, 1.0, 1.5, 2.0, 2.0001, -2.0, -2.0001, 10.0, 1e9, -1e9]
TOKEN_IDS = ["0", "1", "-1", "49151", "49152", "99999999", "x", "1.5", " 7", ""]
ints = st.sampled_from(EDGE_INTS) | st.integers(min_value=-(2**70), max_value=2**70)
floats = st.sampled_from(EDGE_FLOATS) | st.floats(min_value=-1e3, max_value=1e3)
BY_FIELD = {
    "top_k": ints, "seed": ints,
    "logit_bias": st.dictionaries(st.sampled_from(TOKEN_IDS) | st.integers(0, 49151).map(str),
                                  floats | st.integers(-200, 200), max_size=4),
    "presence_penalty": floats, "frequency_penalty": floats, "repetition_penalty": floats,
    "temperature": floats, "top_p": floats, "min_p": floats,
    "stop": st.text(max_size=8) | st.lists(st.text(max_size=8), max_size=6),
}
SAMPLING_FIELDS = sorted(BY_FIELD)
sampling_fields = st.lists(
    st.sampled_from(SAMPLING_FIELDS).flatmap(
        lambda name: st.tuples(st.just(name), BY_FIELD[name] | BY_FIELD[name] | json_values)),
    min_size=1, max_size=3,
).map(dict)


class Bystander:
    """A well-formed sampled stream, over and over, on another thread: every one of them
    must end with [DONE] and no error, whatever the fuzzer sends meanwhile."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.finished = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        body = {"model": DEMO_ID, "max_tokens": 16, "temperature": 0.8, "stream": True,
                "messages": [{"role": "user", "content": "Tell me about the sea."}]}
        with httpx.Client(base_url=self.gateway.base_url, timeout=TIMEOUT) as http:
            while not self._stop.is_set():
                try:
                    response = http.post("/v1/chat/completions", json=body)
                    text = response.text
                except httpx.HTTPError as error:
                    self.problems.append(repr(error))
                    continue
                if response.status_code != 200 or '"error"' in text \
                        or not text.rstrip().endswith("data: [DONE]"):
                    self.problems.append(f"{response.status_code}: {text[-300:]}")
                else:
                    self.finished += 1


def test_sampling_fields_fuzzed_while_a_stream_runs(gateway: GatewayProcess) -> None:
    @settings(FUZZ, max_examples=60)
    @given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
           fields=sampling_fields, stream=st.booleans())
    def fuzz(route: str, fields: dict[str, Any], stream: bool) -> None:
        body = {**VALID_BODIES[route], "max_tokens": 2, "temperature": 0.8, "stream": stream,
                **fields}
        with httpx.Client(base_url=gateway.base_url, timeout=TIMEOUT) as http:
            # Python's json writes inf and nan as Infinity and NaN, which servers may parse.
            response = http.post(route, content=json.dumps(body),
                                 headers={"content-type": "application/json"})
        check(response)
        if response.status_code == 200 and stream:
            # Accepted values must work: an in-stream error means the door let one through.
            assert '"error"' not in response.text, (fields, response.text[-300:])
            assert response.text.rstrip().endswith("data: [DONE]")

    with Bystander(gateway) as bystander:
        fuzz()
    assert bystander.problems == []
    assert bystander.finished >= 1
    # And nothing lasting: a sampled request still works after all of that.
    with httpx.Client(base_url=gateway.base_url, timeout=TIMEOUT) as http:
        after = http.post("/v1/chat/completions", json={
            **VALID_BODIES["/v1/chat/completions"], "temperature": 0.9, "max_tokens": 4})
    assert after.status_code == 200, after.text


# --- issue 13: tool-call histories and deep nesting ------------------------------------------

arguments = st.one_of(
    st.text(max_size=40),  # mostly not JSON at all
    json_values.map(json.dumps),  # JSON, but often not an object
    st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(json.dumps),  # valid
    json_values,  # not even a string
)
tool_calls = st.lists(st.fixed_dictionaries(
    {"id": st.text(max_size=12), "type": st.sampled_from(["function", "code", 7]),
     "function": st.fixed_dictionaries({"name": st.one_of(st.text(max_size=12), json_values),
                                        "arguments": arguments})}), max_size=3)
histories = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20)}),
    st.fixed_dictionaries({"role": st.just("assistant"),
                           "content": st.one_of(st.none(), st.text(max_size=20)),
                           "tool_calls": tool_calls}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": st.text(max_size=20),
                           "tool_call_id": st.one_of(st.text(max_size=12), json_values)}),
), min_size=1, max_size=5)


# Fewer examples: each one is a real request (or several) against the real model.
SHORT_FUZZ = settings(FUZZ, max_examples=20)


@SHORT_FUZZ
@given(messages=histories)
def test_tool_call_histories(gateway: GatewayProcess, messages: list[dict[str, Any]]) -> None:
    """`messages[].tool_calls` with arguments that are text, JSON non-objects, objects or not
    strings at all: a 400 naming the field or an answer, never a 5xx."""
    with httpx.Client(base_url=gateway.base_url, timeout=TIMEOUT) as http:
        response = http.post("/v1/chat/completions",
                             json={"model": DEMO_ID, "max_tokens": 1, "messages": messages})
        check(response)
        items = [{"type": "function_call", "call_id": str(call.get("id")),
                  "name": str(call["function"]["name"]), "arguments": call["function"]
                  ["arguments"]} for m in messages for call in m.get("tool_calls", [])]
        check(http.post("/v1/responses", json={"model": DEMO_ID, "max_output_tokens": 16,
                                               "store": False, "input": [*items, "Hi"]}))
        # The same history in Anthropic's blocks: tool_use `input` is any JSON there.
        blocks = [{"role": "assistant", "content": [
            {"type": "tool_use", "id": call.get("id"), "name": call["function"]["name"],
             "input": call["function"]["arguments"]} for call in m["tool_calls"]] or "ok"}
            if m.get("tool_calls") else
            {"role": "user", "content": [{"type": "tool_result",
                                          "tool_use_id": m.get("tool_call_id"),
                                          "content": m.get("content")}]}
            if m["role"] == "tool" else {"role": "user", "content": m["content"]}
            for m in messages]
        check(http.post("/v1/messages", json={"model": DEMO_ID, "max_tokens": 1,
                                              "messages": blocks}))


def nest(depth: int, kind: str, leaf: Any) -> str:
    """A JSON document `depth` levels deep, as text (json.dumps itself would recurse)."""
    if kind == "list":
        return "[" * depth + json.dumps(leaf) + "]" * depth
    return '{"a":' * depth + json.dumps(leaf) + "}" * depth


@SHORT_FUZZ
@given(depth=st.sampled_from([32, 200, 900, 2000, 50_000]),
       kind=st.sampled_from(["list", "dict"]), data=st.data())
def test_deeply_nested_bodies_on_every_route(gateway: GatewayProcess,
                                             all_routes: list[tuple[str, str]], depth: int,
                                             kind: str, data: st.DataObject) -> None:
    """Deep nesting as the whole body of every POST route, and inside one field of each valid
    body (messages, tools' parameters, responses input items ...): a 4xx or an answer."""
    deep = nest(depth, kind, data.draw(json_values))
    with httpx.Client(base_url=gateway.base_url, timeout=TIMEOUT,
                      headers={"content-type": "application/json"}) as http:
        for method, path in all_routes:
            if method == "POST":
                check(http.post(fill(path, "x"), content=deep))
        route = data.draw(st.sampled_from(sorted(VALID_BODIES)))
        body = dict(VALID_BODIES[route])
        where = data.draw(st.sampled_from(
            [*body, "tools", "tool_choice", "stop", "messages[0].content", "input[0]",
             "tools[0].function.parameters"]))
        marker = "__DEEP__"
        if where == "tools[0].function.parameters":
            body["tools"] = [{"type": "function", "function": {"name": "f",
                                                               "parameters": marker}}]
        elif where == "messages[0].content":
            body["messages"] = [{"role": "user", "content": marker}]
        elif where == "input[0]":
            body["input"] = [marker]
        else:
            body[where] = marker
        check(http.post(route, content=json.dumps(body).replace(f'"{marker}"', deep)))
