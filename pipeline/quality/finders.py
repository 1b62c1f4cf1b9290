"""The review's finders and the queue they feed: functions of arrays, no I/O.

They live with the other data checks (clean's rules) rather than in pipeline/review/: the
params schema (pipeline/config.py) composes the review section from their params, and the
review package sits above the schema (it runs the network, pipeline.inference).

Each finder has one interface: ``find(inputs, options) -> DataFrame`` of findings, one row per
suspect dataset row, columns :data:`FINDING_COLUMNS`, most suspect first. ``score`` is in
[0, 1], higher = more suspect; ``suggested`` is a class index or :data:`DROP_INDEX`.

- ``label_issues``: rows cleanlab flags (see :mod:`pipeline.review.scoring`) and the other
  rows of the lowest ``low_quality_fraction`` of their scoring group by label quality (see
  :func:`find_label_issues` for why); score: the row's suspicion percentile within its scoring
  group; suggestion: the most probable class other than the given one (every finder's).
- ``near_duplicates``: pairs of rows closer than a cosine-distance threshold in the duplicate
  embedding (:func:`pipeline.quality.neighbors.near_pairs`). A pair across splits is a
  ``cross_split_duplicate``: the copy in the less protected split is queued (train before val before test, the
  rule clean uses for exact copies), so the test set stays intact. A pair within one split is
  a ``near_duplicate``: the later id is queued. The suggestion is ``drop``; the partner is
  named (``related_row``). Score ``1 - distance``.
- ``outliers``: the cosine distance of a row's penultimate embedding to the nearest class
  mean of the train embeddings; the top ``outlier_fraction`` of rows are flagged. Cheap
  (N x classes) and needs no second index. Score: the row's percentile of that distance.

The queue gives each finder a share of its rows (``<finder>_share`` in params; defaults from
real CIFAR-10, where label issues held the real errors), each filled from the top of the
finder's list; rows a finder cannot fill go to the others in turn (one from each, in the order
the params list them), so that no finder hides another. It merges a row found twice into one entry with both
reasons, leaves out rows people already decided, and stops at the queue size. It is then shown
grouped by the finder that queued each row (``group``), each group ranked by its own score:
the three scores measure different things and are not compared with each other.

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
    # Share of the queue's rows this finder fills first (see build_queue). 0.7: on real
    # CIFAR-10 (issue #30, the cifar default's 300-row queue) the label-issue rows held the
    # confirmed label errors while the near-duplicate and outlier thirds held almost none.
    label_issues_share: float = Field(0.7, ge=0, le=1)


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
    # Share of the queue (build_queue). Small: after clean dropped the leaks' train copies the
    # near-duplicate rows on CIFAR-10 named almost none of the leaks people found (issue #30).
    near_duplicates_share: float = Field(0.15, ge=0, le=1)


class OutliersParams(Strict):
    outlier_fraction: float = Field(0.005, ge=0, lt=1)  # share of rows flagged as outliers
    # Share of the queue (build_queue): CIFAR-10's outlier rows were mostly correctly labelled photos.
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
        score="suspicion percentile of the given label within its scoring group "
              "(1 = the lowest label quality among rows scored the same way)")
def find_label_issues(inputs: ReviewInputs, options: dict[str, Any]) -> pd.DataFrame:
    """Rows cleanlab flags (``label_issue``) and the other rows of the least trustworthy
    ``low_label_quality`` fraction of their scoring group, ordered by one score: the row's
    suspicion percentile within its scoring group (:data:`SCORE_MEANING`).

    Why not the flagged rows alone: the train rows' embeddings come from a network that
    trained on those very labels, so a cross-validated head agrees with a memorised wrong
    label often enough that confident learning flags nothing (measured on digits with 4%
    flipped labels: 0 of 50 flagged), while the *ranking* by label quality still puts 96% of
    them in the lowest 80. The queue size is the reviewers' budget; it is filled in that order.
    """
    import numpy as np
    import pandas as pd

    iss = inputs.issues
    n = len(iss)
    if n == 0:
        return _empty()
    flagged = iss["is_issue"].to_numpy()
    quality = iss["quality"].to_numpy().astype(np.float64)
    # Rows are compared with the rows scored the same way: the network's softmax on val/test
    # and a cross-validated head on train are calibrated differently, so raw qualities do not
    # mix. The score is a row's suspicion percentile within its group: 1.0 for the lowest
    # label quality of the group, 1/n for the highest. The list is ordered by that score alone,
    # so the rank a reviewer sees always follows the score printed next to it.
    groups = inputs.groups if inputs.groups is not None else np.zeros(n, dtype=object)
    score = np.empty(n, dtype=np.float64)
    within = np.empty(n, dtype=np.float64)  # fraction of the group at least as suspect
    for g in dict.fromkeys(groups.tolist()):
        rows = np.flatnonzero(groups == g)
        ranks = np.empty(len(rows))
        ranks[np.lexsort((rows, quality[rows]))] = np.arange(len(rows))
        score[rows] = 1.0 - ranks / len(rows)
        within[rows] = (ranks + 1) / len(rows)
    # Unflagged rows only from the least trustworthy ``low_quality_fraction`` of their group:
    # a queue longer than the doubt would otherwise fill up with confidently right labels.
    keep = flagged | (within <= float(options.get("low_quality_fraction", 1.0)) + 1e-12)
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


@finder("near_duplicates", params=NearDuplicatesParams,
        score="1 - cosine distance to the nearest copy (1 = identical)")
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
        "score": (1.0 - pairs["distance"].to_numpy().astype(np.float64)).clip(0, 1),
        "suggested": np.full(len(row), DROP_INDEX, dtype=np.int64),
        "suggested_prob": np.full(len(row), np.nan),
        "given_prob": given_prob[row] if n else np.full(len(row), np.nan),
        "related_row": partner.astype(np.int64),
        "distance": pairs["distance"].to_numpy().astype(np.float64),
    })
    # One entry per queued row: its closest partner.
    out = out.sort_values(["row", "distance", "related_row"], kind="stable").drop_duplicates("row")
    return _rank(out)


@finder("outliers", params=OutliersParams,
        score="percentile of the distance to the nearest class centre (1 = the farthest row)")
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
        "score": percentile[flagged],
        "suggested": alternative[flagged].astype(np.int64),
        "suggested_prob": alt_prob[flagged],
        "given_prob": iss["given_prob"].to_numpy()[flagged],
        "related_row": np.full(len(flagged), -1, dtype=np.int64),
        "distance": dist[flagged].astype(np.float64),
    })
    return _rank(out)


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


def _rank(frame: pd.DataFrame) -> pd.DataFrame:

    return frame.sort_values(["score", "row"], ascending=[False, True], kind="stable").reset_index(drop=True)


# Views of the registry for the code that needs one part.
FINDERS: dict[str, Callable[[ReviewInputs, dict[str, Any]], pd.DataFrame]] = {n: f.find for n, f in REGISTRY.items()}
SCORE_MEANING = {n: f.score for n, f in REGISTRY.items()}


def finder_options(review_spec, name: str) -> dict[str, Any]:
    """Finder ``name``'s params, read from params' review section."""
    return {key: getattr(review_spec, key) for key in REGISTRY[name].Params.model_fields}


def quotas(shares: dict[str, float], size: int) -> dict[str, int]:
    """Rows per finder: ``size`` split by ``shares`` (normalised to sum 1), whole rows by the
    largest remainder so the quotas add up to ``size`` exactly (all 0 when every share is)."""
    total = sum(shares.values())
    if total <= 0:
        return {name: 0 for name in shares}
    exact = {name: size * share / total for name, share in shares.items()}
    out = {name: int(v) for name, v in exact.items()}
    for name in sorted(exact, key=lambda n: (-(exact[n] - out[n]), list(shares).index(n)))[:size - sum(out.values())]:
        out[name] += 1
    return out


def build_queue(findings: dict[str, pd.DataFrame], size: int, skip_rows: Optional[np.ndarray] = None,
                shares: Optional[dict[str, float]] = None) -> pd.DataFrame:
    """The finders' ranked lists as one queue of at most ``size`` rows.

    ``shares`` (params' ``<finder>_share``): each finder first fills its quota of the queue
    (:func:`quotas`) from the top of its list; rows a finder cannot fill (its list is
    shorter) go to the others, taken in turn. Without ``shares``, every row is taken in turn.
    ``findings`` is ordered (the params' finder order). A row found by several finders takes
    the place of its first finding and lists every reason (``label_issue+outlier``).
    ``skip_rows``: rows left out (people already decided them). The result is grouped by the
    finder that queued each row (``group``), most suspect first within each group.
    """
    import numpy as np
    import pandas as pd

    skip = set() if skip_rows is None else {int(r) for r in np.asarray(skip_rows)}
    lists = [f[~f["row"].isin(skip)].reset_index(drop=True) for f in findings.values()]
    names = list(findings)
    picked: list[dict[str, Any]] = []
    group_of: list[str] = []
    where: dict[int, int] = {}
    cursors = [0] * len(lists)

    def take(k: int) -> bool:
        """Queue the next row of list k that is not queued yet; False when the list is spent."""
        frame = lists[k]
        while cursors[k] < len(frame):
            rec = frame.iloc[cursors[k]].to_dict()
            cursors[k] += 1
            r = int(rec["row"])
            if r in where:
                continue
            where[r] = len(picked)
            picked.append(rec)
            group_of.append(names[k])
            return True
        return False

    if shares is not None:
        quota = quotas({name: float(shares.get(name, 0.0)) for name in names}, size)
        for k, name in enumerate(names):
            taken = 0
            while taken < quota[name] and len(picked) < size and take(k):
                taken += 1
    while len(picked) < size and any(c < len(f) for c, f in zip(cursors, lists)):
        for k in range(len(lists)):
            if len(picked) >= size:
                break
            take(k)
    if not picked:
        out = _empty()
        out["reasons"] = pd.Series(dtype="string")
        out["group"] = pd.Series(dtype="string")
        return out
    # A row's reasons: every finder whose list reached it while the queue filled.
    all_reasons: dict[int, list[str]] = {}
    for frame, cursor in zip(lists, cursors):
        for r, reason in zip(frame["row"].tolist()[:cursor], frame["reason"].tolist()[:cursor]):
            all_reasons.setdefault(int(r), []).append(str(reason))
    queue = pd.DataFrame(picked)
    queue["reasons"] = pd.array(["+".join(dict.fromkeys(all_reasons[int(r)])) for r in queue["row"]], dtype="string")
    queue["group"] = pd.array(group_of, dtype="string")
    for col in ("row", "suggested", "related_row"):
        queue[col] = queue[col].astype(np.int64)
    # Grouped by finder (params order), each group by its own score, most suspect first.
    queue["_g"] = [names.index(g) for g in group_of]
    queue = queue.sort_values(["_g", "score", "row"], ascending=[True, False, True], kind="stable")
    return queue.drop(columns="_g").reset_index(drop=True)
