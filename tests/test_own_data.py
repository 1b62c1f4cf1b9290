"""A team's own data (issue #21) and variant names used as paths (issue #22, item 1).

One real `dvc repro` scenario in a temporary git + DVC repository does the newcomer's first
hour: `fmpipe variant add` on a generated 2-class image folder, `dvc repro` (first time, no
failure), then edits to the source and to a module a step imports, each seen by `dvc status`;
and `git add -A` after a step run by hand takes no payload. (The same for a CSV, added with
`fmpipe variant add` and edited in place, is tests/test_audit.py's fixture, which takes it
through three versions.) The other tests here run in milliseconds to a few seconds, without DVC.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import REPO, copy_project_files, fmpipe, make_repo, sh
from pipeline import steps as registry
from pipeline.config import load_params, prune_defaults
from pipeline.errors import FmpipeError


def image_folder(root: Path, per_class: int = 40, size: int = 16) -> Path:
    """Two classes told apart by brightness, with noise: learnable, never blank."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(70 + 110 * c + rng.integers(-50, 50, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")
    return root


def dvc_status(repo: Path, *targets: str) -> dict:
    return json.loads(sh(repo, "dvc", "status", "--json", *targets).stdout or "{}")


def changed_stages(repo: Path, *targets: str) -> set[str]:
    """The stages `dvc status` reports as changed (of ``targets`` only, when named: DVC then
    hashes their deps alone, a second instead of two and a half for every stage)."""
    return set(dvc_status(repo, *targets))


