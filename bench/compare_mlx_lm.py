"""mlx-gateway vs mlx_lm.server on the same weights, in one sitting, one server at a time.

    python -m bench.compare_mlx_lm --model-dir PATH [--levels 1-client,10-clients,mixed]
        [--requests 3] [--max-tokens 128] [--long-tokens 4000] [--rounds 3]
        [--only gateway|mlx_lm] [--dtype float32|as-is] [--mlx-lm-blas same|defaults]
        [--history-tokens 1000] [--restart-tokens 4000]

Both servers get the same environment (OpenBLAS preloaded when present, with the gateway's
thread timeout unless `--mlx-lm-blas defaults`), the same prompts (several, of different
lengths) and temperature 0, and are run in turn, never together (2 cores). The levels are
`bench.levels.LEVELS` (one function each); the report gives each metric's median over rounds
and the ratio to mlx_lm.server against the targets. Progress goes to stderr; a markdown section
for bench/RESULTS.md goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import httpx
import structlog

from app.models.variants import make_float_variant
from app.ops.bench import VARIED_PROMPTS, LevelResult, chat_url, render_table, stream_chat
from app.ops.system_blas import OPENBLAS
from bench import edit, restart, servers
from bench.levels import COMPARISONS, LEVELS, Comparison, LevelContext, LevelOutcome
from bench.prefix_cache import PrefixResult, first_vs_second_turn, token_counter

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
log = structlog.get_logger("bench.compare")

NAMES = {"mlx_lm": "mlx_lm.server", "gateway": "mlx-gateway"}


# ---------------------------------------------------------------- the float32 copy


def _safetensors_dtypes(folder: Path) -> set[str]:
    dtypes: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


def is_float32(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    quantized = "quantization" in json.loads(config.read_text())
    return not quantized and _safetensors_dtypes(folder) == {"F32"}


def make_float32_copy(src: Path, dst: Path) -> Path:
    """A dequantized float32 copy of an MLX folder (reused when already there)."""
    if is_float32(src):
        return src
    if is_float32(dst):
        return dst
    log.info("bench.float32_copy", src=str(src), dst=str(dst))
    return make_float_variant(src, dst, "float32", exist_ok=True)


# ---------------------------------------------------------------- one server


@dataclass
class ServerRun:
    key: str
    settings: str
    outcomes: dict[str, LevelOutcome]
    prefix: PrefixResult | None
    command: str
    errors: list[str] = field(default_factory=list)

    @property
    def levels(self) -> list[LevelResult]:
        return [r for outcome in self.outcomes.values() for r in outcome.raw]

    def metric(self, level: str, name: str) -> float | None:
        if level == "*":  # across levels: the largest (peak RSS)
            values = [o.metrics[name] for o in self.outcomes.values() if name in o.metrics]
            return max(values) if values else None
        outcome = self.outcomes.get(level)
        return outcome.metrics.get(name) if outcome else None


def run_one(
    spec: servers.ServerSpec, args: argparse.Namespace, model_dir: Path, workdir: Path,
    *, round_index: int = 0, with_prefix: bool = True,
) -> ServerRun:
    log.info("bench.server_start", server=spec.name, argv=spec.argv)
    command = shlex.join(spec.argv)
    env = servers.bench_env(blas_settings=spec.name == "gateway" or args.mlx_lm_blas == "same")
    count = token_counter(model_dir)
    outcomes: dict[str, LevelOutcome] = {}
    errors: list[str] = []
    with servers.running(spec, env, workdir / f"{spec.name}.log") as pid:
        asyncio.run(_warm_up(spec))
        for name in args.levels:
            ctx = LevelContext(spec.name, spec.base_url, spec.model, pid, model_dir, count,
                               args, round_index)
            try:
                outcomes[name] = asyncio.run(LEVELS[name](ctx))
            except Exception as error:  # one broken level is reported, the others still run
                log.error("bench.level_failed", server=spec.name, level=name, error=repr(error))
                errors.append(f"level {name}: {error!r}")
                continue
            log.info("bench.level", server=spec.name, level=name, **{
                k: round(v, 2) for k, v in outcomes[name].metrics.items()})
        prefix = None
        if with_prefix and args.history_tokens > 0:
            prefix = asyncio.run(first_vs_second_turn(
                spec.base_url, model=spec.model, count=count,
                history_tokens=args.history_tokens, repeats=args.prefix_repeats,
            ))
    run = ServerRun(spec.name, spec.settings, outcomes, prefix, command, errors)
    run.errors.extend(f"level {r.level}: {e}" for r in run.levels for e in r.error_samples)
    return run


async def _warm_up(spec: servers.ServerSpec) -> None:
    """One uncounted request, so no level pays for a lazy load or first compilations."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await stream_chat(client, chat_url(spec.base_url), {
            "model": spec.model, "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 8, "stream": True, "temperature": 0.0}, {})


