"""The curated Great Expectations (1.x) suite of a variant: create it, load it, run it.

Each variant has one suite, ``expectations/<variant>.json``, in GX's own serialisation (an
``ExpectationSuite`` as JSON: ``name``, ``expectations`` with ``type``, ``kwargs``, ``meta``
and GX's native ``severity``: critical, warning or info). ``fmpipe validate --stage NAME
--init`` writes a starting suite from the current cleaned data and params; people then edit
it (bounds, severities, new expectations) and commit it; it is a dvc.yaml dep of validate.

The suite validates one table: the cleaned manifest, with the feature columns beside it for
tables. Rows per split and per class are ``expect_table_row_count_to_be_between`` with a GX
``row_condition`` (``split=="test"``, ``label==3``), so a failure names the split or class.
Bounds that params own are GX expectation parameters (``{"$PARAMETER": "min_rows"}``),
filled from the variant's ``validate`` section at run time (:func:`suite_parameters`), so
changing params.yaml still moves them; bounds measured at ``--init`` are literal numbers.

Severity decides what stops the pipeline: a failed ``critical`` expectation (or one GX could
not evaluate) fails the step; ``warning`` and ``info`` failures are recorded in summary.json
and printed, and the pipeline goes on.

Everything runs in an in-memory (ephemeral) GX context: the only files written are the
Data Docs site and the results. ``great_expectations`` takes seconds to import, so it is
imported inside the functions that need it, never at module import.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import FmpipeError
from pipeline.manifest import REQUIRED_COLUMNS, Dataset
from pipeline.reading import short_repr
from pipeline.steps import SUITE, at, output, rerun_hint

REQUIRED_SPLITS = ("train", "test")
SPLITS_ALL = ("train", "val", "test")
IMAGE_STAT_COLUMNS = ("height", "width", "channels", "mean", "std")
SHA256_HEX = r"^[0-9a-f]{64}$"
NUMERIC_DTYPES = [
    "float64", "float32", "float16", "Float64", "Float32",
    "int64", "int32", "int16", "int8", "Int64", "Int32", "Int16", "Int8",
    "uint64", "uint32", "uint16", "uint8", "UInt64", "UInt32", "UInt16", "UInt8",
]
SEVERITIES = ("critical", "warning", "info")
PARTIAL_UNEXPECTED_COUNT = 10
DOCS_SITE = "fmpipe"
# --init: how far rows per split and pixel statistics may drift from today's before warning.
SPLIT_ROWS_TOLERANCE = 0.05
PIXEL_STAT_TOLERANCE = 5.0
# Kwargs that name columns of the validated table (checked before GX runs).
_COLUMN_KWARGS = ("column", "column_A", "column_B")


def suite_path(variant: str) -> Path:
    return at(SUITE, variant)


def validation_table(ds: Dataset) -> pd.DataFrame:
    """The one table a variant's suite validates: the manifest (+ feature columns)."""
    if ds.features is None:
        return ds.manifest
    clash = set(ds.features.columns) & set(ds.manifest.columns)
    if clash:
        raise FmpipeError(f"feature columns {sorted(clash)} clash with manifest columns; rename them in the source")
    return pd.concat([ds.manifest.reset_index(drop=True), ds.features.reset_index(drop=True)], axis=1)


def suite_parameters(ds: Dataset, spec) -> dict[str, Any]:
    """Values for the suite's ``$PARAMETER`` references, from params (validate section)."""
    n = len(ds.manifest)
    return {
        "min_rows": spec.min_rows,
        "max_rows": spec.max_rows,
        "min_rows_per_class": spec.min_rows_per_class,
        # A class holding most rows usually means a collapsed or mis-mapped label column.
        "max_rows_per_class": int(math.floor(spec.max_class_fraction * n + 1e-9)),
    }


# ---------------------------------------------------------------- --init: a starting suite

def _e(cls, severity: str, covers: str, **kwargs):
    return cls(severity=severity, meta={"covers": covers}, **kwargs)


