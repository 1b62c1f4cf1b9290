"""What changed in a variant's dataset between two versions (git revisions), row by row.

A version is a git revision of this repo: its ``dvc.lock`` names the exact bytes of every
manifest, and DVC reads them back (from the local cache or a remote) without touching the
working tree. ``WORKSPACE`` means the files on disk now. Ids are stable across versions, so
rows are matched by id and every difference is classified: added, removed, relabelled,
content changed (new sha256 under the same id), moved between splits.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import pandas as pd

from pipeline.errors import FmpipeError
from pipeline.manifest import MANIFEST
from pipeline.paths import step_dir

WORKSPACE = "workspace"


def read_manifest_at(variant: str, step: str, rev: Optional[str], repo: str = ".") -> pd.DataFrame:
    path = step_dir(variant, step) / MANIFEST
    if rev in (None, WORKSPACE):
        if not path.exists():
            raise FmpipeError(f"{path}: not found in the workspace; run `fmpipe {step} --stage {variant}`")
        return pd.read_parquet(path)
    import dvc.api

    try:
        with dvc.api.open(str(path), repo=repo, rev=rev, mode="rb") as fh:
            return pd.read_parquet(io.BytesIO(fh.read()))
    except Exception as exc:  # dvc raises many types (missing rev, missing cache, ...)
        raise FmpipeError(f"{path} at revision {rev!r}: cannot be read through DVC: {exc}") from None


def diff_manifests(old: pd.DataFrame, new: pd.DataFrame) -> dict[str, Any]:
    o = old.set_index("id")
    n = new.set_index("id")
    added = n.index.difference(o.index)
    removed = o.index.difference(n.index)
    both = n.index.intersection(o.index)
    oo, nn = o.loc[both], n.loc[both]
    relabelled = both[(oo["label_name"] != nn["label_name"]).to_numpy()]
    changed = both[(oo["sha256"] != nn["sha256"]).to_numpy()]
    moved = both[(oo["split"] != nn["split"]).to_numpy()]
    return {
        "rows_old": len(o),
        "rows_new": len(n),
        "added": _ids(added),
        "removed": _ids(removed),
        "relabelled": [
            {"id": i, "from": o.at[i, "label_name"], "to": n.at[i, "label_name"]} for i in relabelled
        ],
        "content_changed": _ids(changed),
        "split_changed": [{"id": i, "from": o.at[i, "split"], "to": n.at[i, "split"]} for i in moved],
        "unchanged": int(len(both) - len(set(relabelled) | set(changed) | set(moved))),
    }


def diff_versions(variant: str, step: str, rev_a: str, rev_b: str, repo: str = ".") -> dict[str, Any]:
    old = read_manifest_at(variant, step, rev_a, repo)
    new = read_manifest_at(variant, step, rev_b, repo)
    result = {"variant": variant, "step": step, "a": rev_a, "b": rev_b}
    result.update(diff_manifests(old, new))
    return result


def summary_lines(d: dict[str, Any], show: int = 10) -> list[str]:
    lines = [
        f"{d['variant']}/{d['step']}: {d['a']} ({d['rows_old']} rows) -> {d['b']} ({d['rows_new']} rows)",
    ]
    for key in ("added", "removed", "relabelled", "content_changed", "split_changed"):
        items = d[key]
        lines.append(f"  {key:16s} {len(items)}")
        for item in items[:show]:
            lines.append(f"      {item if isinstance(item, str) else _fmt(item)}")
        if len(items) > show:
            lines.append(f"      ... {len(items) - show} more (use --json for all)")
    lines.append(f"  {'unchanged':16s} {d['unchanged']}")
    return lines


def _fmt(item: dict[str, Any]) -> str:
    return f"{item['id']}: {item['from']} -> {item['to']}"


def _ids(index: pd.Index) -> list[str]:
    return sorted(str(i) for i in index)

