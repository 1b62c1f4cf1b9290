"""The report's small HTML helpers: escaped text, tables, the "not available" line.

Their own module, below the page and its sections (``page``, ``changes``, monitoring's page),
so a section needs no import of the page that includes it.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

esc = html.escape


def table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """Cells are escaped text, except values wrapped in ``Raw`` (pictures, links)."""
    head = "".join(f"<th>{esc(str(h))}</th>" for h in headers)
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""  # key/value tables need none
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


class Raw(str):
    """HTML that a table cell shows as it is."""


def _cell(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{float(v):.4g}"  # no value: an empty cell, not "nan"
    if v is None or v is getattr(__import__("pandas"), "NA", None):
        return ""
    return esc(str(v))


def missing(what: str, hint: str) -> str:
    return f'<p class="missing">Not available: {esc(what)} ({esc(hint)}).</p>'


def kv(d: dict[str, Any]) -> str:
    return table(["", ""], [[k, v] for k, v in d.items()], cls="kv")
