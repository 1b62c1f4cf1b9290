"""Step 1b glue: the collected dataset through clean's rules (``pipeline/quality/rules.py``).

Rules find invalid labels and feature values, exact and near duplicates within and across
splits (leakage), unhealthy images and bad table rows; each has a policy in params (drop /
flag / off). Outputs beside the dataset: ``findings.parquet`` (one row per finding: rule,
ids, splits, labels, distance, action) and ``contact_sheet.html`` (flagged pairs side by
side, offline); report.json counts add up and lists every removal with its rule.
"""

from __future__ import annotations

from pipeline.manifest import make_report, save_dataset


def run(ctx) -> None:
    from pipeline.quality.clean import FINDINGS, clean_dataset, sheet_writer, summary_line
    from pipeline.quality.sheet import SHEET

    ds = ctx.dataset("collect")
    spec = ctx.spec.clean
    cleaned = clean_dataset(ds, spec, variant=ctx.variant, engine=ctx.engine)
    report = make_report("clean", ctx.variant, len(ds), cleaned.dataset, removed=cleaned.removed, **cleaned.facts)
    save_dataset(cleaned.dataset, ctx.out, report)
    cleaned.findings.to_parquet(ctx.out / FINDINGS, index=False)
    sheet_writer(ctx.variant, ds, cleaned, spec.sheet_max_pairs)(ctx.out / SHEET)
    ctx.result = report
    ctx.summary = summary_line(ctx.variant, len(ds), cleaned).split(": ", 1)[1]
