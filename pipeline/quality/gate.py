"""The validation gate as data: what validate concludes, and what annotate checks before it runs."""

from __future__ import annotations

from pathlib import Path

from pipeline.artefacts import ValidationSummary
from pipeline.errors import FmpipeError
from pipeline.io import file_digest
from pipeline.manifest import META, SPLITS
from pipeline.steps import rerun_hint

RESULTS = "results.json"
SUMMARY = "summary.json"
DATA_DOCS = "data_docs"


def summarize(variant: str, ds, source: str, outcome) -> ValidationSummary:
    m = ds.manifest
    facts = {"source": source, "kind": ds.kind, "rows": int(len(m)), "classes": len(ds.classes)}
    if (Path(source) / META).exists():
        # dataset.json holds the digests of the manifest and payload: this names the very data
        # that was validated, so annotate can refuse a summary of other data.
        facts["dataset_json_sha256"] = file_digest(Path(source) / META)
    if "split" in m.columns:
        facts["rows_by_split"] = {s: int((m["split"] == s).sum()) for s in SPLITS}
    extra = {}
    if hasattr(outcome, "warnings"):  # the curated suite's run (pipeline/quality/expectations.py)
        by_severity: dict[str, dict[str, int]] = {}
        for r in outcome.rows:
            entry = by_severity.setdefault(r["severity"], {"passed": 0, "failed": 0})
            entry["passed" if r["success"] else "failed"] += 1
        extra = {"warnings": outcome.warnings, "by_severity": by_severity, "table": outcome.rows}
    return ValidationSummary(variant=variant, success=outcome.success, expectations=outcome.expectations,
                             failed=outcome.failed, dataset=facts, **extra)


def require_passed(path: Path, variant: str) -> ValidationSummary:
    """Refuse to go on unless the variant's last validation exists and succeeded."""
    rerun = rerun_hint("validate", variant, then="")
    summary = ValidationSummary.read(path, hint=f"the data of {variant!r} has not been validated ({rerun})")
    validated = summary.dataset.get("dataset_json_sha256")
    current = Path(summary.dataset.get("source", "")) / META
    if validated and current.is_file() and file_digest(current) != validated:
        raise FmpipeError(f"{path}: validates other data than the current {current.parent} "
                          f"(changed since, or its validation stopped early); {rerun}")
    if not summary.success:
        names = ", ".join(sorted({f"{f.expectation}({f.column or 'table'})" for f in summary.failed}))
        raise FmpipeError(
            f"{path}: the data of {variant!r} failed validation ({len(summary.failed)} expectation(s): "
            f"{names}); fix the data or params, then {rerun}"
        )
    return summary
