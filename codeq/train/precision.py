"""How a run computes on its device, as users of other trainers expect it:
``channels_last`` input, TF32 and cuDNN autotuning on CUDA (the published
trainer's settings), and autocast (``amp: bf16``, or ``fp16`` with a gradient
scaler).

The quantizers are not autocast: they take the float32 master weights and
return ŵ in float32, and the layer casts ŵ to the autocast dtype as it would
cast an ordinary weight.  The group lasso and theta_l2 see float32 ŵ and
logits; the cross-entropy gets float32 logits.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["AMP_DTYPES", "wants_channels_last", "backend_flags", "autocast"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def wants_channels_last(setting, model: nn.Module) -> bool:
    """``channels_last``: true, false, or auto: on for convolutional networks,
    models whose Conv2d layers hold most of their layer weights (a ResNet, not
    a ViT with its one patch-embedding convolution, where NHWC input gains
    nothing: benchmarks/results/channels_last_cpu.md)."""
    if setting != "auto":
        return bool(setting)
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    layers = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return layers > 0 and conv > layers / 2


@contextlib.contextmanager
def backend_flags(cfg, device: torch.device):
    """On CUDA, for the duration of the block: ``cudnn.benchmark`` and TF32
    (``matmul_precision: high``: matmuls and cuDNN convolutions in TF32;
    ``highest``: exact float32).  They are process-wide torch flags, so the
    previous values come back afterwards.  Elsewhere nothing changes (on the
    CPU these flags do not apply)."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
    torch.backends.cudnn.allow_tf32 = cfg.matmul_precision == "high"
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def autocast(amp: str, device: torch.device, cache: bool = True):
    """The autocast context of ``amp`` on ``device`` (a no-op for none).
    ``cache=False`` inside CUDA graphs (a graph must not hold autocast's weight
    cache from the capture)."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)
