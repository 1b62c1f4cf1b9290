"""The one place a lifecycle step is declared.

Each :class:`Step` says what the step reads (upstream steps' outputs, files people edit),
which params sections it uses, what it writes, and which function does the work. From this
registry come:

- the ``fmpipe`` commands and their order in ``fmpipe --help`` (``pipeline/cli.py``);
- the lifecycle order ``fmpipe run`` follows and the upstream list package records;
- the input/output paths the runner (``pipeline/runner.py``) resolves for every step;
- ``tests/test_registry.py``, which fails when ``dvc.yaml`` and this registry disagree
  (deps, params, outs, metrics, plots), so the two cannot drift.

Paths are templates: ``{v}`` is the variant. Step outputs live under ``data/{v}/<step>/``.
Through the runner every step also writes what its run used to ``data/resources/{v}/<step>.json``
(numbers; dvc.yaml's top-level ``metrics:``, so ``dvc metrics show`` and ``dvc exp show``
compare them) and where it ran to ``data/runs/{v}/<step>.json`` (strings, git-ignored).
Neither is a stage output: they change on every run, and a stage output would put their
hashes into ``dvc.lock``. This module imports nothing heavy: ``fmpipe --help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

DATA = "data/{v}"
RESOURCES_DIR = "data/resources/{v}"
RUNS_DIR = "data/runs/{v}"

OutKind = Literal["out", "metric", "plot"]


@dataclass(frozen=True)
class Out:
    """One declared output, relative to the step's directory ('' is the directory itself)."""

    path: str = ""
    kind: OutKind = "out"
    cache: bool = True
    plot: dict = field(default_factory=dict, hash=False, compare=False)  # DVC plot props


@dataclass(frozen=True)
class Flag:
    """An extra boolean option of a step's command (``fmpipe train --resume``)."""

    name: str
    help: str


@dataclass(frozen=True)
class Step:
    name: str
    help: str
    module: str  # "stages.<name>": its ``run(ctx)`` is the step's glue
    reads: tuple[str, ...] = ()  # "<step>" (its whole directory) or "<step>/<file>"
    sources: tuple[str, ...] = ()  # files outside data/ that people edit, e.g. annotations
    code: tuple[str, ...] = ()  # code the step's result depends on (dvc.yaml deps)
    params: tuple[str, ...] = ()  # sections of variants.<v>
    outs: tuple[Out, ...] = (Out(),)
    flags: tuple[Flag, ...] = ()
    # The step writes its own directory (train: checkpoints and DDP ranks need it); the
    # runner then does not hand it a temporary directory.
    writes_itself: bool = False
    writes_dataset: bool = False  # its output follows the dataset contract (pipeline/manifest.py)

    @property
    def dir(self) -> str:
        return f"{DATA}/{self.name}"

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.split("/", 1)[0] for r in self.reads))

    @property
    def resources(self) -> str:
        return f"{RESOURCES_DIR}/{self.name}.json"

    @property
    def run_record(self) -> str:
        return f"{RUNS_DIR}/{self.name}.json"

    def out_paths(self) -> list[tuple[str, Out]]:
        return [(f"{self.dir}/{o.path}".rstrip("/"), o) for o in self.outs]

    def dep_paths(self) -> list[str]:
        return [*self.code, *(f"{DATA}/{r}" for r in self.reads), *self.sources]


_DATASET_CODE = ("pipeline/manifest.py",)

