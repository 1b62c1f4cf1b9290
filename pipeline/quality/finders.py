"""The review's finders and the queue they feed: functions of arrays, no I/O.

They live with the other data checks (clean's rules) rather than in pipeline/review/: the
params schema (pipeline/config.py) composes the review section from their params, and the
review package sits above the schema (it runs the network, pipeline.inference).

Each finder has one interface: ``find(inputs, options) -> DataFrame`` of findings, one row per
suspect dataset row, columns :data:`FINDING_COLUMNS`, most suspect first. ``score`` is the same
quantity for every finder, **the estimated chance that a person changes the row** (relabels or
drops it), so the queue is one ranking; ``suggested`` is a class index or :data:`DROP_INDEX`.

- ``label_issues``: rows cleanlab flags (see :mod:`pipeline.review.scoring`) and the other
  rows of the lowest ``low_quality_fraction`` of their scoring group by label quality (see
  :func:`find_label_issues` for why); score: ``1 - p(given)`` on probabilities review has
  calibrated per scoring group; suggestion: the most probable class other than the given one
  (every finder's).
- ``near_duplicates``: pairs of rows closer than a cosine-distance threshold in the duplicate
  embedding (:func:`pipeline.quality.neighbors.near_pairs`). A pair across splits is a
  ``cross_split_duplicate``: the copy in the less protected split is queued (train before val before test, the
  rule clean uses for exact copies), so the test set stays intact. A pair within one split is
  a ``near_duplicate``: the later id is queued. The suggestion is ``drop``; the partner is
  named (``related_row``). Score: the share of judged CIFAR-10 pairs at that distance (over
  the threshold) that people called a copy (:data:`COPY_RATE`).
- ``outliers``: the cosine distance of a row's penultimate embedding to the nearest class
  mean of the train embeddings; the top ``outlier_fraction`` of rows are flagged. Cheap
  (N x classes) and needs no second index. Score: the label's doubt, as for label issues
  (far from every class is not by itself a wrong label: CIFAR-10's outliers were judged
  correctly labelled), so an outlier ranks high only when its label is also in doubt.

The queue (:func:`build_queue`) merges the lists and takes rows best score first. Each finder
may queue at most its share of the rows (``<finder>_share`` in params), so that one finder's
estimate cannot fill the queue alone; rows the caps held back fill what is left. A row found
twice is one entry with both reasons; rows people already decided are left out.

Each finder is registered once, with ``@finder(name, score=..., params=...)``: its name (what
``review.finders`` lists; the default is every registered finder, in registration order), what
its score means (shown on the queue's pages) and its params model, whose keys join params'
``review`` section (pipeline/config.py composes it), so a finder's keys are declared beside it.
numpy and pandas are imported inside the functions: the params schema imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

from pydantic import Field

from pipeline.schema import Strict

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

DROP_INDEX = -1
# A near pair across splits. Not called a "leak": that word is clean's (pairs closer than its
# own threshold, dropped or counted in ``leaked_rows_remaining``); review casts a wider net.
ACROSS_SPLITS = "cross_split_duplicate"
FINDING_COLUMNS = ("row", "reason", "score", "suggested", "suggested_prob", "given_prob",
                   "related_row", "distance")
_SPLIT_PROTECTION = {"test": 0, "val": 1, "train": 2}


@dataclass(frozen=True)
class Finder:
    name: str
    score: str  # what the finder's score means (the queue is ranked by it within its group)
    Params: type[Strict]  # the finder's keys in params' review section
    find: Callable[["ReviewInputs", dict[str, Any]], "pd.DataFrame"]


# Every registered finder, in registration order (the default order of review.finders).
REGISTRY: dict[str, Finder] = {}


def finder(name: str, *, score: str, params: type[Strict]):
    """Register the decorated ``find(inputs, options)`` as finder ``name``; ``options`` holds
    its params' values. A key another finder declares too is refused at import."""
    def register(find):
        for other in REGISTRY.values():
            taken = set(other.Params.model_fields) & set(params.model_fields)
            if taken:
                raise TypeError(f"review finder {name!r}: params {sorted(taken)} are also finder {other.name!r}'s")
        REGISTRY[name] = Finder(name, " ".join(score.split()), params, find)
        return find
    return register


