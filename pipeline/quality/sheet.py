"""The contact sheet: flagged pairs side by side in one self-contained HTML page.

Every image is inlined as a ``data:image/png`` URI and the styles are inline, so the page
opens offline from anywhere (a CI artefact, a mail attachment) and makes no request. Pairs
are sorted by distance (closest first) and capped at ``max_pairs``; the page says how many
there were in all. Single-image findings (blank, exposure, shape) follow in their own grid.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
import pandas as pd

SHEET = "contact_sheet.html"


def png_data_uri(image: np.ndarray, scale: int = 1) -> str:
    from PIL import Image

    img = image[..., 0] if image.shape[-1] == 1 else image
    pil = Image.fromarray(np.ascontiguousarray(img))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, "PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _scale_for(shape: tuple[int, ...]) -> int:
    """Upscale tiny images (8x8 digits, 32x32 CIFAR) so a person can see them."""
    return max(1, 96 // max(shape[0], shape[1]))


def render(title: str, findings: pd.DataFrame, images_by_id: dict[str, np.ndarray],
           classes: list[str], max_pairs: int = 300, facts: dict[str, Any] | None = None) -> str:
    """The page. ``images_by_id``: every image a drawn finding names (input ids)."""
    esc = html.escape
    pairs = findings[findings["other_id"].notna() & findings["id"].astype(str).isin(images_by_id)
                     & findings["other_id"].astype(str).isin(images_by_id)]
    pairs = pairs.sort_values(["distance", "rule", "id"], kind="stable")
    items = findings[findings["other_id"].isna() & findings["id"].astype(str).isin(images_by_id)]
    shown = pairs.head(max_pairs)
    shown_items = items.head(max_pairs)

    def label(v) -> str:
        return "?" if pd.isna(v) else (f"{int(v)} {classes[int(v)]}" if 0 <= int(v) < len(classes) else str(int(v)))

    def figure(image_id: str, split: str, lab, action: str | None) -> str:
        img = images_by_id[image_id]
        cls = f' class="{esc(action)}"' if action else ""
        # Native-size PNG, enlarged by the browser (pixelated): a third of the bytes of an
        # upscaled PNG, and the page lands in the DVC cache with every clean run.
        k = _scale_for(img.shape)
        return (f'<figure{cls}><img src="{png_data_uri(img)}" width="{img.shape[1] * k}" '
                f'height="{img.shape[0] * k}" alt="{esc(image_id)}">'
                f'<figcaption>{esc(image_id)}<br>{esc(str(split))} · {esc(label(lab))}</figcaption></figure>')

    rows = []
    for f in shown.itertuples(index=False):
        rows.append(
            f'<div class="pair" data-rule="{esc(f.rule)}" data-action="{esc(f.action)}">'
            f'{figure(str(f.id), f.split, f.label, f.action)}'
            f'{figure(str(f.other_id), f.other_split, f.other_label, None)}'
            f'<div class="meta"><b>{esc(f.rule)}</b><br>distance {f.distance:.4f}<br>'
            f'action on left: <b>{esc(f.action)}</b><br>{esc(str(f.detail or ""))}</div></div>')
    singles = []
    for f in shown_items.itertuples(index=False):
        singles.append(f'<div class="item" data-rule="{esc(f.rule)}">{figure(str(f.id), f.split, f.label, f.action)}'
                       f'<div class="meta"><b>{esc(f.rule)}</b> · {esc(f.action)}<br>{esc(str(f.detail or ""))}</div></div>')
    counts = findings.groupby(["rule", "action"]).size() if len(findings) else pd.Series(dtype=int)
    summary = "".join(f"<li>{esc(r)}: {n} ({esc(a)})</li>" for (r, a), n in counts.items()) or "<li>nothing flagged</li>"
    fact_html = "".join(f"<li>{esc(str(k))}: {esc(str(v))}</li>" for k, v in (facts or {}).items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:16px;color:#222}}
.pairs{{display:flex;flex-wrap:wrap;gap:12px}}
.pair,.item{{display:flex;gap:6px;border:1px solid #ccc;border-radius:6px;padding:6px;background:#fafafa}}
figure{{margin:0;text-align:center;font-size:11px;max-width:130px;word-break:break-all}}
figure img{{display:block;margin:auto;image-rendering:pixelated}}
figure.drop img{{outline:3px solid #c00}} figure.flag img{{outline:3px solid #e90}}
.meta{{font-size:12px;max-width:170px}}
</style></head><body>
<h1>{esc(title)}</h1>
<ul>{fact_html}</ul>
<h2>Findings by rule</h2><ul>{summary}</ul>
<h2 id="pairs">Pairs: <span id="pair-count">{len(shown)}</span> shown of {len(pairs)}</h2>
<p>Left: the row the action applies to (red outline: dropped, orange: flagged); right: the copy that stays.</p>
<div class="pairs">{''.join(rows)}</div>
<h2 id="items">Single images: <span id="item-count">{len(shown_items)}</span> shown of {len(items)}</h2>
<div class="pairs">{''.join(singles)}</div>
</body></html>
"""
