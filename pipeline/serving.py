"""``fmpipe serve``: a package behind the Open Inference Protocol (KServe V2 REST).

Server choice: uvicorn (the ASGI server KServe's own model server runs on) with Starlette's
routing and requests. Measured against the earlier standard-library ``ThreadingHTTPServer``
and against KServe's ``ModelServer`` itself (bench/serve_compare.py, bench/README.md):
KServe starts ~8x slower, answers ~2x slower, adds ~270 MB and pins pandas<3/protobuf<7,
which fmpipe's stack does not allow; the thread-per-connection server was locked out by 64
idle keep-alive clients or 70 slow-header connections. On an event loop an idle or slow
connection costs a socket, not a thread, so the server keeps accepting; the time limits
below then close what lingers:

- ``keep_alive``: an idle keep-alive connection is closed after this many seconds;
- ``timeout``: a client gets this long to send its request headers, and its body may stall no
  longer than this (a body shorter than its Content-Length gets a 400 after it);
- ``max_connections``: open connections beyond it are answered 503 at once (file descriptors
  are finite);
- ``concurrency``: requests computed at once (decoding and onnxruntime, in worker threads);
  the rest wait their turn. With ``max_pixels`` (the decoded pixels one request may declare,
  checked from the image headers before anything is decoded) this bounds decode memory to
  about ``concurrency x max_pixels x 8`` bytes;
- ``max_body`` (413 beyond it) and ``max_batch`` bound what one request may send, and
  ``max_buffered`` all request bodies held at once (a request that would go beyond it gets a
  503 at once: without it, ``max_connections`` x ``max_body`` could be buffered).

This module imports numpy, PIL (through ``pipeline.inference.runtime``), onnxruntime, uvicorn and
Starlette: never torch.

Endpoints (``<name>`` is the package's variant name; ``/versions/1`` may follow it):

- ``GET  /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata)
- ``GET  /v2/models/<name>`` (model metadata), ``GET /v2/models/<name>/ready``
- ``POST /v2/models/<name>/infer``: V2 JSON, and the binary tensor extension
  (``Inference-Header-Content-Length``) that tritonclient uses by default. Input ``input``
  (FP32 or any integer/float type, shape ``[N, ...]`` as in ``preprocess.json``); outputs
  ``probabilities`` (temperature and flip TTA applied, as ``fmpipe predict``) and ``logits``
  (the raw graph output).
- ``POST /predict?top_k=3``: image file(s) as the raw body or multipart/form-data (a CSV body
  for table models), preprocessed by the package's rule; answers like ``fmpipe predict --json``.

With ``--log DIR`` every input either endpoint scores is appended to a request log
(``pipeline.monitoring.log``) before the answer is sent; nothing is logged without it.

Every bad request gets a 4xx with ``{"error": "..."}``; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import parse_qs

import numpy as np

from pipeline.errors import FmpipeError
from pipeline.inference import runtime, tta
from pipeline.reading import decode_text, loads_json

V2_DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
OUTPUTS = ("probabilities", "logits")
HEADER_LENGTH = "Inference-Header-Content-Length"
DRAIN_LIMIT = 256 << 20  # oversized bodies up to this are read and dropped before the 413


class HTTPError(Exception):
    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close  # the request stream is out of step: answer, then hang up


@dataclass(frozen=True)
class Limits:
    max_body: int = 32 << 20
    max_batch: int = 1024
    max_pixels: int = 16_000_000
    concurrency: int = 4
    max_connections: int = 1000
    max_buffered: int = 256 << 20
    timeout: float = 10.0
    keep_alive: float = 15.0


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise HTTPError(400, f"{where}: `parameters` must be an object, got {type(p).__name__}")
    return p


class ModelService:
    """The loaded package and the V2 request/response logic, independent of HTTP plumbing."""

    def __init__(self, package: runtime.Package, threads: int = 1, max_batch: int = 1024,
                 max_pixels: Optional[int] = None, precision: str = "fp32", request_log=None) -> None:
        self.package = package
        self.request_log = request_log  # pipeline.monitoring.log.RequestLog, or None: nothing logged
        self.predictor = runtime.Predictor(package, threads=threads, precision=precision)
        self.name = package.name
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        self.input_shape = [int(d) for d in package.spec["input"]["shape"]]

    def metadata(self) -> dict[str, Any]:
        k = len(self.package.classes)
        return {
            "name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": self.predictor.input_name, "datatype": "FP32", "shape": self.input_shape}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                        {"name": "logits", "datatype": "FP32",
                         "shape": [int(d) for d in self.package.spec["output"]["shape"]]}],
            "parameters": {"classes": self.package.classes, "temperature": self.predictor.temperature,
                           "precision": self.predictor.precision,
                           "preprocess": self.package.spec["input"]},
        }

    # -------------------------------------------------- V2 infer
    def infer(self, body: bytes, header_length: Optional[int]) -> tuple[bytes, dict[str, str]]:
        if header_length is not None:
            if not 0 < header_length <= len(body):
                raise HTTPError(400, f"{HEADER_LENGTH} {header_length} does not fit the {len(body)}-byte body")
            head, binary = body[:header_length], body[header_length:]
        else:
            head, binary = body, b""
        try:  # UTF-8 (RFC 8259); absurd nesting is an error, not a crash (reading.loads_json)
            request = loads_json(decode_text(head, "request body", "JSON"), "request body")
        except FmpipeError as exc:
            raise HTTPError(400, str(exc)) from None
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
            raise HTTPError(400, "request must be a JSON object with a non-empty `inputs` list")
        all_binary = bool(_params(request, "request").get("binary_data_output"))
        wanted = request.get("outputs") or [{"name": n} for n in OUTPUTS]
        if not isinstance(wanted, list):
            raise HTTPError(400, "`outputs` must be a list of objects like {\"name\": \"probabilities\"}")
        for spec in wanted:
            name = spec.get("name") if isinstance(spec, dict) else None
            if name not in OUTPUTS:
                raise HTTPError(400, f"unknown output {name!r}; outputs: {', '.join(OUTPUTS)}")
            _params(spec, f"output {name!r}")
        x = None
        offset = 0
        for tensor in request["inputs"]:
            if not isinstance(tensor, dict):
                raise HTTPError(400, "each entry of `inputs` must be an object")
            arr, offset = self._tensor(tensor, binary, offset)
            if tensor.get("name") != self.predictor.input_name:
                raise HTTPError(400, f"unknown input {tensor.get('name')!r}; this model takes "
                                     f"{self.predictor.input_name!r} (see GET /v2/models/{self.name})")
            x = arr
        if offset != len(binary):
            raise HTTPError(400, f"{len(binary) - offset} bytes of binary data not claimed by any input")
        try:
            x = runtime.check_batch(x, self.package.spec, f"input {self.predictor.input_name!r}")
        except FmpipeError as exc:
            raise HTTPError(400, str(exc)) from None
        if len(x) > self.max_batch:
            raise HTTPError(413, f"batch of {len(x)} exceeds the limit of {self.max_batch}")

        results: dict[str, np.ndarray] = {}
        logits = self.predictor.logits(x)
        if any(s["name"] == "probabilities" for s in wanted) or self.request_log is not None:
            results["probabilities"] = tta.probabilities(
                self.predictor.view_logits(x, plain=logits), self.predictor.temperature, self.predictor.tta)
        results["logits"] = logits
        if self.request_log is not None:
            self._log_tensor(x, results["probabilities"], logits, request.get("id"))

        outputs, chunks = [], []
        for spec in wanted:
            arr = np.ascontiguousarray(results[spec["name"]], dtype=np.float32)
            out = {"name": spec["name"], "datatype": "FP32", "shape": list(arr.shape)}
            if all_binary or (spec.get("parameters") or {}).get("binary_data"):
                raw = arr.astype("<f4").tobytes()
                out["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                out["data"] = arr.reshape(-1).tolist()
            outputs.append(out)
        response = {"model_name": self.name, "model_version": "1", "outputs": outputs}
        if "id" in request:
            response["id"] = request["id"]
        head_bytes = json.dumps(response).encode()
        if chunks:
            return head_bytes + b"".join(chunks), {"Content-Type": "application/octet-stream",
                                                   HEADER_LENGTH: str(len(head_bytes))}
        return head_bytes, {"Content-Type": "application/json"}

    def _log_tensor(self, x: np.ndarray, probs: np.ndarray, logits: np.ndarray, request_id: Any) -> None:
        from pipeline.monitoring import log

        base = f"infer:{request_id}" if isinstance(request_id, (str, int)) else "infer"
        if self.package.kind == "image":
            items = [log.tensor_input(f"{base}[{i}]", row) for i, row in enumerate(x)]
        else:
            feats = list(self.package.spec["input"]["features"])
            items = [log.table_input(f"{base}[{i}]", feats, row) for i, row in enumerate(x)]
        self.request_log.write(items, probs, logits, "infer")

    def _tensor(self, tensor: dict[str, Any], binary: bytes, offset: int) -> tuple[np.ndarray, int]:
        name, dtype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if dtype not in V2_DTYPES:
            raise HTTPError(400, f"input {name!r}: datatype {dtype!r} not supported "
                                 f"(expected FP32, or another numeric type: {', '.join(V2_DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise HTTPError(400, f"input {name!r}: `shape` must be a list of non-negative integers")
        count = math.prod(shape)  # Python integers: [2**32, 2**32, ...] must not wrap around
        if count > self.max_batch * max(1, math.prod(self.input_shape[1:])):
            raise HTTPError(413, f"input {name!r}: {count} values exceed the batch limit of {self.max_batch}")
        np_dtype = np.dtype(V2_DTYPES[dtype]).newbyteorder("<")
        size = _params(tensor, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * np_dtype.itemsize or offset + size > len(binary):
                raise HTTPError(400, f"input {name!r}: binary_data_size {size} does not match shape {shape} "
                                     f"of {dtype} or the data sent")
            arr = np.frombuffer(binary, dtype=np_dtype, count=count, offset=offset).reshape(shape)
            return arr, offset + size
        if "data" not in tensor:
            raise HTTPError(400, f"input {name!r}: no `data` and no binary_data_size")
        try:
            arr = np.asarray(tensor["data"], dtype=V2_DTYPES[dtype])
        except (ValueError, TypeError, OverflowError) as exc:
            raise HTTPError(400, f"input {name!r}: data is not {dtype} numbers ({exc})") from None
        if arr.size != count:
            raise HTTPError(400, f"input {name!r}: {arr.size} values given, shape {shape} needs {count}")
        return arr.reshape(shape), offset

    # -------------------------------------------------- upload endpoint
    def predict_upload(self, body: bytes, content_type: str, top_k: int) -> dict[str, Any]:
        files = _uploaded_files(body, content_type)
        if not files:
            raise HTTPError(400, "no file in the request (send the image as the body or as multipart/form-data)")
        spec = self.package.spec
        names: list[str] = []
        rows = []
        logged = []  # what the request log stores, row-aligned with names
        budget = self.max_pixels
        try:
            for fname, data in files:
                if self.package.kind == "image":
                    decoded = runtime.decode_image(data, spec, fname, max_pixels=budget)
                    if budget is not None:  # the limit is per request: what one file uses, the next cannot
                        budget -= decoded.declared_pixels
                    rows.append(decoded.pixels.transpose(2, 0, 1).astype(np.float32)[None])
                    names.append(fname)
                    logged.append((fname, data, None))
                else:
                    n, x = _csv_rows(data, spec, fname)
                    names += n
                    rows.append(x)
                    logged += [(name, None, row) for name, row in zip(n, x)]
        except runtime.ImageTooLarge as exc:
            raise HTTPError(413, f"{exc} of decoded pixels per request (--max-image-mpix)") from None
        except FmpipeError as exc:
            raise HTTPError(400, str(exc)) from None
        x = np.concatenate(rows)
        if len(x) > self.max_batch:
            raise HTTPError(413, f"{len(x)} inputs exceed the limit of {self.max_batch}")
        if self.request_log is None:
            probs = self.predictor.predict_proba(x)
        else:
            probs, logits = self.predictor.scores(x)
            self.request_log.write(_logged_inputs(logged, spec), probs, logits, "predict")
        return {"model_name": self.name, "predictions": prediction_records(names, probs, self.package.classes, top_k)}


def prediction_records(names: list[str], probs: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The shape ``fmpipe predict --json`` and ``POST /predict`` answer with."""
    out = []
    for name, tops in zip(names, runtime.top_k(probs, classes, k)):
        out.append({"input": name, "label": tops[0]["label"], "index": tops[0]["index"],
                    "probability": tops[0]["probability"], "top_k": tops})
    return out


