"""clean's rules: small registered classes, one interface, pure functions of a Dataset.

A rule has a ``name``, reads its params from :class:`pipeline.config.CleanSpec` (its policy
``drop`` / ``flag`` / ``off`` and its thresholds) and ``find(dataset, ctx) -> findings``: a
DataFrame with one row per flagged item or pair (:data:`FINDING_COLUMNS`). ``id`` is the row
the action applies to; for pairs ``other_id`` is its partner, which stays.

:func:`apply_rules` runs the rules in order, each on what the previous ones kept, so ids in
findings are always rows that existed when the rule looked, and a row is removed at most
once (its ``reason`` is the rule that dropped it). Embeddings are computed once per run
(``ctx``) and shared by the near-duplicate and leakage rules.

Which copy goes: across splits the evaluation side stays (test before val before train), so
a train/test leak costs a training row and the test set is untouched; within a split the
copy with the smaller id stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from pipeline.manifest import Dataset

SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}
FINDING_COLUMNS = ["rule", "id", "split", "label", "other_id", "other_split", "other_label",
                   "distance", "score", "action", "detail"]
# Rules whose pairs cross splits: what remains of them after cleaning is leakage.
CROSS_SPLIT_RULES = ("exact_duplicate", "leakage", "near_duplicate_rows")


def empty_findings() -> pd.DataFrame:
    return _frame([])


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=FINDING_COLUMNS)
    for col in ("rule", "id", "split", "other_id", "other_split", "action", "detail"):
        frame[col] = frame[col].astype("string")
    for col in ("label", "other_label"):
        frame[col] = pd.array(frame[col], dtype="Int64")
    for col in ("distance", "score"):
        frame[col] = frame[col].astype("float64")
    return frame


@dataclass
class Context:
    """What rules share within one run: the params and a cache of per-row embeddings."""

    spec: Any  # CleanSpec
    embedder: Any = None
    _vectors: dict[str, np.ndarray] = field(default_factory=dict)
    index_records: list[dict[str, Any]] = field(default_factory=list)

    def vectors(self, ds: Dataset) -> np.ndarray:
        """Embeddings of ``ds``'s rows (by id; each image embedded once per run)."""
        ids = ds.manifest["id"].astype(str).to_numpy()
        missing = [k for k, i in enumerate(ids) if i not in self._vectors]
        if missing:
            if ds.images is not None:
                new = self.embedder.embed(np.asarray(ds.images[np.asarray(missing)]))
            else:
                new = _table_vectors(ds.features.iloc[missing])
            for k, vec in zip(missing, new):
                self._vectors[ids[k]] = vec
        return np.stack([self._vectors[i] for i in ids]) if len(ids) else np.zeros((0, 1), np.float32)


def _table_vectors(features: pd.DataFrame) -> np.ndarray:
    return features.to_numpy(dtype=np.float64)


class Rule:
    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]] = ("image", "tabular")

    def policy(self, spec) -> str:
        return getattr(spec, self.name)

    def params(self, spec) -> dict[str, Any]:
        return {"policy": self.policy(spec)}

    def find(self, ds: Dataset, ctx: Context) -> pd.DataFrame:
        raise NotImplementedError


REGISTRY: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    REGISTRY[cls.name] = cls
    return cls


def _item(rule: str, m: pd.DataFrame, row: int, action: str, detail: str, score: float = np.nan) -> dict:
    return {"rule": rule, "id": m.at[row, "id"], "split": m.at[row, "split"], "label": int(m.at[row, "label"]),
            "other_id": None, "other_split": None, "other_label": None, "distance": np.nan,
            "score": float(score), "action": action, "detail": detail}


def _pair(rule: str, m: pd.DataFrame, row: int, other: int, action: str, distance: float, detail: str = "") -> dict:
    return {"rule": rule, "id": m.at[row, "id"], "split": m.at[row, "split"], "label": int(m.at[row, "label"]),
            "other_id": m.at[other, "id"], "other_split": m.at[other, "split"],
            "other_label": int(m.at[other, "label"]), "distance": float(distance), "score": np.nan,
            "action": action, "detail": detail}


