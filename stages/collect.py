"""Step 1a glue: load the variant's source, mask personal data in its text columns, split it.

A metadata table (``source.metadata``, ``pipeline/sources/metadata.py``) is joined by id as
``meta:<column>`` manifest columns. Text columns (``Collected.text``) go through the ``pii`` rule (``pipeline/quality/pii.py``)
before anything is written: they travel in the manifest as ``text:<column>`` (listed in
dataset.json's ``text_columns``), ``pii_findings.parquet`` says where personal data was found
(ids, columns, entity types, offsets: never a value) and report.json counts it.
"""

from __future__ import annotations

import os

from pipeline.manifest import TEXT_PREFIX, Dataset, build_manifest, feature_rows, image_rows, make_report, save_dataset
from pipeline.sources import check_tracked, load
from pipeline.splitting import assign_splits


def run(ctx) -> None:
    spec = ctx.spec
    if "DVC_STAGE" in os.environ:  # set by DVC for a stage's command
        check_tracked(spec.source, ctx.variant)
    engine = ctx.engine  # params: the variant's engine (pipeline/engine.py)
    col = load(spec.source, out=ctx.out, engine=engine)  # an image folder's pixels go straight to ctx.out
    splits = assign_splits(
        col.ids, col.labels, seed=spec.split.seed, val_fraction=spec.split.val_fraction,
        test_fraction=spec.split.test_fraction, given=col.given_split,
    )
    if col.stats is not None:
        stats = col.stats
    else:
        stats = image_rows(col.images, engine) if col.images is not None else feature_rows(col.features)
    manifest = build_manifest(col.ids, col.labels, col.classes, splits, stats)
    extra, facts, pii_line = {}, {}, ""
    if spec.source.metadata is not None:
        from pipeline.sources import metadata

        joined, facts["metadata"] = metadata.join(list(col.ids), spec.source.metadata,
                                                  f"variants.{ctx.variant}.source.metadata")
        for name in joined.columns:
            manifest[name] = joined[name].to_numpy()
    if col.text is not None:
        from pipeline.quality import pii

        scrubbed = pii.scrub(col.ids, col.text, spec.source.pii)
        for name in scrubbed.text.columns:
            manifest[TEXT_PREFIX + str(name)] = scrubbed.text[name].astype("string").to_numpy()
        extra = {"text_columns": [str(c) for c in scrubbed.text.columns]}
        facts["pii"] = scrubbed.facts
        pii_line = pii.summary(scrubbed.facts)
    ds = Dataset(manifest=manifest, classes=col.classes, images=col.images, features=col.features,
                 extra_meta=extra)
    report = make_report("collect", ctx.variant, len(col.ids) + len(col.skipped), ds,
                         removed=col.skipped, source=col.info, **facts)
    save_dataset(ds, ctx.out, report)
    if col.text is not None:
        scrubbed.findings.to_parquet(ctx.out / pii.FINDINGS, index=False)
    ctx.result = report
    splits_line = ", ".join(f"{n} {s}" for s, n in report["rows_by_split"].items())
    ctx.summary = (f"{len(ds)} rows ({splits_line}), {len(ds.classes)} classes"
                   f"{f', {len(col.skipped)} unreadable skipped' if col.skipped else ''}"
                   f"{f'; {pii_line}' if pii_line else ''}")
