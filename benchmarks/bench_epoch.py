#!/usr/bin/env python
"""Epoch benchmark: the wall-clock time of whole training epochs of the
trainer, data loading and augmentation included -- the number a user sees.

    python benchmarks/bench_epoch.py --config configs/deadzone_resnet20.yaml --device cpu \\
        --train-size 5120 --epochs 3 --variant "before=channels_last=false" --variant "defaults=" --out FILE.json

Each ``--variant NAME=KEY=VALUE,KEY=VALUE`` is the config with those
``--set`` overrides (``NAME=``: the config as it is).  The variants' epochs
run interleaved (epoch 1 of every variant, then epoch 2, ...), each a
``Trainer.train_epoch`` over the first ``--train-size`` training images with
the config's loader (workers, augmentation) and the run's backend flags; no
validation, no files.  The first epoch of each variant includes starting the
DataLoader workers; the median is over the others when there are three or
more epochs.
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

from codeq.train.config import ConfigError, load_config  # noqa: E402
from codeq.train.precision import backend_flags  # noqa: E402
from codeq.train.trainer import Trainer  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--variant expects NAME=KEY=VALUE,... (or NAME=), got {text!r}")
    return name, [s for s in rest.split(",") if s.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-size", type=int, default=5120, help="training images per epoch (default 5120)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--variant", action="append", default=None,
                   help="NAME=KEY=VALUE,... (repeatable; default: before=channels_last=false and defaults=)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every variant")
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    try:
        variants = [parse_variant(v) for v in (args.variant or ["before=channels_last=false", "defaults="])]
        trainers = {}
        for name, sets in variants:
            cfg = load_config(args.config, overrides=args.overrides + sets + [
                f"dataset.train_size={args.train_size}", f"epochs={args.epochs}"], device=args.device)
            trainers[name] = Trainer.from_config(cfg, device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    env = env_header(device)
    print_env("codeq epoch benchmark (seconds per training epoch, data loading included)", env)
    first = next(iter(trainers.values()))
    print(f"#   config: {args.config}, {args.train_size} images, batch {first.cfg.batch_size}, "
          f"workers {first.cfg.workers}, augment {first.cfg.dataset.augment}")
    times = {name: [] for name in trainers}
    for epoch in range(args.epochs):
        for name, tr in trainers.items():
            with backend_flags(tr.cfg, device):
                t0 = time.perf_counter()
                tr.train_epoch(epoch)
                sync(device)
                times[name].append(time.perf_counter() - t0)
            print(f"epoch {epoch + 1} {name:<12} {times[name][-1]:7.2f} s", flush=True)
    results = []
    base = None
    print(f"{'variant':<12} {'median s':>9} {'images/s':>9} {'x first':>8}  set")
    for (name, sets), tr in zip(variants, trainers.values()):
        t = times[name][1:] if len(times[name]) >= 3 else times[name]
        med = statistics.median(t)
        base = base or med
        results.append({"variant": name, "set": sets, "epoch_s": times[name], "median_s": med,
                        "images_per_s": args.train_size / med, "ratio_to_first": med / base,
                        "channels_last": tr.channels_last, "amp": tr.cfg.amp})
        print(f"{name:<12} {med:9.2f} {args.train_size / med:9.0f} {med / base:7.2f}x  {','.join(sets) or '-'}")
    if args.out:
        write_results(args.out, env, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
