"""Shared test setup: every test runs in a scratch project directory with the repo's params."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A scratch copy of the project's params/annotations/expectations, as the working directory.

    Steps read ``params.yaml`` and write ``data/`` relative to the working directory, so
    tests never touch the checkout's own data.
    """
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "annotations", tmp_path / "annotations")
    shutil.copytree(REPO / "expectations", tmp_path / "expectations")
    monkeypatch.chdir(tmp_path)
    return tmp_path
