"""Shared fixtures: the real Redis servers (tests/redis_server.py)."""

from redis_server import redis_cluster, redis_sentinel, redis_server  # noqa: F401 - fixtures, found by name
