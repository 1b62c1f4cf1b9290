"""Peak memory of train (1 epoch), evaluate and review on a synthetic image variant (issue #25).

Writes a scratch project with one variant, ``synth``, whose ``annotate`` (and ``clean``)
dataset is N textured, distinct 10-class images of SIZE x SIZE x 3, written straight into the
dataset contract (the data steps before train are not what this measures), then runs each
step in its own ``fmpipe`` process and samples the resident memory of that process and its
children (DataLoader workers) every 50 ms (0.5 s after a step's first 20 s):

- ``anon``: Pss_Anon + Pss_Shmem summed over the process tree (proportional: pages a forked
  worker shares with its parent count once): the memory the step needs;
- ``rss``: the same for all resident pages (Pss), which also counts the pages of
  ``images.npy`` mapped and read (file cache the kernel takes back under pressure);
- ``hwm``: the main process's VmHWM (the kernel's peak RSS, what ``/usr/bin/time`` reports).

    python bench/stream_memory.py --n 10000 --size 64 --root /tmp/synth-10k [--set train.in_memory_mb=64]

Prints one line per step (MB, wall seconds, ``os.getloadavg()`` at its end); peak memory does
not depend on the load, time does (run it on a quiet machine to time it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("FMPIPE_WARM", "0")  # a cold process per step, as in the figures of bench/README.md (pipeline/warm.py)

REPO = Path(__file__).resolve().parents[1]
VARIANT = "synth"
CLASSES = [f"c{i}" for i in range(10)]


def textured(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """One image per label: a class-specific stripe frequency and orientation, a random phase,
    colour and noise, so every image is distinct and the classes are learnable."""
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = (2 + labels).astype(np.float32)[:, None, None]
    angle = (labels * np.pi / 10).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    colour = rng.uniform(0.3, 1.0, (n, 1, 1, 3)).astype(np.float32)
    noise = rng.normal(0, 0.25, (n, size, size, 3)).astype(np.float32)
    img = 127.5 + 100 * wave[..., None] * colour + 40 * noise
    return np.clip(img, 0, 255).astype(np.uint8)


def write_variant(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``root/data/synth/{annotate,clean}``: the dataset contract, written in chunks."""
    import pandas as pd

    from pipeline.io import file_digest, to_json
    from pipeline.manifest import IMAGES, MANIFEST, META, REPORT, build_manifest, image_rows

    out = root / "data" / VARIANT / "annotate"
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    splits = np.where(np.arange(n) % 10 < 8, "train", np.where(np.arange(n) % 10 == 8, "val", "test"))
    images = np.lib.format.open_memmap(out / IMAGES, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    stats = []
    for start in range(0, n, 2048):
        block = textured(rng, labels[start:start + 2048], size)
        images[start:start + len(block)] = block
        stats.append(image_rows(block))
    images.flush()
    del images
    manifest = build_manifest([f"synth-{i:07d}" for i in range(n)], labels, CLASSES, splits,
                              pd.concat(stats, ignore_index=True))
    manifest.to_parquet(out / MANIFEST, index=False)
    meta = {"kind": "image", "classes": CLASSES, "image_shape": [size, size, 3], "rows": n,
            "files": {name: file_digest(out / name) for name in (MANIFEST, IMAGES)}}
    (out / META).write_text(to_json(meta))
    report = {"step": "annotate", "variant": VARIANT, "rows_in": n, "rows_out": n, "rows_removed": 0,
              "removed_by_reason": {}, "removed": [],
              "rows_by_split": {s: int((splits == s).sum()) for s in ("train", "val", "test")},
              "rows_by_class": {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}}
    (out / REPORT).write_text(to_json(report))
    shutil.copytree(out, out.parent / "clean")
    pd.DataFrame({"id": pd.Series([], dtype="string"), "action": pd.Series([], dtype="string")}).to_parquet(
        out.parent / "clean" / "findings.parquet", index=False)


def write_params(root: Path, size: int, overrides: list[str]) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    section = {
        "description": "synthetic textured images (bench/stream_memory.py)",
        "source": {"kind": "imagefolder", "path": "sources/synth", "size": [size, size]},
        "split": {}, "clean": {}, "validate": {},
        "model": {"name": "cnn_small", "options": {"width": 16}},
        "train": {"max_epochs": 1, "batch_size": 256, "cpu_threads": 2},
        "evaluate": {}, "package": {}, "review": {},
    }
    for item in overrides:
        key, value = item.split("=", 1)
        node = section
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    params["enabled"] = [VARIANT]
    params["variants"] = {VARIANT: section}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for folder in ("annotations", "expectations"):
        if not (root / folder).exists():
            (root / folder).mkdir()


def tree_memory(pid: int) -> tuple[int, int]:
    """(anon + shmem, rss) in bytes over ``pid`` and its descendants, as proportional set sizes:
    a forked DataLoader worker shares its parent's pages, which plain RSS would count twice."""
    import psutil

    anon = rss = 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            rollup = Path(f"/proc/{p.pid}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in rollup.splitlines()[1:] if ":" in line)
        kb = lambda k: int(fields.get(k, "0 kB").split()[0]) * 1024  # noqa: E731
        anon += kb("Pss_Anon") + kb("Pss_Shmem")
        rss += kb("Pss")
    return anon, rss


def communicate_sampled(proc: subprocess.Popen) -> tuple[str, dict[str, int]]:
    """``proc.communicate()``, sampling the peak ``anon``, ``rss`` and ``hwm`` bytes of ``proc``
    (and its children) meanwhile; also bench/inference_memory.py's sampler."""
    started = time.monotonic()
    peak = {"anon": 0, "rss": 0, "hwm": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon, rss = tree_memory(proc.pid)
            peak["anon"], peak["rss"] = max(peak["anon"], anon), max(peak["rss"], rss)
            try:
                hwm = [line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                       if line.startswith("VmHWM")]
                peak["hwm"] = max(peak["hwm"], int(hwm[0].split()[1]) * 1024)
            except (OSError, IndexError):
                pass
            # Every 50 ms for a short step; reading smaps of a process with GBs mapped costs CPU
            # (~40% of a core at 50 ms on a 1M-row train), so a long step is sampled every 0.5 s.
            time.sleep(0.05 if time.monotonic() - started < 20 else 0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    sampler.join()
    return output, peak


def run_step(root: Path, step: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [str(Path(sys.executable).parent / "fmpipe"), step, "--stage", VARIANT]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, peak = communicate_sampled(proc)
    if proc.returncode:
        sys.exit(f"{step} failed ({proc.returncode}):\n{output[-3000:]}")
    return {**{k: round(v / 2**20, 1) for k, v in peak.items()}, "s": round(time.monotonic() - started, 1),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--root", type=Path, required=True, help="scratch project (reused if its data exists)")
    ap.add_argument("--steps", default="train,evaluate,review")
    ap.add_argument("--set", action="append", default=[],
                    help="a key=value of the variant's params, e.g. train.in_memory_mb=64")
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    if not (args.root / "data" / VARIANT / "annotate").exists():
        write_variant(args.root, args.n, args.size)
    write_params(args.root, args.size, args.set)
    decoded = args.n * args.size * args.size * 3 / 2**20
    print(json.dumps({"n": args.n, "size": args.size, "decoded_mb": round(decoded, 1), "set": args.set}))
    for step in args.steps.split(","):
        print(json.dumps({"step": step, **run_step(args.root, step)}), flush=True)
    print(json.dumps({"loadavg": os.getloadavg()}))


if __name__ == "__main__":
    main()
