"""Python side of the torch.ops.codeq operators: fake (meta) kernels so that
torch.compile / FakeTensor can trace them, autograd registrations, and the
``torch.autograd.Function`` classes the modules call.

Schemas are defined in C++ (csrc/ops.cpp); CPU kernels in csrc/cpu/, CUDA
kernels in csrc/cuda/.  Importing this module without the extension is fine:
nothing is registered and :func:`codeq._ext.available` is False.
"""

from __future__ import annotations

import torch

from codeq import _ext

__all__ = ["DeadZoneFunction", "DeadZoneMultiFunction", "UniformFunction", "GroupLassoFunction", "SCALAR_NAMES"]

# Layout of the `scalars` tensor returned by deadzone_forward (csrc/include/codeq/deadzone.h).
SCALAR_NAMES = ("a", "B", "d", "Q", "s", "delta")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------- fake kernels --
if _ext._C is not None:

    @torch.library.register_fake("codeq::abs_quantile")
    def _abs_quantile_fake(x, q):
        return x.new_empty((), dtype=_compute_dtype(x.dtype))

    @torch.library.register_fake("codeq::deadzone_forward")
    def _dz_fwd_fake(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit):
        torch._check(w.numel() > 0, lambda: "codeq.deadzone_forward: the weight tensor is empty")
        return torch.empty_like(w, memory_format=torch.contiguous_format), w.new_empty(
            (len(SCALAR_NAMES),), dtype=_compute_dtype(w.dtype)
        )

    @torch.library.register_fake("codeq::deadzone_backward")
    def _dz_bwd_fake(grad, w, scalars, logit_dz, logit_bit, min_bits, max_bits, learnable_bit):
        return (
            torch.empty_like(w, memory_format=torch.contiguous_format),
            torch.empty_like(logit_dz),
            torch.empty_like(logit_bit),
        )

    @torch.library.register_fake("codeq::uniform_forward")
    def _uni_fwd_fake(w, bitwidth):
        return torch.empty_like(w, memory_format=torch.contiguous_format), w.new_empty(
            (2,), dtype=_compute_dtype(w.dtype)
        )

    @torch.library.register_fake("codeq::uniform_backward")
    def _uni_bwd_fake(grad, w, scale, bitwidth):
        return torch.empty_like(w, memory_format=torch.contiguous_format)

    @torch.library.register_fake("codeq::group_lasso_forward")
    def _gl_fwd_fake(weights, lambdas):
        dt = torch.float64 if weights and all(w.dtype == torch.float64 for w in weights) else torch.float32
        dev = weights[0].device if weights else torch.device("cpu")
        norms = [w.new_empty((w.numel() // w.shape[0] if w.shape[0] else 0,), dtype=_compute_dtype(w.dtype))
                 for w in weights]
        return torch.empty((), dtype=dt, device=dev), norms

    @torch.library.register_fake("codeq::group_lasso_backward")
    def _gl_bwd_fake(grad, weights, norms, lambdas):
        return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]

    def _dz_fwd_multi_fake(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit, gl_lambda):
        torch._check(len(w) > 0, lambda: "codeq.deadzone_forward_multi: got no weights")
        w_hat = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in w]
        scalars = [x.new_empty((len(SCALAR_NAMES),), dtype=_compute_dtype(x.dtype)) for x in w]
        norms = [x.new_empty((x.numel() // x.shape[0] if lam != 0.0 and x.shape[0] else 0,),
                             dtype=_compute_dtype(x.dtype)) for x, lam in zip(w, gl_lambda)]
        sel = [x for x, lam in zip(w, gl_lambda) if lam != 0.0]
        dt = torch.float64 if sel and all(x.dtype == torch.float64 for x in sel) else torch.float32
        return w_hat, scalars, norms, w[0].new_empty((), dtype=dt)

    torch.library.register_fake("codeq::deadzone_forward_multi", _dz_fwd_multi_fake)
    torch.library.register_fake("codeq::deadzone_forward_multi_unfused", _dz_fwd_multi_fake)

    def _dz_bwd_multi_fake(grad, gl_grad, w, w_hat, scalars, norms, logit_dz, logit_bit, min_bits, max_bits,
                           learnable_bit, gl_lambda):
        return ([torch.empty_like(x, memory_format=torch.contiguous_format) for x in w],
                [torch.empty_like(t) for t in logit_dz], [torch.empty_like(t) for t in logit_bit])

    torch.library.register_fake("codeq::deadzone_backward_multi", _dz_bwd_multi_fake)
    torch.library.register_fake("codeq::deadzone_backward_multi_unfused", _dz_bwd_multi_fake)



# ------------------------------------------------------------------ autograd --


def _dz_setup(ctx, inputs, output):
    w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit = inputs
    _, scalars = output
    ctx.save_for_backward(w, scalars, logit_dz, logit_bit)
    ctx.cfg = (min_bits, max_bits, learnable_bit)


def _dz_backward(ctx, grad_w_hat, grad_scalars):
    w, scalars, logit_dz, logit_bit = ctx.saved_tensors
    min_bits, max_bits, learnable_bit = ctx.cfg
    gw, gdz, gbit = torch.ops.codeq.deadzone_backward(
        grad_w_hat.contiguous(), w, scalars, logit_dz, logit_bit, min_bits, max_bits, learnable_bit
    )
    return gw, gdz, gbit, None, None, None, None


def _uni_setup(ctx, inputs, output):
    w, bitwidth = inputs
    _, scale = output
    ctx.save_for_backward(w, scale)
    ctx.bitwidth = bitwidth


def _uni_backward(ctx, grad_w_hat, grad_scale):
    w, scale = ctx.saved_tensors
    return torch.ops.codeq.uniform_backward(grad_w_hat.contiguous(), w, scale, ctx.bitwidth), None


def _gl_setup(ctx, inputs, output):
    weights, lambdas = inputs
    _, norms = output
    ctx.save_for_backward(*weights, *norms)
    ctx.n = len(weights)
    ctx.lambdas = lambdas


def _gl_backward(ctx, grad_loss, grad_norms):
    saved = ctx.saved_tensors
    weights, norms = list(saved[: ctx.n]), list(saved[ctx.n :])
    grads = torch.ops.codeq.group_lasso_backward(grad_loss, weights, norms, ctx.lambdas)
    return list(grads), None


# -------------------------------------------------- autograd.Function classes --
class DeadZoneFunction(torch.autograd.Function):
    """w_hat = dead-zone compander(w; logit_dz, logit_bit) with the fused kernels.

    ``forward(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit)``.
    """

    @staticmethod
    def forward(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit):
        w_hat, scalars = torch.ops.codeq.deadzone_forward(
            w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit
        )
        return w_hat, scalars

    @staticmethod
    def setup_context(ctx, inputs, output):
        _dz_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_w_hat, grad_scalars):
        return _dz_backward(ctx, grad_w_hat, grad_scalars)


