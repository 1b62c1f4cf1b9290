"""Shared plumbing for sources: checksums, downloads, safe archive members, progress bars.

One mechanism per job, so every source verifies, downloads and refuses hostile archive
members the same way:

- ``digest`` / ``verify``: hex digests of a file, compared against an expected
  ``(algorithm, hex)`` pair; a mismatch is an ``FmpipeError`` naming the file and both values.
- ``fetch``: a cached, verified download. The bytes go to a temp file beside the target and are
  renamed over it only after the checksum matched, so the cache never holds a half or wrong
  file. Mirrors are tried in order; all failures are reported together.
- ``safe_member_name`` / ``check_tar_member`` / ``check_zip_member``: members with absolute
  paths, ``..`` components, links or device files are refused by name. Sources read members
  as bytes (never ``extractall``), but the check still matters: ids are built from member
  names, and a hostile name is a sign of a hostile archive.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

from pipeline.errors import FmpipeError
from pipeline.io import file_digest

DEFAULT_CACHE = "~/.cache/fmpipe"
ALGORITHMS = ("md5", "sha256")
_CHUNK = 1 << 20


# ---------------------------------------------------------------- progress

def progress(total: Optional[int], desc: str, unit: str = "it", unit_scale: bool = False):
    """The console's progress bar (``pipeline/console.py``); ``unit_scale`` counts bytes."""
    from pipeline.console import Bar

    return Bar(total, desc, unit=unit, in_bytes=unit_scale)


# ---------------------------------------------------------------- checksums

Checksum = tuple[str, str]  # (algorithm, lowercase hex)


def checksum_from(md5: Optional[str] = None, sha256: Optional[str] = None) -> Optional[Checksum]:
    """The strongest checksum a params section gave, or None."""
    if sha256:
        return ("sha256", sha256.strip().lower())
    if md5:
        return ("md5", md5.strip().lower())
    return None


def digest(path: str | os.PathLike, algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
    return file_digest(path, algorithm)


def matches(path: str | os.PathLike, expected: Checksum) -> bool:
    return digest(path, expected[0]) == expected[1]


def verify(path: str | os.PathLike, expected: Checksum, what: str = "") -> None:
    got = digest(path, expected[0])
    if got != expected[1]:
        label = f" ({what})" if what else ""
        raise FmpipeError(
            f"{path}{label}: {expected[0]} checksum mismatch: expected {expected[1]}, got {got}"
        )


# ---------------------------------------------------------------- downloads

def cache_path(cache_dir: str, *parts: str) -> Path:
    return Path(os.path.expanduser(cache_dir)).joinpath(*parts)


def download(url: str, dest: str | os.PathLike, expected: Optional[Checksum],
             timeout: float = 60.0) -> Path:
    """Stream ``url`` to ``dest`` with a progress bar, verifying while writing.

    The temp file lives in ``dest``'s directory so the final ``os.replace`` is atomic; it is
    removed on any failure (network error, checksum mismatch, Ctrl-C).
    """
    import urllib.request  # here, not at the top: every params load imports this module

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    algorithm = expected[0] if expected else "sha256"
    h = hashlib.new(algorithm)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.part-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length") if resp.headers else None
            total = int(length) if length and length.isdigit() else None
            with progress(total, f"download {dest.name}", unit="B", unit_scale=True) as bar:
                while block := resp.read(_CHUNK):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
            if total is not None and bar.n != total:
                raise FmpipeError(f"{url}: download truncated: got {bar.n} of {total} bytes")
        got = h.hexdigest()
        if expected and got != expected[1]:
            raise FmpipeError(
                f"{url}: {algorithm} checksum mismatch: expected {expected[1]}, got {got} "
                f"(download discarded, {dest} left untouched)"
            )
        os.replace(tmp, dest)
        return dest
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(urls: Sequence[str], dest: str | os.PathLike, expected: Optional[Checksum],
          hint: str) -> Path:
    """A verified copy of a remote file at ``dest``: the cached one if it checks out, else the
    first mirror that delivers the right bytes. ``hint`` says how to supply the file locally."""
    dest = Path(dest)
    if dest.exists() and (expected is None or matches(dest, expected)):
        return dest
    errors = []
    for url in urls:
        try:
            return download(url, dest, expected)
        except FmpipeError as exc:
            errors.append(str(exc))
        except (OSError, ValueError) as exc:  # urllib's URLError is an OSError
            reason = getattr(exc, "reason", None) or exc
            errors.append(f"{url}: {reason}")
    raise FmpipeError(f"could not download {dest.name}: " + "; ".join(errors) + f". {hint}")


# ---------------------------------------------------------------- archive members

def safe_member_name(name: str, archive: str | os.PathLike) -> PurePosixPath:
    """The member's path as a clean relative POSIX path, or an error naming it.

    Refused: absolute paths (``/x``, ``C:\\x``, ``\\\\host\\x``) and any ``..`` component; a
    backslash counts as a separator, since Windows tools write zip names that way.
    """
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise FmpipeError(f"{archive}: refusing member {name!r}: absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FmpipeError(f"{archive}: refusing member {name!r}: '..' escapes the archive root")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def check_tar_member(member: tarfile.TarInfo, archive: str | os.PathLike) -> PurePosixPath:
    path = safe_member_name(member.name, archive)
    if member.issym() or member.islnk():
        raise FmpipeError(
            f"{archive}: refusing member {member.name!r}: link to {member.linkname!r} "
            "(archives must hold plain files and folders)"
        )
    if not (member.isfile() or member.isdir()):
        raise FmpipeError(f"{archive}: refusing member {member.name!r}: device, fifo or special file")
    return path


def check_zip_member(info: zipfile.ZipInfo, archive: str | os.PathLike) -> PurePosixPath:
    path = safe_member_name(info.filename, archive)
    # The unix mode sits in the high 16 bits when the zip was written on unix; many writers
    # (Python's writestr among them) leave the file-type bits 0, which means a plain file.
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise FmpipeError(f"{archive}: refusing member {info.filename!r}: symbolic link")
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise FmpipeError(f"{archive}: refusing member {info.filename!r}: device, fifo or special file")
    return path


def archive_kind(path: str | os.PathLike) -> Optional[str]:
    """'zip', 'tar' (any compression tarfile reads) or None for a directory / unknown file."""
    p = Path(path)
    if p.is_dir():
        return None
    name = p.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")):
        return "tar"
    # Unknown extension: sniff the content.
    if zipfile.is_zipfile(p):
        return "zip"
    try:
        if tarfile.is_tarfile(p):
            return "tar"
    except OSError:
        pass
    return None


def corrupt(archive: str | os.PathLike, exc: BaseException) -> FmpipeError:
    """The one error for an archive that cannot be read through (truncated, bad CRC, ...)."""
    return FmpipeError(f"{archive}: corrupt or truncated archive ({type(exc).__name__}: {exc})")

