"""Every fmpipe command answers bad input, a full disk and Ctrl+C the same way (pipeline/boundary.py):
one line on stderr naming the command, exit 1 (130 for Ctrl+C), no traceback.

In process, each command meets each failure where its work starts (the function it calls is
replaced by one that fails), and the table of commands must name every command the app has,
so a new command cannot slip past. Real processes then check the same lines and exit codes
end to end: real bad input for each command group, a real SIGINT, a real ENOSPC error.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, fmpipe, subprocess_env
from pipeline.errors import FmpipeError
from pipeline.steps import ORDER

FULL = "/mnt/full/out.bin"
INTERRUPTED = "interrupted; previous outputs left as they were"

# argv, the function the command's work goes through (patched to fail), the command's name in
# its error line.
COMMANDS = [
    *[([step, "--stage", "v"], "pipeline.runner.run_step", f"fmpipe {step} --stage v") for step in ORDER],
    (["distill", "--stage", "v"], "pipeline.runner.run_step", "fmpipe distill --stage v"),
    (["validate", "--stage", "v", "--init"], "pipeline.config.load_variant", "fmpipe validate --stage v"),
    (["run", "--stage", "v"], "pipeline.runner.run_step", "fmpipe collect --stage v"),
    (["review", "import", "x.json", "--stage", "v"], "pipeline.review.importing.import_decisions",
     "fmpipe review import --stage v"),
    (["review", "pool", "log", "--stage", "v"], "pipeline.monitoring.queue.pool_log", "fmpipe review pool --stage v"),
    (["resources"], "pipeline.resource_table.collect", "fmpipe resources"),
    (["stages"], "pipeline.config.load_params", "fmpipe stages"),
    (["plots"], "pipeline.report.offline_plots.show", "fmpipe plots"),
    (["variant", "add", "n", "--source", "s"], "pipeline.variants.add_variant", "fmpipe variant add n"),
    (["compare", "HEAD"], "pipeline.compare.compare", "fmpipe compare"),
    (["diff", "HEAD", "--stage", "v"], "pipeline.audit.diff.diff_versions", "fmpipe audit diff"),
    (["audit", "--stage", "v"], "pipeline.audit.history.history", "fmpipe audit --stage v"),
    (["audit", "diff", "HEAD", "--stage", "v"], "pipeline.audit.diff.diff_versions", "fmpipe audit diff"),
    (["audit", "model", "p"], "pipeline.audit.model.audit_model", "fmpipe audit model"),
    (["predict", "p", "x.png"], "pipeline.inference.runtime.open_package", "fmpipe predict"),
    (["verify", "p"], "pipeline.packaging.verify.verify_package", "fmpipe verify"),
    (["serve", "p"], "pipeline.inference.runtime.open_package", "fmpipe serve"),
    (["monitor", "log", "--stage", "v"], "pipeline.monitoring.run.monitor", "fmpipe monitor --stage v"),
    (["warm", "status"], "pipeline.warm.servers", "fmpipe warm status"),
    (["warm", "stop"], "pipeline.warm.stop_servers", "fmpipe warm stop"),
]

FAILURES = {
    "bad input": (FmpipeError("x.csv: expected a label column"), 1, "error: x.csv: expected a label column"),
    "disk full": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), FULL), 1,
                  f"error: {FULL}: {os.strerror(errno.ENOSPC)}"),
    "Ctrl+C": (KeyboardInterrupt(), 130, INTERRUPTED),
}


def _leaf_commands(group, path=()) -> set[tuple[str, ...]]:
    out = set()
    for name, cmd in group.commands.items():
        sub = (*path, name)
        if hasattr(cmd, "commands"):
            out |= _leaf_commands(cmd, sub)
            if cmd.invoke_without_command:  # `fmpipe review --stage V`, `fmpipe audit --stage V`
                out.add(sub)
        else:
            out.add(sub)
    return out


def _command_of(group, argv) -> tuple[str, ...]:
    path = []
    for arg in argv:
        if arg not in getattr(group, "commands", {}):
            break
        path.append(arg)
        group = group.commands[arg]
    return tuple(path)


def test_the_table_names_every_command():
    from typer.main import get_command

    from pipeline.cli import app

    group = get_command(app)
    missing = _leaf_commands(group) - {_command_of(group, argv) for argv, _, _ in COMMANDS}
    assert not missing, f"commands with no row in COMMANDS: {sorted(missing)}"


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("argv,target,what", COMMANDS, ids=[" ".join(c[0][:2]) for c in COMMANDS])
def test_every_command_reports_each_failure_in_one_line(argv, target, what, failure, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    exc, code, message = FAILURES[failure]

    def fails(*args, **kwargs):
        raise exc

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(target, fails)
    result = CliRunner().invoke(app, argv)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("==> ")]  # run's progress
    assert (result.exit_code, lines) == (code, [f"{what}: {message}"]), result.stderr
    assert isinstance(result.exception, SystemExit)  # typer.Exit: no exception escaped


def test_a_bug_keeps_its_traceback(monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr("pipeline.resource_table.collect", bug)
    result = CliRunner().invoke(app, ["resources"])
    assert isinstance(result.exception, ValueError)  # not turned into a one-line "error"


@pytest.mark.parametrize("argv,what", [
    (["collect", "--stage", "digits"], "fmpipe collect --stage digits: error: params.yaml: not found"),
    (["predict", "missing.tar.gz", "x.png"], "fmpipe predict: error: missing.tar.gz: not found"),
    (["audit", "model", "missing"], "fmpipe audit model: error: missing: not found"),
    (["compare", "HEAD"], "fmpipe compare: error: "),
    (["variant", "add", "mine", "--source", "nowhere"], "fmpipe variant add mine: error: params.yaml: not found"),
])
def test_real_bad_input_is_one_line_in_each_command_group(argv, what, tmp_path):
    result = fmpipe(*argv, cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(what), result.stderr


# A real fmpipe process whose step (or package loading) blocks or fails as told: the rest of
# the process, the boundary and the exit are the command's own.
HARNESS = r"""
import errno, importlib, os, sys, time
module, attr, how = sys.argv[1:4]

