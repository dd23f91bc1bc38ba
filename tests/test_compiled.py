"""What ships is what is tested: proxy/sip runs as mypyc's extension modules (setup.py).

``SIPGUARD_PURE_PYTHON=1`` installs without compiling, and then these tests check the
opposite: that nothing compiled is left to shadow the sources.
"""

import importlib
import os
import pkgutil
import subprocess
import sys

import proxy.sip

PURE_PYTHON = bool(os.environ.get("SIPGUARD_PURE_PYTHON"))


def core_modules() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(proxy.sip.__path__, "proxy.sip."))


def test_every_core_module_is_compiled_unless_installed_pure_python() -> None:
    modules = core_modules()
    assert "proxy.sip.core" in modules and "proxy.sip.message" in modules
    for name in modules:
        origin = importlib.import_module(name).__file__ or ""
        assert origin.endswith(".py") == PURE_PYTHON, (name, origin)
    assert proxy.sip.COMPILED is not PURE_PYTHON


def test_the_proxy_reports_how_its_core_runs() -> None:
    # the flag operators see in proxy.started, read in a fresh interpreter
    probe = "import proxy.sip, proxy.sip.core as c; print(proxy.sip.COMPILED, c.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    compiled, origin = out.split()
    assert compiled == str(not PURE_PYTHON)
    assert origin.endswith(".py") == PURE_PYTHON
