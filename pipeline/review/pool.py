"""The labelling pool: logged production inputs waiting for a person's label.

``fmpipe review pool --stage V LOG`` (``pipeline.monitoring.queue``) adds a request log's
inputs to ``annotations/<V>/pool/``, in git beside people's decisions, because a pooled input
becomes training data only through one of them:

- ``pool.csv``: one row per pooled input: ``id`` (``<V>/pool-<first 12 hex of the input's
  sha256>``), ``log_id`` (the request-log record it came from), ``input_sha256`` (the bytes
  the client sent), ``sha256`` (of the model-size pixels or feature values, as the dataset
  manifest hashes its rows), ``logged_at``, ``package``, ``predicted`` (the class the served
  model gave it), and for tables one column per feature;
- ``images/<hex>.png``: image inputs at the model's size, decoded by the package's rule
  (lossless PNG: the pixels the model saw).

Here, under review (decisions name its ids; ``review import`` and annotate read it), with light
imports (a code dep of annotate). Annotate adds a pooled input to
the dataset only when a decision in ``annotations/<V>/`` names it: its label is the
decision's (the served prediction stands as the label it had before, ``previous_label``), its
split is ``split.pool`` in params (``train`` unless a person says otherwise: never silently
``test``), and it carries ``origin: production`` and ``origin_id: <log id>``; every other row
gets ``origin: source``. A pooled input nobody decided about stays in the pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.errors import FmpipeError

POOL = "pool"  # annotations/<variant>/pool/
TABLE = "pool.csv"
IMAGES = "images"
BASE_COLUMNS = ("id", "log_id", "input_sha256", "sha256", "logged_at", "package", "predicted")
ORIGIN_SOURCE, ORIGIN_PRODUCTION = "source", "production"


def pool_id(variant: str, input_sha256: str) -> str:
    return f"{variant}/pool-{input_sha256[:12]}"


def image_file(pid: str) -> str:
    return f"{IMAGES}/{pid.rsplit('pool-', 1)[-1]}.png"


def read_pool(directory: str | Path) -> Optional[pd.DataFrame]:
    """``pool.csv`` (None when there is no pool); a malformed one is one error naming it."""
    path = Path(directory) / TABLE
    if not path.exists():
        return None
    try:
        table = pd.read_csv(path, dtype={c: "string" for c in BASE_COLUMNS}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise FmpipeError(f"{path}: not a readable pool table ({exc})") from None
    missing = [c for c in BASE_COLUMNS if c not in table.columns]
    if missing:
        raise FmpipeError(f"{path}: columns {', '.join(missing)} missing; expected {', '.join(BASE_COLUMNS)}")
    if table["id"].duplicated().any():
        raise FmpipeError(f"{path}: id {table['id'][table['id'].duplicated()].iloc[0]!r} appears twice")
    return table


def pool_pixels(directory: str | Path, ids: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """The pooled images of ``ids`` as N x H x W x C uint8, each checked against ``shape``."""
    from PIL import Image

    out = np.empty((len(ids), *shape), dtype=np.uint8)
    for n, pid in enumerate(ids):
        path = Path(directory) / image_file(pid)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except (OSError, ValueError) as exc:
            raise FmpipeError(f"{path}: not a readable pooled image ({exc})") from None
        arr = arr[..., None] if arr.ndim == 2 else arr
        if arr.shape != tuple(shape) or arr.dtype != np.uint8:
            raise FmpipeError(f"{path}: {arr.dtype} {list(arr.shape)}, expected uint8 {list(shape)} (the model's size)")
        out[n] = arr
    return out


def add_decided(ds, directory: str | Path, decided: set[str], split: str):
    """``ds`` plus the pooled inputs named in ``decided`` (rows appended; provenance columns
    ``origin`` / ``origin_id`` on every row); and how many were added. No pool or no pooled
    id decided: ``ds`` unchanged."""
    from dataclasses import replace

    from pipeline.manifest import feature_rows, image_rows

    table = read_pool(directory)
    if table is None:
        return ds, 0
    rows = table[table["id"].isin(decided)].sort_values("id", kind="stable").reset_index(drop=True)
    if rows.empty:
        return ds, 0
    where = Path(directory) / TABLE
    classes = list(ds.classes)
    unknown = sorted(set(rows["predicted"]) - set(classes))
    if unknown:
        raise FmpipeError(f"{where}: predicted class {unknown[0]!r} is not a class of this dataset ({classes})")
    clash = set(rows["id"]) & set(ds.manifest["id"].astype(str))
    if clash:
        raise FmpipeError(f"{where}: id {sorted(clash)[0]!r} is already a dataset row")
    labels = np.array([classes.index(c) for c in rows["predicted"]], dtype=np.int64)
    if ds.images is not None:
        payload = pool_pixels(directory, rows["id"].tolist(), tuple(ds.images.shape[1:]))
        stats = image_rows(payload)
    else:
        names = list(ds.features.columns)
        absent = [c for c in names if c not in rows.columns]
        if absent:
            raise FmpipeError(f"{where}: feature column(s) {', '.join(absent)} missing")
        try:
            payload = rows[names].astype(np.float64).reset_index(drop=True)
        except ValueError as exc:
            raise FmpipeError(f"{where}: feature values must be numbers ({exc})") from None
        stats = feature_rows(payload)
    new = pd.DataFrame({"id": rows["id"].astype(str), "split": split, "label": labels,
                        "label_name": [classes[i] for i in labels]})
    new = pd.concat([new, stats.reset_index(drop=True)], axis=1)
    manifest = ds.manifest.copy()
    manifest["origin"] = pd.array([ORIGIN_SOURCE] * len(manifest), dtype="string")
    manifest["origin_id"] = pd.array([pd.NA] * len(manifest), dtype="string")
    new["origin"] = pd.array([ORIGIN_PRODUCTION] * len(new), dtype="string")
    new["origin_id"] = pd.array(rows["log_id"].astype(str).tolist(), dtype="string")
    for col in manifest.columns:  # clean's columns the new rows lack: typed missing values
        if col not in new.columns:
            new[col] = False if manifest[col].dtype == bool else pd.NA
    merged = pd.concat([manifest, new[manifest.columns]], ignore_index=True)
    for col in manifest.columns:
        if merged[col].dtype != manifest[col].dtype:
            try:
                merged[col] = merged[col].astype(manifest[col].dtype)
            except (TypeError, ValueError):
                pass
    if ds.images is not None:
        from pipeline.payload import concat

        return replace(ds, manifest=merged, images=concat(ds.images, payload)), len(new)
    features = pd.concat([ds.features, payload[list(ds.features.columns)]], ignore_index=True)
    return replace(ds, manifest=merged, features=features), len(new)
