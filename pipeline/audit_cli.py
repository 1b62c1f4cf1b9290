"""``fmpipe audit``: the data history of a variant, row-level diffs, and a model's provenance.

A typer sub-app registered by ``pipeline/cli.py``. Only typer is imported here; the audit
library (pandas, DVC, rich) is imported inside each command, so ``fmpipe --help`` stays instant.
"""

from __future__ import annotations

from typing import Optional

import typer

from pipeline.boundary import Group, doing
from pipeline.steps import DATASET_STEPS, listed

audit_app = typer.Typer(
    cls=Group,
    help="Which data made a model, what changed between two data versions, every version of a "
    "variant's data across git history. `fmpipe audit --stage NAME` lists the versions.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _one_format(as_json: bool, as_md: bool, what: str) -> None:
    if as_json and as_md:
        typer.echo(f"{what}: error: --json and --md are alternatives; give one", err=True)
        raise typer.Exit(2)


def _emit(result, as_json: bool, text, markdown=None, as_md: bool = False) -> None:
    """Print a command's result as JSON, Markdown (``markdown(result)``) or ``text(result)``."""
    if as_json:
        from pipeline.io import to_json

        typer.echo(to_json(result), nl=False)
    elif as_md and markdown is not None:
        typer.echo(markdown(result), nl=False)
    else:
        typer.echo(text(result))


@audit_app.callback()
def history(
    ctx: typer.Context,
    stage: Optional[str] = typer.Option(None, "--stage", "-s", help="Pipeline variant from params.yaml."),
    rev: str = typer.Option("HEAD", "--rev", help="Walk the history reachable from this revision."),
    as_json: bool = typer.Option(False, "--json", help="Print the history as JSON."),
    as_md: bool = typer.Option(False, "--md", help="Print the history as a Markdown table."),
    wide: bool = typer.Option(False, "--wide", help="Every column, however wide (default: fit the terminal)."),
) -> None:
    """Every distinct version of a variant's data, with the commits that recorded it."""
    if ctx.invoked_subcommand is not None:
        return
    if stage is None:
        typer.echo(ctx.get_help())
        typer.echo("\nfmpipe audit: error: give --stage NAME (or a subcommand: diff, model)", err=True)
        raise typer.Exit(2)
    _one_format(as_json, as_md, "fmpipe audit")
    doing(f"fmpipe audit --stage {stage}")
    from pipeline.audit.history import history as build, history_markdown, history_text

    result = build(stage, ".", rev)
    _emit(result, as_json, lambda r: history_text(r, wide), history_markdown, as_md)


def diff_command(
    rev_a: str = typer.Argument(..., help="Old version: a git revision (HEAD~1, a tag, a commit)."),
    rev_b: str = typer.Argument("workspace", help="New version: a git revision, or 'workspace'."),
    stage: str = typer.Option(..., "--stage", "-s", help="Pipeline variant from params.yaml."),
    step: str = typer.Option("annotate", "--step", help=f"Which dataset to compare: {listed(DATASET_STEPS)}."),
    as_json: bool = typer.Option(False, "--json", help="Print every difference as JSON."),
    as_md: bool = typer.Option(False, "--md", help="Print the differences as Markdown."),
) -> None:
    """Row-level differences of a variant's dataset between two versions, read through DVC."""
    if step not in DATASET_STEPS:
        typer.echo(f"fmpipe audit diff: error: --step must be {listed(DATASET_STEPS)}, not {step!r}", err=True)
        raise typer.Exit(2)
    _one_format(as_json, as_md, "fmpipe audit diff")
    doing("fmpipe audit diff")  # also as `fmpipe diff`, the same command
    from pipeline.audit.diff import diff_markdown, diff_versions, summary_lines

    result = diff_versions(stage, step, rev_a, rev_b)
    _emit(result, as_json, lambda r: "\n".join(summary_lines(r)), diff_markdown, as_md)


audit_app.command("diff")(diff_command)


@audit_app.command("model")
def model(
    package: str = typer.Argument(..., help="A package directory (data/<variant>/package) or a package .tar.gz."),
    no_repo: bool = typer.Option(False, "--no-repo", help="Only what the package itself says (no git/DVC)."),
    against: str = typer.Option("HEAD", "--against", help="Diff the model's data against this revision "
                                "(or 'workspace')."),
    as_json: bool = typer.Option(False, "--json", help="Print the provenance as JSON."),
) -> None:
    """Which data version, params and code made a package; with the repo, its commit and data diff."""
    from pipeline.audit.model import audit_model, model_lines

    result = audit_model(package, None if no_repo else ".", against)
    _emit(result, as_json, lambda r: "\n".join(model_lines(r)))
