"""Shared fixtures: the real redis-server (tests/redis_server.py)."""

from redis_server import redis_server  # noqa: F401 - a fixture, found by name
