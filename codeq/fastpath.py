"""The eager training fast path: every quantized weight of a model, and the
group lasso over them, in one call of ``codeq::deadzone_forward`` (one autograd
node, one backward call).

Attached quantizers are torch parametrizations: each ``module.weight`` read
runs its quantizer, and the group lasso reads the weights again; per layer
that costs Python, autograd and dispatch, and on the CPU two more passes over
every weight for the group lasso.  :class:`FusedWeights`
computes all of it in one op call -- the same op a single quantizer calls with
one layer -- and hands each quantizer its result for the block
(``QuantizerBase.given``: its forward returns it), so the model itself runs
unchanged and sees the tensors it would have computed; inside
``torch.nn.utils.parametrize.cached()`` each is then read once
(``benchmarks/results/ab_special_paths.md`` has what this saves).

Which layers it takes: those whose only parametrization of ``weight`` is an
enabled :class:`codeq.DeadZoneLDZCompander` (not a subclass that changes how
it quantizes, no forward hooks on it, not ``reference=True``) computed by the
kernels, all on one device.  Anything else is left to its parametrization as
before, so the results never depend on whether the fast path ran;
``tests/test_train_fastpath.py`` checks that bit for bit.
"""

from __future__ import annotations

import contextlib
import functools

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
    """Computes every fusable quantized weight of ``model`` in one fused call.

    ``group_lasso``: the (module, lambda) pairs of a group lasso to compute
    along (what a term declares with ``register_loss(..., group_lasso_layers=)``,
    for its kwargs), or None::

        fast = FusedWeights(model, group_lasso=codeq.losses.group_lasso_layers(model, 1e-3, 1e-3))
        with parametrize.cached(), fast.prefilled() as gl:   # gl: the group lasso (None without one)
            logits = model(x)            # reads the quantized weights of the fused call
    """

    def __init__(self, model: nn.Module, group_lasso: list | None = None):
        self.model = model
        self.modules = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
        self.gl_layers = group_lasso  # (module, lambda) of every layer the group lasso covers
        self.gl_lambda = {id(m): lam for m, lam in self.gl_layers or ()}
        self.enabled = _ext._C is not None

    @contextlib.contextmanager
    def prefilled(self):
        """For the block: every fusable weight quantized in one call and handed
        to its quantizer (whose forward returns it until the block ends); yields
        the group-lasso term over the whole model (the fused layers plus the
        others) when a group lasso was given, else None."""
        fused = []
        if self.enabled:
            fused = [(m, *f) for m in self.modules for f in [_fusable(m.parametrizations["weight"])] if f is not None]
            if len({w.device for _, _, w in fused}) > 1:
                fused = []  # spread over devices: leave it to the parametrizations
        lams = [self.gl_lambda.get(id(m), 0.0) for m, _, _ in fused]
        gl = None
        try:
            if fused:
                w_hat, gl, _ = ops.deadzone([w for _, _, w in fused], [q for _, q, _ in fused], lams)
                for (_, q, _), t in zip(fused, w_hat):
                    q.given = t
            yield self._group_lasso(fused, lams, gl)
        finally:
            for _, q, _ in fused:
                q.given = None

    def _group_lasso(self, fused, lams, gl):
        """The group lasso over the whole model: the fused call's part plus the layers it did not cover."""
        if self.gl_layers is None:
            return None
        # The group lasso of the layers the fused call did not cover.
        done = {id(m) for (m, _, _), lam in zip(fused, lams) if lam != 0.0}
        rest = [(m.weight, lam) for m, lam in self.gl_layers if id(m) not in done]
        if not done:
            return group_lasso_of(rest, self.model)
        return gl + group_lasso_of(rest, self.model) if rest else gl
