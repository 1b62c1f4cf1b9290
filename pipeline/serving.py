"""``fmpipe serve``: a package behind the Open Inference Protocol (KServe V2 REST).

Server choice: the standard library's ``ThreadingHTTPServer``. The work per request is one
onnxruntime call (thread-safe, and it releases the GIL while it computes), so a thread per
connection is enough, adds no dependency and starts instantly. Connections are capped
(``max_connections``: the accept loop waits when that many are open), request bodies are
bounded (``max_body``, 413 beyond it) and so is the batch size, so a client cannot exhaust
memory. HTTP/1.1 keep-alive is on (the Triton client keeps connections open).

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

Every bad request gets a 4xx with ``{"error": "..."}``; the server keeps serving.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, urlparse

import numpy as np

from pipeline import inference
from pipeline.errors import FmpipeError

V2_DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
OUTPUTS = ("probabilities", "logits")
HEADER_LENGTH = "Inference-Header-Content-Length"
DRAIN_LIMIT = 256 << 20  # oversized bodies up to this are read and dropped before the 413


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ModelService:
    """The loaded package and the V2 request/response logic, independent of HTTP plumbing."""

    def __init__(self, package: inference.Package, threads: int = 1, max_batch: int = 1024) -> None:
        self.package = package
        self.predictor = inference.Predictor(package, threads=threads)
        self.name = package.name
        self.max_batch = max_batch
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
        try:
            request = json.loads(head)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
            raise HTTPError(400, "request must be a JSON object with a non-empty `inputs` list")
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
            x = inference.check_batch(x, self.package.spec, f"input {self.predictor.input_name!r}")
        except FmpipeError as exc:
            raise HTTPError(400, str(exc)) from None
        if len(x) > self.max_batch:
            raise HTTPError(413, f"batch of {len(x)} exceeds the limit of {self.max_batch}")

        wanted = request.get("outputs") or [{"name": n} for n in OUTPUTS]
        all_binary = bool((request.get("parameters") or {}).get("binary_data_output"))
        results: dict[str, np.ndarray] = {}
        logits = self.predictor.logits(x)
        for spec in wanted:
            name = spec.get("name") if isinstance(spec, dict) else None
            if name not in OUTPUTS:
                raise HTTPError(400, f"unknown output {name!r}; outputs: {', '.join(OUTPUTS)}")
        if any(s["name"] == "probabilities" for s in wanted):
            results["probabilities"] = inference.probabilities(
                self.predictor.view_logits(x, plain=logits), self.predictor.temperature, self.predictor.tta)
        results["logits"] = logits

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

    def _tensor(self, tensor: dict[str, Any], binary: bytes, offset: int) -> tuple[np.ndarray, int]:
        name, dtype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if dtype not in V2_DTYPES:
            raise HTTPError(400, f"input {name!r}: datatype {dtype!r} not supported "
                                 f"(expected FP32, or another numeric type: {', '.join(V2_DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise HTTPError(400, f"input {name!r}: `shape` must be a list of non-negative integers")
        count = int(np.prod(shape)) if shape else 1
        if count > self.max_batch * max(1, int(np.prod(self.input_shape[1:]))):
            raise HTTPError(413, f"input {name!r}: {count} values exceed the batch limit of {self.max_batch}")
        np_dtype = np.dtype(V2_DTYPES[dtype]).newbyteorder("<")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
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
        except (ValueError, TypeError) as exc:
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
        try:
            for fname, data in files:
                if self.package.kind == "image":
                    rows.append(inference.image_array(data, spec, fname)[None])
                    names.append(fname)
                else:
                    n, x = _csv_rows(data, spec, fname)
                    names += n
                    rows.append(x)
        except FmpipeError as exc:
            raise HTTPError(400, str(exc)) from None
        x = np.concatenate(rows)
        if len(x) > self.max_batch:
            raise HTTPError(413, f"{len(x)} inputs exceed the limit of {self.max_batch}")
        probs = self.predictor.predict_proba(x)
        return {"model_name": self.name, "predictions": prediction_records(names, probs, self.package.classes, top_k)}


def prediction_records(names: list[str], probs: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The shape ``fmpipe predict --json`` and ``POST /predict`` answer with."""
    out = []
    for name, tops in zip(names, inference.top_k(probs, classes, k)):
        out.append({"input": name, "label": tops[0]["label"], "index": tops[0]["index"],
                    "probability": tops[0]["probability"], "top_k": tops})
    return out


