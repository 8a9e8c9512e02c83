"""The quantizers users attach to their models (``codeq.attach_weight_quantizers``).

Each computes with the compiled kernels of ``codeq._C`` where they run for the
weight's device (the CPU, and CUDA after its self-check) and with the
pure-PyTorch reference of :mod:`codeq.reference` elsewhere (another device, no
extension): the same math either way, under the parity contract of
``docs/quantizer-math.md``.
"""

from __future__ import annotations

import torch
from torch import nn

from codeq import _ext, ops, reference
from codeq.devicecheck import device_ok
from codeq.registry import register_quantizer

__all__ = ["QuantizerBase", "DeadZoneLDZCompander", "UniformSymmetric", "fused_device_types", "use_fused"]

_FUSED = frozenset(t for t in ("cpu", "cuda") if _ext._C is not None and _ext.has_kernel(t))


def fused_device_types() -> frozenset:
    """Device types ("cpu", "cuda") on which the compiled kernels run."""
    return _FUSED


def use_fused(t: torch.Tensor) -> bool:
    """Whether the compiled kernels compute this tensor: the extension has kernels
    for its device and (off the CPU) they passed their runtime self-check."""
    dev = t.device
    return dev.type in _FUSED and t.numel() > 0 and (dev.type == "cpu" or device_ok(dev))


def _check_bits(owner: str, name: str, v) -> None:
    if isinstance(v, bool) or not float(v).is_integer() or not 2 <= int(v) <= 16:
        raise ValueError(f"{owner}: {name} must be an integer in [2, 16], got {v!r}")


class QuantizerBase(nn.Module):
    """A weight quantizer: ``forward(w) -> w_hat`` while ``enabled``, else ``w``.
    Subclasses implement ``_quantize``.  ``given``: ŵ computed elsewhere for
    the current step (the fast path's one call for all layers,
    codeq/fastpath.py), returned instead while it is set."""

    def __init__(self):
        super().__init__()
        self.enabled = True
        self.given = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.given is not None:
            return self.given
        return self._quantize(w)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _Fused(QuantizerBase):
    """A quantizer with compiled kernels (``_kernel_quantize``) and the
    reference's math (``reference_quantize``) where they do not run;
    ``reference=True`` computes with :mod:`codeq.reference` everywhere (slow:
    the oracle, for checking a model's numbers)."""

    def __init__(self, reference: bool = False):
        super().__init__()
        _ext.available()  # warn once (or raise with CODEQ_REQUIRE_EXT=1) if the kernels are missing
        self.reference = bool(reference)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        if not self.reference and use_fused(w):
            return self._kernel_quantize(w)
        return self.reference_quantize(w)


