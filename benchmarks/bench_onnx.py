#!/usr/bin/env python
"""The ONNX export of trained codeq models against their fp32 ONNX export:
file sizes, ONNX Runtime load time, memory and latency, and top-1 agreement
with PyTorch on the test images.

    python benchmarks/bench_onnx.py RUN_DIR/checkpoint.th [...] --data data \\
        --out benchmarks/results/bench_onnx_cpu.json

Per checkpoint:

- sizes: the fp32 ONNX file as ``torch.onnx.export(dynamo=True)`` writes it by
  default (its .onnx and .onnx.data files together; batch norms folded), codeq's
  ONNX (forms cast and qdq), codeq's ONNX gzipped (level 9), codeq's compact
  export (``python -m codeq.export``, both files);
- ONNX Runtime (CPU provider, ``--threads`` threads, default optimizations):
  session creation time (median of ``--loads``), the process's resident memory
  grown by creating one session (a fresh process per file, so one file's
  allocations do not hide another's), and the median latency of one run at
  batch 1 and 64, the variants timed round-robin (``--rounds`` rounds of
  ``--reps`` runs each) so that machine drift hits all alike, their threads
  not spinning between runs (the sessions share the cores);
- agreement: the predicted class of codeq's ONNX (ONNX Runtime) and of the
  quantized model (PyTorch) on every test image of the run's data set, and
  both accuracies.
"""

from __future__ import annotations

import argparse
import gzip
import io
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from bench_quantizer import env_header, print_env, write_results  # noqa: E402
from codeq.checkpoint import load_model  # noqa: E402
from codeq.export import export_model  # noqa: E402
from codeq.models import example_input  # noqa: E402
from codeq.onnx_export import export_onnx  # noqa: E402
from codeq.parametrize import strip_quantizers  # noqa: E402
from codeq.train.config import config_from_dict  # noqa: E402
from codeq.train.data import build_datasets  # noqa: E402


def fp32_onnx(model, x, path: str) -> int:
    """torch.onnx.export's default fp32 file of the quantizer-free model (ŵ as float32); its bytes."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(strip_quantizers(model).eval(), (x,), path, dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))


def session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # Idle sessions' threads must not spin while another session runs (the variants share the cores).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


_MEMORY_PROBE = """
import sys, onnxruntime as ort
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
so = ort.SessionOptions(); so.intra_op_num_threads = int(sys.argv[2]); so.log_severity_level = 3
before = rss()
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
print(rss() - before)
"""


def memory_after_load(path: str, threads: int) -> int:
    """Bytes of resident memory one session of ``path`` adds, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, path, str(threads)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def load_time(path: str, threads: int, loads: int) -> float:
    times = []
    for _ in range(loads):
        t0 = time.perf_counter()
        session(path, threads)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def latencies(paths: dict, img: int, threads: int, rounds: int, reps: int) -> dict:
    """{(variant, batch): median ms of one run}, variants interleaved round by round."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    out = {}
    for batch in (1, 64):
        x = np.random.default_rng(0).standard_normal((batch, 3, img, img)).astype(np.float32)
        times = {k: [] for k in sessions}
        for s in sessions.values():  # warm up
            for _ in range(3):
                s.run(None, {s.get_inputs()[0].name: x})
        for _ in range(rounds):
            for k, s in sessions.items():
                feed = {s.get_inputs()[0].name: x}
                for _ in range(reps):
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times[k].append(time.perf_counter() - t0)
        for k, t in times.items():
            out[(k, batch)] = 1e3 * statistics.median(t)
    return out


@torch.no_grad()
def agreement(model, cfg, path: str, threads: int) -> dict:
    """Top-1 of PyTorch (the quantized model) and ONNX Runtime (codeq's file) on the test images."""
    _, val = build_datasets(cfg)
    loader = torch.utils.data.DataLoader(val, batch_size=500, shuffle=False)
    sess = session(path, threads)
    same = right_pt = right_ort = n = 0
    model.eval()
    with parametrize.cached():
        for x, y in loader:
            pt = model(x).argmax(1).numpy()
            ort_pred = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].argmax(1)
            same += int((pt == ort_pred).sum())
            right_pt += int((pt == y.numpy()).sum())
            right_ort += int((ort_pred == y.numpy()).sum())
            n += len(y)
    return {"images": n, "agreement": same / n, "pytorch_acc": right_pt / n, "onnxruntime_acc": right_ort / n}


