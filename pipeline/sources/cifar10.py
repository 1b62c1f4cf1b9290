"""CIFAR-10 from the official python archive (Krizhevsky, 2009): 50k train + 10k test, 32x32 RGB.

Where the bytes come from (``path`` unset: download):

- download ``url`` (default: the official one) into ``cache_dir/cifar10/`` with a progress bar;
  the file appears only after its checksum matched (see ``fetch.fetch``);
- ``path:`` a local ``cifar-10-python.tar.gz``: accepted if its md5 is the official one, or if it
  matches ``md5:``/``sha256:`` from params (a re-packed copy), or with ``verify: false``;
- ``path:`` an extracted ``cifar-10-batches-py`` folder: each batch file is checked against its
  official md5 (``verify: false`` accepts a modified copy).

The batches are Python pickles, and fmpipe loads no pickle from outside as such: the checksum is
checked first, then a restricted unpickler resolves only the three globals numpy arrays need
(``_reconstruct``, ``ndarray``, ``dtype``) and refuses any other, so a tampered file cannot run
code even with ``verify: false``. Nothing is extracted to disk: members are read from the tar.

A copy in image-folder layout (``train/<class>/NNNN.jpg``, e.g. ../shared/datasets/
cifar10-jpeg.tar.gz) is read by the ``imagefolder`` source instead; see params.yaml.

Ids: ``train/data_batch_1/00000`` .. ``test/test_batch/09999`` (batch file and index in it),
stable across downloads. ``given_split`` is the batches' own train/test split.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Optional

from pipeline.errors import FmpipeError
from pipeline.reading import path_kind
from pipeline.sources import fetch
from pipeline.sources.base import Collected
from pipeline.sources.metadata import WithMetadata

if TYPE_CHECKING:  # annotations only: reading params (pipeline.config) imports every source module
    import numpy as np

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
# (split, file, official md5): published with the dataset and used by torchvision alike.
BATCHES = (
    ("train", "data_batch_1", "c99cafc152244af753f735de768cd75f"),
    ("train", "data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    ("train", "data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    ("train", "data_batch_4", "634d18415352ddfa80567beed471001a"),
    ("train", "data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
    ("test", "test_batch", "40351d587109b95175f43aff81a1287e"),
)
META = ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")
SIDE = 32


class Spec(WithMetadata):
    kind: Literal["cifar10"] = "cifar10"
    # Its own train/test split: params.split.test_fraction does not apply (config checks).
    has_own_test_split: ClassVar[bool] = True
    path: Optional[str] = None  # local archive or extracted folder; unset: download
    url: str = URL
    cache_dir: str = fetch.DEFAULT_CACHE
    md5: Optional[str] = None  # checksum of a re-packed local archive (instead of the official)
    sha256: Optional[str] = None
    verify: bool = True


# ---------------------------------------------------------------- restricted unpickling

def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; any other global is refused.

    An ndarray pickle names ``<numpy core>.multiarray._reconstruct`` (the module moved from
    ``numpy.core`` to ``numpy._core`` in numpy 2, and both spellings occur in files),
    ``numpy.ndarray`` and ``numpy.dtype``. That is the whole list.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def __init__(self, file, where: str) -> None:
        # encoding="bytes": the official batches were pickled by Python 2; their str keys and
        # the arrays' raw data come back as bytes instead of being decoded as text.
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        import numpy as np

        if (module, name) not in self._ALLOWED:
            raise FmpipeError(
                f"{self.where}: refusing to unpickle global {module}.{name} "
                "(a CIFAR-10 batch holds only dicts, lists, bytes and numpy arrays)"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def restricted_loads(data: bytes, where: str) -> Any:
    import io

    try:
        return _BatchUnpickler(io.BytesIO(data), where).load()
    except FmpipeError:
        raise
    except Exception as exc:  # truncated or garbled pickles raise many types
        raise FmpipeError(f"{where}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from None


def _as_str_keys(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FmpipeError(f"{where}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _parse_batch(obj: Any, where: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    d = _as_str_keys(obj, where)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * SIDE * SIDE:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FmpipeError(f"{where}: key 'data': expected a uint8 N x 3072 array, got {got}")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),):
        raise FmpipeError(f"{where}: key 'labels': expected {len(data)} labels, got {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise FmpipeError(f"{where}: labels outside 0..{n_classes - 1}")
    # Rows are channel planes (1024 R, 1024 G, 1024 B), each row-major: to N x H x W x C.
    images = data.reshape(len(data), 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return images, labels


def _parse_meta(obj: Any, where: str) -> list[str]:
    names = _as_str_keys(obj, where).get("label_names")
    if not isinstance(names, list) or not names:
        raise FmpipeError(f"{where}: key 'label_names': expected a non-empty list of class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


# ---------------------------------------------------------------- where the files are

def _hint(spec: Spec) -> str:
    return (f"Without network, download {spec.url} elsewhere and set `path:` in this variant's "
            "source to the archive (or to an extracted cifar-10-batches-py folder); or read the "
            "image-folder copy with the imagefolder source (see params.yaml, variant cifar).")


def _check_archive(path: Path, spec: Spec) -> str:
    """Verify a local archive; returns how it was verified (for the report)."""
    if not spec.verify:
        return "not verified (verify: false)"
    if fetch.matches(path, ("md5", ARCHIVE_MD5)):
        return f"md5 {ARCHIVE_MD5} (official)"
    user = fetch.checksum_from(spec.md5, spec.sha256)
    if user and fetch.matches(path, user):
        return f"{user[0]} {user[1]} (from params)"
    got = fetch.digest(path, "md5")
    extra = f" nor the params' {user[0]} {user[1]}" if user else ""
    raise FmpipeError(
        f"{path}: md5 {got} is not the official CIFAR-10 archive's ({ARCHIVE_MD5}){extra}; "
        "for a re-packed copy set `md5:` or `sha256:` to its checksum, or `verify: false`"
    )


def _read_members(path: Path) -> dict[str, bytes]:
    """Batch files from the archive, by base name, read from the tar stream (never extracted)."""
    wanted = {b[1] for b in BATCHES} | {META[0]}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                rel = fetch.check_tar_member(member, path)
                if member.isfile() and rel.name in wanted and rel.parent.name == FOLDER:
                    found[rel.name] = tf.extractfile(member).read()
    except FmpipeError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise fetch.corrupt(path, exc) from None
    return found


def _read_folder(folder: Path, verify: bool) -> dict[str, bytes]:
    found = {}
    for name, md5 in [(b[1], b[2]) for b in BATCHES] + [META]:
        f = folder / name
        if f.is_file():
            if verify:
                fetch.verify(f, ("md5", md5), "official CIFAR-10 batch; `verify: false` accepts a modified copy")
            found[name] = f.read_bytes()
    return found


def _locate(spec: Spec) -> tuple[dict[str, bytes], dict[str, Any]]:
    if spec.path is None:
        expected = fetch.checksum_from(spec.md5, spec.sha256) or ("md5", ARCHIVE_MD5)
        dest = fetch.cache_path(spec.cache_dir, "cifar10", ARCHIVE)
        fetch.fetch([spec.url], dest, None if not spec.verify else expected, _hint(spec))
        # The params' form of the path (``~`` unexpanded): the report is a hashed output and
        # must not depend on whose home directory the cache is in.
        return _read_members(dest), {"url": spec.url, "path": f"{spec.cache_dir}/cifar10/{ARCHIVE}",
                                     "checksum": f"{expected[0]} {expected[1]}" if spec.verify else "not verified"}
    path = Path(spec.path).expanduser()
    if path.is_dir():
        folder = path / FOLDER if (path / FOLDER).is_dir() else path
        return _read_folder(folder, spec.verify), {
            "path": str(folder), "checksum": "per-file official md5" if spec.verify else "not verified"}
    if path.is_file():
        how = _check_archive(path, spec)
        return _read_members(path), {"path": str(path), "checksum": how}
    raise FmpipeError(f"{path}: {path_kind(path)} (cifar10 `path:` expects {ARCHIVE} or a {FOLDER} folder)")


# ---------------------------------------------------------------- load

def load(spec: Spec) -> Collected:
    import numpy as np

    files, info = _locate(spec)
    where = info["path"]
    missing = [n for n in [b[1] for b in BATCHES] + [META[0]] if n not in files]
    if missing:
        raise FmpipeError(f"{where}: missing CIFAR-10 file(s) {missing} (expected in {FOLDER}/)")
    classes = _parse_meta(restricted_loads(files.pop(META[0]), f"{where}:{META[0]}"), f"{where}:{META[0]}")

    parts, labels, ids, splits = [], [], [], []
    for split, name, _ in BATCHES:
        batch_where = f"{where}:{name}"
        images, lab = _parse_batch(restricted_loads(files.pop(name), batch_where), batch_where, len(classes))
        parts.append(images)
        labels.append(lab)
        ids += [f"{split}/{name}/{i:05d}" for i in range(len(lab))]
        splits += [split] * len(lab)
    # One contiguous N x H x W x C array (the transposed batch views are copied in here once).
    all_images = np.empty((len(ids), SIDE, SIDE, 3), dtype=np.uint8)
    at = 0
    for images in parts:
        all_images[at:at + len(images)] = images
        at += len(images)
    info = {"source": "cifar10", **info}
    return Collected(ids=ids, labels=np.concatenate(labels), classes=classes, images=all_images,
                     given_split=splits, info=info)
