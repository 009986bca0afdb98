"""The soak benchmark: a gateway on the demo model's float32 copy under N clients for M
minutes, every third stream abandoned after its first chunk (issue 13's reproduction).

    python -m bench.soak [--clients 10] [--minutes 5] [--warmup 60]
        [--prompt-cache-bytes 512MB|50MB|0] [--model-dir PATH] [--json-out FILE]

Starts the server itself (`python -m app.cli serve`, OpenBLAS preloaded when present), runs
`app.ops.soak` against it (the code of `mlx-gateway bench --soak`) and prints a markdown
section for bench/RESULTS.md. Exits 1 when the gauges do not return to 0, a request fails, or
RSS drifts more than 15% after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shlex
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from app.models.variants import make_float_variant
from app.ops import soak
from bench import servers


def demo_dir() -> Path:
    from app.models.demo import demo_model_dir
    from app.settings import load_settings

    return demo_model_dir(load_settings().cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompt-cache-bytes", default="512MB")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)

    source = args.model_dir or demo_dir()
    model_dir = make_float_variant(source, source.parent / f"{source.name}-float32", "float32",
                                   exist_ok=True)
    port = servers.free_port()
    with tempfile.TemporaryDirectory(prefix="mlxgw-soak-") as tmp:
        spec = servers.gateway_spec(model_dir, port, args.clients, Path(tmp), sys.executable,
                                    prompt_cache_bytes=args.prompt_cache_bytes)
        with servers.running(spec, servers.bench_env(), Path(tmp) / "server.log") as pid:
            result = asyncio.run(soak.run_soak(
                spec.base_url, model=spec.model, clients=args.clients,
                seconds=args.minutes * 60, warmup_seconds=args.warmup,
                max_tokens=args.max_tokens, server_pid=pid))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(result.to_dict(), indent=2))
    command = "python -m bench.soak " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: soak, {args.clients} clients, "
          f"{args.minutes:g} min, prompt_cache_bytes = {args.prompt_cache_bytes}\n")
    print(f"- Command: `{command}` (server: `{shlex.join(spec.argv)}`)")
    print(f"- Machine: {platform.system()} {platform.machine()}; weights {model_dir}")
    print(f"- Server settings: {spec.settings}\n")
    print(soak.render(result))
    for sample in result.error_samples:
        print(f"\nerror: {sample}")
    return 0 if soak.passed(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
