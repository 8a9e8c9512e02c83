"""The trainer's YAML schema: every key declared once, as a dataclass field.

A key is one ``key(default, doc, ...)`` field of the section it belongs to:
its type is the field's annotation, and its default, doc line and checks are
the field's metadata.  Everything else is derived from those declarations:
reading a YAML mapping (:func:`config_from_dict`: unknown keys with a "did you
mean", types, defaults, required keys, registry names, bounds), writing it
back (:func:`config_to_dict`), the keys ``--resume`` compares
(:func:`resume_keys`) and the reference table of ``docs/TRAINING.md``
(:func:`markdown_table`; ``make docs`` writes it into the doc, and a test fails
when the doc and the schema differ).  Checks that involve
more than one key are each section's ``validate()``.

Every user mistake raises :class:`ConfigError` with a one-line message; the CLI
prints it as ``error: ...`` and exits with code 2 before anything is written
to disk::

    cfg = load_config("configs/deadzone_mlp.yaml", overrides=["epochs=3"])
    d = config_to_dict(cfg)          # the resolved config, plain builtins
    cfg == config_from_dict(d)       # round trip
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from codeq.errors import ConfigError
from codeq.models import check_model_kwargs, model_source, resolve_model
from codeq.report import METRICS as BUDGET_METRICS
from codeq.registry import (
    DATASET_REGISTRY,
    DEFAULT_AUGMENT,
    LOSS_REGISTRY,
    OPTIMIZER_REGISTRY,
    QUANTIZER_REGISTRY,
    SCHEDULER_REGISTRY,
)
from codeq.train.optim import WARMUP_SCHEDULERS, graph_capable_class

__all__ = [
    "ConfigError",
    "Config",
    "QuantizerConfig",
    "ParamGroupConfig",
    "ParamGroups",
    "OptimizerConfig",
    "LossTermConfig",
    "DatasetConfig",
    "BudgetConfig",
    "BudgetStrength",
    "load_config",
    "load_yaml",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "resume_keys",
    "check_resume_compatible",
    "markdown_table",
    "write_markdown_table",
    "save_config",
    "DEVICE_CHOICES",
    "WANDB_MODES",
    "AUGMENT_CHOICES",
    "BUDGET_METRICS",
]

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "mps")
WANDB_MODES = ("online", "offline", "disabled")
AUGMENT_CHOICES = ("standard", "randaugment", "none")
AMP_CHOICES = ("none", "bf16", "fp16")
MATMUL_PRECISIONS = ("high", "highest")
ON_DEVICE_DATASETS = ("cifar10", "synthetic")

AutoBool = Union[bool, Literal["auto"]]  # "auto", true or false

_REQUIRED = dataclasses.MISSING


def key(default: Any = _REQUIRED, doc: str = "", *, name: str | None = None, minimum: float | None = None,
        choices: tuple | None = None, check=None, resume: bool = False, rest: bool = False):
    """One config key: a dataclass field with its default (none: required), its
    doc line (the reference table's), and its checks: ``minimum`` (a lower
    bound), ``choices`` ((collection or registry, what it names)),
    ``check(path, value)`` (raises ConfigError).  ``name``: the YAML key when it
    is not the field's name; ``resume``: must equal the checkpoint's for
    ``--resume``; ``rest``: the mapping of the section's other keys (passed on
    to whatever the section configures)."""
    meta = dict(doc=doc, name=name, minimum=minimum, choices=choices, check=check, resume=resume, rest=rest)
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, type):  # a section whose keys all have defaults
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------ checks --
def _suggest(word, valid) -> str:
    close = difflib.get_close_matches(str(word), [str(v) for v in valid], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _typename(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}.get(
        type(v), type(v).__name__)


def _check_device(path: str, dev: str) -> None:
    if dev not in ("cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", dev):
        raise ConfigError(f"unknown device '{dev}' ({path}); choose one of: {', '.join(DEVICE_CHOICES)}")


def _check_model(path: str, name: str) -> None:
    """A registered model, or timm/NAME or torchvision/NAME (codeq.models.resolve_model)."""
    resolve_model(name)


def _check_run_name(path: str, v: str | None) -> None:
    if v is not None and (not v or os.sep in v):
        raise ConfigError(f"{path} must be a non-empty name without '{os.sep}', got {v!r}")


def _check_minutes(path: str, v: float) -> None:
    if not 0 < v < math.inf:
        raise ConfigError(f"{path} must be more than 0 (minutes), got {v}")


def _check_finite(path: str, v: Any) -> None:
    """Numbers inside a free-form mapping (optimizer extras, kwargs) must be finite."""
    if isinstance(v, dict):
        for k, x in v.items():
            _check_finite(f"{path}.{k}", x)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_finite(f"{path}[{i}]", x)
    elif isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"{path} must be a finite number, got {v}")


def _accepted_kwargs(fn) -> list | None:
    """Keyword names fn (a class: its __init__) accepts, or None when it takes **kwargs."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_kwargs(path: str, kwargs: dict, fn, what: str, reserved=()) -> None:
    """Keys of a kwargs mapping must be arguments of fn (unless it takes
    **kwargs); ``reserved`` ones are set by the trainer itself."""
    for k in kwargs:
        if k in reserved:
            raise ConfigError(f"'{path}.{k}' cannot be set there: the trainer passes {k} itself")
    names = _accepted_kwargs(fn)
    if names is None:
        return
    names = [n for n in names if n not in reserved and n != "params"]
    for k in kwargs:
        if not isinstance(k, str) or k not in names:
            raise ConfigError(f"unknown key '{path}.{k}' for {what}{_suggest(k, names)} "
                              f"(accepted: {', '.join(names) or 'none'})")


