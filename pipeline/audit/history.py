"""``fmpipe audit``'s history: every commit where the variant's ``dvc.lock`` entries changed,
with the facts of each version."""

from __future__ import annotations

import json
from typing import Any, Optional

from pipeline.artefacts import A, Blessing, DatasetReport, Metrics, ValidationSummary
from pipeline.audit.git import Git
from pipeline.audit.store import Store
from pipeline.audit.version import LOCK, Version, _lock_stages, variant_entries
from pipeline.errors import FmpipeError
from pipeline.manifest import REPORT
from pipeline.steps import DATASET_STEPS
from pipeline.steps import ORDER as STEPS


def history(variant: str, repo: str = ".", rev: str = "HEAD") -> dict[str, Any]:
    """Every distinct version of ``variant``'s data (oldest first), with the commits that hold it.

    A data version is the md5 of the data steps' outputs (collect, clean, annotate) in
    ``dvc.lock``: a commit that changed only code, params of later steps or the model records
    the same data and is folded into that version's row (``commits`` names every one). The
    data facts are the version's; the model's (metrics, blessing) are those of its latest commit.
    """
    git = Git(repo)
    git.check_repo()
    head = git.resolve(rev)
    shallow = git.is_shallow()
    if shallow:
        raise FmpipeError("this is a shallow clone (history cut off), so the audit history would be "
                          "incomplete; run `git fetch --unshallow` first")
    commits = git.log(LOCK, head)
    locks = git.show_many([c["commit"] for c in commits], LOCK)
    store = Store(repo)
    groups: dict[str, dict[str, Any]] = {}  # data key -> {"commits": [...], "entries": latest lock entries}
    last: Optional[str] = None
    for info in commits:
        stages = _lock_stages(locks[info["commit"]])
        mine = variant_entries(stages or {}, variant)
        if not mine:
            continue
        key = json.dumps(_identity(mine), sort_keys=True)
        if key == last:
            continue  # nothing of this variant changed in that commit
        last = key
        data_key = json.dumps({s: (mine.get(s) or {}).get("outs") for s in DATASET_STEPS}, sort_keys=True)
        group = groups.setdefault(data_key, {"commits": []})
        group["commits"].append(info)
        group["entries"] = mine
    if not groups:
        raise FmpipeError(f"variant {variant!r}: no commit reachable from {rev} has {LOCK} entries for it "
                          f"(run `dvc repro` and commit {LOCK})")
    versions: list[dict[str, Any]] = []
    missing: set[str] = set()
    for group in groups.values():
        first, latest = group["commits"][0], group["commits"][-1]
        version = Version(variant, latest["commit"][:12], latest["commit"], group["entries"], git, store)
        versions.append({**first, "commits": group["commits"], **version_facts(version, missing)})
    result = {"variant": variant, "rev": rev, "versions": versions}
    if missing:
        result["missing_data"] = sorted(missing)
        result["note"] = ("some versions' data is in neither the DVC cache nor a remote (shown as ?): fetch it "
                          "with `git checkout REV && dvc pull` where a remote is configured, else rebuild it with "
                          "`git checkout REV && dvc repro`; then run the audit again")
    return result


def _identity(entries: dict[str, Any]) -> dict[str, Any]:
    return {step: {k: e.get(k) for k in ("deps", "params", "outs")} for step, e in entries.items()}


def version_facts(v: Version, missing: Optional[set[str]] = None) -> dict[str, Any]:
    """The facts of one version that the history shows; unreadable parts become None."""
    missing = missing if missing is not None else set()

    def get(step: str, name: str, kind: type[A]) -> Optional[A]:
        # Lenient: an old commit's file may carry keys this version no longer writes.
        if step not in v.stages:
            return None
        try:
            raw = v.json(step, name)
            return None if raw is None else kind.parse(raw, f"{v.label}:{step}/{name}", lenient=True)
        except (FmpipeError, ValueError):
            missing.add(f"{v.label}:{step}")
            return None

    hashes = {step: _short(v.out_md5(step)) for step in STEPS if step in v.stages}
    annotate, clean, collect = (get(step, REPORT, DatasetReport) for step in ("annotate", "clean", "collect"))
    summary = get("validate", "summary.json", ValidationSummary)
    metrics = get("evaluate", "metrics.json", Metrics)
    blessing = get("evaluate", "blessing.json", Blessing)
    removed: dict[str, int] = {}
    for rep in (collect, clean):
        for reason, k in (rep.removed_by_reason if rep else {}).items():
            removed[reason] = removed.get(reason, 0) + int(k)
    extra = (annotate.model_extra or {}) if annotate else {}
    changes = extra.get("changes") or []
    annotators: dict[str, int] = {}
    for c in changes:
        who = c.get("annotator") or c.get("note") or "unknown"
        annotators[who] = annotators.get(who, 0) + 1
    data = annotate or clean
    facts: dict[str, Any] = {
        "hashes": hashes,
        "rows": data.rows_out if data else None,
        "rows_by_split": data.rows_by_split if data else None,
        "rows_by_class": data.rows_by_class if data else None,
        "removed_by_reason": removed if (collect or clean) else None,
        "validation": None if summary is None else {
            "success": summary.success, "expectations": summary.expectations, "failed": len(summary.failed)},
        "label_changes": None if annotate is None else int(extra.get("labels_changed", len(changes))),
        "annotators": annotators if annotate is not None else None,
        "metrics": None if metrics is None else metrics.model_dump(include={"accuracy", "macro_f1", "n_test"}),
        "blessed": None if blessing is None else blessing.blessed,
    }
    return facts


