"""Loss terms added to the cross-entropy: ``total = CE + sum_i lambda_i * term_i(model)``."""

from __future__ import annotations

import torch
from torch import nn

from codeq import ops, reference
from codeq.parametrize import iter_quantizers
from codeq.quantizers import use_fused
from codeq.registry import register_loss

__all__ = ["GROUP_LASSO_LAMBDA", "group_lasso", "group_lasso_layers", "group_lasso_of", "theta_l2"]

# The group lasso's default lambda_linear / lambda_conv, defined once: the trainer fills a
# term's kwargs from group_lasso's signature, so its fused path (codeq/fastpath.py, which
# has no defaults) computes with the values the per-layer path does.  codeq.reference, a
# leaf, spells its own out; tests/test_loss_terms.py holds the two equal.
GROUP_LASSO_LAMBDA = 1e-4


def group_lasso_layers(model: nn.Module, lambda_linear: float = GROUP_LASSO_LAMBDA,
                       lambda_conv: float = GROUP_LASSO_LAMBDA) -> list:
    """(module, lambda) of every layer the group lasso covers: nn.Linear with
    ``lambda_linear``, nn.Conv2d with ``lambda_conv``, where the lambda is not 0."""
    out = []
    for m in model.modules():
        lam = float(lambda_linear) if isinstance(m, nn.Linear) else float(lambda_conv) if isinstance(m, nn.Conv2d) else 0.0
        if lam != 0.0:
            out.append((m, lam))
    return out


@register_loss("group_lasso", group_lasso_layers=group_lasso_layers)
def group_lasso(model: nn.Module, lambda_linear: float = GROUP_LASSO_LAMBDA,
                lambda_conv: float = GROUP_LASSO_LAMBDA) -> torch.Tensor:
    """Group lasso over the columns of every nn.Linear / nn.Conv2d weight the
    forward pass uses (the quantized weight where a quantizer is attached):
    ``lambda_linear * sum_j ||W[:, j]||_2`` for Linear (one group per input
    feature) and ``lambda_conv * sum_j ||W.reshape(out, -1)[:, j]||_2`` for
    Conv2d.  A lambda of 0.0 switches that layer type off and skips its work.

    All layers go through one fused call.  Call it inside
    ``torch.nn.utils.parametrize.cached()`` together with the forward pass so
    that the quantizers are not run a second time.
    """
    layers = [(m.weight, lam) for m, lam in group_lasso_layers(model, lambda_linear, lambda_conv)]
    return group_lasso_of(layers, model)


def group_lasso_of(layers, model: nn.Module | None = None) -> torch.Tensor:
    """The group lasso of a list of (weight, lambda) pairs, in one fused call
    where the kernels cover the weights' device (the reference otherwise); a
    zero on the model's device for an empty list."""
    if not layers:
        p = next(iter(model.parameters()), None) if model is not None else None
        return torch.zeros((), device=p.device if p is not None else None)
    if len({w.device for w, _ in layers}) != 1 or not use_fused(layers[0][0]):
        return reference.group_lasso_of(layers)
    return ops.group_lasso_of([w for w, _ in layers], [lam for _, lam in layers])


def _learnable_logits(model: nn.Module, name: str) -> list:
    """The learnable parameters called ``name`` (``logit_dz`` / ``logit_bit``)
    of every quantizer attached to ``model``, each once."""
    seen, out = set(), []
    for _, _, q in iter_quantizers(model):
        for pname, p in q.named_parameters():
            if pname.rsplit(".", 1)[-1] == name and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@register_loss("theta_l2")
def theta_l2(model: nn.Module, lambda_dz: float = 0.0, lambda_bit: float = 0.0) -> torch.Tensor:
    """The paper's regulariser of the quantizer logits (arXiv 2512.12981):
    ``lambda_dz * sum(theta_dz ** 2) + lambda_bit * sum(theta_bit ** 2)`` over
    the ``logit_dz`` / ``logit_bit`` of every quantizer attached to ``model``,
    learnable ones only (a frozen logit, e.g. ``logit_bit`` with
    ``learnable_bit: false``, is left out).  Pulling theta_dz to 0 widens the
    dead zone (more sparsity), pulling theta_bit to 0 lowers the bit-width.

    A lambda of 0.0 leaves its logits out.  No host syncs: one concatenation,
    square and sum per group, on the logits' device.  Use it as a trainer loss
    term with ``lambda: 1`` and the two strengths in ``kwargs``.
    """
    total = None
    for name, lam in (("logit_dz", float(lambda_dz)), ("logit_bit", float(lambda_bit))):
        if lam == 0.0:
            continue
        ps = _learnable_logits(model, name)
        if not ps:
            continue
        term = lam * torch.cat([p.reshape(-1) for p in ps]).square().sum()
        total = term if total is None else total + term
    if total is None:
        ref = next(model.parameters(), None)
        return torch.zeros((), device=ref.device if ref is not None else None,
                           dtype=ref.dtype if ref is not None and ref.is_floating_point() else None)
    return total
