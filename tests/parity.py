"""Helpers implementing the parity contract of docs/quantizer-math.md: the
compiled kernels vs the pure-PyTorch reference (codeq.reference)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

import codeq
from codeq import reference as R

EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.float16: torch.finfo(torch.float32).eps,  # computed in float32 inside
    torch.bfloat16: torch.finfo(torch.float32).eps,
}
# ŵ / ∂w tolerance: rtol 1e-6 (contract; float64 weights too, since the logits are float32
# and their tanh may differ by an ulp), and the output rounding of the half types.
RTOL = {torch.float64: 1e-6, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_pair(learnable_bit=True, learnable_deadzone=True, fixed_bit_val=4, max_bits=8, theta_dz=3.0, theta_bit=3.0,
              device="cpu"):
    kw = dict(fixed_bit_val=fixed_bit_val, max_bits=max_bits, init_deadzone_logit=theta_dz,
              init_bit_logit=theta_bit, learnable_bit=learnable_bit, learnable_deadzone=learnable_deadzone)
    return codeq.DeadZoneLDZCompander(**kw).to(device), codeq.DeadZoneLDZCompander(**kw, reference=True).to(device)


def run(q, w, g):
    """Forward + backward of quantizer q at w with upstream gradient g.
    Returns (w_hat, dw, dtheta_dz, dtheta_bit) (θ grads None when frozen)."""
    w = w.detach().clone().requires_grad_(True)
    out = q(w)
    inputs = [w] + [p for p in (q.logit_dz, q.logit_bit) if p.requires_grad]
    grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
    gdz = grads[1] if q.logit_dz.requires_grad else None
    gbit = grads[-1] if q.logit_bit.requires_grad else None
    return out.detach(), grads[0], gdz, gbit


@dataclass
class Report:
    elements: int = 0
    flips: int = 0
    notes: list = field(default_factory=list)


def boundary_band(ref_q, w):
    """Elements whose u/s lies within 1e-4 + 4·eps·|w|/s of a rounding boundary k+0.5
    (computed with the reference's own scalars)."""
    x = w.detach().to(R.compute_dtype(w.dtype))
    sc = ref_q.get_scalars(x)
    s, delta = sc["s"], sc["delta"]
    u = torch.sign(x) * torch.relu(x.abs() - delta)
    us = u / s
    frac = us - torch.floor(us)
    dist = (frac - 0.5).abs()
    eps = EPS[w.dtype]
    return dist <= 1e-4 + 4 * eps * x.abs() / s


def compare_elementwise(name, fused, ref, band, dtype, rep: Report, ctx=""):
    """Equal within RTOL except inside the boundary band; flips counted."""
    f = fused.double()
    r = ref.double()
    both_nan = torch.isnan(f) & torch.isnan(r)
    close = torch.isclose(f, r, rtol=RTOL[dtype], atol=0.0) | both_nan | (f == r)
    bad = ~close
    outside = bad & ~band
    assert not outside.any(), (
        f"{name}: {int(outside.sum())} of {f.numel()} elements differ outside the rounding-boundary band {ctx}; "
        f"first: fused={f[outside][:3].tolist()} ref={r[outside][:3].tolist()}"
    )
    return int((bad & band).sum())


def theta_tolerance(ref64_q, w64, g64, which):
    """1e-4 × Σ|terms| of G_s and G_δ, carried through |chain coefficients| (float64)."""
    x = w64.detach()
    sc = ref64_q.get_scalars(x)
    a, d, Q, B, s, delta = (float(sc[k]) for k in ("a", "d", "Q", "B", "s", "delta"))
    u = torch.sign(x) * torch.relu(x.abs() - sc["delta"])
    us = u / sc["s"]
    q = torch.clamp(torch.round(us), -Q, Q)
    # the terms that make up G_s = Σ g·q − Σ g·u/s and G_δ = Σ g·sign(q) − Σ g·sign(w), before they cancel
    S_s = float((g64 * q).abs().sum() + (g64 * us).abs().sum())
    S_d = float((g64 * torch.sign(q)).abs().sum() + (g64 * torch.sign(x)).abs().sum())
    if which == "dz":
        t = math.tanh(float(ref64_q.logit_dz.detach()))
        k = abs(-2 * a * (1 - t * t))
        c_s, c_d = 1 / (2 * (Q - 0.5)), 0.5 + 1 / (4 * (Q - 0.5))
    else:
        t = math.tanh(float(ref64_q.logit_bit.detach()))
        lo, hi = float(ref64_q.min_bits), float(ref64_q.max_bits)
        k = abs(2 ** (B - 1) * math.log(2) * (hi - lo) * (1 - t * t))
        c_s = abs(a - d / 2) / (Q - 0.5) ** 2
        c_d = c_s / 2
    return 1e-4 * k * (c_s * S_s + c_d * S_d)


def check_case(w, g, learnable_bit, learnable_deadzone, theta_dz, theta_bit, fixed_bit_val=4, rep: Report | None = None,
               ctx=""):
    """Full contract for one input: quantile bitwise, ŵ and ∂w within the contract, θ grads vs float64."""
    rep = rep if rep is not None else Report()
    dtype = w.dtype
    fused, ref = make_pair(learnable_bit, learnable_deadzone, fixed_bit_val, 8, theta_dz, theta_bit, w.device)
    ctx = f"[{ctx} dtype={dtype} shape={tuple(w.shape)} lb={learnable_bit} ld={learnable_deadzone} " \
          f"θdz={theta_dz} θbit={theta_bit} fixed={fixed_bit_val}]"

    # quantile: bitwise
    x = w.to(R.compute_dtype(dtype))
    a_ref = R.abs_quantile(x)
    a_fused = torch.ops.codeq.abs_quantile(w, 0.99)
    assert a_fused.dtype == a_ref.dtype
    assert (torch.isnan(a_ref) and torch.isnan(a_fused)) or torch.equal(a_fused, a_ref), \
        f"quantile differs {ctx}: {a_fused.item()!r} vs {a_ref.item()!r}"

    f_out, f_dw, f_dz, f_bit = run(fused, w, g)
    r_out, r_dw, r_dz, r_bit = run(ref, w, g)
    assert f_out.dtype == dtype and f_out.shape == w.shape and f_dw.dtype == dtype
    band = boundary_band(ref, w)
    flips = compare_elementwise("w_hat", f_out, r_out, band, dtype, rep, ctx)
    flips_g = compare_elementwise("dL/dw", f_dw, r_dw, band, dtype, rep, ctx)
    rep.flips += max(flips, flips_g)
    rep.elements += w.numel()

    if learnable_deadzone or learnable_bit:
        ref64 = copy.deepcopy(ref).double()
        w64, g64 = w.double(), g.double()
        _, _, r64_dz, r64_bit = run(ref64, w64, g64)
        for which, fv, r32, r64 in (("dz", f_dz, r_dz, r64_dz), ("bit", f_bit, r_bit, r64_bit)):
            if fv is None:
                continue
            if not torch.isfinite(r64):
                assert not torch.isfinite(fv) or not torch.isfinite(r32), f"θ_{which}: {fv} vs {r64} {ctx}"
                continue
            tol = theta_tolerance(ref64, w64, g64, which)
            own = abs(float(r32) - float(r64))
            err = abs(float(fv) - float(r64))
            assert err <= max(tol, 4 * own) + 1e-30, \
                f"dL/dθ_{which}: fused {float(fv)!r} vs float64 ref {float(r64)!r} (err {err:.3g}, tol {tol:.3g}, " \
                f"float32 ref err {own:.3g}) {ctx}"
    return rep