# ---------------------------------------------------------------- every dataset

@register
class LabelRange(Rule):
    """Labels outside the class list: no model can learn from them."""

    name = "label_range"

    def find(self, ds, ctx):
        m = ds.manifest
        bad = np.flatnonzero(((m["label"] < 0) | (m["label"] >= len(ds.classes))).to_numpy())
        return _frame([_item(self.name, m, int(r), self.policy(ctx.spec),
                             f"label {int(m.at[int(r), 'label'])} not in 0..{len(ds.classes) - 1}") for r in bad])


@register
class ExactDuplicate(Rule):
    """Identical payload bytes (sha256). Same label: the most protected copy stays. Different
    labels: every copy is acted on (nobody knows which label is right)."""

    name = "exact_duplicate"

    def policy(self, spec):
        # The old switch `drop_duplicates: false` still means "do not remove them".
        return "flag" if (spec.exact_duplicate == "drop" and not spec.drop_duplicates) else spec.exact_duplicate

    def find(self, ds, ctx):
        m = ds.manifest
        action = self.policy(ctx.spec)
        prio = m["split"].map(SPLIT_PRIORITY).to_numpy()
        rows: list[dict] = []
        dup = m["sha256"].duplicated(keep=False).to_numpy()
        for _, group in m[dup].groupby("sha256", sort=False):
            idx = sorted(group.index, key=lambda r: (prio[r], m.at[r, "id"]))
            keep = idx[0]
            conflicting = group["label"].nunique() > 1
            for r in (idx if conflicting else idx[1:]):
                other = idx[1] if r == keep else keep
                rows.append(_pair(self.name, m, r, other, action, 0.0,
                                  "conflicting labels" if conflicting else "same label"))
        return _frame(rows)


def _near(ds: Dataset, ctx: Context, rows_a: np.ndarray, rows_b: np.ndarray | None, threshold: float) -> pd.DataFrame:
    """near_pairs between row subsets of ``ds`` (indices into the manifest), recorded in ctx."""
    from pipeline.quality.neighbors import describe, near_pairs

    vectors = ctx.vectors(ds)
    va = vectors[rows_a]
    vb = None if rows_b is None else vectors[rows_b]
    spec = ctx.spec
    pairs = near_pairs(va, vb, threshold=threshold, k=spec.neighbors_k, method=spec.index_method)
    record = describe(pairs)
    record.pop("seconds", None)
    ctx.index_records.append(record)
    pairs["i"] = rows_a[pairs["i"].to_numpy()]
    pairs["j"] = (rows_a if rows_b is None else rows_b)[pairs["j"].to_numpy()]
    return pairs


def _image_or_table_threshold(ds: Dataset, spec) -> float:
    return spec.near_threshold if ds.kind == "image" else spec.row_near_threshold


@register
class NearDuplicate(Rule):
    """Near-duplicates within one split (exact copies are exact_duplicate's): the copy with
    the larger id is acted on, the smaller id stays."""

    name = "near_duplicates"
    kinds = ("image",)  # tables: near_duplicate_rows

    def find(self, ds, ctx):
        m = ds.manifest
        action = self.policy(ctx.spec)
        threshold = _image_or_table_threshold(ds, ctx.spec)
        sha = m["sha256"].to_numpy()
        ids = m["id"].astype(str).to_numpy()
        rows = []
        for split in ("train", "val", "test"):
            members = np.flatnonzero(m["split"].to_numpy() == split)
            if len(members) < 2:
                continue
            pairs = _near(ds, ctx, members, None, threshold)
            for i, j, d in pairs.itertuples(index=False):
                if sha[i] == sha[j]:
                    continue
                first, second = (i, j) if ids[i] < ids[j] else (j, i)
                rows.append(_pair(self.name, m, second, first, action, d, f"within {split}"))
        return _frame(rows)