def _short(md5: Optional[str]) -> Optional[str]:
    return None if not md5 else md5.replace(".dir", "")[:8]


def history_markdown(h: dict[str, Any]) -> str:
    out = [f"# Data versions of `{h['variant']}`", "",
           "| " + " | ".join(c["header"] for c in HISTORY_COLUMNS) + " |",
           "|" + "---|" * len(HISTORY_COLUMNS)]
    for r in h["versions"]:
        out.append("| " + " | ".join(_history_cells(r)).replace("\n", " ") + " |")
    if h.get("note"):
        out += ["", f"Note: {h['note']}"]
    return "\n".join(out) + "\n"


# The history's columns; ``priority`` says which go first when a terminal is too narrow.
HISTORY_COLUMNS = [
    {"header": "data", "priority": 1, "no_wrap": True},
    {"header": "commits", "priority": 2},
    {"header": "date", "priority": 5, "no_wrap": True},
    {"header": "rows train/val/test", "priority": 3, "no_wrap": True},
    {"header": "label changes", "priority": 4},
    {"header": "validation", "priority": 6},
    {"header": "accuracy", "priority": 7, "no_wrap": True, "justify": "right"},
    {"header": "blessed", "priority": 8, "no_wrap": True},
    {"header": "removed", "priority": 9},
    {"header": "message", "priority": 10},
    {"header": "author", "priority": 11},
    {"header": "collect/clean", "priority": 12, "no_wrap": True},
]


def _history_cells(r: dict[str, Any]) -> list[str]:
    h = r["hashes"]
    split = r.get("rows_by_split") or {}
    removed = r.get("removed_by_reason")
    val = r.get("validation")
    m = r.get("metrics") or {}
    changes = r.get("label_changes")
    who = ", ".join(f"{k}: {v}" for k, v in (r.get("annotators") or {}).items())
    commits = r.get("commits") or [r]
    return [
        h.get("annotate") or h.get("clean") or h.get("collect") or "-",
        " ".join(c["commit"][:8] for c in commits),
        r["date"][:10],
        "/".join(str(split.get(s, "?")) for s in ("train", "val", "test")) if split else "?",
        "?" if changes is None else (f"{changes}" + (f" ({who})" if who else "")),
        "?" if val is None else (f"passed ({val['expectations']})" if val["success"] else f"FAILED ({val['failed']})"),
        "?" if m.get("accuracy") is None else f"{m['accuracy']:.4f}",
        "?" if r.get("blessed") is None else ("yes" if r["blessed"] else "no"),
        "?" if removed is None else (", ".join(f"{k}: {v}" for k, v in removed.items()) or "0"),
        "; ".join(dict.fromkeys(c["message"] for c in commits)),
        ", ".join(dict.fromkeys(c["author"] for c in commits)),
        "/".join(h.get(s) or "-" for s in ("collect", "clean")),
    ]


def history_text(h: dict[str, Any], wide: bool = False) -> str:
    """The history as a terminal table that fits the terminal's width (``wide``: every column)."""
    from pipeline.console import print_table

    title = (f"data versions of {h['variant']}, oldest first (data: the dataset's md5; commits: every commit "
             "that recorded it; accuracy/blessed: the latest of those commits)")
    text = print_table(title, HISTORY_COLUMNS, [_history_cells(r) for r in h["versions"]], wide)
    return text + (f"\nnote: {h['note']}" if h.get("note") else "")
