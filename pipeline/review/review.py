"""The review step as one function of data: ``review(dataset, model_dir, spec) -> ReviewResult``.

It reads nothing but its arguments and writes nothing (``write_review`` does, atomically), so
it runs in memory in tests. What it does, in order:

1. one forward pass of the trained network over every row, capturing the logits, the
   penultimate embedding and any layers named in ``review.duplicate_features`` (forward hooks
   of :class:`pipeline.quality.embedders.PackageEmbedder`); when the model has TTA views
   (model.json ``tta``), the val/test rows again through each view, combined exactly as
   evaluate, predict and serve combine them (``pipeline.inference.tta.probabilities``);
2. out-of-sample probabilities (:mod:`pipeline.review.scoring`): val/test from the network,
   train from the cross-validated head (or per-fold networks with ``scoring: full_model``);
3. cleanlab per scoring group; the finders (:mod:`pipeline.quality.finders`); the queue;
4. the queue tables, Label Studio tasks + config, the HTML contact sheet, and a report that
   says which rows were scored how.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipeline.errors import FmpipeError
from pipeline.manifest import Dataset
from pipeline.inference.tta import effective_tta, tta_description
from pipeline.review import export
from pipeline.config import VariantSpec
from pipeline.quality.finders import ACROSS_SPLITS, FINDERS, SCORE_MEANING, ReviewInputs, build_queue, finder_options
from pipeline.review.scoring import cross_validated_head_probs, fold_assignment, label_issues

QUEUE_PARQUET = "queue.parquet"
QUEUE_CSV = "queue.csv"
LS_TASKS = "label_studio_tasks.json"
LS_CONFIG = "label_config.xml"
CONTACT_SHEET = "contact_sheet.html"
REPORT = "report.json"

MODEL_SCORED = "model"  # val/test: the trained network's softmax, out-of-sample


@dataclass
class ReviewResult:
    table: pd.DataFrame  # the published queue (queue.parquet / queue.csv)
    queue: pd.DataFrame  # the same rows with dataset row indices (for images)
    report: dict[str, Any]
    tasks: list[dict[str, Any]]
    config_xml: str
    html: str
    probs: np.ndarray = field(repr=False, default=None)  # N x K, what cleanlab saw
    scored_by: np.ndarray = field(repr=False, default=None)


def scoring_description(method: str, folds: int, tta: str = "") -> dict[str, str]:
    """How each split's probabilities were made; ``tta``: the TTA views as evaluate names them."""
    model = "trained network's softmax" + (f" ({tta})" if tta else "") + "; out-of-sample (never trained on)"
    if method == "linear_head":
        train = (f"cross-validated head: logistic regression refitted on {folds} folds of the network's "
                 "penultimate embeddings, each fold predicted by the head fitted on the others. The head "
                 "is out-of-fold; the embeddings are not (the network trained on these rows)")
    else:
        train = (f"full model per fold: the network retrained with the variant's recipe on {folds - 1} of "
                 f"{folds} folds, predicting the held-out fold; out-of-sample")
    return {"val": model, "test": model, "train": train}


def _scored_by_label(split: str, method: str, folds: int) -> str:
    if split in ("val", "test"):
        return "model (out-of-sample)"
    return f"{method} ({folds}-fold cross-validated)"


def embed_dataset(model_dir: str | os.PathLike, ds: Dataset, layers: list[Optional[str]], *,
                  batch_size: int = 512, data_dir: Optional[str | os.PathLike] = None,
                  engine: str = "local") -> dict[str, Any]:
    """Logits, penultimate embedding (``None``) and named layers for every row, one pass (on
    ``engine``, reading the rows from ``data_dir``: ``pipeline.inference.batch``)."""
    import functools

    from pipeline.inference.batch import forward
    from pipeline.inference.network import check_compatible
    from pipeline.quality.embedders import PackageEmbedder

    embedder = PackageEmbedder(path=str(model_dir), batch_size=batch_size)
    embedder.load()
    check_compatible(embedder._meta, ds, model_dir, "the dataset under review")
    captured = forward(embedder, ds, model_dir, data_dir or "", np.arange(len(ds)), layers=layers,
                       batch_size=batch_size, engine=engine,
                       load=functools.partial(PackageEmbedder, path=str(Path(model_dir).resolve()),
                                              batch_size=batch_size))
    out = {"layers": {k: v for k, v in captured.items() if k != "output"}, "logits": captured["output"],
           "meta": embedder._meta, "describe": embedder.describe()}
    return out


