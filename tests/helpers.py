"""Helpers every test module shares: one home, so no test module imports another.

- ``REPO``: the checkout under test.
- ``sh(cwd, *cmd)``: any command (git, dvc, fmpipe) in a subprocess; fails the test with its
  output when it exits non-zero (``check=False`` returns the result instead).
- ``fmpipe(*args, cwd=...)``: the installed ``fmpipe`` command (``FMPIPE``) in a subprocess;
  returns the result unchecked unless ``check=True``. Run it with ``subprocess_env()``, as these
  helpers do: then every command of the session has the same warm server (pipeline/warm.py).
- ``copy_project_files(dest)``: params, annotations and GX suites: what a step needs besides code.
- ``make_repo(dest, enabled, edit=None, outputs=False)``: a fresh git + DVC repo holding the
  project's files (``outputs``: also the small outputs git keeps, as a clone has them).
- ``copy_tree(src, dest)``: a private copy of a finished project or repo (``.git`` and ``.dvc``
  included) from a session fixture (``tests/conftest.py``).
- ``edit_params(fn, path)``: change ``params.yaml`` through a function of the parsed dict.
- ``serving(package, *flags)``: a real ``fmpipe serve`` process on a free port, stopped after.
- ``annotated(variant)``: ``data/<v>/annotate`` without the validate gate (collect and clean
  really run, once per session for the same params; later calls copy their outputs).

Every subprocess gets ``PYTHONPATH=REPO``, so ``fmpipe`` (also when ``dvc repro`` starts it)
runs this checkout's code whichever checkout the venv was installed from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
# The installed command, as a user runs it. Not `python -m pipeline`: that puts the working
# directory first on sys.path, so in a test repo holding a copy of the code it would import the
# copy (another warm server for every repo, ~10 s of CPU each) instead of this checkout.
FMPIPE = (str(Path(sys.executable).with_name("fmpipe")),)


# The settings the session's commands share, as they were when it started (conftest.py sets
# it). Tests that train or call Ray in-process leave import-time variables behind in this
# process (PL_GLOBAL_SEED, CUBLAS_WORKSPACE_CONFIG, KMP_*, TORCHINDUCTOR_CACHE_DIR, Ray's
# PYTHONBREAKPOINT...); handed on, each would key another warm server (pipeline/warm.py), which
# imports for ~10 CPU seconds to serve a few commands. A test that means a subprocess to see
# such a variable passes it in ``extra``.
SESSION_ENV: Optional[dict] = None


def subprocess_env(extra: Optional[dict] = None) -> dict:
    from pipeline.warm import is_keyed

    env = dict(os.environ, GX_ANALYTICS_ENABLED="False")
    if SESSION_ENV is not None:
        for key in [k for k in env if is_keyed(k) and env[k] != SESSION_ENV.get(k)]:
            if key in SESSION_ENV:
                env[key] = SESSION_ENV[key]
            else:
                del env[key]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def _ran(result: subprocess.CompletedProcess, cmd) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def sh(cwd: Path, *cmd: str, check: bool = True, env: Optional[dict] = None,
       timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=subprocess_env(env),
                            timeout=timeout)
    return _ran(result, cmd) if check else result


def fmpipe(*args: str, cwd: Optional[Path] = None, check: bool = False, env: Optional[dict] = None,
           timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [*FMPIPE, *args]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=subprocess_env(env),
                            timeout=timeout)
    return _ran(result, ["fmpipe", *args]) if check else result


@dataclass
class Served:
    """A running ``fmpipe serve``: its process, address and the line it announced itself with."""

    proc: subprocess.Popen
    host: str
    port: int
    line: str

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"


@contextlib.contextmanager
def serving(package: Path | str, *flags: str, cwd: Optional[Path] = None, env: Optional[dict] = None):
    """``fmpipe serve PACKAGE --port 0 FLAGS`` as a real process, yielded once it listens (its
    first stderr line names the address) and terminated after. Serving never loads torch: its
    shared library is not even mapped into the process."""
    proc = subprocess.Popen([*FMPIPE, "serve", str(package), "--port", "0", *flags], cwd=cwd,
                            env=subprocess_env(env), stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"http://([\d.]+):(\d+)", line)
        assert m, line + (proc.stderr.read() if proc.poll() is not None else "")
        assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
        yield Served(proc, m.group(1), int(m.group(2)), line)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def copy_project_files(dest: Path) -> Path:
    """What a step needs besides code: params, people's decisions, the curated GX suites."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", dest / "params.yaml")
    for folder in ("annotations", "expectations"):
        shutil.copytree(REPO / folder, dest / folder)
    return dest


