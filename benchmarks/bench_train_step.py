#!/usr/bin/env python
"""Training-step benchmark: what QAT costs per optimisation step.

    python benchmarks/bench_train_step.py --device cpu --models mlp,resnet20,vit --out FILE.json

Median time of one step (forward, loss incl. loss terms, backward, optimizer
step) at batch 128 for each model in these variants, measured in one run:

  baseline               no quantizer
  reference_qat          the pure-PyTorch reference quantizers (codeq.reference)
  reference_qat_gl       ... plus the reference group lasso
  codeq_qat              codeq's fused quantizers
  codeq_qat_gl           ... plus codeq's fused group lasso
  codeq_qat_gl_compiled  ... with use_compile: 1
  baseline_graph         baseline with cuda_graph: true (CUDA only)
  codeq_qat_gl_graph     codeq_qat_gl with cuda_graph: true (CUDA only)
  baseline_cl            baseline with channels_last: true (NHWC batches)
  codeq_qat_gl_cl        codeq_qat_gl with channels_last: true
  baseline_bf16          baseline with amp: bf16
  codeq_qat_gl_bf16      codeq_qat_gl with amp: bf16
  baseline_tf32          baseline with matmul_precision: high (TF32; CUDA only)
  codeq_qat_gl_tf32      codeq_qat_gl with matmul_precision: high (CUDA only)

Every variant runs ``Trainer.batch`` and ``Trainer.step`` -- exactly what
the trainer runs per batch -- on a model built from the same config the
trainer would use, under the run's backend flags (``backend_flags``).  The
variants without a suffix are plain float32 with contiguous batches and
``matmul_precision: highest``.  The default list is every variant the device
can run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quantizer import env_header, print_env, sync, write_results  # noqa: E402

import codeq  # noqa: E402
from codeq import reference as R  # noqa: E402
from codeq.train.config import config_from_dict  # noqa: E402
from codeq.train.optim import build_optimizer, build_scheduler  # noqa: E402
from codeq.train.precision import backend_flags  # noqa: E402
from codeq.train.trainer import Trainer, build_run_model  # noqa: E402

VARIANTS = ["baseline", "reference_qat", "reference_qat_gl", "codeq_qat", "codeq_qat_gl", "codeq_qat_gl_compiled",
            "baseline_graph", "codeq_qat_gl_graph", "baseline_cl", "codeq_qat_gl_cl", "baseline_bf16",
            "codeq_qat_gl_bf16", "baseline_tf32", "codeq_qat_gl_tf32"]
CUDA_ONLY = ("baseline_graph", "codeq_qat_gl_graph", "baseline_tf32", "codeq_qat_gl_tf32")

MODELS = {
    # exclude_layers and group-lasso lambdas as in the guide's example configs
    "mlp": dict(model="mlp", img_size=32, exclude=[], gl=dict(lambda_linear=1e-4, lambda_conv=1e-4)),
    "resnet20": dict(model="resnet20", img_size=32, exclude=["bn"], gl=dict(lambda_linear=1e-4, lambda_conv=1e-4)),
    "vit": dict(model="vit", img_size=224, exclude=["norm"], gl=dict(lambda_linear=1e-4, lambda_conv=0.0)),
}

# The reference group lasso, registered under its own name for this benchmark.
codeq.LOSS_REGISTRY.setdefault("_reference_group_lasso", R.group_lasso)


def make_config(model: str, variant: str, batch: int, device: str) -> dict:
    spec = MODELS[model]
    cfg = {
        "model": spec["model"],
        "epochs": 1,
        "batch_size": batch,
        "img_size": spec["img_size"],
        "device": device,
        "workers": 0,
        "save_dir": "/tmp/codeq_bench",
        "lr_scheduler": "cosine",
        "dataset": {"name": "synthetic", "train_size": batch, "val_size": batch},
        "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 1e-3, "weight_decay": 0.0},
                                                        "dz": {"lr": 1e-3, "weight_decay": 2.5},
                                                        "bit": {"lr": 1e-3, "weight_decay": 0.0}}},
        "use_compile": 1 if variant.endswith("compiled") else 0,
        "cuda_graph": variant.endswith("_graph"),
        "channels_last": variant.endswith("_cl"),
        "amp": "bf16" if variant.endswith("_bf16") else "none",
        "matmul_precision": "high" if variant.endswith("_tf32") else "highest",
    }
    if not variant.startswith("baseline"):
        cfg["quantizer"] = {
            "name": "deadzone",
            "kwargs": {"fixed_bit_val": 4, "max_bits": 8, "init_deadzone_logit": 3.0, "init_bit_logit": 3.0,
                       "learnable_bit": True, "learnable_deadzone": True, "reference": variant.startswith("reference")},
            "exclude_layers": spec["exclude"],
        }
    if variant.endswith("_gl") or "_gl_" in variant:
        name = "_reference_group_lasso" if variant.startswith("reference") else "group_lasso"
        cfg["loss_terms"] = [{"name": name, "lambda": 1.0, "kwargs": dict(spec["gl"])}]
    return cfg


def make_trainer(model: str, variant: str, batch: int, device: torch.device) -> Trainer:
    """The trainer of one variant, built as the trainer's own from_config would (seed 0)."""
    torch.manual_seed(0)
    cfg = config_from_dict(make_config(model, variant, batch, str(device)))
    net = build_run_model(cfg).to(device)
    opt = build_optimizer(cfg, net)
    return Trainer(cfg, device, net, opt, build_scheduler(cfg, opt), None, None, torch.Generator())


