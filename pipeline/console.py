"""One console style for every step: warnings through logging, progress bars, quiet neighbours.

- Warnings (ours and third-party ones a user can act on) go through :mod:`logging` to stderr
  as ``WARNING fmpipe: ...`` lines.
- :func:`progress` wraps long loops (collecting a large archive, cleaning, scoring a large
  test set) in a rich progress bar on a terminal, and in nothing when stderr is a file or
  DVC's pipe, so logs stay readable.
- What a user cannot act on is silenced: third-party deprecation warnings, Lightning's "tip"
  advertisements, and GX's and DVCLive's INFO chatter.
"""

from __future__ import annotations

import logging
import io
import os
import sys
import warnings
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
_SET_UP = False

# Loggers whose INFO lines advertise products or repeat what our summary line says.
_QUIET_LOGGERS = ("great_expectations", "dvclive", "lightning.pytorch.utilities.rank_zero",
                  "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")


class _DropAdverts(logging.Filter):
    """Lightning's 'Tip: ... try installing litmodels/litlogger' and similar one-liners."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("Tip:" in msg or "💡" in msg or "litlogger" in msg or "litmodels" in msg)


def setup_console(level: int = logging.INFO) -> None:
    global _SET_UP
    if _SET_UP:
        return
    _SET_UP = True
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_DropAdverts())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("fmpipe").setLevel(level)
    logging.captureWarnings(True)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(name).addFilter(_DropAdverts())
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


class Bar:
    """A progress bar on stderr (rich) for work longer than a few seconds.

    Drawn only when stderr is a terminal and ``FMPIPE_PROGRESS`` is not ``0``; otherwise it
    just counts, so DVC's logs and CI output stay one line per step. ``n`` is the count so
    far either way (downloads check it against the expected size).
    """

    def __init__(self, total: Optional[int], description: str, unit: str = "it", in_bytes: bool = False):
        self.total, self.description, self.unit, self.in_bytes = total, description, unit, in_bytes
        self.n = 0
        self._progress = None

    def __enter__(self) -> "Bar":
        if sys.stderr.isatty() and os.environ.get("FMPIPE_PROGRESS") != "0":
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            count = (DownloadColumn(), TransferSpeedColumn()) if self.in_bytes else (MofNCompleteColumn(),)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), *count,
                                      TimeRemainingColumn(), transient=True, console=Console(stderr=True))
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def progress(items: Iterable[T], total: Optional[int] = None, description: str = "") -> Iterator[T]:
    """Yield ``items`` while a :class:`Bar` counts them."""
    with Bar(total, description) as bar:
        for item in items:
            yield item
            bar.update()


# ---------------------------------------------------------------- tables that fit the terminal

def terminal_width(piped: int = 200) -> int:
    """Columns to fit: ``COLUMNS`` when set (tests, scripts), else the terminal's width; output
    piped to a file or another program gets ``piped`` (a wide table, rather than rich's 80)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        import shutil

        return shutil.get_terminal_size().columns
    return piped


def fit_table(title: str, columns: list[dict], rows: list[list[str]], width: int, wide: bool = False):
    """A rich Table of ``rows`` no wider than ``width``: ``(table, hidden headers)``.

    ``columns``: dicts with ``header``, ``priority`` (1 = kept longest), optional ``no_wrap``
    (hashes, numbers, dates: never broken over lines) and ``justify``. Wrappable columns are
    wrapped first (rich does that); when even the narrowest layout is too wide, the
    lowest-priority column goes, then the next. ``wide`` keeps every column.
    """
    from rich.table import Table

    def build(cols: list[dict]) -> Table:
        table = Table(title=title, title_justify="left")
        for c in cols:
            table.add_column(c["header"], no_wrap=c.get("no_wrap", False), justify=c.get("justify", "left"),
                             overflow="fold")
        index = [columns.index(c) for c in cols]
        for r in rows:
            table.add_row(*(r[i] for i in index))
        return table

    def narrowest(c: dict) -> int:
        # A no_wrap cell needs its whole text; a wrapped one its longest word (rich wraps it).
        i = columns.index(c)
        texts = [c["header"], *(r[i] for r in rows)]
        if c.get("no_wrap"):
            return max(len(line) for t in texts for line in str(t).splitlines() or [""])
        return max((len(w) for t in texts for w in str(t).split()), default=1)

    keep = list(columns)
    # Each column takes its width plus 3 (padding and a rule); the table one more rule.
    while not wide and len(keep) > 1 and sum(narrowest(c) + 3 for c in keep) + 1 > width:
        keep.remove(max(keep, key=lambda c: c["priority"]))
    hidden = [c["header"] for c in columns if c not in keep]
    return build(keep), hidden


def print_table(title: str, columns: list[dict], rows: list[list[str]], wide: bool = False) -> str:
    """:func:`fit_table` rendered as text at the terminal's width (or unbounded with ``wide``)."""
    from rich.console import Console

    width = terminal_width()
    table, hidden = fit_table(title, columns, rows, width, wide)
    console = Console(width=100_000 if wide else width, record=True, file=io.StringIO())
    console.print(table)
    text = "\n".join(line.rstrip() for line in console.export_text().rstrip().splitlines())
    if hidden:
        import textwrap

        note = f"({len(hidden)} column(s) hidden to fit {width} columns: {', '.join(hidden)}; --wide shows all)"
        text += "\n" + "\n".join(textwrap.wrap(note, max(width, 20)))
    return text
