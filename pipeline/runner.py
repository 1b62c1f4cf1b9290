"""The one runner every step goes through, whether started by a person or by ``dvc repro``.

``run_step("clean", "digits")``:

1. loads and validates the variant's params (one clear error for a bad key);
2. hands the step's glue (``stages/<step>.py: run(ctx)``) a :class:`StepContext`: the spec,
   the upstream inputs resolved from the registry (``ctx.dataset("collect")`` reads and
   checks a dataset), and an empty temporary output directory ``ctx.out``;
3. on success renames ``ctx.out`` over ``data/<v>/<step>/`` in one step (a failed or
   interrupted step leaves the previous output as it was);
4. records what the run used in ``data/resources/<v>/<step>.json`` and where it ran in
   ``data/runs/<v>/<step>.json`` (neither is a stage output, so they never change a hashed
   output or ``dvc.lock``) and prints one summary line on stderr.

Steps never open their own output directory, never time themselves and never print their
own summary: that all happens here, once.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline import steps as registry
from pipeline.errors import FmpipeError

log = logging.getLogger("fmpipe")

# Set to 0 to skip resource accounting (the test that proves it changes no hashed output).
ACCOUNTING_ENV = "FMPIPE_RESOURCES"


def step_path(template: str, variant: str) -> Path:
    return Path(template.format(v=variant))


@dataclass
class StepContext:
    """What a step's glue gets: its params, its inputs, and a place to write its outputs."""

    step: registry.Step
    variant: str
    params_path: str
    spec: Any  # pipeline.config.VariantSpec
    out: Path  # write outputs here (a temp dir the runner renames into place on success)
    flags: dict[str, bool] = field(default_factory=dict)
    summary: str = ""  # the step's one-line account, printed by the runner
    result: Any = None  # what run_step returns (the step's report, metrics, lineage, ...)
    figures: dict[str, Any] = field(default_factory=dict)  # extra resource metrics (train)
    details: dict[str, Any] = field(default_factory=dict)  # extra run-record fields (train)
    # A gate that failed after its evidence was written (validate): the runner commits the
    # outputs so people can read them, then raises this.
    failure: Optional[str] = None
    # False on a DDP rank other than 0: rank 0 alone records resources and reports.
    record: bool = True
    _datasets: dict[str, Any] = field(default_factory=dict)

    @property
    def final_dir(self) -> Path:
        return step_path(self.step.dir, self.variant)

    def input(self, ref: str) -> Path:
        """Path of one of the step's declared inputs: ``"annotate"`` or ``"train/model.json"``."""
        if ref not in self.step.reads and ref.split("/", 1)[0] not in self.step.reads:
            raise KeyError(f"step {self.step.name!r} does not declare {ref!r} as an input")
        return step_path(f"{registry.DATA}/{ref}", self.variant)

    def source(self, template: str) -> Path:
        if template not in self.step.sources:
            raise KeyError(f"step {self.step.name!r} does not declare {template!r} as a source")
        return step_path(template, self.variant)

    def dataset(self, ref: str):
        """The dataset an upstream step wrote, read once and checked against its manifest."""
        if ref not in self._datasets:
            from pipeline.manifest import read_dataset

            self._datasets[ref] = read_dataset(self.input(ref))
        return self._datasets[ref]

    def previous(self, name: str) -> Path:
        """A file of this step's last good output (before this run replaces it)."""
        return self.final_dir / name


def run_step(name: str, variant: str, params_path: str = "params.yaml", **flags: bool) -> Any:
    """Run one step of one variant through the registry; raises FmpipeError on bad input."""
    import importlib

    from pipeline.config import load_variant
    from pipeline.console import setup_console
    from pipeline.io import atomic_dir
    from pipeline.resources import ResourceMeter

    setup_console()
    step = registry.get(name)
    spec = load_variant(variant, params_path)
    glue = importlib.import_module(step.module)
    final = step_path(step.dir, variant)
    accounting = os.environ.get(ACCOUNTING_ENV, "1") != "0"

    with ResourceMeter() as meter:
        if step.writes_itself:
            ctx = StepContext(step, variant, params_path, spec, final, dict(flags))
            glue.run(ctx)
        else:
            with atomic_dir(final) as tmp:
                ctx = StepContext(step, variant, params_path, spec, tmp, dict(flags))
                glue.run(ctx)
            ctx.out = final
    if not ctx.record:
        return ctx.result

    if accounting:
        inputs = [step_path(f"{registry.DATA}/{r}", variant) for r in step.reads]
        inputs += [step_path(s, variant) for s in step.sources]
        outputs = [step_path(p, variant) for p, _ in step.out_paths()]
        res = meter.result(inputs, outputs, ctx.figures)
        res.write(step_path(step.resources, variant))
        meter.record(name, ctx.details).write(step_path(step.run_record, variant))
        cost = f" [{res.wall_s:.1f} s, {res.cpu_s:.1f} s CPU, {res.peak_mb / 1024:.2f} GB peak]"
    else:
        cost = ""
    print(f"fmpipe {name} --stage {variant}: {ctx.summary or 'done'}{cost}", file=sys.stderr)
    if ctx.failure:
        raise FmpipeError(ctx.failure)
    return ctx.result


def run_all(variant: str, params_path: str = "params.yaml", start: Optional[str] = None) -> None:
    """Every step of a variant in lifecycle order (``fmpipe run``), without DVC."""
    order = list(registry.ORDER)
    if start is not None:
        order = order[order.index(registry.get(start).name):]
    for name in order:
        run_step(name, variant, params_path)
