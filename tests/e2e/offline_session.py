"""Run inside a network namespace that has only loopback (see test_clients.py): a gateway with
keys on, the official SDKs and, when installed, Claude Code through `mlx-gateway launch`.
Prints one JSON object with what each step saw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anthropic
import openai

from tests.e2e.clients import ROOT, client_path
from tests.e2e.gateway_process import GatewayProcess


def main(workdir: Path, model_dir: Path) -> dict[str, object]:
    interfaces = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                                check=True).stdout
    routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True,
                            check=True).stdout
    model = "smollm2-135m-instruct"
    server = GatewayProcess(workdir, {"auth": {"enabled": True},
                                      "engine": {"default_max_tokens": 16},
                                      "models": [{"id": model, "path": str(model_dir),
                                                  "sampling": {"temperature": 0}}]})
    config = str(server.config_path)
    cli = [sys.executable, "-m", "app.cli"]
    key = subprocess.run([*cli, "keys", "create", "--name", "offline", "--config", config],
                         cwd=ROOT, capture_output=True, text=True, check=True
                         ).stdout.splitlines()[-1]
    server.start()
    result: dict[str, object] = {"interfaces": [line.split(":")[1].strip()
                                                for line in interfaces.splitlines()],
                                 "routes": routes.strip()}
    try:
        claude = anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0)
        message = claude.messages.create(model=model, max_tokens=16, messages=[
            {"role": "user", "content": "What is the capital of France?"}],
            extra_body={"temperature": 0})
        result["anthropic"] = message.content[0].text  # type: ignore[union-attr]
        chat = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)
        reply = chat.chat.completions.create(model=model, temperature=0, max_tokens=16,
                                             messages=[{"role": "user", "content": "Hi"}])
        result["openai"] = reply.choices[0].message.content
        env = {"PATH": client_path(), "HOME": str(workdir / "home")}
        launched = subprocess.run(
            [*cli, "launch", "claude", "--config", config, "--url", server.base_url, "--",
             "-p", "--bare", "--tools", ""],
            input="What is the capital of France?", cwd=ROOT, capture_output=True, text=True,
            timeout=600, env={**env, "PYTHONPATH": str(ROOT)})
        result["claude"] = {"code": launched.returncode, "out": launched.stdout,
                            "err": launched.stderr[-2000:]}
    finally:
        server.stop()
    result["log"] = server.logs()
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