def model_logits(net_or_dir, ds: Dataset, rows: np.ndarray, tta: Optional[dict[str, Any]],
                 logits: Optional[np.ndarray] = None, *, data_dir: Optional[str | os.PathLike] = None,
                 engine: str = "local"):
    """The model's logits for ``rows`` as evaluate computes them: one array, or one per TTA view
    (what ``pipeline.inference.tta.probabilities`` takes); without TTA the one pass's ``logits``
    when it already made them. ``engine``/``data_dir``: as for :func:`embed_dataset` (the
    network is then ``net_or_dir``'s directory, loaded by each worker)."""
    if tta is None and logits is not None:
        return np.asarray(logits[rows])
    from pipeline.inference.batch import forward
    from pipeline.models import load_trained

    is_dir = isinstance(net_or_dir, (str, os.PathLike))
    net = load_trained(net_or_dir)[0] if is_dir and engine == "local" else net_or_dir
    return forward(net, ds, net_or_dir if is_dir else "", data_dir or "", rows, tta=tta, engine=engine)


def model_probs(net_or_dir, ds: Dataset, rows: np.ndarray, tta: Optional[dict[str, Any]],
                logits: Optional[np.ndarray] = None) -> np.ndarray:
    """The model's class probabilities for ``rows`` (temperature 1), as evaluate computes them."""
    from pipeline.inference.tta import probabilities

    return probabilities(model_logits(net_or_dir, ds, rows, tta, logits), 1.0, tta).astype(np.float64)


def calibrated(view_logits, labels: np.ndarray, fit_on: np.ndarray, tta: Optional[dict[str, Any]]
               ) -> tuple[np.ndarray, float]:
    """Class probabilities at the temperature that fits the rows ``fit_on`` (a boolean mask) best
    (negative log-likelihood of their given labels; evaluate's ``fit_temperature``), and that
    temperature (1.0 when no row is given or scaling does not help).

    Why: the queue ranks rows of different scoring groups, and different finders, by one number,
    the chance that the given label is wrong; each group's probabilities must first mean what
    they say. The network's softmax is fitted on the val rows (held out, as evaluate does); the
    cross-validated head's out-of-fold probabilities on the train rows themselves (each row was
    predicted by a head that did not fit it)."""
    from pipeline.evaluation.calibration import fit_temperature
    from pipeline.inference.tta import probabilities

    views = [v[fit_on] for v in view_logits] if isinstance(view_logits, list) else view_logits[fit_on]
    temperature = fit_temperature(views, labels[fit_on], tta) if fit_on.any() else 1.0
    return probabilities(view_logits, temperature, tta).astype(np.float64), float(temperature)


def review_tta(meta: dict[str, Any], spec: VariantSpec) -> Optional[dict[str, Any]]:
    """The TTA views evaluate scored this model with (none for tables)."""
    return effective_tta(meta, spec.train)



