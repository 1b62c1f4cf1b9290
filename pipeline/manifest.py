"""The dataset contract shared by every data step (collect, clean, annotate).

A dataset directory holds:

- ``manifest.parquet``: one row per example. Required columns: ``id`` (stable across
  versions), ``split`` (train/val/test), ``label`` (int, index into ``classes``),
  ``label_name``, ``sha256`` (of the example's payload bytes: the uint8 pixels of an image,
  the float64 feature row of a table). Image datasets add ``height``, ``width``,
  ``channels``, ``mean``, ``std``; tables add ``n_missing``. Steps add their own columns
  (``label_source``, ...).
- the payload, row-aligned with the manifest: ``images.npy`` (N x H x W x C uint8,
  memory-mappable), or above one shard's size (1 GiB) ``images/shard-00000.npy ...``
  (``pipeline/payload.py``: layouts, and the one way to read either), or
  ``features.parquet`` (one float column per feature).
- ``dataset.json``: kind (image/tabular), ordered class names, image shape or feature names,
  and ``rows`` + ``files`` (sha256 of ``manifest.parquet`` and of every payload file;
  sharded payloads also list ``shards``: file and rows of each): what ties the payload to its
  manifest. ``read_dataset`` checks them all, so a payload edited, truncated or swapped behind
  the manifest's back stops the reading step with an error naming the file (cost: one sha256
  pass over the files, in 1 MB reads; for CIFAR-10's 184 MB ``images.npy`` ~0.1-0.2 s on a
  quiet 2-core CPU, 0.8 s under heavy load: ``bench/dataset_digest.py``).
- ``report.json``: what the step did; ``rows_in == rows_out + len(removed)`` always holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np
import pandas as pd

from pipeline import payload as P
from pipeline.errors import FmpipeError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.artefacts import DatasetReport
from pipeline.io import atomic_dir, checked_digest, file_digest, to_json

MANIFEST = "manifest.parquet"
IMAGES = P.IMAGES
FEATURES = "features.parquet"
META = "dataset.json"
REPORT = "report.json"

SPLITS = ("train", "val", "test")
# Free-text columns a source carries (never model inputs) travel in the manifest under this
# prefix, after collect's pii rule (pipeline/quality/pii.py); dataset.json lists them.
TEXT_PREFIX = "text:"
META_PREFIX = "meta:"  # a column of the variant's metadata table (pipeline/sources/metadata.py)
REQUIRED_COLUMNS = ("id", "split", "label", "label_name", "sha256")
# dataset.json keys written by write_dataset itself (never carried over from the input's).
_OWN_META = ("kind", "classes", "image_shape", "feature_names", "rows", "files", "shards")


@dataclass
class Dataset:
    """A manifest plus its row-aligned payload (exactly one of images / features)."""

    manifest: pd.DataFrame
    classes: list[str]
    # N x H x W x C uint8: an array in memory, the np.memmap of images.npy, or a lazy
    # pipeline.payload.Images view (shards, or rows taken from a file-backed payload).
    images: Optional[Any] = None
    features: Optional[pd.DataFrame] = None
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.images is None) == (self.features is None):
            raise ValueError("a Dataset carries exactly one payload: images or features")
        n = len(self.manifest)
        payload_rows = len(self.images) if self.images is not None else len(self.features)
        if payload_rows != n:
            raise ValueError(f"payload has {payload_rows} rows, manifest has {n}")

    @property
    def kind(self) -> str:
        return "image" if self.images is not None else "tabular"

    def __len__(self) -> int:
        return len(self.manifest)

    def take(self, rows: np.ndarray) -> "Dataset":
        """Rows by boolean mask or integer index, payload kept aligned. A payload on disk is
        not read: the images become a lazy view of the rows (``pipeline.payload.take``)."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return replace(
            self,
            manifest=self.manifest.iloc[rows].reset_index(drop=True),
            images=None if self.images is None else P.take(self.images, rows),
            features=None if self.features is None else self.features.iloc[rows].reset_index(drop=True),
        )

    def split(self, name: str) -> "Dataset":
        return self.take(self.manifest["split"].to_numpy() == name)

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"kind": self.kind, "classes": list(self.classes)}
        if self.images is not None:
            meta["image_shape"] = list(self.images.shape[1:])
        else:
            meta["feature_names"] = list(self.features.columns)
        meta.update(self.extra_meta)
        return meta


# ---------------------------------------------------------------- building blocks for sources

