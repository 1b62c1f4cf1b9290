"""Where the heavy, row-parallel parts of the data steps run.

A data step that decodes, hashes, embeds or scores many rows cuts the rows into chunks and
hands a pure function of one chunk to ``map_ordered``; the results come back in chunk order,
one at a time, so the step can write each to disk before the next arrives (bounded memory).

The ``local`` engine runs the chunks in this process. Other engines (Ray, issue #25) run
the same function elsewhere; because the function is pure and results come back in order,
the step's outputs are byte-identical whichever engine ran it, and DVC hashes them the same.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

from pipeline.errors import FmpipeError

T = TypeVar("T")
R = TypeVar("R")

ENGINES = ("local",)


def map_ordered(fn: Callable[[T], R], chunks: Iterable[T], engine: str = "local") -> Iterator[R]:
    """``fn`` applied to every chunk, results yielded in the chunks' order."""
    if engine == "local":
        return map(fn, chunks)
    raise FmpipeError(f"engine: unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
