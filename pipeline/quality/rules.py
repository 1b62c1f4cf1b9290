"""clean's rules: small registered classes, one interface, pure functions of a Dataset.

A rule is one class and nothing else: its ``name``, its description (the docstring), the
dataset kinds it applies to, its params (a nested ``Params`` model: the rule's policy,
``drop`` / ``flag`` / ``off``, under the rule's own name, and its thresholds) and
``find(dataset, ctx) -> findings``: a DataFrame with one row per flagged item or pair
(:data:`FINDING_COLUMNS`). ``id`` is the row the action applies to; for pairs ``other_id`` is
its partner, which stays.

``@register`` is the one place a rule is listed: the order of registration (the order of the
classes in this file) is the order the rules run in, and the params schema's ``clean``
section (:data:`CleanSpec`) is composed from the registered rules' ``Params``, so a rule's
keys are validated with it (an unknown key is an error naming it) and cannot drift from it.

:func:`apply_rules` runs the rules in order, each on what the previous ones kept, so ids in
findings are always rows that existed when the rule looked, and a row is removed at most
once (its ``reason`` is the rule that dropped it). Embeddings are computed once per run
(``ctx``) and shared by the near-duplicate and leakage rules.

Which copy goes: across splits the evaluation side stays (test before val before train), so
a train/test leak costs a training row and the test set is untouched; within a split the
copy with the smaller id stays.

numpy and pandas are imported inside the functions that use them: the params schema
(pipeline/config.py) imports this module for the rules' params, and loading params must stay
cheap (``fmpipe --help``, the CLI's checks).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Optional

from pydantic import Field, ValidationError, create_model, model_validator

from pipeline.schema import Strict

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.manifest import Dataset

Policy = Literal["drop", "flag", "off"]

SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}
FINDING_COLUMNS = ["rule", "id", "split", "label", "other_id", "other_split", "other_label",
                   "distance", "score", "action", "detail"]
# Rules whose pairs cross splits: what remains of them after cleaning is leakage.
CROSS_SPLIT_RULES = ("exact_duplicate", "leakage", "near_duplicate_rows")


def empty_findings() -> pd.DataFrame:
    return _frame([])


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

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
    """What rules share within one run: the params and a cache of per-row embeddings.

    The cache is one matrix, row ``k`` the vector of id ``_ids[k]`` (each image embedded once
    per run, whichever rule asks first). Rules see datasets that lose rows as earlier rules
    drop them, so rows are found by id. One matrix, not a vector per id: at 1M rows a dict of
    small arrays and the stacked copy each search made cost ~2 GB of clean's peak."""

    spec: Any  # CleanSpec
    embedder: Any = None
    engine: str = "local"  # where embedding chunks run (pipeline.engine)
    _matrix: Any = None  # np.ndarray (rows x dim), or None before the first embedding
    _ids: Any = None  # pd.Index of the ids in _matrix's row order
    index_records: list[dict[str, Any]] = field(default_factory=list)

    def vectors(self, ds: Dataset, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """Embeddings of ``ds``'s rows (``rows``: positions in its manifest; default all), as a
        new array the caller owns."""
        import numpy as np
        import pandas as pd

        ids = pd.Index(ds.manifest["id"].astype(str).to_numpy())
        if self._ids is None:
            self._ids = pd.Index([], dtype=object)
        # Whatever of ``ds`` is not cached is embedded at once, in manifest order and in the
        # same chunks whichever rule asks first (a network's float results may depend on
        # what shares its batch).
        missing = np.flatnonzero(self._ids.get_indexer(ids) < 0)
        if len(missing):
            block = self._embed(ds, missing)
            self._matrix = block if self._matrix is None else np.concatenate([self._matrix, block])
            self._ids = self._ids.append(ids[missing])
        if self._matrix is None:
            return np.zeros((0, 1), np.float32)
        wanted = ids if rows is None else ids[np.asarray(rows, dtype=np.int64)]
        return self._matrix[self._ids.get_indexer(wanted)]

    def _embed(self, ds: Dataset, positions: np.ndarray) -> np.ndarray:
        """Vectors of ``ds``'s rows at ``positions`` (manifest positions), in that order."""
        import numpy as np

        if ds.images is None:
            return ds.features.iloc[positions].to_numpy(dtype=np.float64)
        # Chunk by chunk on the engine (pipeline.engine): never the whole payload in memory,
        # each chunk's vectors written into the one result.
        from pipeline import payload as P
        from pipeline.engine import map_ordered

        step = P.chunk_rows(ds.images)
        jobs = ((self.embedder, np.asarray(P.take(ds.images, positions[a:a + step])))
                for a in range(0, len(positions), step))
        out = None
        start = 0
        for block in map_ordered(embed_chunk, jobs, self.engine):
            block = np.asarray(block)
            if out is None:
                out = np.empty((len(positions), *block.shape[1:]), dtype=block.dtype)
            out[start:start + len(block)] = block
            start += len(block)
        return out if out is not None else np.zeros((0, 1), np.float32)


def embed_chunk(job: tuple) -> Any:
    """(embedder, uint8 images) -> float32 vectors: one chunk, pure, for any engine."""
    embedder, images = job
    return embedder.embed(images)


class Rule:
    """The base of every rule. ``Params`` holds the rule's keys in params' ``clean`` section:
    at least its policy, a field named like the rule."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]] = ("image", "tabular")
    Params: ClassVar[type[Strict]]
    # The params clean's report lists for the rule besides its policy (None: every key of
    # ``Params`` that no other rule shares).
    reported: ClassVar[Optional[tuple[str, ...]]] = None

    @classmethod
    def description(cls) -> str:
        return " ".join((cls.__doc__ or "").split())

    def policy(self, spec) -> str:
        return getattr(spec, self.name)

    def params(self, spec) -> dict[str, Any]:
        keys = self.reported if self.reported is not None else _own_keys(type(self))
        return {"policy": self.policy(spec), **{k: _plain(getattr(spec, k)) for k in keys}}

    def find(self, ds: Dataset, ctx: Context) -> pd.DataFrame:
        raise NotImplementedError


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


# Every registered rule, in the order they run.
REGISTRY: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """List a rule: it runs after the rules registered before it, and its ``Params`` join the
    ``clean`` section. Refused at import: a rule without its policy key, or a key that two
    rules declare separately (a key shared on purpose comes from one common base model)."""
    if cls.name in REGISTRY:
        raise TypeError(f"clean rule {cls.name!r} registered twice")
    fields = cls.Params.model_fields
    if cls.name not in fields:
        raise TypeError(f"clean rule {cls.name!r}: its Params need a policy field named {cls.name!r}")
    for key in fields:
        for other in REGISTRY.values():
            if key in other.Params.model_fields and _declared_by(other.Params, key) is not _declared_by(cls.Params, key):
                raise TypeError(f"clean rule {cls.name!r}: param {key!r} is also rule {other.name!r}'s "
                                f"(share it through one base model, or rename it)")
    REGISTRY[cls.name] = cls
    return cls


def _declared_by(model: type, key: str) -> type:
    """The class in ``model``'s bases whose own annotations declare ``key``."""
    return next(c for c in model.__mro__ if key in c.__dict__.get("__annotations__", {}))


def _own_keys(cls: type[Rule]) -> list[str]:
    """``cls``'s params besides its policy that no other registered rule declares too."""
    shared = {k for other in REGISTRY.values() if other is not cls for k in other.Params.model_fields}
    return [k for k in cls.Params.model_fields if k != cls.name and k not in shared]


def _item(rule: str, m: pd.DataFrame, row: int, action: str, detail: str, score: float = float("nan")) -> dict:
    return {"rule": rule, "id": m.at[row, "id"], "split": m.at[row, "split"], "label": int(m.at[row, "label"]),
            "other_id": None, "other_split": None, "other_label": None, "distance": float("nan"),
            "score": float(score), "action": action, "detail": detail}


def _pair(rule: str, m: pd.DataFrame, row: int, other: int, action: str, distance: float, detail: str = "") -> dict:
    return {"rule": rule, "id": m.at[row, "id"], "split": m.at[row, "split"], "label": int(m.at[row, "label"]),
            "other_id": m.at[other, "id"], "other_split": m.at[other, "split"],
            "other_label": int(m.at[other, "label"]), "distance": float(distance), "score": float("nan"),
            "action": action, "detail": detail}


# ---------------------------------------------------------------- shared params

class EmbedderSpec(Strict):
    """What clean embeds images with for near-duplicate search (pipeline/quality/embedders.py).

    ``thumbs``: hand-designed features, no weights. ``crops``: ``thumbs`` plus re-cropped
    views of the query images (finds re-crops, borders and aspect changes; ~1.5x the
    embedding work of thumbs on CIFAR-10, measured in bench/README.md). ``package``: an fmpipe trained model or
    package directory (model.json + model.safetensors) outside this variant's own data/<v>/
    (e.g. an archived release); declare it as a dep of clean in dvc.yaml. ``layer``: a module
    name (None: the input of the last Linear layer).
    """

    kind: Literal["thumbs", "crops", "package"] = "thumbs"
    path: Optional[str] = None
    layer: Optional[str] = None

    @model_validator(mode="after")
    def _package_has_path(self) -> "EmbedderSpec":
        if self.kind == "package" and not self.path:
            raise ValueError("embedder kind 'package' needs `path` (a directory with model.json)")
        return self


class NearSearch(Strict):
    """The near-duplicate search the image rules ``leakage`` and ``near_duplicates`` share
    (one embedding and one threshold, so both see the same pairs)."""

    # Cosine distance of embeddings at or below which two images are near-duplicates. 0.015
    # for the thumbs embedder: on CIFAR-10's test split, pairs up to ~0.01 are nearly all the
    # same photo, pairs at 0.02-0.03 mostly different photos of a similar scene (README).
    near_threshold: float = Field(0.015, ge=0, le=2)
    embedder: EmbedderSpec = Field(default_factory=EmbedderSpec)
    index_method: Literal["auto", "exact", "faiss-ivf", "faiss-hnsw", "usearch"] = "auto"
    neighbors_k: int = Field(10, ge=1)  # neighbours looked at per image


class RowSearch(Strict):
    """Near-identical table rows (``near_duplicate_rows``; across splits they are leaks)."""

    row_near_threshold: float = Field(0.05, ge=0)  # Euclidean, in standard deviations


# ---------------------------------------------------------------- unusable rows first

@register
class LabelRange(Rule):
    """Labels outside the class list: no model can learn from them."""

    name = "label_range"

    class Params(Strict):
        label_range: Policy = "drop"

    def find(self, ds, ctx):
        import numpy as np

        m = ds.manifest
        bad = np.flatnonzero(((m["label"] < 0) | (m["label"] >= len(ds.classes))).to_numpy())
        return _frame([_item(self.name, m, int(r), self.policy(ctx.spec),
                             f"label {int(m.at[int(r), 'label'])} not in 0..{len(ds.classes) - 1}") for r in bad])


@register
class NonFinite(Rule):
    """Table rows with NaN or infinite feature values."""

    name = "non_finite"
    kinds = ("tabular",)

    class Params(Strict):
        non_finite: Policy = "drop"

    def find(self, ds, ctx):
        import numpy as np

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

    class Params(Strict):
        out_of_range: Policy = "drop"
        bounds: dict[str, tuple[Optional[float], Optional[float]]] = Field(default_factory=dict)

    def find(self, ds, ctx):
        import numpy as np

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
class ImageShape(Rule):
    """Rows whose recorded height/width/channels differ from the expected image shape
    (params ``expected_shape`` [H, W, C], default: the dataset's own array shape)."""

    name = "image_shape"
    kinds = ("image",)
    reported = ()

    class Params(Strict):
        image_shape: Policy = "drop"
        expected_shape: Optional[tuple[int, int, int]] = None  # [H, W, C]; default: the array's

    def find(self, ds, ctx):
        import numpy as np

        m = ds.manifest
        expected = tuple(ctx.spec.expected_shape or ds.images.shape[1:])
        got = m[["height", "width", "channels"]].to_numpy()
        bad = np.flatnonzero((got != np.asarray(expected)).any(axis=1))
        return _frame([_item(self.name, m, int(r), self.policy(ctx.spec),
                             f"shape {tuple(int(v) for v in got[r])} != expected {expected}") for r in bad])


@register
class BlankImage(Rule):
    """Blank or constant images: (almost) no variation in pixel values."""

    name = "blank_images"
    kinds = ("image",)

    class Params(Strict):
        blank_images: Policy = "drop"
        blank_max_std: float = Field(2.0, ge=0)  # pixel std at or below this: blank/constant

    def find(self, ds, ctx):
        import numpy as np

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

    class Params(Strict):
        exposure: Policy = "flag"
        dark_max_mean: float = Field(8.0, ge=0, le=255)
        bright_min_mean: float = Field(247.0, ge=0, le=255)

        @model_validator(mode="after")
        def _dark_below_bright(self):
            if self.dark_max_mean >= self.bright_min_mean:
                raise ValueError(f"dark_max_mean ({self.dark_max_mean}) must be below "
                                 f"bright_min_mean ({self.bright_min_mean})")
            return self

    def find(self, ds, ctx):
        import numpy as np

        m = ds.manifest
        mean = m["mean"].to_numpy(dtype=float)
        s = ctx.spec
        rows = []
        for r in np.flatnonzero(mean <= s.dark_max_mean):
            rows.append(_item(self.name, m, int(r), self.policy(s), f"under-exposed: mean {mean[r]:.1f} <= {s.dark_max_mean}", mean[r]))
        for r in np.flatnonzero(mean >= s.bright_min_mean):
            rows.append(_item(self.name, m, int(r), self.policy(s), f"over-exposed: mean {mean[r]:.1f} >= {s.bright_min_mean}", mean[r]))
        return _frame(rows)


# ---------------------------------------------------------------- then exact copies

@register
class ExactDuplicate(Rule):
    """Identical payload bytes (sha256). Same label: the most protected copy stays. Different
    labels: every copy is acted on (nobody knows which label is right)."""

    name = "exact_duplicate"
    reported = ()

    class Params(Strict):
        # Deprecated switch kept for old params files: false turns exact_duplicate off.
        drop_duplicates: bool = True
        exact_duplicate: Policy = "drop"  # same bytes; conflicting labels: every copy

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


# ---------------------------------------------------------------- then near copies

def _near(ds: Dataset, ctx: Context, rows_a: np.ndarray, rows_b: np.ndarray | None, threshold: float,
          views: bool = True) -> pd.DataFrame:
    """near_pairs between row subsets of ``ds`` (indices into the manifest), recorded in ctx.
    ``views``: use the embedder's query views if it has them (crops)."""
    import numpy as np

    from pipeline.quality.neighbors import describe, near_pairs

    # Each a new array owned here: near_pairs may normalise it in place (clean's peak at 1M).
    va = ctx.vectors(ds, rows_a)
    vb = None if rows_b is None else ctx.vectors(ds, rows_b)
    spec = ctx.spec
    embed_views = getattr(ctx.embedder, "embed_views", None)
    if views and embed_views is not None and ds.images is not None:
        # The crops embedder: re-cropped views of the query rows, each searched as well.
        from pipeline import payload as P
        from pipeline.quality.neighbors import near_pairs_views

        step = P.chunk_rows(ds.images)  # the query's pixels chunk by chunk, like Context.vectors
        chunks = [embed_views(np.asarray(P.take(ds.images, rows_a[a:a + step]))) for a in range(0, len(rows_a), step)]
        views = [np.concatenate([c[v] for c in chunks]) for v in range(len(chunks[0]))] if chunks else []
        pairs = near_pairs_views(va, views, vb, threshold=threshold, k=spec.neighbors_k, method=spec.index_method,
                                 overwrite=True)
    else:
        pairs = near_pairs(va, vb, threshold=threshold, k=spec.neighbors_k, method=spec.index_method, overwrite=True)
    del va, vb  # before the pairs are mapped back: at 1M rows they are ~0.7 GB
    record = describe(pairs)
    record.pop("seconds", None)
    ctx.index_records.append(record)
    pairs["i"] = rows_a[pairs["i"].to_numpy()]
    pairs["j"] = (rows_a if rows_b is None else rows_b)[pairs["j"].to_numpy()]
    return pairs


@register
class Leakage(Rule):
    """Near-duplicates across splits: the copy in the less protected split is acted on (the
    training copy of a train/test pair), the evaluation copy stays."""

    name = "leakage"
    kinds = ("image",)  # tables: near_duplicate_rows, which acts on its leaks by this policy

    class Params(NearSearch):
        leakage: Policy = "drop"

    def find(self, ds, ctx):
        import numpy as np

        m = ds.manifest
        action = self.policy(ctx.spec)
        split = m["split"].to_numpy()
        sha = m["sha256"].to_numpy()
        rows = []
        # Queries are the protected split; the base is every less protected one.
        for protected, exposed in (("test", ("val", "train")), ("val", ("train",))):
            q = np.flatnonzero(split == protected)
            b = np.flatnonzero(np.isin(split, exposed))
            if len(q) == 0 or len(b) == 0:
                continue
            pairs = _near(ds, ctx, q, b, ctx.spec.near_threshold)
            for i, j, d in pairs.itertuples(index=False):
                if sha[i] == sha[j]:
                    continue  # exact_duplicate's
                rows.append(_pair(self.name, m, j, i, action, d, f"{split[j]} copy of a {protected} row"))
        frame = _frame(rows)
        # One finding per (acted-on row, kept row); a row close to several keeps them all listed.
        return frame.drop_duplicates(["id", "other_id"]).reset_index(drop=True)


@register
class NearDuplicate(Rule):
    """Near-duplicates within one split (exact copies are exact_duplicate's): the copy with
    the larger id is acted on, the smaller id stays."""

    name = "near_duplicates"
    kinds = ("image",)  # tables: near_duplicate_rows

    class Params(NearSearch):
        near_duplicates: Policy = "flag"  # within one split

    def find(self, ds, ctx):
        import numpy as np

        m = ds.manifest
        action = self.policy(ctx.spec)
        sha = m["sha256"].to_numpy()
        ids = m["id"].astype(str).to_numpy()
        rows = []
        for split in ("train", "val", "test"):
            members = np.flatnonzero(m["split"].to_numpy() == split)
            if len(members) < 2:
                continue
            # Views (crops) for the evaluation splits only: within train they would cost 8
            # searches of train x train (CIFAR-10: 2e10 similarities) for pairs that cost a
            # duplicate training row, not a biased score.
            pairs = _near(ds, ctx, members, None, ctx.spec.near_threshold, views=split != "train")
            for i, j, d in pairs.itertuples(index=False):
                if sha[i] == sha[j]:
                    continue
                first, second = (i, j) if ids[i] < ids[j] else (j, i)
                rows.append(_pair(self.name, m, second, first, action, d, f"within {split}"))
        return _frame(rows)


@register
class NearDuplicateRows(Rule):
    """Table rows within ``row_near_threshold`` (Euclidean, in units of each column's
    standard deviation) of another row. The less protected copy is acted on; within a split
    by this rule's policy, across splits (a leak) by ``leakage``'s."""

    name = "near_duplicate_rows"
    kinds = ("tabular",)

    class Params(RowSearch):
        near_duplicate_rows: Policy = "flag"

    def find(self, ds, ctx):
        import numpy as np
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


# ---------------------------------------------------------------- columns last

@register
class ConstantColumns(Rule):
    """Feature columns with one value in every row: they carry nothing. ``drop`` removes the
    column (not rows); the finding's ``id`` is the column name."""

    name = "constant_columns"
    kinds = ("tabular",)

    class Params(Strict):
        constant_columns: Policy = "flag"

    def find(self, ds, ctx):
        rows = []
        for column in ds.features.columns:
            if ds.features[column].nunique(dropna=False) <= 1 and len(ds.features) > 1:
                rows.append({"rule": self.name, "id": str(column), "split": None, "label": None,
                             "other_id": None, "other_split": None, "other_label": None, "distance": float("nan"),
                             "score": float("nan"), "action": self.policy(ctx.spec), "detail": "constant column"})
        return _frame(rows)


# ---------------------------------------------------------------- the clean section

class _CleanBase(Strict):
    """clean's params (pipeline/quality/rules.py): the registered rules' ``Params``, in the
    order the rules run, then clean's own settings."""

    @model_validator(mode="after")
    def _each_rule_checks_its_params(self):
        # Each rule's own checks across its keys (e.g. exposure: dark below bright); the
        # checks of single keys (ranges, types) came with the fields.
        for rule in REGISTRY.values():
            if rule.Params.__pydantic_decorators__.model_validators:
                try:
                    rule.Params.model_validate({k: getattr(self, k) for k in rule.Params.model_fields})
                except ValidationError as exc:
                    raise ValueError(f"rule {rule.name}: " + "; ".join(
                        e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
        return self


def _compose_clean_spec() -> type[Strict]:
    fields: dict[str, Any] = {}
    for rule in REGISTRY.values():
        for key, info in rule.Params.model_fields.items():
            fields.setdefault(key, (info.annotation, copy.copy(info)))
    # Contact sheet: at most this many pairs (closest first) and items are drawn.
    fields["sheet_max_pairs"] = (int, Field(300, ge=0))
    return create_model("CleanSpec", __base__=_CleanBase, __module__=__name__, **fields)


CleanSpec = _compose_clean_spec()


@dataclass
class Outcome:
    dataset: Dataset
    findings: pd.DataFrame
    removed: list[dict[str, Any]]
    rules: dict[str, dict[str, Any]]  # rule -> params and counts
    index: list[dict[str, Any]]


def apply_rules(ds: Dataset, spec, embedder=None, engine: str = "local") -> Outcome:
    """Run every registered rule that applies to ``ds``'s kind, in order, applying policies."""
    import pandas as pd

    from pipeline.manifest import Dataset

    ctx = Context(spec=spec, embedder=embedder, engine=engine)
    all_findings = []
    removed: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    for name, cls in REGISTRY.items():
        rule = cls()
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
