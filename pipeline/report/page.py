"""The report page: one HTML file per variant, sections in the lifecycle's order.

Each section is a function of the variant's directory that returns HTML; a section whose
inputs are absent says so, and one whose inputs are broken shows the error line instead of
stopping the page. Pictures are PNG ``data:`` URIs inside the page, and the same PNGs are
written beside it (``plots/``) for ``dvc plots show``; the page loads nothing from a network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from pipeline import palette
from pipeline.artefacts import Blessing, Check, DatasetReport, Lineage, Metrics, ValidationSummary
from pipeline.report import figures
from pipeline.report.changes import section_changes
from pipeline.report.html import Raw, esc, kv, missing, table  # noqa: F401  (Raw, kv: used by monitoring's page)
from pipeline.report.readers import (
    ArtefactError,
    Thumbnails,
    file_data_uri,
    id_columns,
    png_data_uri,
    read_artefact,
    read_json,
    read_table,
    read_tsv_series,
)
from pipeline.steps import rerun_hint

MAX_ROWS = 20  # rows of a findings/queue/mistakes table shown with thumbnails


@dataclass
class Context:
    """What every section sees: the variant's folder, where the page goes, and shared lookups."""

    variant: str
    root: Path  # data/<variant>
    out: Path  # data/<variant>/report
    plots: dict[str, bytes] = field(default_factory=dict)  # name -> PNG, also written to out/plots
    _thumbs: Optional[Thumbnails] = None

    def step(self, name: str) -> Path:
        return self.root / name

    @property
    def thumbs(self) -> Thumbnails:
        # collect holds every example, also those clean removed; annotate/clean hold the
        # current labels. Looked up in that order of preference.
        if self._thumbs is None:
            self._thumbs = Thumbnails([self.step(s) for s in ("annotate", "clean", "collect")])
        return self._thumbs

    def link(self, path: Path) -> str:
        return os.path.relpath(path, self.out).replace(os.sep, "/")

    def picture(self, name: str, png: bytes, alt: str) -> str:
        self.plots[name] = png
        return f'<figure><img class="plot" alt="{esc(alt)}" src="{png_data_uri(png)}"><figcaption>{esc(alt)}</figcaption></figure>'


# --- small HTML helpers -----------------------------------------------------------------

def thumb(ctx: Context, example_id: Any) -> Raw:
    uri = ctx.thumbs.uri(example_id) if ctx.thumbs else None
    return Raw(f'<img class="thumb" alt="{esc(str(example_id))}" src="{uri}">' if uri else "")


def pic(ctx: Context, example_id: Any) -> list[Raw]:
    """The thumbnail cell for a row, or no cell at all for a tabular dataset."""
    return [thumb(ctx, example_id)] if ctx.thumbs else []


def pic_header(ctx: Context) -> list[str]:
    return ["image"] if ctx.thumbs else []


def links_to_pages(ctx: Context, step: str) -> str:
    """Links to the HTML pages other steps write (contact sheets, galleries), whatever their names."""
    d = ctx.step(step)
    pages = sorted(p for p in d.rglob("*.html") if "data_docs" not in p.parts) if d.is_dir() else []
    if not pages:
        return ""
    items = "".join(f'<li><a href="{esc(ctx.link(p))}">{esc(p.relative_to(ctx.root).as_posix())}</a></li>' for p in pages)
    return f"<p>Pages written by {esc(step)}:</p><ul>{items}</ul>"


def pictures_of(ctx: Context, step: str, skip: tuple[str, ...] = (), limit: int = 6) -> str:
    """Inline the PNG/SVG pictures a step wrote (a contact sheet, a reliability diagram), whatever their names."""
    d = ctx.step(step)
    if not d.is_dir():
        return ""
    found = sorted(p for p in d.rglob("*") if p.suffix.lower() in (".png", ".svg", ".jpg", ".jpeg")
                   and "data_docs" not in p.parts and not any(w in p.name for w in skip))
    out = []
    for p in found[:limit]:
        uri = file_data_uri(p)
        if uri:
            name = p.relative_to(ctx.root).as_posix()
            out.append(f'<figure><img class="plot" alt="{esc(name)}" src="{uri}"><figcaption>{esc(name)}</figcaption></figure>')
    if len(found) > limit:
        out.append(f"<p>{len(found) - limit} more pictures in {esc(step)}/ not shown.</p>")
    return "".join(out)


