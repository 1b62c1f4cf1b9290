"""The evaluation as people read it in a terminal, and the comparison with the last blessed model.

``comparison`` is deliberately not part of ``blessing.json``: the last blessed model is the
previous package, which is not a declared dependency of evaluate (package depends on
evaluate; the reverse would be a cycle). Its numbers therefore go to the uncached
the run record ``data/runs/<v>/evaluate.json`` (``baseline``), never into a declared output
or the verdict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pipeline.artefacts import Blessing, Lineage, Metrics
from pipeline.errors import FmpipeError

COMPARED = ("accuracy", "macro_f1", "ece")


def read_last_blessed(lineage_path: str | Path) -> Optional[dict[str, Any]]:
    """The previous package's metrics (it was blessed, or package would have refused it).

    Read leniently: the previous package may come from an older fmpipe. An unreadable one is
    reported in the comparison, not raised: it must not stop the evaluation of a new model.
    """
    path = Path(lineage_path)
    if not path.exists():
        return None
    try:
        lineage = Lineage.read(path, lenient=True)
    except FmpipeError as exc:
        return {"source": str(path), "error": f"unreadable lineage: {exc}"}
    return {"source": str(path),
            **{k: float(getattr(lineage.metrics, k)) for k in COMPARED},
            "model_sha256": lineage.model.sha256}


def last_blessed_lineage(lineage_path: str | Path, record_path: str | Path,
                         weights_sha256: str) -> Optional[dict[str, Any]]:
    """The raw ``lineage.json`` of the last blessed package whose weights differ from the ones
    being evaluated: the current package, or, when that one already holds these weights (a
    forced or repeated run), the one the previous run record kept. ``None`` when none exists.
    Unreadable files count as absent: a record must never stop an evaluation."""
    try:
        current = json.loads(Path(lineage_path).read_text())
    except (OSError, ValueError):
        current = None
    if isinstance(current, dict) and (current.get("model") or {}).get("sha256") != weights_sha256:
        return current
    try:
        earlier = json.loads(Path(record_path).read_text()).get("last_blessed")
    except (OSError, ValueError, AttributeError):
        earlier = None
    return earlier if isinstance(earlier, dict) else None


def comparison(metrics: Metrics, baseline: Optional[dict[str, Any]],
               model_sha256: Optional[str] = None) -> dict[str, Any]:
    if baseline is None:
        return {"baseline": None, "note": "no previous package: nothing to compare with"}
    out: dict[str, Any] = {"baseline": baseline, "changes": {}}
    for key in COMPARED:
        if baseline.get(key) is not None:
            out["changes"][key] = float(getattr(metrics, key)) - float(baseline[key])
    if model_sha256 is not None:
        out["same_weights"] = model_sha256 == baseline.get("model_sha256")
    return out


def render_table(variant: str, metrics: Metrics, per_class: list[dict[str, Any]],
                 blessing: Blessing, compared: dict[str, Any]) -> None:
    """Overall + per-class table on stderr (rich), then the verdict and the change."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, highlight=False)
    changes = compared.get("changes") or {}
    overall = Table(title=f"{variant}: test split ({metrics.n_test} rows)", title_justify="left")
    for col in ("metric", "value", "vs last blessed"):
        overall.add_column(col, justify="left" if col == "metric" else "right")
    rows = [("accuracy", metrics.accuracy), ("macro F1", metrics.macro_f1),
            ("ECE (lower is better)", metrics.ece), ("temperature", metrics.temperature)]
    for (label, value), key in zip(rows, ("accuracy", "macro_f1", "ece", None)):
        if value is None:
            continue
        ch = changes.get(key) if key else None
        overall.add_row(label, f"{value:.4f}", "" if ch is None else f"{ch:+.4f}")
    console.print(overall)
    table = Table(title="per class", title_justify="left")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for r in per_class:
        table.add_row(str(r["class"]), f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}",
                      str(int(r["support"])))
    console.print(table)
    if compared.get("baseline") is None:
        console.print("no previous package: nothing to compare with")