def _logged_inputs(logged: list, spec: dict[str, Any]) -> list:
    """(name, image bytes or None, table row or None) -> what the request log stores."""
    from pipeline.monitoring import log

    features = list(spec["input"].get("features") or [])
    return [log.image_input(name, data) if data is not None else log.table_input(name, features, row)
            for name, data, row in logged]


def _csv_rows(data: bytes, spec: dict[str, Any], fname: str):
    return runtime.table_rows(fname, spec, data=data)


def _uploaded_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(filename, bytes) pairs from a multipart/form-data body, or the raw body as one file."""
    if not body:
        return []
    if content_type.lower().startswith("multipart/form-data"):
        from email.parser import BytesParser
        from email.policy import HTTP

        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1")
                                                  + b"\r\n\r\n" + body)
        if not msg.is_multipart():
            raise HTTPError(400, "multipart/form-data body could not be parsed (boundary missing?)")
        files = []
        for i, part in enumerate(msg.iter_parts()):
            payload = part.get_payload(decode=True)
            if payload:
                files.append((part.get_filename() or part.get_param("name", header="content-disposition")
                              or f"file{i}", payload))
        return files
    return [("upload", body)]



# ---------------------------------------------------------------- HTTP: uvicorn + Starlette

def _header_timeout_protocol(timeout: float):
    """uvicorn's h11 protocol with a deadline for request headers.

    uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits forever for
    the headers of a request that has begun (any byte cancels its idle timer), so a client
    trickling header bytes would hold its connection open forever. This closes a connection
    whose request headers are not complete ``timeout`` seconds after it opened, or after the
    first byte of a later request on it. Between requests only ``keep_alive`` applies (a
    deadline restarted at each response would cut every idle keep-alive connection at
    ``timeout``, however long ``keep_alive`` is).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer: Optional[asyncio.TimerHandle] = None

        def _arm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout, self._header_deadline)

        def _header_deadline(self) -> None:
            self._header_timer = None
            # IDLE: h11 has not seen a whole request line + headers since the last response.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, which a
            # listening socket made with proto 0 does not pass on; without it the body
            # segment waits for the client's delayed ACK (~40 ms per keep-alive request).
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm_header_deadline()  # the first byte of a request after a response
            super().data_received(data)

        def on_response_complete(self) -> None:
            if self._header_timer is not None:  # idle now: uvicorn's keep-alive timer governs
                self._header_timer.cancel()
                self._header_timer = None
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return Protocol


