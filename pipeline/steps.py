"""The one place a lifecycle step is declared.

Each :class:`Step` says what the step reads (upstream steps' outputs, files people edit),
which params sections it uses, what it writes, and which function does the work. From this
registry come:

- the ``fmpipe`` commands and their order in ``fmpipe --help`` (``pipeline/cli.py``);
- the lifecycle order ``fmpipe run`` follows and the upstream list package records;
- every step output's path (:func:`output`, ``Step.path``; ``{v}`` is filled in by :func:`at`
  alone), which the runner (``pipeline/runner.py``) resolves for every step;
- the steps that write a dataset (``DATASET_STEPS``: what the audit versions and diffs);
- every "run ``fmpipe X --stage V`` first" hint (:func:`rerun_hint`, ``StepContext.rerun``),
  from the step that writes the missing output;
- ``tests/test_registry.py``, which fails when ``dvc.yaml`` and this registry disagree
  (deps, params, outs, metrics, plots), so the two cannot drift.

Paths are templates: ``{v}`` is the variant. Step outputs live under ``data/{v}/<step>/``.
Through the runner every step also writes what its run used to ``data/resources/{v}/<step>.json``
(numbers; ``fmpipe resources``) and where it ran to ``data/runs/{v}/<step>.json`` (strings).
Both are git-ignored and neither is a stage output nor a DVC metric: they change on every
run, so they would dirty the tree, churn ``dvc.lock`` and drown ``dvc metrics diff``. This module imports nothing heavy: ``fmpipe --help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

DATA = "data/{v}"
RESOURCES_DIR = "data/resources/{v}"
RUNS_DIR = "data/runs/{v}"
# What people put in the project per variant, each a step's declared source (dvc.yaml deps):
SOURCE = "sources/{v}"  # collect's: a link to a local folder/archive/CSV, or a note
SUITE = "expectations/{v}.json"  # validate's curated GX suite
ANNOTATIONS = "annotations/{v}"  # annotate's: Label Studio exports and id,label,note CSVs

OutKind = Literal["out", "metric", "plot"]


def at(template: str, variant: str) -> Path:
    """A registry path template for one variant: the one place ``{v}`` is filled in."""
    return Path(template.format(v=variant))


@dataclass(frozen=True)
class Out:
    """One declared output, relative to the step's directory ('' is the directory itself)."""

    path: str = ""
    kind: OutKind = "out"
    cache: bool = True
    # dvc.yaml `persist: true`: `dvc repro` then leaves the previous output in place while the
    # step runs (it deletes it by default), so a failed or interrupted step loses nothing; the
    # runner replaces it atomically on success. DVC still hashes and caches it.
    persist: bool = True
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
    # What `--stage` names: an enabled variant (params.yaml `enabled`, dvc.yaml `foreach:
    # ${enabled}`), or a distilled student (`distill`, `foreach: ${distill}`), whose ``reads``
    # are its teacher variant's outputs.
    over: Literal["enabled", "distill"] = "enabled"

    @property
    def dir(self) -> str:
        return f"{DATA}/{self.name}"

    def path(self, variant: str, name: str = "") -> Path:
        """``data/<variant>/<step>`` (or a file in it): where the step's output is, after a run."""
        return at(f"{self.dir}/{name}".rstrip("/"), variant)

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


# Code deps are what each step's module imports, transitively (pipeline/imports.py computes
# them; tests/test_registry.py fails when a list here differs from it). After adding an import,
# the test's message names what to add; a package directory stands for all of its files.

