"""mlx-gateway vs mlx_lm.server on the same weights, in one sitting, one server at a time.

    python -m bench.compare_mlx_lm --model-dir PATH [--levels 1,5,10] [--requests 3]
        [--max-tokens 128] [--rounds 1] [--only gateway|mlx_lm] [--dtype float32|as-is]
        [--mlx-lm-blas same|defaults]

Both servers get the same environment (OpenBLAS preloaded when present, with the gateway's
thread timeout unless `--mlx-lm-blas defaults`), the same prompts and temperature 0, and are
run in turn, never together (2 cores). Progress goes to stderr; a markdown section for
bench/RESULTS.md goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import structlog

from app.models.variants import make_float_variant
from app.ops.bench import DEFAULT_PROMPT, LevelResult, _levels, render_table, run_probe
from app.ops.system_blas import OPENBLAS
from bench import servers
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
    levels: list[LevelResult]
    prefix: PrefixResult | None
    command: str
    errors: list[str] = field(default_factory=list)

    @property
    def peak_rss(self) -> int | None:
        peaks = [r.peak_rss_bytes for r in self.levels if r.peak_rss_bytes]
        return max(peaks) if peaks else None


def run_one(
    spec: servers.ServerSpec, args: argparse.Namespace, model_dir: Path, workdir: Path,
    *, with_prefix: bool = True,
) -> ServerRun:
    log.info("bench.server_start", server=spec.name, argv=spec.argv)
    command = shlex.join(spec.argv)
    env = servers.bench_env(blas_settings=spec.name == "gateway" or args.mlx_lm_blas == "same")
    with servers.running(spec, env, workdir / f"{spec.name}.log") as pid:
        levels = asyncio.run(run_probe(
            spec.base_url, model=spec.model, levels=args.levels,
            requests_per_client=args.requests, prompt=args.prompt,
            max_tokens=args.max_tokens, api_key=None, server_pid=pid, temperature=0.0,
            on_level=lambda r: log.info("bench.level", server=spec.name, level=r.level,
                                        errors=r.errors, tokens_per_s=round(r.tokens_per_s, 2)),
        ))
        log.info("bench.levels_done", server=spec.name)
        prefix = None
        if with_prefix and args.history_tokens > 0:
            prefix = asyncio.run(first_vs_second_turn(
                spec.base_url, model=spec.model, count=token_counter(model_dir),
                history_tokens=args.history_tokens, repeats=args.prefix_repeats,
            ))
    errors = [f"level {r.level}: {e}" for r in levels for e in r.error_samples]
    return ServerRun(spec.name, spec.settings, levels, prefix, command, errors)


# ---------------------------------------------------------------- the report


def _fmt(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "pending" if value is None else f"{value * scale:.{digits}f}"


def _ratio_row(
    name: str, ours: float | None, theirs: float | None, target: str, ok: Any
) -> str:
    ratio = ours / theirs if ours is not None and theirs else None
    verdict = "pending" if ratio is None else ("yes" if ok(ratio) else "**no**")
    return (f"| {name} | {_fmt(ours)} | {_fmt(theirs)} | {_fmt(ratio, 2)} | {target} "
            f"| {verdict} |")


def _by_level(run: ServerRun | None, level: int) -> LevelResult | None:
    if run is None:
        return None
    return next((r for r in run.levels if r.level == level), None)


def ratios_section(gateway: ServerRun | None, mlx: ServerRun | None, levels: list[int]) -> str:
    top = max(levels)
    lines = ["| metric | mlx-gateway | mlx_lm.server | ratio | target | met |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for level in levels:
        ours, theirs = _by_level(gateway, level), _by_level(mlx, level)
        # The targets name 1 and 10 clients; other levels are reported untargeted.
        target, ok = "", (lambda _r: True)
        if level == 10:
            target, ok = ">= 1.5x", (lambda r: r >= 1.5)
        if level == 1:
            target, ok = ">= 0.95x", (lambda r: r >= 0.95)
        lines.append(_ratio_row(
            f"tokens/s, {level} client(s)", ours.tokens_per_s if ours else None,
            theirs.tokens_per_s if theirs else None, target or "-", ok))
    ours, theirs = _by_level(gateway, top), _by_level(mlx, top)
    lines.append(_ratio_row(
        f"TTFT p95 ms, {top} clients",
        ours.ttft_p95 * 1000 if ours and ours.ttft_p95 is not None else None,
        theirs.ttft_p95 * 1000 if theirs and theirs.ttft_p95 is not None else None,
        "<= 1.0x", lambda r: r <= 1.0))
    mib = 2**20
    lines.append(_ratio_row(
        "peak RSS MiB (any level)",
        gateway.peak_rss / mib if gateway and gateway.peak_rss else None,
        mlx.peak_rss / mib if mlx and mlx.peak_rss else None,
        "<= 1.2x", lambda r: r <= 1.2))
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
        out.extend([f"Settings: {run.settings}.", "", f"`{run.command}`", "",
                    render_table(run.levels, markdown=True), ""])
        out.extend(f"- error sample, {e}" for e in run.errors)
        if run.errors:
            out.append("")
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def rounds_section(rounds: list[dict[str, ServerRun | None]], levels: list[int]) -> str:
    """Per-round tokens/s ratios and their median: drift on a shared machine moves both servers
    of a round together, so the median of per-round ratios is steadier than one sitting."""
    lines = ["| clients | " + " | ".join(f"round {i + 1}" for i in range(len(rounds)))
             + " | median | target | met |",
             "| ---: | " + " | ".join("---:" for _ in rounds) + " | ---: | --- | --- |"]
    for level in levels:
        ratios: list[float] = []
        for runs in rounds:
            ours, theirs = _by_level(runs["gateway"], level), _by_level(runs["mlx_lm"], level)
            if ours and theirs and theirs.tokens_per_s:
                ratios.append(ours.tokens_per_s / theirs.tokens_per_s)
        if not ratios:
            continue
        median = _median(ratios)
        target, met = "-", "-"
        if level == 10:
            target, met = ">= 1.5x", "yes" if median >= 1.5 else "**no**"
        elif level == 1:
            target, met = ">= 0.95x", "yes" if median >= 0.95 else "**no**"
        lines.append(f"| {level} | " + " | ".join(f"{r:.2f}" for r in ratios)
                     + f" | {median:.2f} | {target} | {met} |")
    return "\n".join(lines)


def report(
    args: argparse.Namespace, model_dir: Path, rounds: list[dict[str, ServerRun | None]]
) -> str:
    env = servers.bench_env()
    timeout = env.get("OPENBLAS_THREAD_TIMEOUT", "OpenBLAS's default")
    blas = (f"OpenBLAS preloaded for both (`LD_PRELOAD={env.get('LD_PRELOAD')}`); "
            + (f"`OPENBLAS_THREAD_TIMEOUT={timeout}` for both" if args.mlx_lm_blas == "same"
               else f"`OPENBLAS_THREAD_TIMEOUT={timeout}` for mlx-gateway (what `serve` sets), "
                    "OpenBLAS's default for mlx_lm.server")
            if OPENBLAS.exists() else "MLX's default BLAS (OpenBLAS not found)")
    invocation = shlex.join(["python", "-m", "bench.compare_mlx_lm", *sys.argv[1:]])
    out = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {model_dir.name}",
        "",
        f"- Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}, mlx {version('mlx')}, mlx-lm {version('mlx-lm')}; "
        f"{blas}.",
        f"- Weights: `{model_dir}` (float32: {is_float32(model_dir)}).",
        f"- Command: `{invocation}`",
        f"- Probe: at each level N, N parallel clients each send {args.requests} streaming chat "
        f"completions in a row (max_tokens {args.max_tokens}, temperature 0, the same prompt), "
        "after one uncounted warm-up request. TTFT = first content delta; percentiles by "
        "linear interpolation; tokens/s = completion tokens from the usage chunk / wall time "
        "of the level; peak RSS = largest sampled sum of VmRSS over the server's process "
        "tree during the level. Servers run one after the other, never together"
        + (f"; {len(rounds)} rounds, the order alternating (mlx_lm.server first in odd "
           "rounds), each server restarted every round" if len(rounds) > 1 else "") + ".",
        "",
    ]
    many = len(rounds) > 1
    for index, runs in enumerate(rounds):
        if many:
            out.extend([f"### Round {index + 1}", ""])
        out.extend(_server_tables(runs, "####" if many else "###"))
        out.extend([f"{'####' if many else '###'} Ratios (mlx-gateway / mlx_lm.server)", "",
                    ratios_section(runs.get("gateway"), runs.get("mlx_lm"), args.levels), ""])
    if many:
        out.extend([f"### Tokens/s ratio (mlx-gateway / mlx_lm.server) over {len(rounds)} "
                    "rounds", "", rounds_section(rounds, args.levels), ""])
    if args.history_tokens > 0:
        out.extend([f"### Prefix cache: ~{args.history_tokens}-token history, median of "
                    f"{args.prefix_repeats} fresh conversations", "",
                    prefix_section(rounds[0]), ""])
    return "\n".join(out)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="An MLX model folder.")
    parser.add_argument("--dtype", choices=["float32", "as-is"], default="float32",
                        help="Benchmark a float32 copy (default) or the folder as it is.")
    parser.add_argument("--variant-dir", type=Path, default=None,
                        help="Where the float32 copy lives (default: ~/.cache/mlx-gateway/"
                             "bench/<name>-float32).")
    parser.add_argument("--levels", type=_levels, default=[1, 5, 10])
    parser.add_argument("--requests", type=int, default=3, help="Requests per client per level.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--only", choices=["gateway", "mlx_lm"], default=None)
    parser.add_argument("--history-tokens", type=int, default=1000,
                        help="Prefix-cache scenario history size; 0 skips it.")
    parser.add_argument("--prefix-repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="Repeat the levels this many times, alternating which server "
                             "goes first, and report the median ratio (the prefix-cache "
                             "scenario runs in the first round only).")
    parser.add_argument("--mlx-lm-blas", choices=["same", "defaults"], default="same",
                        help="same (default): mlx_lm.server gets the OpenBLAS thread timeout "
                             "the gateway gives itself; defaults: the preload only, as a user "
                             "runs it.")
    parser.add_argument("--json-out", type=Path, default=None, help="Also write raw results.")
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
    top = max(args.levels)
    rounds: list[dict[str, ServerRun | None]] = []
    with tempfile.TemporaryDirectory(prefix="mlxgw-bench-") as tmp:
        workdir = Path(tmp)
        specs = {
            "mlx_lm": servers.mlx_lm_spec(model_dir, servers.free_port(), top, sys.executable),
            "gateway": servers.gateway_spec(
                model_dir, servers.free_port(), top, workdir, sys.executable),
        }
        for index in range(max(1, args.rounds)):
            runs: dict[str, ServerRun | None] = {"mlx_lm": None, "gateway": None}
            order = ("mlx_lm", "gateway") if index % 2 == 0 else ("gateway", "mlx_lm")
            for key in order:
                if args.only in (None, key):
                    try:
                        runs[key] = run_one(specs[key], args, model_dir, workdir,
                                            with_prefix=index == 0)
                    except RuntimeError as error:
                        log.error("bench.server_failed", server=key, error=str(error))
            rounds.append(runs)
    sys.stdout.write(report(args, model_dir, rounds) + "\n")
    if args.json_out:
        raw = [{key: None if run is None else {
            "settings": run.settings, "command": run.command,
            "levels": [r.to_dict() for r in run.levels],
            "prefix": asdict(run.prefix) if run.prefix else None,
        } for key, run in runs.items()} for runs in rounds]
        args.json_out.write_text(json.dumps(raw, indent=2))
    return 0 if any(run for runs in rounds for run in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
