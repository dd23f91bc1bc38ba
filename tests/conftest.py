"""Shared fixtures: the real Redis servers (tests/redis_server.py), and ``policy_lab``: a
sipguard with a policy file and SIPp peers (tests/policy_e2e.py), stopped after the test.

Also: every process a test starts imports this checkout's code. The ``sipguard`` console
script of an editable install imports whichever checkout was installed, which in a git
worktree is another branch's; PYTHONPATH comes first on sys.path, ahead of that finder.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from policy_e2e import PolicyLab
from redis_server import redis_cluster, redis_sentinel, redis_server  # noqa: F401 - fixtures, found by name
from sipp import Lab

_REPO = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (_REPO, os.environ.get("PYTHONPATH"))))


@pytest.fixture
def policy_lab(tmp_path: Path) -> Iterator[PolicyLab]:
    lab = Lab(tmp_path)
    yield PolicyLab(lab)
    lab.close()
