"""Data sources: one module per kind of source, one output (``Collected``) for all.

Each module defines ``Spec`` (its params section, with a literal ``kind``) and
``load(spec) -> Collected``. The collect step turns a ``Collected`` into the dataset
contract (splits, hashes, stats, manifest); sources only load and label.
Heavy imports (numpy, pandas, scikit-learn, Pillow) happen inside the functions that use them:
reading params (``pipeline.config``, every step's start) imports these modules for their ``Spec``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional, Union

from pydantic import Field

from pipeline.errors import FmpipeError
from pipeline.sources import cifar10, csv, imagefolder, mnist, sklearn_builtin
from pipeline.sources.base import Collected
from pipeline.steps import SOURCE, at

_MODULES = {m.Spec.model_fields["kind"].default: m for m in (sklearn_builtin, cifar10, mnist, imagefolder, csv)}

SourceSpec = Annotated[
    Union[tuple(m.Spec for m in _MODULES.values())],  # type: ignore[valid-type]
    Field(discriminator="kind"),
]


def load(spec, out: Optional[Path] = None, engine: str = "local") -> Collected:
    """``out``: collect's output directory; a source that decodes images (imagefolder) writes
    the pixels there as it goes, on ``engine`` (``pipeline.engine``). The others load in memory."""
    if spec.kind == "imagefolder":
        return imagefolder.load(spec, out=out, engine=engine)
    return _MODULES[spec.kind].load(spec)


def tracked_path(variant: str) -> Path:
    """dvc.yaml's dependency of collect: the one path per variant that DVC hashes for its source."""
    return at(SOURCE, variant)


def local_path(spec) -> Optional[str]:
    """The local file or folder ``spec`` reads whose content no checksum pins, or None.

    Image folders, archives and CSVs are read as they are; a CIFAR-10/MNIST copy is checked
    against the official md5 (or the one params give) unless ``verify: false``.
    """
    path = getattr(spec, "path", None)
    if path is None:
        return None
    if spec.kind in ("cifar10", "mnist") and spec.verify:
        return None
    return path


def data_needed(spec) -> Optional[str]:
    """What must be fetched or present before collect can run, or None (ships or is generated)."""
    path = getattr(spec, "path", None)
    if spec.kind == "sklearn":
        return None
    if path is not None:
        where = os.path.expanduser(path)
        return None if os.path.exists(where) else f"{path} (not found here)"
    url = getattr(spec, "url", None) or (spec.mirrors[0] if getattr(spec, "mirrors", None) else "its official files")
    return f"downloads {url} (network), or set source.path to a local copy"


def _hashed_by_dvc(path: str, tracked: Path, key: str) -> bool:
    """Whether DVC's hash of ``tracked`` covers ``path``: the same file or folder (``tracked``
    may be a link to it), or a file or link inside the ``tracked`` folder, which DVC hashes
    through the link."""
    given = os.path.abspath(os.path.expanduser(path))
    real = os.path.realpath(given)
    root = os.path.realpath(tracked)
    if real == root or real.startswith(root + os.sep):
        return True
    # The path as written, inside the tracked folder (itself possibly a link). DVC follows a
    # link to a file there but not a link to a folder: files behind one would go unseen.
    inside = os.path.abspath(tracked)
    if not given.startswith(inside + os.sep):
        return False
    part = inside
    for name in os.path.relpath(given, inside).split(os.sep):
        part = os.path.join(part, name)
        if os.path.islink(part) and os.path.isdir(part):
            raise FmpipeError(
                f"{key}: {path} goes through a link to a folder inside {tracked}/, which DVC does "
                f"not follow, so a change to its files would go unseen; link an archive of the "
                f"folder there instead, or make the folder a variant of its own "
                f"(`fmpipe variant add NAME --source {os.path.realpath(part)}`)")
    return True


def check_tracked(spec, variant: str) -> None:
    """Under ``dvc repro``: refuse a local source or metadata table DVC does not hash (changes
    would go unseen)."""
    tracked = tracked_path(variant)
    meta = getattr(spec, "metadata", None)
    for key, path in (("source.path", local_path(spec)), ("source.metadata.path", meta and meta.path)):
        if path is None or _hashed_by_dvc(path, tracked, f"variants.{variant}.{key}"):
            continue
        if key == "source.path":
            where = os.path.abspath(os.path.expanduser(path))
            # Never a link over a file: `dvc exp run` restores a committed file that became a
            # link by writing it through the link (sources/README.md). Into a note's folder;
            # over a link (re-pointing a committed link is safe) or where nothing is yet.
            link = tracked / os.path.basename(where) if tracked.exists() and not tracked.is_symlink() else tracked
            first = (f"make {tracked} a folder (its note as {tracked}/README.md), then "
                     if tracked.is_file() and not tracked.is_symlink() else "")
            raise FmpipeError(
                f"variants.{variant}.{key}: {path} is not {tracked} or inside it, the path dvc.yaml "
                f"tracks for collect@{variant}, so DVC would not see a change to it; {first}link it "
                f"(`ln -sfn {where} {link}`) and set path: {link}")
        raise FmpipeError(
            f"variants.{variant}.{key}: {path} is not inside {tracked}/, the path dvc.yaml tracks for "
            f"collect@{variant}, so DVC would not see a change to it; make {tracked} a folder holding "
            f"the table (and the source's link or note) and point the path there")


__all__ = ["Collected", "SourceSpec", "check_tracked", "data_needed", "load", "local_path", "tracked_path"]
