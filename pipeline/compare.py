"""``fmpipe compare A B``: what changed between two versions of the pipeline's results.

A and B are each a git revision or branch, a DVC experiment (its name or ``refs/exps/...``
ref), ``workspace``, or a package (``data/<v>/package``, a copy of one, or its ``.tar.gz``).
For every variant both sides hold, the comparison names:

- params that changed (the variant's section of ``params.yaml``, flattened to dotted keys);
- metrics (``evaluate/metrics.json``) and per-class precision/recall/F1, with the change; a
  per-slice hook (``per_slice``) that stays empty until the pipeline defines slices;
- data: rows added, removed and relabelled per split, row-level from the annotate manifests
  (``pipeline.audit.diff.diff_between``, the same diff ``fmpipe audit diff`` prints);
- the model (weights hash, architecture) and the lineage: which step's code, data, params or
  outputs differ in the ``dvc.lock`` entries (a package carries them in ``lineage.json``).

Revisions are read the way the audit reads them (``pipeline.audit``, the package): ``dvc.lock`` and the
uncached metrics from git, manifests from DVC's cache or remote by the md5 the lock names;
nothing in the workspace is touched. A part a side cannot supply (a package has no
``per_class.csv``, data not in any cache) is reported as unavailable, not fatal.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.audit.diff import diff_between
from pipeline.reading import load_yaml
from pipeline.audit.git import Git
from pipeline.audit.model import read_lineage
from pipeline.audit.store import Store
from pipeline.audit.version import LOCK, WORKSPACE, Version, _lock_stages, variant_entries
from pipeline.errors import FmpipeError
from pipeline.steps import ORDER as STEPS

PER_CLASS_KEYS = ("precision", "recall", "f1")
_CODE = ("stages/", "pipeline/")  # dvc.yaml deps that are the project's code


@dataclass
class State:
    """One variant as one side holds it."""

    variant: str
    params: Optional[dict[str, Any]]
    metrics: Optional[dict[str, Any]]
    per_class: Optional[dict[str, dict[str, float]]]  # class -> precision/recall/f1/support
    lock: dict[str, Any]  # step -> dvc.lock entry (deps, params, outs)
    version: Version  # reads the variant's data (manifests) at this side
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class Side:
    label: str  # what the user typed
    kind: str  # revision, experiment, workspace, package
    commit: Optional[str]
    variants: dict[str, State]


# ---------------------------------------------------------------- reading a side

def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _per_class_csv(raw: Optional[bytes]) -> Optional[dict[str, dict[str, float]]]:
    if raw is None:
        return None
    import pandas as pd

    frame = pd.read_csv(io.BytesIO(raw))
    return {str(r["class"]): {k: (int(r[k]) if k == "support" else float(r[k])) for k in (*PER_CLASS_KEYS, "support") if k in r}
            for r in frame.to_dict("records")}


def _per_class_predictions(raw: Optional[bytes]) -> Optional[dict[str, dict[str, float]]]:
    """Per-class scores from ``predictions.parquet`` (a package has no ``per_class.csv``)."""
    if raw is None:
        return None
    import pandas as pd

    p = pd.read_parquet(io.BytesIO(raw), columns=["label_name", "predicted_name"])
    out = {}
    for cls in sorted(set(p["label_name"]) | set(p["predicted_name"])):
        tp = int(((p["label_name"] == cls) & (p["predicted_name"] == cls)).sum())
        support = int((p["label_name"] == cls).sum())
        predicted = int((p["predicted_name"] == cls).sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[str(cls)] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def _normalised(section: Any) -> Any:
    """A variant's params as a package's lineage records them: validated, defaults filled in,
    so a revision and a package compare like for like. An old revision's section that the
    current schema rejects is compared as written."""
    if not isinstance(section, dict):
        return section
    from pydantic import ValidationError

    from pipeline.config import VariantSpec

    try:
        return VariantSpec.model_validate(section).model_dump(mode="json", by_alias=True)
    except ValidationError:
        return section


def _weights_md5(lock: dict[str, Any], variant: str) -> Optional[str]:
    for out in (lock.get("train") or {}).get("outs") or []:
        if str(out.get("path", "")).endswith("/model.safetensors"):
            return out.get("md5")
    return None


def _state(variant: str, version: Version, params: Optional[dict], metrics: Optional[dict],
           model: dict[str, Any]) -> State:
    per_class = None
    try:
        per_class = _per_class_csv(version.read("evaluate", "per_class.csv", required=False))
        if per_class is None:
            per_class = _per_class_predictions(version.read("evaluate", "predictions.parquet", required=False))
    except FmpipeError:
        per_class = None  # not in any cache: reported as unavailable
    lock = version.stages
    model = {**model, "weights_md5": _weights_md5(lock, variant)}
    if params and isinstance(params.get("model"), dict):
        model.setdefault("name", params["model"].get("name"))
        model.setdefault("options", params["model"].get("options"))
    return State(variant, params, metrics, per_class, lock, version, model)


def _revision_side(label: str, commit: str, kind: str, git: Git, store: Store, stage: Optional[str]) -> Side:
    stages = _lock_stages(git.show(commit, LOCK))
    if stages is None:
        raise FmpipeError(f"{label}: no {LOCK} at that revision ({commit[:12]}); nothing had been run "
                          f"through `dvc repro` and committed there")
    raw_params = git.show(commit, "params.yaml")
    # Bounded like every params.yaml fmpipe reads (an alias bomb at some old revision is refused).
    params = (load_yaml(raw_params.decode() if isinstance(raw_params, bytes) else raw_params,
                        f"params.yaml at {label}") or {}) if raw_params else {}
    params = params if isinstance(params, dict) else {}
    all_params = params.get("variants") or {}
    variants = sorted({name.split("@", 1)[1] for name in stages if "@" in name})
    if raw_params:  # dvc.lock keeps the entries of variants no longer enabled: not compared
        enabled = params.get("enabled")
        variants = [v for v in variants if not isinstance(enabled, list) or v in enabled]
    if stage is not None:
        variants = [v for v in variants if v == stage]
    out: dict[str, State] = {}
    for v in variants:
        version = Version(v, label, commit, variant_entries(stages, v), git, store)
        metrics = None
        try:
            metrics = version.json("evaluate", "metrics.json")
        except FmpipeError:
            pass
        out[v] = _state(v, version, _normalised(all_params.get(v)), metrics, {})
    return Side(label, kind, commit, out)


def _workspace_side(root: Path, git: Git, store: Store, stage: Optional[str]) -> Side:
    stages = _lock_stages((root / LOCK).read_bytes()) if (root / LOCK).exists() else {}
    params = (load_yaml((root / "params.yaml").read_text(), "params.yaml") or {}) if (root / "params.yaml").exists() else {}
    variants = sorted({name.split("@", 1)[1] for name in stages if "@" in name})
    if isinstance((params or {}).get("enabled"), list):
        variants = [v for v in variants if v in params["enabled"]]
    out = {}
    for v in variants if stage is None else [v for v in variants if v == stage]:
        version = Version(v, WORKSPACE, None, variant_entries(stages, v))
        raw = version.read("evaluate", "metrics.json", required=False)
        out[v] = _state(v, version, _normalised(((params or {}).get("variants") or {}).get(v)),
                        json.loads(raw) if raw else None, {})
    return Side(WORKSPACE, "workspace", None, out)


def package_side(label: str, lineage, git: Git, store: Store, kind: str = "package") -> Side:
    """A side from a package's ``lineage.json`` (a :class:`pipeline.artefacts.Lineage`)."""
    v = lineage.variant
    stages = (lineage.dvc_lock or {}).get("stages") or {}
    # "package" as the version's label: its fetch hint points at `fmpipe audit model`.
    version = Version(v, "package", "package", variant_entries(stages, v), git, store)
    model = {"name": lineage.model.name, "options": lineage.model.options, "n_params": lineage.model.n_params,
             "sha256": lineage.model.sha256}
    metrics = lineage.metrics.model_dump(exclude_none=True)
    return Side(label, kind, None, {v: _state(v, version, lineage.params, metrics, model)})