def bench(ckpt: str, args, work: str) -> dict:
    model, config, _ = load_model(ckpt)
    cfg = config_from_dict({**config, "device": "cpu"})
    if args.data:
        cfg.dataset.root = args.data
    img = int(config.get("img_size", 32))
    x = example_input(img)
    name = os.path.basename(os.path.dirname(os.path.abspath(ckpt)))
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    files = {"fp32": os.path.join(d, "fp32.onnx"), "codeq": os.path.join(d, "codeq.onnx"),
             "codeq_qdq": os.path.join(d, "codeq_qdq.onnx")}
    sizes = {"fp32_onnx": fp32_onnx(model, x, files["fp32"])}
    sizes["codeq_onnx"] = export_onnx(model, x, files["codeq"], config=config)["bytes"]
    layers = export_onnx(model, x, files["codeq_qdq"], form="qdq", config=config)["layers"]
    sizes["codeq_onnx_qdq"] = os.path.getsize(files["codeq_qdq"])
    with open(files["codeq"], "rb") as f:
        sizes["codeq_onnx_gzip"] = len(gzip.compress(f.read(), 9))
    sizes["codeq_compact"] = export_model(model, os.path.join(d, "compact"))["bytes"]
    bits = sorted({v["bits"] for v in layers.values()})
    types = sorted({v["type"] for v in layers.values()})
    lat = latencies(files, img, args.threads, args.rounds, args.reps)
    rec = {
        "run": name,
        "checkpoint": os.path.relpath(os.path.abspath(ckpt), ROOT),
        "model": config["model"],
        "bits": bits,
        "integer_types": types,
        "bytes": sizes,
        "ratio_to_fp32_onnx": {k: v / sizes["fp32_onnx"] for k, v in sizes.items() if k != "fp32_onnx"},
        "load_s": {k: load_time(p, args.threads, args.loads) for k, p in files.items()},
        "memory_after_load_bytes": {k: memory_after_load(p, args.threads) for k, p in files.items()},
        "latency_ms": {f"{k}_batch{b}": v for (k, b), v in lat.items()},
        "latency_ratio_to_fp32": {f"{k}_batch{b}": v / lat[("fp32", b)] for (k, b), v in lat.items() if k != "fp32"},
    }
    if not args.no_agreement:
        rec["test_set"] = agreement(model, cfg, files["codeq"], args.threads)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", default="data", help="dataset.root of the runs' test images")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--loads", type=int, default=5)
    p.add_argument("--no-agreement", action="store_true", help="skip the test-set agreement")
    p.add_argument("--keep", default=None, help="keep the ONNX files in this directory")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import onnxruntime

    env = env_header(torch.device("cpu"))
    env["onnxruntime"] = onnxruntime.__version__
    env["ort_threads"] = args.threads
    print_env("codeq ONNX export vs fp32 ONNX (ONNX Runtime, CPU)", env)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.checkpoints:
            rec = bench(ckpt, args, args.keep or tmp)
            results.append(rec)
            print(json.dumps(rec, indent=1))
    print()
    print("| run | bits | fp32 ONNX | codeq ONNX | gzipped | compact | load (fp32 / codeq) | "
          "latency b1 (fp32 / codeq) | latency b64 (fp32 / codeq) | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        b, q = r["bytes"], r["ratio_to_fp32_onnx"]
        lat = r["latency_ms"]
        agree = r.get("test_set", {}).get("agreement")
        print(f"| {r['run']} | {'/'.join(map(str, r['bits']))} | {b['fp32_onnx']:,} | {b['codeq_onnx']:,} "
              f"({q['codeq_onnx']:.3f}x) | {b['codeq_onnx_gzip']:,} ({q['codeq_onnx_gzip']:.3f}x) | "
              f"{b['codeq_compact']:,} ({q['codeq_compact']:.3f}x) | "
              f"{1e3 * r['load_s']['fp32']:.1f} / {1e3 * r['load_s']['codeq']:.1f} ms | "
              f"{lat['fp32_batch1']:.3f} / {lat['codeq_batch1']:.3f} ms "
              f"({r['latency_ratio_to_fp32']['codeq_batch1']:.3f}x) | "
              f"{lat['fp32_batch64']:.2f} / {lat['codeq_batch64']:.2f} ms "
              f"({r['latency_ratio_to_fp32']['codeq_batch64']:.3f}x) | "
              f"{'-' if agree is None else f'{100 * agree:.2f} %'} |")
    if args.out:
        write_results(args.out, env, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
