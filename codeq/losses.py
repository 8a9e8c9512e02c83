"""Loss terms added to the cross-entropy: ``total = CE + sum_i lambda_i * term_i(model)``."""

from __future__ import annotations

import torch
from torch import nn

from codeq import reference
from codeq.ops import GroupLassoFunction
from codeq.quantizers import fused_device_types

__all__ = ["group_lasso"]


def group_lasso(model: nn.Module, lambda_linear: float = 1e-4, lambda_conv: float = 1e-4) -> torch.Tensor:
    """Group lasso over the columns of every nn.Linear / nn.Conv2d weight the
    forward pass uses (the quantized weight where a quantizer is attached):
    ``lambda_linear * sum_j ||W[:, j]||_2`` for Linear (one group per input
    feature) and ``lambda_conv * sum_j ||W.reshape(out, -1)[:, j]||_2`` for
    Conv2d.  A lambda of 0.0 switches that layer type off and skips its work.

    All layers go through one fused call.  Call it inside
    ``torch.nn.utils.parametrize.cached()`` together with the forward pass so
    that the quantizers are not run a second time.
    """
    layers = reference.group_lasso_layers(model, lambda_linear, lambda_conv)
    devices = {w.device for w, _ in layers}
    if len(devices) != 1 or next(iter(devices)).type not in fused_device_types():
        return reference.group_lasso_of(layers, model)
    weights = [w for w, _ in layers]
    lambdas = [lam for _, lam in layers]
    return GroupLassoFunction.apply(lambdas, *weights)[0]