@register_quantizer("deadzone")
class DeadZoneLDZCompander(_Fused):
    """CoDeQ dead-zone compander with a learnable dead-zone width (``logit_dz``)
    and bit-width (``logit_bit``).

    ``fixed_bit_val`` is the bit-width when ``learnable_bit`` is false,
    ``min_bits``..``max_bits`` its range when learnable; the two logits start at
    ``init_deadzone_logit`` / ``init_bit_logit`` and learn when
    ``learnable_deadzone`` / ``learnable_bit``.  ``reference=True``: computed
    by :mod:`codeq.reference` instead of the kernels.
    """

    def __init__(
        self,
        fixed_bit_val: int = 4,
        max_bits: int = 8,
        init_deadzone_logit: float = 3.0,
        init_bit_logit: float = 3.0,
        learnable_bit: bool = True,
        learnable_deadzone: bool = True,
        min_bits: int = 2,
        reference: bool = False,
    ):
        for name, v in (("fixed_bit_val", fixed_bit_val), ("max_bits", max_bits), ("min_bits", min_bits)):
            _check_bits("DeadZoneLDZCompander", name, v)
        if int(min_bits) > int(max_bits):
            raise ValueError(f"DeadZoneLDZCompander: min_bits ({min_bits}) exceeds max_bits ({max_bits})")
        super().__init__(reference)
        self.learnable_bit = bool(learnable_bit)
        self.learnable_deadzone = bool(learnable_deadzone)
        self.logit_dz = nn.Parameter(torch.tensor(float(init_deadzone_logit)), requires_grad=self.learnable_deadzone)
        self.logit_bit = nn.Parameter(torch.tensor(float(init_bit_logit)), requires_grad=self.learnable_bit)
        self.register_buffer("fixed_bit", torch.tensor(float(fixed_bit_val)))
        self.register_buffer("max_bits", torch.tensor(float(max_bits)))
        self.register_buffer("min_bits", torch.tensor(float(min_bits)))
        # Python copies of the buffers (fixed, min, max): read in forward without a device sync.
        self._cfg = (float(fixed_bit_val), float(min_bits), float(max_bits))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._cfg = (float(self.fixed_bit), float(self.min_bits), float(self.max_bits))

    def extra_repr(self) -> str:
        fixed, lo, hi = self._cfg
        bits = f"bits={lo:g}..{hi:g} learnable" if self.learnable_bit else f"bits={fixed:g} fixed"
        ref = ", reference" if self.reference else ""
        return f"{bits}, learnable_deadzone={self.learnable_deadzone}, enabled={self.enabled}{ref}"

    def _kernel_quantize(self, w: torch.Tensor) -> torch.Tensor:
        return ops.deadzone([w], [self])[0][0]

    def reference_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """ŵ computed by :mod:`codeq.reference` (the oracle, and the fallback)."""
        return reference.deadzone_quantize(w, self.logit_dz, self.logit_bit, *self._cfg, self.learnable_bit)

    @torch.no_grad()
    def get_bitwidth(self) -> torch.Tensor:
        """Current bit-width B (0-dim tensor)."""
        return reference.deadzone_bitwidth(self.logit_bit, *self._cfg, self.learnable_bit).detach().clone()

    @torch.no_grad()
    def get_deadzone_fraction(self) -> torch.Tensor:
        """d / (2a) = 1 - |tanh(logit_dz)|: the dead zone as a fraction of the clipping range."""
        return 1 - torch.tanh(self.logit_dz).abs()

    @torch.no_grad()
    def get_scalars(self, w: torch.Tensor) -> dict:
        """a, B, d, Q, s, delta of this quantizer for the weight w (0-dim tensors
        in the compute dtype): the values that compute ŵ."""
        if not self.reference and use_fused(w):
            scalars = ops.deadzone([w.detach()], [self])[2][0]
            return dict(zip(ops.SCALAR_NAMES, scalars.unbind()))
        x = w.detach().to(reference.compute_dtype(w.dtype))
        return {k: v.detach() for k, v in reference.deadzone_scalars(x, self.logit_dz, self.logit_bit, *self._cfg,
                                                                       self.learnable_bit).items()}

    @torch.no_grad()
    def get_deadzone_width(self, w: torch.Tensor) -> torch.Tensor:
        """Dead-zone width d = 2a(1 - |tanh(logit_dz)|) for the weight w."""
        return self.get_scalars(w)["d"]


@register_quantizer("uniform")
class UniformSymmetric(_Fused):
    """Fixed-bit-width uniform symmetric quantizer (max-abs scaling).
    ``reference=True``: computed by :mod:`codeq.reference` instead of the kernels."""

    def __init__(self, bitwidth: int = 8, reference: bool = False):
        _check_bits("UniformSymmetric", "bitwidth", bitwidth)
        super().__init__(reference)
        self.bitwidth = int(bitwidth)

    def extra_repr(self) -> str:
        return f"bitwidth={self.bitwidth}, enabled={self.enabled}" + (", reference" if self.reference else "")

    def _kernel_quantize(self, w: torch.Tensor) -> torch.Tensor:
        return ops.uniform(w, self.bitwidth)[0]

    def reference_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """ŵ computed by :mod:`codeq.reference` (the oracle, and the fallback)."""
        return reference.uniform_quantize(w, self.bitwidth)

    @torch.no_grad()
    def get_bitwidth(self) -> torch.Tensor:
        return torch.tensor(float(self.bitwidth))