def full_model_probs(ds: Dataset, spec: VariantSpec, train_rows: np.ndarray, folds: int, seed: int, *,
                     epochs: Optional[int] = None, workdir: Optional[str | os.PathLike] = None,
                     variant: str = "") -> np.ndarray:
    """Out-of-fold probabilities for ``train_rows`` from networks retrained per fold."""
    from pipeline.models import load_trained
    from pipeline.training.fit import fit

    labels = ds.manifest["label"].to_numpy()
    fold_of = fold_assignment(labels[train_rows], folds, seed)
    probs = np.zeros((len(train_rows), len(ds.classes)), dtype=np.float64)
    train_spec = spec.train if epochs is None else spec.train.model_copy(update={"max_epochs": epochs})
    fold_spec = spec.model_copy(update={"train": train_spec})
    split = ds.manifest["split"].astype(str).to_numpy()
    with tempfile.TemporaryDirectory(prefix="fmpipe-review-folds-", dir=workdir) as tmp:
        for f in range(int(fold_of.max()) + 1):
            held = train_rows[fold_of == f]
            fit_rows = train_rows[fold_of != f]
            keep = np.sort(np.concatenate([fit_rows, np.flatnonzero(split == "val")]))
            fold_ds = ds.take(keep)
            out_dir = Path(tmp) / f"fold{f}" / "train"
            fit(fold_ds, fold_spec, out_dir, state_dir=Path(tmp) / f"fold{f}" / "state",
                variant=f"{variant} (review fold {f + 1}/{folds})")
            net, meta = load_trained(out_dir)
            probs[fold_of == f] = model_probs(net, ds, held, review_tta(meta, spec))
    return probs


def duplicate_vectors(ds: Dataset, features: list[str], layers: dict[Optional[str], np.ndarray],
                      notes: list[str]) -> Optional[np.ndarray]:
    """The concatenated, per-part L2-normalised vectors the near-duplicate finder compares."""
    parts = []
    for name in features:
        if name == "thumbs":
            if ds.images is None:
                notes.append("duplicate_features: 'thumbs' needs images; left out for this table")
                continue
            from pipeline.quality.embedders import ThumbsEmbedder

            vec = ThumbsEmbedder().embed(ds.images)  # batch by batch: a lazy payload stays on disk
        elif name == "penultimate":
            vec = layers[None]
        else:
            vec = layers[name]
        vec = np.asarray(vec, dtype=np.float32)
        parts.append(vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12))
    if not parts:
        return None
    return np.concatenate(parts, axis=1) / np.sqrt(len(parts))


