"""``fmpipe monitor``: do the inputs a package was given still look like its data?

Two samples are compared: the **reference**, rows of the variant's dataset the model did not
train on (``val`` by default: a model's outputs on its own training rows are more confident
than on any new input, so training rows would make every production batch look shifted),
scored now by the package; and the **current** sample, the request log's records.

Tests, each a two-sample test with a p-value:

- ``embedding_mmd``: maximum mean discrepancy between the two samples' embeddings (the
  package's logits, standardised by the reference), Gaussian kernel with the median-distance
  bandwidth, p-value from label permutations. Logits as the representation follow
  "black-box shift detection" (Lipton et al. 2018; Rabanser et al. 2019, "Failing Loudly",
  found it the strongest representation for detecting shift): they need no second model,
  they are what the log stores already, and they carry what the model makes of an input.
- images: ``image_mean_ks`` / ``image_std_ks``: Kolmogorov-Smirnov on the per-image brightness
  and contrast statistics the manifest records (``pipeline.manifest.image_rows``, computed the
  same way on the logged inputs). Inversion or added noise moves them even where logits
  might not.
- tables: per feature, KS (chi-square for a feature with few distinct values); the
  population stability index (PSI, ten reference-quantile bins) is reported beside each.
- ``prediction_chi2``: chi-square on the predicted-class counts (a class-prior shift);
  ``confidence_ks``: KS on the top-class probability (inputs the model is unsure of).

Decision: drift when any p-value is below ``alpha / number of tests`` (Bonferroni: the chance
of a false alarm on an unshifted batch stays under ``alpha`` however many tests run). The
reason line names the test with the smallest p-value.

Why scipy and not Evidently: Evidently's data-drift preset computes the same KS, chi-square
and PSI through scipy, over pandas frames, and brings a large dependency tree (its UI,
plotly, nltk...) into an install that has scipy already (through scikit-learn); it has no
embedding two-sample test with a permutation p-value, which is the test images need.

Atypicality (the report's thumbnails, and the pool's drift score): the distance from an
input's standardised embedding to its k-th nearest reference row, divided by the median of
the same distance among reference rows (leave-one-out): about 1 for a typical input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from pipeline.errors import FmpipeError

MIN_CURRENT = 20
MAX_PER_SIDE = 1000  # rows per side in the MMD (its kernel matrix is (n + m)^2)
DISCRETE_MAX_VALUES = 10
ATYPICAL_SHOWN = 12


@dataclass
class Sample:
    """One side of a comparison: row ids, embeddings, probabilities and input statistics."""

    ids: list[str]
    embedding: np.ndarray  # N x D
    probs: np.ndarray  # N x K
    stats: dict[str, np.ndarray]  # images: mean, std; tables: one entry per feature
    names: list[str] = field(default_factory=list)  # what a person recognises (file names)
    images: Optional[np.ndarray] = None  # N x H x W x C uint8 (current side: thumbnails)

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------- the tests

def _sq_dists(z: np.ndarray) -> np.ndarray:
    sq = (z * z).sum(axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)


def mmd_test(x: np.ndarray, y: np.ndarray, n_perm: int = 500, seed: int = 0,
             max_n: int = MAX_PER_SIDE) -> tuple[float, float]:
    """(MMD^2, permutation p-value) between samples ``x`` and ``y`` (rows are points).

    Gaussian kernel exp(-d^2 / median d^2) over the pooled sample; the biased statistic
    w' K w (w = 1/n on x, -1/m on y) is recomputed for ``n_perm`` random relabellings at once
    (one matrix product), so the test costs about (n + m)^2 x n_perm multiply-adds.
    """
    rng = np.random.default_rng(seed)
    if len(x) > max_n:
        x = x[rng.choice(len(x), max_n, replace=False)]
    if len(y) > max_n:
        y = y[rng.choice(len(y), max_n, replace=False)]
    n, m = len(x), len(y)
    z = np.concatenate([x, y]).astype(np.float64)
    d2 = _sq_dists(z)
    off = d2[np.triu_indices(n + m, 1)]
    scale = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
    k = np.exp(-d2 / scale)
    w = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    observed = float(w @ k @ w)
    perms = np.stack([rng.permutation(w) for _ in range(n_perm)], axis=1)  # (n+m) x P
    null = np.einsum("ip,ip->p", perms, k @ perms)
    p = (1.0 + float((null >= observed - 1e-12).sum())) / (1.0 + n_perm)
    return observed, p


def ks_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    r = ks_2samp(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return float(r.statistic), float(r.pvalue)


def chi2_counts(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Chi-square test of homogeneity of two count vectors over the same categories."""
    from scipy.stats import chi2_contingency

    table = np.array([a, b], dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 0.0, 1.0
    r = chi2_contingency(table, correction=False)
    return float(r.statistic), float(r.pvalue)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins (0.1: moderate, 0.25: large)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    c = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1) / len(current)
    r, c = np.maximum(r, 1e-4), np.maximum(c, 1e-4)
    return float(((c - r) * np.log(c / r)).sum())


