"""The optimizer and the LR scheduler of a run: the registry entries (adamw,
adam, sgd; cosine, none), the three parameter groups, and a leaner ``step()``
for torch's fused Adam / AdamW.

QAT splits a model's parameters into three groups (weights, dead-zone logits,
bit logits: different learning rates and weight decay), and torch's optimizer
pays its Python per group every step (``_init_group``, device/dtype grouping,
one ``_foreach_add_`` per group), a visible part of a small model's step
(``benchmarks/results/ab_special_paths.md``).  :class:`LeanFusedStep` gathers the tensors itself, bumps
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
from torch import nn

from codeq.errors import ConfigError
from codeq.registry import OPTIMIZER_REGISTRY, SCHEDULER_REGISTRY

__all__ = ["LeanFusedStep", "lean_class", "split_param_groups", "build_optimizer", "build_scheduler", "graph_capable",
           "graph_capable_class"]

OPTIMIZER_REGISTRY.update(adamw=torch.optim.AdamW, adam=torch.optim.Adam, sgd=torch.optim.SGD)
SCHEDULER_REGISTRY.update(
    cosine=lambda opt, cfg: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs),
    none=lambda opt, cfg: None,
)


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


def split_param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters split by name: ``dz`` (contains ``logit_dz``),
    ``bit`` (``logit_bit``), ``base`` (the rest).  Frozen ones are left out."""
    groups: dict[str, list] = {"base": [], "dz": [], "bit": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "dz" if "logit_dz" in name else "bit" if "logit_bit" in name else "base"
        groups[key].append((name, p))
    return groups


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer with up to three param groups named base / dz / bit (in
    that order, empty ones left out).  dz and bit take base's hyper-parameters
    when the YAML has no group of their own."""
    cls = OPTIMIZER_REGISTRY[cfg.optimizer.type]
    split = split_param_groups(model)
    groups = []
    for name in ("base", "dz", "bit"):
        if not split[name]:
            continue
        gcfg = getattr(cfg.optimizer.param_groups, name) or cfg.optimizer.param_groups.base
        groups.append({"params": [p for _, p in split[name]], "name": name, **gcfg.hparams()})
    if not groups:
        raise ConfigError(f"model '{cfg.model}' has no trainable parameters")
    extra = {}
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    if cfg.cuda_graph is True or (cfg.cuda_graph == "auto" and on_cuda and graph_capable(cfg)):
        # One CUDA graph replays the whole step (codeq/train/graph.py): the fused
        # step kernels, with Adam's step counters on the device (capturable).
        if not graph_capable_class(cls):
            raise ConfigError(f"cuda_graph needs a torch Adam, AdamW or SGD optimizer; "
                              f"'{cfg.optimizer.type}' is {cls!r}; set cuda_graph: auto or false")
        if not any(k in g for g in groups for k in ("fused", "foreach")):
            extra["fused"] = True
        if issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
            extra["capturable"] = True
    elif _wants_fused(cls, groups):
        # One fused kernel for all parameters instead of a Python loop per tensor
        # (QAT adds two scalar logits per layer), without torch's per-group Python.
        extra["fused"] = True
        cls = lean_class(cls)
    try:
        return cls(groups, **extra)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build optimizer '{cfg.optimizer.type}': {exc}") from None


_FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def graph_capable_class(cls) -> bool:
    """Whether ``cls`` is torch's Adam, AdamW or SGD (whose fused steps capture in a CUDA graph)."""
    return isinstance(cls, type) and issubclass(cls, _FUSED_OPTIMIZERS)


def graph_capable(cfg) -> bool:
    """Whether this config's optimizer and mode allow ``cuda_graph`` (not under
    ``use_compile``, a budget -- it changes the strengths a graph would hold --
    or fp16's gradient scaler, which reads the gradients on the host)."""
    return (not cfg.use_compile and cfg.budget is None and cfg.amp != "fp16"
            and graph_capable_class(OPTIMIZER_REGISTRY.get(cfg.optimizer.type)))


def _wants_fused(cls, groups) -> bool:
    """Use the fused implementation of Adam/AdamW/SGD when the user chose no
    implementation (``fused``/``foreach``) and every parameter is a float
    tensor on the CPU or a CUDA device (where torch has fused kernels)."""
    if not graph_capable_class(cls):
        return False
    if any(k in g for g in groups for k in ("fused", "foreach", "differentiable", "capturable")):
        return False
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_scheduler(cfg, optimizer):
    return SCHEDULER_REGISTRY[cfg.lr_scheduler](optimizer, cfg)
