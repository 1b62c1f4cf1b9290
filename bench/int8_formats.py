"""Which INT8 recipe, if any, beats float32 on this CPU: ONNX Runtime's quantization settings
against the float32 model, on one network, at batch 64 and one image.

    python bench/int8_formats.py                                  # the cifar default network, untrained
    python bench/int8_formats.py --model DIR --cache /tmp/fmpipe-cifar10-cache   # trained weights, real images
    python bench/int8_formats.py --threads 1 2 4

Issue #27 asks for the formats, operator choices and layers left in float that decide INT8's
speed. For each recipe this quantizes the same ONNX export (``pipeline.packaging``'s export, the
package's path), lets ONNX Runtime optimize it as a package's session does, and prints:
images/s at ``--batch`` and the ratio to float32, p50 latency of one image, the operator types
left in the optimized graph (which show what ONNX Runtime fused: ``QLinearConv`` is an integer
convolution, ``DequantizeLinear`` + ``Conv`` a float one), the model's size, and the argmax
agreement with float32 on the images given (CIFAR-10 test images from bench/train_cifar.py's
cache when ``--cache`` holds it, else random pixels). With ``--model`` (a train folder: model.json
and model.safetensors, e.g. from ``bench/train_recipe.py --keep``) the weights are trained and
the test accuracy of each recipe is printed too.

The CPU's instruction sets that matter (AVX2, AVX512, VNNI, AMX) and the load average are
printed: the ratios belong to the CPU, so compare them across machines, not the images/s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from int8 import timed  # noqa: E402  (bench/int8.py's timing loop)

# name -> quantize_static settings. "qdq-s8s8-pc" is what `fmpipe package` ships
# (pipeline/packaging/quantize.py).
RECIPES: dict[str, dict] = {
    "qdq-s8s8-pc": dict(fmt="QDQ", act="QInt8", per_channel=True, symmetric=True),
    "qdq-u8s8-pc": dict(fmt="QDQ", act="QUInt8", per_channel=True, symmetric=False),
    "qdq-u8s8-pt": dict(fmt="QDQ", act="QUInt8", per_channel=False, symmetric=False),
    "qop-u8s8-pc": dict(fmt="QOperator", act="QUInt8", per_channel=True, symmetric=False),
    "qop-u8s8-pt": dict(fmt="QOperator", act="QUInt8", per_channel=False, symmetric=False),
    "qdq-u8s8-pc-rr": dict(fmt="QDQ", act="QUInt8", per_channel=True, symmetric=False, reduce_range=True),
    "qdq-s8s8-pc-first-float": dict(fmt="QDQ", act="QInt8", per_channel=True, symmetric=True, first_float=True),
    "qdq-s8s8-pc-conv-only": dict(fmt="QDQ", act="QInt8", per_channel=True, symmetric=True, ops=["Conv"]),
    "qdq-u8s8-pc-conv-gemm": dict(fmt="QDQ", act="QUInt8", per_channel=True, symmetric=False,
                                  ops=["Conv", "Gemm", "MatMul"]),
}


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    return f"{model}; " + " ".join(f for f in wanted if f in flags)


def quantize(onnx_model: bytes, x: np.ndarray, input_name: str, recipe: dict) -> bytes:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from pipeline.packaging.quantize import _Reader

    reader = type("R", (_Reader, CalibrationDataReader), {})(x, input_name)
    model = onnx.load_from_string(onnx_model)
    exclude = []
    if recipe.get("first_float"):
        exclude = [next(n.name for n in model.graph.node if n.op_type == "Conv")]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "m.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(onnx_model)
        quantize_static(str(src), str(dst), reader, quant_format=getattr(QuantFormat, recipe["fmt"]),
                        per_channel=recipe["per_channel"], activation_type=getattr(QuantType, recipe["act"]),
                        weight_type=QuantType.QInt8, reduce_range=recipe.get("reduce_range", False),
                        nodes_to_exclude=exclude, op_types_to_quantize=recipe.get("ops"),
                        extra_options={"ActivationSymmetric": recipe["symmetric"]})
        return dst.read_bytes()


def optimized_ops(model: bytes, threads: int) -> tuple[object, dict[str, int]]:
    """A session as a package opens one (all graph optimizations) and the op types it kept."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = ort.SessionOptions()
        opt.intra_op_num_threads, opt.inter_op_num_threads = threads, 1
        opt.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        sess = ort.InferenceSession(model, sess_options=opt, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(Path(tmp) / "opt.onnx")).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return sess, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="cifar")
    ap.add_argument("--model", type=Path, default=None, help="a train folder (model.json + model.safetensors)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/fmpipe-cifar10-cache"))
    ap.add_argument("--archive", type=Path, default=None,
                    help="decode this CIFAR-10 JPEG archive into --cache first (bench/train_cifar.py)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice

    import torch

    from pipeline.packaging.onnx_export import export_onnx

    torch.manual_seed(0)
    if args.model:
        from pipeline.models import load_trained

        net, _ = load_trained(args.model)
    else:
        from pipeline.config import load_variant
        from pipeline.models import build

        spec = load_variant(args.variant, REPO / "params.yaml")
        net = build(spec.model.name, (3, 32, 32), 10, spec.model.options)
    net.eval()
    if args.archive:
        from train_cifar import load_cifar

        load_cifar(args.archive, args.cache)
    if (args.cache / "x_test.npy").exists():
        x_all = np.load(args.cache / "x_test.npy").transpose(0, 3, 1, 2).astype(np.float32)
        y_all = np.load(args.cache / "y_test.npy")
        source = f"{len(x_all)} CIFAR-10 test images"
    else:
        x_all = np.random.default_rng(0).integers(0, 256, (2048, 3, 32, 32)).astype(np.float32)
        y_all = None
        source = "2048 random images"
    calib, x_eval = x_all[:256], x_all[256:]
    y_eval = None if y_all is None else y_all[256:]
    onnx_fp32 = export_onnx(net, torch.from_numpy(x_all[:2]), 17)
    print(f"cpu: {cpu_flags()}; {os.cpu_count()} cpus; torch {torch.__version__}; "
          f"{'trained ' + str(args.model) if args.model else 'untrained network'}; {source} "
          f"(256 calibrate); load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)

    models = {"fp32": onnx_fp32}
    for name in args.recipes:
        t0 = time.perf_counter()
        try:
            models[name] = quantize(onnx_fp32, calib, "input", RECIPES[name])
        except Exception as exc:  # an unsupported graph is a finding, not the end of the sweep
            print(f"  {name}: quantize_static failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        print(f"  quantized {name} in {time.perf_counter() - t0:.1f} s", flush=True)

    for threads in args.threads:
        print(f"\nthreads {threads}, batch {args.batch}")
        print(f"{'recipe':<26} {'img/s':>8} {'x fp32':>7} {'p50 ms':>7} {'MB':>5} {'agree':>6} {'acc':>6}  ops after optimization")
        base = None
        ref = None
        for name, model in models.items():
            sess, ops = optimized_ops(model, threads)
            inp = sess.get_inputs()[0].name
            xb = np.ascontiguousarray(np.resize(x_eval, (args.batch, *x_eval.shape[1:])))
            one = np.ascontiguousarray(x_eval[:1])
            tb = float(np.median(timed(lambda: sess.run(None, {inp: xb}), args.seconds, 5)))
            t1 = float(np.median(timed(lambda: sess.run(None, {inp: one}), args.seconds / 2, 20)))
            preds = np.concatenate([sess.run(None, {inp: x_eval[i:i + 512]})[0].argmax(1)
                                    for i in range(0, len(x_eval), 512)])
            if name == "fp32":
                base, ref = tb, preds
            agree = float((preds == ref).mean())
            acc = f"{float((preds == y_eval).mean()):.4f}" if (y_eval is not None and args.model) else "-"
            shown = " ".join(f"{k}:{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))
            print(f"{name:<26} {args.batch / tb:8.1f} {base / tb:7.2f} {t1 * 1e3:7.2f} "
                  f"{len(model) / 1e6:5.2f} {agree:6.3f} {acc:>6}  {shown}", flush=True)
    print(f"\nload average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
