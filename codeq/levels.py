"""The integer levels behind a fake-quantized weight, and the quantizer-free
state dict: what every export format (the compact one, :mod:`codeq.export`,
and ONNX, :mod:`codeq.onnx_export`) stores.

A quantizer codeq can decode computes ŵ from integer levels q and two
scalars with its own float ops, in its compute dtype (float32 for float32 and
float16 weights, float64 for float64)::

    deadzone   ŵ = s·q + δ·sign(q)
    uniform    ŵ = s·q

:func:`integer_levels` finds (q, s, δ, B) for one weight and checks that they
rebuild ŵ bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import parametrize

from codeq.errors import ExportError
from codeq.parametrize import is_quantizer
from codeq.quantizers import DeadZoneLDZCompander, UniformSymmetric

__all__ = ["Levels", "compute_dtype", "dequantize", "same_values", "integer_levels", "quantized_weights",
           "plain_state_dict"]


@dataclasses.dataclass
class Levels:
    """One quantized weight as integers: ``levels`` (in the compute dtype, integral values in
    [-Q, Q]), scale ``s`` and dead-zone offset ``delta`` (0-d, compute dtype), ``bits`` B and
    ``Q`` = 2^(B-1) - 1; ``encoding`` names the formula (deadzone, uniform)."""

    encoding: str
    s: torch.Tensor
    delta: torch.Tensor
    bits: int
    Q: int
    levels: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dequantize(encoding: str, q: torch.Tensor, s: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ŵ from integer levels with the quantizer's float ops (compute dtype), cast to ``dtype``."""
    qf = q.to(s.dtype)
    if encoding == "deadzone":
        w = s * qf + delta * torch.sign(qf)
    elif encoding == "uniform":
        w = s * qf
    else:  # pragma: no cover - guarded by the callers
        raise ExportError(f"unknown encoding {encoding!r}")
    return w.to(dtype)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (+0.0 == -0.0), no NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _forward_levels(q: nn.Module, w: torch.Tensor):
    """(encoding, s, delta, B, Q, levels from w) for a quantizer codeq can
    decode, with the scalars that computed its ŵ; None for any other."""
    ct = compute_dtype(w.dtype)
    x = w.detach().to(ct)
    if isinstance(q, DeadZoneLDZCompander):
        sc = q.get_scalars(w)
        s, delta = sc["s"].to(ct), sc["delta"].to(ct)
        B = int(round(float(sc["B"])))
        Qi = 2 ** (B - 1) - 1
        u = torch.sign(x) * torch.relu(x.abs() - delta)
        return "deadzone", s, delta, B, Qi, torch.clamp(torch.round(u / s), -Qi, Qi)
    if isinstance(q, UniformSymmetric):
        B = int(q.bitwidth)
        Qi = 2 ** (B - 1) - 1
        a = x.abs().amax()
        s = torch.ones((), dtype=ct, device=x.device) if float(a) == 0.0 else a / torch.tensor(float(Qi), dtype=ct)
        return "uniform", s, torch.zeros((), dtype=ct, device=x.device), B, Qi, torch.clamp(torch.round(x / s), -Qi, Qi)
    return None


def _inverse_levels(encoding, w_hat, s, delta, Qi):
    """Levels read back from ŵ itself (used when the forward formula disagrees by an ulp)."""
    x = w_hat.detach().to(s.dtype)
    if encoding == "deadzone":
        lv = torch.round((x - delta * torch.sign(x)) / s)
    else:
        lv = torch.round(x / s)
    if not bool(torch.isfinite(lv).all()):
        return None
    return torch.clamp(lv, -Qi, Qi)


@torch.no_grad()
def integer_levels(q: nn.Module, w: torch.Tensor, w_hat: torch.Tensor) -> Levels | str:
    """The :class:`Levels` of the weight ``w`` that quantizer ``q`` turned into
    ``w_hat`` -- levels that rebuild ``w_hat`` exactly with :func:`dequantize` --
    or, when there are none, the reason as a short string."""
    if not getattr(q, "enabled", True):
        return "quantizer disabled"
    if not w_hat.is_floating_point() or w_hat.numel() == 0:
        return "not a float tensor"
    found = _forward_levels(q, w)
    if found is None:
        return f"no decoder for {type(q).__name__}"
    encoding, s, delta, B, Qi, lv = found
    # the levels from w, or read back from ŵ itself where the two formulas disagree by an ulp
    lv = next((t for t in (lv, _inverse_levels(encoding, w_hat, s, delta, Qi))
               if t is not None and same_values(dequantize(encoding, t, s, delta, w_hat.dtype), w_hat)), None)
    if lv is None:
        return "levels do not rebuild the weight exactly"
    return Levels(encoding, s, delta, B, Qi, lv)


def quantized_weights(model: nn.Module) -> dict:
    """{module name: (module, quantizer or None)} of every module whose ``weight`` is parametrized."""
    res = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            plist = list(module.parametrizations["weight"])
            qs = [p for p in plist if is_quantizer(p)]
            # decodable only when the quantizer is the one and only parametrization
            res[name] = (module, qs[0] if len(plist) == 1 and len(qs) == 1 else None)
    return res


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> dict:
    """The state dict of ``model`` with every parametrized tensor replaced by
    its value (``X.parametrizations.weight.original`` -> ``X.weight`` = ŵ) and
    the quantizers' own parameters and buffers dropped: what a quantizer-free
    copy of the architecture loads."""
    sd = model.state_dict()
    values = {}  # "<module>.parametrizations.<attr>." -> ("<module>.<attr>", value)
    with parametrize.cached():
        for mname, module in model.named_modules():
            if not parametrize.is_parametrized(module):
                continue
            pre = f"{mname}." if mname else ""
            for attr in module.parametrizations.keys():
                values[f"{pre}parametrizations.{attr}."] = (f"{pre}{attr}", getattr(module, attr).detach())
    out = {}
    for k, v in sd.items():
        head, sep, tail = k.rpartition(".parametrizations.")
        if not sep and k.startswith("parametrizations."):
            head, sep, tail = "", "parametrizations.", k[len("parametrizations."):]
        if sep:
            attr, _, rest = tail.partition(".")
            prefix = f"{head}.parametrizations.{attr}." if head else f"parametrizations.{attr}."
            if prefix in values and rest.startswith("original"):
                nk, nv = values[prefix]
                out.setdefault(nk, nv)  # original, or original0/original1/...: the value once
            continue  # parameters/buffers of the parametrizations themselves
        out[k] = v.detach()
    return out
