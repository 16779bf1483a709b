"""Values quoted in error messages, kept to one short line whatever a file holds.

A checkpoint's ``object_name`` of a million characters once made a million-character
error line; every message that quotes a value read from a file or a request goes
through :func:`quoted`.
"""

from __future__ import annotations

from typing import Any

QUOTE_LIMIT = 80


def quoted(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` on one line, cut to about ``limit`` characters: a longer one keeps
    its start, an ellipsis and its length (``'xxxx...' (1,000,000 characters)``)."""
    text = " ".join(repr(value).split())
    if len(text) <= limit:
        return text
    length = len(value) if isinstance(value, (str, bytes)) else len(text)
    unit = "bytes" if isinstance(value, bytes) else "characters"
    return f"{text[: max(limit - 3, 1)]}... ({length:,} {unit})"
