"""``fmpipe review pool --stage V LOG``: pool a request log's inputs and rank them for labelling.

Adding: each logged input once (by the sha256 of what the client sent), decoded by the
package's rule, left out when its pixels (or feature values) are already a dataset row; the
pool is ``annotations/<V>/pool/`` (``pipeline.review.pool``), so ``git add`` versions it
with the decisions that will label it.

Ranking, over the pooled inputs nobody has decided about yet, scored by V's current package:

- uncertainty: ``margin`` (1 - (top probability - second)) and ``entropy`` (normalised to 0..1);
- ``drift``: the input's atypicality against V's held-out rows in logit space
  (``pipeline.monitoring.drift.atypicality``, as the monitor's report);
- priority: the mean of the three scores' percentile ranks among the pooled inputs;
- diversity: k-means clusters of the standardised logits; the queue is built greedily, an
  input's priority multiplied by ``DECAY`` for every input of its cluster already queued, so
  a crowd of near-identical inputs does not take the whole queue.

Writes ``data/<V>/pool/queue.csv`` (every unlabelled pooled input, in queue order) and the
top ``queue_size`` (``review.queue_size``) as a Label Studio import
(``label_studio_tasks.json`` + ``label_config.xml``, the review step's formats: the export
comes back through ``fmpipe review import``). These are git-ignored working files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd


DECAY = 0.8
CLUSTERS = 8
QUEUE = "queue.csv"


def diversity_order(priority: np.ndarray, cluster: np.ndarray, decay: float = DECAY) -> np.ndarray:
    """Indices in queue order: greedy by priority x decay^(inputs of the same cluster already taken)."""
    eff = np.asarray(priority, dtype=np.float64).copy()
    order = np.empty(len(eff), dtype=np.int64)
    for r in range(len(eff)):
        i = int(np.argmax(eff))  # ties: the lower index, so the order is deterministic
        order[r] = i
        eff[cluster == cluster[i]] *= decay
        eff[i] = -np.inf
    return order


def percentile(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return (rankdata(x) - 1) / max(1, len(x) - 1)


def scores(probs: np.ndarray, logits: np.ndarray, reference_logits: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """Per input: margin, entropy, drift, priority and cluster (the ranking's ingredients)."""
    from sklearn.cluster import KMeans

    from pipeline.monitoring.drift import atypicality, standardise

    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    top2 = -np.sort(-p, axis=1)[:, :2]
    margin = 1.0 - (top2[:, 0] - top2[:, 1])
    entropy = -(p * np.log(p)).sum(1) / np.log(p.shape[1])
    drift = atypicality(reference_logits, logits)
    priority = (percentile(margin) + percentile(entropy) + percentile(drift)) / 3
    k = min(CLUSTERS, len(p))
    _, z = standardise(reference_logits, logits)
    cluster = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(z) if k > 1 else np.zeros(len(p), int)
    return pd.DataFrame({"margin": margin, "entropy": entropy, "drift": drift, "priority": priority,
                         "cluster": cluster.astype(int)})


def pool_log(variant: str, log_path: str | Path, *, size: Optional[int] = None, seed: int = 0) -> str:
    """Add the log's new inputs to the pool, rank the undecided ones, write the queue; a summary line."""
    from pipeline.inference import runtime
    from pipeline.config import load_variant
    from pipeline.io import atomic_write_bytes, atomic_write_text
    from pipeline.manifest import feature_rows, image_rows, read_dataset
    from pipeline.monitoring import drift, log
    from pipeline.review import pool
    from pipeline.paths import annotations_dir
    from pipeline.steps import DATA, at, output
    from pipeline.review import export
    from pipeline.review.decisions import CHOICES_CONTROL, read_decisions

    spec = load_variant(variant)
    entries = log.read_variant_log(log_path, variant)
    pkg = log.variant_package(variant)
    predictor = runtime.Predictor(pkg)
    ds = read_dataset(output("annotate", variant))
    in_dataset = set(ds.manifest["sha256"].astype(str))
    directory = annotations_dir(variant) / pool.POOL
    table = pool.read_pool(directory)
    known = set(table["input_sha256"]) if table is not None else set()
    features = list(pkg.spec["input"].get("features") or [])

    new_rows: list[dict[str, Any]] = []
    already = 0
    for e in entries:
        digest = str(e.record["input"]["sha256"])
        if digest in known:
            continue
        known.add(digest)
        pid = pool.pool_id(variant, digest)
        row = {"id": pid, "log_id": e.id, "input_sha256": digest, "logged_at": str(e.record.get("time", "")),
               "package": str(e.record.get("package", "")), "predicted": str(e.record.get("prediction", ""))}
        if pkg.kind == "image":
            pixels = drift.input_pixels(e, pkg.spec)
            row["sha256"] = str(image_rows(pixels[None])["sha256"].iloc[0])
            if row["sha256"] in in_dataset:
                already += 1
                continue
            atomic_write_bytes(directory / pool.image_file(pid), export.png_bytes(pixels))
        else:
            values = drift.input_features(e, features)
            row["sha256"] = str(feature_rows(pd.DataFrame([values], columns=features))["sha256"].iloc[0])
            if row["sha256"] in in_dataset:
                already += 1
                continue
            row.update(dict(zip(features, values)))
        new_rows.append(row)
    if new_rows:
        added = pd.DataFrame(new_rows)
        merged = added if table is None else pd.concat([table, added], ignore_index=True)
        merged = merged.sort_values("id", kind="stable")[[*pool.BASE_COLUMNS, *features]]
        atomic_write_text(directory / pool.TABLE, merged.to_csv(index=False))
        table = merged
    if table is None:
        return (f"{log_path}: nothing to pool ({len(entries)} records, {already} already dataset rows); "
                f"{directory} not written")

    votes, _ = read_decisions(annotations_dir(variant), list(pkg.classes))
    decided = {v.id for v in votes}
    todo = table[~table["id"].isin(decided)].reset_index(drop=True)
    out = at(DATA, variant) / "pool"  # git-ignored (data/*/*): a working queue, not data
    line = (f"pool {directory}: {len(new_rows)} input(s) added ({already} already dataset rows, "
            f"{len(entries) - len(new_rows) - already} repeated or pooled before); {len(table)} pooled, "
            f"{len(todo)} undecided")
    if todo.empty:
        return line + "; nothing to queue"
    if pkg.kind == "image":
        payload = pool.pool_pixels(directory, todo["id"].tolist(), tuple(ds.images.shape[1:]))
        x = payload.transpose(0, 3, 1, 2).astype(np.float32)
    else:
        payload = None
        x = todo[features].to_numpy(np.float32)
    probs, logits = predictor.scores(x)
    reference = drift.reference_sample(output("annotate", variant), predictor, ["val"], seed=seed)
    s = scores(probs, logits, reference.embedding, seed=seed)
    order = diversity_order(s["priority"].to_numpy(), s["cluster"].to_numpy())
    classes = list(pkg.classes)
    queue = pd.concat([todo[["id", "log_id"]], s], axis=1).iloc[order].reset_index(drop=True)
    queue.insert(0, "rank", np.arange(1, len(queue) + 1))
    queue["predicted"] = [classes[int(i)] for i in probs[order].argmax(1)]
    queue["confidence"] = probs[order].max(1)
    atomic_write_text(out / QUEUE, queue.to_csv(index=False, float_format="%.6g"))

    top = min(len(queue), size or spec.review.queue_size)
    tasks = []
    for r in range(top):
        i = int(order[r])
        rec = queue.iloc[r]
        info = (f"#{r + 1} {rec['id']} (production input {rec['log_id']}): the model says {rec['predicted']} "
                f"p={rec['confidence']:.3f}; margin {rec['margin']:.3f}, drift {rec['drift']:.2f}")
        data: dict[str, Any] = {"fmpipe_id": rec["id"], "log_id": rec["log_id"], "rank": r + 1, "info": info,
                                "suggested_label": rec["predicted"], "group": "production"}
        if payload is not None:
            data["image"] = export.data_uri(export.png_bytes(payload[i], export.LS_MIN_SIDE))
        else:
            data["features"] = ", ".join(f"{f}={float(v):.4g}" for f, v in zip(features, x[i]))
        tasks.append({"data": data, "predictions": [{
            "model_version": log.package_id(pkg), "score": round(float(rec["confidence"]), 6),
            "result": [{"from_name": CHOICES_CONTROL, "to_name": "image" if payload is not None else "item",
                        "type": "choices", "value": {"choices": [rec["predicted"]]}}]}]})
    atomic_write_text(out / "label_studio_tasks.json", json.dumps(tasks, indent=1) + "\n")
    atomic_write_text(out / "label_config.xml", export.label_config(classes, pkg.kind))
    return line + f"; queue: {out / QUEUE}, top {top} as Label Studio tasks in {out / 'label_studio_tasks.json'}"