@register
class Leakage(Rule):
    """Near-duplicates across splits: the copy in the less protected split is acted on (the
    training copy of a train/test pair), the evaluation copy stays."""

    name = "leakage"
    kinds = ("image",)  # tables: near_duplicate_rows

    def find(self, ds, ctx):
        m = ds.manifest
        action = self.policy(ctx.spec)
        threshold = _image_or_table_threshold(ds, ctx.spec)
        split = m["split"].to_numpy()
        sha = m["sha256"].to_numpy()
        rows = []
        # Queries are the protected split; the base is every less protected one.
        for protected, exposed in (("test", ("val", "train")), ("val", ("train",))):
            q = np.flatnonzero(split == protected)
            b = np.flatnonzero(np.isin(split, exposed))
            if len(q) == 0 or len(b) == 0:
                continue
            pairs = _near(ds, ctx, q, b, threshold)
            for i, j, d in pairs.itertuples(index=False):
                if sha[i] == sha[j]:
                    continue  # exact_duplicate's
                rows.append(_pair(self.name, m, j, i, action, d, f"{split[j]} copy of a {protected} row"))
        frame = _frame(rows)
        # One finding per (acted-on row, kept row); a row close to several keeps them all listed.
        return frame.drop_duplicates(["id", "other_id"]).reset_index(drop=True)


# ---------------------------------------------------------------- images

@register
class BlankImage(Rule):
    """Blank or constant images: (almost) no variation in pixel values."""

    name = "blank_images"
    kinds = ("image",)

    def params(self, spec):
        return {"policy": spec.blank_images, "blank_max_std": spec.blank_max_std}

    def find(self, ds, ctx):
        m = ds.manifest
        std = m["std"].to_numpy(dtype=float)
        bad = np.flatnonzero(std <= ctx.spec.blank_max_std)
        return _frame([_item(self.name, m, int(r), self.policy(ctx.spec),
                             f"pixel std {std[r]:.2f} <= {ctx.spec.blank_max_std}", std[r]) for r in bad])


@register
class Exposure(Rule):
    """Extreme under/over-exposure: the mean pixel value near black or near white."""

    name = "exposure"
    kinds = ("image",)

    def params(self, spec):
        return {"policy": spec.exposure, "dark_max_mean": spec.dark_max_mean, "bright_min_mean": spec.bright_min_mean}

    def find(self, ds, ctx):
        m = ds.manifest
        mean = m["mean"].to_numpy(dtype=float)
        s = ctx.spec
        rows = []
        for r in np.flatnonzero(mean <= s.dark_max_mean):
            rows.append(_item(self.name, m, int(r), self.policy(s), f"under-exposed: mean {mean[r]:.1f} <= {s.dark_max_mean}", mean[r]))
        for r in np.flatnonzero(mean >= s.bright_min_mean):
            rows.append(_item(self.name, m, int(r), self.policy(s), f"over-exposed: mean {mean[r]:.1f} >= {s.bright_min_mean}", mean[r]))
        return _frame(rows)


@register
class ImageShape(Rule):
    """Rows whose recorded height/width/channels differ from the expected image shape
    (params ``image_shape`` [H, W, C], default: the dataset's own array shape)."""

    name = "image_shape"
    kinds = ("image",)

    def find(self, ds, ctx):
        m = ds.manifest
        expected = tuple(ctx.spec.expected_shape or ds.images.shape[1:])
        got = m[["height", "width", "channels"]].to_numpy()
        bad = np.flatnonzero((got != np.asarray(expected)).any(axis=1))
        return _frame([_item(self.name, m, int(r), self.policy(ctx.spec),
                             f"shape {tuple(int(v) for v in got[r])} != expected {expected}") for r in bad])


# ---------------------------------------------------------------- tables

