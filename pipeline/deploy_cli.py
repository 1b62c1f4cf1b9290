"""``fmpipe predict / verify / serve``: run a package without the training stack.

Registered on the main app by ``pipeline.cli``; kept in their own module so the lifecycle
commands and these stay independent. Imports happen inside the commands and go through
``pipeline.inference.runtime`` only: numpy, PIL and onnxruntime, never torch or lightning.
"""

from __future__ import annotations

from typing import List, Optional

import typer

PrecisionOpt = typer.Option(
    "auto", "--precision", help="fp32, int8 (when the package ships one) or auto: INT8 when the package ships it "
                                "and it runs at least the package's min_speedup faster here, else fp32.")
LogOpt = typer.Option(None, "--log", help="Append every scored input to this request-log folder (input bytes by "
                                         "SHA-256, prediction, confidence, embedding; docs/deployment.md). "
                                         "Nothing is logged without it.")
LogMaxOpt = typer.Option(1024.0, "--log-max-mb", min=0.001,
                         help="The request log's size limit: the oldest segments are deleted beyond it.")
PackageArg = typer.Argument(..., help="A package directory (data/<variant>/package) or its .tar.gz archive.")


def predict(
    package: str = PackageArg,
    inputs: List[str] = typer.Argument(..., help="Image files, folders of images, or CSV files of feature rows."),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1, help="How many classes to show per input."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (a list, one entry per input)."),
    threads: int = typer.Option(0, "--threads", min=0, help="onnxruntime intra-op threads (0: its default)."),
    precision: str = PrecisionOpt,
    log_dir: Optional[str] = LogOpt,
    log_max_mb: float = LogMaxOpt,
) -> None:
    """Predict with a packaged model: images of any size (resized by the package's rule) or CSV rows."""
    import json

    from pipeline.inference import runtime
    from pipeline.serving import prediction_records

    pkg = runtime.open_package(package)
    names, x = runtime.load_inputs(inputs, pkg.spec)
    chosen, _ = runtime.choose_precision(pkg, precision)
    predictor = runtime.Predictor(pkg, threads=threads or None, precision=chosen)
    if log_dir is None:
        probs = predictor.predict_proba(x)
    else:
        from pipeline.monitoring import log

        request_log = log.RequestLog(log_dir, pkg, chosen, max_bytes=int(log_max_mb * (1 << 20)))
        probs, logits = predictor.scores(x)
        request_log.write(log.cli_inputs(names, x, pkg.spec), probs, logits, "cli")
        request_log.close()
    records = prediction_records(names, probs, pkg.classes, top_k)
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    for r in records:
        typer.echo(prediction_line(r))


def prediction_line(record: dict) -> str:
    """``photo.png: label=1 p=0.998, label=7 p=0.001``: ``label=``/``p=`` keep a class named "1"
    apart from a probability (digits' classes are digits). ``--json`` is the machine format."""
    return f"{record['input']}: " + ", ".join(f"label={t['label']} p={t['probability']:.3f}" for t in record["top_k"])


def verify(package: str = PackageArg) -> None:
    """Re-hash every packaged file against lineage.json and check the ONNX model reproduces its recorded outputs."""
    from pipeline.packaging.verify import verify_package

    r = verify_package(package)
    typer.echo(f"fmpipe verify: {r['package']}: OK: {r['files']} files match lineage.json; model.onnx reproduces "
               f"{r['checks']} recorded check outputs (max |diff| {r['max_abs_diff']:.3g}, allowed {r['atol']:g})"
               + (f"; {r['int8']['file']} reproduces its own (max |diff| {r['int8']['max_abs_diff']:.3g}, "
                  f"allowed {r['int8']['atol']:g})" if "int8" in r else ""))


def serve(
    package: str = PackageArg,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: all interfaces)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    threads: int = typer.Option(1, "--threads", min=1, help="onnxruntime intra-op threads per request."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", min=0.001, help="Largest request body accepted."),
    max_batch: int = typer.Option(1024, "--max-batch", min=1, help="Largest batch accepted in one request."),
    max_image_mpix: float = typer.Option(16.0, "--max-image-mpix", min=0.000001,
                                         help="Decoded megapixels one /predict request may declare (checked before decoding)."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Requests decoded and computed at once; the rest wait."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.01,
                                  help="Seconds a client gets to send its headers; the longest a body may stall."),
    keep_alive: float = typer.Option(15.0, "--keep-alive", min=0.01, help="Seconds an idle keep-alive connection stays open."),
    max_connections: int = typer.Option(1000, "--max-connections", min=1, help="Open connections; beyond it: 503."),
    max_buffered_mb: float = typer.Option(256.0, "--max-buffered-mb", min=0.001,
                                          help="Request bodies held at once, all connections together; beyond it: 503."),
    verbose: bool = typer.Option(False, "--verbose", help="Log every request."),
    precision: str = PrecisionOpt,
    log_dir: Optional[str] = LogOpt,
    log_max_mb: float = LogMaxOpt,
) -> None:
    """Serve a package over the Open Inference Protocol (KServe V2 REST) plus POST /predict for image files."""
    from pipeline.inference import runtime
    from pipeline.errors import FmpipeError
    from pipeline.serving import Limits, make_server

    limits = Limits(max_body=int(max_body_mb * (1 << 20)), max_batch=max_batch,
                    max_pixels=int(max_image_mpix * 1e6), concurrency=concurrency,
                    max_connections=max_connections, max_buffered=int(max_buffered_mb * (1 << 20)),
                    timeout=timeout, keep_alive=keep_alive)
    pkg = runtime.open_package(package)
    chosen, why = runtime.choose_precision(pkg, precision)
    request_log = None
    if log_dir is not None:
        from pipeline.monitoring.log import RequestLog

        request_log = RequestLog(log_dir, pkg, chosen, max_bytes=int(log_max_mb * (1 << 20)))
    try:
        server = make_server(pkg, host, port, threads=threads, limits=limits, verbose=verbose, precision=chosen,
                             request_log=request_log)
    except OSError as exc:  # the address: in use, not ours, not an address
        raise FmpipeError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    import signal

    def _stop(signum, frame):  # SIGTERM (docker stop, kubernetes) stops like Ctrl+C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    h, p = server.server_address[:2]
    typer.echo(f"fmpipe serve: model {pkg.name!r} on http://{h}:{p} (KServe V2: /v2/models/{pkg.name}/infer; "
               f"images: POST /predict); precision {chosen} ({why})"
               + (f"; logging requests to {log_dir}" if log_dir is not None else "") + "; Ctrl+C stops", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("fmpipe serve: stopped", err=True)
    finally:
        server.server_close()
        if request_log is not None:
            request_log.close()


def register(app: typer.Typer) -> None:
    app.command()(predict)
    app.command()(verify)
    app.command()(serve)
