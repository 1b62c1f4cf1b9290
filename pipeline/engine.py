"""Where the heavy, row-parallel parts of the data steps run.

A data step that decodes, hashes, embeds or scores many rows cuts the rows into chunks and
hands a pure function of one chunk to ``map_ordered``; the results come back in chunk order,
one at a time, so the step can write each to disk before the next arrives (bounded memory).

Engines (params: a variant's ``engine``, ``pipeline/config.py``; docs/cluster.md):

- ``local``: the chunks run in this process, one after the other; or, where the caller says
  its function spends its time outside the GIL (collect's image decoding: PIL and numpy),
  ``threads`` at a time, again at most ``WINDOW_PER_CPU`` per thread in flight.
- ``ray``: each chunk is a Ray task on the cluster ``ray.init()`` finds: the one named by
  ``RAY_ADDRESS`` (``ray start --head`` on a cluster, KubeRay), else the newest one started
  with ``ray start`` on this machine, else a local cluster that Ray starts for this step and
  stops after. At most ``WINDOW_PER_CPU`` chunks per cluster CPU are in flight: the driver
  submits the next chunk only when it has taken the oldest result, so neither the driver nor
  the object store ever holds the whole input or output (a chunk's bytes times the window).
  Why tasks and not Ray Data: ``ray.data.from_items`` needs every chunk in the driver first
  (the whole payload in memory, the wall issue #25 is about), and a chunk's result is any
  Python value (arrays, tuples, frames), which Ray Data would force through Arrow columns;
  bench/README.md ("Ray overhead") has the figures.

Because the function is pure and results come back in order, a step's outputs are
byte-identical whichever engine ran it, and DVC hashes them the same (tests/test_ray.py).
Ray is an optional extra (``pip install -e '.[ray]'``) and imported only here, inside the
function that needs it: ``fmpipe --help`` and the local engine never import it.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Iterable, Iterator, TypeVar

from pipeline.errors import FmpipeError

T = TypeVar("T")
R = TypeVar("R")

ENGINES = ("local", "ray")
RAY_INSTALL = "pip install -e '.[ray]'"
# Chunks in flight per CPU of the cluster: 2 keeps every worker busy while the driver takes
# the previous result, and bounds memory by 2 x CPUs x (chunk + result).
WINDOW_PER_CPU = 2


def map_ordered(fn: Callable[[T], R], chunks: Iterable[T], engine: str = "local", *,
                threads: int = 1) -> Iterator[R]:
    """``fn`` applied to every chunk, results yielded in the chunks' order.

    ``fn`` must be pure and picklable (a module-level function or a ``functools.partial`` of
    one) for engines other than ``local``. An :class:`FmpipeError` it raises on a Ray worker
    surfaces here as the same one line. ``threads``: for ``local``, chunks run at once in a
    thread pool (only for functions that release the GIL; a pure function gives the same
    results in any thread).
    """
    if engine == "local":
        return map(fn, chunks) if threads <= 1 else _thread_stream(fn, chunks, threads)
    if engine == "ray":
        ray = connect_ray()
        check_nodes(ray)
        return _ray_stream(ray, fn, chunks)
    raise FmpipeError(f"engine: unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")


def local_threads() -> int:
    """The CPUs this process may run on (its affinity, e.g. a container's or SLURM's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _thread_stream(fn: Callable[[T], R], chunks: Iterable[T], threads: int) -> Iterator[R]:
    """The local engine's threads: a bounded window of chunks in flight, results in order (a
    plain ``Executor.map`` would take every chunk, the whole input, before the first result)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fmpipe-chunk") as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(fn, chunk))
            if len(pending) >= WINDOW_PER_CPU * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def connect_ray() -> Any:
    """The ``ray`` module, connected to a cluster (see the module's docstring for which)."""
    try:
        import ray
    except ImportError:
        raise FmpipeError(f"engine: ray needs Ray, which is not installed here: {RAY_INSTALL} "
                          "(or set the variant's engine to local)") from None
    if not ray.is_initialized():
        # No usage-stats report: fmpipe runs offline, and Ray would print a notice about it.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = os.environ.get("RAY_ADDRESS")
        if address:
            _reachable(address)
        try:
            # Without an address Ray reads RAY_ADDRESS itself; only Ray's warnings reach the
            # step's stderr (its INFO lines would bury fmpipe's one summary line).
            ray.init(logging_level="warning", configure_logging=True, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"RAY_ADDRESS={address}" if address else "a local Ray cluster"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FmpipeError(f"engine: ray could not connect to {where}: {first}") from None
    return ray


_CHECKED: set[str] = set()  # nodes whose code matched this driver's (once per process)


def code_digest() -> str:
    """sha256 of fmpipe's ``pipeline`` package source as this process imports it."""
    import hashlib

    import pipeline

    root = os.path.dirname(pipeline.__file__)
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _node_code() -> tuple[str, str]:
    return _node(), code_digest()


def check_nodes(ray: Any) -> None:
    """Refuse a cluster whose nodes import other fmpipe code than this driver: their chunks
    would be computed by other functions (other bytes), or fail to unpickle mid-step."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")
             and n["NodeID"] not in _CHECKED]
    if not nodes:
        return
    probe = ray.remote(num_cpus=0)(_node_code)
    mine = code_digest()
    for node in nodes:
        ref = probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
        try:
            where, theirs = ray.get(ref)
        except ray.exceptions.RayError as exc:
            where = node.get("NodeManagerAddress", node["NodeID"])
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise FmpipeError(f"engine: ray: node {where} cannot run fmpipe's code ({last}): install this "
                              "fmpipe checkout on every node (docs/cluster.md)") from None
        if theirs != mine:
            import pipeline

            raise FmpipeError(f"engine: ray: node {where} imports other fmpipe code than this driver "
                              f"({os.path.dirname(pipeline.__file__)}): install the same checkout on every "
                              "node, or its chunks would differ (docs/cluster.md)")
        _CHECKED.add(node["NodeID"])


def describe(engine: str) -> dict[str, Any]:
    """What a step's run record says about its engine (never a hashed output)."""
    out: dict[str, Any] = {"name": engine}
    import sys

    ray = sys.modules.get("ray")
    if engine == "ray" and ray is not None and ray.is_initialized():
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        out.update(address=os.environ.get("RAY_ADDRESS") or "local", nodes=len(nodes),
                   cpus=int(ray.cluster_resources().get("CPU", 0)))
    return out


def _reachable(address: str, timeout: float = 10.0) -> None:
    """One line at once when nothing listens at RAY_ADDRESS: Ray itself retries for minutes,
    printing a warning every few seconds."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or address == "auto":
        return  # "auto" or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise FmpipeError(f"engine: ray could not connect to RAY_ADDRESS={address}: "
                          f"{exc.strerror or exc} (is the Ray head running? docs/cluster.md)") from None


def _ray_stream(ray: Any, fn: Callable[[T], R], chunks: Iterable[T]) -> Iterator[R]:
    task = ray.remote(num_cpus=1)(_run_chunk)
    window = max(2, WINDOW_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    fn_ref = ray.put(fn)  # pickled once, not once per chunk
    cwd = os.getcwd()
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(task.remote(fn_ref, chunk, cwd))
            if len(pending) >= window:
                yield _result(ray, pending.popleft())
        while pending:
            yield _result(ray, pending.popleft())
    finally:
        # Stopped early (an error here or downstream): free the cluster, and take each
        # cancelled or failed result so that Ray does not print it later as an unhandled error.
        for ref in pending:
            ray.cancel(ref)
        for ref in pending:
            try:
                ray.get(ref)
            except Exception:
                pass


def _result(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, FmpipeError):
            cause.__traceback__ = None
            raise cause from None
        raise  # anything else in the function is a bug: keep Ray's traceback
    except ray.exceptions.RayError as exc:  # a worker or node died, an object was lost
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FmpipeError(f"engine: ray: a task failed outside fmpipe's code "
                          f"({type(exc).__name__}: {first})") from None


def _run_chunk(fn: Callable[[T], R], chunk: T, cwd: str) -> R:
    """One chunk on a Ray worker, in the driver's working directory: the steps' paths are
    relative to the project root, and every node must see the project at the same path."""
    if os.getcwd() != cwd:
        try:
            os.chdir(cwd)
        except OSError:
            raise FmpipeError(f"{cwd}: the project directory does not exist on Ray node {_node()} "
                              "(every node must see the project at the same path: docs/cluster.md)") from None
    try:
        return fn(chunk)
    except OSError as exc:
        if exc.filename is None:
            raise
        raise FmpipeError(f"{exc.filename}: {exc.strerror or type(exc).__name__} on Ray node {_node()} "
                          "(every node must read the same files at the same paths: docs/cluster.md)") from None


def _node() -> str:
    import socket

    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # outside a Ray worker (a test calling this directly)
        ip = "?"
    return f"{socket.gethostname()} ({ip})"
