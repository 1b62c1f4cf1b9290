"""What made this model: code, data and steps (dvc.lock), params, metrics, file digests.

``lineage.json`` travels inside the package so a deployed model can be traced without the
repository: the ``dvc.lock`` entries of every upstream stage of the variant (the md5 of each
code/data dependency, the params values, the md5 of each output), the variant's params, the
evaluation, and the sha256 of each packaged file.

Why dvc.lock entries and not the git commit: ``package`` runs inside ``dvc repro``, before the
commit that records its result exists, so HEAD at that moment names the *previous* commit
(and a dirty tree). The upstream entries are written by the same ``dvc repro`` just before
package runs (DVC updates dvc.lock after each stage) and identify code, params and data
exactly; ``fmpipe audit model`` maps them to the commit(s) whose dvc.lock holds them. The git
commit of the packaging run is still recorded, in the uncached ``data/<variant>/runs/package.json``.

Nothing time-, machine- or commit-dependent is recorded, and the package stage depends (in
dvc.yaml) on every input and output of its upstream stages, so ``lineage.json`` is a function
of declared dependencies: ``dvc repro --force`` rewrites it byte for byte.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Optional

from pipeline.artefacts import Blessing, Lineage, LineageData, LineageModel, Metrics
from pipeline.io import file_digest, sha256_file

DVC_LOCK = "dvc.lock"
_MAX_LISTED_CHANGES = 20


def git_info(cwd: str | Path = ".") -> dict[str, Any]:
    """HEAD commit and dirtiness of the working tree; ``available: false`` without git."""
    try:
        commit = _git(["rev-parse", "HEAD"], cwd).strip()
        status = _git(["status", "--porcelain", "--untracked-files=no"], cwd).splitlines()
        # dvc.lock and the git-tracked outputs under data/ (uncached metrics and plots) are
        # rewritten by the very `dvc repro` that runs this step: records, not code or inputs.
        changes = [line for line in status if line and line[3:] != DVC_LOCK and not line[3:].startswith("data/")]
    except (OSError, subprocess.CalledProcessError) as exc:
        reason = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else str(exc)
        return {"available": False, "reason": f"not a git checkout or git missing: {reason}"}
    info: dict[str, Any] = {"available": True, "commit": commit, "dirty": bool(changes)}
    if changes:
        # Tracked files that differ from the commit: the code that ran is not exactly `commit`.
        info["changed"] = [c[3:] for c in changes[:_MAX_LISTED_CHANGES]]
        info["changed_total"] = len(changes)
    return info


def _git(args: list[str], cwd: str | Path) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30)
    return out.stdout  # not stripped: porcelain lines start with a meaningful space


# The parts of a dvc.lock entry that identify what ran. ``cmd`` is left out: it can change
# (dvc.yaml edit) without re-running anything downstream, so it would go stale in a package.
LOCK_KEYS = ("deps", "params", "outs")


def dvc_lock_entries(variant: str, steps: list[str], lock_path: str | Path = DVC_LOCK) -> dict[str, Any]:
    """The ``dvc.lock`` entries ``<step>@<variant>`` for ``steps`` (deps, params, outs).

    A plain CLI run (``fmpipe package`` without ``dvc repro``) may have no dvc.lock, or an
    older one: the result says so instead of failing. Note that dvc.lock holds the hashes of
    the last ``dvc repro``/``dvc commit``; files changed by hand since then are not in it.
    """
    import yaml

    from pipeline.reading import MachineYamlLoader

    path = Path(lock_path)
    if not path.exists():
        return {"available": False, "path": str(lock_path),
                "note": "no dvc.lock: run outside DVC (plain fmpipe CLI), upstream hashes not recorded"}
    try:
        lock = yaml.load(path.read_text(), Loader=MachineYamlLoader) or {}
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as exc:
        return {"available": False, "path": str(lock_path), "note": f"dvc.lock unreadable: {exc}"}
    stages = lock.get("stages") or {}
    found: dict[str, Any] = {}
    missing: list[str] = []
    for step in steps:
        name = f"{step}@{variant}"
        entry = stages.get(name)
        if entry is None:
            missing.append(name)
            continue
        found[name] = {key: entry.get(key) for key in LOCK_KEYS if key in entry}
    result: dict[str, Any] = {"available": True, "path": str(lock_path), "stages": found}
    if missing:
        result["missing"] = missing
        result["note"] = "some upstream stages have no dvc.lock entry (not run through DVC yet)"
    return result


def lock_matches_file(entries: dict[str, Any], stage: str, path: str | Path) -> Optional[bool]:
    """Whether ``stage``'s locked md5 for ``path`` is the file's md5 now (None: not locked).

    Under ``dvc repro`` it always is; after a plain ``fmpipe`` run the dvc.lock may describe an
    older run, and the lineage says so instead of naming the wrong data.
    """
    for out in (entries.get("stages", {}).get(stage) or {}).get("outs") or []:
        if out.get("path") == str(path):
            return out.get("md5") == file_digest(path, "md5")
    return None


def file_digests(root: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "size"}}`` for files under ``root``."""
    root = Path(root)
    return {name: {"sha256": sha256_file(root / name), "size": (root / name).stat().st_size} for name in names}


def build_lineage(*, variant: str, meta: dict[str, Any], n_params: int, weights_sha: str,
                  dvc_lock: dict[str, Any], params: dict[str, Any],
                  data_dir: str, rows_by_split: dict[str, int], rows_by_class: dict[str, int],
                  classes: list[str], metrics: Metrics, blessing: Blessing) -> Lineage:
    """The lineage record (``pipeline.artefacts.Lineage``) without its ONNX check and file
    digests, which package adds once the files exist."""
    return Lineage(
        variant=variant,
        model=LineageModel(name=meta["model"]["name"], options=meta["model"].get("options") or {},
                           n_params=n_params, input=meta["input"], classes=meta["classes"], sha256=weights_sha),
        dvc_lock=dvc_lock,
        params=params,
        data=LineageData(dir=data_dir, rows_by_split=rows_by_split, classes=list(classes), rows_by_class=rows_by_class),
        metrics=metrics,
        blessing=blessing,
    )
