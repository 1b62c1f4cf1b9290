"""Shared test setup: every test runs in a scratch project directory with the repo's params."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


def copy_project_files(dest: Path) -> Path:
    """What a step needs besides code: params, people's decisions, the curated GX suites."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", dest / "params.yaml")
    for folder in ("annotations", "expectations"):
        shutil.copytree(REPO / folder, dest / folder)
    return dest


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
