"""What every source hands to the collect step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # annotations only: reading params (pipeline.config) imports every source module
    import numpy as np
    import pandas as pd


@dataclass
class Collected:
    """Examples as loaded: stable ids, integer labels, ordered class names, one payload.

    ``given_split`` holds the source's own split per row ("train"/"test"), or None when the
    source has none and the collect step draws the test split itself. ``skipped`` lists
    examples the source could not read, as ``{"id", "reason"}``; they count as removed.
    ``info`` says where the data came from (path, URL, checksum) for the report.
    ``text`` holds free-text columns carried with each row (never model inputs), row-aligned;
    collect runs the ``pii`` rule over them before anything is written
    (``pipeline/quality/pii.py``). An image source joining a CSV of metadata hands its text
    columns here too, with a ``pii`` field in its spec.
    """

    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    images: Optional[Any] = None  # N x H x W x C uint8: an array, or the payload already written (pipeline/payload.py)
    features: Optional[pd.DataFrame] = None  # one float column per feature
    given_split: Optional[list[str]] = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    text: Optional[pd.DataFrame] = None  # free-text columns, as strings
    # Per-row sha256 and pixel stats (``manifest.image_rows``' columns) when the source computed
    # them while decoding (imagefolder); None: collect computes them from ``images``.
    stats: Optional[pd.DataFrame] = None
