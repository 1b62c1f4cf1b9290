"""A CSV table: one row per example, a label column, numeric feature columns.

- ``label_column`` (default ``label``): class values; classes are the sorted unique values
  (numerically when every value is a number, so 2 < 10) or the explicit ``classes`` list.
  A row with an empty label is a recorded skip, not a guess.
- ``id_column``: stable ids; default ``row/<n>`` (the 0-based data row), which is only stable
  while rows are appended, so give an id column when the table is edited in the middle.
- ``split_column``: optional train/val/test per row (empty: let the collect step decide).
- ``features``: the feature columns, in order; default every other column. Each must be
  numeric (empty cells are missing values, counted in the manifest's ``n_missing``).
- ``text_columns``: free-text columns kept with each row (never model inputs); collect scans
  them for personal data with the ``pii`` rule and applies ``pii.policy`` (``mask`` by
  default) before writing anything (``pipeline/quality/pii.py``).
"""

from __future__ import annotations

import csv as _csv
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field

from pipeline.errors import FmpipeError
from pipeline.quality.pii import PiiSpec
from pipeline.reading import require_file
from pipeline.sources.base import Collected
from pipeline.sources.metadata import WithMetadata

if TYPE_CHECKING:  # annotations only: reading params (pipeline.config) imports every source module
    import pandas as pd

SPLITS = ("train", "val", "test")


class Spec(WithMetadata):
    kind: Literal["csv"] = "csv"
    path: str
    label_column: str = "label"
    id_column: Optional[str] = None
    split_column: Optional[str] = None
    features: Optional[list[str]] = Field(None, min_length=1)
    classes: Optional[list[str]] = Field(None, min_length=1)
    sep: str = ","
    text_columns: list[str] = Field(default_factory=list)
    pii: PiiSpec = Field(default_factory=PiiSpec)


def _column(table: pd.DataFrame, name: str, path: Path, role: str) -> pd.Series:
    if name not in table.columns:
        raise FmpipeError(f"{path}: no {role} column {name!r} (columns: {', '.join(map(str, table.columns))})")
    return table[name]


def _class_order(values: list[str]) -> list[str]:
    uniq = sorted(set(values))
    try:
        return sorted(uniq, key=float)
    except ValueError:
        return uniq


def _check_field_counts(path: Path, sep: str) -> None:
    """Every row has the header's number of fields: pandas fills a short row with empty cells,
    which would make a cut-off line an "empty label" skip or missing features, not an error."""
    if len(sep) != 1:
        return  # a regex separator: only pandas can split it
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = _csv.reader(fh, delimiter=sep)
            width = None
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line (pandas skips them too)
                if width is None:
                    width = len(row)
                elif len(row) != width:
                    raise FmpipeError(f"{path}:{reader.line_num}: {len(row)} fields, the header has {width} "
                                      f"(a cut-off or extra-separator line?)")
    except UnicodeDecodeError as exc:
        raise FmpipeError(f"{path}: not a readable CSV table (not UTF-8: {exc.reason} at byte {exc.start})") from None
    except _csv.Error as exc:
        raise FmpipeError(f"{path}: not a readable CSV table ({exc})") from None


def load(spec: Spec) -> Collected:
    import numpy as np
    import pandas as pd

    path = require_file(Path(spec.path).expanduser(), "a CSV file, for the csv source")
    _check_field_counts(path, spec.sep)
    try:
        # Everything as text first: each column is then converted with an error naming it.
        table = pd.read_csv(path, sep=spec.sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FmpipeError(f"{path}: not a readable CSV table ({type(exc).__name__}: {exc})") from None
    table.columns = [str(c).strip() for c in table.columns]

    labels_raw = _column(table, spec.label_column, path, "label").str.strip()
    ids = (_column(table, spec.id_column, path, "id").str.strip().tolist() if spec.id_column
           else [f"row/{i}" for i in range(len(table))])
    seen: set[str] = set()
    dups = [i for i in ids if i in seen or seen.add(i)]
    if dups:
        raise FmpipeError(f"{path}: column {spec.id_column!r}: duplicate ids {sorted(set(dups))[:5]}")

    reserved = {spec.label_column, spec.id_column, spec.split_column, *spec.text_columns} - {None}
    names = spec.features if spec.features is not None else [c for c in table.columns if c not in reserved]
    if not names:
        raise FmpipeError(f"{path}: no feature columns besides {sorted(reserved)}")
    features = {}
    for name in names:
        text = _column(table, name, path, "feature").str.strip()
        values = pd.to_numeric(text.replace("", np.nan), errors="coerce")
        bad = values.isna() & (text != "") & (text.str.lower() != "nan")
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise FmpipeError(
                f"{path}: column {name!r}: expected numbers, found {text.iloc[row]!r} at data row {row}"
            )
        features[name] = values.astype(np.float64)
    feats = pd.DataFrame(features)

    given = None
    if spec.split_column:
        split = _column(table, spec.split_column, path, "split").str.strip().str.lower()
        wrong = sorted(set(split) - set(SPLITS) - {""})
        if wrong:
            raise FmpipeError(f"{path}: column {spec.split_column!r}: values {wrong} are not train/val/test")
        given = [s or None for s in split]

    has_label = (labels_raw != "").to_numpy()
    skipped = [{"id": ids[i], "reason": f"empty label (column {spec.label_column!r})"}
               for i in np.flatnonzero(~has_label)]
    values = labels_raw[has_label].tolist()
    if spec.classes is not None:
        unknown = sorted(set(values) - set(spec.classes))
        if unknown:
            raise FmpipeError(f"{path}: column {spec.label_column!r}: values {unknown} are not in classes {spec.classes}")
        classes = list(spec.classes)
    else:
        classes = _class_order(values)
    if not classes:
        raise FmpipeError(f"{path}: column {spec.label_column!r}: no labelled rows")
    index = {c: i for i, c in enumerate(classes)}

    keep = np.flatnonzero(has_label)
    text = None
    if spec.text_columns:
        text = pd.DataFrame({name: _column(table, name, path, "text").to_numpy() for name in spec.text_columns})
        text = text.iloc[keep].reset_index(drop=True)
    return Collected(
        ids=[ids[i] for i in keep],
        labels=np.array([index[v] for v in values], dtype=np.int64),
        classes=classes,
        features=feats.iloc[keep].reset_index(drop=True),
        given_split=None if given is None else [given[i] for i in keep],
        skipped=skipped,
        text=text,
        info={"source": "csv", "path": str(spec.path), "feature_columns": list(names)},
    )
