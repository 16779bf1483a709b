"""Giving freed memory back to the system, so that a server's RSS falls after a burst.

glibc keeps what Python frees in its arenas (one per thread that allocated, up to eight
per core) and returns only the top of each heap: after a burst of large answers, or of
clients that never read theirs, the process stays as large as at its peak although the
memory is free. :func:`limit_arenas` caps the arenas (freed memory is reused across
threads), and :func:`release_free_memory` asks glibc (``malloc_trim``) to hand free pages
back, at most once per interval (it walks the heap: about 4 ms for 500 MB). Elsewhere
than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
TRIM_INTERVAL_S = 1.0


@cache
def glibc() -> Any:
    """The C library when it is glibc (it has malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_arenas(count: int = 2) -> bool:
    """At most ``count`` malloc arenas from now on; whether glibc took the setting."""
    libc = glibc()
    return libc is not None and bool(libc.mallopt(M_ARENA_MAX, count))


class FreeMemoryRelease:
    """``malloc_trim`` at most once per ``interval_s``, however often it is asked for; a
    request within the interval is done once the interval is over (so the memory freed
    by the last of a burst is released too)."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.last = float("-inf")
        self._lock = threading.Lock()
        self._later: threading.Timer | None = None

    def __call__(self) -> bool:
        """Release free memory now unless done within the interval; whether it ran."""
        libc = glibc()
        if libc is None:
            return False
        now = time.monotonic()
        with self._lock:
            wait = self.last + self.interval_s - now
            if wait > 0:
                if self._later is None:
                    self._later = threading.Timer(wait, self._deferred)
                    self._later.daemon = True
                    self._later.start()
                return False
            self.last = now
        libc.malloc_trim(0)
        return True

    def _deferred(self) -> None:
        with self._lock:
            self._later = None
        self()


release_free_memory = FreeMemoryRelease()
