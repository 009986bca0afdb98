"""The `edit` level: one client asks for a ~400-token file back with one change, as a coding
agent does; the answer re-emits most of its prompt, which is what prompt-lookup speculation is
for. mlx-gateway with speculation on and off (the per-request `speculative` field, one process)
and mlx_lm.server, on the same weights, one server at a time, the order alternating by round.

    python -m bench.edit --model-dir PATH [--edit-rounds 3] [--edit-requests 1]
        [--edit-max-tokens 500] [--draft-dir PATH] [--no-mlx-lm]

With --draft-dir, a third gateway variant drafts with that model (`[[models]] draft`, a second
model id on the same weights in the same process) instead of prompt lookup.

Reports tokens/s per round and their median, the ratios the issue targets (on / mlx_lm.server
>= 2.5x, on / off >= 2x), the draft acceptance rate from the gateway's /metrics, and how close
each answer is to the expected file (a small model may not copy faithfully: then fewer drafts
are accepted, and the report says so).
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog

from app.ops.bench import stream_chat
from bench import servers

log = structlog.get_logger("bench.edit")

FILE = '''\
"""Orders for a small shop: items, discounts and totals."""

from dataclasses import dataclass, field


@dataclass
class Item:
    name: str
    price: float
    quantity: int = 1

    def cost(self) -> float:
        return self.price * self.quantity


@dataclass
class Order:
    customer: str
    items: list[Item] = field(default_factory=list)
    discount: float = 0.0

    def add(self, name: str, price: float, quantity: int = 1) -> None:
        self.items.append(Item(name, price, quantity))

    def subtotal(self) -> float:
        return sum(item.cost() for item in self.items)

    def total(self) -> float:
        return round(self.subtotal() * (1 - self.discount), 2)


def cheapest(order: Order) -> Item | None:
    if not order.items:
        return None
    return min(order.items, key=lambda item: item.price)


def describe(order: Order) -> str:
    lines = [f"Order for {order.customer}:"]
    for item in order.items:
        lines.append(f"  {item.quantity} x {item.name} at {item.price:.2f}")
    lines.append(f"Subtotal: {order.subtotal():.2f}")
    if order.discount:
        lines.append(f"Discount: {order.discount * 100:.0f}%")
    lines.append(f"Total: {order.total():.2f}")
    return "\\n".join(lines)


if __name__ == "__main__":
    order = Order("Ada", discount=0.1)
    order.add("notebook", 3.5, 2)
    order.add("pen", 1.25, 4)
    order.add("stapler", 7.0)
    print(describe(order))
'''
OLD, NEW = "describe", "summarize"
PROMPT = (f"Here is a Python file:\n\n```python\n{FILE}```\n\nRename the function `{OLD}` to "
          f"`{NEW}` everywhere in this file. Reply with the complete updated file in one "
          "```python code block, changing nothing else.")
EXPECTED = FILE.replace(f"def {OLD}(", f"def {NEW}(").replace(f"print({OLD}(", f"print({NEW}(")


@dataclass
class Sample:
    tokens_per_s: float
    similarity: float  # difflib ratio of the answer's code block to the expected file


@dataclass
class Round:
    by_variant: dict[str, Sample] = field(default_factory=dict)
    drafted: float = 0.0
    accepted: float = 0.0
    draft_drafted: float = 0.0  # the draft-model variant's
    draft_accepted: float = 0.0


VARIANTS = {"mlx_lm": "mlx_lm.server", "off": "mlx-gateway, speculation off",
            "on": "mlx-gateway, speculation on (prompt lookup)",
            "draft": "mlx-gateway, speculation on (draft model)"}
DRAFTED_ID, DRAFT_ID = "edit-drafted", "edit-draft"  # with --draft-dir


def draft_models(model_dir: Path, draft_dir: Path) -> str:
    """TOML for the draft variant: the same weights under another id, drafted for by
    `draft_dir` (the draft is loaded with it and counted in its memory)."""
    return f"""
[[models]]
id = "{DRAFTED_ID}"
path = "{model_dir}"
pinned = true
draft = "{DRAFT_ID}"

