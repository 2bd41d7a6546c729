"""HTML table cells shared by the report's tables (statistics, ROI, artifacts)."""

from __future__ import annotations

from typing import Any


def number_cell(value: Any, digits: int) -> str:
    """A right-aligned ``<td>`` with ``value`` to ``digits`` decimals, or an en dash when not a number."""
    try:
        text = f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        text = "–"
    return f'<td class="num">{text}</td>'