def staged_under_data(repo: Path) -> list[str]:
    sh(repo, "git", "add", "-A")
    lines = sh(repo, "git", "status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    return [line[3:] for line in lines if line[3:].startswith("data/")]


# ---------------------------------------------------------------- the newcomer, under real DVC

def test_newcomer_flow_under_dvc(tmp_path):
    outside = tmp_path / "mine"
    pets = image_folder(outside / "pets")
    repo = make_repo(tmp_path / "repo", ["binary"])
    # params.yaml as committed (make_repo rewrites it without comments), binary enabled.
    before = (REPO / "params.yaml").read_text().replace("\nenabled: [digits, iris]\n", "\nenabled: [binary]\n")
    (repo / "params.yaml").write_text(before)
    sh(repo, "git", "commit", "-qam", "params as committed")

    result = sh(repo, "fmpipe", "variant", "add", "pets", "--source", str(pets), "--enable")
    assert result.stdout.strip().endswith("next: dvc repro"), result.stdout
    params = load_params(repo / "params.yaml")
    assert params.enabled == ["binary", "pets"]
    pets_spec = params.variants["pets"]
    assert pets_spec.source.path == "sources/pets" and pets_spec.source.classes == ["cat", "dog"]
    assert pets_spec.source.size == (16, 16) and pets_spec.model.name == "cnn_small"
    train_rows = 80 - 8 - 16  # default fractions of 80 images
    assert pets_spec.train.batch_size <= train_rows // 2
    assert pets_spec.validate_.min_rows <= 80
    # Differences only, like the rest of params.yaml: no fitted value restates a schema default.
    written = yaml.safe_load((repo / "params.yaml").read_text())["variants"]
    assert prune_defaults(written["pets"], pets_spec, "pets") == []
    assert (repo / "sources/pets").resolve() == pets.resolve()
    # Comments and layout of params.yaml kept: the original text is a prefix of the new one,
    # apart from the `enabled` line.
    after = (repo / "params.yaml").read_text()
    assert after.startswith(before.replace("enabled: [binary]", "enabled: [binary, pets]"))

    # First time, no failure. (binary is enabled so that `variant add` appends to a list, as in
    # a real project; not reproduced here: its committed suite passing on its data, and the
    # files a fresh clone needs for it, are test_validate's and the last test's here.)
    sh(repo, "dvc", "repro", "dist@pets", "report@pets")
    assert (repo / "data/pets/package/model.onnx").exists()
    small = ("/evaluate/metrics.json", "/evaluate/figures.json", "/evaluate/confusion.csv", "/evaluate/per_class.csv",
             "/evaluate/slices.csv", "/evaluate/robustness.csv", "/train/live/")
    data = staged_under_data(repo)
    assert data and all(p.startswith("data/resources/") or p.endswith("/.gitignore") or any(s in p for s in small)
                        for p in data), data
    sh(repo, "git", "commit", "-qm", "pets")
    assert changed_stages(repo, "--with-deps", "dist@pets", "report@pets") == set()

    # Each kind of change to a source is a change of collect's input, and only of its content:
    # the same bytes written back are no change (DVC hashes content, not times).
    from PIL import Image

    first = pets / "dog" / "000.png"
    original = first.read_bytes()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(first)  # changed in place
    assert "collect@pets" in changed_stages(repo, "collect@pets")
    first.write_bytes(original)
    gone = pets / "cat" / "001.png"
    kept = gone.read_bytes()
    gone.unlink()  # removed
    assert "collect@pets" in changed_stages(repo, "collect@pets")
    gone.write_bytes(kept)
    assert "collect@pets" not in changed_stages(repo, "collect@pets")
    # An image added: collect re-runs, and everything downstream of it.
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(pets / "cat" / "999.png")
    out = sh(repo, "dvc", "repro", "annotate@pets").stdout  # validate passes with one more image
    for stage in ("collect@pets", "clean@pets", "validate@pets", "annotate@pets"):
        assert f"Running stage '{stage}'" in out, out

    # A module train and evaluate import (the TTA views live in pipeline/inference/tta.py):
    # `dvc status` names it among each one's changed dependencies (their data changed too).
    views = repo / "pipeline/inference/tta.py"
    views.write_text(views.read_text() + "\n# edited\n")
    status = dvc_status(repo, "collect@pets", "train@pets", "evaluate@pets")
    for stage in ("train@pets", "evaluate@pets"):
        deps = {path for entry in status.get(stage, []) if isinstance(entry, dict)
                for path in entry.get("changed deps", {})}
        assert "pipeline/inference/tta.py" in deps, status
    assert "collect@pets" not in status, status

    # A step run by hand on a variant DVC never ran: its payload is not addable either.
    sh(repo, "fmpipe", "collect", "--stage", "iris")
    assert (repo / "data/iris/collect/features.parquet").exists()
    data = staged_under_data(repo)
    assert not [p for p in data if p.startswith("data/iris/")], data


def test_collect_under_dvc_refuses_an_untracked_local_source(tmp_path):
    """A path DVC does not hash would make `dvc status` blind to changes: one line, what to run."""
    from pipeline.sources import check_tracked, imagefolder

    spec = imagefolder.Spec(path=str(tmp_path / "elsewhere"))
    with pytest.raises(FmpipeError, match=r"variants\.pets\.source\.path: .* is not sources/pets or inside it.*ln -sfn"):
        check_tracked(spec, "pets")
    check_tracked(imagefolder.Spec(path="sources/pets"), "pets")


def test_a_copy_linked_as_the_note_says_survives_dvc_exp_run(tmp_path):
    """The documented way to read a local copy of a downloaded dataset, under `dvc exp run`.

    The earlier advice (replace the committed note `sources/cifar` by a link) made DVC's
    `exp run` restore the note by writing its text through the link: the user's copy of
    CIFAR-10 became a 289-byte text file. The link now goes inside the note's folder."""
    import hashlib
    import os
    import tarfile

    repo = make_repo(tmp_path / "repo", enabled=["digits"])
    folder = image_folder(tmp_path / "copy", per_class=12)
    archive = tmp_path / "outside" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=".")
    before = hashlib.sha256(archive.read_bytes()).hexdigest()

    note = (repo / "sources/cifar/README.md").read_text()
    command = next(line.split() for line in note.splitlines() if line.strip().startswith("ln -sfn"))
    link = repo / command[-1]
    os.symlink(archive, link)
    path = command[-1]
    assert f"path: {path}" in note
    sh(repo, "dvc", "exp", "run", "-S", "enabled=[cifar]",
       "-S", f"++variants.cifar.source={{kind:imagefolder,path:{path}}}", "collect@cifar")

    assert hashlib.sha256(archive.read_bytes()).hexdigest() == before
    assert link.is_symlink() and (repo / "sources/cifar/README.md").read_text() == note
    rows = len(__import__("pandas").read_parquet(repo / "data/cifar/collect/manifest.parquet"))
    assert rows == 24
    assert "sources/" not in sh(repo, "git", "status", "--porcelain").stdout