def edit_params(fn: Callable[[dict], None], path: Path | str = "params.yaml") -> None:
    path = Path(path)
    params = yaml.safe_load(path.read_text())
    fn(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(dest: Path, enabled: list[str], edit: Optional[Callable[[dict], None]] = None,
              outputs: bool = False) -> Path:
    """A fresh git + DVC repo holding the project's files (as git would clone them).

    Without ``outputs``, nothing under data/ but its own files (its .gitignore keeps outputs out
    of git); with it, also the small outputs git keeps (evaluate's figures, train's live plots)
    of the ``enabled`` variants, as a real clone has them next to the committed dvc.lock."""
    files = sh(REPO, "git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split()
    kept = ("data/.gitignore", "data/README.md")
    for rel in files:
        src = REPO / rel
        if src.is_file() and (not rel.startswith("data/") or rel in kept
                              or (outputs and rel.split("/")[1] in enabled)):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)

    def set_enabled(params: dict) -> None:
        params["enabled"] = enabled
        if edit:
            edit(params)

    edit_params(set_enabled, dest / "params.yaml")
    keep_lock_entries(dest / "dvc.lock", enabled)
    sh(dest, "git", "init", "-q", "-b", "main")
    sh(dest, "git", "config", "user.email", "ci@example.invalid")
    sh(dest, "git", "config", "user.name", "fmpipe tests")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "project")
    return dest


def keep_lock_entries(lock: Path, enabled: list[str]) -> None:
    """Drop the committed ``dvc.lock``'s entries of variants the repo does not enable: as if it
    had never run them. DVC re-reads and rewrites the whole lock (a round-trip YAML parse) at
    every stage it runs, so the digits and iris entries would cost each of a test repo's stages
    about 0.25 s for nothing. Cut as text, block by block, so what is kept is DVC's own layout."""
    if not lock.exists():
        return
    head, _, body = lock.read_text().partition("\nstages:\n")
    blocks = re.split(r"(?m)^(?=  \S)", body)  # one block per stage entry (2-space indent)
    kept = [b for b in blocks if b and b.split(":", 1)[0].strip().partition("@")[2] in enabled]
    if len(kept) == len([b for b in blocks if b]):
        return
    if kept:
        lock.write_text(head + "\nstages:\n" + "".join(kept))
    else:
        lock.unlink()


def only_variants(repo: Path, enabled: list[str]) -> Path:
    """Narrow a repo (a copy of a finished run) to the ``enabled`` variants, as a team that
    stops running the others would: params' ``enabled`` and ``dvc.lock``'s entries, committed.
    For a test about one variant: every stage DVC runs re-parses the whole lock."""
    edit_params(lambda params: params.update(enabled=enabled), repo / "params.yaml")
    keep_lock_entries(repo / "dvc.lock", enabled)
    sh(repo, "git", "add", "params.yaml", "dvc.lock")
    sh(repo, "git", "commit", "-qm", f"only {', '.join(enabled)}")
    return repo


def copy_tree(src: Path, dest: Path) -> Path:
    """A private copy of a finished run (a scratch project or a git + DVC repo, its .git,
    .dvc and cache included), so a test may change it without touching the shared one.

    DVC's state database is keyed by inode, so DVC re-hashes the copied files once (same
    hashes); git's index is refreshed the same way.
    """
    shutil.copytree(src, dest, symlinks=True)
    return dest


# ---------------------------------------------------------------- data steps, once per session

_STEP_CACHE: dict[str, Path] = {}
STEP_CACHE_DIR: Optional[Path] = None  # set by conftest.py (a session temp dir)