# ---------------------------------------------------------------- the report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _medians(rounds: list[dict[str, ServerRun | None]], key: str, comparison: Comparison
             ) -> tuple[float | None, list[float]]:
    values = [v for runs in rounds if (run := runs.get(key)) is not None
              and (v := run.metric(comparison.level, comparison.metric)) is not None]
    return (_median(values) if values else None), values


def _verdict(comparison: Comparison, ours: float | None, ratio: float | None) -> tuple[str, str]:
    """(target text, met text) for one comparison."""
    if comparison.own_max is not None:
        met = None if ours is None else ours <= comparison.own_max
        return f"<= {comparison.own_max:g} (gateway)", _met(met)
    if comparison.target is None:
        return "-", "-"
    sign = ">=" if comparison.better == "higher" else "<="
    met = None if ratio is None else (ratio >= comparison.target if comparison.better == "higher"
                                      else ratio <= comparison.target)
    return f"{sign} {comparison.target:g}x", _met(met)


def _met(value: bool | None) -> str:
    return "pending" if value is None else ("yes" if value else "**no**")


def summary_section(rounds: list[dict[str, ServerRun | None]], levels: list[str]) -> str:
    """Per metric: each server's median over rounds, every round's value, and the ratio."""
    lines = ["| metric | mlx-gateway (median) | mlx_lm.server (median) | ratio | "
             "per round, gateway / mlx_lm | target | met |",
             "| --- | ---: | ---: | ---: | --- | --- | --- |"]
    for comparison in COMPARISONS:
        if comparison.level != "*" and comparison.level not in levels:
            continue
        ours, our_values = _medians(rounds, "gateway", comparison)
        theirs, their_values = _medians(rounds, "mlx_lm", comparison)
        ratio = ours / theirs if ours is not None and theirs else None
        per_round = ", ".join(f"{a:.1f} / {b:.1f}" for a, b in
                              zip(our_values, their_values, strict=False)) or "-"
        target, met = _verdict(comparison, ours, ratio)
        lines.append(f"| {comparison.label} | {_fmt(ours)} | {_fmt(theirs)} "
                     f"| {_fmt(ratio, 2)} | {per_round} | {target} | {met} |")
    return "\n".join(lines)


