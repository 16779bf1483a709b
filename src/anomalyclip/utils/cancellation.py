"""Cooperative cancellation of long work, for callers that may stop waiting (a service
whose client left or timed out).

Long loops (a set's mutual scoring, a bank's encoding) call :func:`checkpoint` between
pieces of work of a second or so; it raises :class:`Cancelled` once the event of the
enclosing :func:`cancellable` block is set, and costs one context-variable read
otherwise. Outside such a block (the CLI, Python) it never raises.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Cancelled", "cancellable", "checkpoint"]

_event: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "anomalyclip_cancel", default=None
)


class Cancelled(RuntimeError):
    """The work was abandoned by whoever asked for it."""


@contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """Work inside this block stops at its next :func:`checkpoint` once ``event`` is set."""
    token = _event.set(event)
    try:
        yield
    finally:
        _event.reset(token)


def checkpoint() -> None:
    """Raise :class:`Cancelled` if the enclosing :func:`cancellable` block was cancelled."""
    event = _event.get()
    if event is not None and event.is_set():
        raise Cancelled("cancelled")
