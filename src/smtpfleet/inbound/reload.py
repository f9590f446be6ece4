"""Files that are read again when they change: the TLS certificate, the AUTH credentials.

Kubernetes updates a mounted secret by swapping a symlink, so a change is seen as a new
(device, inode, size, mtime) of the file the path leads to. The files are looked at no more
often than every `interval_s`, from the code that uses them (no task of its own). A change that
cannot be loaded (a half-written file, a key that does not match its certificate) keeps the
last good value in use and is logged once; the next change is tried again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Signature = tuple[tuple[int, int, int, int], ...]


def signature(paths: Sequence[str]) -> Signature:
    """What identifies the current content of these files without reading them."""
    stats = (os.stat(path) for path in paths)
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class Reloading(Generic[T]):
    """A value loaded from files, loaded again when they change."""

    def __init__(
        self,
        paths: Sequence[str],
        load: Callable[[], T],
        *,
        interval_s: float,
        what: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._paths = tuple(paths)
        self._load = load
        self._interval_s = interval_s
        self._what = what
        self._clock = clock
        self._signature = signature(self._paths)
        self._value = load()  # at start a broken file is an error: the node does not start
        self._checked = clock()
        self._unreadable: str | None = None  # the file we said we cannot read, until we can
        self.reloads = 0

    def get(self) -> T:
        now = self._clock()
        if now - self._checked >= self._interval_s:
            self._checked = now
            self._check()
        return self._value

    def _check(self) -> None:
        try:
            current = signature(self._paths)
        except OSError as exc:
            if exc.filename != self._unreadable:  # once, not at every check while it lasts
                log.warning("%s: cannot read %s; keeping the loaded one", self._what, exc.filename)
                self._unreadable = exc.filename
            return
        self._unreadable = None
        if current == self._signature:
            return
        self._signature = current  # tried once per change, not on every check
        try:
            self._value = self._load()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            # The loaders' messages name the file and line, never its content.
            log.error(
                "%s changed but cannot be loaded (%s); keeping the loaded one", self._what, exc
            )
            return
        self.reloads += 1
        log.info("%s reloaded", self._what)