STEPS: tuple[Step, ...] = (
    Step(
        name="collect",
        writes_dataset=True,
        help="Load the variant's source and split it into train/val/test.",
        module="stages.collect",
        # The source's content (pipeline/sources/__init__.py: tracked_path): a local folder, archive
        # or CSV is hashed through sources/<v>, so a changed image re-runs collect.
        sources=(SOURCE,),
        code=("pipeline/artefacts.py", "pipeline/config.py", "pipeline/engine.py", "pipeline/imaging.py", "pipeline/io.py",
              "pipeline/manifest.py", "pipeline/payload.py", "pipeline/quality/__init__.py", "pipeline/quality/pii.py",
              "pipeline/reading.py", "pipeline/schema.py", "pipeline/sources", "pipeline/splitting.py",
              "stages/collect.py"),
        params=("source", "split"),
    ),
    Step(
        name="clean",
        writes_dataset=True,
        help="Find invalid rows, exact/near duplicates, leakage, unhealthy images; drop or flag each by policy.",
        module="stages.clean",
        reads=("collect",),
        code=("pipeline/artefacts.py", "pipeline/config.py", "pipeline/engine.py", "pipeline/io.py", "pipeline/manifest.py",
              "pipeline/models", "pipeline/payload.py", "pipeline/quality/__init__.py", "pipeline/quality/clean.py",
              "pipeline/quality/embedders.py", "pipeline/quality/neighbors.py", "pipeline/quality/rules.py",
              "pipeline/quality/sheet.py", "pipeline/schema.py", "stages/clean.py"),
        params=("clean",),
    ),
    Step(
        name="validate",
        help="Run the variant's curated GX suite (expectations/<stage>.json); critical failures stop, "
             "warnings are recorded.",
        module="stages.validate",
        reads=("clean",),
        sources=(SUITE,),
        code=("pipeline/artefacts.py", "pipeline/config.py", "pipeline/engine.py", "pipeline/io.py", "pipeline/manifest.py",
              "pipeline/payload.py", "pipeline/quality/__init__.py", "pipeline/quality/expectations.py", "pipeline/quality/gate.py",
              "pipeline/reading.py", "pipeline/schema.py", "stages/validate.py"),
        params=("validate",),
        flags=(Flag("init", "Write a starting suite, expectations/<stage>.json, from the current cleaned "
                            "data and params (then review and commit it); runs nothing else."),
               Flag("force", "With --init: overwrite an existing suite.")),
        # Not the directory: GX's Data Docs (data_docs/) carry run times in page names, so they
        # are a per-run report beside these two files, ignored by git and not in dvc.lock.
        outs=(Out("summary.json"), Out("results.json")),
    ),
    Step(
        name="annotate",
        writes_dataset=True,
        help="Apply people's decisions from annotations/<variant>/ (Label Studio exports, CSV), "
             "adding the labelled production inputs of its pool/.",
        module="stages.annotate",
        reads=("clean", "validate/summary.json"),
        sources=(ANNOTATIONS,),
        code=("pipeline/artefacts.py", "pipeline/config.py", "pipeline/engine.py", "pipeline/io.py", "pipeline/manifest.py",
              "pipeline/paths.py", "pipeline/payload.py", "pipeline/quality/__init__.py", "pipeline/quality/gate.py",
              "pipeline/reading.py", "pipeline/review/__init__.py", "pipeline/review/decisions.py",
              "pipeline/review/pool.py", "pipeline/schema.py", "stages/annotate.py"),
        params=("split",),  # split.pool: where labelled production inputs go
    ),
    Step(
        name="train",
        help="Train the variant's model with PyTorch Lightning on the configured accelerator.",
        module="stages.train",
        reads=("annotate",),
        code=("pipeline/artefacts.py", "pipeline/config.py", "pipeline/engine.py", "pipeline/inference/__init__.py",
              "pipeline/inference/tta.py", "pipeline/io.py", "pipeline/manifest.py", "pipeline/models",
              "pipeline/payload.py", "pipeline/schema.py", "pipeline/training", "stages/train.py"),
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
        # clean's findings.parquet: the rows it flagged are a slice (pipeline/evaluation/slices.py).
        # The directory, like package's dep on it, so the lineage names only package's deps.
        reads=("train/model.safetensors", "train/model.json", "annotate", "clean"),
        code=("pipeline/artefacts.py", "pipeline/config.py", "pipeline/engine.py", "pipeline/evaluation", "pipeline/filenames.py",
              "pipeline/inference/__init__.py", "pipeline/inference/batch.py", "pipeline/inference/network.py", "pipeline/inference/tta.py",
              "pipeline/io.py", "pipeline/manifest.py", "pipeline/models", "pipeline/palette.py",
              "pipeline/payload.py", "pipeline/plotting.py",
              "pipeline/schema.py", "stages/evaluate.py"),
        params=("evaluate", "train"),
        outs=(
            Out("predictions.parquet"),
            Out("blessing.json"),
            # calibration.json, reliability.png, mistakes.html (image variants): deterministic
            Out("details"),
            # every score (readers: package, report, audit); committed to git, uncached
            Out("metrics.json", cache=False),
            # The variant's DVC metric: the few figures people compare across runs, keyed by
            # variant so `dvc exp show` headers stay short (pipeline/evaluation/metrics.py).
            Out("figures.json", kind="metric", cache=False),
            Out("confusion.csv", kind="plot", cache=False,
                plot={"template": "confusion", "x": "predicted", "y": "actual"}),
            Out("per_class.csv", kind="plot", cache=False,
                plot={"template": "bar_horizontal", "x": "f1", "y": "class"}),
            # every slice's figures with 95% intervals (pipeline/evaluation/slices.py)
            Out("slices.csv", kind="plot", cache=False,
                plot={"template": "bar_horizontal", "x": "accuracy", "y": "name"}),
            # accuracy per corruption and severity (pipeline/evaluation/robustness.py)
            Out("robustness.csv", kind="plot", cache=False,
                plot={"template": "linear", "x": "severity", "y": "accuracy"}),
        ),
    ),
    Step(
        name="package",
        help="Export the blessed model: safetensors, ONNX (checked), model card, lineage.",
        module="stages.package",
        reads=("train/model.safetensors", "train/model.json", "evaluate/blessing.json",
               "evaluate/metrics.json", "evaluate/slices.csv", "evaluate/details", "annotate"),
        code=("pipeline/artefacts.py", "pipeline/config.py", "pipeline/engine.py", "pipeline/evaluation/__init__.py",
              "pipeline/evaluation/calibration.py", "pipeline/filenames.py", "pipeline/imaging.py",
              "pipeline/inference", "pipeline/io.py", "pipeline/manifest.py", "pipeline/models",
              "pipeline/packaging/__init__.py", "pipeline/packaging/build.py",
              "pipeline/packaging/deploy.py", "pipeline/packaging/lineage.py",
              "pipeline/packaging/model_card.py", "pipeline/packaging/onnx_export.py",
              "pipeline/packaging/quantize.py", "pipeline/payload.py", "pipeline/reading.py", "pipeline/schema.py",
              "stages/package.py"),
        params=("package", "description"),  # + every upstream input: _depending_on_all_upstream
    ),
    Step(
        name="dist",
        help="Archive the package (deterministic <variant>-<hash>.tar.gz) and lay out a Triton/KServe model repository, "
        "released only after a canary request to the served archive.",
        module="stages.dist",
        reads=("package",),
        # + pipeline/packaging/canary.py: the release waits for a served answer (its server runs
        # in a subprocess, `fmpipe serve`, whose code checks the release but never shapes its bytes).
        code=("pipeline/artefacts.py", "pipeline/config.py", "pipeline/filenames.py", "pipeline/imaging.py",
              "pipeline/inference/__init__.py", "pipeline/inference/runtime.py", "pipeline/inference/tta.py",
              "pipeline/io.py", "pipeline/packaging/__init__.py", "pipeline/packaging/canary.py",
              "pipeline/packaging/deploy.py", "pipeline/packaging/onnx_export.py", "pipeline/reading.py",
              "pipeline/schema.py", "stages/dist.py"),
    ),
    Step(
        name="review",
        help="The trained model queues suspect labels, near-duplicates and outliers for people "
        "(Label Studio import, contact sheet); `fmpipe review import` brings their export back.",
        module="stages.review",
        reads=("train/model.safetensors", "train/model.json", "annotate"),
        code=("pipeline/artefacts.py", "pipeline/config.py", "pipeline/engine.py", "pipeline/evaluation/__init__.py",
              "pipeline/evaluation/calibration.py", "pipeline/evaluation/explain.py", "pipeline/filenames.py", "pipeline/inference/__init__.py", "pipeline/inference/batch.py",
              "pipeline/inference/network.py", "pipeline/inference/tta.py", "pipeline/io.py",
              "pipeline/manifest.py", "pipeline/models", "pipeline/palette.py", "pipeline/payload.py",
              "pipeline/plotting.py", "pipeline/quality/__init__.py", "pipeline/quality/embedders.py", "pipeline/quality/finders.py",
              "pipeline/quality/neighbors.py", "pipeline/quality/rules.py", "pipeline/reading.py", "pipeline/review/__init__.py",
              "pipeline/review/decisions.py", "pipeline/review/export.py", "pipeline/review/review.py", "pipeline/review/scoring.py", "pipeline/schema.py",
              "pipeline/training", "stages/review.py"),
        params=("review", "train"),
    ),
    Step(
        name="report",
        help="Write data/<variant>/report/index.html: one self-contained page, data to package.",
        module="stages.report",
        # What the page shows; it also reads optional files (clean's findings, resources)
        # when they exist, without depending on them.
        reads=("clean", "validate/summary.json", "annotate", "train/live/metrics.json",
               "evaluate/predictions.parquet", "evaluate/metrics.json", "evaluate/slices.csv",
               "evaluate/robustness.csv", "package", "review"),
        code=("pipeline/artefacts.py", "pipeline/audit/__init__.py", "pipeline/audit/diff.py",
              "pipeline/audit/git.py", "pipeline/audit/model.py", "pipeline/audit/store.py",
              "pipeline/audit/version.py", "pipeline/compare.py", "pipeline/config.py",
              "pipeline/engine.py", "pipeline/evaluation/__init__.py", "pipeline/evaluation/robustness.py", "pipeline/evaluation/slices.py",
              "pipeline/filenames.py", "pipeline/io.py",
              "pipeline/manifest.py", "pipeline/palette.py", "pipeline/payload.py", "pipeline/plotting.py", "pipeline/quality/__init__.py",
              "pipeline/quality/finders.py", "pipeline/quality/neighbors.py", "pipeline/quality/rules.py", "pipeline/reading.py",
              "pipeline/report/__init__.py", "pipeline/report/changes.py", "pipeline/report/figures.py",
              "pipeline/report/html.py", "pipeline/report/page.py", "pipeline/report/readers.py",
              "pipeline/schema.py", "stages/report.py"),
        # The PNGs are deterministic: cached, and image plots for `dvc plots show`. The page
        # (index.html) shows timings that change run to run: written, but not declared, since
        # even an uncached output's hash goes into dvc.lock.
        outs=(Out("plots", kind="plot"),),
    ),
)


