"""Real redis-servers for the tests, started once per session on free loopback ports, no
persistence, stopped at the end: one server, a 3-node Redis Cluster, and a master watched
by one sentinel (``redis-server --sentinel``, the same binary). Its absence fails the
tests that need it (``.ci/setup`` installs Debian's redis-server), it never skips them."""

from __future__ import annotations

import contextlib
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import quote

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    password: str | None = None
    log: ServerLog = field(default_factory=lambda: ServerLog())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> bytes:
        """One command over a plain socket (RESP), for fixtures: FLUSHALL, PING ...
        (after an AUTH if the server has a password)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as connection:
            if self.password:
                connection.sendall(_resp("AUTH", self.password))
                assert connection.recv(65536) == b"+OK\r\n"
            connection.sendall(_resp(*args))
            return connection.recv(65536)

    def flushall(self) -> None:
        assert self.command("FLUSHALL").startswith(b"+OK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class ServerLog:
    """A server's log lines (its stdout), read by a thread so a full pipe never blocks it,
    and waited on for the line that says something happened (ready, cluster state ok)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self._changed = threading.Condition()

    def add(self, line: bytes) -> None:
        with self._changed:
            self.lines.append(line)
            self._changed.notify_all()

    def wait_for(self, text: bytes, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: any(text in line for line in self.lines), timeout)

    def follow(self, stream: IO[bytes]) -> None:
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            self.add(line)


def _resp(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held together while chosen, so none repeats)."""
    with contextlib.ExitStack() as held:
        probes = [held.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def start_redis(
    workdir: Path,
    port: int | None = None,
    *,
    config: Path | None = None,
    args: Sequence[str] = (),
    password: str | None = None,
    ready: bytes = b"Ready to accept connections",
) -> RedisServer:
    """A redis-server on ``port`` (a free one if None: pass a stopped server's port to
    restart it where its clients point), answering PING before this returns. ``config``
    is a config file to start from, ``args`` more options (``--sentinel``: a sentinel,
    whose log says ``ready`` differently), ``password`` its requirepass."""
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed: run `bash .ci/setup` (installs Debian's redis-server)")
    port = port or _free_port()
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    options += ["--dir", str(workdir), "--logfile", "", *args]
    command = [REDIS_SERVER, *([str(config)] if config else []), *options]
    if password:
        command += ["--requirepass", password]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        bufsize=0,  # unbuffered: a line read must not pull the next ones where select cannot see them
    )  # fmt: skip
    assert process.stdout is not None
    log = ServerLog()
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
            log.add(line)
            if ready in line:
                log.follow(process.stdout)
                server = RedisServer(port, process, password, log)
                assert server.command("PING").startswith(b"+PONG")
                return server
    process.kill()
    pytest.fail(f"redis-server did not start: {b''.join(log.lines[-20:]).decode(errors='replace')}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


# -- Redis Cluster and Sentinel ------------------------------------------------------------------
@dataclass
class RedisCluster:
    """Three masters sharing the 16384 slots, no replicas."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:2])

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()


def start_cluster(workdir: Path, size: int = 3) -> RedisCluster:
    """``size`` cluster-enabled redis-servers joined by ``redis-cli --cluster create``;
    returns once every node logs that the cluster state is ok."""
    if REDIS_CLI is None:
        pytest.fail("redis-cli is not installed: run `bash .ci/setup` (installs Debian's redis-server)")
    ports = free_ports(2 * size)  # a client port and a cluster bus port per node
    nodes: list[RedisServer] = []
    try:
        for index in range(size):
            nodedir = workdir / f"node{index}"
            nodedir.mkdir()
            bus = ["--cluster-enabled", "yes", "--cluster-port", str(ports[size + index])]
            nodes.append(start_redis(nodedir, ports[index], args=bus))
        created = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            pytest.fail(
                f"redis-cli --cluster create failed: {created.stdout.decode()}{created.stderr.decode()}"
            )
        for node in nodes:
            if not node.log.wait_for(b"Cluster state changed: ok", timeout=20.0):
                pytest.fail(f"Redis Cluster node {node.port} never reached state ok")
        return RedisCluster(nodes)
    except BaseException:
        for node in nodes:
            node.process.kill()
        raise


@dataclass
class RedisSentinel:
    """A master (with a password) and one sentinel monitoring it, quorum 1."""

    master: RedisServer
    sentinel: RedisServer
    service: str = "sipguard"

    @property
    def url(self) -> str:
        assert self.master.password is not None
        password = quote(self.master.password, safe="")  # it has a "/": tests the decoding
        return f"redis+sentinel://:{password}@127.0.0.1:{self.sentinel.port}/{self.service}/0"

    def flushall(self) -> None:
        self.master.flushall()


def start_sentinel(workdir: Path) -> RedisSentinel:
    master = start_redis(workdir, password="sip/guard secret")
    port = _free_port()
    config = workdir / "sentinel.conf"  # a sentinel rewrites its config file: its own copy
    config.write_text(
        f"sentinel monitor sipguard 127.0.0.1 {master.port} 1\n"
        f'sentinel auth-pass sipguard "{master.password}"\n'
    )
    try:
        sentinel = start_redis(workdir, port, config=config, args=["--sentinel"], ready=b"+monitor master")
    except BaseException:
        master.stop()
        raise
    return RedisSentinel(master, sentinel)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    for node in cluster.nodes:
        node.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinel]:
    setup = start_sentinel(tmp_path_factory.mktemp("redis-sentinel"))
    yield setup
    setup.sentinel.stop()
    setup.master.stop()
