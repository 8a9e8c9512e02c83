"""Runtime self-check of the fused kernels of a device against the CPU kernels.

The CPU kernels are proven equal to the reference by the test suite on every
CI run; a device backend (CUDA) is compared with them once per process and
device, the first time the fused path is used there (or explicitly:
``codeq.selfcheck("cuda")``; the trainer does so at start-up).  If it fails,
codeq warns once and computes that device with the pure-PyTorch reference
instead of returning wrong numbers.  ``CODEQ_CUDA_KERNELS=0`` skips the CUDA
kernels altogether.
"""

from __future__ import annotations

import warnings

import torch

from codeq._env import env_flag

__all__ = ["selfcheck", "device_ok"]

_RESULTS: dict = {}


def _disabled(device: torch.device) -> bool:
    return device.type == "cuda" and not env_flag("CODEQ_CUDA_KERNELS", True)


def _compare(device: torch.device) -> str | None:
    """None if the device kernels agree with the CPU kernels, else what differed."""
    ops = torch.ops.codeq
    gen = torch.Generator().manual_seed(1234)
    dz = torch.tensor(1.1)
    bit = torch.tensor(0.6)
    cfg = ([4.0], [2.0], [8.0], [True], [0.0])
    for n in (1_000, 70_001, 300_000):  # single-block and multi-pass paths
        w = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen)
        w_d, g_d, dz_d, bit_d = w.to(device), g.to(device), dz.to(device), bit.to(device)
        a_c = ops.abs_quantile(w, 0.99)
        a_d = ops.abs_quantile(w_d, 0.99).cpu()
        if not torch.equal(a_c, a_d):
            return f"abs_quantile n={n}: {a_d.item()!r} vs CPU {a_c.item()!r}"
        (out_c,), _, (sc_c,), (nm_c,) = ops.deadzone_forward([w], [dz], [bit], *cfg)
        (out_d,), _, (sc_d,), (nm_d,) = ops.deadzone_forward([w_d], [dz_d], [bit_d], *cfg)
        if not torch.allclose(sc_c, sc_d.cpu(), rtol=1e-6, atol=0):
            return f"deadzone scalars n={n}: {sc_d.cpu().tolist()} vs CPU {sc_c.tolist()}"
        bad = ~torch.isclose(out_c, out_d.cpu(), rtol=1e-5, atol=0)
        if int(bad.sum()) > max(1, n // 10_000):  # boundary flips allowed, rarely
            return f"deadzone_forward n={n}: {int(bad.sum())} elements differ"
        bwd = cfg[1:]
        (gw_c,), (gdz_c,), (gbit_c,) = ops.deadzone_backward([g], torch.zeros(()), [w], [out_c], [sc_c], [nm_c], [dz],
                                                             [bit], *bwd)
        (gw_d,), (gdz_d,), (gbit_d,) = ops.deadzone_backward([g_d], torch.zeros((), device=device), [w_d], [out_d],
                                                             [sc_d], [nm_d], [dz_d], [bit_d], *bwd)
        if int((~torch.isclose(gw_c, gw_d.cpu(), rtol=1e-5, atol=0)).sum()) > max(1, n // 10_000):
            return f"deadzone_backward n={n}: dL/dw differs"
        for name, c, d in (("logit_dz", gdz_c, gdz_d), ("logit_bit", gbit_c, gbit_d)):
            if not torch.allclose(c, d.cpu(), rtol=1e-3, atol=1e-3 * max(1.0, float(c.abs()))):
                return f"deadzone_backward n={n}: dL/d{name} {d.item()!r} vs CPU {c.item()!r}"
        uo_c, _ = ops.uniform_forward(w, 4)
        uo_d, _ = ops.uniform_forward(w_d, 4)
        if int((~torch.isclose(uo_c, uo_d.cpu(), rtol=1e-5, atol=0)).sum()) > max(1, n // 10_000):
            return f"uniform_forward n={n}: output differs"
    ws = [torch.randn(64, 27, generator=gen), torch.randn(10, 640, generator=gen)]
    loss_c, _ = ops.group_lasso_forward(ws, [0.1, 0.2])
    loss_d, _ = ops.group_lasso_forward([x.to(device) for x in ws], [0.1, 0.2])
    if not torch.allclose(loss_c, loss_d.cpu(), rtol=1e-5):
        return f"group_lasso_forward: {loss_d.item()!r} vs CPU {loss_c.item()!r}"
    return None


def selfcheck(device) -> bool:
    """Compare the fused kernels of ``device`` with the CPU kernels (once per
    process and device); True when they agree.  On the CPU always True."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return True
    key = str(device)
    if key in _RESULTS:
        return _RESULTS[key]
    if _disabled(device):
        _RESULTS[key] = False
        return False
    try:
        problem = _compare(device)
    except Exception as exc:  # a launch failure, a missing kernel ...
        problem = f"{type(exc).__name__}: {exc}"
    ok = problem is None
    _RESULTS[key] = ok
    if not ok:
        warnings.warn(
            f"codeq: the fused {device.type} kernels failed their self-check on {device} ({problem}); "
            f"using the pure-PyTorch reference there (correct, slower). Please report this with codeq.info().",
            RuntimeWarning,
            stacklevel=2,
        )
    return ok


def device_ok(device: torch.device) -> bool:
    """Whether the fused kernels may run on this (non-CPU) device: the cached
    self-check result, running it on first use outside torch.compile tracing."""
    key = str(device if device.index is not None or device.type != "cuda"
              else torch.device("cuda", torch.cuda.current_device()))
    ok = _RESULTS.get(key)
    if ok is None:
        if torch.compiler.is_compiling():
            return not _disabled(device)  # the trainer checks before compiling
        ok = selfcheck(device)
    return ok