def initial_expectations(ds: Dataset) -> list[Any]:
    """The starting suite for ``ds``: contract, sizes, labels, balance, images/features, leakage."""
    import great_expectations.expectations as gxe

    m = ds.manifest
    classes = list(ds.classes)
    P = lambda name: {"$PARAMETER": name}  # noqa: E731
    kind_columns = IMAGE_STAT_COLUMNS if ds.kind == "image" else ("n_missing",)
    columns = [*REQUIRED_COLUMNS, *kind_columns] + (["leaked"] if "leaked" in m.columns else [])
    out: list[Any] = [_e(gxe.ExpectColumnToExist, "critical", "contract", column=c) for c in columns]
    out += [
        _e(gxe.ExpectColumnValuesToNotBeNull, "critical", "contract", column=c) for c in REQUIRED_COLUMNS
    ]
    out += [
        _e(gxe.ExpectColumnValuesToBeInTypeList, "critical", "contract: types", column="label",
           type_list=["int64", "int32", "Int64", "Int32"]),
        _e(gxe.ExpectColumnValuesToBeUnique, "critical", "contract: unique ids", column="id"),
        # clean drops exact duplicates: a repeated hash means clean was skipped or broken.
        _e(gxe.ExpectColumnValuesToBeUnique, "critical", "contract: unique hashes", column="sha256"),
        _e(gxe.ExpectColumnValuesToMatchRegex, "critical", "contract: hashes", column="sha256", regex=SHA256_HEX),
        _e(gxe.ExpectTableRowCountToBeBetween, "critical", "rows", min_value=P("min_rows"), max_value=P("max_rows")),
        _e(gxe.ExpectColumnValuesToBeInSet, "critical", "label set", column="label", value_set=list(range(len(classes)))),
        _e(gxe.ExpectColumnValuesToBeInSet, "critical", "label set", column="label_name", value_set=classes),
        _e(gxe.ExpectColumnPairValuesToBeInSet, "critical", "label set: label_name == classes[label]",
           column_A="label", column_B="label_name", value_pairs_set=[[i, c] for i, c in enumerate(classes)]),
        _e(gxe.ExpectColumnValuesToBeInSet, "critical", "splits", column="split", value_set=list(SPLITS_ALL)),
        _e(gxe.ExpectColumnDistinctValuesToContainSet, "critical", "splits: train and test not empty",
           column="split", value_set=list(REQUIRED_SPLITS)),
    ]
    for split in SPLITS_ALL:
        rows = int((m["split"] == split).sum())
        if rows == 0:
            continue
        out.append(_e(gxe.ExpectTableRowCountToBeBetween, "warning", f"rows per split: {split}",
                      min_value=int(math.floor(rows * (1 - SPLIT_ROWS_TOLERANCE))),
                      max_value=int(math.ceil(rows * (1 + SPLIT_ROWS_TOLERANCE))),
                      row_condition=f'split=="{split}"', condition_parser="pandas"))
    for i, name in enumerate(classes):
        out.append(_e(gxe.ExpectTableRowCountToBeBetween, "critical", f"class balance: {name}",
                      min_value=P("min_rows_per_class"), max_value=P("max_rows_per_class"),
                      row_condition=f"label=={i}", condition_parser="pandas"))
    if ds.kind == "image":
        h, w, c = (int(x) for x in ds.images.shape[1:])
        mean_of_means = float(m["mean"].mean())
        mean_of_stds = float(m["std"].mean())
        out += [
            _e(gxe.ExpectColumnValuesToBeInSet, "critical", "image shape", column="height", value_set=[h]),
            _e(gxe.ExpectColumnValuesToBeInSet, "critical", "image shape", column="width", value_set=[w]),
            _e(gxe.ExpectColumnValuesToBeInSet, "critical", "image shape", column="channels", value_set=[c]),
            _e(gxe.ExpectColumnValuesToBeBetween, "critical", "pixel range", column="mean", min_value=0, max_value=255),
            # The standard deviation of values in 0..255 is at most half the range.
            _e(gxe.ExpectColumnValuesToBeBetween, "critical", "pixel range", column="std", min_value=0, max_value=127.5),
            _e(gxe.ExpectColumnMeanToBeBetween, "warning", "pixel mean range", column="mean",
               min_value=round(mean_of_means - PIXEL_STAT_TOLERANCE, 2), max_value=round(mean_of_means + PIXEL_STAT_TOLERANCE, 2)),
            _e(gxe.ExpectColumnMeanToBeBetween, "warning", "pixel std range", column="std",
               min_value=round(max(mean_of_stds - PIXEL_STAT_TOLERANCE, 0), 2), max_value=round(mean_of_stds + PIXEL_STAT_TOLERANCE, 2)),
            # Blank images have (almost) no spread; clean drops or flags them.
            _e(gxe.ExpectColumnValuesToBeBetween, "info", "image health: not blank", column="std", min_value=2.0),
        ]
    else:
        for column in ds.features.columns:
            out += [
                _e(gxe.ExpectColumnToExist, "critical", "contract: features", column=column),
                _e(gxe.ExpectColumnValuesToBeInTypeList, "critical", "contract: feature types", column=column,
                   type_list=NUMERIC_DTYPES),
                _e(gxe.ExpectColumnValuesToNotBeNull, "critical", "features: no NaN", column=column),
                # Within the float64 range == finite: +-inf fall outside (NaN is the null check's).
                _e(gxe.ExpectColumnValuesToBeBetween, "critical", "features: finite", column=column,
                   min_value=-1.7976931348623157e308, max_value=1.7976931348623157e308),
                # A constant column carries nothing (clean flags it; info only).
                _e(gxe.ExpectColumnStdevToBeBetween, "info", "table health: not constant", column=column,
                   min_value=0, strict_min=True),
            ]
    if "leaked" in m.columns:
        # clean marks rows that still have a copy in another split (leakage flagged, not dropped).
        out.append(_e(gxe.ExpectColumnValuesToBeInSet, "critical", "no leakage left after cleaning",
                      column="leaked", value_set=[False]))
    return out


