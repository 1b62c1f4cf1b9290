"""The most confident mistakes on the test split, as one self-contained HTML page.

Each card shows the image (inlined as a ``data:`` PNG URI, upscaled with nearest-neighbour so
8x8 digits are visible), its id, the given label, the predicted label and the confidence.
No external resources: the file opens offline and can be embedded or attached as it is.
Wrong labels in the data often show up here first (a confident "mistake" is frequently a
mislabelled example), which is why review and annotation read it too.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from pipeline import palette

MIN_SIDE = 96


def confident_mistakes(labels: np.ndarray, probs: np.ndarray, limit: int) -> np.ndarray:
    """Row indices of wrong predictions, most confident first (ties: lower row first)."""
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != labels)
    conf = probs[wrong, pred[wrong]]
    order = np.lexsort((wrong, -conf))
    return wrong[order][:limit]


def png_data_uri(image: np.ndarray) -> str:
    """H x W x C uint8 -> ``data:image/png;base64,...``, upscaled to at least MIN_SIDE pixels."""
    from PIL import Image

    arr = image[..., 0] if image.shape[-1] == 1 else image
    im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L" if arr.ndim == 2 else "RGB")
    scale = max(1, -(-MIN_SIDE // max(im.size)))
    if scale > 1:
        im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_gallery(*, variant: str, images: np.ndarray, ids: list[str], labels: np.ndarray,
                   probs: np.ndarray, classes: list[str], limit: int = 24, n_test: int | None = None) -> str:
    rows = confident_mistakes(np.asarray(labels), probs, limit)
    n_wrong = int((probs.argmax(axis=1) != np.asarray(labels)).sum())
    esc = html.escape
    cards: list[str] = []
    for r in rows:
        p = int(probs[r].argmax())
        cards.append(
            '<figure class="card">'
            f'<img src="{png_data_uri(images[r])}" alt="{esc(str(ids[r]))}">'
            f'<figcaption><b class="id">{esc(str(ids[r]))}</b><br>'
            f'given <span class="given">{esc(classes[int(labels[r])])}</span><br>'
            f'predicted <span class="pred">{esc(classes[p])}</span> '
            f'<span class="conf">{probs[r, p]:.3f}</span></figcaption></figure>'
        )
    body = "\n".join(cards) if cards else '<p class="none">No mistakes on the test split.</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{esc(variant)}: most confident mistakes</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ margin: 0; padding: 8px; border: 1px solid #ddd; border-radius: 6px; width: 150px; font-size: 13px; }}
.card img {{ display: block; max-width: 134px; image-rendering: pixelated; margin-bottom: 6px; }}
{palette.CSS} .conf {{ font-variant-numeric: tabular-nums; }}
</style></head><body>
<h1>{esc(variant)}: most confident mistakes</h1>
<p>{n_wrong} wrong predictions on the test split{f' of {n_test}' if n_test is not None else ''}; showing the
{len(rows)} with the highest confidence in the wrong class. Confidence is after temperature scaling
(if enabled). A confident mistake is often a wrong label in the data.</p>
<div class="grid">
{body}
</div></body></html>
"""
