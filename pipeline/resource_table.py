"""``fmpipe resources``: the per-step cost table of a variant's last runs, with totals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pipeline import steps as registry
from pipeline.artefacts import Resources, RunRecord
from pipeline.errors import FmpipeError

# Columns summed into the totals row (peak memory takes the maximum instead).
_SUMMED = ("wall_s", "cpu_s", "read_mb", "write_mb", "accel_s", "gflop")


def collect(variant: Optional[str]) -> dict[str, list[dict[str, Any]]]:
    """``{variant: [row per step that has a record, in lifecycle order]}``."""
    root = Path(registry.RESOURCES_DIR.format(v="x")).parent
    variants = [variant] if variant else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    tables: dict[str, list[dict[str, Any]]] = {}
    for v in variants:
        rows = []
        for step in registry.STEPS:
            path = Path(step.resources.format(v=v))
            if not path.exists():
                continue
            row = {"step": step.name, **Resources.read(path).model_dump(exclude_none=True, exclude={"schema_version"})}
            record = Path(step.run_record.format(v=v))
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


def render(tables: dict[str, list[dict[str, Any]]], as_json: bool = False) -> str:
    if as_json:
        return json.dumps({v: {"steps": rows, "total": totals(rows)} for v, rows in tables.items()}, indent=2)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160, record=True, file=open("/dev/null", "w"))
    for v, rows in tables.items():
        table = Table(title=f"resources: {v}", title_justify="left")
        cols = [("step", "step"), ("wall s", "wall_s"), ("CPU s", "cpu_s"), ("peak MB", "peak_mb"),
                ("read MB", "read_mb"), ("written MB", "write_mb"), ("rows in", "rows_in"),
                ("rows out", "rows_out"), ("epochs", "epochs"), ("steps", "optimizer_steps"), ("samples", "samples"),
                ("samples/s", "samples_per_s"),
                ("GFLOP", "gflop"), ("accel s", "accel_s"), ("accel MB", "accel_mb"),
                ("device", "device")]
        present = [(h, k) for h, k in cols if any(r.get(k) is not None for r in rows)]
        for h, k in present:
            table.add_column(h, justify="left" if k in ("step", "device") else "right")
        for row in [*rows, totals(rows)]:
            table.add_row(*(_fmt(row.get(k)) for _, k in present), end_section=row["step"] == rows[-1]["step"])
        console.print(table)
    return console.export_text().rstrip()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
