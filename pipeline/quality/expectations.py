"""The Great Expectations (1.x) suites that gate a cleaned dataset, and running them.

Three tables are validated, each with its own suite:

- ``manifest``: the dataset contract (schema, row count, label/split/id/hash columns, and for
  images the per-image shape and pixel stats);
- ``features`` (tabular datasets only): every feature column numeric, non-null and finite;
- ``class_counts``: a small table derived from the manifest, one row per class of
  ``dataset.json`` (absent classes included, with 0 rows), so that "every class has enough
  rows" and "no class dominates" are ordinary GX column expectations with the offending
  class named in the result.

Everything runs in an in-memory (ephemeral) GX context: nothing is written to the working
directory except the Data Docs site, which is rendered into a directory the caller chooses.
``great_expectations`` takes seconds to import, so it is imported inside the functions that
need it, never at module import.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import ValidateSpec
from pipeline.manifest import REQUIRED_COLUMNS, SPLITS, Dataset

# Splits that must hold at least one row: a model needs something to train on and to be
# scored on. ``val`` may legitimately be empty (val_fraction: 0).
REQUIRED_SPLITS = ("train", "test")
IMAGE_STAT_COLUMNS = ("height", "width", "channels", "mean", "std")
SHA256_HEX = r"^[0-9a-f]{64}$"
# Numeric dtypes a feature column may have (pandas dtype names, numpy and nullable variants).
NUMERIC_DTYPES = [
    "float64", "float32", "float16", "Float64", "Float32",
    "int64", "int32", "int16", "int8", "Int64", "Int32", "Int16", "Int8",
    "uint64", "uint32", "uint16", "uint8", "UInt64", "UInt32", "UInt16", "UInt8",
]
# How many offending values / row ids each failed expectation reports.
PARTIAL_UNEXPECTED_COUNT = 10
DOCS_SITE = "fmpipe"


@dataclass
class TableCheck:
    """One table and the expectations it must meet; becomes one GX suite and one result."""

    table: str
    frame: pd.DataFrame
    expectations: list[Any]  # great_expectations.expectations.Expectation instances
    # Column(s) that identify an offending row in the results (GX reports their values).
    id_columns: tuple[str, ...] = ()


@dataclass
class Outcome:
    """Results of one validation run: GX's JSON per table, plus a plain summary of failures."""

    success: bool
    results: dict[str, dict[str, Any]]  # table -> ExpectationSuiteValidationResult JSON
    expectations: int
    failed: list[dict[str, Any]]
    # table -> GX's run identity (validation id, run time, load time): differs on every run,
    # so it is kept apart from ``results`` (a hashed DVC output) for the uncached run record.
    run_ids: dict[str, dict[str, Any]] = field(default_factory=dict)


# ---------------------------------------------------------------- building the suites

def build_checks(ds: Dataset, spec: ValidateSpec) -> list[TableCheck]:
    """The tables to validate and their expectations, from the variant's thresholds."""
    checks = [TableCheck("manifest", ds.manifest, manifest_expectations(ds, spec),
                         id_columns=("id",) if "id" in ds.manifest.columns else ())]
    if ds.features is not None:
        checks.append(TableCheck("features", ds.features, feature_expectations(ds.features)))
    checks.append(TableCheck("class_counts", class_count_table(ds), class_count_expectations(spec),
                             id_columns=("label_name",)))
    return checks


def manifest_expectations(ds: Dataset, spec: ValidateSpec) -> list[Any]:
    import great_expectations.expectations as gxe

    classes = list(ds.classes)
    kind_columns = IMAGE_STAT_COLUMNS if ds.kind == "image" else ("n_missing",)
    expectations: list[Any] = [gxe.ExpectColumnToExist(column=c) for c in (*REQUIRED_COLUMNS, *kind_columns)]
    expectations += [
        gxe.ExpectTableRowCountToBeBetween(min_value=spec.min_rows, max_value=spec.max_rows),
        # In-set / regex / between expectations skip nulls, so nulls are checked on their own.
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_COLUMNS),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        # clean drops exact duplicates, so a repeated hash here means clean was skipped or broken.
        gxe.ExpectColumnValuesToBeUnique(column="sha256"),
        gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=SHA256_HEX),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(len(classes)))),
        gxe.ExpectColumnValuesToBeInSet(column="label_name", value_set=classes),
        # label and label_name must agree: label_name == classes[label].
        gxe.ExpectColumnPairValuesToBeInSet(column_A="label", column_B="label_name",
                                            value_pairs_set=[(i, name) for i, name in enumerate(classes)]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        # Containing train and test among the distinct values == neither split is empty.
        gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=list(REQUIRED_SPLITS)),
    ]
    if ds.kind == "image":
        height, width, channels = (int(x) for x in ds.images.shape[1:])
        expectations += [
            gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[height]),
            gxe.ExpectColumnValuesToBeInSet(column="width", value_set=[width]),
            gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[channels]),
            gxe.ExpectColumnValuesToBeBetween(column="mean", min_value=0, max_value=255),
            # The standard deviation of values in 0..255 is at most half the range.
            gxe.ExpectColumnValuesToBeBetween(column="std", min_value=0, max_value=127.5),
        ]
    return expectations


