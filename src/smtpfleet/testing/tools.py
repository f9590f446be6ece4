"""Outside tools a test needs (swaks, promtool, helm's SDK, a Redis Cluster...).

A newcomer running `python3 -m pytest` without them gets a skip that says how to get them;
under CI (`CI` set, as `.ci/run` runs), where `.ci/run` installs every one, a missing tool is a
failure: a skip there would hide a test that never ran.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    """Skip locally; fail under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


def need_program(name: str, how: str) -> str:
    """The program's path, or unavailable()."""
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} is not installed ({how})")
    return found


def need_module(name: str, how: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(f"{name} is not importable ({how})")


def need_tls_redis_server() -> Path:
    """A Redis server binary built with TLS (Debian's), or unavailable()."""
    from smtpfleet.testing.redis_server import NoServerBinary, find_tls_server_binary

    try:
        return find_tls_server_binary()
    except NoServerBinary as exc:
        unavailable(str(exc))