@register
class NonFinite(Rule):
    name = "non_finite"
    kinds = ("tabular",)

    def find(self, ds, ctx):
        m = ds.manifest
        values = ds.features.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        cols = np.asarray(ds.features.columns)
        return _frame([_item(self.name, m, int(r), self.policy(ctx.spec),
                             "NaN/inf in " + ", ".join(map(str, cols[bad[r]])), float(bad[r].sum()))
                       for r in np.flatnonzero(bad.any(axis=1))])


@register
class OutOfRange(Rule):
    """Feature values outside the bounds given in params (``bounds: {column: [low, high]}``)."""

    name = "out_of_range"
    kinds = ("tabular",)

    def params(self, spec):
        return {"policy": spec.out_of_range, "bounds": dict(spec.bounds)}

    def find(self, ds, ctx):
        from pipeline.errors import FmpipeError

        m = ds.manifest
        rows = []
        hits: dict[int, list[str]] = {}
        for column, (low, high) in ctx.spec.bounds.items():
            if column not in ds.features.columns:
                raise FmpipeError(f"clean.bounds names column {column!r}, which the data does not have "
                                  f"(columns: {', '.join(map(str, ds.features.columns))})")
            v = ds.features[column].to_numpy(dtype=np.float64)
            low = -np.inf if low is None else low
            high = np.inf if high is None else high
            for r in np.flatnonzero((v < low) | (v > high)):
                hits.setdefault(int(r), []).append(f"{column}={v[r]:g} outside [{low}, {high}]")
        for r in sorted(hits):
            rows.append(_item(self.name, m, r, self.policy(ctx.spec), "; ".join(hits[r]), len(hits[r])))
        return _frame(rows)


@register
class NearDuplicateRows(Rule):
    """Table rows within ``row_near_threshold`` (Euclidean, in units of each column's
    standard deviation) of another row. The less protected copy is acted on; within a split
    by this rule's policy, across splits (a leak) by ``leakage``'s."""

    name = "near_duplicate_rows"
    kinds = ("tabular",)

    def params(self, spec):
        return {"policy": spec.near_duplicate_rows, "row_near_threshold": spec.row_near_threshold}

    def find(self, ds, ctx):
        from sklearn.neighbors import NearestNeighbors

        m = ds.manifest
        x = ds.features.to_numpy(dtype=np.float64)
        finite = np.isfinite(x).all(axis=1)
        rows_ok = np.flatnonzero(finite)
        if len(rows_ok) < 2:
            return empty_findings()
        z = x[rows_ok]
        std = z.std(axis=0)
        z = (z - z.mean(axis=0)) / np.where(std > 0, std, 1.0)
        nn = NearestNeighbors(radius=ctx.spec.row_near_threshold).fit(z)
        dist, idx = nn.radius_neighbors(z, return_distance=True)
        ctx.index_records.append({"method": "sklearn radius_neighbors (euclidean, z-scored)",
                                  "threshold": ctx.spec.row_near_threshold, "n_query": len(z)})
        sha = m["sha256"].to_numpy()
        prio = m["split"].map(SPLIT_PRIORITY).to_numpy()
        ids = m["id"].astype(str).to_numpy()
        rows = []
        for a, (ds_, js) in enumerate(zip(dist, idx)):
            for d, b in zip(ds_, js):
                i, j = rows_ok[a], rows_ok[b]
                if i >= j or sha[i] == sha[j]:
                    continue
                keep, act = sorted((i, j), key=lambda r: (prio[r], ids[r]))
                # Across splits a near-identical row is a leak: the leakage policy applies.
                across = m.at[act, "split"] != m.at[keep, "split"]
                action = ctx.spec.leakage if across else self.policy(ctx.spec)
                if action == "off":
                    continue
                rows.append(_pair(self.name, m, act, keep, action, d,
                                  f"{m.at[act, 'split']} vs {m.at[keep, 'split']}"))
        return _frame(rows)


