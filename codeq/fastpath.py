"""The eager training fast path: every quantized weight of a model, and the
group lasso over them, in one fused op call and one autograd node.

Attached quantizers are torch parametrizations: each ``module.weight`` read
runs its quantizer through ``autograd.Function.apply``, and the group lasso
reads the weights again; per layer that costs tens of microseconds of Python,
autograd and dispatch, and on the CPU two more passes over every weight for
the group lasso.  :class:`FusedWeights` computes all of it with
``codeq::deadzone_forward_multi`` (one call, one autograd node, the group
lasso fused into the backward on the CPU) and hands the results to the
parametrizations through ``torch.nn.utils.parametrize.cached()``, so the model
itself runs unchanged and sees the same tensors it would have computed.

Which layers it takes: those whose only parametrization of ``weight`` is an
enabled :class:`codeq.quantizers.DeadZoneLDZCompander` (not a subclass that
changes its forward, no forward hooks on it) computed by the fused kernels.
Anything else (other quantizers, disabled ones, hooked ones, layers on another
device) is left to its parametrization as before, so the results never depend
on whether the fast path ran; ``tests/test_train_fastpath.py`` checks that.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from codeq import _ext
from codeq.ops import DeadZoneMultiFunction
from codeq.quantizers import DeadZoneLDZCompander, use_fused

__all__ = ["FusedWeights"]


def _fusable(module: nn.Module):
    """The quantizer of ``module.weight`` if the fast path can compute it, else None."""
    plist = module.parametrizations["weight"]
    if len(plist) != 1:
        return None
    q = plist[0]
    if not isinstance(q, DeadZoneLDZCompander) or type(q)._quantize is not DeadZoneLDZCompander._quantize \
            or type(q).forward is not DeadZoneLDZCompander.forward:
        return None  # a subclass with its own math
    if q._forward_hooks or q._forward_pre_hooks:
        return None  # the user's hooks must see the quantizer run
    if not q.enabled or not use_fused(plist.original):
        return None
    return q


class FusedWeights:
    """Fills the parametrization cache with every fusable quantized weight of
    ``model`` in one fused call.

    ``group_lasso``: the kwargs of a ``group_lasso`` loss term (``lambda_linear``,
    ``lambda_conv``) to fuse, or None.  Use inside ``parametrize.cached()``::

        fast = FusedWeights(model, group_lasso={"lambda_linear": 1e-4, "lambda_conv": 1e-4})
        with parametrize.cached():
            gl = fast.prefill()          # the group lasso over all layers (None without one)
            logits = model(x)            # reads the cached quantized weights
    """

    def __init__(self, model: nn.Module, group_lasso: dict | None = None):
        self.model = model
        self.gl = None
        if group_lasso is not None:
            self.gl = (float(group_lasso.get("lambda_linear", 1e-4)), float(group_lasso.get("lambda_conv", 1e-4)))
        self.modules = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
        self.enabled = _ext._C is not None and hasattr(parametrize, "_cache")
        self._checked = False
        self._cached_plan = None
        self._skipped = []
        self._gl_rest = []  # group-lasso layers the fused call does not cover (set with each plan)
        # (module, lambda) of every layer the group lasso covers (fixed for a model)
        self._gl_modules = [(m, lam) for m in model.modules() for lam in [self._gl_lambda(m)] if lam != 0.0]

    def _gl_lambda(self, m: nn.Module) -> float:
        if self.gl is None:
            return 0.0
        if isinstance(m, nn.Linear):
            return self.gl[0]
        if isinstance(m, nn.Conv2d):
            return self.gl[1]
        return 0.0

    def _plan(self):
        """(modules, quantizers, original weights, lambdas, device) of the fusable layers."""
        mods, qs, ws, lams = [], [], [], []
        for m in self.modules:
            q = _fusable(m)
            if q is None:
                continue
            mods.append(m)
            qs.append(q)
            ws.append(m.parametrizations["weight"].original)
            lams.append(self._gl_lambda(m))
        dev = ws[0].device if ws else None
        if any(w.device != dev for w in ws):
            mods, qs, ws, lams = [], [], [], []  # spread over devices: leave it to the parametrizations
        cfg = ([q._cfg[0] for q in qs], [q._cfg[1] for q in qs], [q._cfg[2] for q in qs],
               [bool(q.learnable_bit) for q in qs], lams)
        # What the per-step check compares: the parametrization list's own module
        # and parameter dicts (reading them directly is ~10x cheaper than
        # ModuleList indexing and Module.__getattr__), the quantizer's settings
        # and its logit parameters.
        dzs = [q._parameters.get("logit_dz") for q in qs]
        bits = [q._parameters.get("logit_bit") for q in qs]
        key = [(m.parametrizations["weight"]._modules, m.parametrizations["weight"]._parameters, q, w, q._cfg,
                q.learnable_bit, q._parameters, dz, bit) for m, q, w, dz, bit in zip(mods, qs, ws, dzs, bits)]
        args = (cfg, *ws, *dzs, *bits)
        if any(t is None for t in dzs + bits):  # logits that are not parameters (a subclass's doing):
            key = [k[:6] + (None, None, None) for k in key]
            args = None  # read them every step
        cache_keys = [(id(m), "weight") for m in mods]
        return mods, qs, ws, lams, cfg, dev, key, args, cache_keys

    def _current_plan(self):
        """The cached plan while it still holds (same quantizer objects and
        settings, enabled, no hooks, weights on the planned device, no newly
        fusable layer), else a new one.
        The cheap check runs every step; the full scan only when it fails."""
        plan = self._cached_plan
        if plan is not None:
            dev, key = plan[5], plan[6]
            ok = True
            for pmods, pparams, q, w, qcfg, learn, qparams, dz, bit in key:
                if not q.enabled or len(pmods) != 1 or pmods.get("0") is not q or pparams.get("original") is not w \
                        or w.device != dev or q._cfg is not qcfg or q.learnable_bit != learn \
                        or q._forward_hooks or q._forward_pre_hooks \
                        or (qparams is not None and (qparams.get("logit_dz") is not dz
                                                     or qparams.get("logit_bit") is not bit)):
                    ok = False
                    break
            if ok and self._skipped:  # a layer that was not fusable may have become so (e.g. re-enabled)
                ok = not any(_fusable(m) is not None for m in self._skipped)
            if ok:
                return plan
        plan = self._plan()
        self._cached_plan = plan
        taken = {id(m) for m in plan[0]}
        self._skipped = [m for m in self.modules if id(m) not in taken]
        # The group-lasso layers the fused call does not cover (read every step).
        done = {id(m) for m, lam in zip(plan[0], plan[3]) if lam != 0.0}
        self._gl_rest = [(m, lam) for m, lam in self._gl_modules if id(m) not in done]
        return plan

    def prefill(self):
        """Quantize every fusable weight into the parametrization cache; returns
        the group-lasso term over the whole model (the fused layers plus the
        others) when a group lasso was given, else None.  Must run inside
        ``parametrize.cached()``."""
        if not self.enabled:
            return None
        if not parametrize._cache_enabled:
            raise RuntimeError("FusedWeights.prefill() must run inside torch.nn.utils.parametrize.cached()")
        mods, qs, ws, lams, cfg, dev, _, args, cache_keys = self._current_plan()
        gl = None
        if mods:
            if args is None:
                args = (cfg, *ws, *[q.logit_dz for q in qs], *[q.logit_bit for q in qs])
            outs = DeadZoneMultiFunction.apply(*args)
            cache = parametrize._cache
            for k, w_hat in zip(cache_keys, outs):
                cache[k] = w_hat
            if not self._checked:
                self._checked = True
                if mods[0].weight is not outs[0]:  # torch changed its parametrization cache: stay correct
                    warnings.warn("codeq: the fused weight path does not reach torch's parametrization cache in "
                                  f"torch {torch.__version__}; using the per-layer path", stacklevel=2)
                    self.enabled = False
                    parametrize._cache.clear()
                    return None
            if self.gl is not None and any(lam != 0.0 for lam in lams):
                gl = outs[len(mods)]
        if self.gl is None or (gl is not None and not self._gl_rest):
            return gl
        # The layers the fused call did not cover (or all, if it covered none).
        from codeq import reference
        from codeq.losses import group_lasso_of_layers

        rest = [(m.weight, lam) for m, lam in self._gl_rest]
        if rest:
            extra = group_lasso_of_layers(rest, self.model)
            gl = extra if gl is None else gl + extra
        if gl is None:
            gl = reference.group_lasso_of([], self.model)
        return gl