# ------------------------------------------------------------------ schema --
@dataclass(kw_only=True)
class QuantizerConfig:
    name: str = key(doc="the quantizer (QUANTIZER_REGISTRY)", choices=(QUANTIZER_REGISTRY, "quantizer"))
    kwargs: dict = key({}, "passed to the quantizer's constructor (unknown names are an error)")
    exclude_layers: list[str] = key([], "skip modules whose qualified name contains any of these")

    def validate(self, path: str) -> None:
        _check_kwargs(f"{path}.kwargs", self.kwargs, QUANTIZER_REGISTRY[self.name], f"quantizer '{self.name}'")


@dataclass(kw_only=True)
class ParamGroupConfig:
    type: str | None = key(None, "this group's optimizer (OPTIMIZER_REGISTRY); null: optimizer.type (e.g. sgd for "
                                 "the weights and adamw for the logits)",
                           choices=(OPTIMIZER_REGISTRY, "optimizer"), resume=True)
    lr: float = key(doc="learning rate", minimum=0)
    weight_decay: float = key(0.0, "weight decay", minimum=0)
    extra: dict = key({}, "any other key goes to the optimizer: momentum, nesterov, betas, eps, fused, ...",
                      rest=True)

    def validate(self, path: str) -> None:
        _check_finite(path, self.extra)

    def hparams(self) -> dict:
        """The group's hyper-parameters as the optimizer takes them (lists as tuples)."""
        out = {"lr": self.lr, "weight_decay": self.weight_decay}
        for k, v in self.extra.items():
            out[k] = tuple(v) if isinstance(v, list) else v
        return out


@dataclass(kw_only=True)
class ParamGroups:
    base: ParamGroupConfig = key(doc="every ordinary model parameter")
    dz: ParamGroupConfig | None = key(None, "the dead-zone logits (names containing logit_dz); same keys as base; "
                                            "default: base's values")
    bit: ParamGroupConfig | None = key(None, "the bit-width logits (names containing logit_bit); same keys as base; "
                                             "default: base's values")


@dataclass(kw_only=True)
class OptimizerConfig:
    type: str = key("adamw", "the optimizer (OPTIMIZER_REGISTRY)", choices=(OPTIMIZER_REGISTRY, "optimizer"),
                    resume=True)
    param_groups: ParamGroups = key(doc="hyper-parameters of the three parameter groups")

    def validate(self, path: str) -> None:
        for gname in ("base", "dz", "bit"):
            g = getattr(self.param_groups, gname)
            if g is not None:
                kind = g.type or self.type
                _check_kwargs(f"{path}.param_groups.{gname}", g.extra, OPTIMIZER_REGISTRY[kind],
                              f"optimizer '{kind}'")

    def types(self) -> set[str]:
        """The optimizers the groups use (more than one: one torch optimizer per type, stepped together)."""
        groups = [getattr(self.param_groups, n) or self.param_groups.base for n in ("base", "dz", "bit")]
        return {g.type or self.type for g in groups}