def review(ds: Dataset, model_dir: str | os.PathLike, spec: VariantSpec, *, variant: str = "",
           model_sha256: str = "", workdir: Optional[str | os.PathLike] = None,
           data_dir: Optional[str | os.PathLike] = None, engine: str = "local") -> ReviewResult:
    """Score, find, queue and render (see the module docstring). Changes no data. ``engine``:
    where the forward passes run, reading ``ds`` from ``data_dir`` (``pipeline.inference.batch``;
    the same outputs either way)."""
    import cleanlab

    rs = spec.review
    if len(ds) == 0:
        raise FmpipeError("review: the dataset is empty")
    m = ds.manifest.reset_index(drop=True)
    split = m["split"].astype(str).to_numpy()
    labels = m["label"].to_numpy().astype(np.int64)
    k = len(ds.classes)
    train_rows = np.flatnonzero(split == "train")
    held_rows = np.flatnonzero(split != "train")

    named = [f for f in rs.duplicate_features if f not in ("thumbs", "penultimate")] \
        if "near_duplicates" in rs.finders else []
    layers_wanted: list[Optional[str]] = [None, *dict.fromkeys(named)]
    captured = embed_dataset(model_dir, ds, layers_wanted, batch_size=rs.batch_size, data_dir=data_dir,
                             engine=engine)
    layers = captured["layers"]
    tta = review_tta(captured["meta"], spec)
    probs = np.zeros((len(m), k), dtype=np.float64)
    temperatures: dict[str, float] = {}
    if len(held_rows):
        probs[held_rows], temperatures["val+test (model)"] = calibrated(
            model_logits(model_dir, ds, held_rows, tta, captured["logits"], data_dir=data_dir, engine=engine),
            labels[held_rows],
            split[held_rows] == "val", tta)
    if len(train_rows):
        if rs.scoring == "linear_head":
            out_of_fold = cross_validated_head_probs(layers[None][train_rows], labels[train_rows], k,
                                                     folds=rs.folds, seed=rs.seed, c=rs.head_c)
        else:
            out_of_fold = full_model_probs(ds, spec, train_rows, rs.folds, rs.seed,
                                           epochs=rs.full_model_epochs, workdir=workdir, variant=variant)
        probs[train_rows], temperatures["train (cross-validated)"] = calibrated(
            np.log(np.maximum(out_of_fold, 1e-12)), labels[train_rows], np.ones(len(train_rows), bool), None)
    scored_by = np.array([_scored_by_label(s, rs.scoring, rs.folds) for s in split], dtype=object)

    # cleanlab once per scoring group: its per-class thresholds assume one source of probabilities.
    issues = pd.DataFrame({"is_issue": np.zeros(len(m), bool), "quality": np.ones(len(m)),
                           "suggested": probs.argmax(axis=1).astype(np.int64),
                           "given_prob": probs[np.arange(len(m)), labels],
                           "suggested_prob": probs.max(axis=1)})
    groups = {"train (cross-validated)": train_rows, "val+test (model)": held_rows}
    cleanlab_notes: dict[str, list[str]] = {}
    group_counts: dict[str, dict[str, int]] = {}
    if "label_issues" in rs.finders:
        for name, rows in groups.items():
            if len(rows) == 0:
                continue
            frame, notes = label_issues(labels[rows], probs[rows], filter_by=rs.filter_by, rank_by=rs.rank_by)
            for col in frame.columns:
                values = issues[col].to_numpy().copy()
                values[rows] = frame[col].to_numpy()
                issues[col] = values
            cleanlab_notes[name] = notes
            group_counts[name] = {"rows": int(len(rows)), "label_issues": int(frame["is_issue"].sum())}

    notes: list[str] = []
    inputs = ReviewInputs(manifest=m, probs=probs, issues=issues, penultimate=layers[None],
                          groups=np.where(split == "train", "train", "model").astype(object))
    if "near_duplicates" in rs.finders:
        inputs.duplicate_vectors = duplicate_vectors(ds, rs.duplicate_features, layers, notes)
    options = {name: finder_options(rs, name) for name in rs.finders}
    if "near_duplicates" in options:
        options["near_duplicates"]["duplicate_threshold"] = duplicate_threshold(rs, spec)
    findings = {name: FINDERS[name](inputs, options[name]) for name in rs.finders}

    decided = np.zeros(len(m), dtype=bool)
    if rs.skip_decided and "label_source" in m.columns:
        decided = (m["label_source"].astype(str) == "annotation").to_numpy()
    shares = {name: float(getattr(rs, f"{name}_share", 1.0)) for name in rs.finders}
    queue = build_queue(findings, rs.queue_size, skip_rows=np.flatnonzero(decided), shares=shares)
    table = export.queue_table(queue, m, ds.classes, scored_by)

    model_version = f"fmpipe review {variant} {model_sha256[:12]}".strip()
    tasks = export.label_studio_tasks(table, queue, kind=ds.kind, images=ds.images, features=ds.features,
                                      model_version=model_version)
    config_xml = export.label_config(ds.classes, ds.kind)

    predicted = probs.argmax(axis=1)
    per_split = {}
    for s in ("train", "val", "test"):
        rows = split == s
        per_split[s] = {
            "rows": int(rows.sum()),
            "scored_by": scoring_description(rs.scoring, rs.folds, tta_description(tta))[s] if rows.any() else None,
            "agreement_with_given_labels": float((predicted[rows] == labels[rows]).mean()) if rows.any() else None,
            "label_issues": int(issues["is_issue"].to_numpy()[rows].sum()),
            "queued": int((table["split"] == s).sum()),
        }
    in_queue_reasons: dict[str, int] = {}
    for r in table["reason"].astype(str):
        for part in r.split("+"):
            in_queue_reasons[part] = in_queue_reasons.get(part, 0) + 1
    report = {
        "step": "review",
        "variant": variant,
        "model": {"dir": str(model_dir), "sha256": model_sha256, "name": captured["meta"]["model"]["name"]},
        "rows": int(len(m)),
        "changes_data": False,
        "scoring": {"method": rs.scoring, "folds": rs.folds, "seed": rs.seed, "tta": tta_description(tta),
                    "temperature": temperatures, "calibrated_on": {
                        "val+test (model)": "the val rows' given labels", "train (cross-validated)":
                        "the train rows' given labels, each predicted out-of-fold"},
                    "by_split": per_split,
                    "in_sample_predictions_used": False,
                    "embeddings": captured["describe"]},
        "cleanlab": {"version": cleanlab.__version__, "find_label_issues": {"filter_by": rs.filter_by},
                     "ranked_by": rs.rank_by, "queue_order": (
                         "cleanlab's flagged rows and the others of the lowest "
                         f"{rs.low_quality_fraction:g} of their scoring group by {rs.rank_by} (train: "
                         "cross-validated, val+test: model); score = " + SCORE_MEANING["label_issues"]
                         + "; suggestion = the most probable other class"),
                     "groups": group_counts, "notes": cleanlab_notes},
        "finders": {name: ({"flagged_by_cleanlab": int((f["reason"] == "label_issue").sum()), "ranked": int(len(f))}
                           if name == "label_issues" else {"found": int(len(f))}) for name, f in findings.items()},
        "near_duplicates": ({"features": list(rs.duplicate_features), "threshold": duplicate_threshold(rs, spec),
                             "meaning": near_copy_meaning(rs, spec),
                             "index": inputs.extra.get("near_pairs"),
                             "pairs_by_reason": findings["near_duplicates"]["reason"].astype(str).value_counts().sort_index().to_dict()}
                            if "near_duplicates" in findings else None),
        "outliers": ({"method": "cosine distance to the nearest train class mean (penultimate embedding)",
                      "fraction": rs.outlier_fraction} if "outliers" in findings else None),
        "queue": {"size": int(len(table)), "max_size": rs.queue_size,
                  "order": ("one ranking, highest score first: every finder's score is the estimated chance "
                            "that a person changes the row (relabels or drops it); each finder may queue at "
                            "most its share of the rows (" + ", ".join(f"{g} {shares[g]:g}" for g in rs.finders)
                            + "), and rows the caps held back fill what is left"),
                  "groups": {g: {"rows": int((table["group"] == g).sum()), "score": SCORE_MEANING[g]}
                             for g in rs.finders},
                  "by_reason": dict(sorted(in_queue_reasons.items())),
                  "by_split": {s: int((table["split"] == s).sum()) for s in ("train", "val", "test")},
                  "skipped_already_decided": int(decided.sum())},
        "notes": notes,
        "files": [QUEUE_PARQUET, QUEUE_CSV, LS_TASKS, LS_CONFIG, CONTACT_SHEET, REPORT],
    }
    summary = (f"{len(table)} queued of {len(m)} rows; " + ", ".join(f"{k} {v}" for k, v in report["queue"]["by_reason"].items())
               + f". Train rows: {rs.scoring} {rs.folds}-fold; val/test: the model (out-of-sample).")
    notes_on_page = [near_copy_meaning(rs, spec)] if "near_duplicates" in findings else []
    attributions = queue_attributions(model_dir, ds, table, queue, rs.explain_rows)
    if attributions:
        report["explained_rows"] = len(attributions)
        notes_on_page.append(f"The top {len(attributions)} rows by rank carry a third picture: Integrated Gradients "
                             "(Captum) of the trained network towards the suggested class (the given one for a drop), "
                             "brighter where the pixels pushed it there.")
    html = export.contact_sheet(table, queue, title=f"fmpipe review queue: {variant}", kind=ds.kind, images=ds.images,
                                features=ds.features, summary=summary, limit=rs.contact_sheet_rows,
                                notes=notes_on_page, attributions=attributions)
    return ReviewResult(table=table, queue=queue, report=report, tasks=tasks, config_xml=config_xml, html=html,
                        probs=probs, scored_by=scored_by)


