"""What people look at: the queue tables, the Label Studio import, its label config, and an
offline HTML contact sheet. Pure functions from data to bytes/text (the stage writes them).

Label Studio: ``label_studio_tasks.json`` is a list of tasks in Label Studio's JSON import
format. Each task's ``data`` holds the image as a PNG ``data:`` URI (no file server needed;
small images are enlarged with nearest-neighbour so a person can see them), ``fmpipe_id``
(what annotate matches decisions on), the given label, the suggestion, the reason and score;
its ``predictions`` entry pre-selects the model's suggestion (``drop`` for duplicates) with
the suggestion's probability as ``score``. ``label_config.xml`` is the matching labelling
config: a single-choice ``label`` control listing every class plus ``drop``, and an
optional ``note``. Choosing the given label confirms it.

For a duplicate, the task's image shows the queued item on the left and its near copy on the
right.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Optional
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd

from pipeline import palette
from pipeline.review.decisions import CHOICES_CONTROL, DROP, NOTE_CONTROL, TASK_ID_KEY
from pipeline.quality.finders import DROP_INDEX, SCORE_MEANING

QUEUE_COLUMNS = ("rank", "group", "id", "split", "given_label", "suggested_label", "score", "reason", "scored_by",
                 "given_prob", "suggested_prob", "related_id", "distance")
LS_MIN_SIDE = 128  # enlarge small images to at least this many pixels for Label Studio


def queue_table(queue: pd.DataFrame, manifest: pd.DataFrame, classes: list[str],
                scored_by: np.ndarray) -> pd.DataFrame:
    """The published queue: one row per item, ranked, names instead of indices."""
    rows = queue["row"].to_numpy().astype(np.int64)
    ids = manifest["id"].astype(str).to_numpy()
    labels = manifest["label"].to_numpy()
    related = queue["related_row"].to_numpy().astype(np.int64)
    suggested = queue["suggested"].to_numpy().astype(np.int64)
    return pd.DataFrame({
        "rank": np.arange(1, len(rows) + 1, dtype=np.int64),
        "group": pd.array(queue["group"].astype(str).to_numpy(), dtype="string"),
        "id": pd.array(ids[rows], dtype="string"),
        "split": pd.array(manifest["split"].astype(str).to_numpy()[rows], dtype="string"),
        "given_label": pd.array([classes[int(labels[r])] for r in rows], dtype="string"),
        "suggested_label": pd.array([DROP if s == DROP_INDEX else classes[int(s)] for s in suggested], dtype="string"),
        "score": queue["score"].to_numpy().astype(np.float64).round(6),
        "reason": pd.array(queue["reasons"].astype(str).to_numpy(), dtype="string"),
        "scored_by": pd.array([str(scored_by[r]) for r in rows], dtype="string"),
        "given_prob": queue["given_prob"].to_numpy().astype(np.float64).round(6),
        "suggested_prob": queue["suggested_prob"].to_numpy().astype(np.float64).round(6),
        "related_id": pd.array([ids[r] if r >= 0 else pd.NA for r in related], dtype="string"),
        "distance": queue["distance"].to_numpy().astype(np.float64).round(6),
    }, columns=list(QUEUE_COLUMNS))


# ---------------------------------------------------------------- images

def png_bytes(image: np.ndarray, min_side: int = 0) -> bytes:
    """An H x W x C uint8 image as PNG, enlarged by an integer factor to ``min_side``."""
    from PIL import Image

    img = np.asarray(image)
    if min_side:
        factor = max(1, math.ceil(min_side / max(img.shape[0], img.shape[1])))
        if factor > 1:
            img = img.repeat(factor, axis=0).repeat(factor, axis=1)
    mode_img = img[..., 0] if img.shape[-1] == 1 else img
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mode_img)).save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 2) -> np.ndarray:
    """Two H x W x C images next to each other with a white gap (same size assumed)."""
    h = max(left.shape[0], right.shape[0])
    c = left.shape[2]
    canvas = np.full((h, left.shape[1] + gap + right.shape[1], c), 255, dtype=np.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1] + gap:] = right
    return canvas


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _item_image(images: np.ndarray, row: int, related: int) -> np.ndarray:
    img = np.asarray(images[row])
    if related >= 0:
        img = side_by_side(img, np.asarray(images[related]), gap=max(1, img.shape[1] // 16))
    return img


def _features_text(features: Optional[pd.DataFrame], row: int) -> str:
    if features is None:
        return ""
    rec = features.iloc[row]
    return ", ".join(f"{k}={float(v):.4g}" for k, v in rec.items())


# ---------------------------------------------------------------- Label Studio

def label_config(classes: list[str], kind: str) -> str:
    """Label Studio labelling config for the tasks of :func:`label_studio_tasks`."""
    target = "image" if kind == "image" else "item"
    obj = ('  <Image name="image" value="$image" zoom="true"/>' if kind == "image"
           else '  <Text name="item" value="$features"/>')
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        '  <Text name="info" value="$info"/>\n'
        f"{obj}\n"
        f'  <Choices name="{CHOICES_CONTROL}" toName="{target}" choice="single" showInline="true" required="true">\n'
        f"{choices}\n"
        f'    <Choice value="{DROP}" hint="a duplicate, or unusable: remove it from the dataset"/>\n'
        "  </Choices>\n"
        f'  <TextArea name="{NOTE_CONTROL}" toName="{target}" placeholder="note (optional)" '
        'maxSubmissions="1" editable="true"/>\n'
        "</View>\n"
    )


def label_studio_tasks(table: pd.DataFrame, queue: pd.DataFrame, *, kind: str, images: Optional[np.ndarray],
                       features: Optional[pd.DataFrame], model_version: str) -> list[dict[str, Any]]:
    """One Label Studio task per queue row, with the model's suggestion as a prediction."""
    target = "image" if kind == "image" else "item"
    tasks = []
    for rec, row, related in zip(table.to_dict("records"), queue["row"].tolist(), queue["related_row"].tolist()):
        # Label Studio's prediction score: the suggested class's probability, or for a drop the
        # chance the pair is a copy (the finder's calibrated score).
        score = rec["suggested_prob"] if rec["suggested_label"] != DROP else rec["score"]
        info = (f"#{rec['rank']} {rec['id']} ({rec['split']}): given {rec['given_label']!s}, "
                f"suggested {rec['suggested_label']!s}{_prob_text(rec)}; {rec['reason']}, "
                f"{rec['group']} score {rec['score']:.3f}")
        if rec["related_id"] is not pd.NA and rec["related_id"] is not None:
            info += f"; right: its near copy {rec['related_id']} (cosine distance {rec['distance']:.4f})"
        data: dict[str, Any] = {
            TASK_ID_KEY: rec["id"], "split": rec["split"], "given_label": rec["given_label"],
            "suggested_label": rec["suggested_label"], "reason": rec["reason"], "group": rec["group"],
            "score": rec["score"],
            "rank": int(rec["rank"]), "info": info,
        }
        if kind == "image":
            data["image"] = data_uri(png_bytes(_item_image(images, int(row), int(related)), LS_MIN_SIDE))
        else:
            data["features"] = _features_text(features, int(row))
        tasks.append({
            "data": data,
            "predictions": [{
                "model_version": model_version,
                "score": None if score is None or (isinstance(score, float) and math.isnan(score)) else round(float(score), 6),
                "result": [{"from_name": CHOICES_CONTROL, "to_name": target, "type": "choices",
                            "value": {"choices": [rec["suggested_label"]]}}],
            }],
        })
    return tasks