class LabelIssuesParams(Strict):
    # cleanlab: the confident-learning pruning rule, and the label quality score that ranks.
    filter_by: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                       "predicted_neq_given", "low_normalized_margin", "low_self_confidence"] = "prune_by_noise_rate"
    rank_by: Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"] = "self_confidence"
    # Besides cleanlab's flags, queue the lowest-quality rows up to this share of each scoring
    # group (0: cleanlab's flags only). Needed on train rows, where memorised embeddings make
    # confident learning flag too little (see find_label_issues).
    low_quality_fraction: float = Field(0.1, ge=0, le=1)
    # The most rows of the queue this finder may take (build_queue): no cap, because on real
    # CIFAR-10 (issue #30) the label-issue rows held the confirmed label errors.
    label_issues_share: float = Field(1.0, ge=0, le=1)


class NearDuplicatesParams(Strict):
    # The vectors compared ("thumbs": the hand-designed image features of
    # pipeline/quality/embedders.py; "penultimate"; or a layer name of the network, spatially
    # average-pooled; several are concatenated, each L2-normalised), and the cosine distance
    # under which two rows are a pair.
    # Default from bench/review_duplicates.py on digits: thumbs alone beat every network layer
    # and every thumbs+layer mix (mean recall 0.74 at 1% false pairs, threshold 0.009).
    duplicate_features: list[str] = Field(default_factory=lambda: ["thumbs"], min_length=1)
    # None (the default): clean's ``near_threshold``, the one calibrated notion of a
    # near-duplicate (clean's leakage rule, this finder and validation's "no leakage left"
    # share it; its calibration is in bench/README.md). A number: a wider or narrower net
    # for review only (on the scale of duplicate_features' distances).
    duplicate_threshold: Optional[float] = Field(None, ge=0, le=2)
    neighbors: int = Field(10, ge=1)  # at most this many near copies per row
    # The most rows of the queue this finder may take (build_queue). Small: after clean dropped
    # the leaks' train copies the near-duplicate rows on CIFAR-10 named almost none of the leaks
    # people found (issue #30), and their calibrated score (0.75-1 under the threshold) would
    # otherwise put every pair above all but the surest label errors.
    near_duplicates_share: float = Field(0.15, ge=0, le=1)


class OutliersParams(Strict):
    outlier_fraction: float = Field(0.005, ge=0, lt=1)  # share of rows flagged as outliers
    # The most rows of the queue this finder may take (build_queue); its rows rank by their
    # label's doubt anyway (CIFAR-10's outlier rows were mostly correctly labelled photos).
    outliers_share: float = Field(0.15, ge=0, le=1)


@dataclass
class ReviewInputs:
    """Everything the finders look at, row-aligned with ``manifest``."""

    manifest: pd.DataFrame  # id, split, label, label_source (annotate's)
    probs: np.ndarray  # N x K out-of-sample (or cross-validated) probabilities
    issues: pd.DataFrame  # per row: is_issue, quality, suggested, given_prob, suggested_prob
    penultimate: Optional[np.ndarray] = None  # N x D embeddings (outliers)
    duplicate_vectors: Optional[np.ndarray] = None  # N x D' (near_duplicates)
    groups: Optional[np.ndarray] = None  # scoring group per row (model / cross-validated)
    extra: dict[str, Any] = field(default_factory=dict)


def _empty() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("score", "suggested_prob", "given_prob", "distance")
                                      else ("string" if c == "reason" else "int64")) for c in FINDING_COLUMNS})


@finder("label_issues", params=LabelIssuesParams,
        score="estimated chance the given label is wrong: 1 - the calibrated probability of the given "
              "label (temperature fitted per scoring group)")
