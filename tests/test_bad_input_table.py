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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from helpers import FMPIPE, copy_project_files, fmpipe, subprocess_env
import yaml

from pipeline.io import sha256_file

REPO = Path(__file__).resolve().parents[1]


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
        fmpipe(*args, cwd=root, check=True)


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


# ---------------------------------------------------------------- issue #22: hostile inputs

# A 9-level "billion laughs" list: ~0.3 KB of YAML, 9**9 (387 million) strings expanded.
BILLION_LAUGHS = "[&l0 [lol], " + ", ".join(
    f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)) + "]"


def yaml_bomb(place: Callable[[dict], None]) -> Callable[[Path], None]:
    """Put the bomb where ``place`` puts the marker value (params.yaml stays otherwise valid)."""
    def mutate(root: Path) -> None:
        edit_params(place)(root)
        text = (root / "params.yaml").read_text()
        assert text.count("BOMB_HERE") == 1
        (root / "params.yaml").write_text(text.replace("BOMB_HERE", BILLION_LAUGHS))
    return mutate


def write_bytes(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes(data)


def deep_json(rel: str) -> Callable[[Path], None]:
    return write(rel, "[" * 200_000 + "]" * 200_000)


def edit_suite(variant: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / "expectations" / f"{variant}.json"
        suite = json.loads(path.read_text())
        fn(suite)
        path.write_text(json.dumps(suite, indent=2))
    return mutate


def suite_as_directory(root: Path) -> None:
    (root / "expectations/iris.json").unlink()
    (root / "expectations/iris.json").mkdir()


def first_between(suite: dict) -> dict:
    return next(e for e in suite["expectations"] if e["type"] == "expect_column_values_to_be_between")


def csv_variant(path: str) -> Callable[[Path], None]:
    return add_variant("table", {"kind": "csv", "path": path, "id_column": "id"}, based_on="iris")


def short_csv_row(root: Path) -> None:
    rows = [f"{i},{i * 0.5},{i % 7},{i % 3},{i},{'ab'[i % 2]}" for i in range(20)]
    rows[6] = "6,3.0,6"  # cut off after 3 of 6 fields
    (root / "cut.csv").write_text("id,x1,x2,x3,x4,label\n" + "\n".join(rows) + "\n")
    csv_variant("cut.csv")(root)


def fifo_csv(root: Path) -> None:
    os.mkfifo(root / "pipe.csv")  # no writer: opening it would block forever
    csv_variant("pipe.csv")(root)


def fifo_imagefolder(root: Path) -> None:
    os.mkfifo(root / "pipe.tar")
    add_variant("pics", {"kind": "imagefolder", "path": "pipe.tar"})(root)


def ls_export_with_int_id(root: Path) -> None:
    task = {"id": 1, "data": {"fmpipe_id": 3}, "annotations": [
        {"id": 1, "completed_by": 1, "result": [
            {"from_name": "label", "to_name": "item", "type": "choices", "value": {"choices": ["setosa"]}}]}]}
    (root / "export.json").write_text(json.dumps([task]))


def symlinked_output(root: Path) -> None:
    """data/iris/evaluate is a link to a directory elsewhere (which must not go stale)."""
    target = root / "elsewhere" / "evaluate"
    target.parent.mkdir()
    shutil.move(root / "data/iris/evaluate", target)
    (root / "data/iris/evaluate").symlink_to(target)


@contextlib.contextmanager
def variant_busy(root: Path, variant: str):
    """Another fmpipe step of ``variant`` running (this process holds the variant's lock)."""
    from pipeline.runner import variant_lock

    cwd = os.getcwd()
    os.chdir(root)
    try:
        with variant_lock(variant, "train"):
            os.chdir(cwd)
            yield
    finally:
        os.chdir(cwd)


# ---------------------------------------------------------------- the table

@dataclass
class Case:
    name: str
    args: list[str]
    names: str  # the file or key the error line must name
    mutate: Optional[Callable[[Path], None]] = None
    fault: Optional[Callable[[Path], contextlib.AbstractContextManager]] = None
    prefix: Optional[str] = None  # the error line's start (default: fmpipe ARG0 --stage ARG2)
    memory_mb: Optional[int] = None  # address-space limit of the command (a bomb must not need more)


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
    Case("unknown engine", ["collect", "--stage", "iris"], "variants.iris.engine: expected one of local, ray",
         edit_params(lambda p: p["variants"]["iris"].update(engine="spark"))),
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
    # Issue #22: hostile params, suites, decisions and inputs.
    Case("alias bomb in model.options", ["train", "--stage", "iris"], "params.yaml:",
         yaml_bomb(lambda p: p["variants"]["iris"]["model"].update(options={"hidden": "BOMB_HERE"})),
         memory_mb=1024),
    Case("alias bomb in description", ["clean", "--stage", "iris"], "aliases expand this value to more than 100,000",
         yaml_bomb(lambda p: p["variants"]["iris"].update(description="BOMB_HERE")), memory_mb=1024),
    Case("alias bomb in an unknown key", ["train", "--stage", "iris"], "refused: aliases expand",
         yaml_bomb(lambda p: p["variants"]["iris"]["train"].update(warmup="BOMB_HERE")), memory_mb=1024),
    Case("binary params.yaml", ["train", "--stage", "iris"], "params.yaml:1: not UTF-8 text",
         write_bytes("params.yaml", bytes(range(128, 256)) * 8)),
    Case("control bytes in params.yaml", ["train", "--stage", "iris"], "params.yaml: not valid YAML: unacceptable character",
         write_bytes("params.yaml", bytes(range(0, 32)) * 8)),
    Case("params nested 200,000 deep", ["train", "--stage", "iris"], "params.yaml: not read: nested too deeply",
         write("params.yaml", "enabled: " + "[" * 200_000 + "]" * 200_000 + "\n")),
    Case("--params is a directory", ["train", "--stage", "iris", "--params", "data"], "data: a directory, not a regular file; expected the params YAML file"),
    Case("suite: unknown expectation type", ["validate", "--stage", "iris"],
         "expectations/iris.json: expectations[3]: unknown expectation type 'expect_column_to_exits'",
         edit_suite("iris", lambda s: s["expectations"][3].update(type="expect_column_to_exits"))),
    Case("suite: kwargs a string", ["validate", "--stage", "iris"],
         "expectations/iris.json: expectations[3] (expect_column_to_exist): 'kwargs' must be an object",
         edit_suite("iris", lambda s: s["expectations"][3].update(kwargs="column=label"))),
    Case("suite: a bad argument", ["validate", "--stage", "iris"],
         "(expect_column_values_to_be_between): kwargs.min_value: value is not a valid float (got 'low')",
         edit_suite("iris", lambda s: first_between(s)["kwargs"].update(min_value="low"))),
    Case("suite: invalid UTF-8", ["validate", "--stage", "iris"], "expectations/iris.json:1: not UTF-8 text",
         write_bytes("expectations/iris.json", b'{"name": "iris\xff"}')),
    Case("suite: a directory", ["validate", "--stage", "iris"], "expectations/iris.json: a directory, not a regular file",
         suite_as_directory),
    Case("decisions nested 200,000 deep", ["annotate", "--stage", "iris"],
         "annotations/iris/deep.json:1: not read: nested too deeply", deep_json("annotations/iris/deep.json")),
    Case("review import nested 200,000 deep", ["review", "import", "deep.json", "--stage", "iris"],
         "deep.json:1: not read: nested too deeply", deep_json("deep.json"),
         prefix="fmpipe review import --stage iris: error: "),
    Case("integer fmpipe_id in an export", ["review", "import", "export.json", "--stage", "iris"],
         "export.json:1: task 0: data.fmpipe_id is int 3, expected a string", ls_export_with_int_id,
         prefix="fmpipe review import --stage iris: error: "),
    Case("review import of a FIFO", ["review", "import", "pipe.json", "--stage", "iris"],
         "pipe.json: a FIFO (named pipe), not a regular file", lambda root: os.mkfifo(root / "pipe.json"),
         prefix="fmpipe review import --stage iris: error: "),
    Case("csv row with 3 of 6 fields", ["collect", "--stage", "table"], "cut.csv:8: 3 fields, the header has 6",
         short_csv_row),
    Case("csv source is a directory", ["collect", "--stage", "table"], "annotations: a directory, not a regular file; expected a CSV file",
         csv_variant("annotations")),
    Case("csv source is a FIFO", ["collect", "--stage", "table"], "pipe.csv: a FIFO (named pipe), not a regular file", fifo_csv),
    Case("csv source is /dev/zero", ["collect", "--stage", "table"], "/dev/zero: a character device, not a regular file", csv_variant("/dev/zero")),
    Case("imagefolder source is a FIFO", ["collect", "--stage", "pics"], "pipe.tar: a FIFO (named pipe), not a regular file",
         fifo_imagefolder),
    Case("symlinked output directory", ["evaluate", "--stage", "iris"], "data/iris/evaluate: is a symbolic link",
         symlinked_output),
    Case("another step of the variant running", ["evaluate", "--stage", "iris"],
         f"data/runs/iris/lock: variant 'iris' is busy: fmpipe train (pid {os.getpid()} on",
         fault=lambda root: variant_busy(root, "iris")),
]


def address_space(mb: Optional[int]) -> Optional[Callable[[], None]]:
    if mb is None:
        return None
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))


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
        result = subprocess.run([*FMPIPE, *case.args], cwd=root, capture_output=True, text=True, timeout=300,
                                env=subprocess_env(),
                                preexec_fn=address_space(case.memory_mb))
        after = snapshot(root)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = visible_lines(result.stderr)
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith(case.prefix or f"fmpipe {case.args[0]} --stage {case.args[2]}: error: "), line
    assert case.names in line, line
    assert after == before  # every good output byte-identical, no temp file or directory left
