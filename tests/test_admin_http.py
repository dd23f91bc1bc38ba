"""The admin listener's HTTP handling, in process: raw requests to an AdminServer bound to
loopback (no proxy, no policy engine), each answered with a status and a JSON error.
(tests/test_flood_e2e.py asks the same mistakes of a whole running sipguard.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sipp import LOOPBACK
from sipsim import LOCAL_UDP, UPSTREAM

from proxy.admin import AdminServer
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
    """One raw request to a fresh listener: the answer's status, headers and JSON body."""
    answer = asyncio.run(_exchange(raw, token))
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), answer[:80]
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, json.loads(body)


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
