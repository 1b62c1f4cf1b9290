"""An image dataset's pixels on disk: one ``images.npy`` or fixed-size shards, one way to read them.

Layouts (both uint8 N x H x W x C rows, in manifest order):

- ``images.npy``: one array, when the whole payload fits one shard (at most
  ``shard_bytes()``, 1 GiB by default). ``read_dataset`` memory-maps it (``np.memmap``), so a
  step that reads it whole holds at most one shard's worth of file pages.
- ``images/shard-00000.npy``, ``shard-00001.npy``, ...: every shard ``rows_per_shard`` rows
  (the last fewer), each a plain ``.npy`` file with its own sha256 in ``dataset.json``
  (``files``) and its row count in ``shards``. Read with explicit reads of the rows asked for
  (:class:`Images`), never mapped whole, so resident memory stays that of the rows in hand
  whatever the payload's size.

Why decoded uint8 and not the encoded files (JPEG/PNG, 5-10x smaller on disk): every reader
(clean's embedder, training, batch inference) wants pixels by row range or row index; a
decoded row is a seek and a read, an encoded one costs a decode (at 224 x 224 JPEG ~1-2 ms per
image per core: more than the model's forward pass on a GPU) on every epoch, and the row's
sha256 (``manifest.sha256``) is of the pixels either way. The price is disk: 150 KB per
224 x 224 RGB row. Shards of ~1 GiB keep DVC's file count low (1M rows at 224 px: ~140 files;
DVC is slow on folders of very many small files, iterative/dvc#7607) and each shard small
enough to hash, push and pull on its own.

The one contract every reader uses, whichever the layout (``Dataset.images``): ``len``,
``.shape``, ``.dtype``, ``.ndim``, ``images[a:b]``, ``images[int_array]`` (sorted reads
fastest), ``images[i]``, ``np.asarray(images)`` (materialises: small data only) and
:func:`chunks` (row blocks of bounded bytes). ``Dataset.take`` of a file-backed payload gives a
lazy :class:`Images` view (a row index, nothing read); reading happens when rows are asked for.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

IMAGES = "images.npy"
SHARD_DIR = "images"
SHARD_NAME = "shard-{:05d}.npy"
# Decoded bytes per shard. 1 GiB: large enough that 1M rows at 224 px are ~140 files, small
# enough that one shard (and the single-file layout, which is memory-mapped) stays far under
# a step's 4 GB. FMPIPE_SHARD_BYTES overrides it (tests use a tiny value to get shards from
# tiny data); the layout never changes a row's bytes, only how they are cut into files.
SHARD_BYTES = 1 << 30
SHARD_BYTES_ENV = "FMPIPE_SHARD_BYTES"
# Bytes of pixels handed around at once by the chunked readers and writers: a few per step.
CHUNK_BYTES = 64 << 20
# Bytes of pixels per engine task that also makes float64 temporaries (per-row stats: 8x):
# collect's decode chunks and image_rows' blocks. 8 MB: ~2,700 rows at 32 px, 53 at 224 px.
TASK_BYTES = 8 << 20


def shard_bytes() -> int:
    value = os.environ.get(SHARD_BYTES_ENV)
    return int(value) if value else SHARD_BYTES


def rows_per(row_bytes: int, budget: int) -> int:
    """Rows of ``row_bytes`` each that fit ``budget`` bytes (at least one)."""
    return max(1, int(budget) // max(1, int(row_bytes)))


def row_bytes(images: Any) -> int:
    return int(np.prod(images.shape[1:], dtype=np.int64)) * np.dtype(images.dtype).itemsize


def chunk_rows(images: Any, max_bytes: int = CHUNK_BYTES) -> int:
    """How many rows of ``images`` make one chunk of at most ``max_bytes`` (at least one)."""
    return rows_per(row_bytes(images), max_bytes)


def chunks(images: Any, max_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """Consecutive row blocks of any payload (ndarray, memmap, :class:`Images`) as arrays."""
    step = chunk_rows(images, max_bytes)
    images = view(images)
    for start in range(0, len(images), step):
        yield np.asarray(images[start:start + step])


def view(images: Any) -> Any:
    """``images`` to read rows from: the memory map of a whole ``images.npy`` becomes a view
    reading it with positioned reads. Pages touched through a map stay in the process's
    resident set (ru_maxrss) until unmapped, so a pass over a 1 GiB file would "use" 1 GiB;
    reads into a block buffer keep only the block."""
    files = file_of(images)
    if files is None:
        return images
    shape, dtype, offset = read_header(files[0])
    return Images(_ShardStore(files, [shape[0]], shape[1:], dtype, [offset]))


# ---------------------------------------------------------------- .npy headers

def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The bytes ``np.save`` writes before the data of a C-ordered array (format 1.0)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def read_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a ``.npy`` file; ValueError when it is not one."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if fortran or dtype.hasobject:
            raise ValueError("not a C-ordered plain array")
        return tuple(shape), dtype, fh.tell()


# ---------------------------------------------------------------- stores: where rows come from

class _ArrayStore:
    """Rows of one array (in memory, or ``np.memmap`` of ``images.npy``)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.n = len(array)
        self.row_shape = tuple(array.shape[1:])
        self.dtype = array.dtype

    def read_range(self, a: int, b: int) -> np.ndarray:
        return np.array(self.array[a:b])

    def read_sorted(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            return self.read_range(int(rows[0]), int(rows[-1]) + 1)
        return np.asarray(self.array[rows])

    def files(self) -> Optional[list[Path]]:
        return file_of(self.array)


class _ShardStore:
    """Rows of a sharded payload, read with positioned reads (no mapping of whole shards)."""

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], row_shape: tuple[int, ...],
                 dtype: np.dtype, offsets: Sequence[int]):
        self.paths = [Path(p) for p in paths]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.offsets = list(offsets)
        self.n = int(self.starts[-1])
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def _read_run(self, shard: int, a: int, b: int, out: np.ndarray) -> None:
        """Rows a..b-1 of one shard (shard-local) into ``out``."""
        with open(self.paths[shard], "rb") as fh:
            fh.seek(self.offsets[shard] + a * self.row_bytes)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = fh.readinto(view)
        if got != (b - a) * self.row_bytes:
            raise OSError(f"{self.paths[shard]}: short read ({got} of {(b - a) * self.row_bytes} bytes)")

    def read_range(self, a: int, b: int) -> np.ndarray:
        return self.read_sorted(np.arange(a, b, dtype=np.int64))

    def read_sorted(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        if not len(rows):
            return out
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        # Runs of consecutive rows within one shard: one read each.
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(shard_of) != 0)) + 1
        for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            s = int(shard_of[lo])
            a = int(rows[lo] - self.starts[s])
            self._read_run(s, a, a + int(hi - lo), out[lo:hi])
        return out

    def files(self) -> Optional[list[Path]]:
        return list(self.paths)