@dataclass(kw_only=True)
class LossTermConfig:
    name: str = key(doc="the loss term (LOSS_REGISTRY)", choices=(LOSS_REGISTRY, "loss term"))
    lam: float = key(1.0, "its weight in the total loss", name="lambda", minimum=0)
    kwargs: dict = key({}, "passed to the term (unknown names are an error; numbers finite, the weights "
                           "lambda_* at least 0)")

    def validate(self, path: str) -> None:
        _check_finite(f"{path}.kwargs", self.kwargs)
        for k, v in self.kwargs.items():
            if str(k).startswith("lambda") and isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"{path}.kwargs.{k} must be at least 0 (a weight of the loss), got {v}")
        _check_kwargs(f"{path}.kwargs", self.kwargs, LOSS_REGISTRY[self.name], f"loss term '{self.name}'",
                      reserved=("model",))


@dataclass(kw_only=True)
class DatasetConfig:
    name: str = key("cifar10", "the data set (DATASET_REGISTRY)", choices=(DATASET_REGISTRY, "dataset"))
    root: str = key("data", "where it is read from")
    download: bool = key(False, "cifar10: fetch it into root when missing")
    augment: str | None = key(None, "training augmentation: standard (crop + flip), randaugment (standard + "
                                    "RandAugment(2, 9)), none; null: the data set's recipe (cifar10: randaugment, "
                                    "as the published trainer; synthetic, imagefolder: standard)",
                              choices=(AUGMENT_CHOICES, "augmentation"))
    train_size: int | None = key(None, "use the first N training images (synthetic: default 1000)", minimum=1)
    val_size: int | None = key(None, "use the first N validation images (synthetic: default 200)", minimum=1)
    on_device: bool = key(False, "hold the data set on the training device and augment it there (cifar10, "
                                 "synthetic; augment: standard or none)")

    def validate(self, path: str) -> None:
        recipe = self.augment is None
        if recipe:
            self.augment = getattr(DATASET_REGISTRY[self.name], "default_augment", DEFAULT_AUGMENT)
        if not self.on_device:
            return
        if self.name not in ON_DEVICE_DATASETS:
            raise ConfigError(f"{path}.on_device works for {' and '.join(ON_DEVICE_DATASETS)} (CIFAR-shaped data "
                              f"held on the device), not '{self.name}'; set {path}.on_device: false")
        if self.augment == "randaugment":
            default = f" ({self.name}'s recipe when augment is unset)" if recipe else ""
            raise ConfigError(f"{path}.on_device supports augment: standard or none (crop + flip on the device), "
                              f"not randaugment{default}; set {path}.augment: standard to train on the device, "
                              f"or {path}.on_device: false for RandAugment")


def _check_fraction(path: str, v: float) -> None:
    if not 0 < v <= 1:
        raise ConfigError(f"{path} must be in (0, 1] (a fraction of the run), got {v}")


def _check_positive(path: str, v: float) -> None:
    if not v > 0:
        raise ConfigError(f"{path} must be more than 0, got {v}")


def _check_tolerance(path: str, v: float) -> None:
    if not 0 < v < 1:
        raise ConfigError(f"{path} must be in (0, 1) (a relative error), got {v}")


@dataclass(kw_only=True)
class BudgetConfig:
    metric: str = key(doc="what to reach: rel_bops (the report's relative BOPs), sparsity (fraction of zero "
                          "weights), bits (mean bit-width of the quantized weights), size_bytes (the compact "
                          "export's theoretical size)", choices=(BUDGET_METRICS, "budget metric"))
    target: float | None = key(None, "the value to reach by reach_by and hold to the end (or give milestones)")
    milestones: list[float] = key([], "targets in turn, each held for an epoch and saved as milestone-<value>.th "
                                      "with its export (instead of target)")
    reach_by: float = key(0.8, "fraction of the run by which to be on the (last) target", check=_check_fraction)
    tolerance: float = key(0.1, "relative error that counts as on target (milestones, the final report)",
                           check=_check_tolerance)
    kp: float = key(4.0, "the controller's proportional gain (per unit of log error)", minimum=0)
    ki: float = key(2.0, "the controller's integral gain (per unit of log error x epoch)", minimum=0)
    max_factor: float = key(10.0, "the most the controller multiplies the configured strengths by (its integral "
                                  "stops growing there)", check=_check_positive)

    def validate(self, path: str) -> None:
        if (self.target is None) == (not self.milestones):
            raise ConfigError(f"{path} needs either target or milestones (one of them)")
        targets = self.milestones or [self.target]
        where = f"{path}.milestones" if self.milestones else f"{path}.target"
        for t in targets:
            if self.metric == "rel_bops" and not 0 < t <= 1:
                raise ConfigError(f"{where}: rel_bops must be in (0, 1], got {t}")
            if self.metric == "sparsity" and not 0 < t < 1:
                raise ConfigError(f"{where}: sparsity must be in (0, 1), got {t}")
            if self.metric in ("bits", "size_bytes") and not t > 0:
                raise ConfigError(f"{where}: {self.metric} must be more than 0, got {t}")
        sizes = [1 - t if self.metric == "sparsity" else t for t in targets]
        if any(b >= a for a, b in zip(sizes, sizes[1:])):
            order = "increasing" if self.metric == "sparsity" else "decreasing"
            raise ConfigError(f"{where} must be strictly {order} (each more compressed than the one before), "
                              f"got {targets}")
        if self.kp == 0 and self.ki == 0:
            raise ConfigError(f"{path}: kp and ki are both 0, so the controller would never act")


