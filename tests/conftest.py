"""Shared test setup: a scratch project per test, and the real pipelines run once per session.

Helpers (subprocess wrappers, repo builders, ``annotated``) live in ``tests/helpers.py``; test
modules import from there, never from each other. The session fixtures below hand out
finished real runs; a test that changes one works on a copy (``Run.copy``, ``repro_copy``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import helpers
from helpers import copy_project_files, copy_tree, fmpipe, make_repo, sh

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


def pytest_configure(config):
    """The ``fmpipe`` commands tests start (directly, or through ``dvc repro``) go through warm
    servers (pipeline/warm.py), as a user's do; this run's servers live in a socket folder of
    its own and are stopped when it ends. xdist workers inherit the folder from the
    controller's environment (they start after this hook)."""
    # One OpenMP thread per process: the suite already runs one worker per core, so a second
    # thread in a step (torch, faiss, OpenBLAS) only waits for a core another worker holds, and
    # GOMP spins while it waits (evaluate@digits: 4.8 -> 3.0 CPU-s on a busy machine, the same
    # outputs byte for byte). A thread count set by the caller is kept.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if hasattr(config, "workerinput") or "FMPIPE_WARM_DIR" in os.environ:
        helpers.SESSION_ENV = dict(os.environ)
        return
    folder = tempfile.mkdtemp(prefix="fw-", dir="/tmp")  # short: socket paths stop at 107 bytes
    os.environ["FMPIPE_WARM_DIR"] = folder
    helpers.SESSION_ENV = dict(os.environ)
    config.stash[_WARM_DIR] = folder
    # A first (cold) command starts the server the tests' commands share, while tests are
    # collected, instead of when the first fixture's first step runs.
    config.stash[_STARTER] = subprocess.Popen([*helpers.FMPIPE, "stages"], cwd=helpers.REPO,
                                              env=helpers.subprocess_env(),
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_unconfigure(config):
    folder = config.stash.get(_WARM_DIR, None)
    if folder is not None:
        from pipeline.warm import stop_servers

        # A short run can end before that first command has started its server, which would
        # then outlive the run (until its idle timeout) in a folder already removed.
        try:
            config.stash[_STARTER].wait(timeout=120)
        except subprocess.TimeoutExpired:
            config.stash[_STARTER].kill()
        stop_servers()
        shutil.rmtree(folder, ignore_errors=True)


_WARM_DIR = pytest.StashKey[str]()
_STARTER = pytest.StashKey[subprocess.Popen]()


# The session fixtures below that run a whole real pipeline (minutes each), by the names tests
# ask for them.
SHARED_RUNS = {"repro_digits_iris": ("repro_digits_iris", "repro_copy", "reproduced"),
               "digits_run": ("digits_run",)}


def _worker_groups() -> dict[str, str]:
    """Test file -> the shared run it uses: its tests go to the worker that builds that run."""
    groups = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        text = path.read_text()
        for run, names in SHARED_RUNS.items():
            if any(re.search(rf"def \w+\([^)]*\b{name}\b", text) for name in names):  # a parameter
                groups[f"tests/{path.name}"] = run
                break
    return groups


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """The suite runs on every core (pytest-xdist, ``-n auto``). A worker builds a session or
    module fixture for itself, so a test file's tests stay on one worker (module fixtures built
    once), and the files that use one of the shared real runs go together (the run built once);
    the rest spread over whichever worker is free. (pytest 9 ignores xdist's own ``xdist_group``
    marks: xdist renames items' node ids, which pytest 9 no longer lets a plugin do.)"""
    from xdist.scheduler import LoadScopeScheduling

    groups = _worker_groups()

    class ByFileAndSharedRun(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return groups.get(path, path)

    return ByFileAndSharedRun(config, log)


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
    """A fresh git + DVC repo with what a clone of the project has (its files, its committed
    dvc.lock and the small outputs git keeps) where ``dvc repro --force`` ran every stage of
    digits and iris (nothing committed after it: ``git status`` shows what the run changed)."""
    repo = make_repo(tmp_path_factory.mktemp("dvc-repro") / "repo", ["digits", "iris"], outputs=True)
    done = sh(repo, "dvc", "repro", "--force")
    return Run(repo, done.stderr)


@pytest.fixture
def repro_copy(repro_digits_iris, tmp_path) -> Path:
    """A private copy of ``repro_digits_iris`` (git, DVC cache and workspace) to change."""
    return repro_digits_iris.copy(tmp_path / "repo")
