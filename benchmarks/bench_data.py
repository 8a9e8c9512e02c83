#!/usr/bin/env python
"""Input-pipeline benchmark: images/s of CIFAR-10 training batches.

    python benchmarks/bench_data.py --device cpu|cuda --root data [--workers 4] [--batches 100]
                                    [--train resnet20] [--out FILE.json]

Measures, in one run:

  dataloader   the DataLoader path (PIL RandomCrop + flip + ToTensor + Normalize
               in ``--workers`` processes), batches moved to the device
  on_device    ``dataset.on_device: true`` (codeq.train.device_data): the data
               set held on the device, crop / flip / normalise there

and with ``--train MODEL`` also a training step per batch (the trainer's own
``Trainer.train_step``, codeq QAT with group lasso as configs/deadzone_resnet20.yaml)
for both paths, i.e. whether the input pipeline keeps the device busy.
``--root`` must hold ``cifar-10-batches-bin`` or ``cifar-10-batches-py``
(``--synthetic`` uses generated CIFAR-shaped data instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quantizer import env_header, print_env, sync, write_results  # noqa: E402

from codeq.train.config import ConfigError, config_from_dict  # noqa: E402
from codeq.train.data import build_datasets, build_loaders  # noqa: E402
from codeq.train.optim import build_optimizer, build_scheduler  # noqa: E402
from codeq.train.sampling import epoch_seed  # noqa: E402
from codeq.train.trainer import Trainer, build_run_model  # noqa: E402


def make_cfg(args, on_device: bool, model: str):
    ds = {"name": "synthetic", "train_size": 10_000, "val_size": 100} if args.synthetic else \
        {"name": "cifar10", "root": args.root, "val_size": 100}
    ds["on_device"] = on_device
    ds["augment"] = "standard"  # what the device path supports: the same recipe on both paths
    return config_from_dict({
        "model": model, "epochs": 1, "batch_size": args.batch, "device": args.device, "workers": args.workers,
        "save_dir": "/tmp/codeq_bench_data", "seed": 0, "dataset": ds,
        "quantizer": {"name": "deadzone", "exclude_layers": ["bn"],
                      "kwargs": {"fixed_bit_val": 4, "max_bits": 8, "init_deadzone_logit": 3.0,
                                 "init_bit_logit": 3.0, "learnable_bit": True}},
        "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 1e-3}, "dz": {"lr": 1e-3},
                                                        "bit": {"lr": 1e-3}}},
        "loss_terms": [{"name": "group_lasso", "lambda": 1.0,
                        "kwargs": {"lambda_linear": 1e-4, "lambda_conv": 1e-4}}],
    })


def run(args, on_device: bool, train_model: str | None) -> dict:
    device = torch.device(args.device)
    cfg = make_cfg(args, on_device, train_model or "mlp")
    train_ds, val_ds = build_datasets(cfg)
    loader, _, g = build_loaders(cfg, train_ds, val_ds, device)
    trainer = None
    if train_model:
        model = build_run_model(cfg).to(device)
        opt = build_optimizer(cfg, model)
        trainer = Trainer(cfg, device, model, opt, build_scheduler(cfg, opt), None, None, torch.Generator())
        trainer.model.train()
    g.manual_seed(epoch_seed(cfg.seed, 0))
    n_img = 0
    start = None
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if trainer is not None:
            trainer.train_step(x, y)
        if i == args.warmup - 1:  # start the clock after the warm-up batches (worker start-up, allocation)
            sync(device)
            start = time.perf_counter()
        elif i >= args.warmup:
            n_img += y.shape[0]
        if i + 1 >= args.warmup + args.batches:
            break
    sync(device)
    secs = time.perf_counter() - start
    return {"images": n_img, "seconds": secs, "images_per_s": n_img / secs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--root", default="data")
    p.add_argument("--synthetic", action="store_true", help="generated CIFAR-shaped data instead of --root")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=100, help="timed batches per path (default 100)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--train", default=None, help="also time a training step per batch with this model (e.g. resnet20)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible; use --device cpu", file=sys.stderr)
        return 2
    env = env_header(torch.device(args.device))
    print_env("codeq input-pipeline benchmark (CIFAR-10 training batches)", env)
    print(f"#   batch: {args.batch}, workers (dataloader path): {args.workers}, timed batches: {args.batches}")
    print(f"{'path':<12} {'step':<22} {'images/s':>10} {'x dataloader':>13}")
    results = []
    for model in [None] + ([args.train] if args.train else []):
        rates = {}
        for path in ("dataloader", "on_device"):
            try:
                r = run(args, path == "on_device", model)
            except ConfigError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            rates[path] = r["images_per_s"]
            step = f"train_step({model})" if model else "load only"
            results.append({"path": path, "step": step, **r})
            print(f"{path:<12} {step:<22} {r['images_per_s']:10.0f} {r['images_per_s'] / rates['dataloader']:12.2f}x",
                  flush=True)
    if args.out:
        write_results(args.out, env, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
