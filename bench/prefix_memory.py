"""What the prefix cache counts vs what MLX really holds for it, after a churn of sequences.

    python -m bench.prefix_memory [--cache 50MB] [--requests 30] [--model-dir PATH]

An in-process engine on the demo model's float32 copy runs REQUESTS chats, 10 at a time, with
every third abandoned after its first token; then it prints the bytes the cache counts, MLX's
active memory, and how much clearing the cache frees (= what the cache really held).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import uuid
from pathlib import Path

import mlx.core as mx

from app.core.types import ChatMessage, Failed, Finish, GenerationRequest, SamplingParams, TextDelta
from app.engine.engine import Engine
from app.models.registry import ModelRegistry
from app.settings import Settings

_WORDS = ["harbour", "lantern", "heron", "orchard", "quarry", "marsh", "bridge", "mill",
          "ridge", "letters", "stones"]


async def churn(model_dir: Path, cache: str, requests: int) -> str:
    settings = Settings(models=[{"id": "m", "path": model_dir}],  # type: ignore[list-item]
                        engine={"prompt_cache_bytes": cache})  # type: ignore[arg-type]
    engine = Engine(settings, ModelRegistry.build(settings, demo_path=None))
    await engine.start()
    await engine.ensure_loaded("m")
    rng = random.Random(0)
    slots = asyncio.Semaphore(10)

    async def one(index: int) -> None:
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 150)))
        req = GenerationRequest(model="m", request_id=uuid.uuid4().hex,
                                messages=[ChatMessage("user", f"{uuid.uuid4().hex} {words}")],
                                max_tokens=rng.randint(8, 24),
                                sampling=SamplingParams(temperature=0.0))
        async with slots:
            stream = await engine.submit(req)
            async for event in stream:
                if index % 3 == 0 and isinstance(event, TextDelta) and event.text:
                    break
                if isinstance(event, Finish | Failed):
                    break
            await stream.aclose()

    await asyncio.gather(*(one(i) for i in range(requests)))
    await asyncio.sleep(1)
    batch = engine.loaded_models()["m"].batch

    def measure() -> tuple[int, int, int]:
        gc.collect()
        counted, active = batch.prompt_cache_bytes, int(mx.get_active_memory())
        batch._prefix.clear()
        gc.collect()
        return counted, active, active - int(mx.get_active_memory())

    counted, active, freed = await engine._thread.call(measure)
    await engine.stop()
    mib = 2**20
    return (f"cache {cache}, {requests} requests: counted {counted / mib:.1f} MiB, MLX active "
            f"{active / mib:.1f} MiB, freed by clearing the cache {freed / mib:.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="50MB")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--model-dir", type=Path,
                        default=Path("~/.cache/mlx-gateway/models/smollm2-135m-instruct-float32"))
    args = parser.parse_args()
    print(asyncio.run(churn(args.model_dir.expanduser(), args.cache, args.requests)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
