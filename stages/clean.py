"""Step 1b glue: the collected dataset through clean's rules (``pipeline/quality/cleaning.py``)."""

from __future__ import annotations

from pipeline.manifest import make_report, save_dataset
from pipeline.quality.cleaning import clean


def run(ctx) -> None:
    ds = ctx.dataset("collect")
    out, removed = clean(ds, drop_duplicates=ctx.spec.clean.drop_duplicates)
    report = make_report("clean", ctx.variant, len(ds), out, removed=removed)
    save_dataset(out, ctx.out, report)
    ctx.result = report
    by_reason = ", ".join(f"{n} {r}" for r, n in report["removed_by_reason"].items()) or "nothing removed"
    ctx.summary = f"{len(ds)} rows in, {len(out)} out ({by_reason})"
