"""The eager training fast path: every quantized weight of a model, and the
group lasso over them, in one call of ``codeq::deadzone_forward`` (one autograd
node, one backward call).

Attached quantizers are torch parametrizations: each ``module.weight`` read
runs its quantizer, and the group lasso reads the weights again; per layer
that costs Python, autograd and dispatch, and on the CPU two more passes over
every weight for the group lasso.  :class:`FusedWeights`
computes all of it in one op call -- the same op a single quantizer calls with
one layer -- and hands the results to the parametrizations through
``torch.nn.utils.parametrize.cached()``, so the model itself runs unchanged and
sees the tensors it would have computed (``benchmarks/results/
ab_special_paths.md`` has what this saves).

Which layers it takes: those whose only parametrization of ``weight`` is an
enabled :class:`codeq.DeadZoneLDZCompander` (not a subclass that changes how
it quantizes, no forward hooks on it, not ``reference=True``) computed by the
kernels, all on one device.  Anything else is left to its parametrization as
before, so the results never depend on whether the fast path ran;
``tests/test_train_fastpath.py`` checks that bit for bit.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from codeq import _ext, ops
from codeq.losses import group_lasso_of
from codeq.quantizers import DeadZoneLDZCompander, use_fused

__all__ = ["FusedWeights"]


@functools.cache
def _same_math(cls: type) -> bool:
    """Whether quantizers of this class quantize as DeadZoneLDZCompander does."""
    return issubclass(cls, DeadZoneLDZCompander) and all(
        getattr(cls, f) is getattr(DeadZoneLDZCompander, f) for f in ("forward", "_quantize", "_kernel_quantize"))


def _fusable(plist):
    """(quantizer, original weight) of a ``parametrizations["weight"]`` list if
    the fast path can compute it, else None."""
    if len(plist) != 1:
        return None
    q = next(iter(plist))
    if not _same_math(type(q)):
        return None  # another quantizer, or a subclass with its own math
    if q._forward_hooks or q._forward_pre_hooks:
        return None  # the user's hooks must see the quantizer run
    w = plist.original
    if not q.enabled or q.reference or not use_fused(w):
        return None
    return q, w


class FusedWeights:
    """Fills the parametrization cache with every fusable quantized weight of
    ``model`` in one fused call.

    ``group_lasso``: the (module, lambda) pairs of a group lasso to compute
    along (what a term declares with ``register_loss(..., group_lasso_layers=)``,
    for its kwargs), or None.  Use inside ``parametrize.cached()``::

        fast = FusedWeights(model, group_lasso=codeq.losses.group_lasso_layers(model, 1e-3, 1e-3))
        with parametrize.cached():
            gl = fast.prefill()          # the group lasso over all layers (None without one)
            logits = model(x)            # reads the cached quantized weights
    """

    def __init__(self, model: nn.Module, group_lasso: list | None = None):
        self.model = model
        self.modules = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
        self.gl_layers = group_lasso  # (module, lambda) of every layer the group lasso covers
        self.gl_lambda = {id(m): lam for m, lam in self.gl_layers or ()}
        self.enabled = _ext._C is not None and hasattr(parametrize, "_cache")
        self._checked = False

    def prefill(self):
        """Quantize every fusable weight into the parametrization cache; returns
        the group-lasso term over the whole model (the fused layers plus the
        others) when a group lasso was given, else None.  Must run inside
        ``parametrize.cached()``."""
        if not self.enabled:
            return None
        if not parametrize._cache_enabled:
            raise RuntimeError("FusedWeights.prefill() must run inside torch.nn.utils.parametrize.cached()")
        fused = [(m, *f) for m in self.modules for f in [_fusable(m.parametrizations["weight"])] if f is not None]
        if len({w.device for _, _, w in fused}) > 1:
            fused = []  # spread over devices: leave it to the parametrizations
        lams = [self.gl_lambda.get(id(m), 0.0) for m, _, _ in fused]
        gl = None
        if fused:
            w_hat, gl, _ = ops.deadzone([w for _, _, w in fused], [q for _, q, _ in fused], lams)
            for (m, _, _), t in zip(fused, w_hat):
                parametrize._cache[(id(m), "weight")] = t
            if not self._checked:
                self._checked = True
                if fused[0][0].weight is not w_hat[0]:  # torch changed its parametrization cache: stay correct
                    warnings.warn("codeq: the fused weight path does not reach torch's parametrization cache in "
                                  f"torch {torch.__version__}; using the per-layer path", stacklevel=2)
                    self.enabled = False
                    parametrize._cache.clear()
                    return None
        if self.gl_layers is None:
            return None
        # The group lasso of the layers the fused call did not cover.
        done = {id(m) for (m, _, _), lam in zip(fused, lams) if lam != 0.0}
        rest = [(m.weight, lam) for m, lam in self.gl_layers if id(m) not in done]
        if not done:
            return group_lasso_of(rest, self.model)
        return gl + group_lasso_of(rest, self.model) if rest else gl