def feature_expectations(features: pd.DataFrame) -> list[Any]:
    import great_expectations.expectations as gxe

    expectations: list[Any] = []
    for column in features.columns:
        expectations += [
            gxe.ExpectColumnValuesToBeInTypeList(column=column, type_list=NUMERIC_DTYPES),
            gxe.ExpectColumnValuesToNotBeNull(column=column),
            # Within the float64 range == finite: +-inf fall outside (NaN is the null check's).
            gxe.ExpectColumnValuesToBeBetween(column=column, min_value=-sys.float_info.max,
                                              max_value=sys.float_info.max),
        ]
    return expectations


def class_count_table(ds: Dataset) -> pd.DataFrame:
    """One row per class of dataset.json: its row count and share of all rows.

    Classes with no rows are kept (count 0) so a vanished class fails ``min_rows_per_class``;
    labels outside the class list are not counted here, the manifest suite reports them.
    """
    counts = ds.manifest["label"].value_counts() if "label" in ds.manifest.columns else pd.Series(dtype=int)
    rows = [int(counts.get(i, 0)) for i in range(len(ds.classes))]
    total = max(len(ds.manifest), 1)
    return pd.DataFrame({
        "label": range(len(ds.classes)),
        "label_name": pd.array(ds.classes, dtype="string"),
        "rows": rows,
        "fraction": [r / total for r in rows],
    })


def class_count_expectations(spec: ValidateSpec) -> list[Any]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=spec.min_rows_per_class),
        # A class holding most rows usually means a collapsed or mis-mapped label column.
        gxe.ExpectColumnValuesToBeBetween(column="fraction", min_value=0, max_value=spec.max_class_fraction),
    ]


# ---------------------------------------------------------------- running them

def run_checks(checks: list[TableCheck], suite_prefix: str, docs_dir: str | os.PathLike) -> Outcome:
    """Validate every table with GX and render the Data Docs site into ``docs_dir``."""
    context = _ephemeral_context(Path(docs_dir).resolve())
    import great_expectations as gx

    source = context.data_sources.add_pandas("fmpipe")
    results: dict[str, dict[str, Any]] = {}
    run_ids: dict[str, dict[str, Any]] = {}
    failed: list[dict[str, Any]] = []
    total = 0
    for check in checks:
        name = f"{suite_prefix}.{check.table}"
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in check.expectations:
            suite.add_expectation(expectation)
        batch = source.add_dataframe_asset(check.table).add_batch_definition_whole_dataframe("all_rows")
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result_format: dict[str, Any] = {"result_format": "SUMMARY",
                                         "partial_unexpected_count": PARTIAL_UNEXPECTED_COUNT}
        if check.id_columns:
            result_format["unexpected_index_column_names"] = list(check.id_columns)
        # ValidationDefinition.run also stores the result in the context, where the docs builder finds it.
        result = definition.run(batch_parameters={"dataframe": check.frame}, result_format=result_format)
        as_json, run_ids[check.table] = split_run_identity(json_safe(result.to_json_dict()))
        results[check.table] = as_json
        total += len(as_json["results"])
        failed += [_describe(check, r) for r in as_json["results"] if not r["success"]]
    context.build_data_docs(site_names=[DOCS_SITE])
    _drop_unreferenced_images(Path(docs_dir))
    return Outcome(success=not failed, results=results, expectations=total, failed=failed, run_ids=run_ids)


# Keys of a GX validation result that name the run rather than the data: random ids and clock times.
_RUN_META_KEYS = ("validation_id", "run_id", "validation_time", "checkpoint_id")


