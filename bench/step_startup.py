"""What a step costs besides its own work: the time from the shell to the step's start, and
the whole command's time minus the step's own timer (``data/resources/<v>/<step>.json``).

    python bench/step_startup.py                      # this checkout's code, iris, 3 rounds
    python bench/step_startup.py --code /tmp/before   # another checkout's code (git worktree)

Runs every step of the variant once in a scratch project (params, annotations and GX suites
of the code's checkout), then ``--rounds`` more times each, and prints per step the medians of:
``start`` (shell to the runner's meter start: interpreter, CLI, params, the step's imports
before its timer), ``total`` (the command from the shell), ``own`` (the step's wall timer),
``outside`` (total - own), and CPU seconds of the whole command; then the sums, and the load
average before and after. Compare two commits by running it once with ``--code`` for each.

The start time is read by starting the command through a tiny launcher that notes the clock
when ``pipeline.resources.ResourceMeter`` is entered and then runs ``python -m pipeline``
exactly as the ``fmpipe`` command does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.steps import ORDER  # noqa: E402  (the registry; no heavy import)

# Runs in the child: record the wall clock (epoch seconds) at the step's start, then be fmpipe.
LAUNCHER = r"""
import os, runpy, sys, time
import pipeline.resources as R
_enter = R.ResourceMeter.__enter__
def _noted(self):
    with open(os.environ["FMPIPE_BENCH_START"], "a") as fh:
        fh.write(f"{time.time()!r}\n")
    return _enter(self)
R.ResourceMeter.__enter__ = _noted
sys.argv = ["fmpipe", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


def run_step(project: Path, step: str, variant: str, env: dict) -> dict:
    mark = project / ".bench-start"
    mark.unlink(missing_ok=True)
    env = {**env, "FMPIPE_BENCH_START": str(mark)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, step, "--stage", variant], cwd=project, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    total = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"fmpipe {step} --stage {variant} failed:\n{done.stderr[-3000:]}")
    own = json.loads((project / f"data/resources/{variant}/{step}.json").read_text())
    started = float(mark.read_text().split()[0]) if mark.exists() else float("nan")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"start": started - t0, "total": total, "own": own["wall_s"], "outside": total - own["wall_s"],
            "cpu": cpu, "own_cpu": own["cpu_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose pipeline/ and stages/ run (default: this one)")
    ap.add_argument("--variant", default="iris")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each step after the first")
    ap.add_argument("--steps", default=",".join(ORDER), help="comma-separated steps, in lifecycle order")
    args = ap.parse_args()
    code = args.code.resolve()
    steps = [s for s in args.steps.split(",") if s]
    env = dict(os.environ, GX_ANALYTICS_ENABLED="False")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH", "")) if p)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()

    load_before = os.getloadavg()
    rows: dict[str, list[dict]] = {s: [] for s in steps}
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        shutil.copy(code / "params.yaml", project / "params.yaml")
        for folder in ("annotations", "expectations"):
            shutil.copytree(code / folder, project / folder)
        for step in steps:  # the first run: outputs for the next steps, caches warm
            run_step(project, step, args.variant, env)
        for _ in range(args.rounds):
            for step in steps:
                rows[step].append(run_step(project, step, args.variant, env))
    load_after = os.getloadavg()

    keys = ("start", "total", "own", "outside", "cpu", "own_cpu")
    print(f"code {code} ({head or '?'}), variant {args.variant}, median of {args.rounds} runs per step, seconds")
    print(f"{'step':10s}" + "".join(f"{k:>9s}" for k in keys))
    sums = dict.fromkeys(keys, 0.0)
    for step in steps:
        med = {k: statistics.median(r[k] for r in rows[step]) for k in keys}
        for k in keys:
            sums[k] += med[k]
        print(f"{step:10s}" + "".join(f"{med[k]:9.3f}" for k in keys))
    print(f"{'sum':10s}" + "".join(f"{sums[k]:9.3f}" for k in keys))
    print(f"mean outside per step {sums['outside'] / len(steps):.3f} s, mean start {sums['start'] / len(steps):.3f} s")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    sys.exit(main())