def _step_inputs_key(variant: str, steps: tuple[str, ...]) -> str:
    """What the data steps' outputs depend on besides code: their declared params sections and
    the files people edit (pipeline/steps.py). Other params (train, ...) do not change them."""
    from pipeline import steps as registry

    params = yaml.safe_load(Path("params.yaml").read_text())["variants"][variant]
    h = hashlib.sha256(json.dumps([variant, steps], sort_keys=True).encode())
    for name in steps:
        step = registry.get(name)
        h.update(json.dumps({s: params.get(s) for s in step.params}, sort_keys=True, default=str).encode())
        for template in step.sources:
            src = Path(template.format(v=variant))
            for f in sorted([src] if src.is_file() else (p for p in src.rglob("*") if p.is_file())):
                h.update(f.as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def run_data_steps(variant: str, *steps: str) -> None:
    """Run ``steps`` of ``variant`` in the working directory, as ``run_step`` would.

    The first call for given inputs really runs them (in a session cache directory with this
    directory's params, annotations and suites); later calls with the same inputs copy those
    outputs (and the runner's records) into ``data/``. For tests whose subject is a later step.
    """
    from pipeline.runner import run_step

    source = (yaml.safe_load(Path("params.yaml").read_text())["variants"][variant].get("source") or {})
    key = _step_inputs_key(variant, steps)
    cached = _STEP_CACHE.get(key)
    if cached is None:
        # Outside pytest's session, or a source with local data (a path the cache key does not
        # hash, and that may be relative to this directory): just run them here.
        if STEP_CACHE_DIR is None or source.get("path"):
            for name in steps:
                run_step(name, variant)
            return
        cached = STEP_CACHE_DIR / key
        cached.mkdir(parents=True)
        shutil.copy("params.yaml", cached / "params.yaml")
        for folder in ("annotations", "expectations"):
            if Path(folder).exists():
                shutil.copytree(folder, cached / folder)
        here = os.getcwd()
        os.chdir(cached)
        try:
            for name in steps:
                run_step(name, variant)
        finally:
            os.chdir(here)
        _STEP_CACHE[key] = cached
    for sub in (f"data/{variant}", f"data/resources/{variant}", f"data/runs/{variant}"):
        for name in steps:
            for src in (cached / sub).glob(f"{name}*"):
                dest = Path(sub) / src.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
                else:
                    shutil.copy2(src, dest)


def annotated(variant: str) -> None:
    """data/<variant>/annotate without the validate gate (validate's own tests cover it): with no
    label decisions annotate's output equals clean's, so clean's is copied."""
    run_data_steps(variant, "collect", "clean")
    shutil.copytree(f"data/{variant}/clean", f"data/{variant}/annotate")


# ---------------------------------------------------------------- sample artefacts and data

def sample_metrics(**over):
    from pipeline.artefacts import Metrics

    return Metrics(**{"accuracy": 0.91, "macro_f1": 0.9, "n_test": 100, "ece": 0.02, "temperature": 1.3, **over})


def sample_blessing(passed: bool = True):
    from pipeline.artefacts import Blessing, Check, JudgedModel

    checks = [Check(name="min_accuracy", metric="accuracy", threshold=0.95, value=0.91, passed=passed),
              Check(name="min_macro_f1", metric="macro_f1", threshold=0.5, value=0.9, passed=True)]
    return Blessing(blessed=passed, checks=checks, tta="flip", tta_views=2, tta_flip=True,
                    model=JudgedModel(dir="data/v/train", sha256="ab" * 32, name="mlp"))


def sample_lineage():
    from pipeline.packaging.lineage import build_lineage

    meta = {"model": {"name": "mlp", "options": {"hidden": [8]}}, "classes": ["a", "b"],
            "input": {"kind": "table", "shape": [4]}}
    return build_lineage(variant="v", meta=meta, n_params=42, weights_sha="ab" * 32,
                         dvc_lock={"available": False, "note": "no dvc.lock"}, params={"source": {"kind": "x"}},
                         data_dir="data/v/annotate", rows_by_split={"train": 8, "val": 1, "test": 2},
                         rows_by_class={"a": 5, "b": 6}, classes=["a", "b"], metrics=sample_metrics(), blessing=sample_blessing())


def make_model(variant: str, epochs: int = 0, lr: float = 0.01, batch_size: int = 64, train=None):
    """The variant's network, fitted ``epochs`` passes with Adam on ``data/<v>/annotate``'s train
    split (or the dataset ``train``), saved where the train step would (``data/<v>/train/``),
    without the train step."""
    import torch

    from pipeline.config import load_variant
    from pipeline.manifest import read_dataset
    from pipeline.models import build, save_trained
    from pipeline.inference.network import model_inputs

    spec = load_variant(variant)
    if train is None:
        train = read_dataset("data/{}/annotate".format(variant), mmap=False).split("train")
    x = model_inputs(train)
    y = torch.tensor(train.manifest["label"].to_numpy(), dtype=torch.long)
    dims = (0, 2, 3) if x.ndim == 4 else (0,)
    torch.manual_seed(0)
    net = build(spec.model.name, tuple(x.shape[1:]), len(train.classes), spec.model.options,
                mean=x.mean(dim=dims), std=x.std(dim=dims))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(batch_size):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    meta = {"model": {"name": spec.model.name, "options": dict(spec.model.options)},
            "input": {"kind": train.kind, "shape": list(x.shape[1:])}, "classes": list(train.classes)}
    out = Path(f"data/{variant}/train")
    out.mkdir(parents=True, exist_ok=True)
    save_trained(net, meta, out)
    return net


def photos(n: int, size: int = 32, seed: int = 0):
    """Distinct smooth 'photos': random blobs of colour on a gradient, plus fine texture."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        img = rng.uniform(40, 200, 3) + 60 * (rng.uniform(-1, 1, 3) * yy[..., None] + rng.uniform(-1, 1, 3) * xx[..., None])
        for _ in range(8):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            img = img + blob[..., None] * rng.uniform(-120, 120, 3)
        img = img + rng.normal(0, 6, (size, size, 1))
        out[k] = np.clip(img, 0, 255).astype(np.uint8)
    return out


# The ISA extensions oneDNN and MKL choose float kernels by: two CPUs that differ in one of
# them (this project's machines come with and without AVX512-BF16/AMX) train the same code to
# different last bits. "Same weights on CPU" holds per signature.
_KERNEL_ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
               "amx_bf16", "amx_int8", "avx_vnni")


def cpu_signature() -> dict:
    """What decides a CPU run's last bits: torch's version and the kernel ISA of this CPU."""
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"torch": torch.__version__.split("+")[0],
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa": sorted(f for f in _KERNEL_ISA if f in flags)}


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """Every live process: its pid and the fields of ``/proc/<pid>/stat`` after the command
    name (state, ppid, pgrp, session, ...)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        yield int(stat.parent.name), fields
