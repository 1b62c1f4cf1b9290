"""How fast `fmpipe audit` reads versions: a row-level diff of two N-row versions, and the
history over M commits. Targets: diff of two 60,000-row versions < 5 s, history over 50
commits < 10 s (end to end: the `fmpipe` process, imports included).

The repository is synthetic (no pipeline run, no CIFAR files): a temp git + DVC repo whose
dvc.yaml declares `clean@syn` and `annotate@syn`; each version's dataset directories
(manifest.parquet + report.json) are written by this script and recorded with `dvc commit`,
then committed to git. Between versions rows are added, removed (with clean's reason),
relabelled through annotation, edited and moved between splits.

    python bench/audit_speed.py                      # the real run: 60,000 rows, 50 commits
    python bench/audit_speed.py --rows 2000 --commits 4 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("FMPIPE_WARM", "0")  # a cold process per step, as in the figures of bench/README.md (pipeline/warm.py)

CLASSES = [f"class{i}" for i in range(10)]
DVC_YAML = """stages:
  clean:
    foreach: [syn]
    do:
      cmd: python -c "raise SystemExit('written by bench/audit_speed.py')"
      outs:
        - data/${item}/clean
  annotate:
    foreach: [syn]
    do:
      cmd: python -c "raise SystemExit('written by bench/audit_speed.py')"
      deps:
        - data/${item}/clean
      outs:
        - data/${item}/annotate
"""

def sh(cwd: Path, *cmd: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def first_version(n: int, rng: np.random.Generator) -> pd.DataFrame:
    labels = rng.integers(0, len(CLASSES), n)
    return pd.DataFrame({
        "id": [f"img/{i:06d}" for i in range(n)],
        "split": rng.choice(["train", "val", "test"], n, p=[0.8, 0.1, 0.1]),
        "label": labels,
        "label_name": [CLASSES[i] for i in labels],
        "sha256": [hashlib.sha256(f"{i}".encode()).hexdigest() for i in range(n)],
        "label_source": "source",
    })


def next_version(m: pd.DataFrame, k: int, rng: np.random.Generator, scale: int) -> tuple[pd.DataFrame, list[dict]]:
    """Change ``m``: add, remove (with a reason), relabel, edit content, move between splits."""
    m = m.copy()
    n = len(m)
    drop = rng.choice(n, size=scale, replace=False)
    removed = [{"id": m.at[i, "id"], "reason": "duplicate", "dup_of": m.at[(i + 1) % n, "id"]} for i in drop]
    relabel = rng.choice(n, size=2 * scale, replace=False)
    new_labels = (m.loc[relabel, "label"].to_numpy() + 1) % len(CLASSES)
    m.loc[relabel, "label"] = new_labels
    m.loc[relabel, "label_name"] = [CLASSES[i] for i in new_labels]
    m.loc[relabel, "label_source"] = "annotation"
    edit = rng.choice(n, size=scale // 2, replace=False)
    m.loc[edit, "sha256"] = [hashlib.sha256(f"v{k}-{i}".encode()).hexdigest() for i in edit]
    move = rng.choice(n, size=scale // 5, replace=False)
    m.loc[move, "split"] = "train"
    m = m.drop(index=drop)
    start = int(m["id"].str[4:].astype(int).max()) + 1
    add = first_version(scale, rng)
    add["id"] = [f"img/{i:06d}" for i in range(start, start + scale)]
    return pd.concat([m, add], ignore_index=True), removed


def write_version(repo: Path, m: pd.DataFrame, removed: list[dict], k: int) -> None:
    def report(step: str, rows_in: int, rem: list[dict]) -> dict:
        return {"step": step, "variant": "syn", "rows_in": rows_in, "rows_out": len(m), "rows_removed": len(rem),
                "removed_by_reason": {"duplicate": len(rem)} if rem else {}, "removed": rem,
                "rows_by_split": {s: int((m["split"] == s).sum()) for s in ("train", "val", "test")},
                "rows_by_class": {c: int((m["label"] == i).sum()) for i, c in enumerate(CLASSES)},
                "labels_changed": int((m["label_source"] == "annotation").sum()), "changes": []}
    for step, rem in (("clean", removed), ("annotate", [])):
        d = repo / "data" / "syn" / step
        d.mkdir(parents=True, exist_ok=True)
        m.to_parquet(d / "manifest.parquet", index=False)
        (d / "report.json").write_text(json.dumps(report(step, len(m) + len(rem), rem)))
    sh(repo, "dvc", "commit", "-f", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", f"version {k}")


def build(repo: Path, rows: int, commits: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "config", "user.email", "bench@example.invalid")
    sh(repo, "git", "config", "user.name", "bench")
    sh(repo, "dvc", "init", "-q")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    m = first_version(rows, rng)
    write_version(repo, m, [], 0)
    scale = max(10, rows // 100)  # per version: 1% removed, 1% added, 2% relabelled, ...
    for k in range(1, commits):
        m, removed = next_version(m, k, rng, scale)
        write_version(repo, m, removed, k)


def timed(repo: Path, args: list[str], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + sys of the child) seconds per run; CPU is the robust figure on a
    shared machine."""
    import resource

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    times, cpu = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(["fmpipe", *args], cwd=repo, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if r.returncode != 0:
            raise SystemExit(f"fmpipe {' '.join(args)} failed:\n{r.stderr}")
    return times, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--commits", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        repo = Path(tmp)
        t0 = time.perf_counter()
        build(repo, args.rows, args.commits)
        print(f"built a {args.commits}-commit repo of {args.rows:,}-row versions in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        diff = timed(repo, ["audit", "diff", "HEAD~1", "HEAD", "--stage", "syn", "--json"], args.repeats)
        hist = timed(repo, ["audit", "--stage", "syn", "--json"], args.repeats)
        out = json.loads(subprocess.run(["fmpipe", "audit", "--stage", "syn", "--json"], cwd=repo,
                                         capture_output=True, text=True).stdout)
        assert len(out["versions"]) == args.commits, len(out["versions"])
    for name, (times, cpu), target in ((f"diff of two {args.rows:,}-row versions", diff, 5.0),
                                       (f"history over {args.commits} commits", hist, 10.0)):
        med = statistics.median(times)
        print(f"{name}: median {med:.2f} s wall ({statistics.median(cpu):.2f} s CPU) over {len(times)} runs "
              f"(min {min(times):.2f}, max {max(times):.2f}); target < {target:.0f} s: "
              f"{'met' if med < target else 'MISSED'}")


if __name__ == "__main__":
    main()
