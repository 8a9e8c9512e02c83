"""The quantizers users attach to their models: the reference math of
:mod:`codeq.reference`, computed by the fused kernels of ``codeq._C`` where
the extension has a kernel for the weight's device (and by the reference
elsewhere, e.g. on MPS)."""

from __future__ import annotations

import torch

from codeq import _ext, reference
from codeq.ops import DeadZoneFunction, UniformFunction
from codeq.devicecheck import device_ok

__all__ = ["DeadZoneLDZCompander", "UniformSymmetric", "fused_device_types", "use_fused"]


def fused_device_types() -> frozenset:
    """Device types ("cpu", "cuda") on which the fused kernels run."""
    return _FUSED


_FUSED = frozenset(t for t in ("cpu", "cuda") if _ext._C is not None and _ext.has_kernel(t))


def use_fused(t: torch.Tensor) -> bool:
    """Whether the fused kernels compute this tensor: the extension has kernels
    for its device and (off the CPU) they passed their runtime self-check."""
    dev = t.device
    return dev.type in _FUSED and t.numel() > 0 and (dev.type == "cpu" or device_ok(dev))


class DeadZoneLDZCompander(reference.DeadZoneLDZCompander):
    """CoDeQ dead-zone compander: learnable dead-zone width (``logit_dz``) and
    bit-width (``logit_bit``), fused forward and backward.

    Arguments and parameter names are those of
    :class:`codeq.reference.DeadZoneLDZCompander`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _ext.available()  # warn once (or raise with CODEQ_REQUIRE_EXT=1) if the kernels are missing

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        if not use_fused(w):
            return self._reference_quantize(w)
        fixed, lo, hi = self._cfg
        w_hat, _ = DeadZoneFunction.apply(w, self.logit_dz, self.logit_bit, fixed, lo, hi, self.learnable_bit)
        return w_hat


class UniformSymmetric(reference.UniformSymmetric):
    """Fixed-bit-width uniform symmetric quantizer, fused forward and backward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _ext.available()

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        if not use_fused(w):
            return self._reference_quantize(w)
        w_hat, _ = UniformFunction.apply(w, self.bitwidth)
        return w_hat
