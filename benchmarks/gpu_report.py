"""CUDA timing / bandwidth / memory report of the codeq kernels (markdown + JSON).

Measures on the current GPU:
- the device copy bandwidth (a torch copy of a 512 MiB tensor; read + write bytes);
- the dead-zone quantizer fwd+bwd (module with autograd, and the raw ops) for
  the issue's sizes, in microseconds, with the effective GB/s of the minimal
  traffic (fwd: read w, write w_hat; bwd: read g and w, write dL/dw: 5 tensors)
  and its fraction of the copy bandwidth, against the issue's targets;
- the peak extra memory of fwd+bwd (torch.cuda.max_memory_allocated above the
  live tensors before the step) as a multiple of the weight's size;
- the uniform quantizer and the reference, for comparison;
- the group lasso fwd+bwd over all nn.Linear/nn.Conv2d layers of ViT-Tiny
  (timm, random init) vs the reference.

    python benchmarks/gpu_report.py --out benchmarks/results/gpu_report [--status tests=passed ...]
            [--bench-json benchmarks/results/bench_quantizer_cuda.json]

writes OUT.md and OUT.json.  Exits 0 with a message when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

TARGETS_US = {36_864: 30.0, 147_456: 40.0, 2_359_296: 60.0, 16_777_216: 250.0}
GL_TARGET_US = 300.0
MEM_TARGET = 2.1


def cuda_time_us(fn, iters=50, warmup=10):
    """Mean wall time per call (host launch included), timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def copy_bandwidth_gbs(nbytes=512 << 20):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = cuda_time_us(lambda: dst.copy_(src), iters=20, warmup=5)
    return 2 * nbytes / (us * 1e-6) / 1e9


def peak_extra_bytes(step):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_deadzone(n, dtype, bw):
    import codeq

    dev = torch.device("cuda")
    w = (torch.randn(n, device=dev) * 0.02).to(dtype).requires_grad_(True)
    g = torch.randn(n, device=dev).to(dtype)
    itemsize = w.element_size()
    res = {"n": n, "dtype": str(dtype).replace("torch.", ""), "weight_bytes": n * itemsize}

    def run_module(q):
        def f():
            w.grad = None
            for p in q.parameters():
                p.grad = None
            q(w).backward(g)
        return f

    fused = codeq.DeadZoneLDZCompander().to(dev)
    ref = codeq.DeadZoneLDZCompander(reference=True).to(dev)
    res["fused_fwd_bwd_us"] = cuda_time_us(run_module(fused))
    ldz, lbit = [fused.logit_dz.detach()], [fused.logit_bit.detach()]
    wd = [w.detach()]
    ops = torch.ops.codeq
    cfg = ([4.0], [2.0], [8.0], [True], [0.0])

    def raw():
        w_hat, gl, sc, norms = ops.deadzone_forward(wd, ldz, lbit, *cfg)
        ops.deadzone_backward([g], gl, wd, w_hat, sc, norms, ldz, lbit, *cfg[1:])

    res["ops_fwd_bwd_us"] = cuda_time_us(raw)
    res["ops_fwd_us"] = cuda_time_us(lambda: ops.deadzone_forward(wd, ldz, lbit, *cfg))
    try:
        res["reference_fwd_bwd_us"] = cuda_time_us(run_module(ref), iters=10, warmup=3)
    except RuntimeError as exc:  # e.g. out of memory for the sort at the largest size
        res["reference_fwd_bwd_us"] = None
        res["reference_error"] = str(exc).splitlines()[0]
    moved = 5 * n * itemsize
    res["min_bytes_moved"] = moved
    res["ops_GBps"] = moved / (res["ops_fwd_bwd_us"] * 1e-6) / 1e9
    res["ops_fraction_of_copy_bw"] = res["ops_GBps"] / bw
    res["fused_GBps"] = moved / (res["fused_fwd_bwd_us"] * 1e-6) / 1e9
    w.grad = None
    peak = peak_extra_bytes(run_module(fused))
    res["peak_extra_bytes"] = peak
    res["peak_extra_x_weight"] = peak / (n * itemsize)
    if dtype == torch.float32 and n in TARGETS_US:
        res["target_us"] = TARGETS_US[n]
        res["meets_time_target"] = res["fused_fwd_bwd_us"] <= TARGETS_US[n]
        res["meets_time_target_ops"] = res["ops_fwd_bwd_us"] <= TARGETS_US[n]
    res["meets_memory_target"] = res["peak_extra_x_weight"] <= MEM_TARGET
    return res


def bench_uniform(n):
    import codeq

    w = (torch.randn(n, device="cuda") * 0.02).requires_grad_(True)
    g = torch.randn(n, device="cuda")
    q = codeq.UniformSymmetric(8)

    def f():
        w.grad = None
        q(w).backward(g)

    return {"n": n, "fused_fwd_bwd_us": cuda_time_us(f)}


