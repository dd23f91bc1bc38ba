"""Compiles the sans-I/O SIP core (proxy/sip) to C with mypyc; pyproject.toml has the rest.

Every message passes through proxy/sip, and interpreted it costs several times what moving
the datagram costs (see README, Performance). mypyc compiles the same type-checked source
(mypy --strict on proxy/sip), so there is one implementation: the .py files are the
reference, and the extension modules built from them are what runs and what the tests test.
SIPGUARD_PURE_PYTHON=1 installs without compiling (no C compiler needed; slower).
"""

import os
from pathlib import Path

from setuptools import setup


def compiled_core() -> list:
    if os.environ.get("SIPGUARD_PURE_PYTHON"):
        return []
    from mypyc.build import mypycify

    sources = sorted(str(path) for path in Path("proxy", "sip").glob("*.py"))
    return mypycify(sources, opt_level="3")


setup(ext_modules=compiled_core())