# ---------------------------------------------------------------- HTML contact sheet

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin:1.2em 0 .2em} .meta{color:#555;font-size:.9em}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ccc;border-radius:6px;padding:6px;width:230px;font-size:.8em}
.card img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #eee;object-fit:contain}
.card .pair img{width:96px}
.card img.attr{width:72px;height:72px}
""" + palette.CSS + """
.id{font-family:monospace;word-break:break-all}
table.feat{font-family:monospace}
"""


def heat_map(attribution: np.ndarray) -> np.ndarray:
    """An attribution map (H x W, >= 0) as an RGB uint8 picture, scaled to its own peak (inferno)."""
    from matplotlib import colormaps

    a = np.asarray(attribution, dtype=np.float64)
    peak = float(a.max()) if a.size else 0.0
    rgba = colormaps["inferno"](a / peak if peak > 0 else a)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _prob_text(rec: dict[str, Any]) -> str:
    """`` (p=0.310)`` for a class suggestion; nothing where there is no probability (drop)."""
    p = rec.get("suggested_prob")
    return "" if p is None or pd.isna(p) else f" (p={float(p):.3f})"


def contact_sheet(table: pd.DataFrame, queue: pd.DataFrame, *, title: str, kind: str,
                  images: Optional[np.ndarray], features: Optional[pd.DataFrame], summary: str = "",
                  limit: Optional[int] = None, notes: Optional[list[str]] = None,
                  attributions: Optional[dict[int, np.ndarray]] = None) -> str:
    """An offline HTML page (images inlined as data: URIs) of the queue's top ``limit`` rows,
    one section per group (the finder that queued the rows), each with what its score means."""
    n = len(table) if limit is None else min(limit, len(table))
    # The top of each group in turn up to ``limit`` cards, so that every group is on the page.
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(table["group"].astype(str).tolist()):
        by_group.setdefault(g, []).append(i)
    shown: list[int] = []
    depth = 0
    while len(shown) < n:
        shown += [rows[depth] for rows in by_group.values() if depth < len(rows)][:n - len(shown)]
        depth += 1
    records = table.to_dict("records")
    rows_of, related_of = queue["row"].tolist(), queue["related_row"].tolist()
    sections: dict[str, list[str]] = {}
    for rec, row, related in ((records[i], rows_of[i], related_of[i]) for i in sorted(shown)):
        if kind == "image":
            pics = f'<img alt="{html.escape(rec["id"])}" src="{data_uri(png_bytes(np.asarray(images[int(row)])))}">'
            if int(related) >= 0:
                pics += (f' <img alt="{html.escape(str(rec["related_id"]))}" '
                         f'src="{data_uri(png_bytes(np.asarray(images[int(related)])))}">')
            if attributions and int(row) in attributions:
                pics += (f' <img class="attr" alt="integrated gradients of {html.escape(rec["id"])}" '
                         f'title="where the network looked (Integrated Gradients)" '
                         f'src="{data_uri(png_bytes(heat_map(attributions[int(row)])))}">')
        else:
            pics = f'<div class="feat">{html.escape(_features_text(features, int(row)))}</div>'
        partner = ""
        if int(related) >= 0:
            partner = (f'<div>near copy: <span class="id">{html.escape(str(rec["related_id"]))}</span> '
                       f'(distance {rec["distance"]:.4f})</div>')
        sections.setdefault(str(rec["group"]), []).append(
            f'<div class="card"><div class="pair">{pics}</div>'
            f'<div><b>#{rec["rank"]}</b> <span class="id">{html.escape(rec["id"])}</span> [{html.escape(rec["split"])}]</div>'
            f'<div>given <span class="given">{html.escape(str(rec["given_label"]))}</span> &rarr; '
            f'suggested <span class="suggested">{html.escape(str(rec["suggested_label"]))}</span>{_prob_text(rec)}</div>'
            f'<div>{html.escape(rec["reason"])}, score {rec["score"]:.3f}</div>{partner}'
            f'<div class="meta">{html.escape(rec["scored_by"])}</div></div>'
        )
    counts = table["group"].astype(str).value_counts().to_dict() if len(table) else {}
    body = []
    for group, cards in sections.items():
        body.append(f"<h2>{html.escape(group)} ({counts.get(group, len(cards))} queued)</h2>\n"
                    f'<p class="meta">Score: {html.escape(SCORE_MEANING.get(group, ""))}.</p>\n'
                    '<div class="grid">\n' + "\n".join(cards) + "\n</div>")
    extra = "".join(f'<p class="meta">{html.escape(t)}</p>\n' for t in (notes or []))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"meta\">{html.escape(summary)}</p>\n"
        f"<p class=\"meta\">{n} of {len(table)} queued items (the top of each group), grouped by the finder that queued them. "
        "One score ranks them all: the estimated chance that a person changes the row (#1 is the likeliest); "
        "each group says how its finder estimates it. The suggestion is the most probable class "
        'other than the given one. Given label in <span class="given">blue</span>, the suggestion in '
        '<span class="model">orange</span>; <i>drop</i> suggests removing a near copy.</p>\n' + extra + "\n".join(body) + "\n</body></html>\n"
    )
