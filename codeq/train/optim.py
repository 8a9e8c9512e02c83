"""A leaner ``step()`` for torch's fused Adam / AdamW.

QAT splits a model's parameters into three groups (weights, dead-zone logits,
bit logits: different learning rates and weight decay), and torch's optimizer
pays its Python per group every step (``_init_group``, device/dtype grouping,
one ``_foreach_add_`` per group): ~30 µs a group on a CPU, a visible part of a
small model's step.  :class:`LeanFusedStep` gathers the tensors itself, bumps
every group's step counters with one ``_foreach_add_`` and calls the same fused
kernel (``torch._fused_adamw_`` / ``torch._fused_adam_``) per group with the
same arguments, so the update is bit for bit torch's
(``tests/test_train_optim.py``).  Anything else -- state not yet created, AMP's
``grad_scale``/``found_inf``, a closure, amsgrad, tensor hyper-parameters,
capturable or differentiable groups, mixed devices or dtypes in a group --
takes torch's own ``step()``.
"""

from __future__ import annotations

import torch

__all__ = ["LeanFusedStep", "lean_class"]


class LeanFusedStep:
    """Mixin for ``torch.optim.Adam`` / ``AdamW`` built with ``fused=True``."""

    def _lean_calls(self):
        """[(kernel, params, grads, exp_avgs, exp_avg_sqs, steps, kwargs)] for
        this step, and all step counters; None when torch's step must run."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return None
        calls, all_steps = [], []
        state = self.state
        for group in self.param_groups:
            if not group.get("fused") or group.get("amsgrad") or group.get("capturable") \
                    or group.get("differentiable"):
                return None
            lr, (beta1, beta2) = group["lr"], group["betas"]
            if not all(isinstance(v, float) for v in (lr, beta1, beta2)):
                return None
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            dev = dtype = None
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                st = state.get(p)
                if not st or "exp_avg" not in st or g.is_sparse or p.is_complex():
                    return None  # first step (state is created by torch's step) or unusual
                if dev is None:
                    dev, dtype = p.device, p.dtype
                elif p.device != dev or p.dtype != dtype:
                    return None
                params.append(p)
                grads.append(g)
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                steps.append(st["step"])
            if not params:
                continue
            decoupled = group.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW))
            kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
            kwargs = dict(amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                          eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None)
            calls.append((kernel, params, grads, exp_avgs, exp_avg_sqs, steps, kwargs))
            all_steps.extend(steps)
        return calls, all_steps

    def step(self, closure=None):
        plan = None if closure is not None else self._lean_calls()
        if plan is None:
            return super().step(closure)
        calls, all_steps = plan
        with torch.no_grad():
            if all_steps:
                torch._foreach_add_(all_steps, 1)
            for kernel, params, grads, exp_avgs, exp_avg_sqs, steps, kwargs in calls:
                kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, **kwargs)
        return None


_CLASSES: dict = {}


def lean_class(cls):
    """``cls`` with the lean fused step (torch.optim.Adam / AdamW exactly; other classes unchanged)."""
    if cls not in (torch.optim.Adam, torch.optim.AdamW):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (LeanFusedStep, cls), {"__module__": __name__, "__doc__": cls.__doc__})
    return _CLASSES[cls]