def work(*args, **kwargs):
    if how == "block":
        print("ready", file=sys.stderr, flush=True)
        time.sleep(60)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), sys.argv[4])

setattr(importlib.import_module(module), attr, work)
from pipeline.cli import app
app(sys.argv[5:], prog_name="fmpipe")
"""


def _harness(target: str, how: str, argv: list[str], cwd) -> subprocess.Popen:
    module, attr = target.rsplit(".", 1)
    return subprocess.Popen([sys.executable, "-c", HARNESS, module, attr, how, FULL, *argv], cwd=cwd,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env(),
                            preexec_fn=_as_from_a_terminal)


def _as_from_a_terminal() -> None:
    """SIGINT as a shell gives it: default disposition, not blocked. A test worker's own state
    (seen in CI: SIGINT ignored after other tests ran in the worker, which a child inherits and
    Python then leaves ignored) must not decide what Ctrl+C does to fmpipe."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@pytest.mark.parametrize("argv,target,what", [
    (["train", "--stage", "digits"], "pipeline.runner.run_step", "fmpipe train --stage digits"),
    (["predict", "p.tar.gz", "x.png"], "pipeline.inference.runtime.open_package", "fmpipe predict"),
])
def test_a_real_sigint_ends_in_one_line_and_exit_130(argv, target, what, tmp_path):
    proc = _harness(target, "block", argv, tmp_path)
    try:
        assert proc.stderr.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err.splitlines()) == (130, [f"{what}: {INTERRUPTED}"])


def test_a_real_sigterm_mid_step_removes_the_temporary_output_and_exits_143(tmp_path):
    """kill (a CI timeout, a scheduler) stops a step like Ctrl+C: before, Python's default
    SIGTERM ended the process on the spot and left ``data/<v>/.<step>.tmp-*`` behind."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    proc = _harness("pipeline.manifest.save_dataset", "block", ["collect", "--stage", "iris"], tmp_path)
    try:
        assert proc.stderr.readline().strip() == "ready"
        assert list((tmp_path / "data" / "iris").glob(".collect.tmp-*")), "the step had not started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err.splitlines()) == (
        143, ["fmpipe collect --stage iris: terminated; previous outputs left as they were"])
    assert not (tmp_path / "data").exists()  # the temporary output and the parents it made


def test_a_real_full_disk_names_the_path(tmp_path):
    proc = _harness("pipeline.audit.model.audit_model", "fail", ["audit", "model", "p"], tmp_path)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err.splitlines()) == (1, [f"fmpipe audit model: error: {FULL}: {os.strerror(errno.ENOSPC)}"])
