"""Audit: which data made a model, what changed between two data versions, every version.

A *version* of a variant's data is a git revision of this repo: its ``dvc.lock`` names the
md5 of every output (``<step>@<variant>`` entries), and the bytes live in DVC's
content-addressed cache (or a DVC remote). So a revision is read without checking it out:
``dvc.lock`` comes from git (``git cat-file``), each output from DVC's cache by the md5 the
lock names (through DVC's own ``Repo``: its local cache, else its default remote). The
workspace, the index and HEAD are never touched. ``cache: false`` outputs (metrics) are
committed to git and read from the revision's tree.

- ``history``: every commit where the variant's ``dvc.lock`` entries changed, with the data
  hash per step, rows per split/class, removals by reason, the validation result, label
  changes and annotators, the model's metrics and blessing.
- ``diff_versions``: row level between two revisions (or the workspace): added, removed (with
  clean's reason), relabelled (old -> new, source, annotator), content changed, moved between
  splits, and a per-class summary.
- ``audit_model``: from a package directory or archive alone, the data version, params and code
  in its ``lineage.json``; with the repository, the commit(s) that recorded them and the diff
  of its data against the current data.

Every failure a user can cause (unknown revision, variant absent at a revision, data in
neither cache nor remote, shallow clone) is an ``FmpipeError`` with one clear line.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from pipeline.artefacts import A, Blessing, DatasetReport, Lineage, Metrics, ValidationSummary
from pipeline.errors import FmpipeError
from pipeline.manifest import MANIFEST, REPORT
from pipeline.steps import DATASET_STEPS
from pipeline.steps import ORDER as STEPS
from pipeline.steps import output, upstream_of

WORKSPACE = "workspace"
LOCK = "dvc.lock"
_SEP = "\x1f"  # field separator in git's --format output (never in names or messages)
# The output that names a multi-output step's result in the history's hashes.
_MAIN_OUT = {"train": "model.safetensors", "evaluate": "blessing.json", "validate": "summary.json"}


# ---------------------------------------------------------------- git

class Git:
    """Read-only git access by subprocess: revisions, commit facts, blobs at a revision."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)
        self._blobs: dict[tuple[str, str], Optional[bytes]] = {}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["git", *args], cwd=self.root, capture_output=True, check=check, timeout=120)
        except FileNotFoundError:
            raise FmpipeError("git: not found on PATH; the audit reads versions from git history") from None
        except subprocess.CalledProcessError as exc:
            msg = exc.stderr.decode(errors="replace").strip().splitlines()
            raise FmpipeError(f"git {' '.join(args)}: {msg[-1] if msg else 'failed'}") from None

    def check_repo(self) -> None:
        r = self.run("rev-parse", "--is-inside-work-tree", check=False)
        if r.returncode != 0:
            raise FmpipeError(f"{self.root.resolve()}: not a git repository; the audit reads data versions "
                              "from git history (run it in a clone of the project)")

    def is_shallow(self) -> bool:
        return self.run("rev-parse", "--is-shallow-repository", check=False).stdout.strip() == b"true"

    def resolve(self, rev: str) -> str:
        """The full commit id of ``rev``, or a clear error (unknown, or cut off by a shallow clone)."""
        r = self.run("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
        if r.returncode == 0:
            return r.stdout.decode().strip()
        if self.is_shallow():
            raise FmpipeError(f"revision {rev!r}: not found, and this is a shallow clone (history cut off); "
                              "run `git fetch --unshallow` to get the full history")
        raise FmpipeError(f"revision {rev!r}: unknown to git (expected a commit, branch, tag or e.g. HEAD~1)")

    def commit_info(self, commit: str) -> dict[str, str]:
        out = self.run("show", "-s", f"--format=%H{_SEP}%aI{_SEP}%an{_SEP}%s", commit).stdout.decode()
        return dict(zip(("commit", "date", "author", "message"), out.rstrip("\n").split(_SEP)))

    def log(self, path: str, rev: str = "HEAD") -> list[dict[str, str]]:
        """Commits (oldest first) reachable from ``rev`` that changed ``path``."""
        out = self.run("log", "--reverse", f"--format=%H{_SEP}%aI{_SEP}%an{_SEP}%s", rev, "--", path).stdout.decode()
        return [dict(zip(("commit", "date", "author", "message"), line.split(_SEP)))
                for line in out.splitlines() if line]

    def show(self, commit: str, path: str) -> Optional[bytes]:
        """The bytes of ``path`` at ``commit`` (None when the tree has no such file)."""
        key = (commit, path)
        if key not in self._blobs:
            r = self.run("cat-file", "blob", f"{commit}:{path}", check=False)
            self._blobs[key] = r.stdout if r.returncode == 0 else None
        return self._blobs[key]

    def show_many(self, commits: list[str], path: str) -> dict[str, Optional[bytes]]:
        """``path`` at many commits with one ``git cat-file --batch`` (history over many commits)."""
        todo = [c for c in commits if (c, path) not in self._blobs]
        if todo:
            request = "".join(f"{c}:{path}\n" for c in todo).encode()
            out = subprocess.run(["git", "cat-file", "--batch"], cwd=self.root, input=request,
                                 capture_output=True, check=True, timeout=300).stdout
            pos = 0
            for c in todo:
                end = out.index(b"\n", pos)
                header = out[pos:end].split()
                pos = end + 1
                if len(header) == 2 and header[1] == b"missing":
                    self._blobs[(c, path)] = None
                    continue
                size = int(header[2])
                self._blobs[(c, path)] = out[pos:pos + size]
                pos += size + 1
        return {c: self._blobs[(c, path)] for c in commits}


# ---------------------------------------------------------------- DVC objects by hash

class MissingData(FmpipeError):
    """A DVC object is in neither the local cache nor the default remote."""


class Store:
    """DVC-tracked bytes by md5: DVC's local cache first, then the default remote (read-only).

    Uses DVC's own ``Repo`` for where the cache and the remote are (``.dvc/config``, cache.dir,
    any remote type DVC supports); nothing is written to the workspace or the cache.
    """

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)
        self._repo = None
        self._remote: Any = None
        self._remote_error: Optional[str] = None
        self._dirs: dict[str, dict[str, str]] = {}

    @property
    def repo(self):
        if self._repo is None:
            from dvc.repo import Repo

            try:
                self._repo = Repo(str(self.root))
            except Exception as exc:  # NotDvcRepoError and friends: one line, no traceback
                raise FmpipeError(f"{self.root.resolve()}: not a DVC repository ({exc})") from None
        return self._repo

    def _remote_odb(self):
        if self._remote is None and self._remote_error is None:
            try:
                self._remote = self.repo.cloud.get_remote_odb(None, "fetch")
            except Exception as exc:  # NoRemoteError, bad config, missing plugin
                self._remote_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return self._remote

    def read(self, md5: str, remote: bool = True) -> bytes:
        local = self.repo.cache.local
        try:
            with open(local.oid_to_path(md5), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            pass
        odb = self._remote_odb() if remote else None
        if odb is not None:
            try:
                return odb.fs.cat_file(odb.oid_to_path(md5))
            except FileNotFoundError:
                pass
            except Exception as exc:  # network or credentials: say that the remote failed
                raise MissingData(f"DVC object {md5}: not in the local cache, and the default remote failed: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if not remote:
            raise MissingData(f"DVC object {md5}: not in the local cache")
        where = "the default remote" if odb is not None else f"any remote ({self._remote_error})"
        raise MissingData(f"DVC object {md5}: in neither the local cache nor {where}")

    def read_in(self, out_md5: str, relpath: Optional[str], remote: bool = True) -> bytes:
        """A file of an output: the output itself (``relpath`` None) or a file in a directory output."""
        if relpath is None or not out_md5.endswith(".dir"):
            return self.read(out_md5, remote)
        if out_md5 not in self._dirs:
            entries = json.loads(self.read(out_md5, remote))
            self._dirs[out_md5] = {e["relpath"]: e["md5"] for e in entries}
        listing = self._dirs[out_md5]
        if relpath not in listing:
            raise FileNotFoundError(relpath)
        return self.read(listing[relpath], remote)


# ---------------------------------------------------------------- a version of the data

def _lock_stages(raw: Optional[bytes]) -> Optional[dict[str, Any]]:
    if raw is None:
        return None
    import yaml

    from pipeline.reading import BoundedYamlLoader

    try:
        return (yaml.load(raw, Loader=BoundedYamlLoader) or {}).get("stages") or {}
    except (yaml.YAMLError, RecursionError) as exc:
        detail = " ".join(str(exc).split()) or "nested too deeply"
        raise FmpipeError(f"{LOCK}: not valid YAML ({detail})") from None


def _find_out(entry: Optional[dict[str, Any]], path: str) -> Optional[tuple[str, Optional[str]]]:
    """``(output md5, path inside it)`` of ``path`` among a lock entry's outs."""
    for out in (entry or {}).get("outs") or []:
        p = out.get("path", "")
        if path == p:
            return out.get("md5"), None
        if path.startswith(p + "/"):
            return out.get("md5"), path[len(p) + 1:]
    return None


@dataclass
class Version:
    """One version of a variant: a commit's dvc.lock + DVC objects, or the workspace files."""

    variant: str
    label: str  # what the user typed (or WORKSPACE)
    commit: Optional[str]  # None for the workspace
    stages: dict[str, Any]  # this variant's dvc.lock entries, by step
    git: Optional[Git] = None
    store: Optional[Store] = None

    def fetch_hint(self, step: str) -> str:
        name = f"{step}@{self.variant}"
        at = "the commit that made the package (`fmpipe audit model --json` names it)" if self.label == "package" \
            else self.label
        checkout = "git checkout COMMIT" if self.label == "package" else f"git checkout {self.label}"
        if self.store is None or self.store._remote_odb() is None:
            # A fresh clone has no DVC remote: `dvc pull` would only fail again.
            return (f"no DVC remote is configured here, so rebuild it at {at}: "
                    f"`{checkout} && dvc repro {name}` (then `git checkout -`), or `dvc remote add -d NAME URL` "
                    f"for a remote that holds it and `dvc pull {name}` there")
        return (f"fetch it at {at}: `{checkout} && dvc pull {name}` (then `git checkout -`); if the remote "
                f"does not have it either, rebuild it with `{checkout} && dvc repro {name}`")

    def read(self, step: str, name: Optional[str] = None, required: bool = True) -> Optional[bytes]:
        """The bytes of ``data/<variant>/<step>/<name>`` in this version."""
        path = str(output(f"{step}/{name}" if name else step, self.variant))
        if self.commit is None:
            try:
                return Path(path).read_bytes()
            except FileNotFoundError:
                if required:
                    raise FmpipeError(f"{path}: not found in the workspace; "
                                      f"run `dvc repro {step}@{self.variant}` (or `dvc pull` where a DVC remote "
                                      "holds it)") from None
                return None
        entry = self.stages.get(step)
        found = _find_out(entry, path)
        if found is None or not found[0]:
            if entry is None:
                if required:
                    raise FmpipeError(f"{step}@{self.variant}: no dvc.lock entry at {self.label} "
                                      f"(that step had not run for {self.variant!r} in that commit)")
                return None
            # Declared but not hashed into the cache? (cache: false outputs are committed to git.)
            blob = self.git.show(self.commit, path)
            if blob is None and required:
                raise FmpipeError(f"{path}: not recorded at {self.label}")
            return blob
        md5, inner = found
        missing: Optional[MissingData] = None
        for remote in (False, True):
            try:
                return self.store.read_in(md5, inner, remote)
            except FileNotFoundError:
                if required:
                    raise FmpipeError(f"{path}: not in the output {step}@{self.variant} at {self.label}") from None
                return None
            except MissingData as exc:
                missing = exc
            if not remote:
                # cache: false outputs (metrics) are committed to git instead: the tree has them.
                blob = self.git.show(self.commit, path) if self.git else None
                if blob is not None:
                    return blob
        if not required:
            return None
        raise FmpipeError(f"{path} at {self.label} ({self.variant} {step} data, md5 {md5}): {missing}; "
                          f"{self.fetch_hint(step)}") from None

    def manifest(self, step: str) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(self.read(step, MANIFEST)))

    def json(self, step: str, name: str, required: bool = False) -> Optional[dict[str, Any]]:
        raw = self.read(step, name, required=required)
        return None if raw is None else json.loads(raw)

    def out_md5(self, step: str) -> Optional[str]:
        outs = (self.stages.get(step) or {}).get("outs") or []
        for out in outs:
            if step in _MAIN_OUT and str(out.get("path", "")).endswith("/" + _MAIN_OUT[step]):
                return out.get("md5")
        return outs[0].get("md5") if outs else None


def open_version(variant: str, rev: Optional[str], root: str | Path = ".", git: Optional[Git] = None,
                 store: Optional[Store] = None, need_step: Optional[str] = None) -> Version:
    """The version of ``variant`` at git revision ``rev`` (or the workspace)."""
    if rev in (None, WORKSPACE):
        return Version(variant, WORKSPACE, None, {})
    git = git or Git(root)
    git.check_repo()
    commit = git.resolve(rev)
    stages = _lock_stages(git.show(commit, LOCK))
    if stages is None:
        raise FmpipeError(f"{LOCK}: not in revision {rev!r} ({commit[:12]}); nothing had been run "
                          f"through `dvc repro` and committed there")
    mine = variant_entries(stages, variant)
    if not mine:
        there = sorted({name.split("@", 1)[1] for name in stages if "@" in name})
        raise FmpipeError(f"variant {variant!r}: not in {LOCK} at revision {rev!r} ({commit[:12]}); "
                          f"variants there: {', '.join(there) or 'none'}")
    if need_step and need_step not in mine:
        raise FmpipeError(f"{need_step}@{variant}: no {LOCK} entry at revision {rev!r} ({commit[:12]})")
    return Version(variant, rev, commit, mine, git, store or Store(root))


def variant_entries(stages: dict[str, Any], variant: str) -> dict[str, Any]:
    return {step: stages[f"{step}@{variant}"] for step in STEPS if f"{step}@{variant}" in stages}


# ---------------------------------------------------------------- row-level diff

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
    added_rows = [{"id": i, "split": n.at[i, "split"], "label": n.at[i, "label_name"]} for i in sorted(added)]

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
        return f"{item['id']} [{item['split']}, {item['label']}]"
    return f"{item['id']}: {item['from']} -> {item['to']}"


# ---------------------------------------------------------------- history

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


# ---------------------------------------------------------------- a model's lineage

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

