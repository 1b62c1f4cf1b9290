"""DVC objects by hash: an output of any version, from DVC's local cache or its default remote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import FmpipeError


class MissingData(FmpipeError):
    """A DVC object is in neither the local cache nor the default remote."""


class Store:
    """DVC-tracked bytes by md5: DVC's local cache first, then the default remote (read-only).

    Uses DVC's own ``Repo`` for where the cache and the remote are (``.dvc/config``, cache.dir,
    any remote type DVC supports); nothing is written to the workspace or the cache.
    """

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)
        self._repo = None
        self._remote: Any = None
        self._remote_error: Optional[str] = None
        self._dirs: dict[str, dict[str, str]] = {}

    @property
    def repo(self):
        if self._repo is None:
            from dvc.repo import Repo

            try:
                self._repo = Repo(str(self.root))
            except Exception as exc:  # NotDvcRepoError and friends: one line, no traceback
                raise FmpipeError(f"{self.root.resolve()}: not a DVC repository ({exc})") from None
        return self._repo

    def _remote_odb(self):
        if self._remote is None and self._remote_error is None:
            try:
                self._remote = self.repo.cloud.get_remote_odb(None, "fetch")
            except Exception as exc:  # NoRemoteError, bad config, missing plugin
                self._remote_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return self._remote

    def read(self, md5: str, remote: bool = True) -> bytes:
        local = self.repo.cache.local
        try:
            with open(local.oid_to_path(md5), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            pass
        odb = self._remote_odb() if remote else None
        if odb is not None:
            try:
                return odb.fs.cat_file(odb.oid_to_path(md5))
            except FileNotFoundError:
                pass
            except Exception as exc:  # network or credentials: say that the remote failed
                raise MissingData(f"DVC object {md5}: not in the local cache, and the default remote failed: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if not remote:
            raise MissingData(f"DVC object {md5}: not in the local cache")
        where = "the default remote" if odb is not None else f"any remote ({self._remote_error})"
        raise MissingData(f"DVC object {md5}: in neither the local cache nor {where}")

    def read_in(self, out_md5: str, relpath: Optional[str], remote: bool = True) -> bytes:
        """A file of an output: the output itself (``relpath`` None) or a file in a directory output."""
        if relpath is None or not out_md5.endswith(".dir"):
            return self.read(out_md5, remote)
        if out_md5 not in self._dirs:
            entries = json.loads(self.read(out_md5, remote))
            self._dirs[out_md5] = {e["relpath"]: e["md5"] for e in entries}
        listing = self._dirs[out_md5]
        if relpath not in listing:
            raise FileNotFoundError(relpath)
        return self.read(listing[relpath], remote)
