"""Benchmark: the near-pair index at scale, per backend (build + query time, memory, recall).

    python bench/neighbors_scale.py                    # 1M vectors, every ANN backend
    python bench/neighbors_scale.py --n 20000 --backends exact,faiss-ivf,faiss-hnsw,usearch

Vectors: ``--n`` random-but-structured vectors of the default embedding's dimension
(``ThumbsEmbedder().dim``): points around 2,000 cluster centres that live in a 32-d subspace,
plus isotropic noise, so neighbours are close the way real image embeddings are (many
similar, few identical). ``--planted`` rows are then replaced by near copies of other rows
(cosine distance ~0.003-0.01): the pairs a near-duplicate search must find.

Each backend runs in its own child process (fresh memory): the child builds the data, then
times ``near_pairs(x, threshold=--threshold, k=10, method=backend)`` (the within-set search
clean runs: index build + one query per row), and reports its peak RSS before and after the
search; the difference is what the search itself costs. Recall: the share of planted pairs
found. ``exact`` is skipped above ``--exact-max`` rows (it is O(n^2)).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_vectors(n: int, dim: int, planted: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(32, dim)).astype(np.float32)
    centres = rng.normal(size=(2000, 32)).astype(np.float32) @ latent
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: bounded temporaries
        m = min(100_000, n - start)
        which = rng.integers(0, len(centres), m)
        x[start:start + m] = (centres[which] + 0.8 * (rng.normal(size=(m, 32)).astype(np.float32) @ latent)
                              + 2.0 * rng.normal(size=(m, dim)).astype(np.float32))
    src = rng.choice(n // 2, planted, replace=False)
    dst = n // 2 + rng.choice(n - n // 2, planted, replace=False)
    norms = np.linalg.norm(x[src], axis=1, keepdims=True)
    noise = rng.normal(size=(planted, dim)).astype(np.float32)
    noise *= (norms * rng.uniform(0.08, 0.14, (planted, 1)) / np.linalg.norm(noise, axis=1, keepdims=True))
    x[dst] = x[src] + noise
    return x, src, dst


def child(args) -> None:
    from pipeline.quality.neighbors import describe, near_pairs

    x, src, dst = make_vectors(args.n, args.dim, args.planted)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    pairs = near_pairs(x, threshold=args.threshold, k=10, method=args.child)
    wall = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    found = set(zip(pairs["i"].tolist(), pairs["j"].tolist()))
    planted = {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist())}
    record = describe(pairs)
    json.dump({"backend": args.child, "n": args.n, "dim": args.dim, "build_plus_query_s": round(wall, 2),
               "peak_rss_gb_before": round(rss_before, 3), "peak_rss_gb_after": round(rss_after, 3),
               "search_rss_gb": round(rss_after - rss_before, 3),
               "recall_planted": round(len(found & planted) / len(planted), 4), "pairs": len(pairs),
               "params": record.get("params")}, sys.stdout)


def main() -> None:
    from pipeline.quality.embedders import ThumbsEmbedder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=ThumbsEmbedder().dim)
    ap.add_argument("--planted", type=int, default=1000)
    ap.add_argument("--threshold", type=float, default=0.015)
    ap.add_argument("--backends", default="faiss-ivf,faiss-hnsw,usearch")
    ap.add_argument("--exact-max", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=Path("bench/results/neighbors_scale.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    results = []
    for backend in args.backends.split(","):
        if backend == "exact" and args.n > args.exact_max:
            print(f"{backend}: skipped (n > --exact-max {args.exact_max})", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--child", backend, "--n", str(args.n), "--dim", str(args.dim),
               "--planted", str(args.planted), "--threshold", str(args.threshold)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if proc.returncode:
            print(f"{backend}: failed\n{proc.stderr}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout))
        print(json.dumps(results[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'backend':<11} {'n':>9} {'dim':>4} {'build+query s':>13} {'search GB':>9} {'peak GB':>8} {'recall':>7}")
    for r in results:
        print(f"{r['backend']:<11} {r['n']:>9} {r['dim']:>4} {r['build_plus_query_s']:>13} "
              f"{r['search_rss_gb']:>9} {r['peak_rss_gb_after']:>8} {r['recall_planted']:>7}")


if __name__ == "__main__":
    main()