def bench_group_lasso():
    import codeq
    from codeq import reference
    from codeq.losses import group_lasso_layers

    try:
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False).cuda()
        name = "vit_tiny_patch16_224 (timm, random init)"
    except Exception as exc:  # timm missing: a ViT-Tiny-shaped stack of layers
        from torch import nn

        layers = [nn.Conv2d(3, 192, 16, 16)]
        for _ in range(12):
            layers += [nn.Linear(192, 576), nn.Linear(192, 192), nn.Linear(192, 768), nn.Linear(768, 192)]
        layers.append(nn.Linear(192, 1000))
        model = nn.Sequential(*layers).cuda()
        name = f"ViT-Tiny-shaped layers (timm unavailable: {type(exc).__name__})"
    layers = group_lasso_layers(model)
    params = sum(m.weight.numel() for m, _ in layers)

    def run(fn):
        def f():
            model.zero_grad(set_to_none=True)
            fn(model).backward()
        return f

    fused_us = cuda_time_us(run(codeq.group_lasso))
    ref_us = cuda_time_us(run(reference.group_lasso), iters=20, warmup=3)
    return {"model": name, "layers": len(layers), "params": params, "fused_fwd_bwd_us": fused_us,
            "reference_fwd_bwd_us": ref_us, "target_us": GL_TARGET_US, "meets_target": fused_us <= GL_TARGET_US}


def markdown(rep):
    L = [f"# codeq CUDA report ({rep['timestamp']})", ""]
    L.append(f"- device: {rep['device']} (CUDA {rep['cuda']}, torch {rep['torch']}, codeq build {rep['codeq_build']})")
    L.append(f"- device copy bandwidth: {rep['copy_GBps']:.0f} GB/s (torch copy of 512 MiB, read + write)")
    for k, v in rep.get("status", {}).items():
        L.append(f"- {k}: {v}")
    L += ["", "## Dead-zone quantizer, fwd+bwd", "",
          "| n | dtype | module µs | ops µs | ops fwd µs | reference µs | GB/s (ops) | % copy bw | peak extra × w | target µs | met |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rep["deadzone"]:
        ref = f"{r['reference_fwd_bwd_us']:.1f}" if r.get("reference_fwd_bwd_us") else "n/a"
        L.append(f"| {r['n']:,} | {r['dtype']} | {r['fused_fwd_bwd_us']:.1f} | {r['ops_fwd_bwd_us']:.1f} | "
                 f"{r['ops_fwd_us']:.1f} | {ref} | {r['ops_GBps']:.0f} | {100 * r['ops_fraction_of_copy_bw']:.0f}% | "
                 f"{r['peak_extra_x_weight']:.2f} | {r.get('target_us', '')} | "
                 f"{r.get('meets_time_target', '')}{'' if r['meets_memory_target'] else ' (memory target missed)'} |")
    L += ["", "module = codeq.DeadZoneLDZCompander with autograd (what training sees); ops = the two torch.ops "
          "calls alone.  GB/s counts the minimal traffic (5 tensors of n elements).", ""]
    L += ["## Uniform quantizer, fwd+bwd", "", "| n | µs |", "|---:|---:|"]
    for r in rep["uniform"]:
        L.append(f"| {r['n']:,} | {r['fused_fwd_bwd_us']:.1f} |")
    gl = rep["group_lasso"]
    L += ["", "## Group lasso, fwd+bwd over all layers", "",
          f"{gl['model']}: {gl['layers']} layers, {gl['params']:,} weights: fused {gl['fused_fwd_bwd_us']:.1f} µs, "
          f"reference {gl['reference_fwd_bwd_us']:.1f} µs (target ≤ {gl['target_us']:.0f} µs: "
          f"{'met' if gl['meets_target'] else 'MISSED'})", ""]
    if rep.get("bench_quantizer"):
        L += ["## benchmarks/bench_quantizer.py --device cuda", "", "```json",
              json.dumps(rep["bench_quantizer"], indent=1)[:20000], "```", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_report", help="output path without extension")
    ap.add_argument("--status", action="append", default=[], help="key=value lines to put in the report")
    ap.add_argument("--bench-json", default=None, help="bench_quantizer.py output to embed")
    ap.add_argument("--sizes", default="36864,147456,2359296,16777216")
    ap.add_argument("--quick", action="store_true", help="fewer sizes/dtypes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_report: no CUDA GPU visible; nothing measured (skipped).")
        return 0
    import codeq

    if not codeq._ext.has_kernel("cuda"):
        print(f"gpu_report: codeq has no CUDA kernels: {codeq.info()}", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = False
    sizes = [int(s) for s in args.sizes.split(",") if s]
    bw = copy_bandwidth_gbs()
    rep = {
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "codeq_build": codeq.info(),
        "host": platform.node(),
        "copy_GBps": bw,
        "status": dict(s.split("=", 1) for s in args.status if "=" in s),
        "deadzone": [],
    }
    for n in sizes:
        rep["deadzone"].append(bench_deadzone(n, torch.float32, bw))
        print(json.dumps(rep["deadzone"][-1]))
    if not args.quick:
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            rep["deadzone"].append(bench_deadzone(2_359_296, dtype, bw))
    rep["uniform"] = [bench_uniform(n) for n in sizes]
    rep["group_lasso"] = bench_group_lasso()
    print(json.dumps(rep["group_lasso"]))
    if args.bench_json and os.path.exists(args.bench_json):
        with open(args.bench_json) as f:
            rep["bench_quantizer"] = json.load(f)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rep, f, indent=1, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rep))
    print(f"gpu_report: wrote {args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
