"""Clean's rules as a function of a dataset: invalid rows and exact duplicates.

Duplicates are found by content hash. Copies that agree on the label keep one row: the one
in the most protected split (test, then val, then train), so a train/test leak is resolved
by removing the training copy and the test set stays intact. Copies that disagree on the
label are all dropped: no one knows which label is right.
"""

from __future__ import annotations

import numpy as np

from pipeline.manifest import Dataset

SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}


def clean(ds: Dataset, drop_duplicates: bool = True) -> tuple[Dataset, list[dict]]:
    """The kept rows and one record per removed row (id, reason, and what it duplicated)."""
    m = ds.manifest
    removed: list[dict] = []
    keep = np.ones(len(m), dtype=bool)

    for row, reason in invalid_reasons(ds).items():
        keep[row] = False
        removed.append({"id": m.at[row, "id"], "reason": reason})

    if drop_duplicates:
        candidates = m[keep].assign(_prio=m["split"].map(SPLIT_PRIORITY))
        for sha, group in candidates.groupby("sha256", sort=False):
            if len(group) < 2:
                continue
            if group["label"].nunique() > 1:
                for row in group.index:
                    keep[row] = False
                    removed.append({"id": m.at[row, "id"], "reason": "duplicate_conflicting_labels",
                                    "sha256": sha})
                continue
            kept = group.sort_values(["_prio", "id"]).index[0]
            for row in group.index.drop(kept):
                keep[row] = False
                removed.append({"id": m.at[row, "id"], "reason": "duplicate", "dup_of": m.at[kept, "id"],
                                "split": m.at[row, "split"], "dup_of_split": m.at[kept, "split"]})
    return ds.take(keep), removed


def invalid_reasons(ds: Dataset) -> dict[int, str]:
    """Rows no model can use: missing feature values, labels outside the class list."""
    m = ds.manifest
    reasons: dict[int, str] = {}
    bad_label = (m["label"] < 0) | (m["label"] >= len(ds.classes))
    for row in np.flatnonzero(bad_label.to_numpy()):
        reasons[int(row)] = "label_out_of_range"
    if ds.features is not None:
        values = ds.features.to_numpy(dtype=np.float64)
        for row in np.flatnonzero(~np.isfinite(values).all(axis=1)):
            reasons.setdefault(int(row), "missing_or_infinite_feature")
    return reasons
