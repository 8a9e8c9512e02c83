#!/usr/bin/env python
"""Where the host time of a training step goes, and what a CUDA graph of it would save.

    python benchmarks/profile_step.py --device cuda --models mlp,resnet20 --out FILE.json

For each model and variant (the configs of bench_train_step.py, the step the
trainer runs) it prints:

- the mean time of a step over a run of steps with one synchronisation at the
  end (the throughput a training loop sees; bench_train_step.py times single
  synchronised steps instead);
- kernel launches per step, and the operators with the most host (self CPU)
  time per step (torch.profiler);
- with --graph (CUDA only): whether the whole step (zero_grad, forward, loss
  terms, backward, a capturable fused AdamW step) can be captured in one CUDA
  graph, and the mean time of a replay.  A capture that fails prints why:
  that is the finding (a host synchronisation or CPU-side state in the step).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quantizer import env_header, print_env, sync, write_results  # noqa: E402
from bench_train_step import CUDA_ONLY, VARIANTS, make_trainer, parse_selection  # noqa: E402

from codeq.train.trainer import Trainer  # noqa: E402

LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def mean_step_ms(fn, device, steps: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def profile(tr: Trainer, x, y, device, steps: int, top: int):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for _ in range(steps):
            tr.train_step(x, y)
        sync(device)
    avg = prof.key_averages()
    launches = sum(e.count for e in avg if e.key in LAUNCH_NAMES) / steps
    rows = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ops = [{"op": e.key, "self_cpu_us_per_step": e.self_cpu_time_total / steps, "calls_per_step": e.count / steps}
           for e in rows]
    return launches, ops


def graph_step(tr: Trainer, x, y, device, steps: int):
    """Capture zero_grad + loss + backward + optimizer step in one CUDA graph
    (AdamW fused and capturable, the trainer's param groups); mean replay ms."""
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
              for g in tr.optimizer.param_groups]
    for g in groups:
        for k in ("fused", "foreach", "capturable", "differentiable", "initial_lr"):
            g.pop(k, None)
    tr.optimizer = torch.optim.AdamW(groups, fused=True, capturable=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            tr.train_step(x, y)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    tr.optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        out = tr.train_step(x, y)
    graph.replay()
    torch.cuda.synchronize()
    first = float(out["loss"])
    graph.replay()
    torch.cuda.synchronize()
    second = float(out["loss"])
    ms = mean_step_ms(graph.replay, device, steps)
    return ms, first, second


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="mlp,resnet20")
    p.add_argument("--variants", default="baseline,codeq_qat_gl")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="steps per timing (default 50)")
    p.add_argument("--top", type=int, default=12, help="operators listed per variant (default 12)")
    p.add_argument("--graph", action="store_true", help="also capture the step in a CUDA graph (CUDA only)")
    p.add_argument("--out")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    # eager steps only: --graph captures them itself
    eager = [v for v in VARIANTS if not v.endswith("compiled") and v not in CUDA_ONLY]
    sel = parse_selection(device, args.models, args.variants, allowed=eager)
    if isinstance(sel, str):
        print(f"error: {sel}", file=sys.stderr)
        return 2
    models, variants = sel
    env = env_header(device)
    print_env("codeq step profile (mean ms per step over a run of steps, launches and host time per step)", env)
    results = []
    for m in models:
        for v in variants:
            tr = make_trainer(m, v, args.batch, device)
            img = tr.cfg.img_size
            x = torch.randn(args.batch, 3, img, img, device=device)
            y = torch.randint(0, 10, (args.batch,), device=device)
            tr.model.train()
            for _ in range(5):
                tr.train_step(x, y)
            ms = mean_step_ms(lambda: tr.train_step(x, y), device, args.steps)
            launches, ops = profile(tr, x, y, device, min(args.steps, 20), args.top)
            res = {"model": m, "variant": v, "mean_ms": ms, "launches_per_step": launches, "top_ops": ops}
            print(f"\n{m} {v}: {ms:.3f} ms/step, {launches:.0f} kernel launches/step")
            for o in ops:
                print(f"   {o['self_cpu_us_per_step']:9.1f} us  {o['calls_per_step']:6.1f}x  {o['op']}")
            if args.graph and device.type == "cuda":
                try:
                    gms, l1, l2 = graph_step(tr, x, y, device, args.steps)
                    res.update(graph_ms=gms, graph_loss_first=l1, graph_loss_second=l2)
                    print(f"   CUDA graph of the whole step: {gms:.3f} ms/replay "
                          f"(loss {l1:.5f} then {l2:.5f}: the replays train)")
                except Exception as exc:  # the finding: why the step cannot be captured
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    res["graph_error"] = msg
                    print(f"   CUDA graph capture failed: {msg}")
            results.append(res)
            del tr
            if args.out:
                write_results(args.out, env, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
