"""Atomic outputs: every file or directory fmpipe writes appears complete or not at all.

A step writes into a temporary sibling and renames it over the target only once everything
is written, so a crash or a failed check never leaves a half output that DVC or the next
step could mistake for a good one, and a previous good output survives a failed run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import FmpipeError


# Files inside an output directory that belong to DVC or git, not to the step: DVC writes a
# .gitignore listing the cached files of a directory whose files are outputs (data/V/train/),
# and a person may keep a .dvcignore there. A hand-run step must not drop them, or the next
# `git add -A` commits the model binaries the .gitignore was hiding.
KEEP_ACROSS_REPLACE = (".gitignore", ".dvcignore")

# Errors of the disk or of permissions: bad circumstances, not bugs. They become one line
# naming the output; anything else keeps its traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def is_environment_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS


class OutputNotWritable(FmpipeError):
    """A write the disk or the permissions refused; keeps the OSError so that an enclosing
    ``atomic_dir`` can name its own output instead of a file inside its temp directory."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(message)
        self.cause = cause


def cannot_write(target: str | os.PathLike, exc: OSError, where: str | None = None) -> FmpipeError:
    """The one-line error for a write that the disk or the permissions refused."""
    what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system"}.get(exc.errno, "permission denied")
    if where is None:
        where = exc.filename
    where = f" ({where})" if where else ""
    return OutputNotWritable(f"{target}: cannot write the output: {what}{where}; "
                             "previous outputs left as they were, no temporary files left behind", exc)


def _inside(path, root: Path) -> str | None:
    """``path`` relative to ``root`` when it lies inside it, else None."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except (TypeError, ValueError, OSError):
        return None


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _mkdtemp(parent: Path, prefix: str) -> Path:
    """mkdtemp, but with the mode a plain mkdir would give (mkdtemp's is always 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def refuse_symlink(target: str | os.PathLike) -> None:
    """An output directory that is a symbolic link is refused (one line naming it).

    Replacing the link would leave its target stale (and still read by whoever linked it
    there); writing through it would put a step's output outside data/<variant>/ and, for a
    link into DVC's cache, corrupt the cache.
    """
    target = Path(target)
    if target.is_symlink():
        raise FmpipeError(f"{target}: is a symbolic link (to {os.readlink(target)}); fmpipe replaces "
                          "output directories whole and does not write through links: remove the link "
                          "(or make it a real directory) and run again")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory; on success it replaces ``target`` in one rename.

    Files DVC or git own in the old ``target`` (``KEEP_ACROSS_REPLACE``) are carried over
    unless the step wrote its own. A full disk or a permission error becomes a
    ``FmpipeError`` naming ``target``; the temp directory is removed in every case.
    """
    target = Path(target)
    refuse_symlink(target)
    # Parents this call creates: removed again if the step fails, so a failed first run of
    # a new variant leaves no empty data/<variant>/ behind.
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _mkdtemp(target.parent, f".{target.name}.tmp-")
    except OSError as exc:
        if is_environment_error(exc):
            raise cannot_write(target, exc) from None
        raise
    try:
        yield tmp
        _carry_owned_files(target, tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        # A refusal from inside the temp directory (atomic_write_bytes) is renamed too: name
        # this output and the file relative to it, never the temp directory, which is gone.
        cause = exc.cause if isinstance(exc, OutputNotWritable) else exc
        if is_environment_error(cause):
            raise cannot_write(target, cause, _inside(cause.filename, tmp) if cause.filename else None) from None
        raise
    old = None
    try:
        if target.exists():
            # Move the old output aside first: rename() cannot replace a non-empty directory.
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        # Ctrl+C (or a failure) between the two renames: put the old output back.
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _carry_owned_files(target: Path, tmp: Path) -> None:
    if not target.is_dir():
        return
    for dirpath, _, filenames in os.walk(target):
        for name in filenames:
            if name in KEEP_ACROSS_REPLACE:
                rel = Path(dirpath, name).relative_to(target)
                dest = tmp / rel
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(Path(dirpath, name), dest)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        if is_environment_error(exc):
            raise cannot_write(path, exc) from None
        raise
    try:
        # mkstemp makes 0600 files; give the file the mode open() would.
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_environment_error(exc):
            raise cannot_write(path, exc) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays show up in reports and metrics; keep json happy without numpy here.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (archives can be larger than memory)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


# Where checked_digest remembers digests: inside DVC's own scratch folder (git-ignored, the
# place DVC keeps its file-hash state), so a project without DVC caches nothing.
DIGEST_STATE = Path(".dvc") / "tmp" / "fmpipe-digests.sqlite"
DIGEST_CACHE_ENV = "FMPIPE_DIGEST_CACHE"  # "0": always hash
# A file changed within this long of its last check may keep its mtime (the file system's clock
# ticks in milliseconds): such a file is hashed and not remembered (git's "racy" rule).
_RACY_NS = 2_000_000_000


def checked_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """``file_digest``, remembered per file by (device, inode, size, mtime) as DVC and git do, so
    that reading a large dataset again does not hash every byte again (4-5 s per GB here: a
    1M x 224 px payload is 150 GB). A file written, replaced or edited gets a new mtime (or
    size, or inode) and is hashed again; what the file system cannot tell apart (an edit that
    restores the mtime by hand) goes unseen, as with DVC."""
    import sqlite3
    import time

    st = os.stat(path)
    key = str(Path(path).resolve())
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, algorithm)
    db = None
    try:
        if os.environ.get(DIGEST_CACHE_ENV, "1") != "0" and DIGEST_STATE.parent.is_dir():
            try:
                db = sqlite3.connect(DIGEST_STATE, timeout=10)
                db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER, "
                           "size INTEGER, mtime_ns INTEGER, algorithm TEXT, digest TEXT)")
                row = db.execute("SELECT dev, ino, size, mtime_ns, algorithm, digest FROM digests WHERE path = ?",
                                 (key,)).fetchone()
                if row is not None and tuple(row[:5]) == stamp:
                    return row[5]
            except sqlite3.Error:
                # A locked or damaged state only costs the hashing.
                if db is not None:
                    db.close()
                db = None
        digest = file_digest(path, algorithm)
        if db is not None and time.time_ns() - st.st_mtime_ns > _RACY_NS:
            try:
                with db:
                    db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?)", (key, *stamp, digest))
            except sqlite3.Error:
                pass
        return digest
    finally:
        if db is not None:
            db.close()