def image_rows(images: Any, engine: str = "local") -> pd.DataFrame:
    """Per-image hash and stats columns for N x H x W x C uint8 images (any payload)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be N x H x W x C uint8, got {images.dtype} {images.shape}")
    from pipeline.engine import map_ordered

    n, h, w, c = images.shape
    # Row blocks of 8 MB of pixels: the float64 temporary of the std is 8x a block (64 MB)
    # whatever the image size (4,096 rows were 1.5 GB at 128 px); results are per row.
    blocks = P.chunks(images, P.TASK_BYTES)
    return stats_frame(list(map_ordered(row_stats, blocks, engine)), (h, w, c))


def row_stats(block: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """sha256, mean and std of every row of one block (a pure function of the block: any
    engine may run it). numpy's float64 mean/std, as before, so the figures stay bit for bit
    those of earlier datasets: float32 or integer-sum formulas round differently."""
    flat = np.ascontiguousarray(block).reshape(len(block), -1)
    mean = flat.mean(axis=1, dtype=np.float64)
    std = flat.std(axis=1, dtype=np.float64)
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in flat], mean, std


def stats_frame(parts: list[tuple[list[str], np.ndarray, np.ndarray]], shape: tuple[int, int, int]) -> pd.DataFrame:
    """The manifest columns of ``image_rows`` from ``row_stats`` of consecutive blocks."""
    sha = [s for part in parts for s in part[0]]
    n = len(sha)
    h, w, c = shape
    return pd.DataFrame(
        {
            "sha256": sha,
            "height": np.full(n, h, dtype=np.int32),
            "width": np.full(n, w, dtype=np.int32),
            "channels": np.full(n, c, dtype=np.int32),
            "mean": np.concatenate([p[1] for p in parts]) if parts else np.zeros(0),
            "std": np.concatenate([p[2] for p in parts]) if parts else np.zeros(0),
        }
    )


def feature_rows(features: pd.DataFrame) -> pd.DataFrame:
    """Per-row hash and stats columns for a numeric feature table."""
    values = features.to_numpy(dtype=np.float64)
    return pd.DataFrame(
        {
            "sha256": [hashlib.sha256(np.ascontiguousarray(r).tobytes()).hexdigest() for r in values],
            "n_missing": np.isnan(values).sum(axis=1).astype(np.int32),
        }
    )


def build_manifest(ids: Iterable[str], labels: np.ndarray, classes: list[str],
                   splits: Iterable[str], stats: pd.DataFrame) -> pd.DataFrame:
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise FmpipeError(
            f"labels out of range: found {labels.min()}..{labels.max()}, "
            f"expected 0..{len(classes) - 1} ({len(classes)} classes)"
        )
    manifest = pd.DataFrame(
        {
            "id": pd.array(list(ids), dtype="string"),
            "split": pd.array(list(splits), dtype="string"),
            "label": labels,
            "label_name": pd.array([classes[i] for i in labels], dtype="string"),
        }
    )
    return pd.concat([manifest, stats.reset_index(drop=True)], axis=1)


# ---------------------------------------------------------------- read / write

def write_dataset(ds: Dataset, out_dir: str | os.PathLike, report: dict[str, Any]) -> None:
    """Write the dataset directory atomically (replacing any previous one only on success)."""
    with atomic_dir(out_dir) as tmp:
        save_dataset(ds, tmp, report)


def save_dataset(ds: Dataset, directory: str | os.PathLike, report: dict[str, Any]) -> None:
    """Write the dataset's files into ``directory`` (the runner's temporary output)."""
    tmp = Path(directory)
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks required columns {missing}")
    check_report(report)
    ds.manifest.to_parquet(tmp / MANIFEST, index=False)
    meta = ds.meta()
    meta["rows"] = len(ds)
    if ds.images is not None:
        # Block by block (never the whole payload in memory); shards above one shard's size.
        shards = P.write_images(ds.images, tmp)
        if shards:
            meta["shards"] = shards
        payload = P.payload_files(meta)
    else:
        payload = [FEATURES]
        ds.features.to_parquet(tmp / FEATURES, index=False)
    meta["files"] = {name: file_digest(tmp / name) for name in (MANIFEST, *payload)}
    (tmp / META).write_text(to_json(meta))
    (tmp / REPORT).write_text(to_json(report))


def read_dataset(in_dir: str | os.PathLike, mmap: bool = True, run: str = "") -> Dataset:
    """Read a dataset directory, checking that its files are whole and belong together.

    Every problem (a missing or truncated file, a payload that is not the one written with
    this manifest) is a ``FmpipeError`` naming the file, never a traceback. ``run``: the
    command that writes it (``pipeline.steps.rerun_hint``), which the messages name.
    """
    in_dir = Path(in_dir)
    meta_path = in_dir / META
    rerun = f"{run} again" if run else "run the step that wrote it again"
    if not meta_path.exists():
        raise FmpipeError(f"{in_dir}: not a dataset directory (no {META}); "
                          f"{f'{run} first' if run else 'run the previous step first'}")
    try:
        meta = json.loads(meta_path.read_text())
        kind, classes = meta["kind"], list(meta["classes"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise FmpipeError(f"{meta_path}: not a valid dataset description ({_reason(exc)}); {rerun}") from None
    try:
        payload = P.payload_files(meta)
    except (KeyError, TypeError) as exc:
        raise FmpipeError(f"{meta_path}: not a valid dataset description ({_reason(exc)}); {rerun}") from None
    for name in (MANIFEST, *payload):
        if not (in_dir / name).is_file():
            raise FmpipeError(f"{in_dir / name}: missing from the dataset directory; {rerun}")
    # Older outputs have no digests: nothing to compare, they are read as before.
    for name, expected in (meta.get("files") or {}).items():
        actual = checked_digest(in_dir / name)
        if actual != expected:
            raise FmpipeError(
                f"{in_dir / name}: does not match {META} (sha256 {actual[:12]}..., recorded "
                f"{expected[:12]}...): the file was changed or replaced after the step wrote it; {rerun}")
    try:
        manifest = pd.read_parquet(in_dir / MANIFEST)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise FmpipeError(f"{in_dir / MANIFEST}: not a readable parquet file ({_reason(exc)}); {rerun}") from None
    images = features = None
    where = in_dir / (payload[0] if len(payload) == 1 else P.SHARD_DIR)
    try:
        if kind == "image" and meta.get("shards"):
            # Shards are read by row ranges when asked (mmap=False too: it never fits memory).
            images = P.open_shards(in_dir, meta["shards"], tuple(meta["image_shape"]))
        elif kind == "image":
            images = np.load(in_dir / IMAGES, mmap_mode="r" if mmap else None, allow_pickle=False)
        else:
            features = pd.read_parquet(in_dir / FEATURES)
    except Exception as exc:
        raise FmpipeError(f"{where}: not a readable {'.npy array' if kind == 'image' else 'parquet file'} "
                          f"({_reason(exc)}); {rerun}") from None
    rows = len(images) if images is not None else len(features)
    expected_rows = meta.get("rows", len(manifest))
    if not (rows == len(manifest) == expected_rows):
        raise FmpipeError(f"{where}: has {rows} rows, {MANIFEST} has {len(manifest)} and {META} "
                          f"says {expected_rows}; they must agree row for row; {rerun}")
    extra = {k: v for k, v in meta.items() if k not in _OWN_META}
    return Dataset(manifest=manifest, classes=classes, images=images,
                   features=features, extra_meta=extra)


def check_classifiable(ds: Dataset, where: str | os.PathLike) -> None:
    """A classifier needs rows of at least two classes; one class fails later, in training,
    with a metrics library's traceback. One line naming the directory and the class found."""
    present = sorted(set(ds.manifest["label_name"].astype(str)))
    if len(present) < 2:
        found = f"only class {present[0]!r}" if present else "no rows"
        raise FmpipeError(f"{where}: {found} in {len(ds)} row(s); a classifier needs rows of at least "
                          f"2 classes (dataset.json lists {len(ds.classes)}: {', '.join(ds.classes[:10])})")


