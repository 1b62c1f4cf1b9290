"""A variant's metadata table: facts about each example that are not model inputs (a person's
group, the site or camera that took an image), joined into the manifest by collect so that
evaluate can score the model per value (``pipeline/evaluation/slices.py``).

``source.metadata: {path: sources/<v>/metadata.csv}`` names a CSV or parquet file with one row
per example, keyed by the example ``id`` (the column named by ``key``). Its columns travel in
the manifest as ``meta:<column>`` (``pipeline.manifest.META_PREFIX``); an example without a row
gets a missing value (counted in collect's report). Under ``dvc repro`` the file must lie
inside ``sources/<v>`` (the path dvc.yaml hashes for collect), like a local source: an edit then
re-runs collect and everything downstream, so the table is versioned with the data it describes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pydantic import Field

from pipeline.errors import FmpipeError
from pipeline.reading import require_file
from pipeline.schema import Strict

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd



class MetadataSpec(Strict):
    path: str  # .csv or .parquet; relative paths are relative to the project root
    key: str = "id"  # the column holding the example id
    columns: Optional[list[str]] = Field(None, min_length=1)  # joined columns (default: all but key)


class WithMetadata(Strict):
    """Base of every source's ``Spec``: any source may name a metadata table."""

    # Left out of dumps when unset, so lineage and model cards of variants without one stay as they were.
    metadata: Optional[MetadataSpec] = Field(None, exclude_if=lambda v: v is None)


def read_table(spec: MetadataSpec, where: str) -> "pd.DataFrame":
    """The metadata table, its key as strings, checked: one row per id, named columns present."""
    import pandas as pd

    path = require_file(Path(spec.path).expanduser(), f"a metadata table ({where}.path)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype={spec.key: "string"})
        else:
            raise FmpipeError(f"{path}: expected a .csv, .tsv or .parquet metadata table ({where}.path)")
    except FmpipeError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for a damaged file
        raise FmpipeError(f"{path}: not a readable metadata table ({type(exc).__name__}: {exc})") from None
    if spec.key not in table.columns:
        raise FmpipeError(f"{path}: no key column {spec.key!r} ({where}.key); columns: {', '.join(map(str, table.columns))}")
    keys = table[spec.key].astype("string")
    if keys.isna().any():
        raise FmpipeError(f"{path}: {int(keys.isna().sum())} rows have no {spec.key!r}")
    dup = keys[keys.duplicated()]
    if len(dup):
        raise FmpipeError(f"{path}: id {dup.iloc[0]!r} appears more than once ({len(dup)} duplicates); "
                          f"expected one row per example")
    wanted = spec.columns or [str(c) for c in table.columns if c != spec.key]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise FmpipeError(f"{path}: no column {missing[0]!r} ({where}.columns); "
                          f"columns: {', '.join(map(str, table.columns))}")
    if not wanted:
        raise FmpipeError(f"{path}: no column besides the key {spec.key!r}; nothing to join")
    out = table[wanted].copy()
    out.index = pd.Index(keys.to_numpy(), name="id")
    return out


def join(ids: list[str], spec: MetadataSpec, where: str) -> tuple["pd.DataFrame", dict[str, Any]]:
    """Row-aligned ``meta:<column>`` columns for ``ids`` and the facts collect reports."""
    from pipeline.manifest import META_PREFIX as PREFIX  # numpy and pandas: not at params load

    table = read_table(spec, where)
    aligned = table.reindex(ids)
    columns = {}
    for name in aligned.columns:
        col = aligned[name]
        # Numbers stay numbers (evaluate bins them); anything else is a category, as text.
        columns[PREFIX + str(name)] = col.to_numpy() if col.dtype.kind in "biuf" else col.astype("string").to_numpy()
    import pandas as pd

    facts = {"path": spec.path, "columns": [str(c) for c in table.columns],
             "rows_matched": int(table.index.isin(ids).sum()),
             "rows_without_metadata": int(len(ids) - aligned.notna().any(axis=1).sum()),
             "unknown_ids": int((~table.index.isin(ids)).sum())}
    return pd.DataFrame(columns), facts


