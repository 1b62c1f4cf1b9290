"""The one error boundary every ``fmpipe`` command runs inside.

Every typer app of fmpipe (the main one and its sub-apps: review, audit, variant) is a
:class:`Group`, whose ``invoke`` wraps everything below it, so a command cannot bypass the
boundary and two commands cannot answer the same failure differently:

- bad input or a failed gate (``FmpipeError``): ``<what>: error: <message>`` on stderr, exit 1;
- a full disk, a quota, a read-only file system or a permission refused (an ``OSError`` of
  the environment, ``pipeline.io.is_environment_error``): ``<what>: error: <file>: <reason>``,
  exit 1 (outputs are written atomically, so nothing partial is left);
- Ctrl+C (``KeyboardInterrupt``; ``dvc repro`` sends SIGINT too):
  ``<what>: interrupted; previous outputs left as they were``, exit 130 (128 + SIGINT, what
  a shell reports for a process the signal ended);
- SIGTERM (``kill``, a CI job's timeout, a scheduler's preemption): the same, as
  ``<what>: terminated; ...``, exit 143. Python's default for SIGTERM ends the process at
  once, skipping the ``finally`` blocks that remove a step's temporary output directory.

One line each, never a traceback. Any other exception is a bug in fmpipe and keeps its
traceback. ``<what>`` is the command as typed (``fmpipe audit model``); a command that knows
better names itself with :func:`doing` (``fmpipe train --stage digits``: ``fmpipe run`` says
which of its steps failed). Only typer and click are imported here: ``fmpipe --help`` reads it.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Iterator

import typer

INTERRUPTED = 130
TERMINATED = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl+C (every ``finally`` and ``except BaseException`` runs)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated` instead of ending the process
    on the spot. Only where SIGTERM has its default action (a command that installs its own,
    like ``serve``, keeps it) and only in the main thread (the only one Python lets set it)."""
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
# What the running command is, for its error line. A context variable, not click's context:
# typer bundles its own click, whose current-context lookup is private.
_what: ContextVar[str] = ContextVar("fmpipe_what", default="fmpipe")


def doing(what: str) -> None:
    """Name what the running command does, for its error line (``fmpipe train --stage digits``)."""
    _what.set(what)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn the failures people cause or meet into one line on stderr and an exit code."""
    from pipeline.errors import FmpipeError

    try:
        yield
    except FmpipeError as exc:
        _fail(f"error: {exc}", 1)
    except OSError as exc:
        from pipeline.io import is_environment_error

        # Writes of step outputs already raise FmpipeError naming the output; this is the
        # rest (a cache, a lock, a copy into annotations/). Other OSErrors are bugs.
        if not is_environment_error(exc):
            raise
        _fail(f"error: {exc.filename or '?'}: {exc.strerror}", 1)
    except KeyboardInterrupt:
        _fail("interrupted; previous outputs left as they were", INTERRUPTED)
    except Terminated:
        _fail("terminated; previous outputs left as they were", TERMINATED)


def _fail(message: str, code: int) -> None:
    typer.echo(f"{_what.get()}: {message}", err=True)
    raise typer.Exit(code)


class Group(typer.core.TyperGroup):
    """A typer group whose commands run inside :func:`reported`; it also records the command
    path (``fmpipe audit model``) as the default ``<what>``."""

    def resolve_command(self, ctx: Any, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None:
            _what.set(f"{_what.get()} {name}")
        return name, cmd, rest

    def invoke(self, ctx: Any) -> Any:
        # The outermost group starts afresh (tests invoke the app many times in one process).
        token = _what.set("fmpipe") if ctx.parent is None else None
        try:
            with reported(), (_sigterm_unwinds() if token is not None else contextlib.nullcontext()):
                return super().invoke(ctx)
        finally:
            if token is not None:
                _what.reset(token)