def standardise(reference: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu = reference.mean(axis=0)
    sd = reference.std(axis=0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    return [(a - mu) / sd for a in (reference, *others)]


def atypicality(reference: np.ndarray, current: np.ndarray, k: int = 5) -> np.ndarray:
    """Per current row: distance to its k-th nearest reference row over the reference rows'
    own median k-th-neighbour distance (leave-one-out), in standardised embedding space."""
    ref, cur = standardise(reference, current)
    k = max(1, min(k, len(ref) - 1))
    d_ref = np.sqrt(_sq_dists(ref))
    np.fill_diagonal(d_ref, np.inf)
    typical = float(np.median(np.sort(d_ref, axis=1)[:, k - 1])) or 1.0
    sq = (cur * cur).sum(1)[:, None] + (ref * ref).sum(1)[None, :] - 2.0 * cur @ ref.T
    d_cur = np.sqrt(np.maximum(sq, 0.0))
    return np.partition(d_cur, k - 1, axis=1)[:, k - 1] / typical


# ---------------------------------------------------------------- the comparison

def compare(reference: Sample, current: Sample, *, kind: str, classes: Sequence[str], alpha: float = 0.01,
            n_perm: int = 500, seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """(every test, the decision and its reason, the prediction/confidence shift and the most
    atypical current inputs: the body of ``artefacts.MonitorReport``; every current row's
    atypicality)."""
    if len(current) < MIN_CURRENT:
        raise FmpipeError(f"{len(current)} logged inputs; at least {MIN_CURRENT} are needed for a two-sample test")
    if len(reference) < MIN_CURRENT:
        raise FmpipeError(f"{len(reference)} reference rows; at least {MIN_CURRENT} are needed "
                          "(more held-out splits: --reference val,test)")
    tests: list[dict[str, Any]] = []
    threshold = alpha / (len(reference.stats) + 3)
    # A permutation p-value is at least 1 / (1 + n_perm): enough permutations that it can fall below the threshold.
    n_perm = max(n_perm, int(np.ceil(2.0 / threshold)))
    ref_e, cur_e = standardise(reference.embedding, current.embedding)
    stat, p = mmd_test(ref_e, cur_e, n_perm=n_perm, seed=seed)
    tests.append({"name": "embedding_mmd", "method": f"MMD, Gaussian kernel, {n_perm} permutations",
                  "statistic": stat, "p_value": p, "detail": f"{ref_e.shape[1]}-d logits"})
    for key in reference.stats:
        a, b = np.asarray(reference.stats[key], dtype=np.float64), np.asarray(current.stats[key], dtype=np.float64)
        values = np.unique(np.concatenate([a, b]))
        if kind == "tabular" and len(values) <= DISCRETE_MAX_VALUES:
            stat, p = chi2_counts([(a == v).sum() for v in values], [(b == v).sum() for v in values])
            method = "chi-square"
        else:
            stat, p = ks_test(a, b)
            method = "Kolmogorov-Smirnov"
        name = f"image_{key}_ks" if kind == "image" else f"feature:{key}"
        tests.append({"name": name, "method": method, "statistic": stat, "p_value": p,
                      "detail": f"PSI {psi(a, b):.3f}; mean {a.mean():.4g} -> {b.mean():.4g}"})
    k = len(classes)
    ref_pred, cur_pred = reference.probs.argmax(1), current.probs.argmax(1)
    ref_counts, cur_counts = np.bincount(ref_pred, minlength=k), np.bincount(cur_pred, minlength=k)
    stat, p = chi2_counts(ref_counts, cur_counts)
    moved = int(np.argmax(np.abs(cur_counts / len(current) - ref_counts / len(reference))))
    tests.append({"name": "prediction_chi2", "method": "chi-square", "statistic": stat, "p_value": p,
                  "detail": f"class {classes[moved]}: {ref_counts[moved] / len(reference):.1%} -> "
                            f"{cur_counts[moved] / len(current):.1%} of predictions"})
    ref_conf, cur_conf = reference.probs.max(1), current.probs.max(1)
    stat, p = ks_test(ref_conf, cur_conf)
    tests.append({"name": "confidence_ks", "method": "Kolmogorov-Smirnov", "statistic": stat, "p_value": p,
                  "detail": f"mean confidence {ref_conf.mean():.3f} -> {cur_conf.mean():.3f}"})

    assert abs(threshold - alpha / len(tests)) < 1e-15
    for t in tests:
        t["drifted"] = bool(t["p_value"] < threshold)
    worst = min(tests, key=lambda t: (t["p_value"], -t["statistic"]))
    flagged = [t for t in tests if t["drifted"]]
    if flagged:
        others = f"; {len(flagged) - 1} more test(s) below it" if len(flagged) > 1 else ""
        reason = (f"drift: {worst['name']} p={worst['p_value']:.2g} < {threshold:.2g} ({worst['detail']}){others}; "
                  f"{len(current)} logged inputs vs {len(reference)} reference rows")
    else:
        reason = (f"no drift: {len(tests)} tests, smallest p={worst['p_value']:.2g} ({worst['name']}) >= "
                  f"{threshold:.2g}; {len(current)} logged inputs vs {len(reference)} reference rows")
    scores = atypicality(reference.embedding, current.embedding)
    order = np.argsort(-scores, kind="stable")[:ATYPICAL_SHOWN]
    return {
        "drift": bool(flagged), "reason": reason, "alpha": alpha, "threshold": threshold, "tests": tests,
        "current_rows": len(current), "reference_rows": len(reference),
        "predictions": {"classes": list(classes),
                        "reference": [round(float(c) / len(reference), 6) for c in ref_counts],
                        "current": [round(float(c) / len(current), 6) for c in cur_counts]},
        "confidence": {"reference_mean": float(ref_conf.mean()), "current_mean": float(cur_conf.mean())},
        "atypical": [{"id": current.ids[i], "name": current.names[i] if current.names else current.ids[i],
                      "score": float(scores[i]), "prediction": str(classes[int(cur_pred[i])]),
                      "confidence": float(cur_conf[i])} for i in order],
    }, scores


# ---------------------------------------------------------------- the two samples from disk

def reference_sample(dataset_dir: str | Path, predictor, splits: Sequence[str], max_rows: int = 2000,
                     seed: int = 0) -> Sample:
    """Rows of ``splits`` of the variant's dataset (at most ``max_rows``, drawn at random),
    scored by ``predictor``; image statistics from the manifest."""
    from pipeline.manifest import read_dataset

    ds = read_dataset(dataset_dir)
    rows = np.flatnonzero(ds.manifest["split"].isin(list(splits)).to_numpy())
    if len(rows) == 0:
        raise FmpipeError(f"{dataset_dir}: no rows in split(s) {', '.join(splits)}; expected held-out rows to "
                          "compare with (--reference)")
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    man = ds.manifest.iloc[rows]
    if ds.images is not None:
        x = np.asarray(ds.images[rows]).transpose(0, 3, 1, 2).astype(np.float32)
        stats = {"mean": man["mean"].to_numpy(np.float64), "std": man["std"].to_numpy(np.float64)}
    else:
        feats = ds.features.iloc[rows]
        x = feats.to_numpy(np.float32)
        stats = {c: feats[c].to_numpy(np.float64) for c in feats.columns}
    probs, logits = predictor.scores(x)
    ids = man["id"].astype(str).tolist()
    return Sample(ids, logits.astype(np.float64), probs.astype(np.float64), stats, ids)


def current_sample(entries, predictor, package_id: str, thumbnails: bool = True) -> tuple[Sample, int]:
    """The log's records as a sample (and how many were re-scored): a record made by another
    package than ``package_id`` is scored again from its stored input, so both samples'
    embeddings come from one model; image statistics from the stored inputs."""
    from pipeline.manifest import image_rows

    spec = predictor.spec
    kind = spec["input"]["kind"]
    ids = [e.id for e in entries]
    names = [str(e.record.get("name") or e.id) for e in entries]
    widths = {(len(e.record["embedding"]), len(e.record["probabilities"])) for e in entries}
    if len(widths) != 1:
        raise FmpipeError(f"request log: records with embeddings/probabilities of {len(widths)} different "
                          "lengths; the log mixes models of different variants")
    emb = np.array([e.record["embedding"] for e in entries], dtype=np.float64)
    probs = np.array([e.record["probabilities"] for e in entries], dtype=np.float64)
    rescore = [i for i, e in enumerate(entries) if e.record.get("package") != package_id]
    images = None
    if kind == "image":
        images = np.stack([input_pixels(e, spec) for e in entries])
        st = image_rows(images)
        stats = {"mean": st["mean"].to_numpy(np.float64), "std": st["std"].to_numpy(np.float64)}
        x = images.transpose(0, 3, 1, 2).astype(np.float32)
    else:
        features = list(spec["input"]["features"])
        x = np.array([input_features(e, features) for e in entries], dtype=np.float32)
        stats = {f: x[:, j].astype(np.float64) for j, f in enumerate(features)}
    if rescore:
        p, z = predictor.scores(x[rescore])
        probs[rescore], emb[rescore] = p, z
    return Sample(ids, emb, probs, stats, names, images if thumbnails else None), len(rescore)


def input_pixels(entry, spec: dict[str, Any]) -> np.ndarray:
    """A logged image input as the model's H x W x C uint8 pixels (the package's decoding rule)."""
    from pipeline.inference import runtime

    path = entry.checked_path()
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FmpipeError(f"{entry.path}: not a readable logged tensor ({exc})") from None
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return runtime.decode_image(path, spec, str(path)).pixels


def input_features(entry, features: Sequence[str]) -> list[float]:
    import json

    if "features" in entry.record:
        return [float(v) for v in entry.record["features"]]
    try:
        row = json.loads(entry.checked_path().read_text())
        return [float(row[f]) for f in features]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FmpipeError(f"{entry.path}: not a logged table row with {', '.join(features)} ({exc})") from None