@dataclass(frozen=True)
class BudgetStrength:
    """A strength a budget scales: ``name`` (its key in the budget's record),
    its configured ``value``, and where it acts -- argument ``key`` of
    ``loss_terms[term]``, or hyper-parameter ``key`` of the optimizer's param
    group ``group``."""

    name: str
    value: float
    key: str
    term: int | None = None
    group: str | None = None


def _default_kwarg(cls, kwargs: dict, name: str):
    """kwargs[name], or the default of cls's argument ``name`` (None: cls has no such argument)."""
    if name in kwargs:
        return kwargs[name]
    try:
        p = inspect.signature(cls).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if p is None or p.default is p.empty else p.default


@dataclass(kw_only=True)
class Config:
    model: str = key(doc="the model: a MODEL_REGISTRY name, or timm/NAME or torchvision/NAME for any timm model or "
                         "torchvision classifier (random init, never downloaded; docs/TRAINING.md#models)",
                     check=_check_model, resume=True)
    model_kwargs: dict = key({}, "extra constructor arguments of the model; for timm/NAME and torchvision/NAME "
                                 "also num_classes (default: the data set's number of classes) and "
                                 "pretrained_path (a local weights file)", resume=True)
    epochs: int = key(doc="training epochs", minimum=1)
    batch_size: int = key(128, "per process (global batch = batch_size x processes); also for validation",
                          minimum=1)
    img_size: int = key(32, "input size: 32 for CIFAR-10, 224 for the ViTs (images are resized)", minimum=1,
                        resume=True)
    device: str = key("cpu", "cpu, cuda, cuda:N or mps", check=_check_device)
    seed: int = key(0, "seeds Python, NumPy, torch and the data order", minimum=0)
    workers: int = key(4, "DataLoader worker processes (0: load in the main process)", minimum=0)
    use_compile: bool = key(False, "wrap the model in torch.compile")
    fused_weights: bool = key(True, "eager mode: every quantized weight and the group lasso in one fused call "
                                    "per step")
    cuda_graph: AutoBool = key(False, "replay each training step as one CUDA graph (auto: wherever it can run)")
    channels_last: AutoBool = key("auto", "feed the network channels_last (NHWC) batches; auto: for models whose "
                                          "Conv2d layers hold most of the weights (ResNets; the parameters stay as "
                                          "they are, docs/TRAINING.md#speed)")
    amp: str = key("none", "autocast the forward pass and the loss: none, bf16, or fp16 (with a gradient scaler); "
                           "the quantizers compute in float32 from float32 weights",
                   choices=(AMP_CHOICES, "amp mode"))
    matmul_precision: str = key("high", "CUDA float32 matmuls and convolutions: high (TF32, as the published "
                                        "trainer) or highest (exact float32)",
                                choices=(MATMUL_PRECISIONS, "matmul_precision"))
    cudnn_benchmark: bool = key(True, "CUDA: cuDNN times its convolution algorithms on the first batches (as the "
                                      "published trainer); false: the same algorithms run after run")
    save_dir: str = key("save_temp", "run directories are created in here")
    run_name: str | None = key(None, "run directory name prefix (default: the config file's stem)",
                               check=_check_run_name)
    lr_scheduler: str = key("cosine", "cosine (T_max = epochs, stepped per epoch) or none (SCHEDULER_REGISTRY)",
                            choices=(SCHEDULER_REGISTRY, "lr_scheduler"), resume=True)
    warmup_epochs: int = key(0, "linear learning-rate warmup before lr_scheduler (cosine or none): epoch i of the "
                                "first N at i/(N+1) of every group's lr; the cosine then spans the other epochs",
                             minimum=0, resume=True)
    wandb_project: str | None = key(None, "log to this Weights & Biases project")
    wandb_mode: str | None = key(None, "online, offline or disabled (env WANDB_MODE wins; default online)",
                                 choices=(WANDB_MODES, "wandb_mode"))
    log_interval: int = key(50, "batches between progress lines (and checks for a non-finite loss)", minimum=1)
    save_best: bool = key(True, "also keep best.th (the highest validation accuracy)")
    distributed: AutoBool = key("auto", "DDP: auto (when torchrun starts more than one process), true or false")
    sync_bn: bool = key(False, "BatchNorm -> SyncBatchNorm under DDP (CUDA only)")
    dist_timeout_min: float = key(30.0, "minutes a process waits in a collective before failing",
                                  check=_check_minutes)
    eval_bobs: bool = key(True, "also log the published trainer's BOPs ratio every epoch, overall and per layer, "
                                "as published_bops (whole pruned output channels; docs/TRAINING.md#relative-bops-"
                                "per-epoch); the paper's relative_bops is logged in every run")
    default_weight_bitrate: int = key(8, "BOPs: the bits of a weight without a quantizer, and of the reference model's "
                                         "weights", minimum=1)
    default_activation_bitrate: int = key(8, "BOPs: the bits of every activation (here and in the reference model)",
                                          minimum=1)
    quantizer: QuantizerConfig | None = key(None, "the quantizer attached to the weights (null: no QAT)", resume=True)
    optimizer: OptimizerConfig = key(doc="the optimizer and its parameter groups")
    loss_terms: list[LossTermConfig] = key([], "terms added to the cross-entropy, each lambda x term(model)")
    dataset: DatasetConfig = key(DatasetConfig, "the data")
    budget: BudgetConfig | None = key(None, "train to a target size: the regulariser strengths follow a controller "
                                            "(docs/TRAINING.md#training-to-a-budget)", resume=True)

    def validate(self, path: str = "") -> None:
        fn = resolve_model(self.model)
        if model_source(fn) is None:
            _check_kwargs("model_kwargs", self.model_kwargs, fn, f"model '{self.model}'",
                          reserved=("num_classes", "img_size"))
        else:
            self._validate_model_by_name(fn)
        if self.cuda_graph is True:  # "auto" turns itself off where graphs cannot run
            if self.use_compile:
                raise ConfigError("cuda_graph and use_compile cannot be combined (torch.compile captures graphs its "
                                  "own way); set one of them to false")
            if len(self.optimizer.types()) > 1:
                raise ConfigError(f"cuda_graph works with one optimizer for every parameter group, but the groups use "
                                  f"{', '.join(sorted(self.optimizer.types()))}; set cuda_graph: auto or false")
            if not graph_capable_class(OPTIMIZER_REGISTRY[self.optimizer.type]):
                raise ConfigError(f"cuda_graph works with torch's Adam, AdamW and SGD (their fused, capturable CUDA "
                                  f"steps), not '{self.optimizer.type}'; set cuda_graph: auto or false")
            if self.amp == "fp16":
                raise ConfigError("cuda_graph does not work with amp: fp16 (its gradient scaler reads the gradients "
                                  "on the host every step); use amp: bf16 (no scaler) or cuda_graph: auto or false")
            if self.budget is not None:
                raise ConfigError("cuda_graph keeps the regulariser strengths it was captured with, and a budget "
                                  "changes them during the run; set cuda_graph: auto (off under a budget) or false")
        if self.warmup_epochs:
            if self.lr_scheduler not in WARMUP_SCHEDULERS:
                raise ConfigError(f"warmup_epochs works with lr_scheduler {' or '.join(WARMUP_SCHEDULERS)}, not "
                                  f"'{self.lr_scheduler}'; set warmup_epochs: 0 (a scheduler of your own can warm up "
                                  "itself)")
            if self.warmup_epochs >= self.epochs:
                raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs})")
        if self.budget is not None:
            self._validate_budget()

    def _validate_model_by_name(self, fn) -> None:
        """timm/<name>, torchvision/<name>: model_kwargs go to timm / torchvision (unchecked, bar
        check_model_kwargs); num_classes defaults to the data set's (written into model_kwargs, so the
        saved config, checkpoints and exports rebuild the same model)."""
        check_model_kwargs(fn, self.model, self.model_kwargs)
        n_data = getattr(DATASET_REGISTRY[self.dataset.name], "num_classes", None)
        n = self.model_kwargs.get("num_classes")
        if n is None:
            if n_data is None:
                raise ConfigError(f"model '{self.model}' needs model_kwargs.num_classes: the number of classes of "
                                  f"dataset '{self.dataset.name}' depends on its data (e.g. its class folders)")
            self.model_kwargs["num_classes"] = n_data
        elif n_data is not None and n < n_data:
            raise ConfigError(f"model_kwargs.num_classes is {n} but dataset '{self.dataset.name}' has {n_data} "
                              "classes; leave it unset for the data set's number")

    def _quantizer_arg(self, name: str):
        """The quantizer's constructor argument ``name`` as this config sets it
        (its kwargs, else the default; None: no quantizer or no such argument)."""
        q = self.quantizer
        return _default_kwarg(QUANTIZER_REGISTRY[q.name], q.kwargs, name) if q is not None else None

    def budget_strengths(self) -> list[BudgetStrength]:
        """The regulariser strengths a budget scales (see codeq/train/budget.py),
        those configured above 0, for this config's metric."""
        b = self.budget
        use_dz = bool(self._quantizer_arg("learnable_deadzone")) and b.metric != "bits"
        use_bit = bool(self._quantizer_arg("learnable_bit")) and b.metric != "sparsity"
        groups = self.optimizer.param_groups
        out = []
        for kind, on in (("dz", use_dz), ("bit", use_bit)):
            if not on:
                continue
            g = getattr(groups, kind) or groups.base
            if g.weight_decay > 0:
                out.append(BudgetStrength(f"optimizer.param_groups.{kind}.weight_decay", g.weight_decay,
                                          "weight_decay", group=kind))
            arg = f"lambda_{kind}"
            for i, t in enumerate(self.loss_terms):
                lam = float(_default_kwarg(LOSS_REGISTRY[t.name], t.kwargs, arg)) if t.name == "theta_l2" else 0.0
                if lam > 0 and t.lam > 0:
                    out.append(BudgetStrength(f"loss_terms.{i}.kwargs.{arg}", lam, arg, term=i))
        return out

    def _validate_budget(self) -> None:
        b = self.budget
        q = self.quantizer
        if self._quantizer_arg("learnable_deadzone") is None:
            raise ConfigError(f"budget needs the deadzone quantizer (its learned dead zone and bit-width are what a "
                              f"budget steers), but the quantizer is {q.name if q else 'null'}")
        learnable_bit = bool(self._quantizer_arg("learnable_bit"))
        learnable_dz = bool(self._quantizer_arg("learnable_deadzone"))
        if b.metric == "bits":
            if not learnable_bit:
                raise ConfigError("budget.metric bits needs learnable bit-widths (quantizer.kwargs.learnable_bit: "
                                  "true); with fixed bit-widths the mean bit-width cannot move")
            lo = float(self._quantizer_arg("min_bits"))
            hi = float(self._quantizer_arg("max_bits"))
            for t in b.milestones or [b.target]:
                if not lo <= t <= hi:
                    raise ConfigError(f"budget: a bits target must be within the quantizer's min_bits..max_bits "
                                      f"({lo:g}..{hi:g}), got {t}")
        elif not learnable_dz and not (learnable_bit and b.metric != "sparsity"):
            raise ConfigError(f"budget.metric {b.metric} needs a learnable dead zone (quantizer.kwargs."
                              "learnable_deadzone: true)")
        if not self.budget_strengths():
            kind = "bit" if b.metric == "bits" else "dz"
            raise ConfigError(f"budget: nothing to steer; set optimizer.param_groups.{kind}.weight_decay or a "
                              f"theta_l2 term's lambda_{kind} above 0 (the controller scales the configured "
                              "strength)")


