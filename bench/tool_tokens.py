"""Tokens of the real coding agents' tool lists: compact rendering vs plain JSON.

    python -m bench.tool_tokens [--fixtures tests/fixtures/client_tools]

The tool lists are what Claude Code, Codex and OpenCode send over the wire
(`python -m bench.capture_clients` records them), read through the gateway's own request
schemas, so namespace and hosted tools are handled as they are in serving. Counted with the
demo model's tokenizer:

- plain JSON: each tool as `{"name", "description", "parameters"}` by `json.dumps` with its
  default separators (what a template's `tojson` writes),
- minified JSON: the same without whitespace (the generic format before issue 19),
- compact: `generic_tools.render_tool` (schema keywords dropped, descriptions as text),
- and the whole first request rendered for the demo model (system prompt + tools + turns),
  and packed for an 8k context with 1,024 tokens kept for the answer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from app.api.anthropic.schema import MessagesRequest
from app.api.openai.responses_schema import (
    ResponsesRequest,
    items_to_messages,
    normalize_input,
    parse_request,
)
from app.api.openai.schema import ChatCompletionRequest
from app.core.types import ChatMessage, GenerationRequest, ToolSpec
from app.engine.prompt import packed_render, render
from app.output.generic_tools import render_tool

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS: dict[str, Any] = {"claude": MessagesRequest, "codex": ResponsesRequest,
                           "opencode": ChatCompletionRequest}


def client_tools(fixtures: Path, client: str) -> list[ToolSpec]:
    body = json.loads((fixtures / f"{client}.request.json").read_text())["body"]
    specs: list[ToolSpec] = SCHEMAS[client].model_validate(body).tool_specs()
    return specs


def first_request(fixtures: Path, client: str) -> GenerationRequest:
    """The client's recorded first request as the engine sees it (protocol-neutral)."""
    body = json.loads((fixtures / f"{client}.request.json").read_text())["body"]
    if client == "codex":
        req = parse_request(body)
        system = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
        messages = system + items_to_messages(normalize_input(req.input, lambda _: None))
    else:
        parsed = SCHEMAS[client].model_validate(body)
        messages = parsed.internal_messages()
    return GenerationRequest(model="m", request_id="bench", messages=messages,
                             tools=client_tools(fixtures, client), tool_choice="auto")


def renderings(tools: list[ToolSpec]) -> dict[str, str]:
    def plain(tool: ToolSpec, **kwargs: Any) -> str:
        return json.dumps({"name": tool.name, "description": tool.description,
                           "parameters": tool.parameters}, ensure_ascii=False, **kwargs)

    return {"plain JSON": "\n".join(plain(t) for t in tools),
            "minified JSON": "\n".join(plain(t, separators=(",", ":")) for t in tools),
            "compact": "\n".join(render_tool(t) for t in tools)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path,
                        default=ROOT / "tests" / "fixtures" / "client_tools")
    args = parser.parse_args()
    from mlx_lm.tokenizer_utils import load

    from app.models.demo import ensure_demo_model
    from app.settings import load_settings

    tokenizer = load(ensure_demo_model(load_settings().cache_dir))
    print("| client | tools | plain JSON | minified JSON | compact | compact vs plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for client in SCHEMAS:
        tools = client_tools(args.fixtures, client)
        counts = {name: len(tokenizer.encode(text)) for name, text in renderings(tools).items()}
        saved = 1 - counts["compact"] / counts["plain JSON"]
        print(f"| {client} | {len(tools)} | {counts['plain JSON']} | {counts['minified JSON']} "
              f"| {counts['compact']} | -{saved:.0%} |")
    limit = 8192 - 1024
    print()
    print(f"| client | first request, rendered | packed to {limit} (8k - 1,024 reserve) "
          "| what packing did | seconds to pack |")
    print("| --- | --- | --- | --- | --- |")
    for client in SCHEMAS:
        request = first_request(args.fixtures, client)
        whole = len(render(tokenizer, request).ids)
        started = time.perf_counter()
        result = packed_render(tokenizer, request, limit) if whole > limit else None
        took = time.perf_counter() - started
        if result is None:
            print(f"| {client} | {whole} | fits | - | - |")
            continue
        prompt, packed = result
        print(f"| {client} | {whole} | {len(prompt.ids)} | {packed.cut_descriptions} "
              f"descriptions shortened, {packed.dropped_messages} messages dropped "
              f"| {took:.1f} |")


if __name__ == "__main__":
    main()
