"""The row-level diff between two versions of a variant's data: added, removed (with clean's
reason), relabelled, content changed, moved between splits, and a per-class summary."""

from __future__ import annotations

from typing import Any, Optional

import pandas as pd

from pipeline.audit.git import Git
from pipeline.audit.store import Store
from pipeline.audit.version import Version, open_version
from pipeline.errors import FmpipeError
from pipeline.manifest import REPORT
from pipeline.steps import DATASET_STEPS


def removal_reasons(version: Version) -> dict[str, dict[str, Any]]:
    """``{id: removal}`` from collect's, clean's and annotate's reports of a version (a row
    dropped by people's decision is annotate's ``dropped_by_annotation``; the later step wins)."""
    reasons: dict[str, dict[str, Any]] = {}
    for step in DATASET_STEPS:
        report = version.json(step, REPORT) if (version.commit is None or step in version.stages) else None
        for r in (report or {}).get("removed") or []:
            reasons[str(r.get("id"))] = {"step": step, **{k: v for k, v in r.items() if k != "id"}}
    return reasons


def _col(frame: pd.DataFrame, name: str) -> Optional[pd.Series]:
    return frame[name] if name in frame.columns else None


def diff_manifests(old: pd.DataFrame, new: pd.DataFrame, removed_why: Optional[dict[str, dict]] = None,
                   notes: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Every row-level difference between two manifests, matched by ``id`` (vectorised)."""
    removed_why = removed_why or {}
    notes = notes or {}
    o = old.set_index("id")
    n = new.set_index("id")
    o.index = o.index.astype(str)
    n.index = n.index.astype(str)
    added = n.index.difference(o.index)
    removed = o.index.difference(n.index)
    both = o.index.intersection(n.index)
    oo, nn = o.reindex(both), n.reindex(both)
    old_label = oo["label_name"].astype(str).to_numpy()
    new_label = nn["label_name"].astype(str).to_numpy()
    rel = old_label != new_label
    chg = oo["sha256"].astype(str).to_numpy() != nn["sha256"].astype(str).to_numpy()
    mov = oo["split"].astype(str).to_numpy() != nn["split"].astype(str).to_numpy()

    source = _col(nn, "label_source")
    annotator = _col(nn, "annotator")
    relabelled = []
    for i in both[rel]:
        item: dict[str, Any] = {"id": i, "from": o.at[i, "label_name"], "to": n.at[i, "label_name"]}
        if source is not None:
            item["source"] = str(source.at[i])
        if annotator is not None and pd.notna(annotator.at[i]) and str(annotator.at[i]):
            item["annotator"] = str(annotator.at[i])
        if i in notes and notes[i]:
            item["note"] = notes[i]
        relabelled.append(item)

    removed_rows = []
    for i in sorted(removed):
        why = removed_why.get(i)
        item = {"id": i, "split": o.at[i, "split"], "label": o.at[i, "label_name"]}
        item.update(why if why else {"reason": "not in the source any more (collect)"})
        removed_rows.append(item)
    added_rows = [{"id": i, "split": n.at[i, "split"], "label": n.at[i, "label_name"], **_origin(n, i)}
                  for i in sorted(added)]

    per_class: dict[str, dict[str, int]] = {}

    def bump(cls: Any, key: str, k: int = 1) -> None:
        row = per_class.setdefault(str(cls), {"old": 0, "new": 0, "added": 0, "removed": 0,
                                              "relabelled_in": 0, "relabelled_out": 0, "content_changed": 0})
        row[key] += k

    for cls, k in o["label_name"].astype(str).value_counts().items():
        bump(cls, "old", int(k))
    for cls, k in n["label_name"].astype(str).value_counts().items():
        bump(cls, "new", int(k))
    for r in added_rows:
        bump(r["label"], "added")
    for r in removed_rows:
        bump(r["label"], "removed")
    for r in relabelled:
        bump(r["from"], "relabelled_out")
        bump(r["to"], "relabelled_in")
    for cls in new_label[chg]:
        bump(cls, "content_changed")

    return {
        "rows_old": int(len(o)),
        "rows_new": int(len(n)),
        "added": added_rows,
        "removed": removed_rows,
        "relabelled": relabelled,
        "content_changed": sorted(str(i) for i in both[chg]),
        "split_changed": [{"id": i, "from": o.at[i, "split"], "to": n.at[i, "split"]} for i in sorted(both[mov])],
        "unchanged": int((~(rel | chg | mov)).sum()),
        "per_class": dict(sorted(per_class.items())),
    }


def _origin(frame: pd.DataFrame, i: Any) -> dict[str, str]:
    """Where a row came from, when the manifest says (annotate's ``origin``: ``source`` or
    ``production`` with ``origin_id``, the request-log record; pipeline/review/pool.py)."""
    out = {}
    for col in ("origin", "origin_id"):
        if col in frame.columns and pd.notna(frame.at[i, col]):
            out[col] = str(frame.at[i, col])
    return out


def _notes(version: Version) -> dict[str, str]:
    report = version.json("annotate", REPORT) if (version.commit is None or "annotate" in version.stages) else None
    return {str(c["id"]): c.get("note", "") for c in (report or {}).get("changes") or []}


def diff_versions(variant: str, step: str, rev_a: str, rev_b: str, repo: str = ".") -> dict[str, Any]:
    """Row-level differences of ``data/<variant>/<step>`` between two revisions (or the workspace)."""
    if step not in DATASET_STEPS:
        raise FmpipeError(f"--step must be one of {', '.join(DATASET_STEPS)}, not {step!r}")
    git = Git(repo)
    store = Store(repo)
    a = open_version(variant, rev_a, repo, git, store, need_step=step)
    b = open_version(variant, rev_b, repo, git, store, need_step=step)
    return diff_between(a, b, step)


def diff_between(a: Version, b: Version, step: str) -> dict[str, Any]:
    result: dict[str, Any] = {"variant": a.variant, "step": step, "a": a.label, "b": b.label,
                              "a_commit": a.commit, "b_commit": b.commit}
    result.update(diff_manifests(a.manifest(step), b.manifest(step), removal_reasons(b),
                                 _notes(b) if step == "annotate" else None))
    return result


def summary_lines(d: dict[str, Any], show: int = 10) -> list[str]:
    lines = [f"{d['variant']}/{d['step']}: {d['a']} ({d['rows_old']} rows) -> {d['b']} ({d['rows_new']} rows)"]
    for key in ("added", "removed", "relabelled", "content_changed", "split_changed"):
        items = d[key]
        lines.append(f"  {key:16s} {len(items)}")
        for item in items[:show]:
            lines.append(f"      {_fmt(key, item)}")
        if len(items) > show:
            lines.append(f"      ... {len(items) - show} more (use --json for all)")
    lines.append(f"  {'unchanged':16s} {d['unchanged']}")
    if d.get("per_class"):
        lines.append("  per class (old -> new: +added -removed, relabelled in/out):")
        for cls, c in d["per_class"].items():
            lines.append(f"      {cls}: {c['old']} -> {c['new']}: +{c['added']} -{c['removed']}, "
                         f"relabelled +{c['relabelled_in']}/-{c['relabelled_out']}")
    return lines


def diff_markdown(d: dict[str, Any], show: int = 50) -> str:
    out = [f"# {d['variant']}/{d['step']}: {d['a']} -> {d['b']}", "",
           f"{d['rows_old']} rows -> {d['rows_new']} rows; {len(d['added'])} added, {len(d['removed'])} removed, "
           f"{len(d['relabelled'])} relabelled, {len(d['content_changed'])} content changed, "
           f"{len(d['split_changed'])} moved between splits, {d['unchanged']} unchanged.", ""]
    out += ["| class | old | new | added | removed | relabelled in | relabelled out |", "|---|---|---|---|---|---|---|"]
    for cls, c in d["per_class"].items():
        out.append(f"| {cls} | {c['old']} | {c['new']} | {c['added']} | {c['removed']} | "
                   f"{c['relabelled_in']} | {c['relabelled_out']} |")
    for key in ("added", "removed", "relabelled", "content_changed", "split_changed"):
        if d[key]:
            out += ["", f"## {key} ({len(d[key])})", ""]
            out += [f"- {_fmt(key, item)}" for item in d[key][:show]]
            if len(d[key]) > show:
                out.append(f"- ... {len(d[key]) - show} more (`--json` for all)")
    return "\n".join(out) + "\n"


def _fmt(key: str, item: Any) -> str:
    if isinstance(item, str):
        return item
    if key == "relabelled":
        # label_source of the newer side: "source" (the dataset's own label) or "annotation".
        source = {"source": "as the source labels it", "annotation": "by annotation"}.get(
            str(item.get("source")), f"from {item['source']}" if item.get("source") else "")
        extra = ", ".join([source] * bool(source) + [f"{k} {item[k]}" for k in ("annotator", "note") if item.get(k)])
        return f"{item['id']}: {item['from']} -> {item['to']}" + (f" ({extra})" if extra else "")
    if key == "removed":
        extra = f" (duplicate of {item['dup_of']})" if item.get("dup_of") else ""
        return f"{item['id']} [{item['split']}, {item['label']}]: {item['reason']}{extra}"
    if key == "added":
        origin = f" from {item['origin']}" + (f" (log record {item['origin_id']})" if item.get("origin_id") else "")
        return f"{item['id']} [{item['split']}, {item['label']}]" + (origin if item.get("origin") else "")
    return f"{item['id']}: {item['from']} -> {item['to']}"