def frame_rows(ctx: Context, df, limit: int = MAX_ROWS) -> str:
    """A findings/queue table: the first ``limit`` rows, a thumbnail per id column."""
    df = df.head(limit)
    ids = id_columns(df.columns)
    cols = [c for c in df.columns if not str(c).startswith("_")]
    headers = [f"{c} (image)" for c in ids if ctx.thumbs] + [str(c) for c in cols]
    rows = []
    for rec in df.to_dict("records"):
        pics = [thumb(ctx, rec[c]) for c in ids] if ctx.thumbs else []
        rows.append(pics + [rec[c] for c in cols])
    return table(headers, rows, cls="findings")


# --- sections ---------------------------------------------------------------------------

def section_data(ctx: Context) -> str:
    parts = []
    ds = read_table(ctx.step("annotate") / "manifest.parquet")
    source = "annotate"
    if ds is None:
        ds, source = read_table(ctx.step("clean") / "manifest.parquet"), "clean"
    if ds is not None and {"split", "label_name"} <= set(ds.columns):
        counts = ds.groupby(["label_name", "split"], sort=False).size().unstack(fill_value=0)
        splits = [s for s in ("train", "val", "test") if s in counts.columns] + \
                 [s for s in counts.columns if s not in ("train", "val", "test")]
        counts = counts[splits]
        rows = [[c, *[int(counts.loc[c, s]) for s in splits], int(counts.loc[c].sum())] for c in counts.index]
        rows.append(["all", *[int(counts[s].sum()) for s in splits], int(counts.values.sum())])
        parts.append(f"<h3>Rows per split and class ({esc(source)})</h3>")
        parts.append(table(["class", *splits, "total"], rows, cls="counts"))
        parts.append(ctx.picture("rows_per_class.png",
                                 figures.counts_png({s: {str(c): int(counts.loc[c, s]) for c in counts.index} for s in splits}),
                                 "Rows per split and class"))
    else:
        parts.append(missing("row counts", "no annotate/ or clean/ manifest.parquet; " + rerun_hint("clean", ctx.variant, then="")))

    parts.append("<h3>Clean</h3>")
    rep = read_artefact(DatasetReport, ctx.step("clean") / "report.json")
    if rep is None:
        parts.append(missing("clean report", "no clean/report.json"))
    else:
        parts.append(f"<p>{rep.rows_in} rows in, {rep.rows_out} kept, {rep.rows_removed} removed.</p>")
        by_reason = rep.removed_by_reason
        if by_reason:
            parts.append(table(["reason", "rows"], [[k, v] for k, v in by_reason.items()], cls="reasons"))
        removed = [r.model_dump() for r in rep.removed]  # with each rule's extra keys (dup_of, distance, ...)
        if removed:
            shown = removed[:MAX_ROWS]
            keys = [k for k in shown[0] if k != "id"] if isinstance(shown[0], dict) else []
            # A duplicate's kept twin (dup_of) is worth seeing beside it.
            twins = [k for k in id_columns(keys) if ctx.thumbs]
            rows = [[*pic(ctx, r.get("id")), *[thumb(ctx, r.get(k)) for k in twins], r.get("id"),
                     *[r.get(k) for k in keys]] for r in shown if isinstance(r, dict)]
            parts.append(f"<p>Removed rows (first {len(shown)} of {len(removed)}):</p>")
            parts.append(table([*pic_header(ctx), *[f"{k} (image)" for k in twins], "id", *keys], rows, cls="removed"))
    findings = read_table(ctx.step("clean") / "findings.parquet")
    if findings is not None:
        parts.append(f"<h4>Findings ({len(findings)} rows in clean/findings.parquet)</h4>")
        for col in ("rule", "kind", "detector", "action", "reason"):
            if col in findings.columns:
                vc = findings[col].astype(str).value_counts()
                parts.append(table([col, "rows"], [[k, int(v)] for k, v in vc.items()], cls="finding-kinds"))
                break
        sort = next((c for c in ("score", "severity_score", "distance") if c in findings.columns), None)
        if sort is not None:
            findings = findings.sort_values(sort, ascending=(sort == "distance"), kind="stable")
        parts.append(frame_rows(ctx, findings))
    parts.append(pictures_of(ctx, "clean"))
    parts.append(links_to_pages(ctx, "clean"))

    parts.append("<h3>Validation</h3>")
    parts.append(validation_table(ctx))
    return "".join(parts)


