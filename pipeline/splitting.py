"""Deterministic, stratified, version-stable train/val/test assignment.

Within each class, examples are ordered by ``sha256(seed:id)`` and the first ones go to test,
then val, the rest to train. The order depends only on the seed and each example's own id, so
adding or removing examples in a new dataset version moves few existing ones between splits
(unlike a shuffled split, where one new row reshuffles everything), and the same params give
the same split on every machine.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np


def _rank_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    return np.array([hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ids])


def assign_splits(ids: Sequence[str], labels: np.ndarray, *, seed: int, val_fraction: float,
                  test_fraction: float, given: Optional[Sequence[Optional[str]]] = None) -> np.ndarray:
    """Split names per row.

    ``given`` carries a source's own split per row ("train"/"val"/"test"/None). Rows with a
    given test (val) split stay test (val) and no further test (val) rows are drawn from the
    rest; otherwise val is carved from the (non-test) training rows.
    """
    n = len(ids)
    labels = np.asarray(labels)
    out = np.full(n, "train", dtype=object)
    keys = _rank_keys(ids, seed)
    has_given_test = has_given_val = False
    pool = np.ones(n, dtype=bool)
    if given is not None:
        given_arr = np.array([g if g is not None else "" for g in given], dtype=object)
        is_test = given_arr == "test"
        # An image folder's own val/ folder is kept as val, like a given test split.
        is_val = given_arr == "val"
        has_given_test = bool(is_test.any())
        has_given_val = bool(is_val.any())
        out[is_test] = "test"
        out[is_val] = "val"
        pool &= ~(is_test | is_val)
    for label in np.unique(labels[pool]):
        members = np.flatnonzero(pool & (labels == label))
        members = members[np.argsort(keys[members], kind="stable")]
        k = len(members)
        n_test = 0 if has_given_test else int(round(k * test_fraction))
        # With a given test split, val is a share of the whole training pool.
        n_val = 0 if has_given_val else int(round(k * val_fraction))
        out[members[:n_test]] = "test"
        out[members[n_test:n_test + n_val]] = "val"
    return out.astype(str)