def parse_selection(device: torch.device, models: str, variants: str | None, allowed=VARIANTS):
    """(models, variants) from the comma-separated options, or the error line to print."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "--device cuda but no CUDA GPU is visible; use --device cpu"
    ms = [m.strip() for m in models.split(",") if m.strip()]
    if variants is None:
        vs = [v for v in allowed if device.type == "cuda" or v not in CUDA_ONLY]
    else:
        vs = [v.strip() for v in variants.split(",") if v.strip()]
    for m in ms:
        if m not in MODELS:
            return f"unknown model {m!r}; choose from {', '.join(MODELS)}"
    for v in vs:
        if v not in allowed:
            return f"unknown variant {v!r}; choose from {', '.join(allowed)}"
        if v in CUDA_ONLY and device.type != "cuda":
            return f"variant {v!r} needs --device cuda"
    return ms, vs


def time_interleaved(trainers: dict, x, y, device, warmup: int, min_time: float, min_reps: int, max_reps: int,
                     block: int = 1):
    """Median step time (s) of every variant, measured round-robin: each round
    runs ``block`` consecutive steps of every variant (timing all but the
    first of a block when block > 1, so that a variant runs with its own data
    in cache, as in real training), so that drift of the machine (clock,
    neighbours) hits all variants alike and the ratios are fair."""
    def step(tr):
        with backend_flags(tr.cfg, device):
            tr.step(*tr.batch(x, y))

    for tr in trainers.values():
        tr.model.train()
        for _ in range(warmup):
            step(tr)
    sync(device)
    times = {v: [] for v in trainers}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < min_time):
        for v, tr in trainers.items():
            for i in range(block):
                t0 = time.perf_counter()
                step(tr)
                sync(device)
                if block == 1 or i > 0:
                    times[v].append(time.perf_counter() - t0)
        rounds += 1
    return {v: statistics.median(t) for v, t in times.items()}, len(next(iter(times.values())))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="mlp,resnet20,vit")
    p.add_argument("--variants", default=None,
                   help="comma-separated (default: all that the device runs; the *_graph ones need CUDA)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--min-time", type=float, default=2.0,
                   help="seconds of timed steps per variant (default 2); variants are timed round-robin")
    p.add_argument("--min-reps", type=int, default=10, help="at least this many rounds")
    p.add_argument("--block", type=int, default=1,
                   help="consecutive steps of a variant per round (the first of a block is not timed when > 1)")
    p.add_argument("--out")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    sel = parse_selection(device, args.models, args.variants)
    if isinstance(sel, str):
        print(f"error: {sel}", file=sys.stderr)
        return 2
    models, variants = sel

    env = env_header(device)
    print_env("codeq training-step benchmark (median ms per step: forward, loss terms, backward, optimizer step)", env)
    print(f"#   batch: {args.batch}")
    print(f"{'model':<10} {'variant':<24} {'median ms':>10} {'x baseline':>11} {'steps':>6}")
    results = []
    for m in models:
        trainers = {v: make_trainer(m, v, args.batch, device) for v in variants}
        img = trainers[variants[0]].cfg.img_size
        x = torch.randn(args.batch, 3, img, img, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        # warm-up: 5 steps (a cuda_graph trainer warms up for 3 and captures the 4th)
        med, rounds = time_interleaved(trainers, x, y, device, 5, args.min_time * len(variants), args.min_reps, 500,
                                       args.block)
        base_ms = med["baseline"] * 1e3 if "baseline" in med else None
        for v in variants:
            ms = med[v] * 1e3
            ratio = ms / base_ms if base_ms else float("nan")
            results.append({"model": m, "variant": v, "median_ms": ms, "ratio_to_baseline": ratio, "steps": rounds})
            print(f"{m:<10} {v:<24} {ms:10.2f} {ratio:10.2f}x {rounds:6d}", flush=True)
        del trainers
        if args.out:  # after every model: a run cut short keeps what it measured
            write_results(args.out, env, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