[[models]]
id = "{DRAFT_ID}"
path = "{draft_dir}"
"""


def code_of(text: str) -> str:
    match = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.S)
    return match.group(1) if match else text


def _metric(text: str, name: str) -> float:
    """The metric summed over its labels (the speculative counters are by draft source)."""
    return sum(float(value) for value in
               re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _body(spec: servers.ServerSpec, max_tokens: int, extra: dict[str, Any] | None
          ) -> dict[str, Any]:
    return {"model": spec.model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}


async def warm_up(spec: servers.ServerSpec, model: str | None = None) -> None:
    """One short uncounted request: loads the model, and puts the prompt in the server's
    prompt cache as the counted requests of every variant will find it."""
    extra = {"model": model} if model else None
    async with httpx.AsyncClient(timeout=900) as client:
        await stream_chat(client, spec.base_url + "/chat/completions", _body(spec, 8, extra),
                          {})


async def measure(spec: servers.ServerSpec, requests: int, max_tokens: int,
                  extra: dict[str, Any] | None) -> Sample:
    async with httpx.AsyncClient(timeout=900) as client:
        results = [await stream_chat(client, spec.base_url + "/chat/completions",
                                     _body(spec, max_tokens, extra), {})
                   for _ in range(requests)]
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{spec.name}: {failed[0]}")
    tokens = sum(r.completion_tokens for r in results)
    seconds = sum(r.latency or 0.0 for r in results)
    similarity = difflib.SequenceMatcher(None, code_of(results[-1].text), EXPECTED).ratio()
    return Sample(tokens / seconds if seconds else 0.0, similarity)


def run_round(index: int, specs: dict[str, servers.ServerSpec], args: argparse.Namespace,
              workdir: Path) -> Round:
    result = Round()
    order = ["mlx_lm", "gateway"] if index % 2 == 0 else ["gateway", "mlx_lm"]
    for key in [k for k in order if k in specs]:
        spec = specs[key]
        env = servers.bench_env()
        with servers.running(spec, env, workdir / f"edit-{key}-{index}.log"):
            asyncio.run(warm_up(spec))
            if key == "mlx_lm":
                result.by_variant["mlx_lm"] = asyncio.run(
                    measure(spec, args.edit_requests, args.edit_max_tokens, None))
                continue
            metrics_url = spec.base_url.removesuffix("/v1") + "/metrics"
            modes = ["off", "on"] + (["draft"] if args.draft_dir else [])
            if args.draft_dir:
                asyncio.run(warm_up(spec, DRAFTED_ID))
            shift = index % len(modes)  # the order rotates by round
            for mode in modes[shift:] + modes[:shift]:
                before = httpx.get(metrics_url).text
                extra: dict[str, Any] = {"speculative": "off" if mode == "off" else "auto"}
                if mode == "draft":
                    extra["model"] = DRAFTED_ID
                result.by_variant[mode] = asyncio.run(measure(
                    spec, args.edit_requests, args.edit_max_tokens, extra))
                after = httpx.get(metrics_url).text
                prefix = {"on": "", "draft": "draft_"}.get(mode)
                if prefix is not None:
                    for name, attr in (("mlxgw_speculative_drafted_tokens_total", "drafted"),
                                       ("mlxgw_speculative_accepted_tokens_total", "accepted")):
                        setattr(result, prefix + attr, _metric(after, name) - _metric(before, name))
        log.info("bench.edit_round", round=index + 1, server=key,
                 **{k: round(v.tokens_per_s, 1) for k, v in result.by_variant.items()})
    return result


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def report(rounds: list[Round], args: argparse.Namespace, loads: list[str]) -> str:
    lines = [
        f"### edit: 1 client, a {len(FILE)}-character file (~400 tokens) re-emitted with one "
        f"rename; {args.edit_requests} request(s) a variant a round after a short warm-up, "
        f"max_tokens {args.edit_max_tokens}, temperature 0; median of {len(rounds)} round(s)",
        "",
        f"Load average (1/5/15 min) at the start of each round: {'; '.join(loads)}.",
        "",
        "| variant | " + " | ".join(f"round {i + 1} tok/s" for i in range(len(rounds)))
        + " | median tok/s | answer vs expected file |",
        "| --- | " + " | ".join("---:" for _ in rounds) + " | ---: | ---: |",
    ]
    medians: dict[str, float] = {}
    for key, name in VARIANTS.items():
        values = [r.by_variant[key].tokens_per_s for r in rounds if key in r.by_variant]
        if not values:
            continue
        medians[key] = _median(values)
        similarity = _median([r.by_variant[key].similarity for r in rounds
                              if key in r.by_variant])
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values)
                     + f" | {medians[key]:.1f} | {similarity:.0%} |")
    lines.append("")
    drafted = sum(r.drafted for r in rounds)
    accepted = sum(r.accepted for r in rounds)
    rate = f"{accepted / drafted:.0%}" if drafted else "n/a"
    lines.append(f"Drafts (prompt lookup, all rounds): {drafted:.0f} drafted, {accepted:.0f} "
                 f"accepted: acceptance {rate}.")
    if args.draft_dir:
        drafted = sum(r.draft_drafted for r in rounds)
        accepted = sum(r.draft_accepted for r in rounds)
        rate = f"{accepted / drafted:.0%}" if drafted else "n/a"
        lines.append(f"Drafts (draft model {args.draft_dir.name}, all rounds): {drafted:.0f} "
                     f"drafted, {accepted:.0f} accepted: acceptance {rate}.")
    lines.append("")
    lines.append("| ratio (per-round medians) | value | target | met |")
    lines.append("| --- | ---: | --- | --- |")
    for label, a, b, target in (("on / mlx_lm.server", "on", "mlx_lm", 2.5),
                                ("on / off", "on", "off", 2.0),
                                ("off / mlx_lm.server", "off", "mlx_lm", None),
                                ("draft model / off", "draft", "off", None),
                                ("draft model / prompt lookup", "draft", "on", None)):
        ratios = [r.by_variant[a].tokens_per_s / r.by_variant[b].tokens_per_s for r in rounds
                  if a in r.by_variant and b in r.by_variant and r.by_variant[b].tokens_per_s]
        if not ratios:
            continue
        value = _median(ratios)
        met = "-" if target is None else ("yes" if value >= target else "**no**")
        lines.append(f"| {label} | {value:.2f} | {'-' if target is None else f'>= {target}x'} "
                     f"| {met} |")
    return "\n".join(lines) + "\n"


def run(model_dir: Path, args: argparse.Namespace) -> str:
    loads: list[str] = []
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="mlxgw-edit-") as tmp:
        workdir = Path(tmp)
        extra = draft_models(model_dir, args.draft_dir) if args.draft_dir else ""
        specs = {
            "mlx_lm": servers.mlx_lm_spec(model_dir, servers.free_port(), 1, sys.executable),
            "gateway": servers.gateway_spec(model_dir, servers.free_port(), 1, workdir,
                                            sys.executable, extra=extra),
        }
        if args.no_mlx_lm:
            del specs["mlx_lm"]
        for index in range(args.edit_rounds):
            loads.append(" ".join(f"{x:.2f}" for x in os.getloadavg()))
            rounds.append(run_round(index, specs, args, workdir))
    return report(rounds, args, loads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--edit-rounds", dest="edit_rounds", type=int, default=3)
    parser.add_argument("--edit-requests", dest="edit_requests", type=int, default=1,
                        help="Counted requests per variant per round.")
    parser.add_argument("--edit-max-tokens", dest="edit_max_tokens", type=int, default=500)
    parser.add_argument("--draft-dir", dest="draft_dir", type=Path, default=None,
                        help="An MLX model folder with the same tokenizer: adds the variant "
                        "'speculation on (draft model)'.")
    parser.add_argument("--no-mlx-lm", dest="no_mlx_lm", action="store_true",
                        help="Gateway variants only (mlx_lm.server is not started).")


def main(argv: list[str] | None = None) -> int:
    from bench.compare_mlx_lm import make_float32_copy

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: report
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    add_arguments(parser)
    args = parser.parse_args(argv)
    src = args.model_dir.expanduser().resolve()
    model_dir = make_float32_copy(src, Path.home() / ".cache/mlx-gateway/bench"
                                  / f"{src.name}-float32")
    sys.stdout.write(run(model_dir, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
