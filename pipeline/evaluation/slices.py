"""Slices: the model's figures per group of test rows, the disparities between them, and the
slice rules of the blessing.

A slice is one value of one slicing column over the test split:

- ``metadata``: a column of the variant's metadata table (``source.metadata``, joined by
  collect as ``meta:<column>``), e.g. ``group=b``; numbers with many values are binned;
- ``brightness`` / ``contrast`` (images): quantile bins of the manifest's per-image pixel mean
  and standard deviation; a table's feature columns likewise;
- ``clean_flagged`` (rows a clean rule flagged) and ``relabelled`` (rows a person relabelled);
- ``cluster``: discovered groups, k-means on the model's penultimate features of the test rows,
  centred per class (``discover``), for a failing group nobody has a column for. Clusters are reported, never
  gated: the worst of k clusters of any model is bad by construction.

Per slice: support, accuracy and macro F1 (two classes: TPR, FPR and selection rate, the
second class positive) from Fairlearn's ``MetricFrame``; 95% bootstrap intervals, seeded.
The intervals are not MetricFrame's own ``n_boot``: that rebuilds every metric per resample
(41 s for one 3-slice column of 10,000 rows at 100 resamples on this project's 2-core CPU).
Resampling a slice's rows with replacement is the same as drawing its confusion matrix from a
multinomial over its cells, so every resample's figures come from one (B x k x k) array at once.

Slices with fewer than ``min_rows`` rows are listed but never gated or compared. The table
(``slices.csv``) is a pure function of the test rows, predictions and params; the comparison
with the last blessed package (``change_failures``) is not, and stays out of hashed outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from pipeline.artefacts import Check
from pipeline.filenames import SLICES_CSV
from pipeline.manifest import META_PREFIX

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from pipeline.config import EvaluateSpec, SliceSpec

CLUSTER = "cluster"
UNGATED = (CLUSTER,)  # slicing columns reported but never gated or compared
CATEGORY_MAX = 10  # a numeric metadata column with at most this many values is a category
EXAMPLES = 12  # example ids kept per discovered group (mistakes first)


# ---------------------------------------------------------------- slicing columns

def _bins(values, bins: int) -> "pd.Series":
    """Quantile bins of a numeric column as text labels ``[low, high]`` (NaN: no bin)."""
    import pandas as pd

    s = pd.Series(np.asarray(values, dtype=np.float64))
    if bins < 1 or s.notna().sum() == 0:
        return pd.Series(pd.NA, index=s.index, dtype="string")
    cut = pd.qcut(s, q=bins, duplicates="drop")
    labels = cut.cat.categories
    names = {iv: f"q{i + 1} [{iv.left:.4g}, {iv.right:.4g}]" for i, iv in enumerate(labels)}
    return cut.map(names).astype("string")


def _category(col) -> "pd.Series":
    import pandas as pd

    s = pd.Series(col)
    return s.astype("string")


def slicing_columns(manifest: "pd.DataFrame", spec: "SliceSpec", *, features: "Optional[pd.DataFrame]" = None,
                    flagged_ids: Optional[set] = None) -> "pd.DataFrame":
    """One text column per slicing dimension, row-aligned with ``manifest`` (the test split);
    a missing value puts the row in no slice of that column."""
    import pandas as pd

    cols: dict[str, pd.Series] = {}
    meta = [c[len(META_PREFIX):] for c in manifest.columns if str(c).startswith(META_PREFIX)]
    wanted = meta if spec.columns is None else list(spec.columns)
    for name in wanted:
        values = manifest[META_PREFIX + name].reset_index(drop=True)
        numeric = values.dtype.kind in "biuf"
        many = values.nunique(dropna=True) > CATEGORY_MAX
        cols[name] = _bins(values, spec.feature_bins or 3) if numeric and many else _category(values)
    if spec.image_bins and {"mean", "std"} <= set(manifest.columns):
        cols["brightness"] = _bins(manifest["mean"].to_numpy(), spec.image_bins)
        cols["contrast"] = _bins(manifest["std"].to_numpy(), spec.image_bins)
    if spec.feature_bins and features is not None:
        for name in features.columns:
            if str(name) not in cols:
                cols[str(name)] = _bins(features[name].to_numpy(), spec.feature_bins)
    if spec.data_quality:
        if flagged_ids is not None:
            flagged = manifest["id"].astype(str).isin(flagged_ids).to_numpy()
            cols["clean_flagged"] = pd.Series(np.where(flagged, "flagged", "not flagged"), dtype="string")
        if "label_source" in manifest.columns:
            changed = (manifest["label_source"].astype("string").fillna("source") != "source").to_numpy()
            cols["relabelled"] = pd.Series(np.where(changed, "relabelled", "as given"), dtype="string")
    return pd.DataFrame(cols)


def missing_columns(manifest_columns, spec: "SliceSpec") -> list[str]:
    """Declared metadata columns the dataset does not have (for one clear error)."""
    have = {str(c)[len(META_PREFIX):] for c in manifest_columns if str(c).startswith(META_PREFIX)}
    return [c for c in (spec.columns or []) if c not in have]


# ---------------------------------------------------------------- discovered groups

def discover(features: np.ndarray, labels: np.ndarray, correct: np.ndarray, spec: "SliceSpec") -> "pd.Series":
    """k-means (scikit-learn) on the penultimate features, L2-normalised and centred per class
    (each true class's own mean removed): the network's features are grouped by class above all,
    so plain clusters mostly re-find the classes; centred, they follow what varies within every
    class alike (a camera, a site, negatives). On digits with 30% of test images inverted (and 3%
    of train), plain k-means put 41% of them in its worst cluster, centred 100%
    (tests/test_slices.py). Each test row's cluster as ``c<k>``, numbered by accuracy, worst first."""
    import pandas as pd
    from sklearn.cluster import KMeans

    n = len(features)
    k = min(spec.clusters, n)
    if k < 2 or features.shape[1] == 0:
        return pd.Series(pd.NA, index=range(n), dtype="string")
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    for c in np.unique(labels):
        x[labels == c] -= x[labels == c].mean(axis=0)
    assigned = KMeans(n_clusters=k, n_init=4, random_state=spec.seed).fit_predict(x)
    acc = np.array([correct[assigned == c].mean() if (assigned == c).any() else 1.0 for c in range(k)])
    order = np.lexsort((np.arange(k), acc))  # worst first, ties by k-means' own number
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(k)
    return pd.Series([f"c{rank[c]}" for c in assigned], dtype="string")


def failing_groups(table: "pd.DataFrame", overall: dict[str, Any], spec: "SliceSpec") -> list[dict[str, Any]]:
    """Discovered clusters whose accuracy is far below the rest of the test rows: at least
    ``cluster_gap`` below, and the cluster's interval's top below the rest's accuracy."""
    rows = table[(table["column"] == CLUSTER) & (table["support"] >= spec.min_rows)]
    n, correct = overall["support"], overall["accuracy"] * overall["support"]
    out = []
    for r in rows.to_dict("records"):
        rest_n = n - r["support"]
        if rest_n <= 0:
            continue
        rest = (correct - r["accuracy"] * r["support"]) / rest_n
        high = r.get("accuracy_high")
        if rest - r["accuracy"] >= spec.cluster_gap and (high is None or np.isnan(high) or high < rest):
            out.append({"slice": r["slice"], "support": int(r["support"]), "accuracy": float(r["accuracy"]),
                        "rest_accuracy": float(rest), "gap": float(rest - r["accuracy"])})
    return out


# ---------------------------------------------------------------- the table

def _metric_fns(k: int):
    from functools import partial

    from sklearn.metrics import accuracy_score, f1_score

    fns = {"accuracy": accuracy_score,
           # Over the classes present in the slice (actual or predicted), as sklearn does by
           # default: a slice of one class is not marked down for the nine it does not hold.
           "macro_f1": partial(f1_score, average="macro", zero_division=0)}
    if k == 2:
        from fairlearn.metrics import false_positive_rate, selection_rate, true_positive_rate

        fns.update(tpr=partial(true_positive_rate, pos_label=1), fpr=partial(false_positive_rate, pos_label=1),
                   selection_rate=partial(selection_rate, pos_label=1))
    return fns


def _boot_figures(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Figures of B confusion matrices (B x k x k, rows actual), as the table's metrics define
    them (macro F1 over the classes present, actual or predicted; 0 where undefined)."""
    n = counts.sum(axis=(1, 2)).astype(np.float64)
    tp = np.diagonal(counts, axis1=1, axis2=2).astype(np.float64)
    actual, predicted = counts.sum(axis=2), counts.sum(axis=1)
    denom = actual + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0
    macro = np.divide(f1.sum(axis=1), present.sum(axis=1), out=np.zeros(len(f1)), where=present.any(axis=1))
    out = {"accuracy": tp.sum(axis=1) / np.maximum(n, 1), "macro_f1": macro}
    if counts.shape[1] == 2:
        pos, neg = actual[:, 1].astype(np.float64), actual[:, 0].astype(np.float64)
        out["tpr"] = np.divide(tp[:, 1], pos, out=np.zeros_like(pos), where=pos > 0)
        out["fpr"] = np.divide(counts[:, 0, 1].astype(np.float64), neg, out=np.zeros_like(neg), where=neg > 0)
        out["selection_rate"] = predicted[:, 1] / np.maximum(n, 1)
    return out


def _intervals(y: np.ndarray, p: np.ndarray, k: int, boots: int, rng: np.random.Generator) -> dict[str, tuple]:
    cells = np.bincount(y * k + p, minlength=k * k).astype(np.float64)
    draws = rng.multinomial(int(cells.sum()), cells / cells.sum(), size=boots).reshape(boots, k, k)
    return {name: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975)))
            for name, v in _boot_figures(draws).items()}


def slice_table(labels: np.ndarray, predicted: np.ndarray, columns: "pd.DataFrame", k: int,
                spec: "SliceSpec") -> "pd.DataFrame":
    """One row per slice: ``column, slice, name, support, gated`` and each figure with its
    ``_low``/``_high`` interval (empty without bootstrap)."""
    import pandas as pd
    from fairlearn.metrics import MetricFrame

    y, p = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    fns = _metric_fns(k)
    rows = []
    for col in columns.columns:
        values = columns[col].reset_index(drop=True)
        keep = values.notna().to_numpy()
        if not keep.any():
            continue
        frame = MetricFrame(metrics=fns, y_true=y[keep], y_pred=p[keep],
                            sensitive_features=pd.Series(values[keep].to_numpy(), name=col))
        groups = values[keep].to_numpy()
        # One generator per column, seeded by its name: a column added or removed leaves the
        # others' intervals as they were.
        rng = np.random.default_rng([spec.seed, *str(col).encode()])
        for name, figures in frame.by_group.iterrows():
            member = groups == name
            support = int(member.sum())
            row = {"column": str(col), "slice": str(name), "name": f"{col}={name}", "support": support,
                   "gated": bool(support >= spec.min_rows and col not in UNGATED)}
            ci = _intervals(y[keep][member], p[keep][member], k, spec.bootstrap, rng) if spec.bootstrap else {}
            for metric in fns:
                row[metric] = float(figures[metric])
                low, high = ci.get(metric, (np.nan, np.nan))
                row[f"{metric}_low"], row[f"{metric}_high"] = low, high
            rows.append(row)
    figures = list(fns)
    cols = ["column", "slice", "name", "support", "gated", *[f"{m}{s}" for m in figures for s in ("", "_low", "_high")]]
    table = pd.DataFrame(rows, columns=cols)
    return table.sort_values(["column", "slice"], kind="stable").reset_index(drop=True)


def disparities(table: "pd.DataFrame") -> dict[str, Any]:
    """The worst gated slice, and per column the largest accuracy gap between its gated slices."""
    gated = table[table["gated"]]
    if gated.empty:
        return {"worst": None, "gaps": {}, "largest_gap": None}
    worst = gated.sort_values(["accuracy", "support", "name"], ascending=[True, False, True], kind="stable").iloc[0]
    gaps = {}
    for col, part in gated.groupby("column", sort=True):
        if len(part) >= 2:
            lo = part.sort_values(["accuracy", "name"], kind="stable").iloc[0]
            hi = part.sort_values(["accuracy", "name"], ascending=[False, True], kind="stable").iloc[0]
            gaps[str(col)] = {"gap": float(hi["accuracy"] - lo["accuracy"]), "low": str(lo["slice"]),
                              "high": str(hi["slice"]), "low_accuracy": float(lo["accuracy"]),
                              "high_accuracy": float(hi["accuracy"])}
    largest = max(gaps.items(), key=lambda kv: (kv[1]["gap"], kv[0]), default=None)
    return {"worst": {"column": str(worst["column"]), "slice": str(worst["slice"]), "name": str(worst["name"]),
                      "accuracy": float(worst["accuracy"]), "support": int(worst["support"])},
            "gaps": gaps,
            "largest_gap": None if largest is None else {"column": largest[0], **largest[1]}}


# ---------------------------------------------------------------- gates

def slice_checks(found: dict[str, Any], spec: "EvaluateSpec") -> list[Check]:
    """The blessing's slice rules: the worst gated slice's accuracy, the largest gap. A rule
    with no slice to judge (no gated slice, no column with two) passes: nothing is wrong yet;
    ``slices.min_rows`` says how large a slice must be to count."""
    checks = []
    worst, gap = found.get("worst"), found.get("largest_gap")
    if spec.min_worst_slice_accuracy is not None:
        value = 1.0 if worst is None else worst["accuracy"]
        checks.append(Check(name="min_worst_slice_accuracy", metric="accuracy",
                            slice=None if worst is None else f"{worst['name']} ({worst['support']} rows)",
                            threshold=float(spec.min_worst_slice_accuracy), value=float(value),
                            passed=value >= spec.min_worst_slice_accuracy))
    if spec.max_slice_gap is not None:
        value = 0.0 if gap is None else gap["gap"]
        where = None if gap is None else f"{gap['column']}: {gap['high']} {gap['high_accuracy']:.4f} vs {gap['low']} {gap['low_accuracy']:.4f}"
        checks.append(Check(name="max_slice_gap", metric="accuracy gap", slice=where,
                            threshold=float(spec.max_slice_gap), value=float(value),
                            passed=value <= spec.max_slice_gap, at_most=True))
    return checks


def change_failures(new_table: "pd.DataFrame", new_accuracy: float, old_table: "Optional[pd.DataFrame]",
                    old_accuracy: Optional[float], spec: "EvaluateSpec") -> dict[str, Any]:
    """Change thresholds against the last blessed package (TFX's change thresholds): overall
    accuracy may not fall more than ``change.max_accuracy_drop``; no slice with at least
    ``change.min_rows`` rows in both may fall more than ``change.max_slice_drop``. Slices are
    matched by name (bins come from the test rows, so the same data gives the same names).
    Returns ``{"failures": [...], "compared": n}``; each failure names the slice and figures."""
    ch = spec.change
    failures: list[dict[str, Any]] = []
    if ch.max_accuracy_drop is not None and old_accuracy is not None:
        drop = float(old_accuracy) - float(new_accuracy)
        if drop > ch.max_accuracy_drop:
            failures.append({"slice": "overall", "before": float(old_accuracy), "after": float(new_accuracy),
                             "drop": drop, "max_drop": ch.max_accuracy_drop})
    compared = 0
    if ch.max_slice_drop is not None and old_table is not None and len(old_table):
        old = old_table[~old_table["column"].isin(UNGATED)].set_index("name")
        for r in new_table[~new_table["column"].isin(UNGATED)].to_dict("records"):
            if r["name"] not in old.index:
                continue
            before = old.loc[r["name"]]
            if min(int(r["support"]), int(before["support"])) < ch.min_rows:
                continue
            compared += 1
            drop = float(before["accuracy"]) - float(r["accuracy"])
            if drop > ch.max_slice_drop:
                failures.append({"slice": r["name"], "rows": int(r["support"]), "before": float(before["accuracy"]),
                                 "after": float(r["accuracy"]), "drop": drop, "max_drop": ch.max_slice_drop})
    failures.sort(key=lambda f: -f["drop"])
    return {"failures": failures, "compared": compared}


def describe_failure(f: dict[str, Any]) -> str:
    rows = f" on {f['rows']} rows" if "rows" in f else ""
    return (f"accuracy of {f['slice']} {f['before']:.4f} -> {f['after']:.4f} ({-f['drop']:+.4f}{rows}; "
            f"at most -{f['max_drop']:.4f} allowed)")


def read_table(path) -> "Optional[pd.DataFrame]":
    """A ``slices.csv`` (of evaluate, or of a package), or None when absent or unreadable: the
    baseline may come from an older fmpipe without one."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype={"column": str, "slice": str, "name": str}, keep_default_na=False,
                            na_values=[""])
    except (OSError, ValueError):
        return None
    return table if {"name", "column", "support", "accuracy"} <= set(table.columns) else None


# ---------------------------------------------------------------- the picture

def slices_png(table: "pd.DataFrame", title: str) -> bytes:
    """Accuracy per slice with its 95% interval, one row per slice, grouped by column."""
    from pipeline.plotting import new_figure, png_bytes

    t = table.reset_index(drop=True)
    fig = new_figure(7, max(2.0, 0.28 * len(t) + 1))
    ax = fig.add_subplot()
    y = np.arange(len(t))[::-1]
    acc = t["accuracy"].to_numpy(float)
    low, high = t["accuracy_low"].to_numpy(float), t["accuracy_high"].to_numpy(float)
    err = np.vstack([np.nan_to_num(acc - low), np.nan_to_num(high - acc)])
    colours = ["#b0b0b0" if not g else "#4c72b0" for g in t["gated"]]
    ax.barh(y, acc, color=colours, xerr=err, ecolor="#333333", capsize=2)
    ax.set_yticks(y, [f"{n} ({s})" for n, s in zip(t["name"], t["support"])], fontsize=7)
    ax.set_xlim(max(0.0, float(np.nanmin(low if np.isfinite(low).any() else acc)) - 0.05), 1.0)
    ax.set_xlabel("accuracy (95% bootstrap interval); grey: reported only")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


# ---------------------------------------------------------------- one call from evaluate

def flagged_ids(findings_path) -> Optional[set]:
    """Ids a clean rule flagged (kept, with a doubt), from clean's ``findings.parquet``; None
    when the file is absent (an older clean output)."""
    import pandas as pd

    try:
        f = pd.read_parquet(findings_path, columns=["id", "action"])
    except (OSError, ValueError):
        return None
    return set(f.loc[f["action"].astype(str) == "flag", "id"].astype(str))


def evaluate_slices(spec: "SliceSpec", manifest: "pd.DataFrame", labels: np.ndarray, predicted: np.ndarray,
                    k: int, *, features: "Optional[pd.DataFrame]" = None, flagged: Optional[set] = None,
                    embed=None) -> dict[str, Any]:
    """Everything evaluate writes about slices. ``embed``: a function giving the penultimate
    features of the test rows (called only when ``spec.clusters``). Returns ``table``,
    ``found`` (``disparities``), ``groups`` (failing discovered clusters with example ids,
    mistakes first) and ``figures`` (for metrics.json)."""
    from pipeline.artefacts import SliceFigures

    manifest = manifest.reset_index(drop=True)
    unknown = missing_columns(manifest.columns, spec)
    if unknown:
        from pipeline.errors import FmpipeError

        have = sorted(str(c)[len(META_PREFIX):] for c in manifest.columns if str(c).startswith(META_PREFIX))
        raise FmpipeError(f"params.yaml: evaluate.slices.columns: no metadata column {unknown[0]!r} in the dataset "
                          f"(joined by collect from source.metadata: {', '.join(have) or 'none'})")
    columns = slicing_columns(manifest, spec, features=features, flagged_ids=flagged)
    y, p = np.asarray(labels), np.asarray(predicted)
    correct = y == p
    clusters = None
    if spec.clusters and embed is not None and len(y) >= 2:
        clusters = discover(embed(), y, correct, spec)
        columns[CLUSTER] = clusters.to_numpy()
    table = slice_table(y, p, columns, k, spec)
    found = disparities(table)
    overall = {"support": len(y), "accuracy": float(correct.mean()) if len(y) else 0.0}
    groups = failing_groups(table, overall, spec) if clusters is not None else []
    ids = manifest["id"].astype(str).to_numpy()
    for g in groups:
        member = (clusters == g["slice"]).to_numpy()
        order = np.lexsort((ids[member], correct[member]))  # mistakes first, then by id
        g["examples"] = [{"id": str(ids[member][i]), "label": int(y[member][i]), "predicted": int(p[member][i])}
                         for i in order[:EXAMPLES]]
    worst, gap = found["worst"], found["largest_gap"]
    figures = SliceFigures(
        worst_slice=None if worst is None else worst["name"],
        worst_slice_accuracy=None if worst is None else worst["accuracy"],
        worst_slice_rows=None if worst is None else worst["support"],
        largest_gap=None if gap is None else gap["gap"], largest_gap_column=None if gap is None else gap["column"],
        slices=len(table), failing_groups=len(groups))
    clusters_info = {"method": f"k-means (scikit-learn, k={spec.clusters}, seed {spec.seed}) on the penultimate "
                               "features of the test rows, L2-normalised and centred per class; c0 is the least "
                               "accurate",
                     "min_gap": spec.cluster_gap, "failing": groups} if clusters is not None else None
    worst_rows = np.zeros(0, dtype=np.int64)
    if worst is not None:  # the rows of the worst slice, for evaluate's explanations
        values = next(columns[c] for c in columns.columns if str(c) == worst["column"]).reset_index(drop=True)
        worst_rows = np.flatnonzero(values.notna().to_numpy() & (values.astype(str).to_numpy() == worst["slice"]))
    return {"table": table, "found": found, "groups": groups, "figures": figures, "discovered": clusters_info,
            "clusters": clusters, "worst_rows": worst_rows}


def summary(figures) -> str:
    """A few words for evaluate's summary line."""
    if figures is None or figures.worst_slice is None:
        return ""
    text = f"worst slice {figures.worst_slice} {figures.worst_slice_accuracy:.4f} ({figures.worst_slice_rows} rows)"
    if figures.largest_gap is not None:
        text += f", largest gap {figures.largest_gap:.4f} ({figures.largest_gap_column})"
    if figures.failing_groups:
        text += f", {figures.failing_groups} discovered group(s) far below the rest"
    return text


def change_against(package_dir, table: "pd.DataFrame", accuracy: float, weights_sha256: str,
                   spec: "EvaluateSpec") -> Optional[dict[str, Any]]:
    """``change_failures`` against the package in ``package_dir`` (the last blessed model): its
    ``lineage.json`` (overall accuracy, weights) and ``slices.csv``. None when no change
    threshold is set, there is no package, or it holds these very weights (a re-run). Called by
    evaluate (run record and summary, never a hashed output) and by package (the refusal)."""
    import json
    from pathlib import Path

    ch = spec.change
    if ch.max_accuracy_drop is None and ch.max_slice_drop is None:
        return None
    lineage_path = Path(package_dir) / "lineage.json"
    try:
        lineage = json.loads(lineage_path.read_text())
        old_accuracy = float(lineage["metrics"]["accuracy"])
        old_sha = (lineage.get("model") or {}).get("sha256")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if old_sha == weights_sha256:
        return None
    old_table = read_table(Path(package_dir) / SLICES_CSV)
    result = change_failures(table, accuracy, old_table, old_accuracy, spec)
    result["baseline"] = str(package_dir)
    if old_table is None and ch.max_slice_drop is not None:
        result["note"] = f"{Path(package_dir) / SLICES_CSV}: absent or unreadable; slices not compared"
    return result


def card_section(table: "pd.DataFrame", figures, spec: "EvaluateSpec", limit: int = 40) -> str:
    """The model card's "Slices" subsection: what was sliced, the figures, the rules and what
    they mean for intended use."""
    lines = ["### Slices\n"]
    if table is None or not len(table):
        return "\n".join(lines + ["No slices were evaluated (params: `evaluate.slices`).\n"])
    cols = sorted(set(table["column"]))
    lines.append(f"The test split was scored per slice of: {', '.join(f'`{c}`' for c in cols)} "
                 f"({len(table)} slices; 95% bootstrap intervals, {spec.slices.bootstrap} resamples). "
                 f"Slices under {spec.slices.min_rows} rows and discovered clusters are reported, not gated.\n")
    if figures is not None and figures.worst_slice is not None:
        lines.append(f"- Worst slice: `{figures.worst_slice}`, accuracy {figures.worst_slice_accuracy:.4f} "
                     f"on {figures.worst_slice_rows} rows.")
    if figures is not None and figures.largest_gap is not None:
        lines.append(f"- Largest gap between slices of one column: {figures.largest_gap:.4f} "
                     f"(`{figures.largest_gap_column}`).")
    if figures is not None and figures.failing_groups:
        lines.append(f"- {figures.failing_groups} discovered group(s) (k-means on the model's features) are far "
                     f"below the rest: inputs like them are a known weakness (see the report).")
    rules = []
    if spec.min_worst_slice_accuracy is not None:
        rules.append(f"every slice of at least {spec.slices.min_rows} rows reaches accuracy {spec.min_worst_slice_accuracy:g}")
    if spec.max_slice_gap is not None:
        rules.append(f"no two slices of one column differ by more than {spec.max_slice_gap:g} in accuracy")
    if spec.change.max_accuracy_drop is not None:
        rules.append(f"overall accuracy falls at most {spec.change.max_accuracy_drop:g} against the last blessed package")
    if spec.change.max_slice_drop is not None:
        rules.append(f"no slice of at least {spec.change.min_rows} rows falls more than "
                     f"{spec.change.max_slice_drop:g} against the last blessed package")
    lines.append("- Rules this package passed: " + ("; ".join(rules) if rules else
                 "none on slices (the figures are information only)") + ".")
    lines.append("- For intended use: the figures hold for groups like these test slices; a group the "
                 "slices do not name can still fare worse, and a slice's interval is wide when it is small.\n")
    lines.append("| slice | rows | accuracy | 95% interval | macro F1 |")
    lines.append("|---|---:|---:|---|---:|")
    shown = table.sort_values(["gated", "accuracy"], ascending=[False, True], kind="stable").head(limit)
    for r in shown.to_dict("records"):
        ci = "" if np.isnan(r["accuracy_low"]) else f"{r['accuracy_low']:.3f}..{r['accuracy_high']:.3f}"
        lines.append(f"| {r['name']}{'' if r['gated'] else ' (not gated)'} | {int(r['support'])} | "
                     f"{r['accuracy']:.4f} | {ci} | {r['macro_f1']:.4f} |")
    if len(table) > limit:
        lines.append(f"\n{len(table) - limit} more slices in `slices.csv`.")
    return "\n".join(lines) + "\n"
