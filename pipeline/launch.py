"""The ``fmpipe`` command: through a warm server when one is up, else a cold process that starts
one for the next command (pipeline/warm.py). Only the standard library and pipeline.warm are
imported before that choice, so a warm command costs the interpreter's start and a fork."""

from __future__ import annotations

import sys

from pipeline import warm


def main() -> None:
    argv = sys.argv[1:]
    if warm.enabled() and not (argv and argv[0] in warm.COLD_COMMANDS):
        code = warm.run_warm(argv)
        if code is not None:
            sys.exit(code)
    run_app(argv)


def serve() -> None:
    """The warm server's process: each command it forks runs the typer app."""
    warm.serve(run_app)


def run_app(argv: list[str]) -> None:
    from pipeline.cli import app

    app(args=argv, prog_name="fmpipe")
