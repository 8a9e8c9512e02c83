#!/usr/bin/env python
"""A/B of the special paths for speed that codeq keeps, in one process.

    python benchmarks/ab_special_paths.py --device cpu --model mlp --out FILE.json

Each variant is the training step the trainer runs (``Trainer.step``, codeq QAT
+ group lasso, the config of bench_train_step.py) with one special path turned
off; ``baseline`` is the step without quantizers.  Variants run round-robin in
blocks of ``--block`` steps (the first step of a block untimed), so that drift
of the machine hits them alike; the table gives each one's median step and its
change against ``codeq_qat_gl``, the step with every path on.  A path stays
only while turning it off costs 3% of a step of some model or more
(benchmarks/results/ab_special_paths.md).

  per_layer          fused_weights: false (each quantizer its own op call)
  gl_separate        the group lasso as its own op over the quantized weights,
                     not fused into the dead-zone op
  plain_adamw        torch's fused AdamW step instead of codeq.train.optim's lean one
  no_quantile_window the CPU quantile without its window around the previous
                     answer (radix select every step)

glibc's malloc tuning (codeq/train/malloc.py) is process-wide: ``--no-malloc-tuning``
runs the whole table without it, for a comparison between two processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--no-malloc-tuning" in sys.argv:
    os.environ["CODEQ_MALLOC_TUNING"] = "0"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quantizer import env_header, print_env, sync, write_results  # noqa: E402
from bench_train_step import MODELS, make_trainer  # noqa: E402

from codeq import _ext  # noqa: E402
from codeq.fastpath import FusedWeights  # noqa: E402

VARIANTS = ["baseline", "codeq_qat_gl", "per_layer", "gl_separate", "plain_adamw", "no_quantile_window"]


def _per_layer(tr):
    tr.fast, tr.fast_term = None, None


def _gl_separate(tr):
    tr.fast, tr.fast_term = FusedWeights(tr.model, group_lasso=None), None


def _plain_adamw(tr):
    groups = [dict(g) for g in tr.optimizer.param_groups]
    tr.optimizer = torch.optim.AdamW(groups, fused=True)


def make(model: str, variant: str, batch: int, device):
    """(trainer, function run before each of its steps) of one variant."""
    tr = make_trainer(model, "baseline" if variant == "baseline" else "codeq_qat_gl", batch, device)
    {"per_layer": _per_layer, "gl_separate": _gl_separate, "plain_adamw": _plain_adamw}.get(variant, lambda t: None)(tr)
    before = _ext._C.quantile_hints_clear if variant == "no_quantile_window" else (lambda: None)
    return tr, before


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="mlp", choices=sorted(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--block", type=int, default=20)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--no-malloc-tuning", action="store_true", help="CODEQ_MALLOC_TUNING=0 for this process")
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "codeq_qat_gl" not in variants:
        print(f"error: variants must include codeq_qat_gl and come from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    runs = {v: make(args.model, v, args.batch, device) for v in variants}
    img = runs["codeq_qat_gl"][0].cfg.img_size
    x = torch.randn(args.batch, 3, img, img, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    env = env_header(device)
    env["malloc_tuning"] = os.environ.get("CODEQ_MALLOC_TUNING", "1") != "0"
    print_env(f"A/B of the special paths, {args.model} (median ms per training step)", env)
    for tr, before in runs.values():
        for _ in range(5):
            before()
            tr.step(x, y)
    times = {v: [] for v in runs}
    for _ in range(args.rounds):
        for v, (tr, before) in runs.items():
            for i in range(args.block):
                before()
                sync(device)
                t0 = time.perf_counter()
                tr.step(x, y)
                sync(device)
                if i:
                    times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    base, on = med.get("baseline"), med["codeq_qat_gl"]
    print(f"{'variant':<20} {'ms':>8} {'x baseline':>11} {'vs all on':>10}")
    results = []
    for v in runs:
        r = {"model": args.model, "variant": v, "median_ms": med[v] * 1e3, "steps": len(times[v]),
             "ratio_to_baseline": med[v] / base if base else None, "change_vs_all_on": med[v] / on - 1}
        results.append(r)
        ratio = f"{r['ratio_to_baseline']:10.3f}x" if base else f"{'-':>11}"
        print(f"{v:<20} {r['median_ms']:8.3f} {ratio} {100 * r['change_vs_all_on']:+9.1f}%", flush=True)
    if args.out:
        write_results(args.out, env, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