def validation_table(ctx: Context) -> str:
    vdir = ctx.step("validate")
    summary = read_artefact(ValidationSummary, vdir / "summary.json")
    results = read_json(vdir / "results.json")  # GX's own format
    if summary is None and results is None:
        return missing("validation", "no validate/summary.json; " + rerun_hint("validate", ctx.variant, then=""))
    out = []
    if summary is not None:
        ok = summary.success
        out.append(f'<p class="{"pass" if ok else "fail"}">{"Passed" if ok else "FAILED"}: '
                   f'{summary.expectations} expectations, {len(summary.failed)} failed.</p>')
    docs = vdir / "data_docs" / "index.html"
    if docs.is_file():
        out.append(f'<p>Great Expectations Data Docs: <a href="{esc(ctx.link(docs))}">validate/data_docs/index.html</a> '
                   "(they load their styles and scripts from CDNs, so offline they show little; "
                   "this section has the same results).</p>")
    passed: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    # One GX result per table ("validations": {table: result}) or one for the whole suite ("validation").
    validations = (results or {}).get("validations") or {}
    single = (results or {}).get("validation")
    if isinstance(single, dict):
        validations = {single.get("suite_name") or "dataset": single}
    if isinstance(validations, dict):
        validations = [dict(v, _table=k) for k, v in validations.items() if isinstance(v, dict)]
    for v in validations if isinstance(validations, list) else []:
        for r in v.get("results") or []:
            cfg = r.get("expectation_config") or {}
            kwargs = {k: val for k, val in (cfg.get("kwargs") or {}).items() if k != "batch_id"}
            column = kwargs.pop("column", kwargs.pop("column_list", ""))
            row = {"expectation": str(cfg.get("type", "")).removeprefix("expect_"),
                   "target": _validation_target(column, kwargs),
                   "severity": cfg.get("severity") or (cfg.get("meta") or {}).get("severity") or "",
                   "observed": _readable((r.get("result") or {}).get("observed_value", "")),
                   "expected": ", ".join(f"{k} {_readable(val)}" for k, val in kwargs.items())}
            (passed if r.get("success") else failed).append(row)
    order = {"critical": 0, "warning": 1, "info": 2}
    if failed:
        failed.sort(key=lambda r: order.get(str(r["severity"]).lower(), 3))
        out.append(f'<p class="fail">{len(failed)} expectation(s) failed:</p>')
        out.append(table(["severity", "expectation", "on", "observed", "expected"],
                         [[r["severity"], r["expectation"], r["target"], r["observed"], r["expected"]] for r in failed],
                         cls="validation"))
    if passed:
        # Passes are summarised: what was checked, by severity, the full list one click away.
        by_kind: dict[str, int] = {}
        for r in passed:
            by_kind[r["expectation"]] = by_kind.get(r["expectation"], 0) + 1
        severities = {sev: sum(r["severity"] == sev for r in passed) for sev in dict.fromkeys(r["severity"] for r in passed)}
        out.append(f'<p><span class="pass">{len(passed)} passed</span> ('
                   + ", ".join(f"{n} {esc(str(sev))}" for sev, n in severities.items()) + "): "
                   + ", ".join(f"{esc(k)} &times;{n}" for k, n in sorted(by_kind.items())) + ".</p>")
        out.append("<details><summary>every passed expectation</summary>"
                   + table(["severity", "expectation", "on", "observed"],
                           [[r["severity"], r["expectation"], r["target"], r["observed"]] for r in passed],
                           cls="validation") + "</details>")
    return "".join(out)


def _readable(value: Any) -> str:
    """A GX value as a person reads it: lists joined, no Python dict syntax, long ones cut."""
    if isinstance(value, dict):
        text = ", ".join(f"{k} {_readable(v)}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_readable(v) for v in value) + "]"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = "" if value is None else str(value)
    return text if len(text) <= 90 else text[:89] + "…"


def _validation_target(column: Any, kwargs: dict[str, Any]) -> str:
    """The column(s) an expectation is about, and the rows it looked at (its row condition)."""
    target = ", ".join(column) if isinstance(column, list) else str(column or "table")
    for key in ("column_A", "column_B"):
        if key in kwargs:
            target = f"{kwargs.pop('column_A', '')}, {kwargs.pop('column_B', '')}".strip(", ")
    condition = kwargs.pop("row_condition", None)
    kwargs.pop("condition_parser", None)
    if isinstance(condition, dict):  # GX 1.x: {"pass_through_filter": "label==0", "type": ...}
        condition = condition.get("pass_through_filter") or next(iter(condition.values()), "")
    return target + (f" where {condition}" if condition else "")