def _json_response(status: int, obj: Any, close: bool = False):
    from starlette.responses import Response

    headers = {"Connection": "close"} if close else None
    return Response(json.dumps(obj).encode(), status_code=status, media_type="application/json", headers=headers)


class Endpoints:
    """The HTTP side of a ``ModelService``: request bodies read under ``limits``, and the routes.

    Its state (the body bytes held, the compute limiter) is touched only on the event loop's
    thread; the model's work runs in worker threads (``compute``).
    """

    def __init__(self, service: ModelService, limits: Limits) -> None:
        self.service = service
        self.limits = limits
        self.buffered = 0  # request body bytes held now, all requests together
        self.limiter = None  # anyio's CapacityLimiter, made on the running loop

    # -------------------------------------------------- request bodies
    async def read_body(self, request) -> bytes:
        limits = self.limits
        length = request.headers.get("content-length")  # h11 has already refused a malformed one
        declared = int(length) if length is not None else None
        stream = request.stream()
        refusal = None
        if declared is not None and declared > limits.max_body:
            refusal = HTTPError(413, f"request body of {declared} bytes exceeds the limit of {limits.max_body}",
                                close=declared > DRAIN_LIMIT)
        elif declared is not None and self.buffered + declared > limits.max_buffered:
            refusal = self.busy()
        if refusal is not None:
            if declared <= DRAIN_LIMIT:
                # Read and drop it, so the client finishes sending and reads the answer instead
                # of a reset connection; beyond DRAIN_LIMIT just answer and hang up.
                got = 0
                while (chunk := await self.next_chunk(stream, got, declared)) is not None:
                    got += len(chunk)
            raise refusal
        buf = bytearray()
        self.reserve(request, declared or 0)
        while (chunk := await self.next_chunk(stream, len(buf), declared)) is not None:
            buf += chunk
            if len(buf) > limits.max_body:  # a chunked body declares no length
                raise HTTPError(413, f"request body exceeds the limit of {limits.max_body} bytes", close=True)
            if len(buf) > request.state.reserved:
                self.reserve(request, len(buf) - request.state.reserved)
        return bytes(buf)

    async def next_chunk(self, stream, got: int, declared: Optional[int]) -> Optional[bytes]:
        try:
            return await asyncio.wait_for(stream.__anext__(), self.limits.timeout)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            of = f" of the {declared} its Content-Length declares" if declared is not None else ""
            raise HTTPError(400, f"request body incomplete: {got} bytes{of} arrived, then nothing for "
                                 f"{self.limits.timeout:g} s", close=True) from None

    def busy(self) -> HTTPError:
        return HTTPError(503, f"server busy: {self.buffered} bytes of request bodies are held, the limit is "
                              f"{self.limits.max_buffered} (--max-buffered-mb); retry shortly")

    def reserve(self, request, n: int) -> None:
        """Count ``n`` more body bytes against ``max_buffered`` (released when the request ends)."""
        if self.buffered + n > self.limits.max_buffered:
            exc = self.busy()
            exc.close = True  # a chunked body mid-way: the stream cannot be resumed
            raise exc
        self.buffered += n
        request.state.reserved += n

    async def compute(self, fn, *args):
        import anyio

        if self.limiter is None:  # anyio's limiter needs the running loop
            self.limiter = anyio.CapacityLimiter(self.limits.concurrency)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def endpoint(self, handler):
        """``handler`` with the request's bookkeeping: an HTTPError as its JSON answer, and the
        body bytes it held released whatever happens."""
        from starlette.requests import ClientDisconnect
        from starlette.responses import Response

        async def run(request):
            request.state.reserved = 0
            try:
                return await handler(request)
            except HTTPError as exc:
                return _json_response(exc.status, {"error": str(exc)}, close=exc.close)
            except ClientDisconnect:  # nobody to answer
                return Response(status_code=400)
            finally:
                self.buffered -= request.state.reserved
        return run

    # -------------------------------------------------- routes
    def check_model(self, request) -> None:
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != self.service.name:
            raise HTTPError(404, f"model {name!r} not found; this server serves {self.service.name!r}")
        if version not in (None, "1"):
            raise HTTPError(404, f"model {name!r} has no version {version!r} (only 1)")

    async def live(self, request):
        return _json_response(200, {"live": True})

    async def ready(self, request):
        return _json_response(200, {"ready": True})

    async def server_metadata(self, request):
        return _json_response(200, {"name": "fmpipe", "version": "1", "extensions": ["binary_tensor_data"]})

    async def model_metadata(self, request):
        self.check_model(request)
        return _json_response(200, self.service.metadata())

    async def model_ready(self, request):
        self.check_model(request)
        return _json_response(200, {"name": self.service.name, "ready": True})

    async def infer(self, request):
        from starlette.responses import Response

        self.check_model(request)
        header = request.headers.get(HEADER_LENGTH)
        try:
            hlen = int(header) if header is not None else None
        except ValueError:
            raise HTTPError(400, f"bad {HEADER_LENGTH} {header!r}") from None
        body = await self.read_body(request)
        out, headers = await self.compute(self.service.infer, body, hlen)
        return Response(out, headers=headers)

    async def predict(self, request):
        q = parse_qs(request.url.query)
        try:
            k = int(q.get("top_k", ["3"])[0])
        except ValueError:
            raise HTTPError(400, "top_k must be an integer") from None
        body = await self.read_body(request)
        result = await self.compute(self.service.predict_upload, body, request.headers.get("content-type", ""), k)
        return _json_response(200, result)


