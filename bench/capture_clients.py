"""Record the first request each real coding agent sends, and keep its tool list as a fixture.

    python -m bench.capture_clients [--out tests/fixtures/client_tools]

Runs Claude Code, Codex and OpenCode (from `.tools/`, `make clients`) against a tiny local
HTTP server that stores every request body and answers 400, so the clients stop at once. Each
client's biggest request (the one with the most tools) is written to `<client>.request.json`
and its tool list, exactly as sent over the wire, to `<client>.tools.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOLS_BIN = ROOT / ".tools" / "node_modules" / ".bin"


class _Recorder(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": []}).encode()
        self._answer(200, body)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        with contextlib.suppress(ValueError):
            self.bodies.append({"path": self.path, "body": json.loads(raw)})
        error = {"type": "error", "error": {"type": "invalid_request_error",
                                            "message": "captured"}}
        self._answer(400, json.dumps(error).encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> None:
    subprocess.run(argv, env={**os.environ, "PATH": f"{TOOLS_BIN}:{os.environ['PATH']}", **env},
                   cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
                   stdin=subprocess.DEVNULL)


def capture(client: str, workdir: Path) -> dict[str, Any]:
    """The client's request with the most tools."""
    _Recorder.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    home = workdir / client
    home.mkdir(parents=True, exist_ok=True)
    try:
        if client == "claude":
            _run(["claude", "-p", "hi"], {"HOME": str(home), "ANTHROPIC_BASE_URL": url,
                                          "ANTHROPIC_AUTH_TOKEN": "x", "ANTHROPIC_API_KEY": "",
                                          "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}, home)
        elif client == "codex":
            codex_home = home / ".codex"
            codex_home.mkdir(exist_ok=True)
            (codex_home / "config.toml").write_text(
                'model = "m"\nmodel_provider = "cap"\n[model_providers.cap]\nname = "cap"\n'
                f'base_url = "{url}/v1"\nenv_key = "CAP_KEY"\nwire_api = "responses"\n'
                "request_max_retries = 0\nstream_max_retries = 0\n")
            _run(["codex", "exec", "--skip-git-repo-check", "hi"],
                 {"HOME": str(home), "CODEX_HOME": str(codex_home), "CAP_KEY": "x"}, home)
        else:
            config = home / "opencode.json"
            config.write_text(json.dumps({"provider": {"cap": {
                "npm": "@ai-sdk/openai-compatible", "name": "cap",
                "options": {"baseURL": url + "/v1", "apiKey": "x"},
                "models": {"m": {"name": "m"}}}}, "model": "cap/m"}))
            _run(["opencode", "run", "hi"], {"HOME": str(home), "OPENCODE_CONFIG": str(config)},
                 home)
    finally:
        server.shutdown()
    if not _Recorder.bodies:
        raise RuntimeError(f"{client} sent no request")
    return max(_Recorder.bodies, key=lambda b: len(b["body"].get("tools") or []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "client_tools")
    parser.add_argument("clients", nargs="*", default=["claude", "codex", "opencode"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for client in args.clients:
            captured = capture(client, Path(tmp))
            body = captured["body"]
            (args.out / f"{client}.request.json").write_text(
                json.dumps(captured, indent=1, ensure_ascii=False) + "\n")
            (args.out / f"{client}.tools.json").write_text(
                json.dumps(body.get("tools") or [], indent=1, ensure_ascii=False) + "\n")
            print(client, captured["path"], len(body.get("tools") or []), "tools")


if __name__ == "__main__":
    main()
