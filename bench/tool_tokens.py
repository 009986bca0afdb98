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
- and the whole first request rendered for the demo model (system prompt + tools + turns).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.api.anthropic.schema import MessagesRequest
from app.api.openai.responses_schema import ResponsesRequest
from app.api.openai.schema import ChatCompletionRequest
from app.core.types import ToolSpec
from app.output.generic_tools import render_tool

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS: dict[str, Any] = {"claude": MessagesRequest, "codex": ResponsesRequest,
                           "opencode": ChatCompletionRequest}


def client_tools(fixtures: Path, client: str) -> list[ToolSpec]:
    body = json.loads((fixtures / f"{client}.request.json").read_text())["body"]
    specs: list[ToolSpec] = SCHEMAS[client].model_validate(body).tool_specs()
    return specs


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
    from transformers import AutoTokenizer

    from app.models.demo import ensure_demo_model
    from app.settings import load_settings

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_demo_model(load_settings().cache_dir)))
    print("| client | tools | plain JSON | minified JSON | compact | compact vs plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for client in SCHEMAS:
        tools = client_tools(args.fixtures, client)
        counts = {name: len(tokenizer.encode(text)) for name, text in renderings(tools).items()}
        saved = 1 - counts["compact"] / counts["plain JSON"]
        print(f"| {client} | {len(tools)} | {counts['plain JSON']} | {counts['minified JSON']} "
              f"| {counts['compact']} | -{saved:.0%} |")


if __name__ == "__main__":
    main()
