"""Reading a git repository without touching its workspace, index or HEAD (``git cat-file``, ``git log``)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

from pipeline.errors import FmpipeError

_SEP = "\x1f"  # field separator in git's --format output (never in names or messages)


class Git:
    """Read-only git access by subprocess: revisions, commit facts, blobs at a revision."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)
        self._blobs: dict[tuple[str, str], Optional[bytes]] = {}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["git", *args], cwd=self.root, capture_output=True, check=check, timeout=120)
        except FileNotFoundError:
            raise FmpipeError("git: not found on PATH; the audit reads versions from git history") from None
        except subprocess.CalledProcessError as exc:
            msg = exc.stderr.decode(errors="replace").strip().splitlines()
            raise FmpipeError(f"git {' '.join(args)}: {msg[-1] if msg else 'failed'}") from None

    def check_repo(self) -> None:
        r = self.run("rev-parse", "--is-inside-work-tree", check=False)
        if r.returncode != 0:
            raise FmpipeError(f"{self.root.resolve()}: not a git repository; the audit reads data versions "
                              "from git history (run it in a clone of the project)")

    def is_shallow(self) -> bool:
        return self.run("rev-parse", "--is-shallow-repository", check=False).stdout.strip() == b"true"

    def resolve(self, rev: str) -> str:
        """The full commit id of ``rev``, or a clear error (unknown, or cut off by a shallow clone)."""
        r = self.run("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
        if r.returncode == 0:
            return r.stdout.decode().strip()
        if self.is_shallow():
            raise FmpipeError(f"revision {rev!r}: not found, and this is a shallow clone (history cut off); "
                              "run `git fetch --unshallow` to get the full history")
        raise FmpipeError(f"revision {rev!r}: unknown to git (expected a commit, branch, tag or e.g. HEAD~1)")

    def commit_info(self, commit: str) -> dict[str, str]:
        out = self.run("show", "-s", f"--format=%H{_SEP}%aI{_SEP}%an{_SEP}%s", commit).stdout.decode()
        return dict(zip(("commit", "date", "author", "message"), out.rstrip("\n").split(_SEP)))

    def log(self, path: str, rev: str = "HEAD") -> list[dict[str, str]]:
        """Commits (oldest first) reachable from ``rev`` that changed ``path``."""
        out = self.run("log", "--reverse", f"--format=%H{_SEP}%aI{_SEP}%an{_SEP}%s", rev, "--", path).stdout.decode()
        return [dict(zip(("commit", "date", "author", "message"), line.split(_SEP)))
                for line in out.splitlines() if line]

    def show(self, commit: str, path: str) -> Optional[bytes]:
        """The bytes of ``path`` at ``commit`` (None when the tree has no such file)."""
        key = (commit, path)
        if key not in self._blobs:
            r = self.run("cat-file", "blob", f"{commit}:{path}", check=False)
            self._blobs[key] = r.stdout if r.returncode == 0 else None
        return self._blobs[key]

    def show_many(self, commits: list[str], path: str) -> dict[str, Optional[bytes]]:
        """``path`` at many commits with one ``git cat-file --batch`` (history over many commits)."""
        todo = [c for c in commits if (c, path) not in self._blobs]
        if todo:
            request = "".join(f"{c}:{path}\n" for c in todo).encode()
            out = subprocess.run(["git", "cat-file", "--batch"], cwd=self.root, input=request,
                                 capture_output=True, check=True, timeout=300).stdout
            pos = 0
            for c in todo:
                end = out.index(b"\n", pos)
                header = out[pos:end].split()
                pos = end + 1
                if len(header) == 2 and header[1] == b"missing":
                    self._blobs[(c, path)] = None
                    continue
                size = int(header[2])
                self._blobs[(c, path)] = out[pos:pos + size]
                pos += size + 1
        return {c: self._blobs[(c, path)] for c in commits}