def prefix_section(runs: dict[str, ServerRun | None]) -> str:
    lines = ["| server | history tokens | turn-1 prompt tokens | turn-1 TTFT ms "
             "| turn-2 prompt tokens | turn-2 TTFT ms | turn-2 / turn-1 | target <= 0.5 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key in ("gateway", "mlx_lm"):
        run = runs.get(key)
        p = run.prefix if run else None
        if p is None:
            lines.append(f"| {NAMES[key]} | pending | | | | | | |")
            continue
        met = "yes" if p.ratio <= 0.5 else "**no**"
        lines.append(
            f"| {NAMES[key]} | {p.history_tokens} | {p.first_prompt_tokens} "
            f"| {p.first_ttft * 1000:.0f} | {p.second_prompt_tokens} "
            f"| {p.second_ttft * 1000:.0f} | {p.ratio:.2f} | {met} |"
        )
    return "\n".join(lines)


def _server_tables(runs: dict[str, ServerRun | None], heading: str) -> list[str]:
    out = []
    for key in ("mlx_lm", "gateway"):
        run = runs.get(key)
        out.append(f"{heading} {NAMES[key]}")
        out.append("")
        if run is None:
            out.extend(["pending: not run in this sitting.", ""])
            continue
        out.extend([f"Settings: {run.settings}.", "", f"`{run.command}`", ""])
        if run.levels:
            out.extend([render_table(run.levels, markdown=True), ""])
        out.extend(f"- {o.detail}" for o in run.outcomes.values() if o.detail)
        out.extend(f"- error sample, {e}" for e in run.errors)
        out.append("")
    return out


def report(
    args: argparse.Namespace, model_dir: Path, rounds: list[dict[str, ServerRun | None]],
    load: list[tuple[float, float, float]] | None = None,
) -> str:
    env = servers.bench_env()
    timeout = env.get("OPENBLAS_THREAD_TIMEOUT", "OpenBLAS's default")
    blas = (f"OpenBLAS preloaded for both (`LD_PRELOAD={env.get('LD_PRELOAD')}`); "
            + (f"`OPENBLAS_THREAD_TIMEOUT={timeout}` for both" if args.mlx_lm_blas == "same"
               else f"`OPENBLAS_THREAD_TIMEOUT={timeout}` for mlx-gateway (what `serve` sets), "
                    "OpenBLAS's default for mlx_lm.server")
            + (f"; `OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}` for both (the library does "
               "not know this CPU)" if "OPENBLAS_CORETYPE" in env else "")
            if OPENBLAS.exists() else "MLX's default BLAS (OpenBLAS not found)")
    invocation = shlex.join(["python", "-m", "bench.compare_mlx_lm", *sys.argv[1:]])
    loads = ", ".join(f"{a:.1f}/{b:.1f}/{c:.1f}" for a, b, c in load or [])
    out = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {model_dir.name}",
        "",
        f"- Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}, mlx {version('mlx')}, mlx-lm {version('mlx-lm')}; "
        f"{blas}.",
        f"- Load average (1/5/15 min) at the start of each round and at the end: {loads or '-'}.",
        f"- Weights: `{model_dir}` (float32: {is_float32(model_dir)}).",
        f"- Command: `{invocation}`",
        f"- Levels: {', '.join(args.levels)}. Throughput levels: N parallel clients each send "
        f"{args.requests} streaming chat completions in a row (max_tokens {args.max_tokens}, "
        f"temperature 0), rotating through {len(VARIED_PROMPTS)} prompts of different lengths; "
        "TTFT = first content delta; tokens/s = completion tokens from the usage chunk / wall "
        "time of the level. `mixed`: 8 streaming clients, then one "
        f"~{args.long_tokens}-token prompt nobody sent before; the running streams' longest "
        "gap between two content chunks while it prefilled (arrival to its first token) "
        "against their median gap before it arrived. Peak RSS = largest sampled sum of VmRSS "
        "over the server's process tree during any level. One uncounted warm-up request per "
        "server start. Servers run one after the other, never together"
        + (f"; {len(rounds)} rounds, the order alternating (mlx_lm.server first in odd "
           "rounds), each server restarted every round; medians over rounds"
           if len(rounds) > 1 else "") + ".",
        "",
        f"### Summary (median of {len(rounds)} round{'s' if len(rounds) > 1 else ''})",
        "",
        summary_section(rounds, args.levels),
        "",
    ]
    many = len(rounds) > 1
    for index, runs in enumerate(rounds):
        if many:
            out.extend([f"### Round {index + 1}", ""])
        out.extend(_server_tables(runs, "####" if many else "###"))
    if args.history_tokens > 0:
        out.extend([f"### Prefix cache: ~{args.history_tokens}-token history, median of "
                    f"{args.prefix_repeats} fresh conversations", "",
                    prefix_section(rounds[0]), ""])
    return "\n".join(out)


# ---------------------------------------------------------------- main


