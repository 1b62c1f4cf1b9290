"""``fmpipe resources``: the per-step cost table of a variant's last runs, with totals."""

from __future__ import annotations

import json
from typing import Any, Optional

from pipeline import steps as registry
from pipeline.artefacts import Resources, RunRecord
from pipeline.errors import FmpipeError

# Columns summed into the totals row (peak memory takes the maximum instead).
_SUMMED = ("wall_s", "cpu_s", "read_mb", "write_mb", "accel_s", "gflop")


def collect(variant: Optional[str]) -> dict[str, list[dict[str, Any]]]:
    """``{variant: [row per step that has a record, in lifecycle order]}``."""
    root = registry.at(registry.RESOURCES_DIR, "x").parent
    variants = [variant] if variant else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    tables: dict[str, list[dict[str, Any]]] = {}
    for v in variants:
        rows = []
        for step in registry.STEPS:
            path = registry.at(step.resources, v)
            if not path.exists():
                continue
            row = {"step": step.name, **Resources.read(path).model_dump(exclude_none=True, exclude={"schema_version"})}
            record = registry.at(step.run_record, v)
            if record.exists():
                rec = RunRecord.read(record)
                row.update(device=rec.device, optimizer_steps=rec.optimizer_steps, samples_per_s=rec.samples_per_s)
            rows.append(row)
        if rows:
            tables[v] = rows
    if not tables:
        where = f"variant {variant!r}" if variant else "any variant"
        raise FmpipeError(f"{root}: no resource records for {where}; run a step first "
                          f"(`fmpipe run --stage NAME` or `dvc repro`)")
    return tables


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"step": "total"}
    for key in _SUMMED:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            total[key] = round(sum(values), 4)
    total["peak_mb"] = max(r["peak_mb"] for r in rows)
    return total


# Columns: (header, key, priority); the lowest priority goes first when the terminal is narrow.
COLUMNS = [("step", "step", 1), ("wall s", "wall_s", 2), ("CPU s", "cpu_s", 4), ("peak MB", "peak_mb", 3),
           ("read MB", "read_mb", 10), ("written MB", "write_mb", 11), ("rows in", "rows_in", 8),
           ("rows out", "rows_out", 9), ("epochs", "epochs", 6), ("steps", "optimizer_steps", 12),
           ("samples", "samples", 13), ("samples/s", "samples_per_s", 7), ("GFLOP", "gflop", 14),
           ("accel s", "accel_s", 5), ("accel MB", "accel_mb", 15), ("device", "device", 16)]


def render(tables: dict[str, list[dict[str, Any]]], as_json: bool = False, wide: bool = False) -> str:
    """The tables as JSON, or as text that fits the terminal (``wide``: every column)."""
    if as_json:
        return json.dumps({v: {"steps": rows, "total": totals(rows)} for v, rows in tables.items()}, indent=2)
    from pipeline.console import print_table

    out = []
    for v, rows in tables.items():
        present = [(h, k, p) for h, k, p in COLUMNS if any(r.get(k) is not None for r in rows)]
        columns = [{"header": h, "priority": p, "no_wrap": True, "justify": "left" if k in ("step", "device") else "right"}
                   for h, k, p in present]
        cells = [[_fmt(row.get(k)) for _, k, _ in present] for row in [*rows, totals(rows)]]
        out.append(print_table(f"resources: {v}", columns, cells, wide))
    return "\n\n".join(out)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