@register
class ConstantColumns(Rule):
    """Feature columns with one value in every row: they carry nothing. ``drop`` removes the
    column (not rows); the finding's ``id`` is the column name."""

    name = "constant_columns"
    kinds = ("tabular",)

    def find(self, ds, ctx):
        rows = []
        for column in ds.features.columns:
            if ds.features[column].nunique(dropna=False) <= 1 and len(ds.features) > 1:
                rows.append({"rule": self.name, "id": str(column), "split": None, "label": None,
                             "other_id": None, "other_split": None, "other_label": None, "distance": np.nan,
                             "score": np.nan, "action": self.policy(ctx.spec), "detail": "constant column"})
        return _frame(rows)


# Order matters: unusable rows go first, then exact copies, then near copies.
ORDER = ["label_range", "non_finite", "out_of_range", "image_shape", "blank_images", "exposure",
         "exact_duplicate", "leakage", "near_duplicates", "near_duplicate_rows", "constant_columns"]


@dataclass
class Outcome:
    dataset: Dataset
    findings: pd.DataFrame
    removed: list[dict[str, Any]]
    rules: dict[str, dict[str, Any]]  # rule -> params and counts
    index: list[dict[str, Any]]


def apply_rules(ds: Dataset, spec, embedder=None) -> Outcome:
    """Run every rule that applies to ``ds``'s kind, in :data:`ORDER`, applying policies."""
    ctx = Context(spec=spec, embedder=embedder)
    all_findings = []
    removed: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        rule = REGISTRY[name]()
        if ds.kind not in rule.kinds:
            continue
        params = rule.params(spec)
        if params["policy"] == "off":
            summary[name] = {**params, "findings": 0, "dropped": 0, "flagged": 0}
            continue
        found = rule.find(ds, ctx)
        dropped = 0
        if (found["action"] == "drop").any():
            if name == "constant_columns":
                ds = Dataset(manifest=ds.manifest, classes=ds.classes, images=None,
                             features=ds.features.drop(columns=list(found["id"])), extra_meta=ds.extra_meta)
                dropped = len(found)
            else:
                dropping = found[found["action"] == "drop"]
                gone = set(dropping["id"].astype(str))
                keep = ~ds.manifest["id"].astype(str).isin(gone).to_numpy()
                for _, f in dropping.drop_duplicates("id").iterrows():
                    entry = {"id": f["id"], "reason": name, "split": f["split"], "detail": f["detail"]}
                    if pd.notna(f["other_id"]):
                        entry.update(dup_of=f["other_id"], dup_of_split=f["other_split"],
                                     distance=round(float(f["distance"]), 6))
                    removed.append(entry)
                dropped = int((~keep).sum())
                ds = ds.take(keep)
        summary[name] = {**params, "findings": int(len(found)), "dropped": dropped,
                         "flagged": int((found["action"] == "flag").sum())}
        all_findings.append(found)
    findings = pd.concat(all_findings, ignore_index=True) if all_findings else empty_findings()
    if not len(findings):
        findings = empty_findings()
    return Outcome(dataset=ds, findings=findings, removed=removed, rules=summary, index=ctx.index_records)


def leaked_rows(ds: Dataset, findings: pd.DataFrame) -> np.ndarray:
    """Per row of the cleaned ``ds``: still has a cross-split copy in it (flagged, not dropped)."""
    ids = set(ds.manifest["id"].astype(str))
    f = findings[findings["rule"].isin(CROSS_SPLIT_RULES) & (findings["action"] == "flag")]
    f = f[f["other_id"].notna() & (f["split"] != f["other_split"])]
    live = f[f["id"].astype(str).isin(ids) & f["other_id"].astype(str).isin(ids)]
    leaked = set(live["id"].astype(str)) | set(live["other_id"].astype(str))
    return ds.manifest["id"].astype(str).isin(leaked).to_numpy()