def section_labels(ctx: Context) -> str:
    parts = []
    report = read_artefact(DatasetReport, ctx.step("annotate") / "report.json")
    if report is None:
        parts.append(missing("annotation report", "no annotate/report.json; " + rerun_hint("annotate", ctx.variant, then="")))
    else:
        rep = report.model_extra or {}  # annotate's own keys
        parts.append(f"<p>Decisions from {esc(str(rep.get('annotations_dir', '?')))}: "
                     f"{rep.get('decisions_applied', 0)} applied ({rep.get('relabelled', 0)} relabelled, "
                     f"{rep.get('confirmed', 0)} confirmed, {rep.get('dropped', 0)} dropped).</p>")
        changes = [c for c in (rep.get("changes") or []) if isinstance(c, dict)]
        if changes:
            keys = [k for k in changes[0] if k != "id"]
            rows = [[*pic(ctx, c.get("id")), c.get("id"), *[c.get(k) for k in keys]] for c in changes[:MAX_ROWS]]
            parts.append(f"<p>Label changes (first {len(rows)} of {len(changes)}):</p>")
            parts.append(table([*pic_header(ctx), "id", *keys], rows, cls="changes"))
    queue = read_table(ctx.step("review") / "queue.parquet")
    parts.append("<h3>Review queue</h3>")
    if queue is None:
        parts.append(missing("review queue", "no review/queue.parquet"))
    else:
        parts.append(review_queue(ctx, queue))
    parts.append(pictures_of(ctx, "review"))
    parts.append(links_to_pages(ctx, "review"))
    return "".join(parts)