def _level_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in LEVELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown level(s) {unknown or text!r}; known: {', '.join(LEVELS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="An MLX model folder.")
    parser.add_argument("--dtype", choices=["float32", "as-is"], default="float32",
                        help="Benchmark a float32 copy (default) or the folder as it is.")
    parser.add_argument("--variant-dir", type=Path, default=None,
                        help="Where the float32 copy lives (default: ~/.cache/mlx-gateway/"
                             "bench/<name>-float32).")
    parser.add_argument("--levels", type=_level_names, default=list(LEVELS),
                        help=f"Comma-separated levels, run in this order (default: all of "
                             f"{', '.join(LEVELS)}).")
    parser.add_argument("--requests", type=int, default=3, help="Requests per client per level.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--long-tokens", type=int, default=4000,
                        help="Prompt tokens of the long prompt of the mixed level.")
    parser.add_argument("--only", choices=["gateway", "mlx_lm"], default=None)
    parser.add_argument("--history-tokens", type=int, default=0,
                        help="Prefix-cache scenario history size; 0 (default) skips it.")
    parser.add_argument("--prefix-repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3,
                        help="Repeat the levels this many times, alternating which server "
                             "goes first, and report medians over rounds (the prefix-cache "
                             "scenario runs in the first round only).")
    parser.add_argument("--mlx-lm-blas", choices=["same", "defaults"], default="same",
                        help="same (default): mlx_lm.server gets the OpenBLAS thread timeout "
                             "the gateway gives itself; defaults: the preload only, as a user "
                             "runs it.")
    parser.add_argument("--restart-tokens", type=int, default=4000,
                        help="The restart level's prompt size (TTFT cold vs after a gateway "
                             "restart with the disk prefix cache, the gateway alone, after "
                             "the rounds); 0 skips it.")
    parser.add_argument("--json-out", type=Path, default=None, help="Also write raw results.")
    parser.add_argument("--edit", action=argparse.BooleanOptionalAction, default=True,
                        help="Also run the edit level (bench.edit): speculation on vs off vs "
                             "mlx_lm.server, 1 client re-emitting a file.")
    edit.add_arguments(parser)
    parser.add_argument("--report-out", type=Path, default=None,
                        help="Also write the report so far to this file after every round.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Turn SIGTERM into an exception so the running server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    src = args.model_dir.expanduser().resolve()
    model_dir = src
    if args.dtype == "float32":
        default = Path.home() / ".cache/mlx-gateway/bench" / f"{src.name}-float32"
        variant = args.variant_dir or default
        model_dir = make_float32_copy(src, variant.expanduser())
    top = 10  # the largest client count of any level
    rounds: list[dict[str, ServerRun | None]] = []
    load: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="mlxgw-bench-") as tmp:
        workdir = Path(tmp)
        specs = {
            "mlx_lm": servers.mlx_lm_spec(model_dir, servers.free_port(), top, sys.executable),
            "gateway": servers.gateway_spec(
                model_dir, servers.free_port(), top, workdir, sys.executable),
        }
        for index in range(max(1, args.rounds)):
            runs: dict[str, ServerRun | None] = {"mlx_lm": None, "gateway": None}
            load.append(os.getloadavg())
            order = ("mlx_lm", "gateway") if index % 2 == 0 else ("gateway", "mlx_lm")
            for key in order:
                if args.only in (None, key):
                    try:
                        runs[key] = run_one(specs[key], args, model_dir, workdir,
                                            round_index=index, with_prefix=index == 0)
                    except RuntimeError as error:
                        log.error("bench.server_failed", server=key, error=str(error))
            rounds.append(runs)
            if args.report_out:  # a long sitting that is stopped still leaves its rounds
                args.report_out.write_text(report(args, model_dir, rounds, [*load,
                                                  os.getloadavg()]) + "\n")
        restart_text = ""
        if args.restart_tokens > 0 and args.only in (None, "gateway"):
            try:
                command = shlex.join(["python", "-m", "bench.compare_mlx_lm", *sys.argv[1:]])
                restart_text, _ = restart.run(model_dir, workdir / "restart",
                                              args.restart_tokens, 1, command)
            except RuntimeError as error:
                log.error("bench.restart_failed", error=str(error))
    load.append(os.getloadavg())
    sys.stdout.write(report(args, model_dir, rounds, load) + "\n")
    if restart_text:
        sys.stdout.write(restart_text + "\n")
    if args.edit and args.only is None:
        sys.stdout.write(edit.run(model_dir, args) + "\n")
    if args.json_out:
        raw = [{key: None if run is None else {
            "settings": run.settings, "command": run.command,
            "levels": {name: {"metrics": o.metrics, "detail": o.detail,
                              "raw": [r.to_dict() for r in o.raw]}
                       for name, o in run.outcomes.items()},
            "prefix": asdict(run.prefix) if run.prefix else None,
        } for key, run in runs.items()} for runs in rounds]
        args.json_out.write_text(json.dumps(raw, indent=2))
    return 0 if any(run for runs in rounds for run in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
