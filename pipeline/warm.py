"""A warm start for ``fmpipe``: a command from the shell costs a fork, not an interpreter.

A cold ``fmpipe annotate --stage iris`` spends ~1.4 s importing pandas, pydantic, typer and
fmpipe's own modules before a 0.1 s step, and a train or evaluate step ~7 s more on torch,
Lightning and Great Expectations. ``dvc repro`` starts one process per stage, so on two cores
most of a small pipeline's time was start-up. ``pipeline/launch.py`` (the ``fmpipe`` entry
point) uses both halves of this module:

- **client** (:func:`run_warm`): stdlib only. It works out which code and settings it would run
  (:func:`server_key`), connects to the warm server for them over a Unix socket, hands over
  its argv, working directory, environment, umask and its three standard file descriptors,
  forwards Ctrl+C / SIGTERM / SIGHUP to the command, and exits with the command's code. When
  there is no server it starts one in the background and runs this command cold, so the
  first command is never slower than before and nothing waits for the server.
- **server** (:func:`serve`): imports what the steps import (:data:`PRELOAD`,
  :func:`step_imports`), then forks one child per command. The child takes the caller's cwd,
  environment, umask, stdio and argv and runs the ordinary typer app, as the cold path would:
  same code, same error boundary, same exit codes. The server never runs a command itself, so
  every child starts from the same freshly imported state.

What keeps a warm command the same as a cold one:

- **the code**: the key hashes the interpreter, ``sys.path``, every ``.py`` of ``pipeline/``
  and ``stages/`` (path, size, mtime) and the mtime of every ``sys.path`` folder (an install
  or uninstall changes its site-packages). Different code is a different server; a server
  started for code that has since changed stops the older ones of the same checkout.
- **settings read at import**: environment variables that libraries read when imported
  (threads, CUDA, locale, ``PYTHON*``, ``GX_*``, ``FMPIPE_*``...: :data:`_KEYED_ENV`) are part
  of the key. Everything else in the environment is the caller's, set in the child.
- **GPUs**: CUDA must not be initialised before a fork, so on a machine with NVIDIA devices
  the server does not preload torch (the steps import it after the fork, as a cold run does).
- **isolation**: the socket lives in a folder only this user can enter (checked, else cold),
  and the server refuses a peer of another user (``SO_PEERCRED``).

``FMPIPE_WARM=0`` turns it off (every command cold, as before); ``FMPIPE_WARM_IDLE`` is how
long a server waits for a command before it exits (seconds, default 1800);
``FMPIPE_WARM_DIR`` moves the sockets. ``fmpipe warm status`` lists the servers and ``fmpipe
warm stop`` stops them (running commands finish first).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Callable

SWITCH = "FMPIPE_WARM"
RANK_ENV = "LOCAL_RANK"  # set by torch/Lightning launchers in the processes they start
IDLE_ENV = "FMPIPE_WARM_IDLE"
DIR_ENV = "FMPIPE_WARM_DIR"
DEFAULT_IDLE_S = 1800.0

# Environment variables read when a library is imported (thread pools, device lists, locale,
# the interpreter's own). A server imported them once, so callers that differ here need their
# own server. The prefix list errs wide: a needless server costs seconds; a wrong one, results.
# (Not RAY_: Ray is never preloaded (NOT_PRELOADED), so a command reads them after the fork.)
_KEYED_ENV = ("PYTHON", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "BLIS_", "NUMEXPR_", "VECLIB_",
              "TORCH", "PYTORCH_", "CUDA_", "CUBLAS_", "CUDNN_", "NVIDIA_", "HIP_", "ROCM_", "LD_",
              "GX_", "GE_", "MPL", "PL_", "LIGHTNING_", "DVC", "LANG", "LC_", "TZ", "HOME",
              "XDG_", "FMPIPE_")
_UNKEYED_ENV = (SWITCH, IDLE_ENV, DIR_ENV, "FMPIPE_RESOURCES", "FMPIPE_PROGRESS", "DVC_STAGE",
                "DVC_ROOT", "DVC_EXP_")

# What every command imports; the server imports it once. torch and Lightning only where
# CUDA cannot be initialised by importing them (no NVIDIA device): see the module docstring.
# Beside these, the server imports what the steps' code imports (:func:`step_imports`).
PRELOAD = ("numpy", "pandas", "pyarrow.parquet", "pydantic", "yaml", "typer", "pipeline.cli",
           "pipeline.config", "pipeline.runner", "pipeline.artefacts", "sklearn.linear_model",
           "scipy.stats", "matplotlib.figure", "matplotlib.backends.backend_agg", "great_expectations")
PRELOAD_TORCH = ("torch", "lightning", "torchmetrics")

# Named by the steps' code but never preloaded. ray: only `engine: ray` needs it, and importing
# it costs more than most steps. onnxruntime: importing it starts a thread, and a process that
# forks with a thread running hands its children whatever locks that thread held.
NOT_PRELOADED = ("ray", "onnxruntime")

_HEADER = struct.Struct("!I")

# Commands that always start cold: managing the servers, and serving a package, which runs for
# hours (a warm start buys nothing) and must not carry the training code's libraries.
COLD_COMMANDS = ("warm", "serve")


def enabled() -> bool:
    return (os.environ.get(SWITCH, "1") != "0" and hasattr(os, "fork") and hasattr(socket, "AF_UNIX")
            and hasattr(socket, "send_fds"))


# ---------------------------------------------------------------------------------------- key

def warm_dir() -> Path | None:
    """This user's socket folder, created 0700; None (run cold) when it is not safely ours."""
    given = os.environ.get(DIR_ENV)
    if given:
        folder = Path(given)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        folder = Path(os.environ["XDG_RUNTIME_DIR"]) / "fmpipe-warm"
    else:
        folder = Path("/tmp") / f"fmpipe-warm-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.stat()
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None  # someone else's, or open to others: a socket there could be anyone's
    return folder


