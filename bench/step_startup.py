"""What a step costs besides its own work: the time from the shell to the step's start, and
the whole command's time minus the step's own timer (``data/resources/<v>/<step>.json``),
for a cold process and through the warm server (pipeline/warm.py), side by side in one run.

    python bench/step_startup.py                      # this checkout's code, iris, 3 rounds
    python bench/step_startup.py --code /tmp/before   # another checkout's code (git worktree)
    python bench/step_startup.py --modes cold         # only cold processes (code before the server)

Runs every step of the variant once in a scratch project (params, annotations and GX suites
of the code's checkout), then ``--rounds`` more times each, and prints per step the medians of:
``start`` (shell to the runner's meter start: interpreter, CLI, params, the step's imports
before its timer), ``total`` (the command from the shell), ``own`` (the step's wall timer),
``outside`` (total - own), and CPU seconds of the whole command; then the sums, and the load
average before and after. Compare two commits by running it once with ``--code`` for each.

Cold: the start time is read by starting the command through a tiny launcher that notes the
clock when ``pipeline.resources.ResourceMeter`` is entered and then runs ``python -m pipeline``
with ``FMPIPE_WARM=0``. Warm: ``python -m pipeline`` as the ``fmpipe`` command runs it, with a
server of the bench's own (started, and waited for, before the timed rounds); there the start
is not observable from outside (``nan``), and CPU is the client's plus the forked command's (the
server's reaped children).
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


def _server_cpu(warm_dir: Path | None) -> float:
    """CPU seconds of the warm servers' reaped children (the commands they forked)."""
    total = 0.0
    for meta in warm_dir.glob("*.json") if warm_dir else []:
        try:
            pid = json.loads(meta.read_text())["pid"]
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, KeyError):
            continue
        total += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime
    return total


def run_step(project: Path, step: str, variant: str, env: dict, warm_dir: Path | None = None) -> dict:
    mark = project / ".bench-start"
    mark.unlink(missing_ok=True)
    env = {**env, "FMPIPE_BENCH_START": str(mark)}
    cmd = ([sys.executable, "-m", "pipeline"] if warm_dir else [sys.executable, "-c", LAUNCHER])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = _server_cpu(warm_dir)
    t0 = time.time()
    done = subprocess.run([*cmd, step, "--stage", variant], cwd=project, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    total = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = _server_cpu(warm_dir) - server_before
    if done.returncode != 0:
        sys.exit(f"fmpipe {step} --stage {variant} failed:\n{done.stderr[-3000:]}")
    own = json.loads((project / f"data/resources/{variant}/{step}.json").read_text())
    started = float(mark.read_text().split()[0]) if mark.exists() else float("nan")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime) + server_cpu
    return {"start": started - t0, "total": total, "own": own["wall_s"], "outside": total - own["wall_s"],
            "cpu": cpu, "own_cpu": own["cpu_s"]}


def _wait_for_server(warm_dir: Path, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in warm_dir.glob("*.json"):
            meta = json.loads(path.read_text())
            if meta["ready"]:  # listed from its start, ready once it has imported everything
                return meta
        time.sleep(0.2)
    sys.exit(f"no warm server came up in {timeout:.0f} s; its log: {list(warm_dir.glob('*.log'))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose pipeline/ and stages/ run (default: this one)")
    ap.add_argument("--variant", default="iris")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each step after the first")
    ap.add_argument("--steps", default=",".join(ORDER), help="comma-separated steps, in lifecycle order")
    ap.add_argument("--modes", default="cold,warm", help="cold (a process per command), warm (pipeline/warm.py)")
    args = ap.parse_args()
    code = args.code.resolve()
    steps = [s for s in args.steps.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    env = dict(os.environ, GX_ANALYTICS_ENABLED="False")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH", "")) if p)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()

    load_before = os.getloadavg()
    rows: dict[tuple[str, str], list[dict]] = {(m, s): [] for m in modes for s in steps}
    server = None
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(prefix="fw-", dir="/tmp") as sockets:
        warm_dir = Path(sockets)
        envs = {"cold": {**env, "FMPIPE_WARM": "0"},
                "warm": {**env, "FMPIPE_WARM": "1", "FMPIPE_WARM_DIR": sockets, "FMPIPE_WARM_IDLE": "600"}}
        projects = {}
        for mode in modes:
            project = projects[mode] = Path(tmp) / mode
            project.mkdir()
            shutil.copy(code / "params.yaml", project / "params.yaml")
            for folder in ("annotations", "expectations"):
                shutil.copytree(code / folder, project / folder)
            for step in steps:  # the first run: outputs for the next steps, caches warm
                run_step(project, step, args.variant, envs[mode])
            if mode == "warm":
                server = _wait_for_server(warm_dir)
        for _ in range(args.rounds):
            for step in steps:
                for mode in modes:
                    rows[(mode, step)].append(run_step(projects[mode], step, args.variant, envs[mode],
                                                       warm_dir if mode == "warm" else None))
        server_mb = None
        if server:
            for line in Path(f"/proc/{server['pid']}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    server_mb = int(line.split()[1]) / 1024
            os.kill(server["pid"], 15)
    load_after = os.getloadavg()

    keys = ("start", "total", "own", "outside", "cpu", "own_cpu")
    print(f"code {code} ({head or '?'}), variant {args.variant}, median of {args.rounds} runs per step, seconds")
    sums = {m: dict.fromkeys(keys, 0.0) for m in modes}
    for mode in modes:
        print(f"\n{mode}\n{'step':10s}" + "".join(f"{k:>9s}" for k in keys))
        for step in steps:
            med = {k: statistics.median(r[k] for r in rows[(mode, step)]) for k in keys}
            for k in keys:
                sums[mode][k] += med[k]
            print(f"{step:10s}" + "".join(f"{med[k]:9.3f}" for k in keys))
        print(f"{'sum':10s}" + "".join(f"{sums[mode][k]:9.3f}" for k in keys))
        print(f"mean per step: outside {sums[mode]['outside'] / len(steps):.3f} s, total {sums[mode]['total'] / len(steps):.3f} s, "
              f"start {sums[mode]['start'] / len(steps):.3f} s")
    if len(modes) == 2:
        a, b = modes
        print(f"\n{b} / {a}: total {sums[b]['total'] / sums[a]['total']:.2f}x, outside "
              f"{sums[b]['outside'] / sums[a]['outside']:.2f}x, CPU {sums[b]['cpu'] / sums[a]['cpu']:.2f}x")
    if server_mb:
        print(f"warm server: peak RSS {server_mb:.0f} MB (shared with the commands it forks)")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    sys.exit(main())
