"""The published CoDeQ math in plain, eager PyTorch: the test oracle and the
baseline of every benchmark.

This module follows ``docs/quantizer-math.md`` line by line and uses nothing
of codeq (its quantizers fall back to it where the compiled kernels do not run:
another device, or no extension).  The kernels must match it under the parity
contract of that document.  Arguments and parameter names are those of
:class:`codeq.DeadZoneLDZCompander` / :class:`codeq.UniformSymmetric`.

Straight-through estimators are small ``torch.autograd.Function`` classes, so
that the forward value is exactly ``round``/``clamp``/``relu`` (no
``x + (round(x) - x).detach()`` rounding error) and the gradient passes
unchanged.

Defined behaviour beyond the paper (tested):
- float16 / bfloat16 weights are computed in float32 and the result is cast
  back to the input dtype;
- a NaN anywhere in ``w`` makes the 0.99-quantile NaN (as ``torch.quantile``)
  and therefore the whole quantized tensor NaN, so divergence is loud;
- +-Inf elements saturate to the outermost level while the quantile is finite;
- the uniform quantizer maps an all-zero tensor to zeros with a zero gradient
  (the published code returns NaN there).
"""

from __future__ import annotations

import math
import struct

import torch
from torch import nn

__all__ = [
    "QUANTILE",
    "compute_dtype",
    "abs_quantile",
    "deadzone_bitwidth",
    "deadzone_scalars",
    "deadzone_quantize",
    "uniform_quantize",
    "group_lasso",
    "group_lasso_of",
]

QUANTILE = 0.99


