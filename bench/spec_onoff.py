"""The standard probe with speculative decoding on and off: two gateways on the same float32
weights, `[engine] speculative = "auto"` and `"off"`, one at a time, the order alternating by
round, each running `bench.compare_mlx_lm`'s levels (default: 1 client and 10 clients on the
varied prompts). Issue 17: speculation must never cost >= 5% where it does not help.

    python -m bench.spec_onoff --model-dir PATH [--rounds 3] [--requests 2] [--max-tokens 64]
        [--levels 1-client,10-clients]

Any other option of `bench.compare_mlx_lm` is accepted and passed to the levels.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import servers
from bench.compare_mlx_lm import ServerRun, make_float32_copy, parse_args, run_one

VARIANTS = ("auto", "off")


def report(rounds: list[dict[str, ServerRun]], levels: list[str], loads: list[str],
           max_tokens: int, requests: int) -> str:
    lines = [
        f"Levels {', '.join(levels)}: each client sends {requests} streaming requests "
        f"(max_tokens {max_tokens}, temperature 0, the varied prompts); median of "
        f"{len(rounds)} round(s), the order alternating. Load average (1/5/15) at the start "
        f"of each round: {'; '.join(loads)}.",
        "",
        "| level | speculative | " + " | ".join(f"round {i + 1} tok/s" for i in
                                                range(len(rounds))) + " | median |",
        "| --- | --- | " + " | ".join("---:" for _ in rounds) + " | ---: |",
    ]
    for level in levels:
        for variant in VARIANTS:
            values = [r[variant].metric(level, "tokens_per_s") or 0.0 for r in rounds]
            lines.append(f"| {level} | {variant} | " + " | ".join(f"{v:.1f}" for v in values)
                         + f" | {statistics.median(values):.1f} |")
        ratios = [(r["auto"].metric(level, "tokens_per_s") or 0.0)
                  / (r["off"].metric(level, "tokens_per_s") or 1.0) for r in rounds]
        lines.append(f"| {level} | auto / off | " + " | ".join(f"{v:.2f}" for v in ratios)
                     + f" | {statistics.median(ratios):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [name for name in args.levels if name in ("1-client", "10-clients")]
    args.levels = levels or ["1-client", "10-clients"]
    args.history_tokens = 0
    src = args.model_dir.expanduser().resolve()
    default = Path.home() / ".cache/mlx-gateway/bench" / f"{src.name}-float32"
    model_dir = make_float32_copy(src, (args.variant_dir or default).expanduser())
    rounds: list[dict[str, ServerRun]] = []
    loads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mlxgw-spec-onoff-") as tmp:
        specs = {}
        for variant in VARIANTS:  # separate cache/state folders: nothing carries over
            workdir = Path(tmp) / variant
            workdir.mkdir()
            specs[variant] = servers.gateway_spec(model_dir, servers.free_port(), 10, workdir,
                                                  sys.executable, speculative=variant)
        for index in range(max(1, args.rounds)):
            loads.append(" ".join(f"{x:.2f}" for x in os.getloadavg()))
            runs: dict[str, ServerRun] = {}
            order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                runs[variant] = run_one(specs[variant], args, model_dir,
                                        Path(tmp) / variant, round_index=index,
                                        with_prefix=False)
                sys.stderr.write(f"round {index + 1} {variant}: " + ", ".join(
                    f"{lv} {runs[variant].metric(lv, 'tokens_per_s') or 0:.1f} tok/s"
                    for lv in args.levels) + "\n")
            rounds.append(runs)
    sys.stdout.write(report(rounds, args.levels, loads, args.max_tokens, args.requests))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