def open_side(spec: str, root: str | Path = ".", git: Optional[Git] = None, store: Optional[Store] = None,
              stage: Optional[str] = None) -> Side:
    """What ``spec`` names: a package (directory or archive), ``workspace``, a revision or an experiment."""
    root = Path(root)
    git = git or Git(root)
    store = store or Store(root)
    path = Path(spec)
    if path.exists() and (path.is_dir() or tarfile.is_tarfile(path)):
        return package_side(spec, read_lineage(path), git, store)
    if spec == WORKSPACE:
        return _workspace_side(root, git, store, stage)
    git.check_repo()
    try:
        return _revision_side(spec, git.resolve(spec), "revision", git, store, stage)
    except FmpipeError as not_a_revision:
        ref = _experiment_ref(spec, store)
        if ref is None:
            raise FmpipeError(f"{spec!r}: neither a package directory, a git revision nor a DVC experiment "
                              f"({not_a_revision})") from None
        return _revision_side(spec, git.resolve(ref), "experiment", git, store, stage)


def _experiment_ref(name: str, store: Store) -> Optional[str]:
    """The ``refs/exps/...`` ref of a DVC experiment name (as ``dvc exp show`` lists it)."""
    from dvc.repo.experiments.utils import resolve_name

    try:
        found = resolve_name(store.repo.scm, name).get(name)
    except FmpipeError:
        raise
    except Exception as exc:  # e.g. AmbiguousExpRefInfo: two experiments share the name
        raise FmpipeError(f"experiment {name!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return str(found) if found is not None else None


# ---------------------------------------------------------------- differences

def _changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append({"key": key, "a": a.get(key), "b": b.get(key)})
    return out


def _metrics(a: Optional[dict], b: Optional[dict]) -> Optional[list[dict[str, Any]]]:
    if a is None or b is None:
        return None
    fa, fb = _flatten(a), _flatten(b)
    rows = []
    for key in [k for k in fa if k in fb] + [k for k in fb if k not in fa]:
        va, vb = fa.get(key), fb.get(key)
        row: dict[str, Any] = {"key": key, "a": va, "b": vb}
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            row["change"] = vb - va
        rows.append(row)
    return rows


def _per_class(a: Optional[dict], b: Optional[dict]) -> Optional[list[dict[str, Any]]]:
    if a is None or b is None:
        return None
    rows = []
    for cls in sorted(set(a) | set(b)):
        ra, rb = a.get(cls) or {}, b.get(cls) or {}
        row: dict[str, Any] = {"class": cls}
        for k in (*PER_CLASS_KEYS, "support"):
            row[k] = {"a": ra.get(k), "b": rb.get(k)}
            if ra.get(k) is not None and rb.get(k) is not None:
                row[k]["change"] = rb[k] - ra[k]
        row["changed"] = any(row[k]["a"] != row[k]["b"] for k in (*PER_CLASS_KEYS, "support"))
        rows.append(row)
    return rows


def _per_slice(a: State, b: State) -> None:
    """Per-slice differences: the pipeline defines no slices yet. When it does (a slice column
    in the manifest and per-slice scores from evaluate), compare them here, like ``_per_class``."""
    return None


def _data(a: State, b: State) -> dict[str, Any]:
    md5_a = (a.version.out_md5("annotate") if a.version.commit else None)
    md5_b = (b.version.out_md5("annotate") if b.version.commit else None)
    if md5_a and md5_a == md5_b:
        return {"same": True, "md5": md5_a}
    try:
        d = diff_between(a.version, b.version, "annotate")
        split_of = b.version.manifest("annotate").set_index("id")["split"].astype(str)
        split_of.index = split_of.index.astype(str)
    except (FmpipeError, ValueError, OSError) as exc:
        return {"error": str(exc)}
    by_split: dict[str, dict[str, int]] = {}

    def bump(split: Any, key: str) -> None:
        row = by_split.setdefault(str(split), {"added": 0, "removed": 0, "relabelled": 0})
        row[key] += 1

    for r in d["added"]:
        bump(r["split"], "added")
    for r in d["removed"]:
        bump(r["split"], "removed")
    for r in d["relabelled"]:
        bump(split_of.get(str(r["id"]), "?"), "relabelled")
    keep = ("rows_old", "rows_new", "added", "removed", "relabelled", "content_changed", "split_changed",
            "unchanged", "per_class")
    return {"same": False, "by_split": dict(sorted(by_split.items())), **{k: d[k] for k in keep}}


def _lineage(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per step: which code, data, params and outputs differ between two sets of dvc.lock entries."""
    steps: dict[str, Any] = {}
    # Only steps both sides ran: a package records the steps upstream of it, not dist or report.
    for step in [s for s in STEPS if s in a and s in b]:
        ea, eb = a[step], b[step]
        deps_a = {d["path"]: d.get("md5") for d in ea.get("deps") or []}
        deps_b = {d["path"]: d.get("md5") for d in eb.get("deps") or []}
        deps = [c["key"] for c in _changes(deps_a, deps_b)]
        outs_a = {o["path"]: o.get("md5") for o in ea.get("outs") or []}
        outs_b = {o["path"]: o.get("md5") for o in eb.get("outs") or []}
        entry = {
            "code": [p for p in deps if p.startswith(_CODE)],
            # files people edit (annotations, expectations): the registry's step sources
            "sources": [p for p in deps if not p.startswith(("data/", *_CODE))],
            "data": [p for p in deps if p.startswith("data/")],
            "params": [c["key"] for c in _changes(_flatten(ea.get("params") or {}), _flatten(eb.get("params") or {}))],
            "outs": [c["key"] for c in _changes(outs_a, outs_b)],
        }
        if any(entry.values()):
            steps[step] = entry
    return steps


def compare_states(a: State, b: State) -> dict[str, Any]:
    model_a, model_b = a.model, b.model
    same_weights = (model_a.get("weights_md5") == model_b.get("weights_md5")
                    if model_a.get("weights_md5") and model_b.get("weights_md5") else
                    model_a.get("sha256") == model_b.get("sha256") if model_a.get("sha256") and model_b.get("sha256")
                    else None)
    return {
        "params": None if a.params is None or b.params is None else _changes(_flatten(a.params), _flatten(b.params)),
        "metrics": _metrics(a.metrics, b.metrics),
        "per_class": _per_class(a.per_class, b.per_class),
        "per_slice": _per_slice(a, b),
        "data": _data(a, b),
        "model": {"a": model_a, "b": model_b, "same_weights": same_weights},
        "lineage": _lineage(a.lock, b.lock),
    }


def compare_sides(a: Side, b: Side) -> dict[str, Any]:
    both = [v for v in a.variants if v in b.variants]
    return {
        "a": {"label": a.label, "kind": a.kind, "commit": a.commit},
        "b": {"label": b.label, "kind": b.kind, "commit": b.commit},
        "variants": {v: compare_states(a.variants[v], b.variants[v]) for v in both},
        "only_in_a": sorted(set(a.variants) - set(b.variants)),
        "only_in_b": sorted(set(b.variants) - set(a.variants)),
    }


def compare(spec_a: str, spec_b: str, root: str | Path = ".", stage: Optional[str] = None) -> dict[str, Any]:
    git, store = Git(root), Store(root)
    a = open_side(spec_a, root, git, store, stage)
    b = open_side(spec_b, root, git, store, stage)
    result = compare_sides(a, b)
    if not result["variants"]:
        which = f"variant {stage!r}" if stage else "any variant"
        raise FmpipeError(f"{spec_a} and {spec_b}: no {which} in both (A has {', '.join(a.variants) or 'none'}, "
                          f"B has {', '.join(b.variants) or 'none'})")
    return result


# ---------------------------------------------------------------- rendering

def fmt_value(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 1e5 else f"{x:.4g}"
    if x is None:
        return "-"
    return json.dumps(x) if isinstance(x, (dict, list)) else str(x)


def fmt_change(ch: Any) -> str:
    return "" if ch is None or ch == 0 else f"{ch:+.4f}" if isinstance(ch, float) else f"{ch:+d}"


def _delta(row: dict[str, Any]) -> str:
    return fmt_change(row.get("change"))


def _short(h: Optional[str]) -> str:
    return "-" if not h else h.replace(".dir", "")[:12]


def variant_facts(v: str, c: dict[str, Any], show: int = 10) -> list[tuple[str, list[str]]]:
    """``(heading, lines)`` per part of one variant's comparison: the text both the terminal and
    the Markdown renderers print (the report builds its tables from the same dict)."""
    parts: list[tuple[str, list[str]]] = []
    p = c["params"]
    parts.append(("params", ["unavailable"] if p is None else
                  [f"{r['key']}: {fmt_value(r['a'])} -> {fmt_value(r['b'])}" for r in p] or ["no change"]))
    m = c["metrics"]
    lines = ["unavailable (no evaluate/metrics.json on one side)"] if m is None else [
        f"{r['key']}: {fmt_value(r['a'])} -> {fmt_value(r['b'])} {_delta(r)}".rstrip() for r in m
        if r["a"] != r["b"]] or ["no change"]
    parts.append(("metrics", lines))
    pc = c["per_class"]
    if pc is None:
        parts.append(("per class", ["unavailable (per_class.csv / predictions not readable on one side)"]))
    else:
        changed = [r for r in pc if r["changed"]]
        parts.append(("per class", [
            f"{r['class']}: F1 {fmt_value(r['f1']['a'])} -> {fmt_value(r['f1']['b'])}"
            + (f" ({r['f1']['change']:+.4f})" if r["f1"].get("change") else "")
            + f", recall {fmt_value(r['recall']['a'])} -> {fmt_value(r['recall']['b'])}"
            + (f", support {fmt_value(r['support']['a'])} -> {fmt_value(r['support']['b'])}"
               if r["support"]["a"] != r["support"]["b"] else "")
            for r in changed] or [f"no change ({len(pc)} classes)"]))
    d = c["data"]
    if d.get("error"):
        lines = [f"unavailable: {d['error']}"]
    elif d.get("same"):
        lines = [f"same annotated data (md5 {_short(d['md5'])})"]
    else:
        lines = [f"{d['rows_old']} -> {d['rows_new']} rows: {len(d['added'])} added, {len(d['removed'])} removed, "
                 f"{len(d['relabelled'])} relabelled, {len(d['content_changed'])} content changed, "
                 f"{len(d['split_changed'])} moved between splits"]
        for split, k in d["by_split"].items():
            lines.append(f"{split}: " + ", ".join(f"{n} {what}" for what, n in k.items() if n))
        for r in d["relabelled"][:show]:
            lines.append(f"relabelled {r['id']}: {r['from']} -> {r['to']}"
                         + (f" ({r['annotator']})" if r.get("annotator") else ""))
        for r in d["removed"][:show]:
            lines.append(f"removed {r['id']} [{r['split']}, {r['label']}]: {r.get('reason', '?')}")
        for r in d["added"][:show]:
            lines.append(f"added {r['id']} [{r['split']}, {r['label']}]")
        more = sum(max(0, len(d[k]) - show) for k in ("relabelled", "removed", "added"))
        if more:
            lines.append(f"... {more} more rows (--json lists every one)")
    parts.append(("data", lines))
    mo = c["model"]
    a, b = mo["a"], mo["b"]
    # Two packages: their sha256 (what the model card and `fmpipe verify` show); else dvc.lock's md5.
    kind = "sha256" if a.get("sha256") and b.get("sha256") else "md5"
    key = "sha256" if kind == "sha256" else "weights_md5"
    if mo["same_weights"]:
        lines = [f"same weights ({a.get('name')}, {kind} {_short(a.get(key))})"]
    else:
        lines = [f"weights {kind} {_short(a.get(key))} -> {_short(b.get(key))}"
                 + ("" if mo["same_weights"] is False else " (not comparable)")]
        if a.get("name") != b.get("name") or a.get("options") != b.get("options"):
            lines.append(f"architecture {a.get('name')} {fmt_value(a.get('options'))} -> {b.get('name')} {fmt_value(b.get('options'))}")
    parts.append(("model", lines))
    lin = c["lineage"]
    lines = []
    for step, e in lin.items():
        # Code and params are causes, named; changed inputs and outputs are mostly their
        # consequences downstream, counted (--json names them).
        bits = [f"{k} {', '.join(p.removeprefix('params.yaml.') for p in e[k])}" for k in ("code", "sources", "params")
                if e[k]]
        bits += [f"{len(e[k])} {name} changed" for k, name in (("data", "inputs"), ("outs", "outputs")) if e[k]]
        lines.append(f"{step}: " + "; ".join(bits))
    parts.append(("lineage (dvc.lock)", lines or ["no change"]))
    if c.get("per_slice") is not None:
        parts.append(("per slice", [json.dumps(c["per_slice"])]))
    return parts


def _title(r: dict[str, Any]) -> str:
    def one(s: dict[str, Any]) -> str:
        return s["label"] + (f" ({s['kind']} {s['commit'][:10]})" if s.get("commit") else f" ({s['kind']})")
    return f"{one(r['a'])} -> {one(r['b'])}"


def text_lines(r: dict[str, Any], width: Optional[int] = None) -> list[str]:
    """The comparison for a terminal: every line fits ``width`` (wrapped, never cut)."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    width = max(40, width)
    out = textwrap.wrap(f"compare {_title(r)}", width, subsequent_indent="    ")
    for v, c in r["variants"].items():
        out.append(f"{v}:")
        for heading, lines in variant_facts(v, c):
            out += textwrap.wrap(f"{heading}:", width, initial_indent="  ")
            for line in lines:
                out += textwrap.wrap(line, width, initial_indent="    ", subsequent_indent="      ",
                                     break_on_hyphens=False)
    for key, side in (("only_in_a", "A"), ("only_in_b", "B")):
        if r.get(key):
            out.append(f"only in {side}: {', '.join(r[key])}")
    return out


def _md(x: Any) -> str:
    return fmt_value(x).replace("|", "\\|")


def markdown(r: dict[str, Any]) -> str:
    out = [f"# Compare {_title(r)}", ""]
    for v, c in r["variants"].items():
        out += [f"## {v}", ""]
        if c["params"]:
            out += ["### Params", "", "| param | A | B |", "|---|---|---|"]
            out += [f"| {row['key']} | {_md(row['a'])} | {_md(row['b'])} |" for row in c["params"]] + [""]
        if c["metrics"]:
            out += ["### Metrics", "", "| metric | A | B | change |", "|---|---|---|---|"]
            out += [f"| {row['key']} | {_md(row['a'])} | {_md(row['b'])} | {_delta(row)} |" for row in c["metrics"]] + [""]
        if c["per_class"]:
            out += ["### Per class", "", "| class | F1 A | F1 B | recall A | recall B | support A | support B |",
                    "|---|---|---|---|---|---|---|"]
            out += [f"| {row['class']} | {_md(row['f1']['a'])} | {_md(row['f1']['b'])} | {_md(row['recall']['a'])} | "
                    f"{_md(row['recall']['b'])} | {_md(row['support']['a'])} | {_md(row['support']['b'])} |"
                    for row in c["per_class"]] + [""]
        for heading, lines in variant_facts(v, c):
            if heading in ("data", "model", "lineage (dvc.lock)") or (heading == "params" and not c["params"]):
                out += [f"### {heading.capitalize()}", ""] + [f"- {line}" for line in lines] + [""]
    for key, side in (("only_in_a", "A"), ("only_in_b", "B")):
        if r.get(key):
            out.append(f"Only in {side}: {', '.join(r[key])}")
    return "\n".join(out).rstrip() + "\n"
