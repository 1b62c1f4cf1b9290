"""Data sources: one module per kind of source, one output (``Collected``) for all.

Each module defines ``Spec`` (its params section, with a literal ``kind``) and
``load(spec) -> Collected``. The collect step turns a ``Collected`` into the dataset
contract (splits, hashes, stats, manifest); sources only load and label.
Heavy imports (scikit-learn, Pillow) happen inside ``load`` so that reading params stays fast.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from pipeline.sources import cifar10, csv, imagefolder, mnist, sklearn_builtin
from pipeline.sources.base import Collected

_MODULES = {m.Spec.model_fields["kind"].default: m for m in (sklearn_builtin, cifar10, mnist, imagefolder, csv)}

SourceSpec = Annotated[
    Union[tuple(m.Spec for m in _MODULES.values())],  # type: ignore[valid-type]
    Field(discriminator="kind"),
]


def load(spec) -> Collected:
    return _MODULES[spec.kind].load(spec)


__all__ = ["Collected", "SourceSpec", "load"]