def duplicate_threshold(rs, spec: VariantSpec) -> float:
    """The near-duplicate finder's threshold: its own when params set one, else clean's
    ``near_threshold`` (one calibrated notion of a near-duplicate for clean and review)."""
    return float(spec.clean.near_threshold if rs.duplicate_threshold is None else rs.duplicate_threshold)


def near_copy_meaning(rs, spec: VariantSpec) -> str:
    """How review's near copies relate to clean's leaks (said on the page)."""
    clean = spec.clean
    same = rs.duplicate_threshold is None
    return (f"Leaks are clean's: pairs across splits closer than cosine distance {clean.near_threshold:g} "
            f"(clean's {clean.embedder.kind} embedding); clean acts on them by its leakage policy and reports "
            "the leaked rows left. "
            + ("Review looks for the same near-duplicates (clean's threshold) in what clean kept, on "
               if same else f"Review casts its own net for a person to judge: pairs closer than "
               f"{duplicate_threshold(rs, spec):g} on ")
            + f"{'+'.join(rs.duplicate_features)}. Across splits they are queued as {ACROSS_SPLITS} (the copy in "
            "the less protected split), within a split as near_duplicate; neither is a leak by clean's rule "
            "unless a person decides it is a copy (suggestion: drop).")


def write_files(result: ReviewResult, out_dir: str | os.PathLike) -> None:
    """Write every review output into ``out_dir`` (an existing directory)."""
    import json

    from pipeline.io import to_json

    out = Path(out_dir)
    result.table.to_parquet(out / QUEUE_PARQUET, index=False)
    result.table.to_csv(out / QUEUE_CSV, index=False, float_format="%.6f")
    (out / LS_TASKS).write_text(json.dumps(result.tasks, indent=1) + "\n")
    (out / LS_CONFIG).write_text(result.config_xml)
    (out / CONTACT_SHEET).write_text(result.html)
    (out / REPORT).write_text(to_json(result.report))


