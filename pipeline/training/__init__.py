"""Training: a LightningModule around any plain network, an on-device data module, ``fit``.

- :func:`fit` (``pipeline.training.fit``): ``fit(dataset, variant_spec, out_dir, resume=False)``
  trains and writes the model; its docstring documents the output and run-state layout.
- :class:`~pipeline.training.module.ClassifierModule`: loss, metrics, optimizer, LR schedule.
- :class:`~pipeline.training.data.TensorDataModule` / ``BatchStream``: whole splits as tensors on
  the device, batches by index, per-batch augmentation, DDP sharding.

Importing this package is cheap; ``lightning`` is imported when ``fit`` runs.
"""

from __future__ import annotations

from typing import Any


def fit(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See :func:`pipeline.training.fit.fit`."""
    from pipeline.training.fit import fit as _fit

    return _fit(*args, **kwargs)
