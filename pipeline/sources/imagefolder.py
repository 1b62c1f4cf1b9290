"""Images in class folders: a directory or an archive (.tar, .tar.gz/.tgz, .zip, ...).

Layouts (detected from the top-level folders):

- ``<split>/<class>/<file>`` with split in train/val/test: the folders' split is kept
  (``given_split``), val is carved from train only when there is no val folder;
- ``<class>/<file>``: no given split, the collect step draws train/val/test by ratio and seed.

A single wrapper folder around either layout (``cifar10/train/cat/...``) is looked through, so
an archive and its extracted copy give the same ids. Ids are the path relative to the data root
(``train/cat/0001.jpg``): stable across dataset versions and readable in reports.

Reading is two passes with bounded memory: pass 1 lists members (names and sizes only), then
one uint8 N x H x W x C array is allocated and pass 2 decodes each image straight into its row.
Archives are read as a stream of members (never extracted to disk); for tar that means members
are read in archive order so a compressed stream is decompressed once more, not once per file.

Nothing is dropped silently: a file that is not a readable image, sits outside the class
folders, is a hidden/system file (``.DS_Store``, ``__MACOSX/``) or has the wrong size under
``on_size_mismatch: reject`` becomes a ``skipped`` entry with its reason. An empty class folder
is an error (it almost always means a broken copy, and a class with no rows breaks training).

Speed: decoding is single-threaded. Measured on the full CIFAR-10 JPEG archive (60k 32x32
images, 2 cores): listing the .tar.gz ~1.4 s, decoding ~6 s (~10k images/s), the whole collect
step ~12 s at 0.4 GB peak RSS (bench/collect_cifar.py). A process pool was not added: each
worker would have to decompress the whole .tar.gz again (gzip cannot seek) and hand pixels
back through shared memory, for at most ~3 s saved here. Revisit for large photos, where
decoding dominates (JPEG ``draft`` already decodes them at reduced scale when resizing).
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Iterator, Literal, Optional

from pydantic import Field

from pipeline.errors import FmpipeError
from pipeline.reading import require_file
from pipeline.sources import fetch
from pipeline.sources.base import Collected
from pipeline.sources.metadata import WithMetadata

SPLITS = ("train", "val", "test")
_JUNK = ("__MACOSX", "Thumbs.db", "desktop.ini")


class Spec(WithMetadata):
    kind: Literal["imagefolder"] = "imagefolder"
    path: str  # directory or archive; relative paths are relative to the project root
    channels: Literal[1, 3] = 3  # 1: grayscale ("L"), 3: RGB; every image is converted
    size: Optional[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]] = None  # [H, W]; default: the first image's size
    on_size_mismatch: Literal["resize", "reject"] = "resize"
    # 16-bit and 32-bit integer or float images (PIL modes I;16, I, F): `scale` maps the
    # range of their type to 0..255 (16-bit: 0..65535, float: 0..1); `reject` stops collect
    # naming the first such file. Never clipped.
    high_bit_depth: Literal["scale", "reject"] = "scale"
    classes: Optional[list[str]] = Field(None, min_length=1)  # default: sorted folder names


# ---------------------------------------------------------------- readers (dir / tar / zip)

class _DirReader:
    kind = "dir"

    def __init__(self, root: Path) -> None:
        self.root = root

    def entries(self) -> tuple[list[tuple[PurePosixPath, Any]], list[PurePosixPath]]:
        files, dirs = [], []
        seen: set[str] = set()
        # Symlinked folders are followed (dataset curation often uses them), with a guard
        # against cycles; nothing is written, so there is no traversal risk to refuse here.
        for cur, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(cur)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            rel = PurePosixPath(Path(cur).relative_to(self.root).as_posix())
            if rel != PurePosixPath("."):
                dirs.append(rel)
            for name in filenames:
                files.append((rel / name, Path(cur) / name))
        return files, dirs

    def read_all(self, items: list[tuple[int, Any]]) -> Iterator[tuple[int, bytes]]:
        for row, path in items:
            with open(path, "rb") as fh:
                yield row, fh.read()

    def close(self) -> None:
        pass


class _TarReader:
    kind = "tar"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tf = tarfile.open(path, "r:*")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise fetch.corrupt(path, exc) from None

    def entries(self):
        files, dirs = [], []
        try:
            members = self.tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise fetch.corrupt(self.path, exc) from None
        for m in members:
            rel = fetch.check_tar_member(m, self.path)
            if m.isdir():
                if rel != PurePosixPath("."):
                    dirs.append(rel)
            else:
                files.append((rel, m))
        return files, dirs

    def read_all(self, items):
        # Archive order: a compressed tar is one stream, so forward-only reads decompress it once.
        for row, member in sorted(items, key=lambda it: it[1].offset_data):
            try:
                yield row, self.tf.extractfile(member).read()
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise fetch.corrupt(self.path, exc) from None

    def close(self) -> None:
        self.tf.close()


class _ZipReader:
    kind = "zip"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise fetch.corrupt(path, exc) from None

    def entries(self):
        files, dirs = [], []
        for info in self.zf.infolist():
            rel = fetch.check_zip_member(info, self.path)
            if info.is_dir():
                if rel != PurePosixPath("."):
                    dirs.append(rel)
            else:
                files.append((rel, info))
        return files, dirs

    def read_all(self, items):
        for row, info in sorted(items, key=lambda it: it[1].header_offset):
            try:
                yield row, self.zf.read(info)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                raise fetch.corrupt(self.path, exc) from None

    def close(self) -> None:
        self.zf.close()


def _open(path: Path):
    if not path.exists():
        raise FmpipeError(f"{path}: not found (imagefolder source expects a directory or an archive)")
    if path.is_dir():
        return _DirReader(path)
    require_file(path, "a directory or an archive, for the imagefolder source")  # no FIFO, no device
    kind = fetch.archive_kind(path)
    if kind == "tar":
        return _TarReader(path)
    if kind == "zip":
        return _ZipReader(path)
    raise FmpipeError(f"{path}: not a directory or a .tar/.tar.gz/.tgz/.zip archive")


# ---------------------------------------------------------------- layout

def _is_junk(rel: PurePosixPath) -> bool:
    return any(p.startswith(".") or p in _JUNK for p in rel.parts)


def _strip_wrapper(files: list[PurePosixPath]) -> tuple[int, Optional[str]]:
    """How many leading folders every path shares and the data root lies under (0 or more)."""
    depth, wrapper = 0, []
    while files:
        tops = {f.parts[depth] for f in files}
        if len(tops) != 1 or any(len(f.parts) < depth + 3 for f in files):
            break
        top = next(iter(tops))
        if top in SPLITS:
            break
        wrapper.append(top)
        depth += 1
    return depth, "/".join(wrapper) or None


def _layout(path: Path, files: list[PurePosixPath], dirs: list[PurePosixPath]):
    """(split layout?, wrapper depth, wrapper name) or an error for a mixed top level."""
    depth, wrapper = _strip_wrapper(files)
    tops = {f.parts[depth] for f in files if len(f.parts) > depth + 1}
    tops |= {d.parts[depth] for d in dirs if len(d.parts) > depth}
    split_tops = tops & set(SPLITS)
    if split_tops and tops - set(SPLITS):
        raise FmpipeError(
            f"{path}: top-level folders mix splits {sorted(split_tops)} with other folders "
            f"{sorted(tops - set(SPLITS))}; expected either <split>/<class>/<file> "
            "(split in train/val/test) or <class>/<file>"
        )
    if not tops:
        loose = sorted(f.as_posix() for f in files)
        found = (f"{len(loose)} file(s) outside any folder ({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''})"
                 if loose else "nothing")
        raise FmpipeError(f"{path}: no class folders found (found {found}); "
                          "expected <class>/<file> or <split>/<class>/<file>")
    return bool(split_tops), depth, wrapper


# ---------------------------------------------------------------- decoding

def _decode(data: bytes, channels: int, size: Optional[tuple[int, int]], reject: bool,
            high_bit_depth: str = "scale"):
    """(H x W x C uint8 array, None, resized?) or (None, reason, False); the rule is
    ``pipeline.imaging.decode``, shared with predict and serve. Raises only
    ``HighBitDepthRefused`` (collect stops on it, naming the file)."""
    from pipeline import imaging

    try:
        out = imaging.decode(data, channels, size, on_size_mismatch="reject" if reject else "resize",
                             high_bit_depth=high_bit_depth)
    except imaging.HighBitDepthRefused:
        raise
    except imaging.ImageProblem as exc:  # one recorded skip
        return None, str(exc), False
    return out.pixels, None, out.resized


# ---------------------------------------------------------------- load

def load(spec: Spec) -> Collected:
    path = Path(spec.path).expanduser()
    reader = _open(path)
    try:
        return _load(spec, path, reader)
    finally:
        reader.close()


def _load(spec: Spec, path: Path, reader) -> Collected:
    import numpy as np

    from pipeline.imaging import HighBitDepthRefused

    raw_files, raw_dirs = reader.entries()
    skipped: list[dict[str, str]] = []
    files = []
    for rel, handle in raw_files:
        if _is_junk(rel):
            skipped.append({"id": rel.as_posix(), "reason": "hidden or system file"})
        else:
            files.append((rel, handle))
    dirs = [d for d in raw_dirs if not _is_junk(d)]
    split_layout, depth, wrapper = _layout(path, [f for f, _ in files], dirs)
    class_depth = depth + (2 if split_layout else 1)  # parts up to and including the class folder

    # Which class folders exist (also the empty ones, seen only as directory entries).
    folders: set[PurePosixPath] = {PurePosixPath(*d.parts[:class_depth]) for d in dirs if len(d.parts) >= class_depth}
    rows: list[tuple[str, Optional[str], str, Any]] = []  # id, split, class, handle
    for rel, handle in files:
        rid = PurePosixPath(*rel.parts[depth:]).as_posix()
        if len(rel.parts) != class_depth + 1:
            where = "<split>/<class>/<file>" if split_layout else "<class>/<file>"
            skipped.append({"id": rid, "reason": f"not at {where}"})
            continue
        folders.add(PurePosixPath(*rel.parts[:class_depth]))
        rows.append((rid, rel.parts[depth] if split_layout else None, rel.parts[class_depth - 1], handle))

    counts = {f: 0 for f in folders}
    for rel, _ in files:
        key = PurePosixPath(*rel.parts[:class_depth])
        if len(rel.parts) == class_depth + 1:
            counts[key] += 1
    empty = sorted(f.as_posix() for f, n in counts.items() if n == 0)
    if empty:
        raise FmpipeError(f"{path}: empty class folder(s): {', '.join(empty)} (remove them or add images)")

    found = sorted({f.parts[-1] for f in folders})
    if spec.classes is not None:
        unknown = [c for c in found if c not in spec.classes]
        if unknown:
            raise FmpipeError(f"{path}: class folder(s) {unknown} are not in the params' classes list {spec.classes}")
        missing = [c for c in spec.classes if c not in found]
        if missing:
            raise FmpipeError(f"{path}: classes {missing} from params have no folder")
        classes = list(spec.classes)
    else:
        classes = found
    index = {c: i for i, c in enumerate(classes)}

    rows.sort(key=lambda r: r[0])  # stable row order whatever the archive order
    size = spec.size
    first_size = None
    if size is None and rows:
        size, first_size = _first_size(reader, rows, path)

    n = len(rows)
    images = np.empty((n, size[0], size[1], spec.channels), dtype=np.uint8) if n else None
    ok = np.zeros(n, dtype=bool)
    n_resized = 0
    reject = spec.on_size_mismatch == "reject"
    with fetch.progress(n, f"decode {path.name}", unit="img") as bar:
        for row, data in reader.read_all([(i, r[3]) for i, r in enumerate(rows)]):
            try:
                arr, reason, resized = _decode(data, spec.channels, size, reject, spec.high_bit_depth)
            except HighBitDepthRefused as exc:
                raise FmpipeError(
                    f"{path}: {rows[row][0]}: a high-bit-depth image (PIL mode {exc}) and the source "
                    "says high_bit_depth: reject (use scale to map its range to 0..255)") from None
            if arr is None:
                skipped.append({"id": rows[row][0], "reason": reason})
            else:
                images[row] = arr
                ok[row] = True
                n_resized += resized
            bar.update(1)

    keep = np.flatnonzero(ok)
    if len(keep) < n:
        # Compact in place (rows only move down), so no second N x H x W x C copy is made.
        for j, i in enumerate(keep):
            if i != j:
                images[j] = images[i]
        images = images[: len(keep)]
        rows = [rows[i] for i in keep]
    if not rows:
        reasons = {}
        for skip in skipped:
            reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
        found = "; ".join(f"{n} x {reason}" for reason, n in sorted(reasons.items())) or "nothing"
        raise FmpipeError(f"{path}: no readable images; found {len(skipped)} other file(s): {found}")
    labels = np.array([index[r[2]] for r in rows], dtype=np.int64)
    empty_classes = [c for i, c in enumerate(classes) if not (labels == i).any()]
    if empty_classes:
        raise FmpipeError(f"{path}: class(es) {empty_classes} have no readable images")

    info: dict[str, Any] = {
        "source": "imagefolder",
        "path": str(spec.path),
        "format": reader.kind,
        "layout": "<split>/<class>/<file>" if split_layout else "<class>/<file>",
        "wrapper_folder": wrapper,
        "image_size": list(size),
        "channels": spec.channels,
        "size_from": "params" if spec.size is not None else f"first image {first_size}",
        "resized": int(n_resized),
    }
    if reader.kind != "dir":
        info["sha256"] = fetch.digest(path, "sha256")
    return Collected(
        ids=[r[0] for r in rows],
        labels=labels,
        classes=classes,
        images=images,
        given_split=[r[1] for r in rows] if split_layout else None,
        skipped=skipped,
        info=info,
    )


def _first_size(reader, rows, path: Path) -> tuple[tuple[int, int], str]:
    """The size of the first readable image in id order: the default ``size``."""
    from PIL import Image

    for rid, _, _, handle in rows:
        data = next(reader.read_all([(0, handle)]))[1]
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            return (h, w), rid
        except Exception:
            continue  # unreadable: pass 2 records it as a skip
    ids = [r[0] for r in rows]
    raise FmpipeError(f"{path}: no readable images; found {len(ids)} file(s) in class folders, none of them "
                      f"an image Pillow can read ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})")
