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
(``tests/test_train_optim.py``, which also fails, naming them, when a torch
lacks these private names; the optimizers are then torch's own).  Anything else -- state not yet created, AMP's
``grad_scale``/``found_inf``, a closure, amsgrad, tensor hyper-parameters,
capturable or differentiable groups, mixed devices or dtypes in a group --
takes torch's own ``step()``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from codeq.errors import ConfigError
from codeq.registry import OPTIMIZER_REGISTRY, SCHEDULER_REGISTRY

__all__ = ["warmup_then", "WARMUP_SCHEDULERS", "LeanFusedStep", "LeanAdam", "LeanAdamW", "LEAN_TORCH_NAMES",
           "lean_class", "PerGroupOptimizer", "split_param_groups", "build_optimizer", "build_scheduler",
           "graph_capable", "graph_capable_class"]


def warmup_then(cfg):
    """The learning-rate factor of epoch ``e`` (epochs done) with ``cfg.warmup_epochs``
    = W > 0: (e + 1) / (W + 1) for the first W epochs, then 1 (``none``) or a
    cosine from 1 to 0 over the remaining epochs (``cosine``).  ``cfg.epochs`` is
    read at each call, so a resume that raises the epochs stretches the cosine.
    A plain function: LambdaLR leaves it out of its state dict (a checkpoint holds
    tensors and builtins only)."""

    def factor(e: int) -> float:
        w = cfg.warmup_epochs
        if e < w:
            return (e + 1) / (w + 1)
        if cfg.lr_scheduler == "none":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (e - w) / max(cfg.epochs - w, 1)))

    return factor


def _cosine(opt, cfg):
    if cfg.warmup_epochs:
        return torch.optim.lr_scheduler.LambdaLR(opt, warmup_then(cfg))
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)


OPTIMIZER_REGISTRY.update(adamw=torch.optim.AdamW, adam=torch.optim.Adam, sgd=torch.optim.SGD)
SCHEDULER_REGISTRY.update(
    cosine=_cosine,
    none=lambda opt, cfg: torch.optim.lr_scheduler.LambdaLR(opt, warmup_then(cfg)) if cfg.warmup_epochs else None,
)
WARMUP_SCHEDULERS = ("cosine", "none")  # the schedules warmup_epochs can precede


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


class LeanAdam(LeanFusedStep, torch.optim.Adam):
    """``torch.optim.Adam(fused=True)`` with the lean step."""


class LeanAdamW(LeanFusedStep, torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` with the lean step."""


# The private torch names the lean step calls.  Where a torch lacks one, the
# optimizers are torch's own (tests/test_train_optim.py fails, naming it).
LEAN_TORCH_NAMES = ("_fused_adam_", "_fused_adamw_", "_foreach_add_")
_LEAN = {torch.optim.Adam: LeanAdam, torch.optim.AdamW: LeanAdamW} \
    if all(hasattr(torch, n) for n in LEAN_TORCH_NAMES) else {}


def lean_class(cls):
    """``cls`` with the lean fused step (torch.optim.Adam / AdamW exactly; other classes unchanged)."""
    return _LEAN.get(cls, cls)


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


class PerGroupOptimizer(torch.optim.Optimizer):
    """Torch optimizers of different kinds stepped as one: e.g. SGD for the
    weights and AdamW for the dead-zone and bit logits (the paper's ResNet
    recipe).  ``parts`` is a list of torch optimizers over disjoint parameters.

    It is a plain ``torch.optim.Optimizer`` to everything around it: its
    ``param_groups`` are the parts' group dicts themselves (an LR scheduler or
    a budget writes into the groups the parts read), its ``state`` is the one
    mapping the parts update, so ``state_dict`` / ``load_state_dict`` are
    torch's; after a load the parts are pointed at the new groups and state.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = list(parts)
        super().__init__([g for part in self.parts for g in part.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Each part reads this optimizer's group dicts (its own, in order) and state."""
        groups = iter(self.param_groups)
        for part in self.parts:
            part.param_groups = [next(groups) for _ in part.param_groups]
            part.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and a new state mapping
        self._share()

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss


def _group_class(cfg, name: str):
    """The optimizer class of parameter group ``name`` (its ``type``, else optimizer.type)."""
    gcfg = getattr(cfg.optimizer.param_groups, name) or cfg.optimizer.param_groups.base
    return OPTIMIZER_REGISTRY[gcfg.type or cfg.optimizer.type]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer with up to three param groups named base / dz / bit (in
    that order, empty ones left out).  dz and bit take base's hyper-parameters
    when the YAML has no group of their own.  Groups of different ``type`` get
    one torch optimizer per type, stepped together (:class:`PerGroupOptimizer`)."""
    split = split_param_groups(model)
    by_class: dict = {}  # optimizer class -> its groups, in base / dz / bit order
    for name in ("base", "dz", "bit"):
        if not split[name]:
            continue
        gcfg = getattr(cfg.optimizer.param_groups, name) or cfg.optimizer.param_groups.base
        group = {"params": [p for _, p in split[name]], "name": name, **gcfg.hparams()}
        by_class.setdefault(_group_class(cfg, name), []).append(group)
    if not by_class:
        raise ConfigError(f"model '{cfg.model}' has no trainable parameters")
    parts = [_build_one(cfg, cls, groups) for cls, groups in by_class.items()]
    return parts[0] if len(parts) == 1 else PerGroupOptimizer(parts)


def _build_one(cfg, cls, groups: list[dict]) -> torch.optim.Optimizer:
    extra = {}
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    if cfg.cuda_graph is True or (cfg.cuda_graph == "auto" and on_cuda and graph_capable(cfg)):
        # One CUDA graph replays the whole step (codeq/train/graph.py): the fused
        # step kernels, with Adam's step counters on the device (capturable).
        if not graph_capable_class(cls):
            raise ConfigError(f"cuda_graph needs a torch Adam, AdamW or SGD optimizer, not {cls!r}; "
                              "set cuda_graph: auto or false")
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
        raise ConfigError(f"cannot build optimizer {cls.__name__}: {exc}") from None


_FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def graph_capable_class(cls) -> bool:
    """Whether ``cls`` is torch's Adam, AdamW or SGD (whose fused steps capture in a CUDA graph)."""
    return isinstance(cls, type) and issubclass(cls, _FUSED_OPTIMIZERS)


def graph_capable(cfg) -> bool:
    """Whether this config's optimizer and mode allow ``cuda_graph``: one torch
    Adam, AdamW or SGD for every group (not a :class:`PerGroupOptimizer`), not
    under ``use_compile``, a budget -- it changes the strengths a graph would
    hold -- or fp16's gradient scaler, which reads the gradients on the host."""
    return (not cfg.use_compile and cfg.budget is None and cfg.amp != "fp16"
            and len(cfg.optimizer.types()) == 1
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
