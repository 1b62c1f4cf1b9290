"""Step 1c: the Great Expectations gate on the cleaned data (data/<variant>/validate/).

Outputs, written together atomically:

- ``results.json``: GX's full validation result, one entry per validated table;
- ``summary.json``: ``success``, the number of expectations, each failure in plain terms
  (table, expectation type, column, kwargs, observed value) and the dataset's row counts;
- ``data_docs/``: GX's HTML Data Docs for this run (open ``data_docs/index.html``).

The outputs are written even when an expectation fails, so the docs can be read; the step
then raises, the CLI exits non-zero and DVC stops before annotate. Annotate also refuses to
run (``require_passed``) unless the last validation of its variant succeeded.
"""

from __future__ import annotations

import json
import sys
import time

from pipeline.config import DEFAULT_PARAMS, load_variant
from pipeline.errors import FmpipeError
from pipeline.io import atomic_dir, to_json
from pipeline.manifest import SPLITS, read_dataset
from pipeline.paths import step_dir

RESULTS = "results.json"
SUMMARY = "summary.json"
DATA_DOCS = "data_docs"


def run(variant: str, params_path: str = DEFAULT_PARAMS) -> dict:
    from pipeline.quality.expectations import build_checks, failure_line, run_checks

    started = time.perf_counter()
    spec = load_variant(variant, params_path).validate_
    source_dir = step_dir(variant, "clean")
    ds = read_dataset(source_dir)
    checks = build_checks(ds, spec)

    with atomic_dir(step_dir(variant, "validate")) as tmp:
        outcome = run_checks(checks, suite_prefix=variant, docs_dir=tmp / DATA_DOCS)
        summary = {
            "variant": variant,
            "success": outcome.success,
            "expectations": outcome.expectations,
            "failed": outcome.failed,
            "dataset": _dataset_facts(ds, str(source_dir)),
        }
        (tmp / RESULTS).write_text(to_json({"success": outcome.success, "validations": outcome.results}))
        (tmp / SUMMARY).write_text(to_json(summary))

    passed = outcome.expectations - len(outcome.failed)
    print(f"validate {variant}: {passed}/{outcome.expectations} expectations passed "
          f"({time.perf_counter() - started:.1f}s; docs: {step_dir(variant, 'validate') / DATA_DOCS / 'index.html'})",
          file=sys.stderr)
    if not outcome.success:
        lines = "\n".join(f"  {failure_line(f)}" for f in outcome.failed)
        raise FmpipeError(
            f"{len(outcome.failed)} of {outcome.expectations} expectations failed on {source_dir}:\n{lines}"
        )
    return summary


def require_passed(variant: str) -> None:
    """Refuse to go on unless the variant's last validation exists and succeeded."""
    path = step_dir(variant, "validate") / SUMMARY
    rerun = f"run `fmpipe validate --stage {variant}`"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise FmpipeError(f"{path}: not found; the data of {variant!r} has not been validated ({rerun})") from None
    except json.JSONDecodeError as exc:
        raise FmpipeError(f"{path}: not valid JSON ({exc}); {rerun}") from None
    if summary.get("success") is not True:
        failed = summary.get("failed") or []
        names = ", ".join(sorted({f"{f.get('expectation')}({f.get('column') or 'table'})" for f in failed}))
        raise FmpipeError(
            f"{path}: the data of {variant!r} failed validation ({len(failed)} expectation(s): {names}); "
            f"fix the data or params, then {rerun}"
        )


def _dataset_facts(ds, source: str) -> dict:
    m = ds.manifest
    facts = {"source": source, "kind": ds.kind, "rows": int(len(m)), "classes": len(ds.classes)}
    if "split" in m.columns:
        facts["rows_by_split"] = {s: int((m["split"] == s).sum()) for s in SPLITS}
    return facts