def split_run_identity(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(result without run-varying fields, those fields)`` for one GX result's JSON.

    Same data + same suite -> the same first part, byte for byte, so it can be a hashed output;
    expectation ids (fresh UUIDs per in-memory suite) are dropped, run ids and times returned.
    """
    result = dict(result)
    run: dict[str, Any] = {}
    if "id" in result:
        run["result_id"] = result.pop("id")
    meta = dict(result.get("meta") or {})
    for key in _RUN_META_KEYS:
        if key in meta:
            run[key] = meta.pop(key)
    markers = dict(meta.get("batch_markers") or {})
    if "ge_load_time" in markers:
        run["ge_load_time"] = markers.pop("ge_load_time")
        meta["batch_markers"] = markers
    result["meta"] = meta
    stable = []
    for r in result.get("results") or []:
        config = dict(r.get("expectation_config") or {})
        config.pop("id", None)
        stable.append({**r, "expectation_config": config})
    result["results"] = stable
    return result, run


def _ephemeral_context(docs_dir: Path):
    """An in-memory GX context whose only on-disk output is the Data Docs site at ``docs_dir``."""
    # Offline and quiet: no usage statistics, no tqdm bars, GX's INFO chatter off.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _drop_unreferenced_images(docs_dir: Path) -> None:
    """GX copies ~3.5 MB of tutorial GIFs into every site; keep only images a page uses.

    Every data/<variant>/validate/ output lands in the DVC cache, so dead weight there adds up.
    """
    images = docs_dir / "static" / "images"
    if not images.is_dir():
        return
    pages = "".join(p.read_text(errors="ignore") for p in docs_dir.rglob("*") if p.suffix in (".html", ".css"))
    for image in images.iterdir():
        if image.is_file() and image.name not in pages:
            image.unlink()


# ---------------------------------------------------------------- reporting failures

def _describe(check: TableCheck, result: dict[str, Any]) -> dict[str, Any]:
    """A failed expectation as one plain record: what was expected, on what, what was seen."""
    config = result["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    column = kwargs.get("column")
    if column is None and "column_A" in kwargs:
        column = f"{kwargs['column_A']},{kwargs['column_B']}"
    if config["type"] == "expect_column_to_exist":
        # GX reports nothing for a missing column; the columns that are there say more.
        observed: Any = {"columns_present": [str(c) for c in check.frame.columns]}
    else:
        observed = _observed(result, check.id_columns)
    return {"table": check.table, "expectation": config["type"], "column": column, "kwargs": kwargs,
            "observed": observed}


def _observed(result: dict[str, Any], id_columns: tuple[str, ...]) -> Any:
    exception = result.get("exception_info") or {}
    # GX reports an expectation it could not evaluate (e.g. a missing column) as an exception.
    if exception.get("raised_exception"):
        return {"error": _first_line(exception.get("exception_message"))}
    for info in exception.values():
        if isinstance(info, dict) and info.get("raised_exception"):
            return {"error": _first_line(info.get("exception_message"))}
    outcome = result.get("result") or {}
    if "unexpected_count" in outcome:
        observed = {"unexpected_count": outcome["unexpected_count"],
                    "unexpected_percent": outcome.get("unexpected_percent"),
                    "unexpected_values": outcome.get("partial_unexpected_list", [])}
        # GX lists each offending row as {tested column: value, id column: value}; keep the ids.
        rows = outcome.get("partial_unexpected_index_list") or []
        if id_columns and rows:
            observed["offending_rows"] = {c: [row.get(c) for row in rows if isinstance(row, dict)]
                                          for c in id_columns}
        return observed
    if "observed_value" in outcome:
        observed = outcome["observed_value"]
        if outcome.get("partial_missing_list"):  # distinct values lacking part of a required set
            return {"missing": outcome["partial_missing_list"]}
        return observed
    return outcome


def failure_line(failure: dict[str, Any]) -> str:
    """One human line per failed expectation: table, type, column, observed value."""
    where = f"column {failure['column']}" if failure["column"] else "table"
    observed = failure["observed"]
    if isinstance(observed, dict) and "error" in observed:
        seen = f"could not be evaluated: {observed['error']}"
    elif isinstance(observed, dict) and "unexpected_count" in observed:
        percent = observed.get("unexpected_percent") or 0.0
        seen = (f"{observed['unexpected_count']} unexpected value(s) ({percent:.2f}%), "
                f"e.g. {_short(observed['unexpected_values'])}")
        for id_column, ids in observed.get("offending_rows", {}).items():
            seen += f" at {id_column} {_short(ids)}"
    elif isinstance(observed, dict):
        seen = "observed " + ", ".join(f"{k}={_short(v)}" for k, v in observed.items())
    else:
        seen = f"observed {_short(observed)}"
    expected = ", ".join(f"{k}={_short(v)}" for k, v in failure["kwargs"].items()
                         if k not in ("column", "column_A", "column_B"))
    expected = f" ({expected})" if expected else ""
    return f"{failure['table']}: {failure['expectation']} on {where}{expected}: {seen}"


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(message: Any) -> str:
    text = str(message or "unknown error").strip()
    return re.sub(r"\s+", " ", text.splitlines()[0] if text else text)


def json_safe(value: Any) -> Any:
    """GX's result JSON may hold inf/NaN (e.g. an infinite feature value): make it strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
