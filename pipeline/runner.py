"""The one runner every step goes through, whether started by a person or by ``dvc repro``.

``run_step("clean", "digits")``:

1. loads and validates the variant's params (one clear error for a bad key);
2. hands the step's glue (``stages/<step>.py: run(ctx)``) a :class:`StepContext`: the spec,
   the upstream inputs resolved from the registry (``ctx.dataset("collect")`` reads and
   checks a dataset), and an empty temporary output directory ``ctx.out``;
3. on success renames ``ctx.out`` over ``data/<v>/<step>/`` in one step (a failed or
   interrupted step leaves the previous output as it was);
4. records what the run used in ``data/resources/<v>/<step>.json`` and where it ran in
   ``data/runs/<v>/<step>.json`` (neither is a stage output nor tracked by git, so they never
   change a hashed output, ``dvc.lock`` or ``git status``) and prints one summary line on stderr.

Steps never open their own output directory, never time themselves and never print their
own summary: that all happens here, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from pipeline import steps as registry
from pipeline.errors import FmpipeError

log = logging.getLogger("fmpipe")

# Set to 0 to skip resource accounting (the test that proves it changes no hashed output).
ACCOUNTING_ENV = "FMPIPE_RESOURCES"


@dataclass
class StepContext:
    """What a step's glue gets: its params, its inputs, and a place to write its outputs."""

    step: registry.Step
    variant: str
    params_path: str
    spec: Any  # pipeline.config.VariantSpec
    out: Path  # write outputs here (a temp dir the runner renames into place on success)
    flags: dict[str, bool] = field(default_factory=dict)
    summary: str = ""  # the step's one-line account, printed by the runner
    result: Any = None  # what run_step returns (the step's report, metrics, lineage, ...)
    figures: dict[str, Any] = field(default_factory=dict)  # extra resource metrics (train)
    details: dict[str, Any] = field(default_factory=dict)  # extra run-record fields (train)
    # A gate that failed after its evidence was written (validate): the runner commits the
    # outputs so people can read them, then raises this.
    failure: Optional[str] = None
    # False on a DDP rank other than 0: rank 0 alone records resources and reports.
    record: bool = True
    # A student step (``step.over == "distill"``): its StudentSpec (``teacher`` names the
    # variant whose outputs its inputs are).
    student: Any = None
    _datasets: dict[str, Any] = field(default_factory=dict)

    @property
    def engine(self) -> str:
        """Where this step's row-parallel work runs (``pipeline/engine.py``): the variant's
        ``engine`` for this step."""
        return self.spec.engine.of(self.step.name)

    @property
    def final_dir(self) -> Path:
        return self.step.path(self.variant)

    @property
    def teacher(self) -> str:
        """A student's teacher variant; "" for a variant's own step."""
        return self.student.teacher if self.student is not None else ""

    @property
    def reads_of(self) -> str:
        """The variant whose step outputs this step reads: its own, or a student's teacher."""
        return self.teacher or self.variant

    def input(self, ref: str) -> Path:
        """Path of one of the step's declared inputs: ``"annotate"`` or ``"train/model.json"``."""
        if ref not in self.step.reads and ref.split("/", 1)[0] not in self.step.reads:
            raise KeyError(f"step {self.step.name!r} does not declare {ref!r} as an input")
        return registry.output(ref, self.reads_of)

    def rerun(self, ref: str, then: str = "first") -> str:
        """The hint for a missing or stale input ``ref``: run the step that writes it."""
        self.input(ref)  # only a declared input
        return registry.rerun_hint(ref, self.reads_of, then)

    def source(self, template: str) -> Path:
        if template not in self.step.sources:
            raise KeyError(f"step {self.step.name!r} does not declare {template!r} as a source")
        return registry.at(template, self.variant)

    def dataset(self, ref: str):
        """The dataset an upstream step wrote, read once and checked against its manifest."""
        if ref not in self._datasets:
            from pipeline.manifest import read_dataset

            self._datasets[ref] = read_dataset(self.input(ref), run=self.rerun(ref, then=""))
        return self._datasets[ref]

    def previous(self, name: str) -> Path:
        """A file of this step's last good output (before this run replaces it)."""
        return self.final_dir / name


def run_step(name: str, variant: str, params_path: str = "params.yaml", **flags: bool) -> Any:
    """Run one step of one variant through the registry; raises FmpipeError on bad input."""
    from pipeline.config import load_variant
    from pipeline.console import setup_console

    setup_console()
    step = registry.get(name)
    student = None
    if step.over == "distill":
        from pipeline.config import load_student

        student, spec = load_student(variant, params_path)
    else:
        spec = load_variant(variant, params_path)
    with variant_lock(variant, name):
        return _run_locked(step, variant, params_path, spec, flags, student)


