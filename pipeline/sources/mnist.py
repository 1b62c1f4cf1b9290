"""MNIST from the four official IDX files: 60k train + 10k test, 28x28 grayscale digits.

Where the bytes come from (``path`` unset: download):

- download each ``*.gz`` from the first of ``mirrors`` that delivers it into
  ``cache_dir/mnist/``, verified against its published md5 (the one torchvision uses too);
- ``path:`` a local folder holding the four ``.gz`` files (each verified), or the uncompressed
  IDX files (no published checksum exists for those: accepted with ``verify: false`` only).

The IDX parser is our own (the format is a 4-byte magic: two zero bytes, a type code, the
number of dimensions; then one big-endian uint32 per dimension; then the data): a wrong magic,
an unexpected type or shape, a truncated body or a broken gzip stream is an error naming the
file, never a short dataset.

Ids: ``train/00000`` .. ``test/09999`` (index in the official files); classes "0".."9".
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Optional

from pipeline.errors import FmpipeError
from pipeline.sources import fetch
from pipeline.sources.base import Collected
from pipeline.sources.metadata import WithMetadata

if TYPE_CHECKING:  # annotations only: reading params (pipeline.config) imports every source module
    import numpy as np

MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
# split -> (images file, md5), (labels file, md5): the published checksums of the .gz files.
FILES = {
    "train": (("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
              ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432")),
    "test": (("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
             ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")),
}
UBYTE = 0x08


class Spec(WithMetadata):
    kind: Literal["mnist"] = "mnist"
    # Its own train/test split: params.split.test_fraction does not apply (config checks).
    has_own_test_split: ClassVar[bool] = True
    path: Optional[str] = None  # local folder with the four files; unset: download
    mirrors: list[str] = list(MIRRORS)  # base URLs, tried in order
    cache_dir: str = fetch.DEFAULT_CACHE
    verify: bool = True


# ---------------------------------------------------------------- IDX

def parse_idx(raw: bytes, where: str, ndim: int) -> np.ndarray:
    """An IDX ubyte array of ``ndim`` dimensions, checked against its header."""
    import numpy as np

    if len(raw) < 4:
        raise FmpipeError(f"{where}: truncated IDX file ({len(raw)} bytes, no header)")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise FmpipeError(f"{where}: not an IDX file (magic {raw[:4].hex()}, expected 0000{UBYTE:02x}{ndim:02x})")
    if dtype != UBYTE or dims != ndim:
        raise FmpipeError(
            f"{where}: IDX header says type 0x{dtype:02x} with {dims} dimension(s), "
            f"expected unsigned bytes (0x08) with {ndim}"
        )
    header = 4 + 4 * dims
    if len(raw) < header:
        raise FmpipeError(f"{where}: truncated IDX header")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    body = len(raw) - header
    if body != expected:
        state = "truncated" if body < expected else "has trailing bytes"
        raise FmpipeError(f"{where}: {state}: header shape {shape} needs {expected} bytes, found {body}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise FmpipeError(f"{path}: corrupt or truncated gzip file ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- where the files are

def _hint(spec: Spec) -> str:
    names = ", ".join(f for pair in FILES.values() for f, _ in pair)
    return (f"Without network, download {names} from one of {spec.mirrors} elsewhere and set "
            "`path:` in this variant's source to the folder holding them.")


def _local(folder: Path, name: str, md5: str, verify: bool) -> tuple[Path, str]:
    gz = folder / name
    if gz.is_file():
        if verify:
            fetch.verify(gz, ("md5", md5), "published MNIST checksum; `verify: false` accepts a modified copy")
        return gz, f"md5 {md5}" if verify else "not verified"
    plain = folder / name[: -len(".gz")]
    if plain.is_file():
        if verify:
            raise FmpipeError(
                f"{plain}: uncompressed IDX files have no published checksum; use the .gz files "
                "or set `verify: false` to accept them"
            )
        return plain, "not verified"
    raise FmpipeError(f"{folder}: missing {name} (or its uncompressed {plain.name})")


def _files(spec: Spec) -> tuple[dict[str, tuple[Path, Path]], dict[str, str]]:
    out, how = {}, {}
    for split, pair in FILES.items():
        paths = []
        for name, md5 in pair:
            if spec.path is None:
                dest = fetch.cache_path(spec.cache_dir, "mnist", name)
                urls = [m.rstrip("/") + "/" + name for m in spec.mirrors]
                expected = ("md5", md5) if spec.verify else None
                paths.append(fetch.fetch(urls, dest, expected, _hint(spec)))
                how[name] = f"md5 {md5}" if spec.verify else "not verified"
            else:
                folder = Path(spec.path).expanduser()
                if not folder.is_dir():
                    raise FmpipeError(f"{folder}: not a folder (mnist `path:` expects the folder with the IDX files)")
                p, how[name] = _local(folder, name, md5, spec.verify)
                paths.append(p)
        out[split] = (paths[0], paths[1])
    return out, how


# ---------------------------------------------------------------- load

def load(spec: Spec) -> Collected:
    import numpy as np

    files, how = _files(spec)
    parts, labels, ids, splits = [], [], [], []
    for split, (img_path, lab_path) in files.items():
        images = parse_idx(_read(img_path), str(img_path), 3)
        lab = parse_idx(_read(lab_path), str(lab_path), 1).astype(np.int64)
        if len(images) != len(lab):
            raise FmpipeError(f"{img_path}: {len(images)} images but {lab_path.name} has {len(lab)} labels")
        if len(lab) and lab.max() > 9:
            raise FmpipeError(f"{lab_path}: labels outside 0..9 (max {lab.max()})")
        parts.append(images)
        labels.append(lab)
        ids += [f"{split}/{i:05d}" for i in range(len(lab))]
        splits += [split] * len(lab)
    images = np.concatenate(parts)[..., None]  # N x 28 x 28 x 1
    info = {"source": "mnist", "path": spec.path or f"{spec.cache_dir}/mnist",  # unexpanded: no home dir in a hashed output
            "checksums": how}
    if spec.path is None:
        info["mirrors"] = list(spec.mirrors)
    return Collected(ids=ids, labels=np.concatenate(labels), classes=[str(d) for d in range(10)],
                     images=images, given_split=splits, info=info)
