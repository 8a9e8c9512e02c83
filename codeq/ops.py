"""Python side of the ``torch.ops.codeq`` operators: their fake kernels, so that
torch.compile and FakeTensor can trace them, and the calls the modules make.

Schemas are in csrc/ops.cpp, the CPU kernels in csrc/cpu/, the CUDA kernels in
csrc/cuda/, autograd in csrc/autograd.cpp.  Importing this module without the
extension is fine: nothing is registered and :func:`codeq._ext.available` is
False.
"""

from __future__ import annotations

import torch

from codeq import _ext

__all__ = ["SCALAR_NAMES", "deadzone", "uniform", "group_lasso_of"]

# Layout of each layer's `scalars` from deadzone_forward (csrc/include/codeq/deadzone.h).
SCALAR_NAMES = ("a", "B", "d", "Q", "s", "delta")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_dtype(weights) -> torch.dtype:
    return torch.float64 if weights and all(w.dtype == torch.float64 for w in weights) else torch.float32


def _like(w: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(w, memory_format=torch.contiguous_format)


if _ext._C is not None:

    @torch.library.register_fake("codeq::abs_quantile")
    def _abs_quantile_fake(x, q):
        return x.new_empty((), dtype=_compute_dtype(x.dtype))

    @torch.library.register_fake("codeq::deadzone_forward")
    def _deadzone_forward_fake(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit, gl_lambda):
        if not len(w):
            raise RuntimeError("codeq.deadzone_forward: got no weights")
        if any(x.numel() == 0 for x in w):
            raise RuntimeError("codeq.deadzone_forward: the weight tensor is empty")
        scalars = [x.new_empty((len(SCALAR_NAMES),), dtype=_compute_dtype(x.dtype)) for x in w]
        norms = [x.new_empty((x.numel() // x.shape[0] if lam != 0.0 else 0,), dtype=_compute_dtype(x.dtype))
                 for x, lam in zip(w, gl_lambda)]
        gl_loss = w[0].new_empty((), dtype=_loss_dtype([x for x, lam in zip(w, gl_lambda) if lam != 0.0]))
        return [_like(x) for x in w], gl_loss, scalars, norms

    @torch.library.register_fake("codeq::deadzone_backward")
    def _deadzone_backward_fake(grad, gl_grad, w, w_hat, scalars, norms, logit_dz, logit_bit, min_bits, max_bits,
                                learnable_bit, gl_lambda):
        return [_like(x) for x in w], [torch.empty_like(t) for t in logit_dz], [torch.empty_like(t) for t in logit_bit]

    @torch.library.register_fake("codeq::uniform_forward")
    def _uniform_forward_fake(w, bitwidth):
        return _like(w), w.new_empty((2,), dtype=_compute_dtype(w.dtype))

    @torch.library.register_fake("codeq::uniform_backward")
    def _uniform_backward_fake(grad, w, scale, bitwidth):
        return _like(w)

    @torch.library.register_fake("codeq::group_lasso_forward")
    def _group_lasso_forward_fake(weights, lambdas):
        dev = weights[0].device if weights else torch.device("cpu")
        norms = [w.new_empty((w.numel() // w.shape[0] if w.shape[0] else 0,), dtype=_compute_dtype(w.dtype))
                 for w in weights]
        return torch.empty((), dtype=_loss_dtype(weights), device=dev), norms

    @torch.library.register_fake("codeq::group_lasso_backward")
    def _group_lasso_backward_fake(grad, weights, norms, lambdas):
        return [_like(w) for w in weights]


def deadzone(ws, quantizers, gl_lambda=None):
    """``(w_hat list, group-lasso loss, scalars list)``: the dead-zone quantizer of
    each weight ``ws[i]`` with the settings and logits of ``quantizers[i]`` (a
    :class:`codeq.DeadZoneLDZCompander`), in one call, and the group lasso of the
    quantized weights with lambdas ``gl_lambda`` (0.0: none for that layer)."""
    fixed, lo, hi = zip(*(q._cfg for q in quantizers))
    w_hat, gl_loss, scalars, _ = torch.ops.codeq.deadzone_forward(
        ws, [q.logit_dz for q in quantizers], [q.logit_bit for q in quantizers], fixed, lo, hi,
        [q.learnable_bit for q in quantizers], gl_lambda if gl_lambda is not None else [0.0] * len(ws))
    return w_hat, gl_loss, scalars


def uniform(w: torch.Tensor, bitwidth: int):
    """``(w_hat, [a, s])`` of the uniform symmetric quantizer."""
    return torch.ops.codeq.uniform_forward(w, bitwidth)


def group_lasso_of(weights, lambdas) -> torch.Tensor:
    """``sum_l lambdas[l] * sum_j ||weights[l][:, j]||`` in one call."""
    return torch.ops.codeq.group_lasso_forward(list(weights), list(lambdas))[0]
