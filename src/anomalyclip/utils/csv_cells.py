"""Cells of every CSV the package writes, safe to open in a spreadsheet.

A file name or a manifest column such as ``=HYPERLINK("http://x","click")`` or
``@SUM(A1)`` would otherwise reach ``predictions.csv`` and the ``test`` tables verbatim,
and a spreadsheet runs it as a formula (CSV injection). As OWASP recommends, a text cell
that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is written with a
single quote in front (``'=HYPERLINK(...)``), which spreadsheets show as text; numbers,
and text that is just a number (``-0.5``), are left as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.I)


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV cell: a text that a spreadsheet would run is quoted with ``'``."""
    text = isinstance(value, str) and value.startswith(FORMULA_STARTS)
    if text and not PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """Every cell of one row through :func:`csv_cell` (None stays None for the caller)."""
    return {key: csv_cell(value) for key, value in record.items()}
