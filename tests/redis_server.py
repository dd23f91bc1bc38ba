"""A real redis-server for the tests: started once per session on a free loopback port,
no persistence, stopped at the end. Its absence fails the tests that need it (``.ci/setup``
installs Debian's redis-server), it never skips them."""

from __future__ import annotations

import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

REDIS_SERVER = shutil.which("redis-server")


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> bytes:
        """One command over a plain socket (RESP), for fixtures: FLUSHALL, PING ..."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as connection:
            connection.sendall(b"".join(parts))
            return connection.recv(65536)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis(workdir: Path, port: int | None = None) -> RedisServer:
    """A redis-server on ``port`` (a free one if None: pass a stopped server's port to
    restart it where its clients point), answering PING before this returns."""
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed: run `bash .ci/setup` (installs Debian's redis-server)")
    port = port or _free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", ""],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        bufsize=0,  # unbuffered: a line read must not pull the next ones where select cannot see them
    )  # fmt: skip
    assert process.stdout is not None
    # Ready when it says so on its log (stdout); the deadline bounds a server that never does.
    deadline = time.monotonic() + 10.0
    with selectors.DefaultSelector() as waiting:
        waiting.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not waiting.select(timeout=deadline - time.monotonic()):
                break
            line = process.stdout.readline()
            if not line:  # it exited
                break
            if b"Ready to accept connections" in line:
                threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
                server = RedisServer(port, process)
                assert server.command("PING").startswith(b"+PONG")
                return server
    process.kill()
    pytest.fail("redis-server did not start")


def _drain(stream: IO[bytes]) -> None:
    """Keep reading the server's log so a full pipe never blocks it."""
    for _ in stream:
        pass


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)
