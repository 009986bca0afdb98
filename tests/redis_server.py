"""A real `redis-server` for tests: free port, no persistence, stoppable and restartable
on the same port (to test falling back while it is down and recovering when it returns)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from tests.local_server import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"



class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="mlxgw-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            return
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.workdir,
             # Tests pause the server with DEBUG SLEEP (a hung Redis); Redis 7 needs this.
             "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode() if self.process.stderr else ""
                self.process = None
                raise RuntimeError(f"redis-server exited: {error}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def pause(self, seconds: float) -> threading.Thread:
        """Make the server unresponsive for `seconds` (DEBUG SLEEP from a thread), as a wedged
        Redis or a black-holed network would be; join the thread to wait for it to return."""
        def sleep() -> None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=seconds + 10) as s:
                s.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
                s.recv(16)

        thread = threading.Thread(target=sleep, daemon=True)
        thread.start()
        time.sleep(0.1)  # the command has reached the server
        return thread

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def running_redis() -> Iterator[RedisServer]:
    """`with running_redis() as server:` -- or wrap it in a pytest fixture."""
    with RedisServer() as server:
        yield server
