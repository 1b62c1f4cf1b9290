"""CPU speed of one training step of the cifar recipe, side by side: fp32 vs bf16 autocast
(oneDNN), torch.compile, thread counts, channels_last.

Not a test: it prints figures (bench/README.md has the ones measured and the load).

    python bench/cpu_speed.py                                  # all configs, 3 rounds x 5 steps
    python bench/cpu_speed.py --configs fp32,bf16 --rounds 5 --steps 5
    python bench/cpu_speed.py --batch-size 256 --steps 3 --rounds 1   # quick smoke run

Every config trains its own copy of the variant's network (params.yaml, default ``cifar``:
the airbench net with the recipe's parameter groups and SGD) on the same random batches
(the step time does not depend on pixel values). All configs are built and warmed up first
(compile happens there), then timed in rounds whose order rotates, so that drift in the
machine's load hits all of them alike; the figure is the median s/step over rounds.

Configs:
  fp32          float32, channels_last, torch's default threads (the committed default)
  fp32_nchw     float32, contiguous NCHW
  bf16          torch.autocast("cpu", bfloat16) around the forward, channels_last (the
                ``precision: bf16-mixed`` path; uses oneDNN's AVX512-BF16/AMX kernels if the CPU has them)
  compile       net.compile() (inductor), float32, channels_last
  compile_bf16  compile + bf16 autocast
  fp32_t1       fp32 with torch.set_num_threads(1)

bf16 changes the numbers: check accuracy with ``bench/train_recipe.py --set precision=bf16-mixed``.

``--keep-freed-memory`` sets glibc's malloc thresholds the way ``fmpipe train`` does on a CPU
(``pipeline.resources.keep_freed_cpu_memory``): freed activations stay in the heap instead
of going back to the kernel and faulting in again next step. It is process-wide, so compare
two runs, alternating (with, without, with, without); each run prints the minor page faults
per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALL = ["fp32", "fp32_nchw", "bf16", "compile", "compile_bf16", "fp32_t1"]


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ["avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"]
    return " ".join(f for f in wanted if f" {f}" in flags) or "no avx512/amx"


class Config:
    def __init__(self, name: str, spec, x, y, threads: int) -> None:
        import torch

        from pipeline.models import build
        from pipeline.training.recipe import apply_frozen, make_optimizer, optimizer_groups, resolve_param_groups

        self.name = name
        self.bf16 = "bf16" in name
        self.channels_last = name != "fp32_nchw"
        self.threads = 1 if name.endswith("_t1") else threads
        torch.manual_seed(0)
        net = build(spec.model.name, tuple(x.shape[1:]), 10, spec.model.options)
        groups = resolve_param_groups(net, spec.train.param_groups)
        apply_frozen(groups, 0)
        self.opt = make_optimizer(optimizer_groups(groups, spec.train.optimizer), spec.train.optimizer)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if name.startswith("compile"):
            net.compile()
        self.net = net.train()
        self.x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        self.y = y
        self.smoothing = spec.train.label_smoothing
        self.faults: list[float] = []  # minor page faults per step, per timed round

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.net(self.x)
        loss = F.cross_entropy(logits.float(), self.y, label_smoothing=self.smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def time(self, steps: int) -> float:
        import resource

        import torch

        torch.set_num_threads(self.threads)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
        return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="cifar")
    ap.add_argument("--configs", default=",".join(ALL))
    ap.add_argument("--batch-size", type=int, default=None, help="default: the variant's")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per config per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per config first (compile, oneDNN)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed blocks (what fmpipe train sets on a CPU)")
    args = ap.parse_args()

    import torch

    if args.keep_freed_memory:
        from pipeline.resources import keep_freed_cpu_memory

        print(f"keep freed memory: {keep_freed_cpu_memory()}")

    from pipeline.config import load_variant

    spec = load_variant(args.variant, REPO / "params.yaml")
    bs = args.batch_size or spec.train.batch_size
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (bs, 3, 32, 32), generator=gen).float()
    y = torch.randint(0, 10, (bs,), generator=gen)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in ALL]
    if unknown:
        sys.exit(f"unknown configs {unknown} (known: {', '.join(ALL)})")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {threads}, "
          f"oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}, CPU flags: {cpu_flags()}; "
          f"{args.variant} {spec.model.name} batch {bs}; load average {os.getloadavg()[0]:.2f}", flush=True)

    configs: dict[str, Config] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            c = Config(name, spec, x, y, threads)
            torch.set_num_threads(c.threads)
            for _ in range(args.warmup):
                c.step()
        except Exception as exc:  # compile needs a C++ toolchain; report and go on
            print(f"  {name}: failed to set up ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", flush=True)
            continue
        configs[name] = c
        print(f"  {name}: ready in {time.perf_counter() - t0:.1f} s", flush=True)

    times: dict[str, list[float]] = {n: [] for n in configs}
    order = list(configs)
    for r in range(args.rounds):
        rot = order[r % len(order):] + order[:r % len(order)]
        for name in rot:
            times[name].append(configs[name].time(args.steps))
        print(f"  round {r}: " + ", ".join(f"{n} {times[n][-1]:.3f}" for n in order) + " s/step", flush=True)
    torch.set_num_threads(threads)

    base = statistics.median(times["fp32"]) if "fp32" in times else None
    print(f"\nmedian s/step over {args.rounds} rounds x {args.steps} steps (batch {bs}); "
          f"load average now {os.getloadavg()[0]:.2f}:")
    for name in order:
        med = statistics.median(times[name])
        rel = f"  x{base / med:.2f} vs fp32" if base else ""
        faults = statistics.median(configs[name].faults)
        print(f"  {name:13s} {med:7.3f} s/step  {bs / med:7.0f} img/s{rel}  {faults:9.0f} minor page faults/step")


if __name__ == "__main__":
    main()