async def _not_found(request, exc):
    if exc.status_code == 405:
        return _json_response(405, {"error": f"{request.method} not allowed on {request.url.path}"})
    return _json_response(exc.status_code, {"error": f"no endpoint {request.method} {request.url.path}"})


async def _internal_error(request, exc: Exception):
    # A bug, not bad input: a JSON 500 (uvicorn logs the traceback) and the server keeps serving.
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))
    return _json_response(500, {"error": f"internal error: {type(exc).__name__}: {text}"})


def build_app(service: ModelService, limits: Limits):
    """The Starlette application: V2 routes and /predict over ``service``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    e = Endpoints(service, limits)
    routes = [Route("/v2/health/live", e.endpoint(e.live), methods=["GET"]),
              Route("/v2/health/ready", e.endpoint(e.ready), methods=["GET"]),
              Route("/v2", e.endpoint(e.server_metadata), methods=["GET"]),
              Route("/v2/", e.endpoint(e.server_metadata), methods=["GET"])]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [Route(prefix, e.endpoint(e.model_metadata), methods=["GET"]),
                   Route(prefix + "/ready", e.endpoint(e.model_ready), methods=["GET"]),
                   Route(prefix + "/infer", e.endpoint(e.infer), methods=["POST"])]
    routes.append(Route("/predict", e.endpoint(e.predict), methods=["POST"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: _not_found, Exception: _internal_error})


class Server:
    """A listening socket and the uvicorn server that will run on it."""

    def __init__(self, app, sock: socket.socket, limits: Limits, verbose: bool) -> None:
        import uvicorn

        self.sock = sock
        self.server_address = sock.getsockname()
        config = uvicorn.Config(
            app, http=_header_timeout_protocol(limits.timeout), lifespan="off", log_config=None,
            log_level="info" if verbose else "warning", access_log=verbose,
            timeout_keep_alive=limits.keep_alive, limit_concurrency=limits.max_connections,
            server_header=False, date_header=False)
        self.uvicorn = uvicorn.Server(config)

    def serve_forever(self) -> None:
        """Until SIGINT/SIGTERM (uvicorn finishes the requests in flight, then re-raises the signal)."""
        self.uvicorn.run(sockets=[self.sock])

    def server_close(self) -> None:
        self.sock.close()


def make_server(package: runtime.Package, host: str = "127.0.0.1", port: int = 8000, threads: int = 1,
                limits: Limits = Limits(), verbose: bool = False, precision: str = "fp32",
                request_log=None) -> Server:
    """Load the package and bind the address (``port`` 0: any free port); ``serve_forever`` serves.
    ``precision``: fp32 or int8 (``runtime.choose_precision`` resolves ``auto``); ``request_log``:
    a ``pipeline.monitoring.log.RequestLog`` that every scored input is appended to."""
    service = ModelService(package, threads=threads, max_batch=limits.max_batch, max_pixels=limits.max_pixels,
                           precision=precision, request_log=request_log)
    app = build_app(service, limits)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    server = Server(app, sock, limits, verbose)
    server.service = service  # type: ignore[attr-defined]
    return server
