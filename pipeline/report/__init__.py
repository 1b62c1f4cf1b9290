"""``fmpipe report --stage NAME``: one self-contained HTML page telling a variant's story.

Writes ``data/<variant>/report/``:

- ``index.html``: data, labels, training, evaluation, package, in the lifecycle's order;
  every picture is inlined as a PNG ``data:`` URI, so the single file opens anywhere, with
  no network (links to the Data Docs, the model card and other steps' pages are relative);
- ``plots/*.png``: the same pictures as files, declared in dvc.yaml as image plots so
  ``dvc plots show`` embeds them without any JavaScript.

Every section is optional: the page shows what the variant's folder holds and says what is
missing, so it can be built after any step (also for a model package refused).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.errors import FmpipeError
from pipeline.steps import rerun_hint

INDEX = "index.html"
PLOTS = "plots"


def write_report(variant: str, root: Path, write_to: Path) -> tuple[int, int]:
    """Render ``root`` (``data/<variant>``) into ``write_to``; links are made relative to
    ``root/report``, where the page ends up. Returns (page bytes, pictures)."""
    from pipeline.report.page import Context, render

    ctx = Context(variant=variant, root=Path(root), out=Path(root) / "report")
    page = render(ctx)
    (write_to / INDEX).write_text(page, encoding="utf-8")
    (write_to / PLOTS).mkdir(exist_ok=True)
    for name, png in sorted(ctx.plots.items()):
        (write_to / PLOTS / name).write_bytes(png)
    return len(page.encode("utf-8")), len(ctx.plots)


def build_report(variant: str, data_root: str | Path = "data") -> Path:
    """Build the page for ``variant`` from ``<data_root>/<variant>/`` outside the runner
    (tests, notebooks); ``fmpipe report`` goes through the runner and ``stages/report.py``."""
    from pipeline.io import atomic_dir

    started = time.perf_counter()
    root = Path(data_root) / variant
    if not root.is_dir():
        raise FmpipeError(f"{root}: no such folder; {rerun_hint('collect', variant)} (or `dvc repro`)")
    out = root / "report"
    # One rename at the end: a failed build leaves the previous report as it was.
    with atomic_dir(out) as tmp:
        size, pictures = write_report(variant, root, tmp)
    print(f"report {variant}: {out / INDEX} ({size / 1e6:.1f} MB, {pictures} pictures, "
          f"{time.perf_counter() - started:.1f}s)", file=sys.stderr)
    return out / INDEX