def test_no_documented_link_replaces_a_committed_file():
    """Every `ln -sfn TARGET sources/...` the docs, notes, params and benchmarks give makes a new
    link (or one inside a note's folder), never a link in place of a file git tracks."""
    import re

    tracked = set(sh(REPO, "git", "ls-files").stdout.split())
    places = ["README.md", "params.yaml", *map(str, REPO.glob("docs/*.md")), *map(str, REPO.glob("bench/*.py")),
              *map(str, REPO.glob("sources/**/README.md"))]
    links = []
    for place in places:
        for match in re.finditer(r'ln -sfn (?:"[^"]*"|\S+) (sources/\S+)', (REPO / place).read_text()):
            links.append((place, match.group(1)))
    assert len(links) >= 8, links
    for place, link in links:
        assert link.rstrip("/") not in tracked, (place, link)
        assert not (REPO / link).is_file() or (REPO / link).is_symlink(), (place, link)


def test_a_link_inside_a_note_folder_is_hashed_one_to_a_folder_is_refused(tmp_path, monkeypatch):
    """DVC hashes a link to a file inside a tracked folder, not a link to a folder (its files
    would change unseen): collect refuses the second in one line."""
    import os

    from pipeline.sources import check_tracked, imagefolder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sources/cifar").mkdir(parents=True)
    (tmp_path / "sources/cifar/README.md").write_text("note\n")
    (tmp_path / "copy.tar.gz").write_bytes(b"x")
    image_folder(tmp_path / "folder", per_class=1)
    os.symlink(tmp_path / "copy.tar.gz", tmp_path / "sources/cifar/copy.tar.gz")
    os.symlink(tmp_path / "folder", tmp_path / "sources/cifar/folder")
    check_tracked(imagefolder.Spec(path="sources/cifar/copy.tar.gz"), "cifar")
    with pytest.raises(FmpipeError, match=r"^variants\.cifar\.source\.path: sources/cifar/folder goes through a "
                                          r"link to a folder .* DVC does not follow"):
        check_tracked(imagefolder.Spec(path="sources/cifar/folder"), "cifar")
    # Outside: the hint links into the note's folder, never over the note; re-points a
    # variant's own link (safe); never links into the folder such a link points to.
    with pytest.raises(FmpipeError, match=r"ln -sfn \S+copy\.tar\.gz sources/cifar/copy\.tar\.gz`"):
        check_tracked(imagefolder.Spec(path=str(tmp_path / "copy.tar.gz")), "cifar")
    os.symlink(tmp_path / "folder", tmp_path / "sources/pets")
    with pytest.raises(FmpipeError, match=r"ln -sfn \S+copy\.tar\.gz sources/pets`"):
        check_tracked(imagefolder.Spec(path=str(tmp_path / "copy.tar.gz")), "pets")
    (tmp_path / "sources/note").write_text("a note\n")
    with pytest.raises(FmpipeError, match=r"make sources/note a folder .*`ln -sfn \S+ sources/note/copy\.tar\.gz`"):
        check_tracked(imagefolder.Spec(path=str(tmp_path / "copy.tar.gz")), "note")


# ---------------------------------------------------------------- without DVC