# --------------------------------------------------------------------- STE --
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ReluSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.relu(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ClampSTE(torch.autograd.Function):
    """clamp(x, -Q, Q) whose gradient passes unchanged; the bounds get none."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        return torch.clamp(x, lo, hi)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _ClampMasked(torch.autograd.Function):
    """torch.clamp(x, lo, hi) with the gradient masked outside [lo, hi], the
    bounds included (what torch.clamp's backward did up to torch 2.11; later
    versions give the bounds none or half: spelled out here so that the
    reference does not depend on the torch version).  NaN gets none."""

    @staticmethod
    def forward(ctx, x, lo: float, hi: float):
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return torch.clamp(x, lo, hi)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where((x >= ctx.lo) & (x <= ctx.hi), g, torch.zeros_like(g)), None, None


round_ste = _RoundSTE.apply
relu_ste = _ReluSTE.apply
clamp_masked = _ClampMasked.apply


def clamp_ste(x, lo, hi):
    return _ClampSTE.apply(x, lo.detach(), hi.detach())


# ---------------------------------------------------------------- quantile --
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32/float64 as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _round_to(x: float, dtype: torch.dtype) -> float:
    """The Python float x rounded to float32 (when dtype is float32), in plain
    Python so that torch.compile traces the reference without a graph break."""
    return x if dtype == torch.float64 else struct.unpack("f", struct.pack("f", x))[0]


def abs_quantile(x: torch.Tensor, q: float = QUANTILE) -> torch.Tensor:
    """q-quantile of |x| over all elements, exactly as ``torch.quantile`` of the
    flattened |x| computes it (linear interpolation, NaN if any NaN), but by a
    plain sort so that it works beyond torch.quantile's 2^24-element limit.

    The rank is formed as torch does: q rounded to the compute dtype, times
    (n-1) in double; the weight rounded back to the compute dtype; then
    torch.lerp's formula.  No gradient.
    """
    with torch.no_grad():
        ct = compute_dtype(x.dtype)
        v = x.detach().reshape(-1).to(ct).abs().sort().values
        n = v.numel()
        if n == 0:
            raise ValueError("codeq.abs_quantile: got an empty tensor")
        p = _round_to(q, ct) * (n - 1)
        lo = min(int(math.floor(p)), n - 1)
        hi = min(lo + 1, n - 1)
        w = torch.tensor(p - lo, dtype=ct, device=v.device)
        small = _round_to(p - lo, ct) < 0.5
        v_lo, v_hi = v[lo], v[hi]
        diff = v_hi - v_lo
        if small:
            a = v_lo + w * diff
        else:
            a = v_hi - diff * (1 - w)
        return torch.where(torch.isnan(v[-1]), torch.full_like(a, float("nan")), a)


# ---------------------------------------------------------------- dead zone --
def deadzone_bitwidth(logit_bit: torch.Tensor, fixed_bit: float = 4, min_bits: float = 2, max_bits: float = 8,
                      learnable_bit: bool = True) -> torch.Tensor:
    """B as a 0-dim tensor of logit_bit's dtype, with the straight-through
    gradient to logit_bit when learnable (step 2)."""
    if learnable_bit:
        t = torch.tanh(logit_bit)
        return round_ste((float(max_bits) - float(min_bits)) * t.abs() + float(min_bits))
    return torch.tensor(float(fixed_bit), dtype=logit_bit.dtype, device=logit_bit.device)


def deadzone_scalars(x: torch.Tensor, logit_dz: torch.Tensor, logit_bit: torch.Tensor, fixed_bit: float = 4,
                     min_bits: float = 2, max_bits: float = 8, learnable_bit: bool = True) -> dict:
    """Steps 1-6 for the weight x (in its compute dtype): a, B, d, Q, s, delta as
    0-dim tensors, differentiable in the logits."""
    a = abs_quantile(x)  # 1. no gradient
    B = deadzone_bitwidth(logit_bit, fixed_bit, min_bits, max_bits, learnable_bit)  # 2.
    d = 2 * a * (1 - torch.tanh(logit_dz).abs())  # 3.
    Q = 2 ** (B - 1) - 1  # 4.
    s = (a - d / 2) / (Q - 0.5) + 1e-8  # 5.
    delta = d / 2 - s / 2  # 6.
    return {"a": a, "B": B, "d": d, "Q": Q, "s": s, "delta": delta}


def deadzone_quantize(w: torch.Tensor, logit_dz: torch.Tensor, logit_bit: torch.Tensor, fixed_bit: float = 4,
                      min_bits: float = 2, max_bits: float = 8, learnable_bit: bool = True) -> torch.Tensor:
    """The dead-zone compander's ŵ for the weight w (steps 1-9), differentiable
    in w and both logits."""
    x = w.to(compute_dtype(w.dtype))
    sc = deadzone_scalars(x, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit)  # steps 1-6
    s, delta, Q = sc["s"], sc["delta"], sc["Q"]
    u = torch.sign(x) * relu_ste(x.abs() - delta)  # 7.
    q = clamp_ste(round_ste(u / s), -Q, Q)  # 8.
    w_hat = s * q + delta * torch.sign(q)  # 9.
    return w_hat.to(w.dtype)


# ------------------------------------------------------------------ uniform --
def uniform_quantize(w: torch.Tensor, bitwidth: int = 8) -> torch.Tensor:
    """The uniform symmetric quantizer (max-abs scaling) of w."""
    x = w.to(compute_dtype(w.dtype))
    a = x.detach().abs().amax()
    Qf = float(2 ** (int(bitwidth) - 1) - 1)
    Q = torch.tensor(Qf, dtype=x.dtype, device=x.device)
    zero = a == 0
    s = torch.where(zero, torch.ones_like(a), a / Q)
    # the published code's plain torch.clamp: the gradient is masked outside [-Q, Q] (spec)
    w_hat = s * clamp_masked(round_ste(x / s), -Qf, Qf)
    w_hat = torch.where(zero, torch.zeros_like(w_hat), w_hat)
    return w_hat.to(w.dtype)


# -------------------------------------------------------------- group lasso --
def group_lasso(model: nn.Module, lambda_linear: float = 1e-4, lambda_conv: float = 1e-4) -> torch.Tensor:
    """lambda_linear * sum_j ||W[:, j]||_2 over nn.Linear layers plus lambda_conv *
    sum_j ||W.reshape(out, -1)[:, j]||_2 over nn.Conv2d layers, on the weights
    the forward pass uses (``module.weight``: the quantized weight where a
    quantizer is attached)."""
    layers = []
    for m in model.modules():
        lam = float(lambda_linear) if isinstance(m, nn.Linear) else float(lambda_conv) if isinstance(m, nn.Conv2d) else 0.0
        if lam != 0.0:
            layers.append((m.weight, lam))
    p = next(iter(model.parameters()), None)
    return group_lasso_of(layers, device=p.device if p is not None else None)


def group_lasso_of(layers, device=None) -> torch.Tensor:
    """The group lasso of a list of (weight, lambda) pairs (0 on ``device`` for none)."""
    total = None
    for w, lam in layers:
        x = w.to(compute_dtype(w.dtype))
        norms = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=0)
        term = lam * norms.sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros((), device=device)