def init_suite(ds: Dataset, variant: str) -> dict[str, Any]:
    """The starting suite as GX's JSON (ids stripped, so regenerating gives the same file)."""
    _ephemeral_context(None)
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=variant, expectations=initial_expectations(ds),
                                meta={"fmpipe": {
                                    "created_by": f"fmpipe validate --stage {variant} --init",
                                    "edit": "bounds, severities (critical stops the pipeline; warning/info are "
                                            "recorded) and expectations are yours to change; "
                                            "$PARAMETER values come from params.yaml (validate section)",
                                }})
    data = json_safe(suite.to_json_dict())
    data.pop("id", None)
    for e in data["expectations"]:
        e.pop("id", None)
    data.get("meta", {}).pop("great_expectations_version", None)
    return data


def write_suite(data: dict[str, Any], path: Path) -> None:
    from pipeline.io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def init_command(variant: str, force: bool = False) -> dict[str, Any]:
    """``fmpipe validate --stage V --init``: write expectations/V.json from data/V/clean.

    The caller has checked that ``variant`` is one (the CLI loads its params first).
    """
    import sys

    from pipeline.manifest import read_dataset

    path = suite_path(variant)
    if path.exists() and not force:
        raise FmpipeError(f"{path}: exists (people curate it); pass --force to overwrite it with a fresh suite")
    source = output("clean", variant)
    data = init_suite(read_dataset(source, run=rerun_hint("clean", variant, then="")), variant)
    write_suite(data, path)
    print(f"validate {variant}: wrote {path} ({len(data['expectations'])} expectations from {source} "
          f"and params); review it, then commit it", file=sys.stderr)
    return data


# ---------------------------------------------------------------- loading a suite