def _code_roots() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here, here.parent / "stages"]


def code_fingerprint(roots: list[Path]) -> str:
    """Every ``.py`` under the code's folders, by path, size and mtime: an edit changes it."""
    digest = hashlib.sha256()
    for root in roots:
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != "__pycache__":
                        stack.append(Path(entry.path))
                elif entry.name.endswith(".py"):
                    st = entry.stat()
                    digest.update(f"{entry.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _search_path() -> list[str]:
    """``sys.path`` without its first entry (the script's folder or the cwd, set per process)."""
    return [os.path.abspath(p) for p in sys.path[1:] if p]


def is_keyed(name: str) -> bool:
    """Whether an environment variable is part of a server's key (read when libraries import)."""
    return name.startswith(_KEYED_ENV) and not name.startswith(_UNKEYED_ENV)


def server_key(env: dict[str, str] | None = None) -> tuple[str, dict]:
    """(key, what it was made of): equal keys mean a server's imports are this process's."""
    env = os.environ if env is None else env
    roots = _code_roots()
    paths = _search_path()
    folders = []
    for p in paths:
        try:
            folders.append(os.stat(p).st_mtime_ns)
        except OSError:
            folders.append(None)
    keyed = {k: v for k, v in sorted(env.items()) if is_keyed(k)}
    spec = {"python": os.path.realpath(sys.executable), "prefix": sys.prefix, "version": sys.version, "path": paths, "folders": folders,
            "roots": [str(r) for r in roots], "code": code_fingerprint(roots), "env": keyed,
            "gpu": _has_nvidia_device()}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    return key, spec


def _has_nvidia_device() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


# ------------------------------------------------------------------------------------- client

def run_warm(argv: list[str]) -> int | None:
    """The command's exit code from a warm server, or None: run cold (no server yet, or none
    possible); a server is started in the background for the next command."""
    if RANK_ENV in os.environ:
        # A rank of a distributed run, started by its launcher (Lightning's DDP runs the same
        # command again per rank): cold, and no server for an environment no shell will repeat.
        return None
    folder = warm_dir()
    if folder is None:
        return None
    try:
        key, spec = server_key()
    except OSError:
        return None
    sock_path = folder / f"{key}.sock"
    if len(os.fsencode(sock_path)) >= 100:  # AF_UNIX paths stop at 107 bytes
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(os.fspath(sock_path))
    except OSError:
        conn.close()
        if argv and argv[0] not in ("--help", "-h", "--version"):  # not for a glance at the help
            _start_server(folder, key, spec)
        return None
    with conn:
        try:
            _send_request(conn, argv)
        except OSError:
            return None  # the server went away before it read the request: nothing ran
        return _await_exit(conn)


def _send_request(conn: socket.socket, argv: list[str]) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    request = json.dumps({"argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ),
                          "umask": umask, "path0": sys.path[0] if sys.path else ""}).encode()
    fds, opened = [], []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:  # a closed standard stream: the command gets /dev/null, as it would
            null = os.open(os.devnull, os.O_RDWR)
            opened.append(null)
            fds.append(null)
    try:
        socket.send_fds(conn, [_HEADER.pack(len(request))], fds)
        conn.sendall(request)
    finally:
        for fd in opened:
            os.close(fd)


def _await_exit(conn: socket.socket) -> int:
    """Wait for the command's exit code; forward the signals a terminal or a scheduler sends."""
    child: list[int] = []
    pending: list[int] = []

    def forward(signum, frame):
        if child:
            _signal_group(child[0], signum)
        else:
            pending.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    reader = conn.makefile("r", encoding="ascii")
    for line in reader:
        word, _, value = line.partition(" ")
        if word == "pid":
            child.append(int(value))
            for signum in pending:
                _signal_group(child[0], signum)
        elif word == "exit":
            return int(value)
    sys.stderr.write("fmpipe: the warm server stopped during the command; its step's outputs were "
                     "written atomically, so run it again (FMPIPE_WARM=0 runs without the server)\n")
    return 1


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except OSError:
        pass


# The server's command line ends with this; :func:`_is_server` looks for it.
_SERVE_CODE = "from pipeline.launch import serve; serve()"


def _start_server(folder: Path, key: str, spec: dict) -> None:
    """Start the server for this key in its own session, and do not wait for it."""
    import subprocess

    log = folder / f"{key}.log"
    env = dict(os.environ, FMPIPE_WARM_KEY=key)
    code = f"import sys; sys.path[:] = {[str(folder)] + spec['path']!r}; {_SERVE_CODE}"
    try:
        with open(log, "ab") as out:
            subprocess.Popen([sys.executable, "-c", code], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=out, start_new_session=True, close_fds=True)
    except OSError:
        pass


# ------------------------------------------------------------------------------------- server

class _Request:
    def __init__(self, data: dict, fds: list[int]):
        self.argv: list[str] = data["argv"]
        self.argv0: str = data["argv0"]
        self.cwd: str = data["cwd"]
        self.env: dict[str, str] = data["env"]
        self.umask: int = data["umask"]
        self.path0: str = data["path0"]
        self.fds = fds


def serve(command: Callable[[list[str]], None]) -> None:
    """The server's process (started by :func:`_start_server`): preload, then fork per command,
    each child calling ``command(argv)`` (the typer app, ``pipeline.launch``)."""
    folder = warm_dir()
    key = os.environ.pop("FMPIPE_WARM_KEY", "")
    if folder is None or not key:
        sys.exit("fmpipe warm: no key or no private socket folder")
    import fcntl

    lock = open(folder / f"{key}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another server for this key is up or starting
    started = time.time()
    env = dict(os.environ)  # the caller's: preloading sets defaults of its own
    # Listed (and so stoppable by `fmpipe warm stop`) while it imports; SIGTERM's default
    # action ends it then.
    _write_meta(folder, key, {"pid": os.getpid(), "key": key, "started": started, "ready": None, "served": 0})
    try:
        _preload()
        now_key, spec = server_key(env)
    except BaseException:
        _meta_path(folder, key).unlink(missing_ok=True)
        raise
    if now_key != key:  # the code or the installation changed while importing: serve nothing
        _meta_path(folder, key).unlink(missing_ok=True)
        print(f"fmpipe warm: key changed while preloading ({key} -> {now_key}); exiting", flush=True)
        return
    _stop_stale(folder, spec)
    # Keep the collector away from everything imported so far: a child's first full collection
    # would otherwise walk (and so copy, page by page) the server's whole heap.
    import gc

    gc.collect()
    gc.freeze()
    request = _serve_until_fork(folder, key, spec, lock, started)
    if request is None:
        return
    code = _run_in_child(request, command)
    # Exit as a process does, minus the interpreter's teardown of the server's whole heap
    # (~0.3 s of touching, so copying, every preloaded object): what a program registered
    # to run at exit runs, the std streams are flushed, then the process ends.
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _preload() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # what the CLI sets before GX
    gpu = _has_nvidia_device()
    for name in PRELOAD if gpu else PRELOAD + PRELOAD_TORCH:
        t0 = time.perf_counter()
        if _import(name):
            print(f"fmpipe warm: preloaded {name} in {time.perf_counter() - t0:.2f} s", flush=True)
    if gpu:  # most of what the steps import imports torch
        return
    t0 = time.perf_counter()
    names = step_imports()
    done = sum(_import(name) for name in names)
    print(f"fmpipe warm: preloaded {done} of the {len(names)} modules the steps import in "
          f"{time.perf_counter() - t0:.2f} s", flush=True)


def step_imports() -> list[str]:
    """What the steps' code imports, lazily inside functions included (pipeline/imports.py's
    walk): their own modules and the libraries those name, less :data:`NOT_PRELOADED`. A forked
    child then finds them imported: iris's ten steps ran 12% faster warm (bench/README.md)."""
    from pipeline import imports
    from pipeline.steps import STEPS

    own = sorted(set().union(*(imports.imported_modules(s.module, leaves=frozenset()) for s in STEPS)))
    libraries = sorted(imports.libraries_imported(own))
    return [n for n in libraries + own if n.split(".")[0] not in NOT_PRELOADED]


def _import(name: str) -> bool:
    try:
        __import__(name)
    except Exception as exc:  # an optional extra not installed: the step imports it cold
        print(f"fmpipe warm: not preloaded {name}: {exc!r}", flush=True)
        return False
    return True


def _meta_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.json"


def _write_meta(folder: Path, key: str, meta: dict) -> None:
    tmp = folder / f".{key}.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, _meta_path(folder, key))


def _stop_stale(folder: Path, spec: dict) -> None:
    """Stop servers of the same checkout whose code has changed since: nobody can reach them."""
    for meta_file in folder.glob("*.json"):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("roots") == spec["roots"] and meta.get("code") != spec["code"]:
            _signal_server(meta)


def _is_server(pid: int) -> bool:
    """``pid`` is alive and is a warm server: the record of a server that died without removing
    it (killed -9, a crash) names a pid the system may since have given to another process."""
    try:
        return _SERVE_CODE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: alive is the best that can be said
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def _signal_server(meta: dict, signum: int = signal.SIGTERM) -> bool:
    try:
        pid = int(meta["pid"])
        if not _is_server(pid):
            return False
        os.kill(pid, signum)
        return True
    except (OSError, KeyError, ValueError):
        return False


def _serve_until_fork(folder: Path, key: str, spec: dict, lock, started: float) -> _Request | None:
    """Accept commands until idle or told to stop. Returns None in the server when it is done,
    and the request in each forked child (which then runs it and never comes back here)."""
    import selectors

    idle_s = idle_seconds()
    sock_path = folder / f"{key}.sock"
    sock_path.unlink(missing_ok=True)  # left by a server that died: we hold the key's lock
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(sock_path))
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stopping = []
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "wake")
    children: dict[int, socket.socket] = {}
    meta = {"pid": os.getpid(), "key": key, "roots": spec["roots"], "code": spec["code"],
            "python": spec["python"], "started": started, "ready": time.time(), "served": 0}
    _write_meta(folder, key, meta)
    last = time.monotonic()
    try:
        while True:
            if stopping and listener.fileno() >= 0:
                selector.unregister(listener)
                listener.close()
                sock_path.unlink(missing_ok=True)
            if listener.fileno() >= 0 and not sock_path.exists():  # its folder was cleared: nobody can reach it
                stopping.append(True)
                continue
            if not children and (stopping or time.monotonic() - last > idle_s):
                return None
            for event, _ in selector.select(timeout=1.0):
                if event.data == "accept":
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        continue
                    request = _read_request(conn)
                    if request is None:
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:  # the child: leave the server's world behind
                        signal.set_wakeup_fd(-1)
                        selector.close()
                        os.close(wake_r)
                        os.close(wake_w)
                        # Close through the objects (a bare os.close would let their later
                        # collection close a reused descriptor). The lock's descriptor must
                        # go: a child holding it would keep the key locked after the server.
                        for held in (listener, lock, conn, *children.values()):
                            held.close()
                        return request
                    for fd in request.fds:
                        os.close(fd)
                    children[pid] = conn
                    selector.register(conn, selectors.EVENT_READ, pid)
                    meta["served"] += 1
                    _write_meta(folder, key, meta)
                    _send_line(conn, f"pid {pid}")
                elif event.data == "wake":
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                else:  # the client's side: only EOF is expected, when it died (kill -9)
                    pid = event.data
                    try:
                        gone = not event.fileobj.recv(64)
                    except OSError:
                        gone = True
                    if gone:
                        selector.unregister(event.fileobj)
                        _signal_group(pid, signal.SIGTERM)
            for pid in _reap(children):
                conn = children.pop(pid)
                try:
                    selector.unregister(conn)
                except (KeyError, ValueError):
                    pass
                conn.close()
                last = time.monotonic()
    finally:
        if os.getpid() == meta["pid"]:
            sock_path.unlink(missing_ok=True)
            _meta_path(folder, key).unlink(missing_ok=True)