# ------------------------------------------------- derived from the schema --
def _fields(cls):
    """(dataclass field, YAML key, resolved type) of each key of a section."""
    hints = typing.get_type_hints(cls, globals())
    return [(f, f.metadata.get("name") or f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _optional(tp) -> tuple[Any, bool]:
    """(tp without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    return tp, False


def _words(tp, optional: bool) -> str:
    if tp == AutoBool:
        w = "auto, true or false"
    elif dataclasses.is_dataclass(tp) or tp is dict:
        w = "a mapping"
    else:
        w = {str: "a string", int: "an integer", float: "a number", bool: "true/false (or 1/0)",
             list[str]: "a list of strings"}.get(tp, "a list")
    return w + (" or null" if optional else "")


def _parse(path: str, v: Any, tp) -> Any:
    """v checked against the type tp (and converted: 0/1 to bool, int to float,
    a string to a one-string list, mappings to sections)."""
    tp, optional = _optional(tp)
    if v is None and optional:
        return None
    ok = True
    if tp == AutoBool:
        if isinstance(v, str) and v.strip().lower() == "auto":
            v = "auto"
        elif isinstance(v, int) and v in (0, 1):
            v = bool(v)
        else:
            ok = False
    elif tp is bool:
        ok = isinstance(v, int) and v in (0, 1)
        v = bool(v) if ok else v
    elif tp is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif tp is float:  # finite: no key means anything by inf or nan (a run would only diverge)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        v = float(v) if ok else v
        if ok and not math.isfinite(v):
            raise ConfigError(f"{path} must be a finite number, got {v}")
    elif tp is str:
        ok = isinstance(v, str)
    elif tp is dict:
        ok = isinstance(v, dict)
    elif tp == list[str]:
        v = [v] if isinstance(v, str) else v
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if v is None:
            v = []
        if not isinstance(v, list):
            ok = False
        else:
            return [_parse(f"{path}[{i}]", x, item) for i, x in enumerate(v)]
    elif dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise ConfigError(f"{path} must be a mapping, got {_typename(v)} {v!r}")
        return _section(path, v, tp)
    if not ok:
        raise ConfigError(f"{path} must be {_words(tp, optional)}, got {_typename(v)} {v!r}")
    return v


def _section(path: str, d: dict, cls):
    """A mapping read into the section ``cls``: each key parsed and checked, the
    defaults filled in, then the section's own ``validate``."""
    fields = _fields(cls)
    known = [name for f, name, _ in fields if not f.metadata["rest"]]
    rest = next((f for f, _, _ in fields if f.metadata["rest"]), None)
    where = f" of {path}" if path else ""
    values = {}
    if rest is None:
        for k in d:
            if k not in known:
                raise ConfigError(f"unknown key '{path + '.' if path else ''}{k}'{_suggest(k, known)} "
                                  f"(valid keys{where}: {', '.join(known)})")
    else:
        values[rest.name] = {k: v for k, v in d.items() if k not in known}
    for f, name, tp in fields:
        if f.metadata["rest"]:
            continue
        p = f"{path}.{name}" if path else name
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if name in d and not (d[name] is None and has_default):  # null: the default
            v = _parse(p, d[name], tp)
        elif has_default:
            v = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        else:
            raise ConfigError(f"missing required key '{p}'")
        _check(p, v, f.metadata)
        values[f.name] = v
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def _check(path: str, v: Any, meta) -> None:
    if v is None:
        return
    if meta["minimum"] is not None and v < meta["minimum"]:
        raise ConfigError(f"{path} must be at least {meta['minimum']:g}, got {v}")
    if meta["choices"] is not None:
        choices, what = meta["choices"]
        if v not in choices:
            raise ConfigError(f"unknown {what} '{v}' ({path}){_suggest(v, choices)} "
                              f"(choose one of: {', '.join(sorted(choices))})")
    if meta["check"] is not None:
        meta["check"](path, v)


def config_from_dict(d: dict) -> Config:
    """Validate a raw config mapping (as read from YAML) into a :class:`Config`.

    Raises :class:`ConfigError` with a one-line message on the first problem.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"the config must be a mapping of keys to values, got {_typename(d)}")
    return _section("", d, Config)


def _to_plain(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f, name, _ in _fields(type(obj)):
            v = _to_plain(getattr(obj, f.name))
            if f.metadata["rest"]:
                out.update(v)
            else:
                out[name] = v
        return out
    if isinstance(obj, list):
        return [_to_plain(x) for x in obj]
    return copy.deepcopy(obj)


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as a plain dict of builtins, in the YAML schema
    (``config_from_dict(config_to_dict(cfg)) == cfg``)."""
    return _to_plain(cfg)


def resume_keys(cls=Config, prefix: str = "") -> list[str]:
    """The dotted keys that must equal the checkpoint's for ``--resume``."""
    out = []
    for f, name, tp in _fields(cls):
        path = f"{prefix}{name}"
        if f.metadata["resume"]:
            out.append(path)
        elif dataclasses.is_dataclass(_optional(tp)[0]):
            out += resume_keys(_optional(tp)[0], path + ".")
    return out


def _get(d: dict, dotted: str):
    for p in dotted.split("."):
        d = d.get(p) if isinstance(d, dict) else None
    return d


def check_resume_compatible(ckpt_config: dict, cfg: Config, path: str = "the checkpoint") -> None:
    """ConfigError unless the checkpoint's config has this config's values of :func:`resume_keys`."""
    cur = config_to_dict(cfg)
    for k in resume_keys():
        old, new = _get(ckpt_config, k), _get(cur, k)
        if k == "model_kwargs":
            old, new = old or {}, new or {}
        if old != new:
            raise ConfigError(f"cannot resume from {path}: {k} is {new!r} in the config but {old!r} in the "
                              "checkpoint; resume with the config the checkpoint was trained with")


def _default_text(f) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "*required*"
    v = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(v):
        return "its keys' defaults"
    return "`" + (yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()) + "`"


def _type_text(tp) -> str:
    tp, optional = _optional(tp)
    if tp == AutoBool:
        t = "auto / bool"
    elif dataclasses.is_dataclass(tp):
        t = "mapping"
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        t = "list of mappings" if dataclasses.is_dataclass(item) else f"list of {item.__name__}"
    else:
        t = {dict: "mapping", float: "number"}.get(tp, getattr(tp, "__name__", str(tp)))
    return t + (" or null" if optional else "")


def _rows(cls, prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) of every key of a section and its sub-sections; a
    sub-section of the same kind as one before it (the dz and bit parameter groups,
    like base) is one row."""
    rows, expanded = [], set()
    for f, name, tp in _fields(cls):
        doc = f.metadata["doc"] + (" (must match to resume)" if f.metadata["resume"] else "")
        if f.metadata["rest"]:
            rows.append((f"{prefix}*", "any", "", doc))
            continue
        path = f"{prefix}{name}"
        inner = _optional(tp)[0]
        item = typing.get_args(inner)[0] if typing.get_origin(inner) is list else None
        rows.append((path, _type_text(tp), _default_text(f), doc))
        if dataclasses.is_dataclass(inner) and inner not in expanded:
            expanded.add(inner)
            rows += _rows(inner, path + ".")
        elif item is not None and dataclasses.is_dataclass(item):
            rows += _rows(item, path + "[].")
    return rows


def markdown_table() -> str:
    """The reference table of every config key (docs/TRAINING.md holds it)."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | {d} | {doc} |" for k, t, d, doc in _rows(Config, "")]
    return "\n".join(lines)


TABLE_START, TABLE_END = "<!-- config table: made by `make docs` from codeq/train/config.py -->", "<!-- end of config table -->"


def write_markdown_table(path: str) -> None:
    """Replace the text between the markers of ``path`` with :func:`markdown_table`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, sep, rest = text.partition(TABLE_START)
    _, sep2, tail = rest.partition(TABLE_END)
    if not sep or not sep2:
        raise ValueError(f"{path} has no config table markers")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{TABLE_START}\n{markdown_table()}\n{TABLE_END}{tail}")


# -------------------------------------------------------------- YAML + CLI --
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.2; PyYAML's YAML
    1.1 resolver needs a dot, ``1.0e-3``, and would give the string "1e-3")."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text):
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            d = parse_yaml(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {_typename(d)}")
    return d


def apply_overrides(d: dict, overrides) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a
    copy of the raw config mapping.  List items are addressed by index
    (``loss_terms.0.lambda=0.5``)."""
    d = copy.deepcopy(d)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        k, raw = item.split("=", 1)
        k = k.strip()
        parts = k.split(".")
        if not k or any(not p for p in parts):
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = d
        for i, p in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = node[_index(where, p, node)]
                continue
            if p not in node or node[p] is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {k}: '{where}' is {_typename(node)} {node!r}, not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(k, last, node)] = value
        else:
            node[last] = value
    return d


def _index(where: str, p: str, node: list) -> int:
    if not p.isdigit() or int(p) >= len(node):
        raise ConfigError(f"--set: '{where}' must be an index below {len(node)} of the list")
    return int(p)


def load_config(path: str, overrides=(), device: str | None = None) -> Config:
    """Read, override (``--set``), apply ``--device`` and validate a YAML config."""
    d = apply_overrides(load_yaml(path), overrides)
    if device is not None:
        d["device"] = device
    return config_from_dict(d)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("# resolved config of this run (defaults filled in, overrides applied)\n")
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