class UniformFunction(torch.autograd.Function):
    """w_hat = uniform symmetric quantizer(w) with the fused kernels: ``forward(w, bitwidth)``."""

    @staticmethod
    def forward(w, bitwidth):
        return torch.ops.codeq.uniform_forward(w, bitwidth)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _uni_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_w_hat, grad_scale):
        return _uni_backward(ctx, grad_w_hat, grad_scale)


class DeadZoneMultiFunction:
    """Many dead-zone quantizers (and the group lasso of their outputs) in one
    fused call and one autograd node: ``codeq::deadzone_multi``, whose
    autograd node is written in C++ (csrc/autograd.cpp), so that a training
    step pays no Python for it.

    ``outs = DeadZoneMultiFunction.apply(cfg, *ws, *logit_dz, *logit_bit)`` with
    ``cfg = (fixed_bit, min_bits, max_bits, learnable_bit, gl_lambda)``, one
    entry per weight in each list.  ``outs[:L]`` are the quantized weights,
    ``outs[L]`` is ``sum_l gl_lambda[l] * sum_j ||w_hat_l[:, j]||`` (zero when
    every lambda is 0); ``outs[L + 1]`` and ``outs[L + 2]`` are lists of the
    per-layer scalars and column norms (no gradient).  Gradients reach the
    weights and both logits from the quantized weights and the group lasso;
    there is no double backward (``create_graph=True`` raises).
    """

    @staticmethod
    def apply(cfg, *tensors):
        fixed, lo, hi, learn, gl_lambda = cfg
        n = len(fixed)
        if len(tensors) != 3 * n:
            raise ValueError(f"DeadZoneMultiFunction.apply: expected {3 * n} tensors (w, logit_dz, logit_bit per "
                             f"weight), got {len(tensors)}")
        w_hat, gl, scalars, norms = torch.ops.codeq.deadzone_multi(
            tensors[:n], tensors[n : 2 * n], tensors[2 * n :], fixed, lo, hi, learn, gl_lambda
        )
        return (*w_hat, gl, scalars, norms)


def _gl_function_forward(lambdas, *weights):
    loss, norms = torch.ops.codeq.group_lasso_forward(list(weights), list(lambdas))
    return (loss, *norms)


class GroupLassoFunction(torch.autograd.Function):
    """sum_l lambda_l * sum_j ||W_l[:, j]||_2 over many layers in one fused call.

    ``loss = GroupLassoFunction.apply(lambdas, *weights)[0]``; the other outputs
    are the per-layer column norms (no gradient).
    """

    @staticmethod
    def forward(lambdas, *weights):
        return _gl_function_forward(lambdas, *weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        lambdas, *weights = inputs
        loss, *norms = output
        ctx.save_for_backward(*weights, *norms)
        ctx.n = len(weights)
        ctx.lambdas = list(lambdas)
        ctx.mark_non_differentiable(*norms)

    @staticmethod
    def backward(ctx, grad_loss, *grad_norms):
        saved = ctx.saved_tensors
        weights, norms = list(saved[: ctx.n]), list(saved[ctx.n :])
        grads = torch.ops.codeq.group_lasso_backward(grad_loss, weights, norms, ctx.lambdas)
        return (None, *grads)


# The forward ops are differentiable on their own too (torch.library autograd),
# so that opcheck, torch.compile and direct callers of torch.ops.codeq all see
# gradients.
if _ext._C is not None:
    torch.library.register_autograd("codeq::deadzone_forward", _dz_backward, setup_context=_dz_setup)
    torch.library.register_autograd("codeq::uniform_forward", _uni_backward, setup_context=_uni_setup)
    torch.library.register_autograd("codeq::group_lasso_forward", _gl_backward, setup_context=_gl_setup)
