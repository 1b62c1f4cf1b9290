"""A table of bad inputs and faults (issue #7), each through the real `fmpipe` command.

For every row: exit code 1, exactly one line on stderr (as a terminal shows it: a progress
bar erased with carriage returns is not a line) naming the file or key, no "Traceback", and
every file under data/ byte-identical to before the command. One good pipeline run (iris and
digits, short training) is shared by all rows; each row works on its own copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from conftest import copy_project_files
import yaml

from pipeline.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
FMPIPE = [sys.executable, "-m", "pipeline"]


# ---------------------------------------------------------------- the shared good run

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good")
    copy_project_files(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["variants"]["digits"]["train"]["max_epochs"] = 1
    params["variants"]["iris"]["train"]["max_epochs"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from pipeline.runner import run_step

        for variant in ("iris", "digits"):
            for step in ("collect", "clean", "validate", "annotate", "train", "evaluate"):
                run_step(step, variant)
    finally:
        os.chdir(cwd)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under data/ and names of everything else there (temp dirs too)."""
    out = {}
    for p in sorted((root / "data").rglob("*")):
        rel = p.relative_to(root).as_posix()
        if "train-state" in p.parts:
            continue
        out[rel] = sha256_file(p) if p.is_file() else "dir"
    return out


def visible_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: text before a carriage return is overwritten."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]


# ---------------------------------------------------------------- mutations

