"""Step 1d glue: apply people's label overrides (``pipeline/annotations.py``) to the cleaned data."""

from __future__ import annotations

from pipeline.annotations import apply_overrides, read_overrides
from pipeline.manifest import make_report, save_dataset
from pipeline.quality.gate import require_passed

ANNOTATIONS = "annotations/{v}.csv"


def run(ctx) -> None:
    require_passed(ctx.input("validate/summary.json"), ctx.variant)
    ds = ctx.dataset("clean")
    path = ctx.source(ANNOTATIONS)
    out, changes = apply_overrides(ds, read_overrides(path, ds.classes), origin=str(path))
    relabelled = sum(c["from"] != c["to"] for c in changes)
    report = make_report("annotate", ctx.variant, len(out), out, annotations_file=str(path),
                         overrides_applied=len(changes), labels_changed=relabelled, changes=changes)
    save_dataset(out, ctx.out, report)
    ctx.result = report
    ctx.summary = f"{len(out)} rows, {len(changes)} override(s) from {path}, {relabelled} label(s) changed"
