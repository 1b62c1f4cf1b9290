"""`fmpipe audit` on a real temp git + DVC repo with three committed data versions.

One tabular variant (``tab``: a CSV outside the repository with given ids and splits) is
added as a team adds its own table (issue #21): ``fmpipe variant add tab --source CSV
--split-column split --enable``; its params are not edited by hand (the schema's defaults:
no accuracy gate). The fixture checks what that wrote (an ``mlp``, differences from the
defaults only), then the variant goes through the pipeline three times:

- v1: 60 rows;
- v2: the CSV rewritten in place (``dvc status`` sees collect@tab changed through the link):
  rows added (r060..r065), of which r064/r065 are exact copies of r001/r002, r010 made a copy
  of r013 and r030 edited: clean removes r064, r065 and r010 as duplicates;
- v3: two labels corrected through annotations/tab/labels.csv.

The tests assert the exact history and row-level diffs, `fmpipe audit model` on each version's
package (directory and archive), a local-directory DVC remote (push, cache deleted, reading
through the remote, pull), and the one-line errors. Each version is reproduced up to package
(what the audit reads).
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import make_repo, sh
from pipeline.config import load_params, prune_defaults

CLASSES = ("a", "b", "c")


def write_csv(path: Path, rows: list[tuple[str, str, str, list[float]]]) -> Path:
    lines = ["id,split,label,f1,f2,f3,f4"]
    lines += [f"{i},{s},{lab}," + ",".join(f"{v:.3f}" for v in feats) for i, s, lab, feats in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def base_rows() -> list[tuple[str, str, str, list[float]]]:
    rng = np.random.default_rng(0)
    rows = []
    for n in range(60):
        label = CLASSES[n % 3]
        split = ("train", "train", "train", "val", "test")[(n // 3) % 5]
        feats = list(rng.normal(loc=3.0 * (n % 3), scale=0.5, size=4).round(3))
        rows.append((f"r{n:03d}", split, label, feats))
    return rows


def commit(repo: Path, message: str) -> str:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)
    return sh(repo, "git", "rev-parse", "HEAD").stdout.strip()


def fmpipe_json(repo: Path, *args: str) -> dict:
    return json.loads(sh(repo, "fmpipe", *args, "--json").stdout)


def changed_stages(repo: Path, *targets: str) -> set[str]:
    """The stages `dvc status` reports as changed (of ``targets`` only, when named)."""
    return set(json.loads(sh(repo, "dvc", "status", "--json", *targets).stdout or "{}"))


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    (root / "repo").mkdir()
    repo = make_repo(root / "repo", [])
    rows = base_rows()
    table = write_csv(root / "mine" / "tab.csv", rows)  # the team's file, outside the repository
    # The variant, its curated GX suite (from its first data), decisions file and source link,
    # by the command a team runs on its own CSV.
    added = sh(repo, "fmpipe", "variant", "add", "tab", "--source", str(table), "--split-column", "split", "--enable")
    assert added.stdout.strip().endswith("next: dvc repro"), added.stdout
    params = load_params(repo / "params.yaml")
    spec = params.variants["tab"]
    assert params.enabled == ["tab"] and spec.model.name == "mlp"
    assert (spec.source.kind, spec.source.path, spec.source.id_column, spec.source.split_column,
            spec.source.classes) == ("csv", "sources/tab", "id", "split", list(CLASSES))
    # Differences only, like the rest of params.yaml: no fitted value restates a schema default.
    written = yaml.safe_load((repo / "params.yaml").read_text())["variants"]["tab"]
    assert prune_defaults(written, spec, "tab") == []
    assert (repo / "sources/tab").resolve() == table.resolve()
    assert (repo / "expectations/tab.json").is_file()
    assert (repo / "annotations/tab/labels.csv").read_text() == "id,label,note\n"
    packages = root / "packages"
    packages.mkdir()
    # A local-directory DVC remote, committed in .dvc/config; each version is pushed when it is
    # committed (DVC 3.67's `dvc push --all-commits` pushed only the workspace's objects here).
    sh(repo, "dvc", "remote", "add", "-d", "store", str(root / "remote"))

    def version(name: str) -> str:
        # Up to package: what the audit reads (dvc.lock, packages); dist, review and report
        # would add three steps per version and nothing audited.
        sh(repo, "dvc", "repro", "package@tab")
        rev = commit(repo, name)
        sh(repo, "dvc", "push")
        shutil.copytree(repo / "data/tab/package", packages / name)
        return rev

    revs = {"v1": version("v1")}

    # v2: four new rows, two exact copies of r001/r002 (clean keeps the originals), r010 made a
    # copy of r013 (same class; r013 is in test, so clean drops r010), r030's content edited.
    added = [(f"r{n:03d}", "train", CLASSES[n % 3], [9.0 + n, 1.0, 2.0, 3.0]) for n in range(60, 64)]
    added += [("r064", "train", rows[1][2], rows[1][3]), ("r065", "train", rows[2][2], rows[2][3])]
    assert rows[10][2] == rows[13][2] and (rows[10][1], rows[13][1]) == ("val", "test")
    edited = {"r010": rows[13][3], "r030": [7.0, 7.0, 7.0, 7.0]}
    v2 = [(i, s, lab, edited.get(i, f)) for i, s, lab, f in rows]
    assert "collect@tab" not in changed_stages(repo, "collect@tab")
    write_csv(table, v2 + added)  # edited in place: DVC hashes the CSV through the link
    assert "collect@tab" in changed_stages(repo, "collect@tab")
    revs["v2"] = version("v2")

    # A commit that changed only code (the package step's): dvc.lock changes, the data does not.
    with open(repo / "stages" / "package.py", "a") as fh:
        fh.write("\n# a code-only change\n")
    revs["code"] = version("code only")

    (repo / "annotations" / "tab" / "labels.csv").write_text("id,label,note,annotator\nr005,a,blurry,alice\nr020,b,clear b,bob\n")
    revs["v3"] = version("v3")
    return {"repo": repo, "revs": revs, "packages": packages, "root": root}


def test_history_lists_every_version_exactly(versions):
    repo, revs = versions["repo"], versions["revs"]
    h = fmpipe_json(repo, "audit", "--stage", "tab")
    got = h["versions"]
    # One row per distinct data version: the code-only commit adds none, it is named in v2's row.
    assert [v["commit"] for v in got] == [revs["v1"], revs["v2"], revs["v3"]]
    assert [[c["commit"] for c in v["commits"]] for v in got] == [[revs["v1"]], [revs["v2"], revs["code"]], [revs["v3"]]]
    assert [v["message"] for v in got] == ["v1", "v2", "v3"]
    assert all(v["author"] == "fmpipe tests" and v["date"] for v in got)
    assert [v["rows"] for v in got] == [60, 63, 63]
    assert [v["rows_by_split"] for v in got] == [
        {"train": 36, "val": 12, "test": 12}, {"train": 40, "val": 11, "test": 12}, {"train": 40, "val": 11, "test": 12}]
    assert [v["rows_by_class"] for v in got] == [
        {"a": 20, "b": 20, "c": 20}, {"a": 22, "b": 20, "c": 21}, {"a": 23, "b": 21, "c": 19}]
    assert [v["removed_by_reason"] for v in got] == [{}, {"exact_duplicate": 3}, {"exact_duplicate": 3}]
    assert [v["validation"]["success"] for v in got] == [True, True, True]
    assert [v["label_changes"] for v in got] == [0, 0, 2]
    assert got[2]["annotators"] == {"alice": 1, "bob": 1}
    assert [v["blessed"] for v in got] == [True, True, True]
    assert all(0.0 <= v["metrics"]["accuracy"] <= 1.0 for v in got)
    # Each version has its own annotate data; v2 -> v3 changed annotate but not collect/clean.
    hashes = [v["hashes"] for v in got]
    assert len({h["annotate"] for h in hashes}) == 3
    assert hashes[1]["collect"] == hashes[2]["collect"] and hashes[1]["clean"] == hashes[2]["clean"]
    lock = yaml.safe_load(sh(repo, "git", "show", f"{revs['v2']}:dvc.lock").stdout)
    assert lock["stages"]["annotate@tab"]["outs"][0]["md5"].startswith(hashes[1]["annotate"])

    md = sh(repo, "fmpipe", "audit", "--stage", "tab", "--md").stdout
    assert md.count(revs["v1"][:8]) == 1 and "| v3 |" in md and "duplicate: 3" in md
    assert f"{revs['v2'][:8]} {revs['code'][:8]}" in md and "v2; code only" in md

    # The terminal table fits the terminal: at 120 columns no line is longer, hashes are
    # never broken, and what had to go is named; --wide keeps every column.
    narrow = sh(repo, "fmpipe", "audit", "--stage", "tab", env={"COLUMNS": "120"}).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 120, narrow
    assert revs["v3"][:8] in narrow and hashes[2]["annotate"] in narrow
    very_narrow = sh(repo, "fmpipe", "audit", "--stage", "tab", env={"COLUMNS": "60"}).stdout
    assert max(len(line) for line in very_narrow.splitlines()) <= 60, very_narrow
    assert "hidden to fit 60 columns" in very_narrow and "--wide" in very_narrow
    wide = sh(repo, "fmpipe", "audit", "--stage", "tab", "--wide", env={"COLUMNS": "60"}).stdout
    assert "hidden" not in wide and "author" in wide and "collect/clean" in wide


def test_diff_rows_added_and_duplicates_removed(versions):
    repo, revs = versions["repo"], versions["revs"]
    d = fmpipe_json(repo, "audit", "diff", revs["v1"], revs["v2"], "--stage", "tab")
    assert [r["id"] for r in d["added"]] == ["r060", "r061", "r062", "r063"]
    assert d["removed"] == [{"id": "r010", "split": "val", "label": "b", "step": "clean", "reason": "exact_duplicate",
                             "detail": "same label", "dup_of": "r013", "dup_of_split": "test",
                             "distance": 0.0}]
    assert d["content_changed"] == ["r030"]
    assert d["relabelled"] == [] and d["split_changed"] == []
    assert (d["rows_old"], d["rows_new"], d["unchanged"]) == (60, 63, 58)
    assert d["per_class"]["a"] == {"old": 20, "new": 22, "added": 2, "removed": 0, "relabelled_in": 0,
                                   "relabelled_out": 0, "content_changed": 1}
    assert d["per_class"]["b"]["removed"] == 1

    # Collect saw all six new rows; clean dropped the exact copies, each with its reason.
    c = fmpipe_json(repo, "audit", "diff", revs["v1"], revs["v2"], "--stage", "tab", "--step", "collect")
    assert [r["id"] for r in c["added"]] == [f"r{n:03d}" for n in range(60, 66)]
    assert sorted(c["content_changed"]) == ["r010", "r030"]
    # `fmpipe diff` is the same command.
    assert fmpipe_json(repo, "diff", revs["v1"], revs["v2"], "--stage", "tab") == d


def test_diff_labels_corrected_through_annotate(versions):
    repo, revs = versions["repo"], versions["revs"]
    d = fmpipe_json(repo, "audit", "diff", "HEAD~2", "HEAD", "--stage", "tab")  # HEAD~1: the code-only commit
    assert d["a_commit"] == revs["v2"] and d["b_commit"] == revs["v3"]
    assert d["relabelled"] == [
        {"id": "r005", "from": "c", "to": "a", "source": "annotation", "annotator": "alice", "note": "blurry"},
        {"id": "r020", "from": "c", "to": "b", "source": "annotation", "annotator": "bob", "note": "clear b"},
    ]
    assert d["added"] == [] and d["removed"] == [] and d["content_changed"] == []
    assert d["per_class"]["c"]["relabelled_out"] == 2 and d["per_class"]["a"]["relabelled_in"] == 1
    md = sh(repo, "fmpipe", "audit", "diff", "HEAD~2", "HEAD", "--stage", "tab", "--md").stdout
    assert "r005: c -> a" in md and "alice" in md and "blurry" in md
    # Nothing was checked out: the workspace still holds v3's files and git sees no change.
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


@pytest.mark.parametrize("name", ["v1", "v2", "v3"])
def test_audit_model_names_the_version(versions, name):
    repo, revs, packages = versions["repo"], versions["revs"], versions["packages"]
    lock = yaml.safe_load(sh(repo, "git", "show", f"{revs[name]}:dvc.lock").stdout)
    annotate_md5 = lock["stages"]["annotate@tab"]["outs"][0]["md5"]
    # The package alone (no repository): its data version is that commit's annotate output.
    alone = fmpipe_json(versions["root"], "audit", "model", str(packages / name), "--no-repo")
    assert alone["data_version"]["annotate"][0]["md5"] == annotate_md5
    assert alone["params"]["source"]["path"] == "sources/tab"
    assert alone["code"]["stages/collect.py"] and "commits" not in alone
    # With the repository: the commit that recorded it, and the diff against HEAD's data.
    with_repo = fmpipe_json(repo, "audit", "model", str(packages / name))
    assert with_repo["commit"]["commit"] == revs[name]
    diff = with_repo["diff_to_current"]
    assert len(diff["relabelled"]) == (0 if name == "v3" else 2)
    assert len(diff["added"]) == (4 if name == "v1" else 0)
    # The same from a package archive (tar.gz holding the package directory).
    archive = versions["root"] / f"tab-{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(packages / name, arcname=f"tab-{name}")
    assert fmpipe_json(repo, "audit", "model", str(archive))["commit"]["commit"] == revs[name]


def test_lineage_depends_only_on_declared_inputs(versions):
    """Every path the lineage records is a dvc.yaml dependency of package (so --force reproduces it)."""
    repo = versions["repo"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    package_deps = {d["path"] for d in lock["package@tab"]["deps"]}
    package_params = lock["package@tab"]["params"]["params.yaml"]
    lineage = json.loads((repo / "data/tab/package/lineage.json").read_text())
    for name, entry in lineage["dvc_lock"]["stages"].items():
        for item in entry.get("deps", []) + entry.get("outs", []):
            assert item["path"] in package_deps, (name, item["path"])
        for key in (entry.get("params") or {}).get("params.yaml", {}):
            assert key in package_params, key
    assert lineage["dvc_lock"]["matches_model"] is True and "git" not in lineage


def test_local_remote_push_pull_and_missing_data(versions):
    repo, revs, root = versions["repo"], versions["revs"], versions["root"]
    assert list((root / "remote" / "files" / "md5").iterdir())  # pushed by the fixture
    shutil.rmtree(repo / ".dvc" / "cache")
    # Old versions are read from the remote, without fetching them into the cache.
    d = fmpipe_json(repo, "audit", "diff", revs["v1"], revs["v2"], "--stage", "tab")
    assert [r["id"] for r in d["added"]] == ["r060", "r061", "r062", "r063"]
    assert not (repo / ".dvc" / "cache" / "files").exists() or not any((repo / ".dvc/cache/files").rglob("*.dir"))
    shutil.rmtree(repo / "data" / "tab" / "annotate")
    sh(repo, "dvc", "pull", "--with-deps", "package@tab")  # what the versions reproduced
    assert (repo / "data/tab/annotate/manifest.parquet").exists()
    assert "up to date" in sh(repo, "dvc", "status", "--with-deps", "package@tab").stdout

    # Data of v1 in neither cache nor remote: one line that says how to fetch it.
    sh(repo, "dvc", "remote", "remove", "store")
    shutil.rmtree(repo / ".dvc" / "cache")
    r = sh(repo, "fmpipe", "audit", "diff", revs["v1"], revs["v2"], "--stage", "tab", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "in neither the local cache nor any remote" in r.stderr
    # A clone without a remote: `dvc pull` cannot help, so the hint says how to rebuild it.
    assert "no DVC remote is configured" in r.stderr and "dvc pull annotate@tab` there" in r.stderr
    assert f"git checkout {revs['v1']} && dvc repro annotate@tab" in r.stderr
    sh(repo, "git", "checkout", "--", ".dvc/config")  # the remote is back
    assert fmpipe_json(repo, "audit", "diff", revs["v1"], revs["v2"], "--stage", "tab") == d


@pytest.mark.parametrize("args, expected", [
    (["audit", "diff", "no-such-rev", "HEAD", "--stage", "tab"], "revision 'no-such-rev': unknown to git"),
    (["audit", "diff", "HEAD~1", "HEAD", "--stage", "nope"], "variant 'nope': not in dvc.lock at revision 'HEAD~1'"),
    (["audit", "--stage", "nope"], "variant 'nope': no commit"),
    (["audit", "diff", "HEAD~1", "HEAD", "--stage", "tab", "--step", "train"], "--step must be"),
    (["audit", "model", "no/such/package"], "not found"),
])
def test_errors_are_one_clear_line(versions, args, expected):
    r = sh(versions["repo"], "fmpipe", *args, check=False)
    assert r.returncode in (1, 2) and expected in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_shallow_clone_and_variant_absent_at_revision(versions):
    repo, revs, root = versions["repo"], versions["revs"], versions["root"]
    shallow = root / "shallow"
    sh(root, "git", "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow))
    r = sh(shallow, "fmpipe", "audit", "--stage", "tab", check=False)
    assert r.returncode == 1 and "shallow clone" in r.stderr and "git fetch --unshallow" in r.stderr
    r = sh(shallow, "fmpipe", "audit", "diff", revs["v1"], "HEAD", "--stage", "tab", check=False)
    assert r.returncode == 1 and "shallow clone" in r.stderr and "Traceback" not in r.stderr
    # The first commit ("project", before `tab` existed) has no dvc.lock: the test repo keeps no
    # entry of a variant it does not enable (helpers.keep_lock_entries), as a new project has none.
    first = sh(repo, "git", "rev-list", "--max-parents=0", "HEAD").stdout.strip()
    r = sh(repo, "fmpipe", "audit", "diff", first, "HEAD", "--stage", "tab", check=False)
    assert r.returncode == 1 and r.stderr == (f"fmpipe audit diff: error: dvc.lock: not in revision '{first}' "
                                              f"({first[:12]}); nothing had been run through `dvc repro` and committed "
                                              "there\n")
    # A variant absent from a lock that has others names them.
    r = sh(repo, "fmpipe", "audit", "diff", revs["v1"], "HEAD", "--stage", "digits", check=False)
    assert r.returncode == 1 and r.stderr == (f"fmpipe audit diff: error: variant 'digits': not in dvc.lock at "
                                              f"revision '{revs['v1']}' ({revs['v1'][:12]}); variants there: tab\n")


def test_audit_help_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
            "r = CliRunner().invoke(app, ['audit', '--help']); assert 'model' in r.output, r.output; "
            "print([m for m in ('pandas', 'dvc', 'torch', 'pipeline.audit') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
