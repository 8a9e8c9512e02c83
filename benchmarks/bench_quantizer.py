#!/usr/bin/env python
"""Quantizer and group-lasso micro-benchmark: eager reference vs torch.compile'd
reference vs the fused codeq ops, forward + backward.

    python benchmarks/bench_quantizer.py --device cpu --out results.json
    python benchmarks/bench_quantizer.py --device cuda --sizes 36864,2359296 --no-compile

Prints an environment header and a table (median µs of one forward+backward,
speed-up of the fused op over the eager reference, the fused op's effective
GB/s) and writes the numbers as JSON.  Effective bytes of a dead-zone
forward+backward: read w (forward), write ŵ,
read ∂L/∂ŵ and w (backward), write ∂L/∂w -> 5 tensors of n elements (the extra
read pass of the quantile selection is not counted).  Group lasso: read W
twice, write ∂W once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import codeq
from codeq import reference as R

SIZES = {
    36_864: "ResNet-20 conv (64x64x3x3)",
    147_456: "ViT-Tiny fc1 (768x192)",
    589_824: "ViT-Base attn proj (768x768)",
    2_359_296: "ViT-Base fc1 (3072x768)",
    16_777_216: "4096x4096",
}


def env_header(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "codeq": codeq.__version__,
        "device": str(device),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "codeq_info": codeq.info(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def print_env(title: str, env: dict) -> None:
    """The environment header every benchmark prints before its table."""
    print(f"# {title}")
    for k, v in env.items():
        if k != "codeq_info":
            print(f"#   {k}: {v}")
    info = env["codeq_info"]
    print(f"#   codeq: extension={info['extension_loaded']} fused={info['fused_devices']} "
          f"cuda_built={info['cuda_built']} archs={info['cuda_archs']} openmp={info['openmp']}")


def write_results(path: str, env: dict, results: list) -> None:
    """{"env": ..., "results": [...]} as JSON, written atomically."""
    from codeq._io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps({"env": env, "results": results}, indent=1) + "\n").encode())
    print(f"# wrote {path}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device, min_time=0.4, min_reps=5, max_reps=200, warmup=2):
    """Median wall time (s) of fn() over repetitions (after warm-up)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dz_step(q, w, g):
    def run():
        w.grad = None
        q.zero_grad(set_to_none=True)
        out = q(w)
        out.backward(g)

    return run


def quantizer_rows(device, sizes, compile_ref, dtype):
    rows = []
    for n in sizes:
        torch.manual_seed(0)
        w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(n, device=device, dtype=dtype)
        kw = dict(init_deadzone_logit=2.0, init_bit_logit=1.0)
        ref = codeq.DeadZoneLDZCompander(**kw, reference=True).to(device)
        fused = codeq.DeadZoneLDZCompander(**kw).to(device)
        row = {"kind": "deadzone", "n": n, "what": SIZES.get(n, ""), "dtype": str(dtype).replace("torch.", "")}
        row["eager_ref_us"] = bench(dz_step(ref, w, g), device) * 1e6
        if compile_ref:
            torch._dynamo.reset()
            cref = codeq.DeadZoneLDZCompander(**kw, reference=True).to(device)
            cref.forward = torch.compile(cref.forward, dynamic=False)
            row["compiled_ref_us"] = bench(dz_step(cref, w, g), device, warmup=3) * 1e6
        row["fused_us"] = bench(dz_step(fused, w, g), device) * 1e6
        row["speedup_vs_eager"] = row["eager_ref_us"] / row["fused_us"]
        if "compiled_ref_us" in row:
            row["speedup_vs_compiled"] = row["compiled_ref_us"] / row["fused_us"]
        row["fused_GBps"] = 5 * n * w.element_size() / (row["fused_us"] * 1e-6) / 1e9
        rows.append(row)
        print_row(row)
    return rows


def resnet20_layers():
    layers = [nn.Conv2d(3, 16, 3, bias=False)]
    for cin, cout in ((16, 16), (16, 32), (32, 64)):
        layers.append(nn.Conv2d(cin, cout, 3, bias=False))
        layers += [nn.Conv2d(cout, cout, 3, bias=False) for _ in range(5)]
    layers.append(nn.Linear(64, 10))
    return nn.ModuleList(layers)


def vit_tiny_layers():
    d = 192
    layers = [nn.Conv2d(3, d, 16, 16)]
    for _ in range(12):
        layers += [nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]
    layers.append(nn.Linear(d, 10))
    return nn.ModuleList(layers)


def group_lasso_rows(device, compile_ref):
    rows = []
    for name, build in (("resnet20", resnet20_layers), ("vit_tiny", vit_tiny_layers)):
        torch.manual_seed(0)
        model = build().to(device)
        n = sum(p.numel() for m in model for p in [m.weight])

        def step(fn):
            def run():
                model.zero_grad(set_to_none=True)
                fn(model, 1e-4, 1e-4).backward()

            return run

        row = {"kind": "group_lasso", "model": name, "n": n, "layers": len(model)}
        row["eager_ref_us"] = bench(step(R.group_lasso), device) * 1e6
        if compile_ref:
            torch._dynamo.reset()
            row["compiled_ref_us"] = bench(step(torch.compile(R.group_lasso)), device, warmup=3) * 1e6
        row["fused_us"] = bench(step(codeq.group_lasso), device) * 1e6
        row["speedup_vs_eager"] = row["eager_ref_us"] / row["fused_us"]
        if "compiled_ref_us" in row:
            row["speedup_vs_compiled"] = row["compiled_ref_us"] / row["fused_us"]
        row["fused_GBps"] = 3 * n * 4 / (row["fused_us"] * 1e-6) / 1e9
        rows.append(row)
        print_row(row)
    return rows


HEAD = f"{'op':<12} {'size':>10} {'what':<30} {'eager ref µs':>13} {'compiled µs':>12} {'fused µs':>10} " \
       f"{'speed-up':>9} {'vs compiled':>11} {'fused GB/s':>10}"


def print_row(r):
    what = r.get("what") or f"{r.get('model')} ({r.get('layers')} layers)"
    comp = f"{r['compiled_ref_us']:12.1f}" if "compiled_ref_us" in r else f"{'-':>12}"
    vsc = f"{r['speedup_vs_compiled']:10.1f}x" if "speedup_vs_compiled" in r else f"{'-':>11}"
    print(f"{r['kind']:<12} {r['n']:>10,} {what:<30} {r['eager_ref_us']:13.1f} {comp} {r['fused_us']:10.1f} "
          f"{r['speedup_vs_eager']:8.1f}x {vsc} {r['fused_GBps']:10.2f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--sizes", help="comma-separated element counts (default: %s)" % ",".join(map(str, SIZES)))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible; use --device cpu", file=sys.stderr)
        return 2
    if device.type not in codeq.info()["fused_devices"]:
        print(f"warning: no fused codeq kernels for {device.type} in this build; 'fused' runs the reference",
              file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(SIZES)
    except ValueError:
        print(f"error: --sizes must be comma-separated integers, got {args.sizes!r}", file=sys.stderr)
        return 2

    env = env_header(device)
    print_env("codeq quantizer benchmark (median of forward+backward)", env)
    print(HEAD)
    dtype = getattr(torch, args.dtype)
    results = quantizer_rows(device, sizes, not args.no_compile, dtype)
    results += group_lasso_rows(device, not args.no_compile)
    if args.out:
        write_results(args.out, env, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
