"""Step 1a glue: load the variant's source and split it."""

from __future__ import annotations

from pipeline.manifest import Dataset, build_manifest, feature_rows, image_rows, make_report, save_dataset
from pipeline.sources import load
from pipeline.splitting import assign_splits


def run(ctx) -> None:
    spec = ctx.spec
    col = load(spec.source)
    splits = assign_splits(
        col.ids, col.labels, seed=spec.split.seed, val_fraction=spec.split.val_fraction,
        test_fraction=spec.split.test_fraction, given=col.given_split,
    )
    stats = image_rows(col.images) if col.images is not None else feature_rows(col.features)
    manifest = build_manifest(col.ids, col.labels, col.classes, splits, stats)
    ds = Dataset(manifest=manifest, classes=col.classes, images=col.images, features=col.features)
    report = make_report("collect", ctx.variant, len(col.ids) + len(col.skipped), ds,
                         removed=col.skipped, source=col.info)
    save_dataset(ds, ctx.out, report)
    ctx.result = report
    splits_line = ", ".join(f"{n} {s}" for s, n in report["rows_by_split"].items())
    ctx.summary = (f"{len(ds)} rows ({splits_line}), {len(ds.classes)} classes"
                   f"{f', {len(col.skipped)} unreadable skipped' if col.skipped else ''}")
