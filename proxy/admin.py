"""The admin listener: a minimal HTTP/1.1 server (stdlib asyncio) for operators.

Endpoints are a table, path -> method -> handler; a handler takes the parsed request and
returns a status and a JSON body (or bytes with their Content-Type, as /metrics does).
To add one, add a row to ``AdminServer.routes``. docs/admin.md describes every endpoint and
the ``sipguard`` commands that use them; docs/metrics.md the metrics.

Robustness, because this runs inside the proxy: one request per connection (answered
with ``Connection: close``: no keep-alive state to get wrong); the request head is at
most 8 KiB and the body 64 KiB, and both must arrive within 5 s; at most 16
connections at once; anything malformed gets a 4xx and a closed connection, a bug in a
handler a 500; nothing raised here reaches the event loop. When a token is configured,
every request must carry ``Authorization: Bearer TOKEN`` (compared in constant time),
except the health checks (``OPEN_PATHS``), which load balancers ask without one.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog

from policies.numbering import normalise

from .app import SipGuard
from .decisions import wall_iso
from .engine import PolicyEngine
from .metrics import exposition, metrics_registry, readiness
from .policyfile import CompiledPolicy
from .reload import Reloader
from .state.history import Penalty

log = structlog.get_logger("sipguard.admin")

MAX_HEAD = 8 * 1024
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 16
CROWDED_READ_TIMEOUT = 1.0  # past MAX_CONNECTIONS: how long a request may take to arrive (health probes)
JSON = "application/json"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # no token: they say only whether sipguard serves
UNBAN_USAGE = (
    'expected {"address": "IP"}, {"number": "+14155550100"} (or national form), {"account": "NAME"}, '
    "or a number and an account together"
)


class HttpError(Exception):
    """Answer ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        """The body as JSON, whatever Content-Type says (``curl -d`` sends a form type)."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as error:
            raise HttpError(400, f"the body is not JSON: {error}") from None
        except RecursionError:  # ([[[[... : 64 KiB nest deeper than the interpreter recurses)
            raise HttpError(400, "the body is not JSON this listener reads: nested too deeply") from None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: Any  # JSON; bytes sent as they are when content_type is not JSON
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = JSON


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class AdminServer:
    def __init__(
        self,
        guard: SipGuard,
        host: str,
        port: int,
        token: str | None = None,
        *,
        engine: PolicyEngine | None = None,
        reloader: Reloader | None = None,
    ) -> None:
        self.guard = guard
        self.engine = engine  # None when sipguard runs without policies (tests of the listener)
        self.reloader = reloader
        self.host = host
        self.port = port
        self._token = token.encode("ascii") if token is not None else None
        self._server: asyncio.Server | None = None
        self._connections = 0
        self.registry = metrics_registry(guard, engine, reloader, clock=_loop_time)
        self._started = 0.0  # loop time at start, for the uptime
        self.routes: dict[str, dict[str, Handler]] = {
            "/bans": {"GET": self.list_bans},
            "/unban": {"POST": self.unban},
            "/metrics": {"GET": self.metrics},
            "/healthz": {"GET": self.healthz},
            "/readyz": {"GET": self.readyz},
            "/status": {"GET": self.status},
            "/explain": {"GET": self.explain},
            "/reload": {"POST": self.reload},
        }

    async def start(self) -> tuple[str, int]:
        """Listen; returns the address bound (the real port when 0 was asked for)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
        self._started = asyncio.get_running_loop().time()
        self.port = self._server.sockets[0].getsockname()[1]
        return self.host, self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    # -- endpoints ----------------------------------------------------------------------------
    async def list_bans(self, request: HttpRequest) -> HttpResponse:
        """``GET /bans``: every banned source, oldest ban first."""
        return HttpResponse(200, self.guard.list_bans())

    async def unban(self, request: HttpRequest) -> HttpResponse:
        """``POST /unban``: ``{"address": "192.0.2.7"}`` lifts that source's flood ban;
        ``{"number": "+14155550100"}`` and/or ``{"account": "acme"}`` take them out of the
        penalty box."""
        body = request.json()
        if not isinstance(body, dict) or not body or set(body) - {"address", "number", "account"}:
            raise HttpError(400, UNBAN_USAGE)
        if "address" not in body:
            return self._release(body.get("number"), body.get("account"))
        address = body["address"]
        if not isinstance(address, str) or len(body) > 1:
            raise HttpError(400, UNBAN_USAGE)
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise HttpError(400, f"{address!r} is not an IP address") from None
        lifted = self.guard.unban(address)
        if lifted is None:
            raise HttpError(404, f"{address} is not banned")
        return HttpResponse(200, {"unbanned": lifted})

    async def metrics(self, request: HttpRequest) -> HttpResponse:
        """``GET /metrics``: Prometheus text format (OpenMetrics if the scraper asks for it)."""
        body, content_type = exposition(self.registry, request.headers.get("accept"))
        return HttpResponse(200, body, content_type=content_type)

    async def healthz(self, request: HttpRequest) -> HttpResponse:
        """``GET /healthz``: the event loop answers (liveness)."""
        return HttpResponse(200, {"status": "ok"})

    async def readyz(self, request: HttpRequest) -> HttpResponse:
        """``GET /readyz``: 200 when this instance should get calls, else 503 with the
        reasons; either says what is degraded, if anything (Redis away, rules failing open)."""
        answer = await readiness(self.guard, self.engine)
        body: dict[str, Any] = {"status": "ready"}
        if answer.problems:
            body = {"status": "not ready", "reasons": list(answer.problems)}
        if answer.degraded:
            body["degraded"] = list(answer.degraded)
        return HttpResponse(503 if answer.problems else 200, body)

    # -- status, explain, reload, the penalty box: what an operator asks of the engine ---------
    async def status(self, request: HttpRequest) -> HttpResponse:
        """``GET /status``: live calls, top callers, penalty box, bans, the policy in force."""
        engine = self._engine()
        now = asyncio.get_running_loop().time()
        memory = engine.decisions
        penalties = sorted(engine.history.penalties(now).items(), key=lambda item: item[1].until)
        uptime = now - self._started
        return HttpResponse(
            200,
            {
                "started_at": wall_iso(time.time() - uptime, "seconds"),
                "uptime_seconds": round(uptime, 1),
                "policy": self._describe_policy(engine.policy),
                "live_calls": memory.live_summary(),
                "top_callers": memory.top_callers(now),
                "penalty_box": [self._boxed(key, penalty, now) for key, penalty in penalties],
                "bans": self.guard.list_bans(),
                "decisions": {
                    "since_start": dict(memory.totals),
                    "remembered": len(memory.recent),
                    "capacity": memory.capacity,
                },
            },
        )

    async def explain(self, request: HttpRequest) -> HttpResponse:
        """``GET /explain?call_id=ID`` (URL-encoded): every remembered decision on that
        Call-ID, oldest first, with how each forwarded call went."""
        engine = self._engine()
        found = urllib.parse.parse_qs(request.query).get("call_id", [])
        if len(found) != 1 or not found[0].strip():
            raise HttpError(400, "expected /explain?call_id=CALL-ID (URL-encoded)")
        call_id = found[0]
        memory = engine.decisions
        attempts = memory.attempts(call_id)
        if not attempts:
            raise HttpError(
                404,
                f"call {call_id!r} is not among the last {len(memory.recent)} decisions nor a live call "
                f"(admin.recent_calls: {memory.capacity}); its call.decision line may still be in the log",
            )
        now = asyncio.get_running_loop().time()
        return HttpResponse(200, {"call_id": call_id, "attempts": [d.explain(now) for d in attempts]})

    async def reload(self, request: HttpRequest) -> HttpResponse:
        """``POST /reload``: as SIGHUP; 200 applied, 422 refused (the running policy stays)."""
        if self.reloader is None:
            raise HttpError(503, "this sipguard has no policy file to reload")
        result = await self.reloader.reload(by="operator")
        return HttpResponse(200 if result.ok else 422, result.as_json())

    def _release(self, number: object, account: object) -> HttpResponse:
        """Take a number (read in the account's region, else the policy's) and/or an account
        out of the penalty box; 404 when none of them was in it."""
        engine = self._engine()
        policy = engine.policy
        region = policy.region
        subjects: list[str] = []
        if account is not None:
            if not isinstance(account, str) or not account:
                raise HttpError(400, UNBAN_USAGE)
            if account in policy.accounts:
                region = policy.accounts[account].region
            subjects.append(f"acct:{account}")
        if number is not None:
            if not isinstance(number, str) or not 0 < len(number) <= 64:
                raise HttpError(400, UNBAN_USAGE)
            normalised = normalise(number.strip(), region)
            if normalised.e164 is None:
                raise HttpError(400, f"{number!r} is not a telephone number in region {region}: "
                                     f"{normalised.problem}")  # fmt: skip
            subjects.insert(0, f"num:{normalised.e164}")
        now = asyncio.get_running_loop().time()
        released, not_boxed = [], []
        for key in subjects:
            penalty = engine.history.penalty(key, now)
            if penalty is None:
                not_boxed.append(key.split(":", 1)[1])
                continue
            engine.history.release(key)
            released.append(self._boxed(key, penalty, now))
            log.warning("penalty.released", subject=key, rule=penalty.rule, reason=penalty.reason,
                        seconds_left=round(penalty.until - now, 1), by="operator")  # fmt: skip
        if not released:
            raise HttpError(404, f"{' and '.join(not_boxed)}: not in the penalty box")
        return HttpResponse(200, {"released": released, "not_boxed": not_boxed})

    def _engine(self) -> PolicyEngine:
        if self.engine is None:
            raise HttpError(503, "this sipguard runs without a policy engine")
        return self.engine

    def _boxed(self, key: str, penalty: Penalty, now: float) -> dict[str, object]:
        assert self.engine is not None
        kind, _, name = key.partition(":")
        return {
            "subject": key,
            "kind": "number" if kind == "num" else "account",
            "name": name,
            "rule": penalty.rule,
            "reason": penalty.reason,
            "until": wall_iso(penalty.until + self.engine.wall_offset, "seconds"),
            "seconds_left": round(max(0.0, penalty.until - now), 1),
        }

    def _describe_policy(self, policy: CompiledPolicy) -> dict[str, object]:
        mode = {rule.name: config.mode for rule, config in policy.rules}
        account_modes = {
            name: {rule.name: config.mode.value for rule, config in rules if mode[rule.name] != config.mode}
            for name, rules in policy.account_rules.items()
        }
        reloader = self.reloader
        return {
            "path": policy.path,
            "loaded_at": wall_iso(policy.loaded_at, "seconds"),
            "loaded_seconds_ago": round(time.time() - policy.loaded_at, 1),
            "rules": [
                {"rule": rule.name, "mode": config.mode.value, "reply": f"{reply.code} {reply.reason}"}
                for rule, config in policy.rules
                for reply in (config.reply,)
            ],
            "account_modes": {name: changed for name, changed in account_modes.items() if changed},
            "accounts": len(policy.accounts),
            "reloads": {"succeeded": reloader.succeeded, "failed": reloader.failed} if reloader else None,
        }

    # -- HTTP ------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        request: HttpRequest | None = None
        try:
            crowded = self._connections > MAX_CONNECTIONS
            try:
                # Past the limit the request is still read, briefly, for one thing: health
                # probes must be answered, or idle connections would make an orchestrator
                # think sipguard dead and restart it. Anything else gets 503.
                async with asyncio.timeout(CROWDED_READ_TIMEOUT if crowded else REQUEST_TIMEOUT):
                    request = await _read_request(reader)
                if crowded and request.path not in OPEN_PATHS:
                    response = _error(503, "too many admin connections")
                else:
                    response = await self._respond(request)
            except HttpError as error:
                response = _error(error.status, error.message, error.headers)
            except TimeoutError:
                if crowded:
                    response = _error(503, "too many admin connections")
                else:
                    response = _error(408, f"the request did not arrive within {REQUEST_TIMEOUT:g} s")
            await _write(writer, response)
            log.info(
                "admin.request",
                method=request.method if request else None,
                path=request.path if request else None,
                status=response.status,
            )
            await _finish(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away: nothing to answer
        except Exception:  # a bug must cost one admin request, never the proxy
            log.exception("admin.internal_error")
        finally:
            self._connections -= 1
            writer.close()

    async def _respond(self, request: HttpRequest) -> HttpResponse:
        if self._token is not None and request.path not in OPEN_PATHS:
            # the scheme is case-insensitive (RFC 9110 §11.1), the token is not
            scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
            offered = credentials.lstrip(" ").encode("latin-1")
            if scheme.lower() != "bearer" or not hmac.compare_digest(offered, self._token):
                raise HttpError(401, "a valid bearer token is required", (("WWW-Authenticate", "Bearer"),))
        methods = self.routes.get(request.path)
        if methods is None:
            raise HttpError(404, f"no such endpoint: {request.path} (try {', '.join(sorted(self.routes))})")
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            raise HttpError(405, f"{request.path} takes {allowed}", (("Allow", allowed),))
        try:
            return await handler(request)
        except HttpError:
            raise
        except Exception:
            log.exception("admin.handler_error", method=request.method, path=request.path)
            return _error(500, "internal error (logged)")


async def _read_request(reader: asyncio.StreamReader) -> HttpRequest:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"the request head is over {MAX_HEAD} bytes") from None
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise HttpError(400, "expected a request line: METHOD /path HTTP/1.1")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"{version!r}: only HTTP/1.1 and 1.0")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpError(400, f"malformed header line {line[:40]!r}")
        key = name.lower()
        if key in headers and key in ("content-length", "authorization", "content-type"):
            raise HttpError(400, f"more than one {name} header")
        headers[key] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(501, "chunked bodies are not supported: send Content-Length")
    length_text = headers.get("content-length", "0")
    if not (length_text.isascii() and length_text.isdigit()):  # (str.isdigit takes "²" too)
        raise HttpError(400, f"Content-Length {length_text!r} is not a number")
    length = int(length_text)
    if length > MAX_BODY:
        raise HttpError(413, f"the body is over {MAX_BODY} bytes")
    try:
        body = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as error:  # the client half-closed: it may still read
        raise HttpError(400, f"the body ended after {len(error.partial)} of its {length} bytes") from None
    path, _, query = target.partition("?")
    return HttpRequest(method=method, path=path, query=query, headers=headers, body=body)


def _loop_time() -> float:
    """The proxy's clock, in which bans and penalties end: scrapes run in its event loop."""
    return asyncio.get_running_loop().time()


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return HttpResponse(status, {"error": message}, headers)


async def _finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read what the client may still send (an oversized request's
    rest) until it closes, bounded: closing with unread bytes would reset the connection
    and could destroy the answer before the client reads it."""
    if writer.can_write_eof():
        writer.write_eof()
    async with asyncio.timeout(1.0):
        for _ in range(MAX_BODY // 4096 + 1):
            if not await reader.read(4096):
                return


async def _write(writer: asyncio.StreamWriter, response: HttpResponse) -> None:
    if response.content_type == JSON:
        body = json.dumps(response.body, indent=2).encode() + b"\n"
    else:
        body = response.body
    head = [
        f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
    async with asyncio.timeout(REQUEST_TIMEOUT):
        await writer.drain()
