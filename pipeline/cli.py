"""``fmpipe``: one command per lifecycle step, the same commands dvc.yaml runs.

Only typer is imported at start-up; each command imports its step (and with it torch,
lightning or great_expectations) when it runs, so ``fmpipe --help`` stays instant.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Callable, Optional

import typer

from pipeline.boundary import Group, doing
from pipeline.steps import ORDER, STEPS, STUDENT_STEPS


def _flag_type_hidden() -> None:
    """typer 0.29 with click 8.3+ prints ``<bool>`` beside plain flags (``--json <bool>``), which
    reads as if the flag took a value. A flag takes none: show no type for it."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_fmpipe", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._fmpipe = True
    TyperOption.display_type_rich = display_type_rich


_flag_type_hidden()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"fmpipe {version('fmpipe')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("fmpipe (not installed: no version recorded)")
        raise typer.Exit()


class _LifecycleOrder(Group):
    """Typer lists sub-apps after commands; list the registered steps first, in lifecycle order
    (``review`` is a sub-app), then everything else."""

    def list_commands(self, ctx):
        names = list(self.commands)
        return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


app = typer.Typer(
    cls=_LifecycleOrder,
    help=f"Reproducible classifier lifecycle: {' -> '.join(ORDER)} (people's decisions from review feed "
    "annotate). Run one step of one variant with `fmpipe STEP --stage NAME`, or the whole DAG with `dvc repro`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StageOpt = typer.Option(..., "--stage", "-s", help="Pipeline variant from params.yaml (see `fmpipe stages`).")
ParamsOpt = typer.Option("params.yaml", "--params", help="Params file.")


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print fmpipe's version and exit."),
) -> None:
    """Options before any command (--version); the help text above is the app's."""


def _dvc_hint(variant: str, steps: list[str]) -> None:
    """After steps run by hand in a DVC project (not by `dvc repro`): data/.gitignore keeps their
    outputs out of git, but dvc.lock still describes the previous ones until DVC records these."""
    if "DVC_STAGE" in os.environ or not Path("dvc.yaml").is_file():
        return
    targets = " ".join(f"{s}@{variant}" for s in steps)
    typer.echo(f"fmpipe: run outside `dvc repro`, so dvc.lock does not record these outputs; "
               f"`dvc commit -f {targets}` records them (`dvc repro` re-runs what changed)", err=True)


def _run_step(step: str, variant: str, params: str, hint: bool = True, **flags: bool) -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    from pipeline.runner import run_step

    shown = variant if len(variant) <= 64 else f"{variant[:40]}..."  # a 300-character name: not twice in full
    doing(f"fmpipe {step} --stage {shown}")  # `fmpipe run`: the step that failed
    if step == "validate" and flags.pop("init", False):
        # Writes a source file people curate, not a step output: no runner, no outputs.
        from pipeline.config import load_variant
        from pipeline.quality.expectations import init_command

        load_variant(variant, params)  # an unknown variant is a clear error first
        init_command(variant, force=flags.get("force", False))
        return
    flags.pop("force", None)
    run_step(step, variant, params, **flags)
    if hint:
        _dvc_hint(variant, [step])


def _step_command(step) -> Callable:
    """A typer command for a registered step: --stage, --params and the step's own flags."""

    def command(stage: str, params: str, **flags: bool) -> None:
        _run_step(step.name, stage, params, **flags)

    # typer reads the signature: build it from the registry entry.
    parameters = [
        inspect.Parameter("stage", inspect.Parameter.KEYWORD_ONLY, default=StageOpt, annotation=str),
        inspect.Parameter("params", inspect.Parameter.KEYWORD_ONLY, default=ParamsOpt, annotation=str),
        *(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                            default=typer.Option(False, f"--{f.name}", help=f.help)) for f in step.flags),
    ]
    command.__signature__ = inspect.Signature(parameters)
    command.__name__ = step.name
    command.__doc__ = step.help
    return command