def write_review(result: ReviewResult, out_dir: str | os.PathLike) -> None:
    """The same, replacing ``out_dir`` in one atomic rename (outside the runner: benchmarks)."""
    from pipeline.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        write_files(result, tmp)


def queue_attributions(model_dir, ds: Dataset, table: pd.DataFrame, queue: pd.DataFrame,
                       limit: int) -> dict[int, np.ndarray]:
    """Integrated Gradients maps (dataset row -> H x W) for the queue's ``limit`` best-ranked image
    rows, towards the suggested class (the given label when the suggestion is to drop a copy),
    with evaluate's default number of steps (review does not read the evaluate params)."""
    if ds.kind != "image" or limit <= 0 or not len(table):
        return {}
    from pipeline.config import ExplainSpec
    from pipeline.evaluation.explain import integrated_gradients
    from pipeline.inference.network import model_inputs
    from pipeline.models import load_trained

    top = np.argsort(table["rank"].to_numpy(), kind="stable")[:limit]
    rows = queue["row"].to_numpy()[top].astype(np.int64)
    names = table["suggested_label"].astype(str).to_numpy()[top]
    given = ds.manifest["label"].to_numpy()[rows]
    targets = np.array([ds.classes.index(n) if n in ds.classes else g for n, g in zip(names, given)], dtype=np.int64)
    order = np.argsort(rows, kind="stable")  # read rows in file order
    net, _ = load_trained(model_dir)
    maps = integrated_gradients(net, model_inputs(ds.take(rows[order])), targets[order],
                                ExplainSpec.model_fields["steps"].default)
    return {int(r): m for r, m in zip(rows[order], maps)}


def subset_for_sheet(result: ReviewResult, split: str, limit: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The queue rows of one split, top ``limit`` (the CIFAR benchmark's test-split sheet)."""
    mask = (result.table["split"] == split).to_numpy()
    return (result.table[mask].head(limit).reset_index(drop=True),
            result.queue[mask].head(limit).reset_index(drop=True))