def _csv_rows(data: bytes, spec: dict[str, Any], fname: str):
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".csv")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        names, x = inference.table_rows(path, spec)
    finally:
        os.unlink(path)
    return [n.replace(os.path.basename(path), fname) for n in names], x


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


def make_server(package: inference.Package, host: str = "127.0.0.1", port: int = 8000, threads: int = 1,
                max_body: int = 32 << 20, max_batch: int = 1024, max_connections: int = 64,
                verbose: bool = False) -> ThreadingHTTPServer:
    service = ModelService(package, threads=threads, max_batch=max_batch)
    slots = threading.BoundedSemaphore(max_connections)
    model_path = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fmpipe-serve"
        # Headers and body go out in two writes; with Nagle on, the second waits for the
        # client's delayed ACK (~40 ms per keep-alive request).
        disable_nagle_algorithm = True

        def log_message(self, fmt: str, *args: Any) -> None:  # access log only when asked
            if verbose:
                super().log_message(fmt, *args)

        def _send(self, status: int, body: bytes, headers: Optional[dict[str, str]] = None) -> None:
            self.send_response(status)
            for k, v in (headers or {"Content-Type": "application/json"}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode())

        def _body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                raise HTTPError(411, "chunked bodies are not supported; send Content-Length")
            if length is None:
                self.close_connection = True
                raise HTTPError(411, "Content-Length required")
            try:
                n = int(length)
            except ValueError:
                self.close_connection = True
                raise HTTPError(400, f"bad Content-Length {length!r}") from None
            if n < 0:
                self.close_connection = True
                raise HTTPError(400, f"bad Content-Length {length!r}")
            if n > max_body:
                if n <= DRAIN_LIMIT:
                    # Read and drop it, so the client finishes sending and gets the 413 instead
                    # of a reset connection; beyond DRAIN_LIMIT just hang up after answering.
                    left = n
                    while left > 0:
                        chunk = self.rfile.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        left -= len(chunk)
                else:
                    self.close_connection = True
                raise HTTPError(413, f"request body of {n} bytes exceeds the limit of {max_body}")
            return self.rfile.read(n)

        def _model(self, name: str, version: Optional[str]) -> None:
            if name != service.name:
                raise HTTPError(404, f"model {name!r} not found; this server serves {service.name!r}")
            if version not in (None, "1"):
                raise HTTPError(404, f"model {name!r} has no version {version!r} (only 1)")

        def _handle(self, method: str) -> None:
            try:
                url = urlparse(self.path)
                # A GET with a body still has it read, so the keep-alive stream stays in step.
                body = self._body() if method == "POST" or self.headers.get("Content-Length") else b""
                path = url.path
                if method == "GET" and path in ("/v2/health/live", "/v2/health/ready"):
                    return self._json(200, {"live": True} if path.endswith("live") else {"ready": True})
                if method == "GET" and path in ("/v2", "/v2/"):
                    return self._json(200, {"name": "fmpipe", "version": "1", "extensions": ["binary_tensor_data"]})
                m = model_path.match(path)
                if m:
                    name, version, action = m.groups()
                    self._model(name, version)
                    if method == "GET" and action is None:
                        return self._json(200, service.metadata())
                    if method == "GET" and action == "/ready":
                        return self._json(200, {"name": name, "ready": True})
                    if method == "POST" and action == "/infer":
                        header = self.headers.get(HEADER_LENGTH)
                        try:
                            hlen = int(header) if header is not None else None
                        except ValueError:
                            raise HTTPError(400, f"bad {HEADER_LENGTH} {header!r}") from None
                        out, headers = service.infer(body, hlen)
                        return self._send(200, out, headers)
                    raise HTTPError(405, f"{method} not allowed on {path}")
                if method == "POST" and path == "/predict":
                    q = parse_qs(url.query)
                    try:
                        k = int(q.get("top_k", ["3"])[0])
                    except ValueError:
                        raise HTTPError(400, "top_k must be an integer") from None
                    return self._json(200, service.predict_upload(body, self.headers.get("Content-Type", ""), k))
                raise HTTPError(404, f"no endpoint {method} {path}")
            except HTTPError as exc:
                self._json(exc.status, {"error": str(exc)})
            except Exception as exc:  # a bug, not bad input: report 500 and keep serving
                traceback.print_exc(file=sys.stderr)
                self._json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 128

        def process_request(self, request, client_address):
            slots.acquire()  # bound the number of connections handled at once
            try:
                super().process_request(request, client_address)
            except BaseException:
                slots.release()
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                slots.release()

    server = Server((host, port), Handler)
    server.service = service  # type: ignore[attr-defined]
    return server
