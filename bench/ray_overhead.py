"""What ``engine: ray`` costs on one machine: the data steps (collect -> clean -> validate ->
annotate) of a synthetic image folder with engine local and with engine ray, at a few N.

    python bench/ray_overhead.py --n 2000 10000 50000 --size 32

Each run is the real ``fmpipe`` CLI in bench/scale.py's scratch project (one variant, ``scale``,
reading 10 classes of distinct textured PNGs). The ray runs
connect to a local cluster started here once (``ray start --head``, all of this machine's
CPUs, stopped after), so the figures are the per-step cost of Ray (connecting a driver,
shipping chunks through the object store, collecting results in order) and not its
start-up, which is printed on its own. Prints, per N and engine: wall seconds per step and
in all, the ray/local ratio, each step's peak memory (the runner's record), that the
outputs are byte-identical, and the load average (timings on a busy machine mean little).
Run from the repo root with the venv active (``pip install -e '.[ray]'``).

    python bench/ray_overhead.py --transport tasks --chunks 64     # or: --transport data

The choice of transport behind ``engine: ray``: 16 MB chunks from a generator through Ray
tasks with a bounded window (``pipeline.engine.map_ordered``) or through Ray Data
(``from_items`` -> ``map_batches`` -> ``iter_batches`` with ``preserve_order``), on a local
cluster; prints the driver's peak private (anonymous) and shared-memory (object store pages
it touched) resident memory, which do not depend on load, and the wall time, which does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("FMPIPE_WARM", "0")  # a cold process per step, as in the figures of bench/README.md (pipeline/warm.py)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (bench/scale.py: the synthetic image folder and its scratch project)
STEPS = ("collect", "clean", "validate", "annotate")
VARIANT = "scale"  # bench/scale.py's variant


def project(dest: Path, images: Path, n: int, size: int, engine: str) -> Path:
    """bench/scale.py's scratch project (variant ``scale`` reading ``images/``), on ``engine``."""
    dest.mkdir(parents=True)
    scale.project(dest, n, size)
    (dest / "images").symlink_to(images)
    if engine != "local":
        params = yaml.safe_load((dest / "params.yaml").read_text())
        params["variants"][VARIANT]["engine"] = engine
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def fmpipe(root: Path, env: dict, *args: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"fmpipe {' '.join(args)} failed in {root}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def digests(root: Path) -> str:
    h = hashlib.sha256()
    for step in ("collect", "clean", "annotate"):
        for p in sorted((root / "data" / VARIANT / step).rglob("*")):
            if p.is_file():
                h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    for name in ("summary.json", "results.json"):
        h.update((root / "data" / VARIANT / "validate" / name).read_bytes())
    return h.hexdigest()


def start_cluster(temp: Path) -> tuple[subprocess.Popen, dict, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={port}", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"],
                            # the workers import this checkout's code, as the driver does
                            env={**os.environ, **env, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if head.poll() is not None:
            sys.exit("ray start --head failed")
        time.sleep(0.1)
    return head, {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, time.perf_counter() - t0


def stop_cluster(head: subprocess.Popen) -> None:
    """Kill the head's session (its processes and the workers its raylet started), by pid."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == head.pid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    head.wait(timeout=30)


def _chunk_result(chunk: np.ndarray) -> tuple[int, np.ndarray]:
    return int(chunk[0]), chunk[::1024].copy()  # a small result per chunk


def transport(kind: str, n_chunks: int, mb: int = 16) -> None:
    peak = {"RssAnon": 0, "RssShmem": 0}

    def sample() -> None:
        for line in open("/proc/self/status"):
            key, value = line.split(":", 1)
            if key in peak:
                peak[key] = max(peak[key], int(value.split()[0]) // 1024)

    chunks = (np.full(mb * 2**20, i % 251, np.uint8) for i in range(n_chunks))
    import ray

    ray.init(logging_level="warning")
    t0 = time.perf_counter()
    got = []
    if kind == "tasks":
        from pipeline.engine import map_ordered

        for first, _ in map_ordered(_chunk_result, chunks, "ray"):
            sample()
            got.append(first)
    else:
        import ray.data

        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ds = ray.data.from_items([{"c": c} for c in chunks])  # every chunk in the driver first
        sample()

        def batch(b):
            out = [_chunk_result(c) for c in b["c"]]
            return {"i": np.array([o[0] for o in out]), "r": np.stack([o[1] for o in out])}

        for b in ds.map_batches(batch, batch_size=1).iter_batches(batch_size=1):
            sample()
            got += [int(x) for x in b["i"]]
    assert got == [i % 251 for i in range(n_chunks)], "results out of order"
    print(f"{kind}: {n_chunks} x {mb} MB chunks ({n_chunks * mb / 1024:.1f} GB): driver peak private "
          f"{peak['RssAnon']} MB, object store pages touched {peak['RssShmem']} MB, "
          f"{time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 10000, 50000])
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--transport", choices=("tasks", "data"), help="compare transports instead (see above)")
    ap.add_argument("--chunks", type=int, default=64, help="--transport: 16 MB chunks to stream")
    args = ap.parse_args()
    if args.transport:
        transport(args.transport, args.chunks)
        return

    scratch = Path(tempfile.mkdtemp(prefix="rayb", dir="/tmp"))  # short: Ray's socket paths
    head, ray_env, startup = start_cluster(scratch / "ray")
    try:
        print(f"Ray head start-up (ray start --head until it listens): {startup:.1f} s; "
              f"load average {os.getloadavg()[0]:.2f}")
        for n in args.n:
            images = scratch / f"images-{n}"
            scale.generate(images, n, args.size)
            walls, peaks, sums = {}, {}, {}
            for engine in ("local", "ray"):
                root = project(scratch / f"{engine}-{n}", images, n, args.size, engine)
                env = {**os.environ, "PYTHONPATH": str(REPO), "GX_ANALYTICS_ENABLED": "False",
                       **(ray_env if engine == "ray" else {})}
                walls[engine] = {}
                for step in STEPS:
                    if step == "validate":  # a starting suite from this data, as a person would
                        fmpipe(root, env, "validate", "--stage", VARIANT, "--init")
                    walls[engine][step] = fmpipe(root, env, step, "--stage", VARIANT)
                peaks[engine] = {s: json.loads((root / f"data/resources/{VARIANT}/{s}.json").read_text())
                                 .get("peak_mb") for s in STEPS}
                sums[engine] = digests(root)
            total = {e: sum(w.values()) for e, w in walls.items()}
            print(f"\nN={n} at {args.size}x{args.size}: outputs byte-identical: {sums['local'] == sums['ray']}; "
                  f"load average {os.getloadavg()[0]:.2f}")
            for step in STEPS:
                lo, ra = walls["local"][step], walls["ray"][step]
                print(f"  {step:9s} local {lo:7.2f} s  ray {ra:7.2f} s  ratio {ra / lo:5.2f}  "
                      f"peak MB local {peaks['local'][step]}  ray {peaks['ray'][step]}")
            print(f"  {'total':9s} local {total['local']:7.2f} s  ray {total['ray']:7.2f} s  "
                  f"ratio {total['ray'] / total['local']:5.2f}")
            for engine in ("local", "ray"):
                shutil.rmtree(scratch / f"{engine}-{n}")
            shutil.rmtree(images)
    finally:
        stop_cluster(head)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
