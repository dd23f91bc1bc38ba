"""The Redis URLs the policy file takes (``state: {url: ...}``), checked at load time.

redis-py's ``from_url`` takes ``redis://``, ``rediss://`` and ``unix://`` (one server);
Sentinel and Cluster need their own clients, so their URLs are parsed here, without
importing redis (the policy file validates them before any store exists):

- ``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``: the
  sentinels to ask, the service (master) name they monitor, the database (default 0).
  The credentials are the master's; the sentinels themselves are asked without any.
- ``redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]``: startup nodes of a
  Redis Cluster (any few of its nodes; the client learns the rest). No database: a
  Cluster has only 0.

A port is required; an IPv6 host goes in brackets (``[::1]:26379``); a password with
``@ : / ,`` in it is percent-encoded. No query string.

The one-server URLs are checked by ``check_single_url`` as redis-py will read them
(its options in the query string included), by building the connection it would open
without opening it; only that check imports redis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")  # redis-py's from_url
SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
NODES_SCHEMES = (SENTINEL_SCHEME, CLUSTER_SCHEME)  # parsed here, by parse_nodes_url
REDIS_SCHEMES = (*SINGLE_SCHEMES, *NODES_SCHEMES)

_NODE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")


@dataclass(frozen=True)
class NodesUrl:
    """A parsed ``redis+sentinel://`` or ``redis+cluster://`` URL."""

    kind: Literal["sentinel", "cluster"]
    nodes: tuple[tuple[str, int], ...]
    service: str | None = None  # sentinel: the monitored master's name
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_nodes_url(url: str) -> NodesUrl:
    """Parse a Sentinel or Cluster URL; ValueError says what is wrong with it."""
    if url.startswith(SENTINEL_SCHEME):
        kind: Literal["sentinel", "cluster"] = "sentinel"
        rest = url[len(SENTINEL_SCHEME) :]
        form = "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
    elif url.startswith(CLUSTER_SCHEME):
        kind = "cluster"
        rest = url[len(CLUSTER_SCHEME) :]
        form = "redis+cluster://HOST:PORT[,HOST:PORT...]"
    else:
        raise ValueError(f"expected {SENTINEL_SCHEME} or {CLUSTER_SCHEME}")
    if "?" in rest or "#" in rest:
        raise ValueError(f"no query string or fragment: expected {form}")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise ValueError("credentials go as :PASSWORD@ or USER:PASSWORD@")
        username, password = unquote(user) or None, unquote(secret)
    nodes = []
    for node in hosts.split(","):
        match = _NODE.fullmatch(node)
        if match is None or not 0 < int(match[2]) < 65536:
            raise ValueError(f"{node!r} is not HOST:PORT: expected {form}")
        nodes.append((match[1].strip("[]"), int(match[2])))
    if kind == "cluster":
        if path:
            raise ValueError(f"a Redis Cluster has no database or service name: expected {form}")
        return NodesUrl(kind, tuple(nodes), username=username, password=password)
    service, _, db = path.partition("/")
    if not service:
        raise ValueError(f"no service name: expected {form}")
    if db and not re.fullmatch("[0-9]+", db):
        raise ValueError(f"database {db!r} is not a number: expected {form}")
    return NodesUrl(kind, tuple(nodes), service, int(db or 0), username, password)


def check_single_url(url: str) -> None:
    """Check a ``redis://``, ``rediss://`` or ``unix://`` URL; ValueError says what is
    wrong with it (rather than a traceback at start, or an error on every call)."""
    split = urlsplit(url)  # ValueError: Invalid IPv6 URL
    if split.scheme == "unix":
        if not split.path:
            raise ValueError("no socket path: expected unix:///PATH[?db=DB]")
    else:
        db = unquote(split.path).strip("/")
        if db and not db.isdigit():  # redis-py would use database 0
            raise ValueError(f"database {db!r} is not a number: expected {split.scheme}://HOST:PORT[/DB]")
    from redis.asyncio import BlockingConnectionPool
    from redis.exceptions import RedisError

    try:
        BlockingConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except ValueError:  # a port, or an option's value: redis-py's message says which
        raise
    except (TypeError, RedisError) as error:  # an option redis-py does not take, a bad TLS one
        raise ValueError(f"redis-py does not take this URL: {error}") from None