@pytest.mark.parametrize("name", ["x/../digits", "../../escape", "digits/collect", "v" * 300, "a b", "x@y", ""])
def test_unsafe_variant_names_are_refused_at_load(tmp_path, name):
    """Issue #22.1: the name is a path; refused in one line before any step runs, nothing written."""
    root = copy_project_files(tmp_path / "a" / "b" / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["variants"][name] = params["variants"]["iris"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = sorted(p for p in tmp_path.rglob("*"))
    for stage in ([name, "iris"] if name else ["iris"]):  # the name itself, and any variant of that file
        result = fmpipe("collect", "--stage", stage, cwd=root)
        assert result.returncode == 1
        lines = [l for l in result.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, lines
        assert "not a valid variant name" in lines[0] and "at most 64 characters" in lines[0]
        assert len(lines[0]) < 400
        assert sorted(p for p in tmp_path.rglob("*")) == before


def test_variant_add_refuses_a_taken_or_unsafe_name_or_a_wrong_split_column(tmp_path):
    root = copy_project_files(tmp_path / "project")
    pets = image_folder(tmp_path / "pets", per_class=3, size=8)
    table = tmp_path / "table.csv"
    table.write_text("id,part,label,x\nr1,train,a,1.0\nr2,test,b,2.0\n")
    params = (root / "params.yaml").read_text()
    for name, args, expected in (
            ("digits", ["--source", str(pets)], "variants.digits exists"),
            ("../pets", ["--source", str(pets)], "not a valid variant name"),
            # --split-column: a column of the CSV (not the label), and for a CSV only.
            ("mine", ["--source", str(table), "--split-column", "split"], "no split column 'split'"),
            ("mine", ["--source", str(pets), "--split-column", "part"], "--split-column is for a CSV")):
        result = fmpipe("variant", "add", name, *args, cwd=root)
        assert result.returncode == 1 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (root / "params.yaml").read_text() == params
    assert not (root / "sources").exists() and not (root / "data").exists()


@pytest.mark.parametrize("edit, key", [
    (lambda v: v["validate"].update(min_rows=200, max_rows=300), "validate.min_rows: 200 is more than the 150 rows"),
    (lambda v: v["validate"].update(max_class_fraction=0.3), "validate.max_class_fraction: 0.3 is below 1/3"),
    (lambda v: v["validate"].update(min_rows_per_class=100), "validate.min_rows_per_class: 100 rows per class"),
    (lambda v: v["train"].update(batch_size=128), "train.batch_size: 128 is above the at most 91 training rows"),
])
def test_schema_refuses_contradictions_at_load(tmp_path, edit, key):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(params["variants"]["iris"])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(FmpipeError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: variants.iris.{key}" + str(err.value).split(key, 1)[1]
    assert "\n" not in str(err.value)


def test_data_gitignore_keeps_every_cached_output_out_of_git(tmp_path):
    """data/.gitignore against the registry: cached outputs ignored, uncached ones (small, in git) not."""
    sh(tmp_path, "git", "init", "-q")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/.gitignore").write_bytes((REPO / "data/.gitignore").read_bytes())

    def ignored(rel: str) -> bool:
        return sh(tmp_path, "git", "check-ignore", "-q", "--no-index", rel, check=False).returncode == 0

    for variant in ("digits", "a-new_one"):
        for step in (*registry.STEPS, *registry.STUDENT_STEPS):
            for path, out in step.out_paths():
                rel = path.format(v=variant)
                inside = f"{rel}/some/file.bin"  # an output directory's content
                assert ignored(inside) == out.cache or ignored(rel) == out.cache, (rel, out.cache)
            assert ignored(f"data/{variant}/{step.name}/anything.tmp")
        assert ignored(f"data/resources/{variant}/train.json")  # per-run records
    assert not ignored("data/README.md")


def test_every_shippable_variant_has_what_a_fresh_clone_needs():
    """Variants whose data ships or is generated: every file DVC needs is committed, and the
    params load; the others say in `fmpipe stages` what data they need."""
    from pipeline.sources import data_needed

    tracked = set(sh(REPO, "git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split())
    params = load_params(REPO / "params.yaml")
    shippable = [n for n, v in params.variants.items() if data_needed(v.source) is None]
    assert {"digits", "iris", "binary"} <= set(shippable)
    for name in shippable:
        needed = {f"expectations/{name}.json", f"sources/{name}"}
        assert needed <= tracked, (name, needed - tracked)
        assert any(p.startswith(f"annotations/{name}/") for p in tracked), name
    lines = sh(REPO, "fmpipe", "stages").stdout.splitlines()
    for i, line in enumerate(lines):
        name = line.split(" ", 1)[0]
        if name in params.variants:
            says = i + 1 < len(lines) and lines[i + 1].lstrip().startswith("needs data:")
            assert says == (name not in shippable), (name, lines[i:i + 2])
