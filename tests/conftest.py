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

_REPO = str(Path(__file__).resolve().parent.parent)


def _refuse_stale_machine_code() -> None:
    """An extension module built from an older proxy/sip source would be imported instead
    of the edited .py (setup.py compiles them in place): stop before anything imports it."""
    sip = Path(_REPO, "proxy", "sip")
    stale = [
        source.name
        for source in sorted(sip.glob("*.py"))
        for built in sip.glob(f"{source.stem}.*.so")
        if built.stat().st_mtime < source.stat().st_mtime
    ]
    if stale:
        pytest.exit(
            f"proxy/sip was edited after it was compiled ({', '.join(stale)}): rebuild with "
            "`.venv/bin/pip install -e .`, or delete proxy/sip/*.so to test the .py sources",
            returncode=4,
        )


_refuse_stale_machine_code()

from policy_e2e import PolicyLab  # noqa: E402 - after the check above
from redis_server import redis_cluster, redis_sentinel, redis_server  # noqa: E402, F401 - fixtures, by name
from sipp import Lab  # noqa: E402

os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (_REPO, os.environ.get("PYTHONPATH"))))


@pytest.fixture
def policy_lab(tmp_path: Path) -> Iterator[PolicyLab]:
    lab = Lab(tmp_path)
    yield PolicyLab(lab)
    lab.close()
