"""Shared fixtures: the real Redis servers (tests/redis_server.py).

Also: every process a test starts imports this checkout's code. The ``sipguard`` console
script of an editable install imports whichever checkout was installed, which in a git
worktree is another branch's; PYTHONPATH comes first on sys.path, ahead of that finder.
"""

import os
from pathlib import Path

from redis_server import redis_cluster, redis_sentinel, redis_server  # noqa: F401 - fixtures, found by name

_REPO = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (_REPO, os.environ.get("PYTHONPATH"))))
