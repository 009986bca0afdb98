"""Log-probabilities in the wire shapes: chat entries, legacy completions arrays, and Responses
output_text parts (each token's entry rides on the text that follows it)."""

from __future__ import annotations

from app.api.openai.completions import _StreamedOffsets
from app.api.openai.logprobs import chat_logprobs, completion_logprobs
from app.api.openai.responses import _coalesce
from app.api.openai.responses_render import ResponseRenderer, request_echo
from app.api.openai.responses_schema import parse_request
from app.core.types import Finish, LogprobsDelta, TextDelta, TokenLogprob, Usage

HI = TokenLogprob("Hi", -0.5, (72, 105), (("Hi", -0.5, (72, 105)), ("Yo", -1.5, (89, 111))))
BANG = TokenLogprob("!", -0.1, (33,), (("!", -0.1, (33,)), (".", -2.5, (46,))))


def test_chat_entries() -> None:
    body = chat_logprobs([HI, BANG])
    assert body["refusal"] is None
    first = body["content"][0]
    assert first == {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
        {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]}


def test_completion_arrays_and_streamed_offsets() -> None:
    body = completion_logprobs([HI, BANG])
    assert body == {"tokens": ["Hi", "!"], "token_logprobs": [-0.5, -0.1],
                    "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}, {"!": -0.1, ".": -2.5}],
                    "text_offset": [0, 2]}
    streamed = _StreamedOffsets()
    assert streamed([HI])["text_offset"] == [0]
    assert streamed([BANG])["text_offset"] == [2]


def test_responses_parts_carry_logprobs() -> None:
    req = parse_request({"model": "m", "input": "hi", "top_logprobs": 2,
                         "include": ["message.output_text.logprobs"]})
    renderer = ResponseRenderer(response_id="resp_t", model="m", echo=request_echo(req))
    renderer.start()
    batch = _coalesce([LogprobsDelta((HI,)), TextDelta("Hi"), LogprobsDelta((BANG,)),
                       TextDelta("!")])
    assert isinstance(batch[0], LogprobsDelta) and len(batch[0].tokens) == 2
    events = [e for event in batch for e in renderer.feed(event)]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [d["delta"] for d in deltas] == ["Hi!"]
    assert [entry["token"] for entry in deltas[0]["logprobs"]] == ["Hi", "!"]
    done = renderer.feed(Finish("stop", Usage(1, 2)))
    text_done = next(e for e in done if e["type"] == "response.output_text.done")
    assert [entry["token"] for entry in text_done["logprobs"]] == ["Hi", "!"]
    part = renderer.snapshot()["output"][0]["content"][0]
    assert [entry["token"] for entry in part["logprobs"]] == ["Hi", "!"]
    assert renderer.snapshot()["top_logprobs"] == 2