review_app = typer.Typer(
    cls=Group,
    help="The trained model ranks suspect labels, near-duplicates and outliers into a queue for "
    "people (data/<variant>/review/); `fmpipe review pool` queues logged production inputs the same way; "
    "`fmpipe review import` brings their Label Studio export back.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@review_app.callback()
def review(
    ctx: typer.Context,
    stage: Optional[str] = typer.Option(None, "--stage", "-s", help="Pipeline variant from params.yaml."),
    params: str = ParamsOpt,
) -> None:
    """Queue suspect rows for review (fmpipe review --stage V), or import decisions (fmpipe review import)."""
    if ctx.invoked_subcommand is not None:
        return
    if stage is None:
        typer.echo("fmpipe review: error: --stage is required (or a subcommand: import, pool)", err=True)
        raise typer.Exit(2)
    _run_step("review", stage, params)


@review_app.command("import")
def review_import(
    file: str = typer.Argument(..., help="A Label Studio JSON export (or an id,label,note CSV)."),
    stage: str = StageOpt,
    name: Optional[str] = typer.Option(None, "--name", help="File name in annotations/<variant>/ (default: the file's own)."),
) -> None:
    """Check a Label Studio export against the variant's data, then copy it into annotations/<variant>/."""
    from pipeline.review.importing import import_decisions

    doing(f"fmpipe review import --stage {stage}")
    typer.echo(import_decisions(file, stage, name=name))


@review_app.command("pool")
def review_pool(
    log: str = typer.Argument(..., help="A request log folder (`fmpipe serve --log DIR`)."),
    stage: str = StageOpt,
    size: Optional[int] = typer.Option(None, "--size", min=1, help="Label Studio tasks to write (default review.queue_size)."),
) -> None:
    """Pool a request log's inputs in annotations/<variant>/pool/ and rank the unlabelled ones for Label Studio."""
    from pipeline.monitoring.queue import pool_log

    doing(f"fmpipe review pool --stage {stage}")
    typer.echo(pool_log(stage, log, size=size))


# Registered in lifecycle order, which is the order `fmpipe --help` lists them. review has a
# subcommand (import), so it is a sub-app; _LifecycleOrder keeps it in its place in --help.
for _step in STEPS:
    if _step.name == "review":
        app.add_typer(review_app, name="review")
    else:
        app.command(name=_step.name, help=_step.help)(_step_command(_step))
for _step in STUDENT_STEPS:  # `--stage` names a student of params.yaml: distill
    app.command(name=_step.name, help=_step.help)(_step_command(_step))

# Deployment (predict / verify / serve a package, no torch): their own module, listed after the steps.
from pipeline.deploy_cli import register as _register_deploy  # noqa: E402

_register_deploy(app)
from pipeline.monitor_cli import register as _register_monitor  # noqa: E402

_register_monitor(app)


@app.command()
def run(
    stage: str = StageOpt,
    params: str = ParamsOpt,
    from_step: Optional[str] = typer.Option(None, "--from", help="Start at this step."),
) -> None:
    """Run every step of one variant in order, without DVC (no caching, no dvc.lock)."""
    steps = list(ORDER)
    if from_step is not None:
        if from_step not in steps:
            typer.echo(f"fmpipe run: error: unknown step {from_step!r} (steps: {', '.join(steps)})", err=True)
            raise typer.Exit(2)
        steps = steps[steps.index(from_step):]
    for step in steps:
        typer.echo(f"==> fmpipe {step} --stage {stage}", err=True)
        _run_step(step, stage, params, hint=False)
    _dvc_hint(stage, steps)


@app.command()
def resources(
    stage: Optional[str] = typer.Option(None, "--stage", "-s", help="Variant (default: every variant with records)."),
    all_variants: bool = typer.Option(False, "--all", help="Every variant that has records."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
    wide: bool = typer.Option(False, "--wide", help="Every column, however wide (default: fit the terminal)."),
) -> None:
    """What each step's last run used (time, CPU, memory, data moved), per step and in total."""
    from pipeline.resource_table import collect, render

    tables = collect(None if (all_variants or stage is None) else stage)
    typer.echo(render(tables, as_json=as_json, wide=wide))


# `fmpipe audit ...` (history, diff, model) is its own sub-app (typer only at import);
# `fmpipe diff` is the same command as `fmpipe audit diff`, kept for existing docs and scripts.
from pipeline.audit_cli import audit_app, diff_command  # noqa: E402

app.command(name="diff", help="Row-level differences of a variant's dataset between two versions "
            "(same as `fmpipe audit diff`).")(diff_command)
app.add_typer(audit_app, name="audit")


variant_app = typer.Typer(cls=Group, help="Add a variant for your own data (an image folder or a CSV).", no_args_is_help=True)
app.add_typer(variant_app, name="variant")


@variant_app.command("add")
def variant_add(
    name: str = typer.Argument(..., help="The new variant's name (letters, digits, '_', '-'; at most 64)."),
    source: str = typer.Option(..., "--source", help="An image folder (<class>/<file> or <split>/<class>/<file>), "
                               "an archive of one, or a CSV file with a label column."),
    enable: bool = typer.Option(False, "--enable", help="Also add it to `enabled`, so `dvc repro` runs it."),
    label_column: str = typer.Option("label", "--label-column", help="CSV: the column holding the class."),
    split_column: Optional[str] = typer.Option(None, "--split-column", help="CSV: a column giving each row's "
                                               "split (train, val, test; empty: the collect step decides)."),
    description: Optional[str] = typer.Option(None, "--description", help="One line for reports and `fmpipe stages`."),
    params: str = ParamsOpt,
) -> None:
    """Read the data and write everything a variant needs: its params section (values that fit the
    data), its GX suite, an empty decisions file and the source link DVC tracks."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    from pipeline.variants import add_variant

    doing(f"fmpipe variant add {name}")
    typer.echo(add_variant(name, source, enable=enable, params_path=params,
                           label_column=label_column, description=description, split_column=split_column))


@app.command()
def compare(
    a: str = typer.Argument(..., help="Old side: a git revision or branch, a DVC experiment name, 'workspace', "
                            "or a package directory / .tar.gz."),
    b: str = typer.Argument("workspace", help="New side (same kinds as A; default: the workspace)."),
    stage: Optional[str] = typer.Option(None, "--stage", "-s", help="Only this variant (default: every variant both hold)."),
    as_json: bool = typer.Option(False, "--json", help="Print every difference as JSON."),
    as_md: bool = typer.Option(False, "--md", help="Print the comparison as Markdown."),
) -> None:
    """What changed from A to B: params, metrics and per-class scores, data rows (added, removed,
    relabelled per split), the model and its lineage."""
    from pipeline.audit_cli import _emit, _one_format

    _one_format(as_json, as_md, "fmpipe compare")
    from pipeline.compare import compare as build, markdown, text_lines

    result = build(a, b, ".", stage)
    _emit(result, as_json, lambda r: "\n".join(text_lines(r)), markdown, as_md)


@app.command()
def stages(params: str = ParamsOpt) -> None:
    """List the variants defined in params.yaml, which ones `dvc repro` runs, and which need data
    that is not in the repository (a download or a local copy)."""
    from pipeline.config import load_params

    p = load_params(params)
    from pipeline.sources import data_needed

    for name, spec in p.variants.items():
        flag = "enabled " if name in p.enabled else "optional"
        typer.echo(f"{name:12s} {flag}  {spec.source.kind:12s} {spec.model.name:14s} {spec.description}")
        need = data_needed(spec.source)
        if need:
            typer.echo(f"{'':12s} needs data: {need}")
    for name, student in p.distill.items():  # `fmpipe distill --stage NAME`; dvc repro runs each
        typer.echo(f"{name:12s} student   {'of ' + student.teacher:12s} {student.model.name:14s} "
                   f"{student.description or 'distilled from ' + student.teacher}")


@app.command()
def plots(
    targets: Optional[list[str]] = typer.Argument(None, help="Plot files or ids (default: every plot in dvc.yaml)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder (default: dvc_plots)."),
    install: bool = typer.Option(False, "--install", help="Make plain `dvc plots show/diff` offline in this checkout "
                                 "(writes .dvc/tmp/fmpipe-offline-plots.html, sets plots.html_template in .dvc/config.local)."),
) -> None:
    """`dvc plots show` whose page works offline: Vega's JavaScript inlined, not loaded from a CDN."""
    from pipeline.report import offline_plots

    if install:
        path = offline_plots.install()
        typer.echo(f"fmpipe plots: wrote {path}; `dvc plots show` now renders offline in this checkout")
        return
    page = offline_plots.show(targets or [], out=out)
    typer.echo(f"fmpipe plots: {page}")


warm_app = typer.Typer(cls=Group, help="The warm server that starts `fmpipe` commands in a fraction of a second "
                       "(pipeline/warm.py; FMPIPE_WARM=0 runs every command cold).", no_args_is_help=True)
app.add_typer(warm_app, name="warm")


@warm_app.command("status")
def warm_status() -> None:
    """List this user's warm servers: the code each serves, its memory and how many commands it ran."""
    import time

    from pipeline.warm import servers

    found = servers()
    if not found:
        typer.echo("fmpipe warm: no server running (the next command starts one)")
    for meta in found:
        rss = f"{meta['rss_mb']:.0f} MB" if meta.get("rss_mb") else "?"
        if meta.get("ready") is None:
            typer.echo(f"pid {meta['pid']:<7} {meta['key']}  starting (importing the libraries)  {rss:>8}")
            continue
        typer.echo(f"pid {meta['pid']:<7} {meta['key']}  {meta['served']:>5} commands  {rss:>8}  "
                   f"up {time.time() - meta['ready']:.0f} s  code {meta['roots'][0]}")


@warm_app.command("stop")
def warm_stop() -> None:
    """Stop this user's warm servers (a command they are running finishes first)."""
    from pipeline.warm import stop_servers

    typer.echo(f"fmpipe warm: stopped {stop_servers()} server(s)")