def review_queue(ctx: Context, queue) -> str:
    """The queue as the review shows it: one table per group (the finder that queued the rows),
    in the queue's one ranking (the chance a person changes the row), how the finder estimates
    it heading the table; given and suggested label in
    the pages' colours; only the columns a person reads (the files have every column)."""
    from pipeline.quality.finders import SCORE_MEANING

    if "group" not in queue.columns:  # a queue from before groups: one list
        queue = queue.assign(group="queue")
    per_group = max(5, MAX_ROWS // max(1, queue["group"].nunique()))
    out = [f"<p>{len(queue)} examples queued for review, in groups; the top {per_group} of each "
           "(all of them: review/queue.csv and the contact sheet).</p>"]
    for group, rows in queue.groupby("group", sort=False):
        shown = rows.head(per_group).to_dict("records")
        pairs = "related_id" in rows.columns and rows["related_id"].notna().any()
        headers = [*pic_header(ctx), *(["near copy"] if pairs and ctx.thumbs else []), "rank", "id", "split",
                   "given", "suggested", "score", "reason", "scored by"]
        body = []
        for r in shown:
            p = r.get("suggested_prob")
            suggested = esc(str(r.get("suggested_label", ""))) + ("" if p is None or p != p else f" (p={p:.2f})")
            body.append([*pic(ctx, r.get("id")), *([thumb(ctx, r.get("related_id"))] if pairs and ctx.thumbs else []),
                         r.get("rank"), r.get("id"), r.get("split"),
                         Raw(f'<span class="given">{esc(str(r.get("given_label", "")))}</span>'),
                         Raw(f'<span class="model">{suggested}</span>'), r.get("score"), r.get("reason"),
                         str(r.get("scored_by", "")).split(" (")[0]])
        meaning = SCORE_MEANING.get(str(group), "")
        out.append(f"<h4>{esc(str(group))}: {len(rows)} queued</h4>"
                   + (f"<p>Score, highest first: {esc(meaning)}.</p>" if meaning else "")
                   + table(headers, body, cls="queue"))
    return "".join(out)


def section_training(ctx: Context) -> str:
    parts = []
    tdir = ctx.step("train")
    summary = read_json(tdir / "train_summary.json")
    if summary is None:
        parts.append(missing("training summary", "no train/train_summary.json; " + rerun_hint("train", ctx.variant, then="")))
    else:
        keys = ["model", "epochs", "global_step", "train_rows", "val_rows", "batch_size", "device", "accelerator",
                "precision", "world_size", "wall_time_s", "train_time_s", "throughput_samples_per_s", "resumed_from"]
        parts.append(kv({k: summary[k] for k in keys if k in summary}))
        final = summary.get("final")
        if isinstance(final, dict) and final:
            parts.append("<p>Last epoch:</p>" + kv(final))
    series = read_tsv_series(tdir / "live" / "plots" / "metrics")
    if series:
        parts.append(ctx.picture("training_curves.png", figures.curves_png(series), "Training curves (DVCLive, per epoch)"))
    else:
        parts.append(missing("training curves", "no train/live/plots/metrics/*.tsv"))
    parts.append("<h3>Resources per step</h3>")
    parts.append(resources_table(ctx))
    return "".join(parts)


# Both spellings: the runner's record names (peak_mb, write_mb, accel_s, ...) and older ones.
RESOURCE_COLUMNS = [(("wall_s",), "wall (s)"), (("cpu_s",), "CPU (s)"), (("peak_mb", "peak_rss_mb"), "peak memory (MB)"),
                    (("accel_s", "accelerator_s"), "accelerator (s)"),
                    (("accel_mb", "accelerator_peak_mb"), "accelerator peak (MB)"),
                    (("read_mb",), "read (MB)"), (("write_mb", "written_mb"), "written (MB)"),
                    (("rows_out", "rows_written"), "rows out"), (("samples_per_s",), "samples/s"),
                    (("gflop", "train_gflop"), "train GFLOP")]


def resources_table(ctx: Context) -> str:
    """The runner's per-step records (``data/resources/<v>/<step>.json``, device from ``data/runs/``)."""
    from pipeline import steps as registry

    records = {}
    for d in (ctx.root.parent / "resources" / ctx.variant,):
        # The report's own record is left out: it is about building this page, and leaving
        # it out keeps the page the same when nothing upstream changed.
        for path in sorted(p for p in d.glob("*.json") if p.stem != "report") if d.is_dir() else []:
            try:
                data = read_json(path)
            except ArtefactError as exc:
                data = {"error": str(exc)}
            if isinstance(data, dict):
                env = None
                try:
                    env = read_json(ctx.root.parent / "runs" / ctx.variant / path.name)
                except ArtefactError:
                    pass
                if isinstance(env, dict):  # device and train details live in the run record
                    data = {**{k: v for k, v in env.items() if k in ("device", "samples_per_s")}, **data}
                records[path.stem] = data
    if not records:
        return missing("resources", f"no {ctx.root.parent / 'resources' / ctx.variant}/*.json; the runner writes them")
    order = {name: k for k, name in enumerate(registry.ORDER)}
    def pick(r: dict, keys: tuple[str, ...]):
        return next((r[k] for k in keys if r.get(k) is not None), "")

    cols = [(k, h) for k, h in RESOURCE_COLUMNS if any(pick(r, k) != "" for r in records.values())]
    rows = [[step, *[pick(r, k) for k, _ in cols], r.get("device", "")]
            for step, r in sorted(records.items(), key=lambda kv: order.get(kv[0], len(order)))]
    return table(["step", *[h for _, h in cols], "device"], rows, cls="resources")


def section_evaluation(ctx: Context) -> str:
    parts = []
    edir = ctx.step("evaluate")
    metrics = read_artefact(Metrics, edir / "metrics.json")
    blessing = read_artefact(Blessing, edir / "blessing.json")
    if metrics is None:
        parts.append(missing("metrics", "no evaluate/metrics.json; " + rerun_hint("evaluate", ctx.variant, then="")))
    else:
        parts.append(kv(metrics.model_dump(exclude_none=True, exclude={"binary"})))
        if metrics.binary is not None:
            parts.append("<h3>Binary (second class positive)</h3>" + kv(metrics.binary.model_dump(exclude_none=True)))
    if blessing is not None:
        verdict = "BLESSED" if blessing.blessed else "NOT BLESSED"
        parts.append(f'<p class="{"pass" if blessing.blessed else "fail"}">{verdict}</p>')
        keys = list(Check.model_fields)
        parts.append(table(keys, [[getattr(c, k) for k in keys] for c in blessing.checks], cls="checks"))
    per_class = read_table(edir / "per_class.csv")
    if per_class is not None and "class" in per_class.columns:
        parts.append("<h3>Per class</h3>")
        cols = list(per_class.columns)
        parts.append(table(cols, per_class.values.tolist(), cls="per-class"))
        # F1 alone in the picture (precision and recall are in the table): one bar per class reads at a glance.
        scores = {m: per_class[m].astype(float).tolist() for m in ("f1",) if m in per_class.columns}
        if scores:
            parts.append(ctx.picture("per_class.png", figures.per_class_png(per_class["class"].astype(str).tolist(), scores),
                                     "Per-class F1 (test)"))
    preds = read_table(edir / "predictions.parquet")
    classes = _classes(ctx)
    if preds is not None and {"label", "predicted"} <= set(preds.columns):
        n = int(max(preds["label"].max(), preds["predicted"].max()) + 1) if len(preds) else 0
        names = classes if classes and len(classes) >= n else [str(i) for i in range(n)]
        m = np.zeros((len(names), len(names)), dtype=int)
        np.add.at(m, (preds["label"].to_numpy(int), preds["predicted"].to_numpy(int)), 1)
        parts.append("<h3>Confusion matrix</h3>")
        parts.append(ctx.picture("confusion.png", figures.confusion_png(m, names), "Confusion matrix (test)"))
        parts.append("<h3>Calibration</h3>")
        parts.append(calibration(ctx, preds))
        parts.append("<h3>Most confident mistakes</h3>")
        wrong = preds[preds["label"] != preds["predicted"]]
        if "confidence" in wrong.columns:
            wrong = wrong.sort_values("confidence", ascending=False, kind="stable")
        if len(wrong):
            cols = [c for c in ("id", "label_name", "predicted_name", "confidence") if c in wrong.columns]
            style = {"label_name": "given", "predicted_name": "model"}
            rows = [[*pic(ctx, r.get("id")),
                     *[Raw(f'<span class="{style[c]}">{esc(str(r[c]))}</span>') if c in style else r[c] for c in cols]]
                    for r in wrong.head(MAX_ROWS).to_dict("records")]
            headers = [{"label_name": "given", "predicted_name": "predicted"}.get(c, c) for c in cols]
            parts.append(f"<p>{len(wrong)} of {len(preds)} test examples are wrong; the most confident first:</p>")
            parts.append(table([*pic_header(ctx), *headers], rows, cls="mistakes"))
        else:
            parts.append(f"<p>No mistakes on the {len(preds)} test examples.</p>")
    else:
        parts.append(missing("predictions", "no evaluate/predictions.parquet"))
    # reliability: under Calibration; slices: in their own section
    parts.append(pictures_of(ctx, "evaluate", skip=("reliab", "calib", "slices", "robustness")))
    parts.append(links_to_pages(ctx, "evaluate"))
    return "".join(parts)


def section_slices(ctx: Context) -> str:
    """The model per slice (evaluate's slices.csv), the rules it was judged by, its accuracy
    under corruptions (robustness.csv), and the discovered groups far below the rest with their
    pictures."""
    from pipeline.evaluation import slices as S
    from pipeline.filenames import DISCOVERED, IMPORTANCE_CSV, ROBUSTNESS_CSV, SLICES_CSV

    edir = ctx.step("evaluate")
    t = S.read_table(edir / SLICES_CSV)
    if t is None:
        return missing("slices", "no evaluate/slices.csv; " + rerun_hint("evaluate", ctx.variant, then=""))
    parts = []
    metrics = read_artefact(Metrics, edir / "metrics.json")
    f = metrics.slices if metrics is not None else None
    if f is not None and f.worst_slice is not None:
        parts.append(kv({"worst slice": f"{f.worst_slice}: accuracy {f.worst_slice_accuracy:.4f} ({f.worst_slice_rows} rows)",
                         "largest gap": "" if f.largest_gap is None else f"{f.largest_gap:.4f} ({f.largest_gap_column})",
                         "slices scored": f.slices, "discovered groups far below the rest": f.failing_groups}))
    blessing = read_artefact(Blessing, edir / "blessing.json")
    rules = [c for c in (blessing.checks if blessing else []) if c.slice is not None or "slice" in c.name]
    if rules:
        parts.append(table(["rule", "slice", "threshold", "value", "passed"],
                           [[c.name, c.slice or "", c.threshold, c.value, "yes" if c.passed else "NO"] for c in rules],
                           cls="checks"))
    if len(t):
        parts.append(ctx.picture("slices.png", S.slices_png(t, f"{ctx.variant}: accuracy per slice (test)"),
                                 "Accuracy per slice with 95% bootstrap intervals (grey: reported, not gated)"))
        cols = [c for c in ("name", "support", "gated", "accuracy", "accuracy_low", "accuracy_high", "macro_f1",
                            "tpr", "fpr", "selection_rate") if c in t.columns]
        ordered = t.sort_values(["gated", "accuracy"], ascending=[False, True], kind="stable")
        parts.append(table(cols, ordered[cols].values.tolist(), cls="slices"))
    rob = read_table(edir / ROBUSTNESS_CSV)
    if rob is not None and len(rob) and {"corruption", "severity", "accuracy"} <= set(rob.columns):
        from pipeline.evaluation import robustness as R

        parts.append("<h3>Robustness: accuracy under corruptions</h3>")
        if metrics is not None and metrics.robustness is not None:
            r = metrics.robustness
            parts.append(f"<p>{r.rows} test rows, plain view: clean {r.clean_accuracy:.4f}, mean under corruptions "
                         f"{r.mean_accuracy:.4f}, worst {esc(str(r.worst_corruption))} "
                         f"{r.worst_corruption_accuracy:.4f}.</p>")
        parts.append(ctx.picture("robustness.png", R.robustness_png(rob, f"{ctx.variant}: accuracy under corruptions"),
                                 "Accuracy per corruption and severity (seeded, generated from the test rows)"))
        wide = rob.pivot(index="corruption", columns="severity", values="accuracy")
        wide["mean"] = wide.mean(axis=1)
        parts.append(table(["corruption", *[f"severity {c}" for c in wide.columns[:-1]], "mean"],
                           [[i, *row] for i, row in zip(wide.index, wide.values.tolist())], cls="robustness"))
    importance = read_table(edir / "details" / IMPORTANCE_CSV)
    if importance is not None and {"feature", "importance"} <= set(importance.columns):
        parts.append("<h3>Feature importance (permutation, test split)</h3>"
                     "<p>Accuracy lost when one feature's column is shuffled (scikit-learn, seeded).</p>")
        parts.append(table(list(importance.columns), importance.values.tolist(), cls="importance"))
    found = read_json(edir / "details" / DISCOVERED)
    if isinstance(found, dict):
        parts.append(f"<h3>Discovered groups</h3><p>{esc(str(found.get('method', '')))}.</p>")
        failing = found.get("failing") or []
        if not failing:
            parts.append(f"<p>No cluster is {found.get('min_gap')} or more below the rest.</p>")
        for g in failing:
            pics = "".join(f'<span title="label {e["label"]}, predicted {e["predicted"]}">{thumb(ctx, e["id"])}</span>'
                           for e in g.get("examples", []))
            parts.append(f"<p><b>cluster {esc(str(g['slice']))}</b>: accuracy {g['accuracy']:.4f} on {g['support']} rows, "
                         f"the rest {g['rest_accuracy']:.4f}. Examples (mistakes first): {ids_list(g)}</p>"
                         + (f"<p>{pics}</p>" if ctx.thumbs else ""))
    return "".join(parts)


def ids_list(group: dict[str, Any]) -> str:
    return esc(", ".join(str(e["id"]) for e in group.get("examples", [])))


def calibration(ctx: Context, preds) -> str:
    """The evaluate step's own calibration outputs when present, else a reliability diagram from predictions."""
    edir = ctx.step("evaluate")
    out = []
    for path in sorted(edir.glob("*calibration*.json")):
        data = read_json(path)
        if isinstance(data, dict):
            out.append(f"<p>{esc(path.name)}:</p>" + kv({k: v for k, v in data.items() if not isinstance(v, (dict, list))}))
    pictures = sorted(p for p in edir.rglob("*.png") if any(w in p.name for w in ("reliab", "calib")))
    for p in pictures:
        uri = file_data_uri(p)
        out.append(f'<figure><img class="plot" alt="{esc(p.name)}" src="{uri}"><figcaption>{esc(p.name)} (from evaluate)</figcaption></figure>')
    if not pictures and "confidence" in preds.columns and len(preds):
        correct = (preds["label"] == preds["predicted"]).to_numpy(float)
        out.append(ctx.picture("reliability.png", figures.reliability_png(preds["confidence"].to_numpy(float), correct),
                               "Reliability: accuracy per confidence bin (test)"))
    return "".join(out) or missing("calibration", "no confidence in predictions")


def section_package(ctx: Context) -> str:
    parts = []
    pdir = ctx.step("package")
    lineage = read_artefact(Lineage, pdir / "lineage.json")
    card = pdir / "MODEL_CARD.md"
    if card.is_file():
        parts.append(f'<p>Model card: <a href="{esc(ctx.link(card))}">package/MODEL_CARD.md</a></p>')
    if lineage is None:
        parts.append(missing("package", "no package/lineage.json; " + rerun_hint("package", ctx.variant, then="(it needs a blessed model)")))
        return "".join(parts)
    if lineage.files:
        parts.append(table(["file", "bytes", "sha256"],
                           [[k, v.size, v.sha256] for k, v in lineage.files.items()], cls="files"))
    if lineage.onnx:
        parts.append("<h3>ONNX check</h3>" + kv(lineage.onnx))
    # The commit is not in lineage.json (it varies run to run): the package step's run record has it.
    record = read_json(ctx.root.parent / "runs" / ctx.variant / "package.json") or {}
    git = record.get("git") or {}
    parts.append("<h3>Lineage</h3>")
    parts.append(kv({"git commit (when packaged)": git.get("commit", git.get("reason", "n/a")),
                     "dirty": git.get("dirty", "")}))
    lock = lineage.dvc_lock
    stages = lock.get("stages")
    if isinstance(stages, dict) and stages:
        rows = []
        for name, entry in stages.items():
            for o in (entry or {}).get("outs", []) if isinstance(entry, dict) else []:
                if isinstance(o, dict):
                    rows.append([name, o.get("path", ""), o.get("md5", o.get("hash", ""))])
        parts.append(table(["stage", "output", "md5"], rows, cls="lock"))
    elif isinstance(lock, dict) and lock.get("note"):
        parts.append(f"<p>{esc(str(lock['note']))}</p>")
    return "".join(parts)


def _classes(ctx: Context) -> Optional[list[str]]:
    for s in ("annotate", "clean", "collect"):
        meta = read_json(ctx.step(s) / "dataset.json")
        if isinstance(meta, dict) and isinstance(meta.get("classes"), list):
            return [str(c) for c in meta["classes"]]
    return None


SECTIONS: list[tuple[str, str, Callable[[Context], str]]] = [
    ("data", "Data", section_data),
    ("labels", "Labels", section_labels),
    ("training", "Training", section_training),
    ("evaluation", "Evaluation", section_evaluation),
    ("slices", "Slices, fairness and robustness", section_slices),
    ("package", "Package", section_package),
    ("what-changed", "What changed since the last blessed package", section_changes),
]

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1100px;padding:1em 2em;color:#222}
h1{margin-bottom:0}nav a{margin-right:1em}section{border-top:2px solid #ddd;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:middle}
th{background:#f4f4f4}table.kv td:first-child{font-weight:600}img.plot{max-width:min(100%,760px);border:1px solid #eee}
img.thumb{image-rendering:pixelated;width:48px;height:48px;object-fit:contain;background:#000}
.pass{color:#17702a;font-weight:600}.fail{color:#b00020;font-weight:700}.missing{color:#777;font-style:italic}
.error{color:#b00020}.glance{font-size:15px;margin:.3em 0 .8em}figure{margin:.5em 0}figcaption{color:#666;font-size:12px}
table.findings,table.queue,table.validation,table.resources,table.files{max-width:100%}
td{overflow-wrap:break-word}details summary{cursor:pointer;color:#444}
""" + palette.CSS


def glance(ctx: Context) -> str:
    """One line at the top: the numbers people ask first."""
    bits = []
    try:
        m = read_artefact(Metrics, ctx.step("evaluate") / "metrics.json")
        b = read_artefact(Blessing, ctx.step("evaluate") / "blessing.json")
        v = read_artefact(ValidationSummary, ctx.step("validate") / "summary.json")
    except ArtefactError:
        return ""  # the sections below show the error line
    if v is not None:
        bits.append(f"validation {'passed' if v.success else 'FAILED'}")
    if m is not None:
        bits += [f"test accuracy {m.accuracy:.4f}", f"macro F1 {m.macro_f1:.4f}"]
    if b is not None:
        bits.append("blessed" if b.blessed else "NOT blessed")
    if (ctx.step("package") / "lineage.json").is_file():
        bits.append("packaged")
    return f'<p class="glance">{esc(" · ".join(bits))}</p>' if bits else ""


def render(ctx: Context) -> str:
    body = []
    for key, title, fn in SECTIONS:
        try:
            content = fn(ctx)
        except ArtefactError as exc:
            content = f'<p class="error">Could not show this section: {esc(str(exc))}</p>'
        except Exception as exc:  # one broken or unexpected artefact must not cost the whole page
            content = f'<p class="error">Could not show this section: {esc(type(exc).__name__)}: {esc(str(exc))}</p>'
        body.append(f'<section id="{key}"><h2>{esc(title)}</h2>{content}</section>')
    nav = "".join(f'<a href="#{k}">{esc(t)}</a>' for k, t, _ in SECTIONS)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>fmpipe report: {esc(ctx.variant)}</title><style>{STYLE}</style></head>"
            f"<body><h1>fmpipe report: {esc(ctx.variant)}</h1>{glance(ctx)}<nav>{nav}</nav>{''.join(body)}</body></html>\n")
