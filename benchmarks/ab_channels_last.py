#!/usr/bin/env python
"""A/B of what ``channels_last`` converts, in one process: ResNet-20 training
steps (forward, cross-entropy + group lasso, backward) with contiguous
batches, channels_last batches only (what the trainer does), and
channels_last batches and parameters (what timm's ``--channels-last`` does).

    python benchmarks/ab_channels_last.py [--rounds 6] [--batch 128]

Variants run round-robin; medians in ms.  Also times the copies the
quantizer kernels would make per step for channels_last weights (they compute
on contiguous tensors: one copy of each conv weight forward, two backward).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from codeq.losses import group_lasso
from codeq.models import build_model


def step(model, x, y, gl: bool) -> None:
    model.zero_grad(set_to_none=True)
    with parametrize.cached():
        loss = F.cross_entropy(model(x), y)
        if gl:
            loss = loss + group_lasso(model, 1e-3, 1e-3)
    loss.backward()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    cl = torch.channels_last
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for label, quantizer in (("QAT + group lasso", {"name": "deadzone", "kwargs": {"max_bits": 8,
                                                                                  "fixed_bit_val": 8}}),
                             ("baseline", None)):
        torch.manual_seed(0)
        base = build_model("resnet20", img_size=32, quantizer=quantizer)
        x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        variants = {"contiguous": (base, x),
                    "input_cl": (copy.deepcopy(base), x.contiguous(memory_format=cl)),
                    "model_input_cl": (copy.deepcopy(base).to(memory_format=cl), x.contiguous(memory_format=cl))}
        gl = quantizer is not None
        for m, xx in variants.values():
            for _ in range(2):
                step(m, xx, y, gl)
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, (m, xx) in variants.items():
                t0 = time.perf_counter()
                step(m, xx, y, gl)
                times[k].append(time.perf_counter() - t0)
        ref = statistics.median(times["contiguous"])
        for k, v in times.items():
            med = statistics.median(v)
            print(f"{label:<18} {k:<15} median {med * 1e3:7.1f} ms  {med / ref:5.2f}x contiguous")
    ws = [p for p in variants["model_input_cl"][0].parameters() if p.dim() == 4]
    t0 = time.perf_counter()
    for _ in range(20):
        for w in ws:
            for _ in range(3):
                w.detach().contiguous()
    print(f"copies of the {len(ws)} conv weights a step would make for NHWC parameters: "
          f"{(time.perf_counter() - t0) / 20 * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