def idle_seconds() -> float:
    """``FMPIPE_WARM_IDLE`` (seconds); the default, with a line in the server's log, when it is
    not a positive number (a server that will not start would leave every command cold)."""
    given = os.environ.get(IDLE_ENV)
    try:
        value = float(given) if given else DEFAULT_IDLE_S
    except ValueError:
        value = -1.0
    if not value > 0:
        print(f"fmpipe warm: {IDLE_ENV}={given!r} is not a positive number of seconds; "
              f"using {DEFAULT_IDLE_S:.0f}", flush=True)
        return DEFAULT_IDLE_S
    return value


def _reap(children: dict[int, socket.socket]) -> list[int]:
    done = []
    for pid in list(children):
        try:
            waited, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            waited, status = pid, 0
        if waited == 0:
            continue
        code = os.waitstatus_to_exitcode(status)
        _send_line(children[pid], f"exit {code if code >= 0 else 128 - code}")
        done.append(pid)
    return done


def _send_line(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall(f"{line}\n".encode("ascii"))
    except OSError:
        pass  # the client is gone; its command was or will be stopped


def _read_request(conn: socket.socket) -> _Request | None:
    try:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            return None
        conn.settimeout(10)
        head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        if len(head) != _HEADER.size or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            return None
        (size,) = _HEADER.unpack(head)
        body = b""
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise OSError("short request")
            body += chunk
        conn.settimeout(None)
        return _Request(json.loads(body), fds)
    except (OSError, ValueError, KeyError):
        return None


def _run_in_child(request: _Request, command: Callable[[list[str]], None]) -> int:
    """Become the caller's command: its process group, cwd, environment, umask, stdio, argv."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setpgid(0, 0)  # the client signals the group: the command and anything it started
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
        os.close(fd)
    # The server's std streams were a log file; the same objects now write to the caller's
    # descriptors (modules holding sys.stderr stay right), buffered as a fresh process's are.
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    sys.stderr.reconfigure(line_buffering=True)
    os.umask(request.umask)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    sys.argv = [request.argv0, *request.argv]
    sys.path[0] = request.path0
    try:
        command(request.argv)
    except SystemExit as done:
        code = done.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------- status and stop

def servers() -> list[dict]:
    """The servers of this user's socket folder that are alive, with their memory."""
    folder = warm_dir()
    found = []
    for meta_file in sorted(folder.glob("*.json")) if folder else []:
        try:
            meta = json.loads(meta_file.read_text())
            if not _is_server(int(meta["pid"])):
                continue
        except (OSError, ValueError, KeyError):
            continue
        meta["rss_mb"] = _rss_mb(int(meta["pid"]))
        found.append(meta)
    return found


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def stop_servers(wait_s: float = 30.0) -> int:
    """Ask every server to stop (their running commands finish first); wait for them to go."""
    alive = [m for m in servers() if _signal_server(m)]
    deadline = time.monotonic() + wait_s
    for meta in alive:
        while time.monotonic() < deadline:
            try:
                if not _is_server(int(meta["pid"])):
                    break
            except (OSError, ValueError):
                break
            time.sleep(0.05)
    return len(alive)