def load_suite(path: Path, table: pd.DataFrame):
    """The suite at ``path`` as a GX ExpectationSuite; bad JSON, unknown expectations, bad
    arguments and columns the table lacks are one clear error naming the file and the entry.

    Each entry is built here, one by one: GX's own ``ExpectationSuite(expectations=[...])``
    logs an entry it cannot build and drops it, and the gate would then pass a suite with a
    check missing.
    """
    from pipeline.reading import loads_json, path_kind, read_text

    if path_kind(path) == "not found":
        variant = Path(path).stem
        raise FmpipeError(f"{path}: not found; write a starting suite with "
                          f"`fmpipe validate --stage {variant} --init`, review it and commit it")
    raw = loads_json(read_text(path, "a GX expectation suite, JSON"), str(path))
    if not isinstance(raw, dict) or not isinstance(raw.get("expectations"), list):
        raise FmpipeError(f"{path}: expected a GX ExpectationSuite (an object with an 'expectations' list)")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise FmpipeError(f"{path}: 'name' must be a non-empty string (the suite's name)")
    present = set(map(str, table.columns))
    for n, e in enumerate(raw["expectations"]):
        if not isinstance(e, dict) or "type" not in e:
            raise FmpipeError(f"{path}: expectations[{n}] has no 'type'")
        if not isinstance(e["type"], str):
            raise FmpipeError(f"{path}: expectations[{n}]: 'type' must be a string (an expectation "
                              f"name such as expect_column_values_to_not_be_null), got {type(e['type']).__name__}")
        unknown = sorted(set(map(str, e)) - set(_ENTRY_KEYS))
        if unknown:
            raise FmpipeError(f"{path}: expectations[{n}] ({e['type']}): unknown key(s) {', '.join(unknown)} "
                              f"(expected {', '.join(_ENTRY_KEYS)})")
        if not isinstance(e.get("kwargs", {}), dict):
            raise FmpipeError(f"{path}: expectations[{n}] ({e['type']}): 'kwargs' must be an object of "
                              f"arguments, got {type(e['kwargs']).__name__}")
        if not isinstance(e.get("meta") or {}, dict):
            raise FmpipeError(f"{path}: expectations[{n}] ({e['type']}): 'meta' must be an object, "
                              f"got {type(e['meta']).__name__}")
        if e.get("severity", "critical") not in SEVERITIES:
            raise FmpipeError(f"{path}: expectations[{n}] ({e['type']}): severity {short_repr(e.get('severity'), 40)} "
                              f"is not one of {', '.join(SEVERITIES)}")
        if e["type"] == "expect_column_to_exist":
            continue  # a missing column is then the data's failure, reported as such
        kwargs = e.get("kwargs") or {}
        for key in _COLUMN_KWARGS:
            if key in kwargs and str(kwargs[key]) not in present:
                raise FmpipeError(f"{path}: expectations[{n}] ({e['type']}) names column {short_repr(kwargs[key], 60)}, "
                                  f"which the data does not have (columns: {', '.join(sorted(present))})")
        for column in kwargs.get("column_list") or []:
            if str(column) not in present:
                raise FmpipeError(f"{path}: expectations[{n}] ({e['type']}) names column {short_repr(column, 60)}, "
                                  f"which the data does not have")
    _ephemeral_context(None)
    import great_expectations as gx

    built = [_build_expectation(path, n, e) for n, e in enumerate(raw["expectations"])]
    try:
        suite = gx.ExpectationSuite(name=raw["name"], expectations=built, meta=raw.get("meta"),
                                    notes=raw.get("notes"))
    except Exception as exc:  # GX raises many types for a bad suite-level field
        raise FmpipeError(f"{path}: not a valid GX suite: {_first_line(exc)}") from None
    if len(suite.expectations) != len(raw["expectations"]):  # never validate with a check missing
        raise FmpipeError(f"{path}: GX built {len(suite.expectations)} of the suite's "
                          f"{len(raw['expectations'])} expectations")
    return suite


# Keys of one suite entry, as GX serialises an expectation.
_ENTRY_KEYS = ("type", "kwargs", "meta", "severity", "notes", "description", "id", "rendered_content")


