"""A version of a variant's data: a git revision's ``dvc.lock`` entries, each output read by
the md5 the lock names (or the workspace as it is)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from pipeline.audit.git import Git
from pipeline.audit.store import MissingData, Store
from pipeline.errors import FmpipeError
from pipeline.manifest import MANIFEST
from pipeline.steps import ORDER as STEPS
from pipeline.steps import output

WORKSPACE = "workspace"
LOCK = "dvc.lock"
# The output that names a multi-output step's result in the history's hashes.
_MAIN_OUT = {"train": "model.safetensors", "evaluate": "blessing.json", "validate": "summary.json"}


def _lock_stages(raw: Optional[bytes]) -> Optional[dict[str, Any]]:
    if raw is None:
        return None
    import yaml

    from pipeline.reading import MachineYamlLoader

    try:
        return (yaml.load(raw, Loader=MachineYamlLoader) or {}).get("stages") or {}
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
