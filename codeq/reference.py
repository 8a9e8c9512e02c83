"""The published CoDeQ math in plain, eager PyTorch: the test oracle and the
baseline of every benchmark.

This module follows ``spec/quantizer-math.md`` line by line and never calls the
compiled extension.  The fused classes in :mod:`codeq.quantizers` and
:func:`codeq.losses.group_lasso` must match it under the parity contract.

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
    "abs_quantile",
    "QuantizerBase",
    "DeadZoneLDZCompander",
    "UniformSymmetric",
    "group_lasso",
    "group_lasso_layers",
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


class _ClampSTE(torch.autograd.Function):
    """clamp(x, -Q, Q) whose gradient passes unchanged; the bounds get none."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        return torch.clamp(x, lo, hi)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _ReluSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.relu(x)

    @staticmethod
    def backward(ctx, g):
        return g


round_ste = _RoundSTE.apply
relu_ste = _ReluSTE.apply


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


# ------------------------------------------------------------------- base --
class QuantizerBase(nn.Module):
    """A weight quantizer: ``forward(w) -> w_hat`` while ``enabled``, else ``w``.
    Subclasses implement ``_reference_quantize``; the fused subclasses in
    codeq.quantizers override ``_quantize``."""

    def __init__(self):
        super().__init__()
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return self._quantize(w)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        return self._reference_quantize(w)

    def _reference_quantize(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------- dead zone --
class DeadZoneLDZCompander(QuantizerBase):
    """CoDeQ dead-zone compander with a learnable dead-zone width (``logit_dz``)
    and a learnable bit-width (``logit_bit``).  Pure-PyTorch reference."""

    def __init__(
        self,
        fixed_bit_val: int = 4,
        max_bits: int = 8,
        init_deadzone_logit: float = 3.0,
        init_bit_logit: float = 3.0,
        learnable_bit: bool = True,
        learnable_deadzone: bool = True,
        min_bits: int = 2,
    ):
        super().__init__()
        for name, v in (("fixed_bit_val", fixed_bit_val), ("max_bits", max_bits), ("min_bits", min_bits)):
            if isinstance(v, bool) or not float(v).is_integer() or not 2 <= int(v) <= 16:
                raise ValueError(f"DeadZoneLDZCompander: {name} must be an integer in [2, 16], got {v!r}")
        if int(min_bits) > int(max_bits):
            raise ValueError(f"DeadZoneLDZCompander: min_bits ({min_bits}) exceeds max_bits ({max_bits})")
        self.learnable_bit = bool(learnable_bit)
        self.learnable_deadzone = bool(learnable_deadzone)
        self.logit_dz = nn.Parameter(torch.tensor(float(init_deadzone_logit)), requires_grad=self.learnable_deadzone)
        self.logit_bit = nn.Parameter(torch.tensor(float(init_bit_logit)), requires_grad=self.learnable_bit)
        self.register_buffer("fixed_bit", torch.tensor(float(fixed_bit_val)))
        self.register_buffer("max_bits", torch.tensor(float(max_bits)))
        self.register_buffer("min_bits", torch.tensor(float(min_bits)))
        # Python copies of the buffers: read in forward without a device sync.
        self._cfg = (float(fixed_bit_val), float(min_bits), float(max_bits))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._cfg = (float(self.fixed_bit), float(self.min_bits), float(self.max_bits))

    def extra_repr(self) -> str:
        fixed, lo, hi = self._cfg
        bits = f"bits={lo:g}..{hi:g} learnable" if self.learnable_bit else f"bits={fixed:g} fixed"
        return f"{bits}, learnable_deadzone={self.learnable_deadzone}, enabled={self.enabled}"

    # helpers -----------------------------------------------------------------
    def _bitwidth(self) -> torch.Tensor:
        """B as a 0-dim tensor, with the straight-through gradient to logit_bit."""
        if self.learnable_bit:
            t = torch.tanh(self.logit_bit)
            return round_ste((self.max_bits - self.min_bits) * t.abs() + self.min_bits)
        return self.fixed_bit

    @torch.no_grad()
    def get_bitwidth(self) -> torch.Tensor:
        """Current bit-width B (0-dim tensor, no gradient)."""
        return self._bitwidth().detach().clone()

    @torch.no_grad()
    def get_deadzone_fraction(self) -> torch.Tensor:
        """d / (2a) = 1 - |tanh(logit_dz)|: the dead zone as a fraction of the clipping range."""
        return 1 - torch.tanh(self.logit_dz).abs()

    @torch.no_grad()
    def get_deadzone_width(self, w: torch.Tensor) -> torch.Tensor:
        """Dead-zone width d = 2a(1 - |tanh(logit_dz)|) for the weight w."""
        x = w.detach().to(compute_dtype(w.dtype))
        return 2 * abs_quantile(x) * (1 - torch.tanh(self.logit_dz).abs())

    @torch.no_grad()
    def get_scalars(self, w: torch.Tensor) -> dict:
        """a, B, d, Q, s, delta of this quantizer for the weight w (0-dim tensors)."""
        return self._scalars(w.detach().to(compute_dtype(w.dtype)))

    def _scalars(self, x: torch.Tensor) -> dict:
        a = abs_quantile(x)  # 1. no gradient
        B = self._bitwidth()  # 2.
        d = 2 * a * (1 - torch.tanh(self.logit_dz).abs())  # 3.
        Q = 2 ** (B - 1) - 1  # 4.
        s = (a - d / 2) / (Q - 0.5) + 1e-8  # 5.
        delta = d / 2 - s / 2  # 6.
        return {"a": a, "B": B, "d": d, "Q": Q, "s": s, "delta": delta}

    # math --------------------------------------------------------------------
    def _reference_quantize(self, w: torch.Tensor) -> torch.Tensor:
        x = w.to(compute_dtype(w.dtype))
        sc = self._scalars(x)  # steps 1-6
        s, delta, Q = sc["s"], sc["delta"], sc["Q"]
        u = torch.sign(x) * relu_ste(x.abs() - delta)  # 7.
        q = clamp_ste(round_ste(u / s), -Q, Q)  # 8.
        w_hat = s * q + delta * torch.sign(q)  # 9.
        return w_hat.to(w.dtype)


# ------------------------------------------------------------------ uniform --
class UniformSymmetric(QuantizerBase):
    """Fixed-bit-width uniform symmetric quantizer (max-abs scaling).  Pure-PyTorch reference."""

    def __init__(self, bitwidth: int = 8):
        super().__init__()
        if isinstance(bitwidth, bool) or not float(bitwidth).is_integer() or not 2 <= int(bitwidth) <= 16:
            raise ValueError(f"UniformSymmetric: bitwidth must be an integer in [2, 16], got {bitwidth!r}")
        self.bitwidth = int(bitwidth)

    def extra_repr(self) -> str:
        return f"bitwidth={self.bitwidth}, enabled={self.enabled}"

    @torch.no_grad()
    def get_bitwidth(self) -> torch.Tensor:
        return torch.tensor(float(self.bitwidth))

    def _reference_quantize(self, w: torch.Tensor) -> torch.Tensor:
        x = w.to(compute_dtype(w.dtype))
        a = x.detach().abs().amax()
        Qf = float(2 ** (self.bitwidth - 1) - 1)
        Q = torch.tensor(Qf, dtype=x.dtype, device=x.device)
        zero = a == 0
        s = torch.where(zero, torch.ones_like(a), a / Q)
        # the published code's plain torch.clamp: the gradient is masked outside [-Q, Q] (spec)
        w_hat = s * clamp_masked(round_ste(x / s), -Qf, Qf)
        w_hat = torch.where(zero, torch.zeros_like(w_hat), w_hat)
        return w_hat.to(w.dtype)


# -------------------------------------------------------------- group lasso --
def group_lasso_layers(model: nn.Module, lambda_linear: float = 1e-4, lambda_conv: float = 1e-4):
    """(weight, lambda) for every nn.Linear / nn.Conv2d whose lambda is non-zero.

    ``module.weight`` is the weight the forward pass uses: for a layer with an
    attached quantizer that is the quantized weight.
    """
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            lam = float(lambda_linear)
        elif isinstance(m, nn.Conv2d):
            lam = float(lambda_conv)
        else:
            continue
        if lam != 0.0:
            out.append((m.weight, lam))
    return out


def group_lasso(model: nn.Module, lambda_linear: float = 1e-4, lambda_conv: float = 1e-4) -> torch.Tensor:
    """lambda_linear * sum_j ||W[:, j]||_2 over nn.Linear layers plus lambda_conv *
    sum_j ||W.reshape(out, -1)[:, j]||_2 over nn.Conv2d layers."""
    return group_lasso_of(group_lasso_layers(model, lambda_linear, lambda_conv), model)


def group_lasso_of(layers, model: nn.Module | None = None) -> torch.Tensor:
    """The group lasso of a list of (weight, lambda) pairs."""
    total = None
    for w, lam in layers:
        x = w.to(compute_dtype(w.dtype))
        norms = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=0)
        term = lam * norms.sum()
        total = term if total is None else total + term
    if total is None:
        p = next(iter(model.parameters()), None) if model is not None else None
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return total
