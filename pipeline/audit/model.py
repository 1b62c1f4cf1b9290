"""A model's lineage: from a package alone, the data version, params and code it records; with
the repository, the commits that recorded them and the diff of its data against today's."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, Optional

from pipeline.artefacts import Lineage
from pipeline.audit.diff import diff_between, summary_lines
from pipeline.audit.git import Git
from pipeline.audit.store import Store
from pipeline.audit.version import LOCK, Version, _lock_stages, open_version
from pipeline.errors import FmpipeError
from pipeline.steps import output, upstream_of


def read_lineage(package: str | Path) -> Lineage:
    """``lineage.json`` from a package directory or a package archive (``.tar.gz``), unextracted.

    Read leniently (``Artefact.parse``): an audited package may come from an older fmpipe."""
    path = Path(package)
    if path.is_dir():
        f = path / "lineage.json"
        if not f.exists():
            raise FmpipeError(f"{path}: no lineage.json (expected a package directory, data/<variant>/package)")
        raw = f.read_bytes()
    elif path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name == "lineage.json"
                       and len(Path(m.name).parts) <= 2]
            if not members:
                raise FmpipeError(f"{path}: archive has no lineage.json (expected a package archive)")
            raw = tar.extractfile(min(members, key=lambda m: len(m.name))).read()
    elif not path.exists():
        raise FmpipeError(f"{path}: not found (expected a package directory or a package .tar.gz)")
    else:
        raise FmpipeError(f"{path}: neither a package directory nor a tar archive")
    try:
        lineage = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FmpipeError(f"{path}: lineage.json is not valid JSON ({exc})") from None
    if not isinstance(lineage, dict) or "variant" not in lineage:
        raise FmpipeError(f"{path}: lineage.json has no 'variant' (not an fmpipe package lineage)")
    return Lineage.parse(lineage, f"{path}: lineage.json", lenient=True)


def model_provenance(lineage: Lineage) -> dict[str, Any]:
    """What the package alone says made it: data version, params, code (no repository needed)."""
    variant = lineage.variant
    dvc = lineage.dvc_lock
    stages = dvc.get("stages") or {}
    data = {}
    for step in upstream_of("train"):  # the data steps that made the model
        entry = stages.get(f"{step}@{variant}")
        if entry:
            data[step] = [{"path": o["path"], "md5": o.get("md5")} for o in entry.get("outs") or []]
    code: dict[str, str] = {}
    for entry in stages.values():
        for dep in entry.get("deps") or []:
            if not str(dep.get("path", "")).startswith("data/"):
                code[dep["path"]] = dep.get("md5")
    return {
        "variant": variant,
        "model": lineage.model.model_dump(include={"name", "sha256", "n_params"}),
        "recorded": bool(dvc.get("available")),
        "matches_model": dvc.get("matches_model"),
        "data_version": data,
        "rows_by_split": lineage.data.rows_by_split,
        "rows_by_class": lineage.data.rows_by_class,
        "params": lineage.params,
        "code": dict(sorted(code.items())),
        "metrics": lineage.metrics.model_dump(include={"accuracy", "macro_f1", "n_test"}),
        "blessed": lineage.blessing.blessed,
    }


def find_commits(lineage: Lineage, repo: str = ".", rev: str = "HEAD") -> list[dict[str, str]]:
    """Commits (oldest first) whose dvc.lock holds exactly the package's upstream entries."""
    want = lineage.dvc_lock.get("stages") or {}
    if not want:
        return []
    git = Git(repo)
    git.check_repo()
    commits = git.log(LOCK, git.resolve(rev))
    locks = git.show_many([c["commit"] for c in commits], LOCK)
    found = []
    for info in commits:
        stages = _lock_stages(locks[info["commit"]]) or {}
        if all(name in stages and {k: stages[name].get(k) for k in ("deps", "params", "outs") if k in e} == e
               for name, e in want.items()):
            found.append(info)
    return found


def audit_model(package: str | Path, repo: Optional[str] = ".", against: str = "HEAD") -> dict[str, Any]:
    """The provenance of a package; with a repository, its commit and the diff to current data."""
    lineage = read_lineage(package)
    result: dict[str, Any] = {"package": str(package), **model_provenance(lineage)}
    if repo is None:
        return result
    git = Git(repo)
    if git.run("rev-parse", "--is-inside-work-tree", check=False).returncode != 0:
        result["repository"] = None
        return result
    commits = find_commits(lineage, repo)
    result["commits"] = commits
    result["commit"] = commits[0] if commits else None
    variant = lineage.variant
    annotate = (result["data_version"].get("annotate") or [{}])[0].get("md5")
    if annotate:
        store = Store(repo)
        made = Version(variant, "package", "package", {"annotate": {"outs": [
            {"path": str(output("annotate", variant)), "md5": annotate}]}}, git, store)
        now = open_version(variant, against, repo, git, store, need_step="annotate")
        try:
            result["diff_to_current"] = diff_between(made, now, "annotate")
        except FmpipeError as exc:
            result["diff_to_current"] = {"error": str(exc)}
    return result


def model_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"package {r['package']}: variant {r['variant']}, model {r['model']['name']} "
             f"(weights sha256 {str(r['model']['sha256'])[:12]})"]
    if not r["recorded"]:
        lines.append("  no dvc.lock entries recorded (packaged outside `dvc repro`): data version unknown")
    for step, outs in r["data_version"].items():
        lines.append(f"  data {step:9s} " + ", ".join(f"{o['path']} md5 {o['md5']}" for o in outs))
    if r.get("matches_model") is False:
        lines.append("  warning: the recorded dvc.lock did not match the packaged weights (plain fmpipe run)")
    split = r.get("rows_by_split") or {}
    lines.append("  rows " + ", ".join(f"{k} {v}" for k, v in split.items()))
    m = r["metrics"]
    lines.append(f"  metrics accuracy {m.get('accuracy')}, macro F1 {m.get('macro_f1')} on {m.get('n_test')} "
                 f"test rows; blessed: {r['blessed']}")
    p = r.get("params") or {}
    for key in ("source", "split", "clean", "model", "train"):
        if key in p:
            lines.append(f"  params {key}: {json.dumps(p[key], sort_keys=True)}")
    lines.append(f"  code: {len(r['code'])} tracked paths hashed (--json lists them)")
    if "commits" in r:
        if r["commit"]:
            c = r["commit"]
            lines.append(f"  made by commit {c['commit'][:12]} ({c['date'][:10]}, {c['author']}): {c['message']}")
            if len(r["commits"]) > 1:
                lines.append(f"  the same data/code/params are recorded by {len(r['commits'])} commits, "
                             f"latest {r['commits'][-1]['commit'][:12]}")
        else:
            lines.append("  no commit on this branch recorded these dvc.lock entries "
                         "(packaged from uncommitted changes, or on another branch)")
        d = r.get("diff_to_current")
        if d and "error" in d:
            lines.append(f"  diff to current data: {d['error']}")
        elif d:
            lines.append(f"  the package's data -> {d['b']}'s data (a relabel reads: package label -> {d['b']} label):")
            lines += ["  " + line for line in summary_lines(d)]
    return lines