def _build_expectation(path: Path, n: int, entry: dict[str, Any]):
    """One suite entry as a GX Expectation, or one line naming its index, key and reason."""
    import great_expectations.exceptions as gx_exceptions
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    where = f"{path}: expectations[{n}] ({entry['type']})"
    config = {k: v for k, v in entry.items() if k not in ("id", "rendered_content")}
    try:
        return ExpectationConfiguration(**config).to_domain_obj()
    except gx_exceptions.ExpectationNotFoundError:
        import difflib

        from great_expectations.expectations.registry import list_registered_expectation_implementations

        close = difflib.get_close_matches(entry["type"], list_registered_expectation_implementations(), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise FmpipeError(f"{path}: expectations[{n}]: unknown expectation type "
                          f"{short_repr(entry['type'], 60)}{hint}") from None
    except gx_exceptions.GreatExpectationsError as exc:
        raise FmpipeError(f"{where}: {_first_line(getattr(exc, 'message', exc))}") from None
    except ValueError as exc:  # pydantic's ValidationError (v1 or v2) is a ValueError
        raise FmpipeError(f"{where}: {_argument_errors(exc, entry.get('kwargs') or {})}") from None
    except TypeError as exc:
        raise FmpipeError(f"{where}: {_first_line(exc)}") from None


def _argument_errors(exc: ValueError, kwargs: dict[str, Any]) -> str:
    """pydantic's errors as ``kwargs.KEY: reason (got VALUE)``, one per key: a union-typed
    argument (a number, a date or a $PARAMETER) gives one error per member, the first says it."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return _first_line(exc)
    seen: dict[str, str] = {}
    for err in errors():
        loc = [str(p) for p in err.get("loc", ())]
        key = loc[0] if loc else "__root__"
        if key in seen:
            continue
        if key == "__root__":
            seen[key] = err.get("msg", "")
        elif err.get("type") in ("value_error.missing", "missing"):
            seen[key] = f"kwargs.{key}: required argument is missing"
        elif err.get("type") in ("value_error.extra", "extra_forbidden"):
            seen[key] = f"kwargs.{key}: not an argument of this expectation"
        else:
            got = f" (got {short_repr(kwargs[key], 40)})" if key in kwargs else ""
            seen[key] = f"kwargs.{key}: {err.get('msg', '')}{got}"
    # Argument errors first: a cross-argument check (__root__) often only follows from them.
    lines = [v for k, v in seen.items() if k != "__root__"] or [seen.get("__root__", _first_line(exc))]
    return "; ".join(lines)


# ---------------------------------------------------------------- running it

@dataclass
class Outcome:
    success: bool  # no critical failure
    results: dict[str, Any]  # GX's ExpectationSuiteValidationResult JSON
    expectations: int
    rows: list[dict[str, Any]]  # one per expectation: type, column, severity, success, observed
    failed: list[dict[str, Any]]  # critical failures (stop the pipeline)
    warnings: list[dict[str, Any]]  # warning/info failures (recorded, the pipeline goes on)


def run_suite(suite, table: pd.DataFrame, parameters: dict[str, Any], docs_dir: str | os.PathLike,
              id_columns: tuple[str, ...] = ("id",)) -> Outcome:
    """Validate ``table`` with ``suite`` and render the Data Docs site into ``docs_dir``."""
    context = _ephemeral_context(Path(docs_dir).resolve())
    import great_expectations as gx

    source = context.data_sources.add_pandas("fmpipe")
    suite = context.suites.add(suite)
    batch = source.add_dataframe_asset("dataset").add_batch_definition_whole_dataframe("all_rows")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite.name, data=batch, suite=suite))
    result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_UNEXPECTED_COUNT}
    ids = [c for c in id_columns if c in table.columns]
    if ids:
        result_format["unexpected_index_column_names"] = ids
    result = definition.run(batch_parameters={"dataframe": table}, expectation_parameters=parameters,
                            result_format=result_format)
    as_json = json_safe(result.to_json_dict())
    rows = [_describe(table, r, tuple(ids)) for r in as_json["results"]]
    context.build_data_docs(site_names=[DOCS_SITE])
    _drop_unreferenced_images(Path(docs_dir))
    failed = [r for r in rows if not r["success"] and (r["severity"] == "critical" or r.get("error"))]
    warnings = [r for r in rows if not r["success"] and r not in failed]
    return Outcome(success=not failed, results=as_json, expectations=len(rows), rows=rows,
                   failed=failed, warnings=warnings)


def _ephemeral_context(docs_dir: Path | None):
    """An in-memory GX context whose only on-disk output is the Data Docs site at ``docs_dir``
    (None: no site; for building and loading suites, which GX ties to an active context)."""
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
        data_docs_sites={} if docs_dir is None else {
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


# ---------------------------------------------------------------- reporting

def _describe(table: pd.DataFrame, result: dict[str, Any], id_columns: tuple[str, ...]) -> dict[str, Any]:
    """One expectation's outcome as a plain record: what was expected, on what, what was seen."""
    config = result["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k not in ("batch_id", "condition_parser")}
    condition = kwargs.pop("row_condition", None)
    if isinstance(condition, dict):
        condition = condition.get("pass_through_filter") or json.dumps(condition)
    column = kwargs.get("column")
    if column is None and "column_A" in kwargs:
        column = f"{kwargs['column_A']},{kwargs['column_B']}"
    if config["type"] == "expect_column_to_exist" and not result["success"]:
        observed: Any = {"columns_present": [str(c) for c in table.columns]}
    else:
        observed = _observed(result, id_columns)
    record = {"expectation": config["type"], "column": column, "where": condition, "kwargs": kwargs,
              "severity": str(config.get("severity") or "critical"), "success": bool(result["success"]),
              "observed": observed, "covers": (config.get("meta") or {}).get("covers")}
    if isinstance(observed, dict) and "error" in observed:
        record["error"] = observed["error"]
    return record


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
        rows = outcome.get("partial_unexpected_index_list") or []
        if id_columns and rows:
            observed["offending_rows"] = {c: [row.get(c) for row in rows if isinstance(row, dict)]
                                          for c in id_columns}
        return observed
    if "observed_value" in outcome:
        if outcome.get("partial_missing_list"):  # distinct values lacking part of a required set
            return {"missing": outcome["partial_missing_list"]}
        return outcome["observed_value"]
    return outcome


def _seen(observed: Any) -> str:
    if isinstance(observed, dict) and "error" in observed:
        return f"could not be evaluated: {observed['error']}"
    if isinstance(observed, dict) and observed.get("unexpected_count") == 0:
        return "0 unexpected"
    if isinstance(observed, dict) and "unexpected_count" in observed:
        percent = observed.get("unexpected_percent") or 0.0
        seen = (f"{observed['unexpected_count']} unexpected value(s) ({percent:.2f}%), "
                f"e.g. {_short(observed['unexpected_values'])}")
        for id_column, ids in observed.get("offending_rows", {}).items():
            seen += f" at {id_column} {_short(ids)}"
        return seen
    if isinstance(observed, dict):
        return "observed " + ", ".join(f"{k}={_short(v)}" for k, v in observed.items())
    return f"observed {_short(observed)}"


def _target(record: dict[str, Any]) -> str:
    where = f"column {record['column']}" if record["column"] else "table"
    if record.get("where"):
        where += f" where {record['where']}"
    return where


def failure_line(record: dict[str, Any]) -> str:
    """One human line per failed expectation: severity, type, target, expected, observed."""
    expected = ", ".join(f"{k}={_short(v)}" for k, v in record["kwargs"].items()
                         if k not in ("column", "column_A", "column_B"))
    expected = f" ({expected})" if expected else ""
    return f"[{record['severity']}] {record['expectation']} on {_target(record)}{expected}: {_seen(record['observed'])}"


def table_lines(rows: list[dict[str, Any]], width: int = 70) -> list[str]:
    """The readable table ``fmpipe validate`` prints: expectation, severity, result, observed."""
    def cut(text: str, n: int) -> str:
        return text if len(text) <= n else text[: n - 1] + "…"

    body = []
    for r in rows:
        name = f"{r['expectation'].removeprefix('expect_')} · {_target(r)}"
        observed = _seen(r["observed"]).removeprefix("observed ")
        result = "pass" if r["success"] else "FAIL"
        body.append((cut(name, width), r["severity"], result, cut(observed, 60)))
    w0 = max([len("expectation")] + [len(b[0]) for b in body])
    lines = [f"{'expectation':<{w0}}  {'severity':<8}  {'result':<6}  observed", "-" * (w0 + 30)]
    lines += [f"{a:<{w0}}  {b:<8}  {c:<6}  {d}" for a, b, c, d in body]
    return lines


def _short(value: Any, limit: int = 160) -> str:
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()  # numpy scalars print as plain numbers
    if isinstance(value, float):
        value = round(value, 4)
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


# GX's run identity: ids and clock times that differ on every run (kept out of results.json).
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
