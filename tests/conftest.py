"""Shared test setup: a scratch project per test, and the real pipelines run once per session.

Helpers (subprocess wrappers, repo builders, ``annotated``) live in ``tests/helpers.py``; test
modules import from there, never from each other. The session fixtures below hand out
finished real runs; a test that changes one works on a copy (``Run.copy``, ``repro_copy``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

import helpers
from helpers import copy_project_files, copy_tree, fmpipe, make_repo, sh

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


# The session fixtures below that run a whole real pipeline (minutes each).
SHARED_RUNS = ("repro_digits_iris", "digits_run")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The suite runs on every core (pytest-xdist, ``--dist loadgroup``): a worker builds a
    session or module fixture for itself, so the tests that share an expensive one are put on
    one worker (an ``xdist_group``) and it is built once; every other test goes wherever a
    worker is free. Runs before xdist reads the groups."""
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        group = next((name for name in SHARED_RUNS if name in item.fixturenames), None)
        if group is None and any(d[-1].scope == "module" for d in defs.values() if d):
            group = item.module.__name__
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A scratch copy of the project's params/annotations/expectations, as the working directory.

    Steps read ``params.yaml`` and write ``data/`` relative to the working directory, so
    tests never touch the checkout's own data.
    """
    copy_project_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def one_torch_thread():
    """Tiny models on shared CPUs: extra intra-op threads only fight over cores (50x slower).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _data_step_cache(tmp_path_factory):
    """Where ``helpers.run_data_steps``/``annotated`` keep the data steps they ran this session."""
    helpers.STEP_CACHE_DIR = tmp_path_factory.mktemp("data-steps")
    yield
    helpers.STEP_CACHE_DIR = None


# ---------------------------------------------------------------- real pipelines, once per session

@dataclass(frozen=True)
class Run:
    """A finished real run: ``root`` (read it, never change it: other modules share it; take a
    ``copy(dest)`` to change anything) and the command's stderr."""

    root: Path
    stderr: str

    def copy(self, dest: Path) -> Path:
        return copy_tree(self.root, dest)


# One train-set row relabelled by a person: the report shows it, the lineage records it.
DIGITS_RELABEL = "digits/0002"


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Run:
    """``fmpipe run --stage digits`` (every step, committed params, real Lightning, GX, ONNX) in a
    scratch project without git or DVC, with one annotation (``DIGITS_RELABEL`` -> 3)."""
    root = copy_project_files(tmp_path_factory.mktemp("digits-run") / "project")
    (root / "annotations/digits/labels.csv").write_text(f"id,label,note\n{DIGITS_RELABEL},3,report test relabel\n")
    done = fmpipe("run", "--stage", "digits", cwd=root, check=True)
    return Run(root, done.stderr)


@pytest.fixture(scope="session")
def repro_digits_iris(tmp_path_factory) -> Run:
    """A fresh git + DVC repo with the project's files and its committed dvc.lock where
    ``dvc repro --force`` ran every stage of digits and iris (nothing committed after it)."""
    repo = make_repo(tmp_path_factory.mktemp("dvc-repro") / "repo", ["digits", "iris"])
    done = sh(repo, "dvc", "repro", "--force")
    return Run(repo, done.stderr)


@pytest.fixture
def repro_copy(repro_digits_iris, tmp_path) -> Path:
    """A private copy of ``repro_digits_iris`` (git, DVC cache and workspace) to change."""
    return repro_digits_iris.copy(tmp_path / "repo")
