"""Out-of-sample class probabilities for every row, and cleanlab's label-issue finder on them.

Which rows are scored how (the review report repeats this per split):

- ``val`` and ``test``: the trained network's own softmax (with flip TTA when the variant
  predicts that way). The network never trained on these rows, so the probabilities are
  out-of-sample.
- ``train``: the network *did* train on these rows, so its softmax there is in-sample (it has
  partly memorised the very labels we want to check) and is never used. Instead:

  * ``linear_head`` (default, cheap): the network's penultimate embeddings of the train rows,
    and a multinomial logistic regression refitted K times, each fit on K-1 folds and
    predicting the held-out fold (stratified folds, seeded). The *head* is out-of-fold; the
    embedding is not (the network that makes it saw every train row), which is why this is
    called "cross-validated head" and not "out-of-sample" in the report.
  * ``full_model``: the whole network retrained per fold with the variant's training recipe
    (``pipeline.training.fit``) and used on its held-out fold: truly out-of-sample, K times
    the training cost. For a GPU; tiny runs are tested on CPU.

Label issues: ``cleanlab.filter.find_label_issues`` (confident learning; ``filter_by`` chooses
the pruning rule, default ``prune_by_noise_rate``) flags the rows, and
``cleanlab.rank.get_label_quality_scores`` (``rank_by``: ``self_confidence`` = the
probability of the given label, ``normalized_margin`` = p(given) - max p(other), or
``confidence_weighted_entropy``) orders them: lowest quality first. It is run once per scoring
group (model-scored val+test, cross-validated train), because confident learning's per-class
thresholds assume one source of probabilities.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from pipeline.errors import FmpipeError

RANK_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


def cross_validated_head_probs(embeddings: np.ndarray, labels: np.ndarray, n_classes: int, *,
                               folds: int = 5, seed: int = 0, c: float = 1.0,
                               max_iter: int = 500) -> np.ndarray:
    """Out-of-fold class probabilities (N x n_classes) from a logistic-regression head.

    Each fold's head is fitted on the other folds (features standardised on those folds only)
    and predicts the held-out rows. A class absent from a fold's training part gets
    probability 0 there.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    probs = np.zeros((n, n_classes), dtype=np.float64)
    if n == 0:
        return probs
    k = _usable_folds(y, folds)
    if k < 2:
        raise FmpipeError(f"review: {n} train rows are too few for {folds}-fold cross-validation")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class has fewer members than n_splits": handled (prob 0).
        warnings.simplefilter("ignore", UserWarning)
        fold_iter = list(splitter.split(x, y))
    for fit_rows, held_out in fold_iter:
        scaler = StandardScaler().fit(x[fit_rows])
        present = np.unique(y[fit_rows])
        if len(present) == 1:  # a degenerate fold: the head can only say one thing
            probs[np.ix_(held_out, present)] = 1.0
            continue
        head = LogisticRegression(C=c, max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lbfgs ConvergenceWarning on tiny folds
            head.fit(scaler.transform(x[fit_rows]), y[fit_rows])
        probs[np.ix_(held_out, head.classes_)] = head.predict_proba(scaler.transform(x[held_out]))
    return probs


def _usable_folds(y: np.ndarray, folds: int) -> int:
    # StratifiedKFold needs every fold to be non-empty: at most n rows.
    return int(min(folds, len(y)))


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row (stratified, seeded); what ``full_model`` scoring trains on."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels)
    out = np.zeros(len(y), dtype=np.int64)
    k = _usable_folds(y, folds)
    if k < 2:
        raise FmpipeError(f"review: {len(y)} train rows are too few for {folds}-fold cross-validation")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, held_out) in enumerate(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(y, y)):
            out[held_out] = f
    return out


def label_issues(labels: np.ndarray, probs: np.ndarray, *, filter_by: str = "prune_by_noise_rate",
                 rank_by: str = "self_confidence") -> tuple[pd.DataFrame, list[str]]:
    """cleanlab's verdict per row: ``is_issue``, ``quality`` (lower = more suspect),
    ``suggested`` (argmax class), ``given_prob``, ``suggested_prob``; and cleanlab's warnings.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n = len(labels)
    if rank_by not in RANK_METHODS:
        raise FmpipeError(f"review.rank_by: {rank_by!r} is not one of {', '.join(RANK_METHODS)}")
    suggested = probs.argmax(axis=1) if n else np.empty(0, np.int64)
    frame = pd.DataFrame({
        "is_issue": np.zeros(n, dtype=bool),
        "quality": np.ones(n, dtype=np.float64),
        "suggested": suggested.astype(np.int64),
        "given_prob": probs[np.arange(n), labels] if n else np.empty(0),
        "suggested_prob": probs[np.arange(n), suggested] if n else np.empty(0),
    })
    notes: list[str] = []
    if n < 2:
        return frame, notes
    # cleanlab wants rows summing to 1; the CV head's rows do, up to float error.
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mask = find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1)
        except (ValueError, AssertionError) as exc:
            # e.g. too few rows per class for the confident joint: fall back to the plain rule.
            notes.append(f"cleanlab find_label_issues failed ({exc}); fell back to predicted != given")
            mask = suggested != labels
        quality = get_label_quality_scores(labels, probs, method=rank_by)
    notes += sorted({str(w.message) for w in caught})
    frame["is_issue"] = np.asarray(mask, dtype=bool)
    frame["quality"] = np.asarray(quality, dtype=np.float64)
    return frame, notes