class _ConcatStore:
    """Rows of several payloads one after the other (a dataset plus rows appended to it),
    each read only when its rows are asked for."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        self.row_shape = tuple(self.parts[0].shape[1:])
        self.dtype = np.dtype(self.parts[0].dtype)
        for part in self.parts[1:]:
            if tuple(part.shape[1:]) != self.row_shape or np.dtype(part.dtype) != self.dtype:
                raise ValueError(f"cannot append rows of {part.dtype} {tuple(part.shape[1:])} to rows of "
                                 f"{self.dtype} {self.row_shape}")
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.n = int(self.starts[-1])

    def read_range(self, a: int, b: int) -> np.ndarray:
        return self.read_sorted(np.arange(a, b, dtype=np.int64))

    def read_sorted(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        bounds = np.searchsorted(rows, self.starts)
        for i, part in enumerate(self.parts):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi > lo:
                local = rows[lo:hi] - self.starts[i]
                if local[-1] - local[0] + 1 == len(local):
                    out[lo:hi] = part[int(local[0]):int(local[-1]) + 1]
                else:
                    out[lo:hi] = part[local]
        return out

    def files(self) -> Optional[list[Path]]:
        return None


def concat(*parts: Any) -> "Images":
    """The rows of ``parts`` one after the other, as a lazy view: appending a few rows to a
    large payload reads it block by block when written, never whole into memory."""
    return Images(_ConcatStore(parts))


def file_of(array: Any) -> Optional[list[Path]]:
    """``[images.npy]`` when ``array`` is the whole memory-mapped file (nothing sliced), else None."""
    if not isinstance(array, np.memmap) or getattr(array, "filename", None) is None:
        return None
    try:
        shape, dtype, offset = read_header(array.filename)
    except (OSError, ValueError):
        return None
    if tuple(array.shape) == shape and array.dtype == dtype and array.offset == offset:
        return [Path(array.filename)]
    return None


# ---------------------------------------------------------------- the view

class Images:
    """A lazy, read-only view of image rows: a store plus (optionally) which of its rows."""

    def __init__(self, store, index: Optional[np.ndarray] = None):
        self._store = store
        self._index = None if index is None else np.asarray(index, dtype=np.int64)

    # -- array-like surface
    def __len__(self) -> int:
        return self._store.n if self._index is None else len(self._index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._store.row_shape)

    @property
    def dtype(self) -> np.dtype:
        return self._store.dtype

    @property
    def ndim(self) -> int:
        return 1 + len(self._store.row_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * row_bytes(self)

    def __repr__(self) -> str:
        return f"Images(shape={self.shape}, dtype={self.dtype}, {'all rows' if self._index is None else 'row view'})"

    def __array__(self, dtype=None, copy=None):
        out = self._rows(np.arange(len(self), dtype=np.int64))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, tuple):  # rows first, then numpy does the rest on what was read
            head, rest = key[0], key[1:]
            rows = self[head]
            return rows[rest] if isinstance(head, (int, np.integer)) else rows[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} out of range for {len(self)} rows")
            return self._rows(np.array([i % len(self)], dtype=np.int64))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1 and self._index is None:
                return self._store.read_range(start, max(start, stop))
            return self._rows(np.arange(start, stop, step, dtype=np.int64))
        return self._rows(self._positions(key))

    def __iter__(self):
        for block in chunks(self):
            yield from block

    # -- views and chunks
    def take(self, rows) -> "Images":
        """A lazier ``self[rows]``: the rows are recorded, not read."""
        return Images(self._store, self._base(self._positions(rows)))

    def chunks(self, max_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        return chunks(self, max_bytes)

    def files(self) -> Optional[list[Path]]:
        """The payload files when this view is all of them, row for row (else None)."""
        if self._index is not None and not np.array_equal(self._index, np.arange(self._store.n)):
            return None
        return self._store.files()

    # -- internals
    def _positions(self, key) -> np.ndarray:
        arr = np.asarray(key)
        if arr.dtype == bool:
            if arr.shape != (len(self),):
                raise IndexError(f"boolean index of shape {arr.shape} for {len(self)} rows")
            return np.flatnonzero(arr)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise IndexError(f"rows must be integers or a boolean mask, got {arr.dtype}")
        arr = arr.astype(np.int64).reshape(-1)
        if arr.size and (arr.min() < -len(self) or arr.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        return np.where(arr < 0, arr + len(self), arr)

    def _base(self, positions: np.ndarray) -> np.ndarray:
        return positions if self._index is None else self._index[positions]

    def _rows(self, positions: np.ndarray) -> np.ndarray:
        base = self._base(positions)
        if len(base) < 2 or bool(np.all(np.diff(base) > 0)):
            return self._store.read_sorted(base)
        order, inverse = np.unique(base, return_inverse=True)
        return self._store.read_sorted(order)[inverse.reshape(-1)]


def take(images: Any, rows) -> Any:
    """``images`` restricted to ``rows`` (bool mask or integer index) without reading pixels
    from disk: a memory-mapped or sharded payload gives a lazy :class:`Images` view; an array
    already in memory gives the selected rows as an array (as numpy does)."""
    if isinstance(images, Images):
        return images.take(rows)
    if isinstance(images, np.memmap):
        whole = view(images)
        return (whole if isinstance(whole, Images) else Images(_ArrayStore(images))).take(rows)
    return np.asarray(images[np.asarray(rows)])


def open_shards(directory: Path, shards: list[dict[str, Any]], row_shape: tuple[int, ...]) -> Images:
    """The view of a sharded payload; ValueError naming the shard whose header disagrees."""
    paths, counts, offsets = [], [], []
    for entry in shards:
        path = directory / entry["file"]
        shape, dtype, offset = read_header(path)
        if dtype != np.uint8 or tuple(shape[1:]) != tuple(row_shape) or shape[0] != int(entry["rows"]):
            raise ValueError(f"{path}: holds {dtype} {shape}, dataset.json lists {entry['rows']} rows of "
                             f"uint8 {tuple(row_shape)}")
        if os.path.getsize(path) != offset + int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: is {os.path.getsize(path)} bytes, its header says "
                             f"{offset + int(np.prod(shape, dtype=np.int64))}")
        paths.append(path)
        counts.append(shape[0])
        offsets.append(offset)
    return Images(_ShardStore(paths, counts, row_shape, np.dtype(np.uint8), offsets))


# ---------------------------------------------------------------- writing

class PayloadWriter:
    """Appends uint8 rows to a dataset directory's payload, shard by shard, in order.

    ``close()`` returns the layout: ``images.npy`` when every row fit one shard (today's
    single file, byte for byte what ``np.save`` writes), else the shards under ``images/``.
    Memory: only the block being appended.
    """

    def __init__(self, directory: str | os.PathLike, row_shape: Sequence[int], budget: Optional[int] = None):
        self.directory = Path(directory)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.rows_per_shard = rows_per(int(np.prod(self.row_shape, dtype=np.int64)), budget or shard_bytes())
        self.shards: list[dict[str, Any]] = []  # {"file", "rows"} of finished shards
        self._fh = None
        self._rows = 0  # rows in the open shard
        self._header_len = 0

    def _open(self) -> None:
        path = self.directory / SHARD_DIR / SHARD_NAME.format(len(self.shards))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "wb")
        header = _header((self.rows_per_shard, *self.row_shape), np.uint8)
        self._fh.write(header)
        self._header_len = len(header)
        self._rows = 0

    def _finish(self) -> None:
        fh, self._fh = self._fh, None
        fh.flush()
        header = _header((self._rows, *self.row_shape), np.uint8)
        path = Path(fh.name)
        if len(header) == self._header_len:
            fh.seek(0)
            fh.write(header)
            fh.close()
        else:  # fewer digits crossed the header's 64-byte padding: rewrite the file once
            fh.close()
            tmp = path.with_name(path.name + ".tmp")
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                src.seek(self._header_len)
                dst.write(header)
                shutil.copyfileobj(src, dst, 16 << 20)
            os.replace(tmp, path)
        self.shards.append({"file": f"{SHARD_DIR}/{path.name}", "rows": self._rows})

    def append(self, block: np.ndarray) -> None:
        block = np.asarray(block)
        if block.dtype != np.uint8 or tuple(block.shape[1:]) != self.row_shape:
            raise ValueError(f"rows must be uint8 {self.row_shape}, got {block.dtype} {block.shape[1:]}")
        start = 0
        while start < len(block):
            if self._fh is None:
                self._open()
            n = min(len(block) - start, self.rows_per_shard - self._rows)
            self._fh.write(np.ascontiguousarray(block[start:start + n]).data)
            self._rows += n
            start += n
            if self._rows == self.rows_per_shard:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; ``[]`` means the single-file layout (``images.npy``)."""
        if self._fh is not None:
            self._finish()
        if len(self.shards) <= 1:
            single = self.directory / IMAGES
            if self.shards:
                os.replace(self.directory / self.shards[0]["file"], single)
                (self.directory / SHARD_DIR).rmdir()
            else:
                with open(single, "wb") as fh:
                    fh.write(_header((0, *self.row_shape), np.uint8))
            self.shards = []
        return self.shards

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_images(images: Any, directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Write any payload (ndarray, memmap, :class:`Images`) into ``directory`` block by block.

    When ``images`` is already a whole file-backed payload with the layout this write would
    make (annotate with no change, clean with nothing dropped), its files are copied by the
    kernel (``copy_file_range``: no pixels through this process, and a reflink, no new blocks,
    on a copy-on-write file system) instead of block by block. Not hard links: an edit in
    place of one step's file (``np.save`` over it) would change the other's behind its back.
    Returns the shards written (``[]``: ``images.npy``).
    """
    directory = Path(directory)
    files = images.files() if isinstance(images, Images) else file_of(images)
    if files and all(directory.resolve() in f.resolve().parents for f in files):
        return _layout_of(files, directory)  # written there already (collect's PayloadWriter)
    writer = PayloadWriter(directory, images.shape[1:])
    if files and images.dtype == np.uint8 and _same_layout(files, len(images), writer.rows_per_shard):
        layout = []
        for src in files:
            name = IMAGES if src.name == IMAGES else f"{SHARD_DIR}/{src.name}"
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            copy_file(src, directory / name)
            if name != IMAGES:
                layout.append({"file": name, "rows": read_header(src)[0][0]})
        return layout
    try:
        for block in chunks(images):
            writer.append(block)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _same_layout(files: list[Path], n: int, rows_per_shard: int) -> bool:
    """Whether ``files`` (a whole payload of ``n`` rows) are what a write of it would make."""
    if len(files) == 1 and files[0].name == IMAGES:
        return n <= rows_per_shard
    counts = [read_header(f)[0][0] for f in files]
    return (n > rows_per_shard and all(c == rows_per_shard for c in counts[:-1])
            and 0 < counts[-1] <= rows_per_shard)


def copy_file(src: Path, dst: Path) -> None:
    """Copy in the kernel (reflink where the file system can), else ``shutil.copyfile``."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        left = os.fstat(fin.fileno()).st_size
        try:
            while left > 0:
                done = os.copy_file_range(fin.fileno(), fout.fileno(), min(left, 1 << 30))
                if done == 0:
                    break
                left -= done
        except (AttributeError, OSError):
            left = -1
    if left != 0:
        shutil.copyfile(src, dst)


def _layout_of(files: list[Path], directory: Path) -> list[dict[str, Any]]:
    if len(files) == 1 and files[0].name == IMAGES:
        return []
    return [{"file": f.resolve().relative_to(directory.resolve()).as_posix(), "rows": read_header(f)[0][0]}
            for f in files]


def payload_files(meta: dict[str, Any]) -> list[str]:
    """The payload's file names (relative to the dataset directory) that ``dataset.json`` lists."""
    if meta.get("kind") != "image":
        return ["features.parquet"]
    return [s["file"] for s in meta["shards"]] if meta.get("shards") else [IMAGES]
