"""``fmpipe monitor``: a request log against the variant's data (logic: ``pipeline.monitoring``)."""

from __future__ import annotations

import typer


def monitor(
    log: str = typer.Argument(..., help="A request log folder (`fmpipe serve --log DIR`) or one segment of it."),
    stage: str = typer.Option(..., "--stage", "-s", help="The variant whose package served the log."),
    reference: str = typer.Option("val", "--reference", help="Comma-separated splits of the variant's dataset to "
                                                            "compare with (held out from training: val, test)."),
    alpha: float = typer.Option(0.01, "--alpha", help="False-alarm rate of the whole check (Bonferroni over its tests)."),
    out: str = typer.Option(None, "--out", help="Where monitor.json and monitor.html go (default data/<variant>/monitor)."),
    permutations: int = typer.Option(500, "--permutations", min=50, help="Permutations of the MMD test's p-value."),
) -> None:
    """Drift check: logged inputs vs the variant's held-out data. Exit 0: no drift; 1: drift (or bad input)."""
    from pipeline.boundary import doing
    from pipeline.monitoring.run import PAGE, monitor as run

    splits = [s.strip() for s in reference.split(",") if s.strip()]
    bad = [s for s in splits if s not in ("train", "val", "test")]
    if bad or not splits:
        typer.echo(f"fmpipe monitor: error: --reference {reference!r}: expected splits among val, test, train", err=True)
        raise typer.Exit(1)
    doing(f"fmpipe monitor --stage {stage}")
    report, where = run(stage, log, splits=splits, alpha=alpha, out_dir=out, n_perm=permutations)
    typer.echo(f"fmpipe monitor --stage {stage}: {report.reason} (report: {where / PAGE})", err=report.drift)
    if report.drift:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(monitor)
