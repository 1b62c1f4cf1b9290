"""matplotlib figures drawn off-screen and saved as reproducible PNG bytes.

Every picture fmpipe draws with matplotlib (the report's plots, evaluate's slices,
robustness and attribution figures) is made and saved here: a bare ``Figure`` on the Agg
backend (no pyplot, so no global state and nothing left open between calls), saved without
the software tag, so the same data and matplotlib version give the same bytes and DVC sees
no change where nothing changed.
"""

from __future__ import annotations

import io

# Sized for a report column (about 760 px wide at 100 dpi); text stays readable when a
# browser scales the picture down.
DPI = 100


def new_figure(width: float, height: float):
    """A figure of ``width`` x ``height`` inches at ``DPI``; add axes with ``add_subplot`` or ``subplots``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def png_bytes(fig, tight: bool = False) -> bytes:
    """The figure as PNG bytes, with no timestamp or software tag; ``tight`` crops to the drawn area."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, **({"bbox_inches": "tight"} if tight else {}))
    return buf.getvalue()
