"""Near pairs of embedding vectors: every pair closer than a cosine-distance threshold.

One function, :func:`near_pairs`, used by clean (near-duplicates, leakage) and by review
(near-duplicates in a trained model's feature space). Vectors are L2-normalised float32; the
distance is ``1 - cos``, so 0 is the same direction and 2 the opposite one.

Backends (``method``):

- ``exact``: chunked numpy matmul. Every pair is seen, so nothing is missed; memory is
  bounded by the chunk (``chunk_bytes`` of similarities at a time), time grows with
  ``n_query * n_base``. Within one set only the upper triangle is computed.
- ``faiss-ivf``: faiss ``IndexIVFFlat`` on inner products (k-means cells, ``nprobe`` cells
  searched per query). Memory is the vectors plus ids; building is one k-means on a sample.
- ``faiss-hnsw``: faiss ``IndexHNSWFlat`` (graph; ``M`` links per node, ``ef_search``).
- ``usearch``: usearch's HNSW index on inner products.
- ``auto``: ``exact`` while ``n_query * n_base`` stays below ``exact_max_pairs``, else
  :data:`DEFAULT_ANN`. The choice and its parameters are recorded (see :func:`describe`).

The approximate backends return at most ``k`` neighbours per query row (the exact one too,
so results do not change their shape with the backend); distances they report are
recomputed exactly from the vectors, so a threshold means the same thing everywhere.
``bench/neighbors_scale.py`` measures build + query time, memory and recall per backend.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import FmpipeError

METHODS = ("auto", "exact", "faiss-ivf", "faiss-hnsw", "usearch")
# The ANN backend ``auto`` switches to. faiss IVF-Flat: no graph to build (one k-means on a
# sample), memory ~ the vectors themselves, and near-duplicates sit in the same or a
# neighbouring cell, so a small nprobe finds them. Confirm with bench/neighbors_scale.py.
DEFAULT_ANN = "faiss-ivf"
# Above this many query x base similarities, exact search gives way to the ANN backend.
# 4e9 keeps CIFAR-10 (60k x 60k / 2 within, 10k x 50k across) exact.
EXACT_MAX_PAIRS = 4_000_000_000
# Similarities held at once by the exact backend (float32): bounds its memory.
CHUNK_BYTES = 64 * 2**20
COLUMNS = ("i", "j", "distance")
_RECORD_KEY = "neighbors"


def normalize(x: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Rows as L2-normalised float32 (a zero row stays zero: distance 1 to everything).
    ``overwrite``: a contiguous float32 ``x`` is normalised in place (same values as a copy)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise FmpipeError(f"near_pairs: expected a 2-d array of vectors, got shape {x.shape}")
    norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.divide(x, norms, out=x) if overwrite else x / norms


def near_pairs(query: np.ndarray, base: np.ndarray | None = None, *, threshold: float, k: int = 10,
               method: str = "auto", overwrite: bool = False, **options: Any) -> pd.DataFrame:
    """Pairs ``(i, j)`` with cosine distance ``<= threshold``, at most ``k`` per query row.

    ``base is None``: pairs within ``query``, each unordered pair once (``i < j``), never
    ``i == j``. Otherwise ``i`` indexes ``query`` and ``j`` indexes ``base``. Rows are sorted
    by ``(i, distance, j)``. The method actually used and its parameters are in
    ``describe(result)``. ``overwrite``: ``query`` and ``base`` are the caller's to change
    (normalised in place: at 1M rows each copy is ~0.8 GB of clean's peak).
    """
    q = normalize(query, overwrite)
    b = q if base is None else normalize(base, overwrite)
    return _near_pairs_normalized(q, b, base is None, threshold=threshold, k=k, method=method, **options)


def _near_pairs_normalized(q: np.ndarray, b: np.ndarray, within: bool, *, threshold: float, k: int,
                           method: str, **options: Any) -> pd.DataFrame:
    """:func:`near_pairs` on rows already normalised (``b is q`` when ``within``)."""
    if method not in METHODS:
        raise FmpipeError(f"near_pairs: unknown method {method!r} (expected one of: {', '.join(METHODS)})")
    if not 0 <= threshold <= 2:
        raise FmpipeError(f"near_pairs: threshold {threshold} is not a cosine distance in [0, 2]")
    if k < 1:
        raise FmpipeError(f"near_pairs: k must be >= 1, got {k}")
    if q.shape[1] != b.shape[1]:
        raise FmpipeError(f"near_pairs: query has dimension {q.shape[1]}, base {b.shape[1]}")
    chosen = method
    if method == "auto":
        chosen = "exact" if len(q) * len(b) <= options.pop("exact_max_pairs", EXACT_MAX_PAIRS) else DEFAULT_ANN
    options.pop("exact_max_pairs", None)
    started = time.perf_counter()
    if len(q) == 0 or len(b) == 0 or (within and len(q) < 2):
        i = j = np.empty(0, dtype=np.int64)
        params: dict[str, Any] = {}
    elif chosen == "exact":
        i, j, params = _exact(q, b, within, threshold, k, **options)
    elif chosen == "faiss-ivf":
        i, j, params = _faiss_ivf(q, b, within, k, **options)
    elif chosen == "faiss-hnsw":
        i, j, params = _faiss_hnsw(q, b, within, k, **options)
    else:
        i, j, params = _usearch(q, b, within, k, **options)
    frame = _finish(q, b, i, j, within, threshold, k)
    frame.attrs[_RECORD_KEY] = {
        "method": chosen, "requested": method, "metric": "cosine distance (1 - cos)",
        "threshold": float(threshold), "k": int(k), "within": within,
        "n_query": int(len(q)), "n_base": int(len(b)), "dim": int(q.shape[1]),
        "params": params, "pairs": int(len(frame)),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return frame


def near_pairs_views(query: np.ndarray, views: list[np.ndarray], base: np.ndarray | None = None, *,
                     threshold: float, k: int = 10, method: str = "auto", overwrite: bool = False,
                     **options: Any) -> pd.DataFrame:
    """:func:`near_pairs` where each query row also has other views (e.g. re-crops): a pair's
    distance is the smallest over the plain query and its views, each against the base's
    plain vectors. ``base is None``: within ``query`` (a view of row i against plain row j;
    both directions are searched, so either copy may be the cropped one). Same columns, order
    and ``describe`` record (with ``views``) as :func:`near_pairs`; ``overwrite`` as there (the
    views too). Each array is normalised once and searched as often as needed."""
    for view in views:
        if len(view) != len(query):
            raise FmpipeError(f"near_pairs_views: a view has {len(view)} rows, the query {len(query)}")
    within = base is None
    q = normalize(query, overwrite)
    target = q if within else normalize(base, overwrite)
    plain = _near_pairs_normalized(q, target, within, threshold=threshold, k=k, method=method, **options)
    frames = [plain]
    for view in views:
        got = _near_pairs_normalized(normalize(view, overwrite), target, False, threshold=threshold,
                                     k=k + 1 if within else k, method=method, **options)
        if base is None:
            got = got[got["i"] != got["j"]]
            lo, hi = np.minimum(got["i"], got["j"]), np.maximum(got["i"], got["j"])
            got = pd.DataFrame({"i": lo, "j": hi, "distance": got["distance"]})
        frames.append(got)
    merged = pd.concat(frames, ignore_index=True).sort_values(["i", "j", "distance"], kind="stable")
    merged = merged.drop_duplicates(["i", "j"]).sort_values(["i", "distance", "j"], kind="stable")
    if base is not None:
        merged = merged.groupby("i", sort=False).head(k)
    frame = merged.reset_index(drop=True).astype({"i": np.int64, "j": np.int64, "distance": np.float32})
    record = describe(plain)
    record.update(views=len(views), pairs=int(len(frame)))
    frame.attrs[_RECORD_KEY] = record
    return frame


def describe(pairs: pd.DataFrame) -> dict[str, Any]:
    """The record of the search that made ``pairs``: method, threshold, k, sizes, params.

    ``seconds`` varies run to run: keep it out of cached outputs.
    """
    return dict(pairs.attrs.get(_RECORD_KEY, {}))


# ---------------------------------------------------------------- backends

def _exact(q: np.ndarray, b: np.ndarray, within: bool, threshold: float, k: int,
           chunk_bytes: int = CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray, dict]:
    rows = max(1, int(chunk_bytes // (4 * max(len(b), 1))))
    min_sim = np.float32(1.0 - threshold - 1e-6)
    found_i, found_j = [], []
    for start in range(0, len(q), rows):
        stop = min(start + rows, len(q))
        # Within one set, columns left of the chunk's first row only hold pairs already seen.
        offset = start + 1 if within else 0
        if offset >= len(b):
            break
        sims = q[start:stop] @ b[offset:].T
        if within:
            # Lower triangle and diagonal of this block: j <= i.
            r = np.arange(start, stop)[:, None]
            c = np.arange(offset, len(b))[None, :]
            sims[c <= r] = -np.inf
        hit_r, hit_c = np.nonzero(sims >= min_sim)
        if len(hit_r) == 0:
            continue
        hit_s = sims[hit_r, hit_c]
        keep = _top_k_per_row(hit_r, hit_s, k)
        found_i.append(hit_r[keep] + start)
        found_j.append(hit_c[keep] + offset)
    cat = (lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64))
    return cat(found_i), cat(found_j), {"chunk_rows": rows}


def _top_k_per_row(rows: np.ndarray, sims: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` most similar hits per row (hits grouped by ``rows``)."""
    order = np.lexsort((-sims, rows))
    sorted_rows = rows[order]
    first = np.searchsorted(sorted_rows, sorted_rows, side="left")
    rank = np.arange(len(order)) - first
    return order[rank < k]


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise FmpipeError("near_pairs: method needs faiss-cpu (pip install faiss-cpu)") from None
    return faiss


def _faiss_ivf(q, b, within, k, nlist: int | None = None, nprobe: int = 8,
               train_size: int = 100_000, seed: int = 0):
    faiss = _import_faiss()
    d = b.shape[1]
    nlist = nlist or max(1, min(int(4 * math.sqrt(len(b))), len(b) // 39 or 1))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    # k-means wants >= 39 points per centroid (faiss warns below that): 4 sqrt(N) lists pass
    # 100,000 / 39 near 400k rows.
    train_size = max(train_size, 40 * nlist)
    sample = b if len(b) <= train_size else b[np.sort(rng.choice(len(b), train_size, replace=False))]
    index.cp.seed = seed
    index.train(sample)
    index.add(b)
    index.nprobe = min(nprobe, nlist)
    i, j = _knn_to_pairs(index.search(q, k + 1 if within else k)[1], within)
    return i, j, {"nlist": nlist, "nprobe": index.nprobe, "train_size": len(sample)}


def _faiss_hnsw(q, b, within, k, M: int = 32, ef_construction: int = 80, ef_search: int = 64):
    faiss = _import_faiss()
    index = faiss.IndexHNSWFlat(b.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(b)
    index.hnsw.efSearch = max(ef_search, k + 1)
    i, j = _knn_to_pairs(index.search(q, k + 1 if within else k)[1], within)
    return i, j, {"M": M, "ef_construction": ef_construction, "ef_search": index.hnsw.efSearch}


def _usearch(q, b, within, k, connectivity: int = 32, expansion_add: int = 80,
             expansion_search: int = 64):
    try:
        from usearch.index import Index
    except ImportError:
        raise FmpipeError("near_pairs: method 'usearch' needs usearch (pip install usearch)") from None
    index = Index(ndim=b.shape[1], metric="ip", dtype="f32", connectivity=connectivity,
                  expansion_add=expansion_add, expansion_search=max(expansion_search, k + 1))
    # One thread to build: a graph built by several threads depends on their timing, so the
    # pairs found (and clean's hashed outputs) would change run to run. Searching a built
    # graph is read-only, so the search keeps every core.
    index.add(np.arange(len(b), dtype=np.uint64), b, threads=1)
    matches = index.search(q, k + 1 if within else k)
    keys = np.asarray(matches.keys, dtype=np.int64).reshape(len(q), -1)
    # usearch pads missing neighbours with its default "no key" value.
    keys[(keys < 0) | (keys >= len(b))] = -1
    i, j = _knn_to_pairs(keys, within)
    return i, j, {"connectivity": connectivity, "expansion_add": expansion_add,
                  "expansion_search": max(expansion_search, k + 1), "build_threads": 1}


def _knn_to_pairs(neighbours: np.ndarray, within: bool) -> tuple[np.ndarray, np.ndarray]:
    """k-NN id lists (-1 = none) to candidate pairs; within one set without self pairs."""
    n, kk = neighbours.shape
    i = np.repeat(np.arange(n, dtype=np.int64), kk)
    j = neighbours.reshape(-1).astype(np.int64)
    valid = j >= 0
    if within:
        valid &= j != i
    return i[valid], j[valid]


# ---------------------------------------------------------------- result

def _finish(q, b, i, j, within, threshold, k) -> pd.DataFrame:
    """Exact distances, threshold, one row per unordered pair (within), k per query row."""
    if len(i):
        if within:
            i, j = np.minimum(i, j), np.maximum(i, j)
            pairs = np.unique(np.stack([i, j], axis=1), axis=0)
            i, j = pairs[:, 0], pairs[:, 1]
        dist = np.empty(len(i), dtype=np.float32)
        for s in range(0, len(i), 1 << 16):  # row-wise dot products, bounded temporaries
            dist[s:s + (1 << 16)] = 1.0 - np.einsum("nd,nd->n", q[i[s:s + (1 << 16)]], b[j[s:s + (1 << 16)]])
        dist = np.clip(dist, 0.0, 2.0)
        keep = dist <= threshold + 1e-6
        i, j, dist = i[keep], j[keep], dist[keep]
        if not within:
            sel = _top_k_per_row(i, -dist, k)
            i, j, dist = i[sel], j[sel], dist[sel]
    else:
        dist = np.empty(0, dtype=np.float32)
    frame = pd.DataFrame({"i": np.asarray(i, dtype=np.int64), "j": np.asarray(j, dtype=np.int64),
                          "distance": np.asarray(dist, dtype=np.float32)})
    return frame.sort_values(["i", "distance", "j"], kind="stable").reset_index(drop=True)