def find_label_issues(inputs: ReviewInputs, options: dict[str, Any]) -> pd.DataFrame:
    """Rows cleanlab flags (``label_issue``) and the other rows of the least trustworthy
    ``low_label_quality`` fraction of their scoring group, scored by the chance that the given
    label is wrong, ``1 - p(given)`` on the calibrated probabilities review passes in.

    Why not the flagged rows alone: the train rows' embeddings come from a network that
    trained on those very labels, so a cross-validated head agrees with a memorised wrong
    label often enough that confident learning flags nothing (measured on digits with 4%
    flipped labels: 0 of 50 flagged), while the *ranking* by label quality still puts 96% of
    them in the lowest 80. Membership of the list is decided within each scoring group (the
    network's softmax on val/test and a cross-validated head on train); the score is one
    probability for both, because review calibrates each group's probabilities first.
    """
    import numpy as np
    import pandas as pd

    iss = inputs.issues
    n = len(iss)
    if n == 0:
        return _empty()
    flagged = iss["is_issue"].to_numpy()
    quality = iss["quality"].to_numpy().astype(np.float64)
    groups = inputs.groups if inputs.groups is not None else np.zeros(n, dtype=object)
    within = np.empty(n, dtype=np.float64)  # fraction of the group at least as suspect
    for g in dict.fromkeys(groups.tolist()):
        rows = np.flatnonzero(groups == g)
        ranks = np.empty(len(rows))
        ranks[np.lexsort((rows, quality[rows]))] = np.arange(len(rows))
        within[rows] = (ranks + 1) / len(rows)
    # Unflagged rows only from the least trustworthy ``low_quality_fraction`` of their group:
    # a list longer than the doubt would otherwise fill up with confidently right labels.
    keep = flagged | (within <= float(options.get("low_quality_fraction", 1.0)) + 1e-12)
    score = label_doubt(iss["given_prob"].to_numpy())
    order = np.lexsort((np.arange(n), -score))
    order = order[keep[order]]
    alternative, alt_prob = other_class(inputs.probs, inputs.manifest["label"].to_numpy())
    if len(order) == 0:
        return _empty()
    out = pd.DataFrame({
        "row": order.astype(np.int64),
        "reason": pd.array(np.where(flagged[order], "label_issue", "low_label_quality"), dtype="string"),
        "score": score[order],
        "suggested": alternative[order].astype(np.int64),
        "suggested_prob": alt_prob[order],
        "given_prob": iss["given_prob"].to_numpy()[order],
        "related_row": np.full(len(order), -1, dtype=np.int64),
        "distance": np.full(len(order), np.nan),
    })
    return out.reset_index(drop=True)


def label_doubt(given_prob: np.ndarray) -> np.ndarray:
    """The chance a given label is wrong, ``1 - p(given)``, clipped to [0, 1] (rounded to 1e-12 so
    that float noise in the probabilities cannot reorder equal rows)."""
    import numpy as np

    return np.round(1.0 - np.asarray(given_prob, dtype=np.float64), 12).clip(0.0, 1.0)


