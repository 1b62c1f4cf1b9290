"""The warm server (pipeline/warm.py): a command it runs is the command a cold process runs,
signals reach it, and what the server imported is never stale.

Real processes throughout: a real server started by a real first command, real commands
through its socket, real signals. One server serves this module (its own socket folder); a
``sitecustomize`` on its path can hold a step inside its work, so a signal arrives mid-step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import FMPIPE, REPO, copy_project_files, process_stats, subprocess_env
from pipeline import warm

# Loaded by every interpreter on this module's PYTHONPATH, the server included: with
# WARM_TEST_BLOCK set in the *command's* environment, writing a dataset waits (the step is
# then mid-work, its temporary output made), after saying so on stderr.
SITECUSTOMIZE = '''
import os, sys, time
import pipeline.manifest as _m
_save = _m.save_dataset
def _held(*args, **kwargs):
    if os.environ.get("WARM_TEST_BLOCK"):
        print("ready", file=sys.stderr, flush=True)
        time.sleep(600)
    return _save(*args, **kwargs)
_m.save_dataset = _held
'''

TIMING = re.compile(r" \[[^\]]* peak\]$")  # a step's [wall, CPU, peak] differ run to run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A warm server for this module's commands (started by a first, cold, command)."""
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    folder = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))  # short: socket paths stop at 107 bytes
    env = {warm.DIR_ENV: str(folder), warm.SWITCH: "1", warm.IDLE_ENV: "300",
           "PYTHONPATH": os.pathsep.join((str(hooks), str(REPO)))}
    first = tmp_path_factory.mktemp("first")
    copy_project_files(first)
    done = _fmpipe(first, env, "stages")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 120
    while not any(m["ready"] for m in _metas(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any(m["ready"] for m in _metas(folder)), \
        "no server came up:\n" + "".join(p.read_text() for p in folder.glob("*.log"))
    yield {"env": env, "folder": folder}
    for meta in _metas(folder):
        os.kill(meta["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _metas(folder) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _metas(folder), "the server did not stop on SIGTERM"
    shutil.rmtree(folder)


def _metas(folder: Path) -> list[dict]:
    found = []
    for path in folder.glob("*.json"):
        try:
            meta = json.loads(path.read_text())
            os.kill(meta["pid"], 0)
        except (OSError, ValueError):
            continue
        found.append(meta)
    return found


def _served(folder: Path) -> int:
    return sum(m["served"] for m in _metas(folder))


def _fmpipe(cwd: Path, env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*FMPIPE, *args], cwd=cwd, capture_output=True, text=True, env=subprocess_env(env),
                          timeout=300, **kw)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_warm_command_is_the_cold_command(server, tmp_path):
    """Same outputs byte for byte, same lines, same exit codes; and it really ran warm."""
    warm_root, cold_root = copy_project_files(tmp_path / "warm"), copy_project_files(tmp_path / "cold")
    cold_env = {**server["env"], warm.SWITCH: "0"}
    before = _served(server["folder"])
    runs = [("collect", "--stage", "iris"), ("clean", "--stage", "iris"),
            ("train", "--stage", "nope"),  # bad input: one line, exit 1
            ("train", "--stage"),  # a usage error: click's exit 2
            ("stages",)]
    for args in runs:
        hot, cold = _fmpipe(warm_root, server["env"], *args), _fmpipe(cold_root, cold_env, *args)
        assert hot.returncode == cold.returncode == (0 if args[-1] == "iris" else hot.returncode), (args, hot.stderr)
        assert hot.stdout == cold.stdout, args
        assert [TIMING.sub("", line) for line in hot.stderr.splitlines()] == \
               [TIMING.sub("", line) for line in cold.stderr.splitlines()], args
    assert _served(server["folder"]) == before + len(runs), "the server did not run the commands"
    for step in ("collect", "clean"):
        hot, cold = _digests(warm_root / "data/iris" / step), _digests(cold_root / "data/iris" / step)
        assert hot and hot == cold, step


@pytest.mark.parametrize("signum,code,word", [(signal.SIGTERM, 143, "terminated"),
                                               (signal.SIGINT, 130, "interrupted")])
def test_a_signal_to_the_command_stops_the_warm_step_cleanly(server, tmp_path, signum, code, word):
    """The caller's Ctrl+C or kill reaches the step the server forked: one line, the exit code a
    cold process gives, the step's temporary output removed."""
    copy_project_files(tmp_path)
    proc = subprocess.Popen([*FMPIPE, "collect", "--stage", "iris"], cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env({**server["env"], "WARM_TEST_BLOCK": "1"}))
    try:
        assert proc.stderr.readline().strip() == "ready"
        assert list((tmp_path / "data/iris").glob(".collect.tmp-*")), "the step had not started"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err.splitlines()) == (
        code, [f"fmpipe collect --stage iris: {word}; previous outputs left as they were"])
    assert not (tmp_path / "data").exists()


def test_a_killed_caller_takes_its_warm_command_with_it(server, tmp_path):
    """kill -9 of the caller (nothing can forward it): the server sees the socket close and
    stops the command, which cleans up as for SIGTERM."""
    copy_project_files(tmp_path)
    proc = subprocess.Popen([*FMPIPE, "collect", "--stage", "iris"], cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env({**server["env"], "WARM_TEST_BLOCK": "1"}))
    assert proc.stderr.readline().strip() == "ready"
    (meta,) = _metas(server["folder"])
    assert _children(meta["pid"]), "the command is not the server's child"
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while _children(meta["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _children(meta["pid"])
    assert not (tmp_path / "data").exists()  # it unwound through atomic_dir


def _children(pid: int) -> list[int]:
    """Live children of ``pid`` (a zombie has already ended)."""
    return [child for child, fields in process_stats() if int(fields[1]) == pid and fields[0] != "Z"]


def test_the_key_follows_code_and_import_time_settings(tmp_path, monkeypatch):
    """An edited module, or a setting libraries read when imported, needs another server;
    what a command reads when it runs (its columns, DVC's stage name) does not."""
    code = tmp_path / "code"
    (code / "sub").mkdir(parents=True)
    (code / "a.py").write_text("x = 1\n")
    (code / "sub" / "b.py").write_text("y = 2\n")
    monkeypatch.setattr(warm, "_code_roots", lambda: [code])
    base = dict(os.environ)
    key = warm.server_key(base)[0]
    assert warm.server_key(dict(base, COLUMNS="60", DVC_STAGE="train@iris", FMPIPE_WARM_IDLE="5"))[0] == key
    assert warm.server_key(dict(base, OMP_NUM_THREADS="3"))[0] != key
    assert warm.server_key(dict(base, CUDA_VISIBLE_DEVICES=""))[0] != key
    (code / "sub" / "b.py").write_text("y = 3\n")
    assert warm.server_key(base)[0] != key
    (code / "sub" / "c.txt").write_text("not code")
    edited = warm.server_key(base)[0]
    assert warm.server_key(base)[0] == edited


def test_the_server_preloads_what_the_steps_import_and_starts_no_thread(server):
    """The steps' lazy imports (Captum, cleanlab, their own modules...) are made once in the
    server, read from their code; none may leave a thread running in the process that forks
    (a child inherits whatever lock that thread held). pyarrow's jemalloc thread is the one
    known before this preload, and idle in its own allocator."""
    names = warm.step_imports()
    assert {"stages.evaluate", "pipeline.evaluation.explain", "captum.attr", "cleanlab.filter",
            "onnx", "sklearn.linear_model"} <= set(names)
    assert not [n for n in names if n.split(".")[0] in warm.NOT_PRELOADED]
    log = "".join(p.read_text() for p in server["folder"].glob("*.log"))
    assert f"preloaded {len(names)} of the {len(names)} modules the steps import" in log, log[-2000:]
    for meta in _metas(server["folder"]):
        threads = sorted((t / "comm").read_text().strip() for t in Path(f"/proc/{meta['pid']}/task").iterdir())
        assert len(threads) - threads.count("jemalloc_bg_thd") == 1, threads


def test_a_socket_folder_others_can_enter_is_not_used(tmp_path, monkeypatch):
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv(warm.DIR_ENV, str(folder))
    assert warm.warm_dir() == folder
    folder.chmod(0o777)
    assert warm.warm_dir() is None  # the command then runs cold
    assert warm.run_warm(["stages"]) is None


@pytest.mark.parametrize("given,seconds", [(None, warm.DEFAULT_IDLE_S), ("90", 90.0), ("abc", warm.DEFAULT_IDLE_S),
                                           ("-5", warm.DEFAULT_IDLE_S), ("nan", warm.DEFAULT_IDLE_S)])
def test_a_bad_idle_setting_falls_back_to_the_default(given, seconds, monkeypatch):
    if given is None:
        monkeypatch.delenv(warm.IDLE_ENV, raising=False)
    else:
        monkeypatch.setenv(warm.IDLE_ENV, given)
    assert warm.idle_seconds() == seconds


def test_a_dead_servers_record_naming_another_process_is_left_alone(tmp_path, monkeypatch):
    """A server killed -9 leaves its record; its pid may now be anyone's (here: this test's
    own process). `fmpipe warm status` does not list it and `warm stop` does not signal it."""
    folder = tmp_path / "sockets"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv(warm.DIR_ENV, str(folder))
    (folder / "0123456789abcdef0123.json").write_text(json.dumps(
        {"pid": os.getpid(), "key": "0123456789abcdef0123", "ready": 1.0, "served": 3,
         "roots": [str(REPO / "pipeline")], "code": "old"}))
    assert warm.servers() == []
    assert warm.stop_servers(wait_s=1) == 0  # and this process is still here to say so