def edit_params(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        params = yaml.safe_load((root / "params.yaml").read_text())
        fn(params)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return mutate


def add_variant(name: str, source: dict, based_on: str = "digits") -> Callable[[Path], None]:
    def fn(params: dict) -> None:
        section = dict(params["variants"][based_on])
        section["source"] = source
        params["variants"][name] = section
    return edit_params(fn)


def truncate(rel: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return mutate


def remove(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def write(rel: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_text(text)


def reverse_images(root: Path) -> None:
    path = root / "data/digits/annotate/images.npy"
    np.save(path, np.load(path)[::-1].copy(), allow_pickle=False)


def forget_digests_and_truncate(root: Path) -> None:
    """An older output (no digests in dataset.json) with a damaged features.parquet."""
    meta_path = root / "data/iris/annotate/dataset.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("files")
    meta_path.write_text(json.dumps(meta))
    truncate("data/iris/annotate/features.parquet")(root)


def duplicate_key(root: Path) -> None:
    text = (root / "params.yaml").read_text()
    # The line of iris's max_epochs (3 in this project), given again just below, same indent.
    text = re.sub(r"^( +)max_epochs: 3\n", r"\g<0>\1max_epochs: 30\n", text, count=1, flags=re.M)
    (root / "params.yaml").write_text(text)


def single_class_csv(root: Path) -> None:
    rows = "\n".join(f"{i},{i * 0.5},{i % 7},a" for i in range(60))
    (root / "solo.csv").write_text("id,x1,x2,label\n" + rows + "\n")
    add_variant("solo", {"kind": "csv", "path": "solo.csv", "id_column": "id"}, based_on="iris")(root)
    run_in(root, ["collect", "--stage", "solo"], ["clean", "--stage", "solo"])


def sixteen_bit_folder(root: Path) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (root / "pics" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 4000 * (i + 1), dtype=np.uint16)).save(root / "pics" / cls / f"{i}.png")
    add_variant("pics", {"kind": "imagefolder", "path": "pics", "channels": 1, "high_bit_depth": "reject"})(root)


def folder_without_images(root: Path) -> None:
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("the images are elsewhere\n")
    add_variant("notes", {"kind": "imagefolder", "path": "notes"})(root)


def run_in(root: Path, *commands: list[str]) -> None:
    for args in commands:
        subprocess.run([*FMPIPE, *args], cwd=root, check=True, capture_output=True)


# ---------------------------------------------------------------- faults of the machine

@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` unwritable: a read-only bind mount as root (root ignores modes), else chmod."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0:
        pytest.skip("root without permission to mount: cannot make a directory unwritable")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def full_disk(path: Path):
    """``path`` on a tmpfs holding its current files with (almost) no room left."""
    # tmpfs counts whole pages per file: room for every file rounded up, plus 1 MiB to fill.
    used = sum(-(-p.stat().st_size // 4096) * 4096 + 4096 for p in path.rglob("*"))
    saved = path.parent / f"{path.name}.saved"
    shutil.copytree(path, saved)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + (1 << 20)}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    if not ok:
        shutil.rmtree(saved)
        pytest.skip("cannot mount a tmpfs here (needs root): the in-process ENOSPC test covers this")
    try:
        shutil.copytree(saved, path, dirs_exist_ok=True)
        filler = path / "filler"
        with open(filler, "wb", buffering=0) as fh:  # take all the room that is left...
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 4096)
        os.truncate(filler, max(0, filler.stat().st_size - 8192))  # ...then give back two pages
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)
        shutil.rmtree(saved)


# ---------------------------------------------------------------- the table

@dataclass
class Case:
    name: str
    args: list[str]
    names: str  # the file or key the error line must name
    mutate: Optional[Callable[[Path], None]] = None
    fault: Optional[Callable[[Path], contextlib.AbstractContextManager]] = None


CASES = [
    Case("empty annotations csv", ["annotate", "--stage", "iris"], "annotations/iris/labels.csv: empty file",
         write("annotations/iris/labels.csv", "")),
    Case("stray file among decisions", ["annotate", "--stage", "iris"], "annotations/iris/notes.txt: not a decision file",
         write("annotations/iris/notes.txt", "check later")),
    Case("truncated manifest.parquet", ["annotate", "--stage", "iris"], "data/iris/clean/manifest.parquet",
         truncate("data/iris/clean/manifest.parquet")),
    Case("missing manifest.parquet", ["train", "--stage", "iris"], "data/iris/annotate/manifest.parquet: missing",
         remove("data/iris/annotate/manifest.parquet")),
    Case("truncated images.npy", ["validate", "--stage", "digits"], "data/digits/clean/images.npy",
         truncate("data/digits/clean/images.npy")),
    Case("missing images.npy", ["train", "--stage", "digits"], "data/digits/annotate/images.npy: missing",
         remove("data/digits/annotate/images.npy")),
    Case("images.npy rows reversed", ["evaluate", "--stage", "digits"],
         "data/digits/annotate/images.npy: does not match dataset.json", reverse_images),
    Case("missing features.parquet", ["evaluate", "--stage", "iris"], "data/iris/annotate/features.parquet: missing",
         remove("data/iris/annotate/features.parquet")),
    Case("truncated features.parquet, no digests", ["evaluate", "--stage", "iris"],
         "data/iris/annotate/features.parquet: not a readable parquet file", forget_digests_and_truncate),
    Case("dataset.json not JSON", ["clean", "--stage", "iris"], "data/iris/collect/dataset.json",
         write("data/iris/collect/dataset.json", "{not json")),
    Case("single-class dataset", ["validate", "--stage", "solo"], "data/solo/clean: only class 'a'",
         single_class_csv),
    Case("accelerator gpu without a gpu", ["train", "--stage", "iris"], "variants.iris.train.accelerator",
         edit_params(lambda p: p["variants"]["iris"]["train"].update(accelerator="gpu"))),
    Case("batch_size 0", ["train", "--stage", "iris"], "variants.iris.train.batch_size",
         edit_params(lambda p: p["variants"]["iris"]["train"].update(batch_size=0))),
    Case("duplicate key in params.yaml", ["train", "--stage", "iris"], "duplicate key 'max_epochs' on lines",
         duplicate_key),
    Case("missing variant section", ["collect", "--stage", "iris"], "variants.iris: the variant's section is empty",
         edit_params(lambda p: p["variants"].update(iris=None))),
    Case("enabled names an undefined variant", ["collect", "--stage", "iris"], "enabled: names 'imagenet'",
         edit_params(lambda p: p["enabled"].append("imagenet"))),
    Case("size [0, 8]", ["collect", "--stage", "pics"], "variants.pics.source.size",
         add_variant("pics", {"kind": "imagefolder", "path": "pics", "size": [0, 8]})),
    Case("folder with no images", ["collect", "--stage", "notes"], "notes: no class folders found (found 1 file",
         folder_without_images),
    Case("16-bit images refused by param", ["collect", "--stage", "pics"], "high_bit_depth: reject",
         sixteen_bit_folder),
    Case("unwritable output dir", ["evaluate", "--stage", "iris"], "data/iris/evaluate: cannot write the output",
         fault=lambda root: read_only(root / "data/iris")),
    Case("disk full", ["evaluate", "--stage", "digits"], "data/digits/evaluate: cannot write the output: disk full",
         fault=lambda root: full_disk(root / "data/digits")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(good, tmp_path, case):
    if case.name.startswith("accelerator gpu"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    root = tmp_path / "project"
    shutil.copytree(good, root, symlinks=True)
    if case.mutate:
        case.mutate(root)
    with case.fault(root) if case.fault else contextlib.nullcontext():
        before = snapshot(root)
        result = subprocess.run([*FMPIPE, *case.args], cwd=root, capture_output=True, text=True)
        after = snapshot(root)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = visible_lines(result.stderr)
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith(f"fmpipe {case.args[0]} --stage {case.args[2]}: error: "), line
    assert case.names in line, line
    assert after == before  # every good output byte-identical, no temp file or directory left
