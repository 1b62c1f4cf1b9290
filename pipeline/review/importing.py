"""``fmpipe review import FILE --stage V``: check a Label Studio export, copy it into
``annotations/<V>/`` so that nobody edits paths by hand, and say what it will change.

The file is checked exactly as annotate will read it (:mod:`pipeline.review.decisions`)
against the variant's cleaned dataset: every task must name a known id with a known class
(or ``drop``). Nothing is written unless every check passes. The copy keeps the export's
bytes (git then versions exactly what Label Studio produced).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pipeline.config import DEFAULT_PARAMS, load_variant
from pipeline.errors import FmpipeError
from pipeline.io import atomic_write_bytes
from pipeline.manifest import read_dataset, read_report
from pipeline.paths import annotations_dir
from pipeline.reading import decode_text, not_a_file
from pipeline.review.pool import POOL, read_pool
from pipeline.steps import output, rerun_hint
from pipeline.review.decisions import ReadStats, parse_decisions_csv, parse_label_studio_export, resolve


def import_decisions(file: str | os.PathLike, variant: str, *, name: Optional[str] = None,
                     params_path: str = DEFAULT_PARAMS) -> str:
    load_variant(variant, params_path)
    src = Path(file)
    error = not_a_file(src, "a Label Studio JSON export or an id,label,note CSV")
    if error is not None:
        raise error
    suffix = src.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise FmpipeError(f"{src}: expected a Label Studio JSON export (.json) or an id,label,note CSV (.csv)")
    target_name = name or src.name
    if Path(target_name).suffix.lower() != suffix or "/" in target_name or target_name.startswith("."):
        raise FmpipeError(f"--name {target_name!r}: must be a plain file name ending in {suffix}")

    clean_dir = output("clean", variant)
    ds = read_dataset(clean_dir, mmap=True, run=rerun_hint("clean", variant, then=""))
    removed = {r.id: r.reason for r in read_report(clean_dir).removed}
    raw = src.read_bytes()
    text = decode_text(raw, src, "a Label Studio JSON export or an id,label,note CSV")
    stats = ReadStats(files=[str(src)])
    if suffix == ".json":
        votes = parse_label_studio_export(text, str(src), list(ds.classes), stats)
    else:
        votes = parse_decisions_csv(text, str(src), list(ds.classes))
    if not votes:
        raise FmpipeError(
            f"{src}: contains no decisions ({stats.cancelled_ignored} cancelled, {stats.empty_ignored} empty, "
            f"{stats.tasks_without_annotations} task(s) without annotations); nothing imported"
        )
    known = set(ds.manifest["id"].astype(str))
    pool = read_pool(annotations_dir(variant) / POOL)  # production inputs waiting for labels
    pooled = set(pool["id"].astype(str)) if pool is not None else set()
    known |= pooled
    for v in votes:
        if v.id not in known and v.id not in removed:
            raise FmpipeError(f"{v.where}: id {v.id!r} is not in the cleaned dataset of {variant!r}; nothing imported")

    dest_dir = annotations_dir(variant)
    dest = dest_dir / target_name
    if dest.exists():
        if dest.read_bytes() == raw:
            return f"{dest}: already imported (same bytes); nothing to do"
        raise FmpipeError(f"{dest}: exists with different content; choose another name with --name")
    labels = dict(zip(ds.manifest["id"].astype(str), ds.manifest["label"].astype(int)))
    resolved = resolve(votes)
    relabel = sum(1 for r in resolved.values() if not r.drop and r.id in labels and r.label != labels[r.id])
    confirm = sum(1 for r in resolved.values() if not r.drop and r.id in labels and r.label == labels[r.id])
    drop = sum(1 for r in resolved.values() if r.drop and r.id in labels)
    gone = sorted(i for i in resolved if i not in labels and i not in pooled)
    production = sum(1 for r in resolved.values() if r.id in pooled and not r.drop)
    atomic_write_bytes(dest, raw)
    lines = [
        f"imported {src} -> {dest}: {len(votes)} decision(s) on {len(resolved)} item(s) "
        f"(this file alone: {relabel} relabel, {confirm} confirm, {drop} drop; "
        f"{stats.cancelled_ignored} cancelled ignored)",
    ]
    if production:
        lines.append(f"{production} production input(s) from the pool get a label: annotate adds them to the dataset")
    if gone:
        lines.append(f"warning: {len(gone)} item(s) were removed by clean and will be ignored: {', '.join(gone[:5])}")
    lines.append(f"next: git add {dest} && dvc repro   (or: fmpipe annotate --stage {variant})")
    return "\n".join(lines)