def _run_locked(step: registry.Step, variant: str, params_path: str, spec: Any, flags: dict[str, bool],
                student: Any = None) -> Any:
    import importlib

    from pipeline.io import atomic_dir, refuse_symlink
    from pipeline.resources import ResourceMeter

    name = step.name
    final = step.path(variant)
    refuse_symlink(final)  # before the step's work (atomic_dir checks again)
    glue = importlib.import_module(step.module)
    accounting = os.environ.get(ACCOUNTING_ENV, "1") != "0"

    with ResourceMeter() as meter:
        if step.writes_itself:
            ctx = StepContext(step, variant, params_path, spec, final, dict(flags), student=student)
            glue.run(ctx)
        else:
            with atomic_dir(final) as tmp:
                ctx = StepContext(step, variant, params_path, spec, tmp, dict(flags), student=student)
                glue.run(ctx)
            ctx.out = final
    if not ctx.record:
        return ctx.result
    if name in type(spec.engine).model_fields:  # a step with an engine: say which ran it
        from pipeline.engine import describe

        ctx.details.setdefault("engine", describe(ctx.engine))

    if accounting:
        inputs = [registry.output(r, ctx.reads_of) for r in step.reads]
        inputs += [registry.at(s, variant) for s in step.sources]
        outputs = [registry.at(p, variant) for p, _ in step.out_paths()]
        res = meter.result(inputs, outputs, ctx.figures)
        res.write(registry.at(step.resources, variant))
        meter.record(name, ctx.details).write(registry.at(step.run_record, variant))
        cost = f" [{res.wall_s:.1f} s, {res.cpu_s:.1f} s CPU, {res.peak_mb / 1024:.2f} GB peak]"
    else:
        cost = ""
    print(f"fmpipe {name} --stage {variant}: {ctx.summary or 'done'}{cost}", file=sys.stderr)
    if ctx.failure:
        raise FmpipeError(ctx.failure)
    return ctx.result


# ---------------------------------------------------------------- one step per variant at a time

# The lock file of a variant; its content names the holder (for the refusal's message only:
# the lock itself is the kernel's flock, released when the holder exits however it exits).
LOCK_FILE = f"{registry.RUNS_DIR}/lock"
# Set by torchrun, Lightning's DDP launcher and SLURM on each process of a multi-process
# run: only the first process locks (the others run the same step as its helpers).
_RANK_ENVS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


@contextlib.contextmanager
def variant_lock(variant: str, step: str) -> Iterator[None]:
    """Hold the variant's lock while a step runs; a second step of the same variant, in
    another process, is refused with one line naming the holder.

    Two steps of one variant at once interleave their outputs (two trains wrote every curve
    row twice, and stray checkpoints). An ``flock`` on ``data/runs/<variant>/lock``
    (git-ignored, not a DVC output; it holds the holder's pid, host and start time) is
    released by the kernel when its process ends, even by SIGKILL, so a killed run never
    leaves a lock that refuses the next one (only the file, which the next run takes over).
    A finished step removes the file. Where the lock cannot be created (a read-only data/),
    the step runs without it: nothing can be written there to corrupt.
    """
    import json
    import socket
    from datetime import datetime, timezone

    if any(os.environ.get(k, "0") not in ("", "0") for k in _RANK_ENVS):
        yield
        return
    path = registry.at(LOCK_FILE, variant)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, variant, step)
    except OSError as exc:
        from pipeline.io import is_environment_error

        if not is_environment_error(exc):
            raise
        log.debug("%s: cannot create the lock (%s); running without it", path, exc.strerror)
        fd = None
    except FmpipeError:
        _remove_empty(created)
        raise
    if fd is None:
        yield
        return
    try:
        holder = {"step": step, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        # Removed while still held (a process that opened the old file then finds it gone
        # and retries, see _acquire), so a finished step leaves nothing behind.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # releases the flock
        _remove_empty(created)


def _acquire(path: Path, variant: str, step: str) -> int:
    """An fd of ``path`` holding its flock; FmpipeError naming the holder when it is held."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FmpipeError(f"{path}: variant {variant!r} is busy: {holder}; wait for it to finish "
                              f"(or stop it), then {registry.rerun_hint(step, variant, 'again')}") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and flock: open it afresh


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; only if empty
        with contextlib.suppress(OSError):
            d.rmdir()


def _holder(fd: int) -> str:
    import json

    try:
        h = json.loads(os.pread(fd, 4096, 0))
        return f"fmpipe {h['step']} (pid {h['pid']} on {h['host']}, started {h['started']}) holds it"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is still writing its name
        return "another fmpipe step holds it"