def other_class(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The most probable class *other than* the given one, and its probability, per row.

    This is every finder's suggestion: for a suspect label it is the question to put to a
    person (for a memorised train row the argmax would often be the given label itself, and
    "suggesting" the label a row already has asks nothing)."""
    import numpy as np

    p = np.array(probs, dtype=np.float64, copy=True)
    n = len(p)
    labels = np.asarray(labels).astype(np.int64)
    if n and p.shape[1] > 1:
        p[np.arange(n), labels] = -1.0
    alternative = p.argmax(axis=1) if n else np.empty(0, np.int64)
    return alternative, np.asarray(probs, dtype=np.float64)[np.arange(n), alternative] if n else np.empty(0)


# The share of pairs people judged a copy (same photo or same object), by cosine distance over
# the near-duplicate threshold: 950 judged CIFAR-10 pairs (tests/fixtures/cifar_near_duplicates.csv)
# under thumbs and crops at 0.02, pooled; bin centres (bench/near_duplicates_truth.py prints the
# bins). The pairs were drawn as candidates from those embedders, so the rates are for pairs an
# embedder already calls close; a variant whose threshold is calibrated the same way (where the
# ranking reaches the judged leaks) reads the same scale.
COPY_RATE = ((0.125, 1.00), (0.375, 0.98), (0.625, 0.95), (0.875, 0.75), (1.125, 0.54), (1.375, 0.40),
             (1.75, 0.36), (2.5, 0.17))


def copy_probability(distance: np.ndarray, threshold: float) -> np.ndarray:
    """The chance a person judges a pair at ``distance`` a copy (:data:`COPY_RATE`, interpolated)."""
    import numpy as np

    ratio = np.asarray(distance, dtype=np.float64) / max(float(threshold), 1e-12)
    return np.interp(ratio, [r for r, _ in COPY_RATE], [p for _, p in COPY_RATE])


@finder("near_duplicates", params=NearDuplicatesParams,
        score="estimated chance a person judges the pair a copy: the rate of judged copies among "
              "CIFAR-10 pairs at that distance over the threshold")
def find_near_duplicates(inputs: ReviewInputs, options: dict[str, Any]) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    from pipeline.quality.neighbors import describe, near_pairs

    vecs = inputs.duplicate_vectors
    if vecs is None or len(vecs) < 2:
        return _empty()
    threshold = options.get("duplicate_threshold")
    if threshold is None:  # review resolves None to the variant's clean.near_threshold
        from pipeline.quality.rules import NearSearch

        threshold = NearSearch().near_threshold
    pairs = near_pairs(vecs, threshold=float(threshold), k=int(options.get("neighbors", 10)),
                       method=options.get("method", "auto"))
    inputs.extra["near_pairs"] = {k: v for k, v in describe(pairs).items() if k != "seconds"}
    if pairs.empty:
        return _empty()
    m = inputs.manifest
    split = m["split"].astype(str).to_numpy()
    ids = m["id"].astype(str).to_numpy()
    i, j = pairs["i"].to_numpy(), pairs["j"].to_numpy()
    prot_i = np.array([_SPLIT_PROTECTION.get(s, 3) for s in split[i]])
    prot_j = np.array([_SPLIT_PROTECTION.get(s, 3) for s in split[j]])
    # Queue the less protected copy; within a split, the later id (the earlier one is kept).
    queue_j = (prot_j > prot_i) | ((prot_j == prot_i) & (ids[j] > ids[i]))
    row = np.where(queue_j, j, i)
    partner = np.where(queue_j, i, j)
    leak = split[row] != split[partner]
    labels = m["label"].to_numpy()
    reason = np.where(leak, ACROSS_SPLITS, "near_duplicate")
    reason = np.where(labels[row] != labels[partner], np.char.add(reason.astype(str), "_conflicting_labels"), reason)
    n = len(inputs.issues)
    given_prob = inputs.issues["given_prob"].to_numpy() if n else np.zeros(0)
    out = pd.DataFrame({
        "row": row.astype(np.int64),
        "reason": pd.array(reason.astype(str), dtype="string"),
        "score": copy_probability(pairs["distance"].to_numpy(), float(threshold)),
        "suggested": np.full(len(row), DROP_INDEX, dtype=np.int64),
        "suggested_prob": np.full(len(row), np.nan),
        "given_prob": given_prob[row] if n else np.full(len(row), np.nan),
        "related_row": partner.astype(np.int64),
        "distance": pairs["distance"].to_numpy().astype(np.float64),
    })
    # One entry per queued row: its closest partner. Equal scores (the copy rate is flat near
    # distance 0): the closer pair first.
    out = out.sort_values(["row", "distance", "related_row"], kind="stable").drop_duplicates("row")
    return out.sort_values(["score", "distance", "row"], ascending=[False, True, True],
                           kind="stable").reset_index(drop=True)


@finder("outliers", params=OutliersParams,
        score="estimated chance the given label is wrong, as for label issues (being far from every class "
              "centre is not by itself a wrong label: CIFAR-10's outliers were judged correctly labelled)")
def find_outliers(inputs: ReviewInputs, options: dict[str, Any]) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    emb = inputs.penultimate
    fraction = float(options.get("outlier_fraction", 0.0))
    if emb is None or len(emb) == 0 or fraction <= 0:
        return _empty()
    dist = centroid_distance(emb, inputs.manifest["label"].to_numpy(), inputs.manifest["split"].astype(str).to_numpy())
    n = len(dist)
    order = np.argsort(dist, kind="stable")
    percentile = np.empty(n)
    percentile[order] = (np.arange(n) + 1) / n
    flagged = np.flatnonzero(percentile > 1.0 - fraction)
    iss = inputs.issues
    alternative, alt_prob = other_class(inputs.probs, inputs.manifest["label"].to_numpy())
    out = pd.DataFrame({
        "row": flagged.astype(np.int64),
        "reason": pd.array(["outlier"] * len(flagged), dtype="string"),
        "score": label_doubt(iss["given_prob"].to_numpy()[flagged]),
        "suggested": alternative[flagged].astype(np.int64),
        "suggested_prob": alt_prob[flagged],
        "given_prob": iss["given_prob"].to_numpy()[flagged],
        "related_row": np.full(len(flagged), -1, dtype=np.int64),
        "distance": dist[flagged].astype(np.float64),
    })
    # Equal doubt (e.g. none at all): the farther row first.
    return out.sort_values(["score", "distance", "row"], ascending=[False, False, True],
                           kind="stable").reset_index(drop=True)


def centroid_distance(emb: np.ndarray, labels: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Cosine distance of each row to the nearest class mean of the (normalised) train rows."""
    import numpy as np

    x = np.asarray(emb, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    train = split == "train"
    if not train.any():
        train = np.ones(len(x), dtype=bool)
    classes = np.unique(labels[train])
    means = np.stack([x[train & (labels == c)].mean(axis=0) for c in classes])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return (1.0 - (x @ means.T).max(axis=1)).clip(0, 2)


# Views of the registry for the code that needs one part.
FINDERS: dict[str, Callable[[ReviewInputs, dict[str, Any]], pd.DataFrame]] = {n: f.find for n, f in REGISTRY.items()}
SCORE_MEANING = {n: f.score for n, f in REGISTRY.items()}


def finder_options(review_spec, name: str) -> dict[str, Any]:
    """Finder ``name``'s params, read from params' review section."""
    return {key: getattr(review_spec, key) for key in REGISTRY[name].Params.model_fields}


def caps(shares: dict[str, float], size: int) -> dict[str, int]:
    """Most rows each finder may queue: ``ceil(share * size)`` (a share of 1 never limits)."""
    import math

    return {name: min(size, math.ceil(max(0.0, float(share)) * size - 1e-9)) for name, share in shares.items()}


def build_queue(findings: dict[str, pd.DataFrame], size: int, skip_rows: Optional[np.ndarray] = None,
                shares: Optional[dict[str, float]] = None) -> pd.DataFrame:
    """The finders' lists as one queue of at most ``size`` rows, in one ranking.

    Every finder's ``score`` is the same quantity (the estimated chance that a person changes
    the row), so the lists are merged and taken best score first. ``shares`` (params'
    ``<finder>_share``) cap how many rows each finder may queue (:func:`caps`), so that a finder
    whose estimate runs high cannot fill the queue alone; when every list is spent under its
    cap, the queue is topped up from what the caps held back, again best first. ``findings``
    is ordered (the params' finder order: equal scores go to the earlier finder, then in that
    finder's own order). A row found by
    several finders is queued once, by its best finding that a cap lets in, and lists every
    reason (``label_issue+outlier``).
    ``skip_rows``: rows left out (people already decided them).
    """
    import numpy as np
    import pandas as pd

    skip = set() if skip_rows is None else {int(r) for r in np.asarray(skip_rows)}
    names = list(findings)
    parts = []
    for k, (name, frame) in enumerate(findings.items()):
        frame = frame[~frame["row"].isin(skip)]
        if len(frame):  # _pos: the finder's own order, which decides between equal scores
            parts.append(frame.assign(group=name, _k=k, _pos=np.arange(len(frame))))
    if not parts:
        out = _empty()
        out["reasons"] = pd.Series(dtype="string")
        out["group"] = pd.Series(dtype="string")
        return out
    merged = pd.concat(parts, ignore_index=True)
    # Every reason a row was found for (in finder order), whatever finder queues it.
    reasons = merged.groupby("row", sort=False)["reason"].agg(lambda r: "+".join(dict.fromkeys(map(str, r))))
    ranked = merged.sort_values(["score", "_k", "_pos"], ascending=[False, True, True], kind="stable")
    ranked = ranked.reset_index(drop=True)
    limit = caps({name: float((shares or {}).get(name, 1.0)) for name in names}, size)
    rows, groups = ranked["row"].to_numpy(), ranked["group"].tolist()
    picked: list[int] = []  # positions in ``ranked``
    queued: set[int] = set()
    used = dict.fromkeys(names, 0)
    for capped in (True, False):  # then what the caps held back, again best first
        for i in range(len(ranked)):
            if len(picked) >= size:
                break
            if int(rows[i]) in queued or (capped and used[groups[i]] >= limit[groups[i]]):
                continue  # a row a cap held back may still come in through another finder
            picked.append(i)
            queued.add(int(rows[i]))
            used[groups[i]] += 1
    picked.sort()
    queue = ranked.iloc[picked].drop(columns=["_k", "_pos"]).reset_index(drop=True)
    queue["reasons"] = pd.array([reasons[r] for r in queue["row"]], dtype="string")
    queue["group"] = pd.array(queue["group"].astype(str), dtype="string")
    for col in ("row", "suggested", "related_row"):
        queue[col] = queue[col].astype(np.int64)
    return queue