def _depending_on_all_upstream(step: Step) -> Step:
    """``step`` plus every input and output of its upstream steps as its own inputs.

    package records the ``dvc.lock`` entries of every upstream stage in ``lineage.json`` (and the
    variant's resolved params, so the schema's modules too: see the body); with
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
    # lineage.json also records the variant's whole resolved params, defaults filled in, so every
    # module the params schema is composed of is a dep too (review's finders declare theirs).
    code.append("pipeline/quality/finders.py")
    for u in ups:
        code += u.code
        sources += u.sources
        params += u.params
        reads += [f"{u.name}/{o.path}".rstrip("/") for o in u.outs]
    uniq = lambda items: tuple(dict.fromkeys(items))  # noqa: E731  (order kept, duplicates dropped)
    return replace(step, reads=uniq(reads), code=uniq(code), params=uniq(params), sources=uniq(sources))


STEPS = tuple(_depending_on_all_upstream(s) if s.name == "package" else s for s in STEPS)

# Steps run per distilled student (params.yaml: distill) rather than per enabled variant: not
# part of a variant's lifecycle (`fmpipe run`, the audit's step order), after it in dvc.yaml.
STUDENT_STEPS: tuple[Step, ...] = (
    Step(
        name="distill",
        over="distill",
        help="Train a distilled student (params.yaml: distill) from its teacher variant's model and data, "
             "and compare it with the teacher and with the same student trained without one.",
        module="stages.distill",
        reads=("train/model.safetensors", "train/model.json", "annotate"),  # the teacher's
        # distill.<student>, and these sections of the teacher's (the student's recipe and export)
        params=("train", "package"),
        code=("pipeline/artefacts.py", "pipeline/config.py", "pipeline/engine.py", "pipeline/evaluation/__init__.py",
              "pipeline/evaluation/calibration.py", "pipeline/evaluation/metrics.py", "pipeline/filenames.py",
              "pipeline/inference/__init__.py", "pipeline/inference/network.py", "pipeline/inference/tta.py",
              "pipeline/io.py", "pipeline/manifest.py", "pipeline/models", "pipeline/packaging/__init__.py",
              "pipeline/packaging/distill.py", "pipeline/packaging/onnx_export.py", "pipeline/payload.py",
              "pipeline/schema.py", "pipeline/training", "stages/distill.py"),
        outs=(
            Out("model.safetensors"),
            Out("model.json"),
            Out("model.onnx"),
            Out("baseline"),  # the same student trained without the teacher
            Out("comparison.json", cache=False),  # teacher / student / baseline figures (git)
            Out("figures.json", kind="metric", cache=False),
        ),
    ),
)
BY_NAME: dict[str, Step] = {s.name: s for s in (*STEPS, *STUDENT_STEPS)}
ORDER: tuple[str, ...] = tuple(s.name for s in STEPS)
DATASET_STEPS: tuple[str, ...] = tuple(s.name for s in STEPS if s.writes_dataset)


def get(name: str) -> Step:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown step {name!r} (steps: {', '.join(BY_NAME)})") from None


def output(ref: str, variant: str) -> Path:
    """The path of an output ``ref``: ``"clean"`` (a step's directory) or ``"evaluate/blessing.json"``."""
    step, _, name = ref.partition("/")
    return get(step).path(variant, name)


def rerun_hint(ref: str, variant: str, then: str = "first") -> str:
    """What a person types to (re)make the output ``ref`` (``"package"``, ``"train/model.json"``):
    ``run `fmpipe package --stage V` first``. Every "run this step" hint is built here, from
    the step that writes the output, so a renamed step or a moved output cannot leave a hint
    naming the wrong command."""
    step = get(ref.split("/", 1)[0]).name
    return f"run `fmpipe {step} --stage {variant}`" + (f" {then}" if then else "")


def listed(names, last: str = "or") -> str:
    """``collect, clean or annotate``: a list of step names for a message."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


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
