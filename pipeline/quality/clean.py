"""clean as a function of data: rules applied, the leakage column, report facts, the sheet.

``clean_dataset(ds, spec)`` is what stages/clean.py calls and what tests call in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import FmpipeError
from pipeline.manifest import Dataset
from pipeline.quality import rules as R
from pipeline.steps import DATA, at

FINDINGS = "findings.parquet"


@dataclass
class Cleaned:
    dataset: Dataset
    findings: pd.DataFrame
    removed: list[dict[str, Any]]
    facts: dict[str, Any]  # for report.json (deterministic: no timings)


def embedder_for(spec, variant: str | None = None):
    """The embedder clean's params name; a package may not be the variant's own output."""
    from pipeline.quality.embedders import make_embedder

    e = spec.embedder
    if e.kind == "package":
        path = Path(e.path)
        if variant is not None:
            own = at(DATA, variant).resolve()
            if path.resolve() == own or own in path.resolve().parents:
                raise FmpipeError(
                    f"clean.embedder.path {e.path}: is inside data/{variant}/, which clean feeds (a cycle); "
                    f"copy an archived package outside data/ (e.g. models/{variant}-v1/) and declare it as a dep of clean")
        if not (path / "model.json").exists():
            raise FmpipeError(f"clean.embedder.path {e.path}: no model.json there (expected a trained model or package)")
        return make_embedder("package", path=str(path), layer=e.layer)
    return make_embedder(e.kind)


def clean_dataset(ds: Dataset, spec, embedder=None, variant: str | None = None, engine: str = "local") -> Cleaned:
    if ds.kind == "image" and embedder is None and (spec.leakage != "off" or spec.near_duplicates != "off"):
        embedder = embedder_for(spec, variant)
    outcome = R.apply_rules(ds, spec, embedder, engine)
    out = outcome.dataset
    leaked = R.leaked_rows(out, outcome.findings)
    out = Dataset(manifest=out.manifest.assign(leaked=leaked), classes=out.classes, images=out.images,
                  features=out.features, extra_meta=out.extra_meta)
    f = outcome.findings
    facts = {
        "rules": outcome.rules,
        "findings": int(len(f)),
        "findings_by_rule": {k: int(v) for k, v in f.groupby("rule").size().items()} if len(f) else {},
        "flagged_by_rule": ({k: int(v) for k, v in f[f["action"] == "flag"].groupby("rule").size().items()}
                            if len(f) else {}),
        "leaked_rows_remaining": int(leaked.sum()),
        "near_duplicate_index": outcome.index,
        "embedder": embedder.describe() if embedder is not None else None,
    }
    return Cleaned(dataset=out, findings=f, removed=outcome.removed, facts=facts)


def summary_line(variant: str, rows_in: int, cleaned: Cleaned) -> str:
    parts = []
    for name, r in cleaned.facts["rules"].items():
        what = [f"{r[k]} {k}" for k in ("dropped", "flagged") if r.get(k)]
        if what:
            parts.append(f"{name} {' '.join(what)}" if len(what) == 1 else f"{name} {', '.join(what)}")
    return (f"clean {variant}: {rows_in} rows in, {len(cleaned.dataset)} out; "
            + (", ".join(parts) if parts else "nothing found")
            + f"; leaked rows left {cleaned.facts['leaked_rows_remaining']}")


def sheet_writer(variant: str, source: Dataset, cleaned: Cleaned, max_pairs: int):
    """A function writing the contact sheet to a path (images come from the input dataset)."""
    from pipeline.quality.sheet import render

    def write(path: os.PathLike) -> None:
        f = cleaned.findings
        images: dict[str, np.ndarray] = {}
        if source.images is not None and len(f):
            wanted = set(f["id"].dropna().astype(str)) | set(f["other_id"].dropna().astype(str))
            ids = source.manifest["id"].astype(str)
            rows = np.flatnonzero(ids.isin(wanted).to_numpy())
            for r in rows:
                images[ids.iat[r]] = np.asarray(source.images[r])
        facts = {"rows in": len(source), "rows out": len(cleaned.dataset),
                 "embedder": (cleaned.facts.get("embedder") or {}).get("name", "-"),
                 "leaked rows left": cleaned.facts["leaked_rows_remaining"]}
        Path(path).write_text(render(f"clean {variant}: flagged pairs", f, images, source.classes,
                                     max_pairs=max_pairs, facts=facts))

    return write
