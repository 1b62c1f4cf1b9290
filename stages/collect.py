"""Step 1a: load the variant's source and split it (data/<variant>/collect/)."""

from __future__ import annotations

from pipeline.config import DEFAULT_PARAMS, load_variant
from pipeline.manifest import Dataset, build_manifest, feature_rows, image_rows, make_report, write_dataset
from pipeline.paths import step_dir
from pipeline.sources import load
from pipeline.splitting import assign_splits


def run(variant: str, params_path: str = DEFAULT_PARAMS) -> dict:
    spec = load_variant(variant, params_path)
    col = load(spec.source)
    splits = assign_splits(
        col.ids, col.labels, seed=spec.split.seed, val_fraction=spec.split.val_fraction,
        test_fraction=spec.split.test_fraction, given=col.given_split,
    )
    stats = image_rows(col.images) if col.images is not None else feature_rows(col.features)
    manifest = build_manifest(col.ids, col.labels, col.classes, splits, stats)
    ds = Dataset(manifest=manifest, classes=col.classes, images=col.images, features=col.features)
    report = make_report("collect", variant, len(col.ids) + len(col.skipped), ds,
                         removed=col.skipped, source=col.info)
    write_dataset(ds, step_dir(variant, "collect"), report)
    return report