STEPS: tuple[Step, ...] = (
    Step(
        name="collect",
        writes_dataset=True,
        help="Load the variant's source and split it into train/val/test.",
        module="stages.collect",
        code=("stages/collect.py", "pipeline/sources", "pipeline/splitting.py", *_DATASET_CODE),
        params=("source", "split"),
    ),
    Step(
        name="clean",
        writes_dataset=True,
        help="Drop invalid rows and exact duplicates, each removal listed with its reason.",
        module="stages.clean",
        reads=("collect",),
        code=("stages/clean.py", "pipeline/quality", *_DATASET_CODE),
        params=("clean",),
    ),
    Step(
        name="validate",
        help="Run the Great Expectations suite on the cleaned data; fail on any broken expectation.",
        module="stages.validate",
        reads=("clean",),
        code=("stages/validate.py", "pipeline/quality"),
        params=("validate",),
        # Not the directory: GX's Data Docs (data_docs/) carry run times in page names, so they
        # are a per-run report beside these two files, ignored by git and not in dvc.lock.
        outs=(Out("summary.json"), Out("results.json")),
    ),
    Step(
        name="annotate",
        writes_dataset=True,
        help="Apply people's decisions from annotations/<variant>/ (Label Studio exports, CSV).",
        module="stages.annotate",
        reads=("clean", "validate/summary.json"),
        sources=("annotations/{v}",),
        code=("stages/annotate.py", "pipeline/review/decisions.py", *_DATASET_CODE),
    ),
    Step(
        name="train",
        help="Train the variant's model with PyTorch Lightning on the configured accelerator.",
        module="stages.train",
        reads=("annotate",),
        code=("stages/train.py", "pipeline/training", "pipeline/models"),
        params=("model", "train"),
        outs=(
            Out("model.safetensors"),
            Out("model.json"),
            # DVCLive's last values: kept out of `dvc metrics show` (test metrics and the curves
            # say it better), but tracked so a change shows in dvc.lock.
            Out("live/metrics.json", cache=False),
            Out("live/plots/metrics", kind="plot", cache=False, plot={"x": "step"}),
        ),
        flags=(Flag("resume", "Continue from the last checkpoint of an interrupted run."),),
        writes_itself=True,
    ),
    Step(
        name="evaluate",
        help="Score the trained model on the test split and decide its blessing.",
        module="stages.evaluate",
        reads=("train/model.safetensors", "train/model.json", "annotate"),
        code=("stages/evaluate.py", "pipeline/packaging"),
        params=("evaluate", "train"),
        outs=(
            Out("predictions.parquet"),
            Out("blessing.json"),
            Out("metrics.json", kind="metric", cache=False),
            Out("confusion.csv", kind="plot", cache=False,
                plot={"template": "confusion", "x": "actual", "y": "predicted"}),
            Out("per_class.csv", kind="plot", cache=False,
                plot={"template": "bar_horizontal", "x": "f1", "y": "class"}),
        ),
    ),
    Step(
        name="package",
        help="Export the blessed model: safetensors, ONNX (checked), model card, lineage.",
        module="stages.package",
        reads=("train/model.safetensors", "train/model.json", "evaluate/blessing.json",
               "evaluate/metrics.json", "annotate"),
        code=("stages/package.py", "pipeline/packaging"),
        params=("package", "description"),  # + every upstream input: _depending_on_all_upstream
    ),
    Step(
        name="review",
        help="The trained model queues suspect labels, near-duplicates and outliers for people "
        "(Label Studio import, contact sheet); `fmpipe review import` brings their export back.",
        module="stages.review",
        reads=("train/model.safetensors", "train/model.json", "annotate"),
        code=("stages/review.py", "pipeline/review", "pipeline/quality/embedders.py",
              "pipeline/quality/neighbors.py"),
        params=("review", "train"),
    ),
)



def _depending_on_all_upstream(step: Step) -> Step:
    """``step`` plus every input and output of its upstream steps as its own inputs.

    package records the ``dvc.lock`` entries of every upstream stage in ``lineage.json``; with
    all of their code, params, sources and outputs as its deps, that record is a function of
    declared inputs: any upstream change re-packages, and ``dvc repro --force`` rewrites the
    package byte for byte (an upstream re-run with identical outputs would otherwise leave a
    stale entry in the lineage).
    """
    by_name = {s.name: s for s in STEPS}
    seen: list[str] = []
    todo = [r.split("/", 1)[0] for r in step.reads]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.append(name)
            todo += [r.split("/", 1)[0] for r in by_name[name].reads]
    ups = [by_name[n] for n in (s.name for s in STEPS) if n in seen]
    reads, code, params, sources = list(step.reads), list(step.code), list(step.params), list(step.sources)
    for u in ups:
        code += u.code
        sources += u.sources
        params += u.params
        reads += [f"{u.name}/{o.path}".rstrip("/") for o in u.outs]
    uniq = lambda items: tuple(dict.fromkeys(items))  # noqa: E731  (order kept, duplicates dropped)
    return replace(step, reads=uniq(reads), code=uniq(code), params=uniq(params), sources=uniq(sources))


STEPS = tuple(_depending_on_all_upstream(s) if s.name == "package" else s for s in STEPS)
BY_NAME: dict[str, Step] = {s.name: s for s in STEPS}
ORDER: tuple[str, ...] = tuple(s.name for s in STEPS)
DATASET_STEPS: tuple[str, ...] = tuple(s.name for s in STEPS if s.writes_dataset)


def get(name: str) -> Step:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown step {name!r} (steps: {', '.join(ORDER)})") from None


def upstream_of(name: str) -> list[str]:
    """Every step whose output ``name`` depends on, directly or not, in lifecycle order."""
    seen: set[str] = set()
    todo = list(get(name).upstream)
    while todo:
        step = todo.pop()
        if step not in seen:
            seen.add(step)
            todo.extend(get(step).upstream)
    return [s for s in ORDER if s in seen]
