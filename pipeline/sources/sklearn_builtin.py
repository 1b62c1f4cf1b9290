"""Datasets that ship inside scikit-learn: they work offline (the embedded default).

- ``digits``: 1,797 real 8x8 grayscale handwritten digits, 10 classes; pixel values 0..16
  are rescaled to uint8 0..255.
- ``iris``: 150 rows, 4 numeric features, 3 classes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from pipeline.schema import Strict
from pipeline.sources.base import Collected


class Spec(Strict):
    kind: Literal["sklearn"] = "sklearn"
    dataset: Literal["digits", "iris"]


def load(spec: Spec) -> Collected:
    import sklearn
    from sklearn import datasets

    info = {"source": f"sklearn.datasets.load_{spec.dataset}", "sklearn_version": sklearn.__version__}
    if spec.dataset == "digits":
        bunch = datasets.load_digits()
        pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        return Collected(
            ids=[f"digits/{i:04d}" for i in range(len(pixels))],
            labels=bunch.target.astype(np.int64),
            classes=[str(c) for c in bunch.target_names],
            images=pixels[..., None],
            info=info,
        )
    bunch = datasets.load_iris()
    names = [n.replace(" (cm)", "_cm").replace(" ", "_") for n in bunch.feature_names]
    return Collected(
        ids=[f"iris/{i:03d}" for i in range(len(bunch.target))],
        labels=bunch.target.astype(np.int64),
        classes=[str(c) for c in bunch.target_names],
        features=pd.DataFrame(bunch.data.astype(np.float64), columns=names),
        info=info,
    )