def reseal(in_dir: str | os.PathLike) -> None:
    """Record the current files' digests and row count in ``dataset.json``.

    For deliberate edits of a written dataset (tests that corrupt one on purpose, a repair by
    hand); the steps themselves never call it.
    """
    in_dir = Path(in_dir)
    meta = json.loads((in_dir / META).read_text())
    meta["rows"] = len(pd.read_parquet(in_dir / MANIFEST, columns=["id"]))
    meta["files"] = {name: file_digest(in_dir / name) for name in (MANIFEST, *P.payload_files(meta))}
    (in_dir / META).write_text(to_json(meta))


def _reason(exc: BaseException) -> str:
    """An exception as a short, single-line reason."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


def read_report(in_dir: str | os.PathLike) -> "DatasetReport":
    """A data step's ``report.json`` (``pipeline.artefacts.DatasetReport``; step-specific keys
    such as annotate's ``changes`` are in ``model_extra``), or one error line naming it."""
    from pipeline.artefacts import DatasetReport

    return DatasetReport.read(Path(in_dir) / REPORT, "re-run the step that writes it")


# ---------------------------------------------------------------- reports

def make_report(step: str, variant: str, rows_in: int, ds: Dataset,
                removed: list[dict[str, str]] | None = None, **extra: Any) -> dict[str, Any]:
    """The step's account: counts that add up, every removal with its id and reason."""
    removed = removed or []
    m = ds.manifest
    report = {
        "step": step,
        "variant": variant,
        "rows_in": int(rows_in),
        "rows_out": int(len(m)),
        "rows_removed": len(removed),
        "removed_by_reason": _count(r["reason"] for r in removed),
        "removed": removed,
        "rows_by_split": {s: int((m["split"] == s).sum()) for s in SPLITS},
        "rows_by_class": {c: int((m["label"] == i).sum()) for i, c in enumerate(ds.classes)},
    }
    report.update(extra)
    return report


def check_report(report: dict[str, Any]) -> None:
    if report["rows_in"] != report["rows_out"] + report["rows_removed"]:
        raise ValueError(
            f"report counts do not add up: {report['rows_in']} in != "
            f"{report['rows_out']} out + {report['rows_removed']} removed"
        )
    if report["rows_removed"] != len(report["removed"]):
        raise ValueError("report lists a different number of removals than it counts")


def _count(items: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts
