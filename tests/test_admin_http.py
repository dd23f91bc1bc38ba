"""The admin listener's HTTP handling, in process: raw requests to an AdminServer bound to
loopback (no proxy, no policy engine), each answered with a status and a JSON error.
(tests/test_flood_e2e.py asks the same mistakes of a whole running sipguard.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sipp import LOOPBACK
from sipsim import LOCAL_UDP, UPSTREAM

from proxy.admin import MAX_CONNECTIONS, AdminServer
from proxy.app import ProxySettings, SipGuard

TOKEN = "admin-token-0123456789"


async def _exchange(raw: bytes, token: str | None) -> bytes:
    guard = SipGuard(ProxySettings(listen=[LOCAL_UDP], upstream=UPSTREAM), None)
    admin = AdminServer(guard, LOOPBACK, 0, token)
    _, port = await admin.start()
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(raw)
        writer.write_eof()
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        return answer
    finally:
        await admin.close()


def ask(raw: bytes, token: str | None = None) -> tuple[int, dict[str, str], Any]:
    """One raw request to a fresh listener: the answer's status, headers and body (parsed, if JSON)."""
    answer = asyncio.run(_exchange(raw, token))
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), answer[:80]
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    content = json.loads(body) if headers["content-type"] == "application/json" else body
    return int(lines[0].split(" ")[1]), headers, content


def test_a_content_length_in_other_digits_than_ascii_is_a_bad_request() -> None:
    """A Content-Length of "²" is a digit to str.isdigit but not to int(): the listener
    used to raise, answer nothing and log admin.internal_error (not admin.request)."""
    raw = "POST /unban HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\nab".encode("latin-1")
    status, _, body = ask(raw)
    assert (status, body) == (400, {"error": "Content-Length '\u00b2' is not a number"})


def test_a_body_nested_too_deeply_is_a_bad_request() -> None:
    """json.loads raises RecursionError, not ValueError, for a body of 60,000 "[": it was
    taken for a bug in the handler (500, and a traceback in the log)."""
    raw = b"POST /unban HTTP/1.1\r\nContent-Length: 60000\r\n\r\n" + b"[" * 60_000
    status, _, body = ask(raw)
    assert (status, body) == (400, {"error": "the body is not JSON this listener reads: nested too deeply"})


def metrics_with(authorization: str | None) -> int:
    head = f"Authorization: {authorization}\r\n" if authorization is not None else ""
    return ask(f"GET /metrics HTTP/1.1\r\n{head}\r\n".encode(), TOKEN)[0]


def test_the_bearer_scheme_is_case_insensitive_and_the_token_is_not() -> None:
    """RFC 9110 §11.1: the auth scheme is case-insensitive; "bearer TOKEN" used to get 401."""
    assert metrics_with(f"Bearer {TOKEN}") == 200
    assert metrics_with(f"bearer {TOKEN}") == 200
    assert metrics_with(f"BEARER  {TOKEN}") == 200
    assert metrics_with(f"Bearer {TOKEN.upper()}") == 401
    assert metrics_with(f"Basic {TOKEN}") == 401
    assert metrics_with(f"Bearer {TOKEN}x") == 401
    assert metrics_with(f"Bearer{TOKEN}") == 401
    assert metrics_with("Bearer") == 401
    assert metrics_with(None) == 401


def test_a_body_shorter_than_its_content_length_is_answered_400() -> None:
    """A client that sends fewer bytes than its Content-Length and half-closes can still
    read an answer: it used to get none, and no admin.request line was logged."""
    raw = b"POST /unban HTTP/1.1\r\nContent-Length: 10\r\n\r\n" + b'{"a":1}'
    assert ask(raw)[::2] == (400, {"error": "the body ended after 7 of its 10 bytes"})


class CountingAdminServer(AdminServer):
    """An AdminServer that says when MAX_CONNECTIONS connections have been taken in."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.accepted = 0
        self.all_idle_accepted = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.accepted == MAX_CONNECTIONS:  # (counted by the listener before its first await)
            self.all_idle_accepted.set()
        await super()._serve(reader, writer)


def test_health_probes_are_answered_past_the_connection_limit() -> None:
    """MAX_CONNECTIONS idle connections (a stuck client, a port scan) used to make every
    other request 503, health probes included: an orchestrator would think sipguard dead
    and restart it. Past the limit /healthz is still answered; anything else gets 503."""

    async def scenario() -> tuple[bytes, bytes]:
        guard = SipGuard(ProxySettings(listen=[LOCAL_UDP], upstream=UPSTREAM), None)
        admin = CountingAdminServer(guard, LOOPBACK, 0, TOKEN)
        _, port = await admin.start()
        idle = [await asyncio.open_connection(LOOPBACK, port) for _ in range(MAX_CONNECTIONS)]
        try:
            async with asyncio.timeout(10):
                await admin.all_idle_accepted.wait()  # each one accepted and waiting
            answers = []
            for raw in (
                b"GET /healthz HTTP/1.1\r\n\r\n",
                f"GET /status HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode(),
            ):
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                writer.write(raw)
                writer.write_eof()
                async with asyncio.timeout(10):
                    answers.append(await reader.read())
                writer.close()
            return answers[0], answers[1]
        finally:
            for _, writer in idle:
                writer.close()
            await admin.close()

    health, status = asyncio.run(scenario())
    assert health.startswith(b"HTTP/1.1 200 "), health[:80]
    assert status.startswith(b"HTTP/1.1 503 ") and b"too many admin connections" in status, status[:200]
