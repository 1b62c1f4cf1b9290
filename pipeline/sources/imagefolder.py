"""Images in class folders: a directory or an archive (.tar, .tar.gz/.tgz, .zip, ...).

Layouts (detected from the top-level folders):

- ``<split>/<class>/<file>`` with split in train/val/test: the folders' split is kept
  (``given_split``), val is carved from train only when there is no val folder;
- ``<class>/<file>``: no given split, the collect step draws train/val/test by ratio and seed.

A single wrapper folder around either layout (``cifar10/train/cat/...``) is looked through, so
an archive and its extracted copy give the same ids. Ids are the path relative to the data root
(``train/cat/0001.jpg``): stable across dataset versions and readable in reports.

Reading is two passes with bounded memory: pass 1 lists members (names and sizes only), pass 2
reads the files in chunks of bounded bytes and hands each chunk to the engine
(``pipeline.engine.map_ordered``: decode, resize, sha256 and stats, a pure function of the
chunk), writing the decoded rows in id order straight into the output's payload
(``pipeline.payload.PayloadWriter``: ``images.npy``, or shards for large data), so no array
of all rows is ever in memory. Archives are read as a stream of members (never extracted to
disk); for tar that means members are read in archive order so a compressed stream is
decompressed once more, not once per file; when that order is not id order, decoded rows go
to a scratch file at their row's offset first and are copied out in id order.

Nothing is dropped silently: a file that is not a readable image, sits outside the class
folders, is a hidden/system file (``.DS_Store``, ``__MACOSX/``) or has the wrong size under
``on_size_mismatch: reject`` becomes a ``skipped`` entry with its reason. An empty class folder
is an error (it almost always means a broken copy, and a class with no rows breaks training).

Speed: decoding runs on the step's engine (``local``: this process). Measured on the full CIFAR-10 JPEG archive (60k 32x32
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

    def order(self, items):
        return items

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

    def order(self, items):
        # Archive order: a compressed tar is one stream, so forward-only reads decompress it once.
        return sorted(items, key=lambda it: it[1].offset_data)

    def read_all(self, items):
        for row, member in self.order(items):
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

    def order(self, items):
        return sorted(items, key=lambda it: it[1].header_offset)

    def read_all(self, items):
        for row, info in self.order(items):
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

def load(spec: Spec, out: Optional[Path] = None, engine: str = "local") -> Collected:
    """``out``: the dataset directory being written (collect's temporary output): the pixels
    go there as they are decoded. None: they come back as one array (tests, small data)."""
    path = Path(spec.path).expanduser()
    reader = _open(path)
    try:
        return _load(spec, path, reader, out, engine)
    finally:
        reader.close()


def decode_chunk(job: tuple) -> tuple:
    """Decode one chunk of files: ``job`` = (rows, raw bytes, channels, size, reject,
    high_bit_depth). Returns (rows decoded, their pixels, [(row, skip reason)], resized
    count, ``row_stats`` of the pixels, refused) where refused is (row, PIL mode) of a
    high-bit-depth image under ``reject`` (the caller stops on it), else None.
    Pure and module-level: any engine can run it on any worker."""
    import numpy as np

    from pipeline.imaging import HighBitDepthRefused
    from pipeline.manifest import row_stats

    rows, datas, channels, size, reject, high_bit_depth = job
    good, pixels, skips, n_resized = [], [], [], 0
    for row, data in zip(rows, datas):
        try:
            arr, reason, resized = _decode(data, channels, size, reject, high_bit_depth)
        except HighBitDepthRefused as exc:
            return [], None, [], 0, None, (row, str(exc))
        if arr is None:
            skips.append((row, reason))
        else:
            good.append(row)
            pixels.append(arr)
            n_resized += resized
    block = np.stack(pixels) if pixels else np.zeros((0, size[0], size[1], channels), np.uint8)
    return good, block, skips, n_resized, row_stats(block), None


def _chunks(reader, items, spec, size, raw_budget: int, rows_budget: int):
    """Jobs for ``decode_chunk``: files in the reader's order, at most ``rows_budget`` rows
    and about ``raw_budget`` bytes of encoded data each."""
    rows, datas, raw = [], [], 0
    for row, data in reader.read_all(items):
        rows.append(row)
        datas.append(data)
        raw += len(data)
        if len(rows) >= rows_budget or raw >= raw_budget:
            yield rows, datas, spec.channels, size, spec.on_size_mismatch == "reject", spec.high_bit_depth
            rows, datas, raw = [], [], 0
    if rows:
        yield rows, datas, spec.channels, size, spec.on_size_mismatch == "reject", spec.high_bit_depth


class _ArraySink:
    """The payload as one in-memory array (``load`` without an output directory)."""

    def __init__(self, row_shape):
        self.row_shape, self.blocks = tuple(row_shape), []

    def append(self, block) -> None:
        self.blocks.append(block)

    def close(self):
        import numpy as np

        return np.concatenate(self.blocks) if self.blocks else np.zeros((0, *self.row_shape), np.uint8)

    def abort(self) -> None:
        self.blocks = []


def _load(spec: Spec, path: Path, reader, out: Optional[Path] = None, engine: str = "local") -> Collected:
    import numpy as np

    from pipeline import payload as P
    from pipeline.engine import local_threads, map_ordered
    from pipeline.manifest import row_stats, stats_frame

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
    if not n:
        raise _no_images(path, skipped)
    row_shape = (size[0], size[1], spec.channels)
    row_bytes = int(np.prod(row_shape))
    items = [(i, r[3]) for i, r in enumerate(rows)]
    # Rows come back in the reader's order: id order for folders, archive order for archives.
    in_order = [i for i, _ in reader.order(items)] == list(range(n))
    sink = P.PayloadWriter(out, row_shape) if out is not None else _ArraySink(row_shape)
    scratch = None
    if not in_order:
        import tempfile

        scratch = tempfile.TemporaryFile(dir=out)  # decoded rows at their row's offset
    ok = np.zeros(n, dtype=bool)
    parts = []  # row_stats of the rows, block by block in id order
    n_resized = 0
    jobs = _chunks(reader, items, spec, size, 2 * P.TASK_BYTES, P.rows_per(row_bytes, P.TASK_BYTES))
    try:
        with fetch.progress(n, f"decode {path.name}", unit="img") as bar:
            # Decoding (PIL) and the rows' stats (numpy) release the GIL: on the local engine
            # one thread per CPU (224 px: 1.5-1.7x on 2 cores; bench/README.md), the same bytes.
            decoded = map_ordered(decode_chunk, jobs, engine, threads=local_threads())
            for good, block, skips, resized, stats, refused in decoded:
                if refused is not None:
                    raise FmpipeError(
                        f"{path}: {rows[refused[0]][0]}: a high-bit-depth image (PIL mode {refused[1]}) and the "
                        "source says high_bit_depth: reject (use scale to map its range to 0..255)")
                skipped.extend({"id": rows[row][0], "reason": reason} for row, reason in skips)
                ok[good] = True
                n_resized += resized
                if scratch is None:
                    sink.append(block)
                    parts.append(stats)
                else:
                    for row, pixels in zip(good, block):
                        os.pwrite(scratch.fileno(), pixels.tobytes(), row * row_bytes)
                bar.update(len(good) + len(skips))
            if scratch is not None:  # copy the decoded rows out in id order
                keep = np.flatnonzero(ok)
                step = P.rows_per(row_bytes, P.CHUNK_BYTES)
                for start in range(0, len(keep), step):
                    block = np.stack([np.frombuffer(os.pread(scratch.fileno(), row_bytes, int(r) * row_bytes),
                                                    np.uint8).reshape(row_shape) for r in keep[start:start + step]])
                    sink.append(block)
                    parts.append(row_stats(block))
        images = sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        if scratch is not None:
            scratch.close()
    if out is not None:
        images = read_written(out, images, row_shape)
    keep = np.flatnonzero(ok)
    rows = [rows[i] for i in keep]
    stats = stats_frame(parts, row_shape)
    if not rows:
        raise _no_images(path, skipped)
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
        stats=stats,
        given_split=[r[1] for r in rows] if split_layout else None,
        skipped=skipped,
        info=info,
    )


def _no_images(path: Path, skipped: list[dict[str, str]]) -> FmpipeError:
    reasons: dict[str, int] = {}
    for skip in skipped:
        reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
    found = "; ".join(f"{n} x {reason}" for reason, n in sorted(reasons.items())) or "nothing"
    return FmpipeError(f"{path}: no readable images; found {len(skipped)} other file(s): {found}")


def read_written(out: Path, shards, row_shape):
    """The payload ``PayloadWriter`` just wrote into ``out``, as ``Dataset.images``."""
    import numpy as np

    from pipeline import payload as P

    if shards:
        return P.open_shards(out, shards, tuple(row_shape))
    return np.load(out / P.IMAGES, mmap_mode="r", allow_pickle=False)


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
