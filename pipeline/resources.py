"""What a step run cost: wall and CPU time, peak memory, accelerator, bytes and rows moved.

:class:`ResourceMeter` brackets one step run. It costs next to nothing: clock and
``getrusage`` reads at the start and end, and one reset of the kernel's peak-RSS counter
(``/proc/self/clear_refs``), so the peak it reports belongs to this step even when
``fmpipe run`` executes several steps in one process. No pass over the data is added: bytes
are file sizes, rows come from parquet footers.

The result is the typed :class:`pipeline.artefacts.Resources`, written by the runner to
``data/resources/<v>/<step>.json``: numbers only, git-ignored (times change on every run, so a
tracked copy would dirty the tree after every ``dvc repro``); ``fmpipe resources`` tabulates
them and ``dvc metrics show data/resources/<v>/<step>.json`` reads one on request. The
device's name goes to ``data/runs/<v>/<step>.json``.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

from pipeline.artefacts import Resources, RunRecord

_MB = 1 << 20


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_worked: bool) -> int:
    if reset_worked:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def path_bytes(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            for root, _, files in os.walk(p):
                total += sum((Path(root) / f).stat().st_size for f in files)
    return total


def path_rows(paths: Iterable[Path]) -> int:
    """Rows of the datasets and tables among ``paths``: a dataset directory counts its manifest."""
    import pyarrow.parquet as pq

    total = 0
    for p in paths:
        table = p / "manifest.parquet" if p.is_dir() else p
        if table.suffix == ".parquet" and table.is_file():
            try:
                total += pq.read_metadata(table).num_rows
            except Exception:  # an unreadable table is the step's error to report, not ours
                pass
    return total


class ResourceMeter:
    """``with ResourceMeter() as m: ...``; then ``m.result(inputs, outputs, extra)``."""

    def __enter__(self) -> "ResourceMeter":
        self._reset = _reset_peak_rss()
        self._wall0 = time.perf_counter()
        self._times0 = os.times()
        self._cuda = self._cuda_start()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall0
        t0, t1 = self._times0, os.times()
        own = (t1.user - t0.user) + (t1.system - t0.system)
        children = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
        self.cpu = own + children  # children: DDP ranks or tools a step waited for
        peak = _peak_rss_bytes(self._reset)
        if children > 0:  # a child's peak counts too (the largest child since this process began)
            peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        self.peak_rss = peak
        self.accel = self._cuda_end()

    @staticmethod
    def _cuda_start() -> bool:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
            return True
        return False

    def _cuda_end(self) -> dict:
        """Peak accelerator memory and the time the device was held, when the step used CUDA."""
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return {}
        return {
            "accel_s": round(self.wall, 3),
            "accel_mb": round(torch.cuda.max_memory_allocated() / _MB, 1),
            "name": torch.cuda.get_device_name(),
        }

    def result(self, inputs: list[Path], outputs: list[Path], extra: dict | None = None) -> Resources:
        extra = dict(extra or {})
        return Resources(
            wall_s=round(self.wall, 3),
            cpu_s=round(self.cpu, 3),
            peak_mb=round(self.peak_rss / _MB, 1),
            read_mb=round(path_bytes(inputs) / _MB, 3),
            write_mb=round(path_bytes(outputs) / _MB, 3),
            rows_in=path_rows(inputs),
            rows_out=path_rows(outputs),
            accel_s=self.accel.get("accel_s"),
            accel_mb=self.accel.get("accel_mb"),
            **extra,
        )

    def record(self, step: str, details: dict | None = None) -> RunRecord:
        import platform

        torch = sys.modules.get("torch")
        return RunRecord(
            step=step,
            device=self.accel.get("name") or f"cpu: {_cpu_model() or platform.machine()}",
            cpu_count=os.cpu_count() or 0,
            torch_threads=torch.get_num_threads() if torch is not None else None,
            python=platform.python_version(),
            **(details or {}),
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_has_native_bf16(cpuinfo: Optional[str] = None) -> Optional[bool]:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), read from /proc/cpuinfo;
    None where that file does not exist. Without it, oneDNN emulates bf16 autocast: the cifar
    net's training step took 11.3 s against 6.7 s in float32 on a 2-core Xeon (bench/README.md,
    bench/cpu_speed.py), where a CPU with AVX512-BF16 runs it 2.2x faster than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return None


_MALLOPT_TRIM_THRESHOLD, _MALLOPT_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_KEEPING_FREED_MEMORY = None  # set by the first keep_freed_cpu_memory() call


def keep_freed_cpu_memory() -> bool:
    """Let glibc keep freed blocks for reuse instead of handing them back to the kernel.

    Called by the steps that run a network on the CPU batch after batch: training
    (``pipeline.training.fit``) and batch inference (``predict_logits``, the package embedder
    of review). A CPU training step allocates and frees its activations (hundreds of MB for the cifar
    net at batch 1024). By default glibc serves blocks above 32 MB with mmap and returns them on
    free, so every step faults the same memory in again, page by page: ~140,000 minor page
    faults and ~0.25 s of a 2.3 s step (bench/README.md). Raising the mmap and trim thresholds
    to 1 GiB makes the heap keep them: no faults after the first steps, the step 11% faster,
    the same numbers; inference over 6 TTA views of 2,048 cifar images went from 24.9 to
    19.0 s, the same logits to the bit (bench/README.md). The price is that the process keeps
    its peak memory until it exits, which a training or evaluation process does anyway. Set
    once per process (later calls return at once). A no-op (False) where libc is not glibc.
    """
    global _KEEPING_FREED_MEMORY
    if _KEEPING_FREED_MEMORY is not None:
        return _KEEPING_FREED_MEMORY
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):  # macOS, musl without mallopt, Windows
        _KEEPING_FREED_MEMORY = False
        return False
    ok = mallopt(_MALLOPT_MMAP_THRESHOLD, 1 << 30) == 1
    ok = mallopt(_MALLOPT_TRIM_THRESHOLD, 1 << 30) == 1 and ok
    _KEEPING_FREED_MEMORY = ok
    return ok


def release_freed_cpu_memory() -> None:
    """Give back to the kernel the freed memory :func:`keep_freed_cpu_memory` has kept so far.

    Called between the phases of a step that runs several different batch loops (evaluate:
    the test and val passes, the membership audit, slices, robustness). Each phase's freed
    activations stay in the heap, in blocks of its own sizes that the next phase cannot always
    reuse, so without this the kept memory piled up phase after phase and grew with N:
    evaluate's anonymous memory was 1,638 MB at 10k rows and 2,050 MB at 40k (64 x 64 images);
    trimmed between phases it ends at 358 and 380 MB and peaks at the largest phase
    (bench/README.md, bench/stream_memory.py). Within a phase the blocks are still kept, so
    the batches do not fault their memory in again. A no-op unless memory is being kept.
    """
    if not _KEEPING_FREED_MEMORY:
        return
    _libc().malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library (found once: ``find_library`` runs ``ldconfig``, and training releases
    every 10 s)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def available_memory_bytes() -> Optional[int]:
    """The memory this machine can give a process now without swapping (the kernel's
    ``MemAvailable``: free memory plus the page cache it can drop); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
