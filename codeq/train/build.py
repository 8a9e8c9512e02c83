"""Registries of models, optimizers, LR schedulers and data sets, and the
builders the trainer (and ``python -m codeq.report``) use.

Quantizers and loss terms live in :mod:`codeq.registry`.  Adding an entry here
is one decorator or one dict line::

    @register_model("lenet")
    def lenet(num_classes=10, img_size=32, width=6): ...

    OPTIMIZER_REGISTRY["rmsprop"] = torch.optim.RMSprop
    SCHEDULER_REGISTRY["step"] = lambda opt, cfg: torch.optim.lr_scheduler.StepLR(opt, step_size=30)
    DATASET_REGISTRY["mydata"] = my_builder   # fn(cfg) -> (train_dataset, val_dataset)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from codeq.train import data as _data
from codeq.train.config import Config, ConfigError
from codeq.train.optim import lean_class

__all__ = [
    "MODEL_REGISTRY",
    "OPTIMIZER_REGISTRY",
    "SCHEDULER_REGISTRY",
    "DATASET_REGISTRY",
    "register_model",
    "register_dataset",
    "build_model",
    "example_input",
    "build_optimizer",
    "build_scheduler",
    "build_datasets",
    "split_param_groups",
    "ResNet20",
    "MLP",
    "load_pretrained",
    "model_num_classes",
]

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: ``fn(num_classes=10, img_size=32, **model_kwargs) -> nn.Module``."""

    def deco(fn):
        MODEL_REGISTRY[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------ models --
class _ShortcutA(nn.Module):
    """Option-A shortcut of the CIFAR ResNets (He et al. 2016): subsample by 2
    and zero-pad the new channels; no parameters."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            if (planes - in_planes) % 2:
                raise ValueError(f"option-A shortcut needs an even channel increase, got {in_planes}->{planes}")
            self.shortcut = _ShortcutA((planes - in_planes) // 2)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: 3 stages of 3 basic blocks (16, 32, 64 channels),
    option-A (zero-pad) shortcuts, global average pooling, one linear layer."""

    def __init__(self, num_classes: int = 10, num_blocks=(3, 3, 3), width: int = 16, in_channels: int = 3):
        super().__init__()
        if len(num_blocks) != 3 or any(int(n) < 1 for n in num_blocks):
            raise ValueError(f"num_blocks must be three positive integers, got {num_blocks!r}")
        if int(width) < 2 or int(width) % 2:
            raise ValueError(f"width must be an even integer >= 2, got {width!r}")
        w = int(width)
        self.conv1 = nn.Conv2d(in_channels, w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.in_planes = w
        self.layer1 = self._stage(w, int(num_blocks[0]), 1)
        self.layer2 = self._stage(2 * w, int(num_blocks[1]), 2)
        self.layer3 = self._stage(4 * w, int(num_blocks[2]), 2)
        self.linear = nn.Linear(4 * w, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class MLP(nn.Module):
    """Flatten, then Linear layers with ReLU between: 3072 -> 120 -> 84 -> 10 by default."""

    def __init__(self, in_features: int = 3072, hidden=(120, 84), num_classes: int = 10):
        super().__init__()
        sizes = [int(in_features)] + [int(h) for h in hidden] + [int(num_classes)]
        if any(s < 1 for s in sizes):
            raise ValueError(f"hidden sizes must be positive, got {list(hidden)!r}")
        layers: list = [("flatten", nn.Flatten())]
        for i in range(len(sizes) - 1):
            layers.append((f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1])))
            if i < len(sizes) - 2:
                layers.append((f"relu{i + 1}", nn.ReLU()))
        self.net = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.net(x)


@register_model("resnet20")
def resnet20(num_classes: int = 10, img_size: int = 32, num_blocks=(3, 3, 3), width: int = 16) -> nn.Module:
    return ResNet20(num_classes=num_classes, num_blocks=tuple(num_blocks), width=width)


@register_model("mlp")
def mlp(num_classes: int = 10, img_size: int = 32, hidden=(120, 84)) -> nn.Module:
    return MLP(in_features=3 * img_size * img_size, hidden=tuple(hidden), num_classes=num_classes)


@register_model("vit")
def vit(num_classes: int = 10, img_size: int = 224, **timm_kwargs) -> nn.Module:
    """timm ``vit_tiny_patch16_224`` (random init, never downloads); extra keys
    (``depth``, ``embed_dim``, ``num_heads``, ``patch_size``, ...) go to timm."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=img_size, **timm_kwargs
    )


@register_model("tiny_vit")
def tiny_vit(num_classes: int = 10, img_size: int = 224, **timm_kwargs) -> nn.Module:
    """timm ``tiny_vit_5m_224`` (TinyViT-5M, random init, never downloads), the
    paper's ViT.  Built for 224x224 inputs (timm's TinyViT has no img_size
    argument; its attention windows are fixed); extra keys go to timm."""
    import timm

    if img_size != 224:
        raise ValueError(f"tiny_vit_5m_224 takes 224x224 inputs; set img_size: 224 (got {img_size})")

    return timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=num_classes, **timm_kwargs)


def load_pretrained(model: nn.Module, path: str, what: str) -> nn.Module:
    """Load a local state dict file into ``model`` (never downloads): a plain
    state dict, or a dict holding one under "state_dict" or "model"; a
    "module." prefix (DDP) is stripped.  ConfigError for a missing, unreadable
    or non-matching file."""
    import os

    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise ConfigError(
            f"model_kwargs.pretrained_path: weights file not found: {path} (it is never downloaded; save the "
            f"ImageNet weights of {what} there, or set model_kwargs.pretrained_path: null for a random init)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model_kwargs.pretrained_path: cannot read {path} as a weights-only torch file: {first}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"model_kwargs.pretrained_path: {path} is not a state dict (a mapping of names to tensors, "
            "or a dict holding one under 'state_dict' or 'model')"
        )
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    try:
        model.load_state_dict(obj, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ConfigError(f"model_kwargs.pretrained_path: {path} does not fit {what}: {first}") from None
    return model


def _torchvision_resnet(arch: str, num_classes: int, pretrained_path) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path, f"torchvision {arch} with {num_classes} classes")
    return model


@register_model("resnet18")
def resnet18(num_classes: int = 1000, img_size: int = 224, pretrained_path: str | None = None) -> nn.Module:
    """torchvision ``resnet18`` (ImageNet layout, 1000 classes); ``pretrained_path``
    names a local weights file to start from (never downloaded)."""
    return _torchvision_resnet("resnet18", num_classes, pretrained_path)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, img_size: int = 224, pretrained_path: str | None = None) -> nn.Module:
    """torchvision ``resnet50`` (ImageNet layout, 1000 classes); ``pretrained_path``
    names a local weights file to start from (never downloaded)."""
    return _torchvision_resnet("resnet50", num_classes, pretrained_path)


def model_num_classes(fn) -> int:
    """The number of classes a registered model is built with: the default of
    its ``num_classes`` argument (1000 for the ImageNet models), else 10."""
    import inspect

    try:
        default = inspect.signature(fn).parameters["num_classes"].default
    except (KeyError, TypeError, ValueError):
        return 10
    return default if isinstance(default, int) and not isinstance(default, bool) else 10


# ------------------------------------------------------ optimizers, scheds --
OPTIMIZER_REGISTRY: dict[str, type] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}

SCHEDULER_REGISTRY: dict[str, Callable] = {
    "cosine": lambda opt, cfg: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs),
    "none": lambda opt, cfg: None,
}

# name -> fn(cfg) -> (train_dataset, val_dataset); see codeq.train.data.
DATASET_REGISTRY: dict[str, Callable] = {
    "cifar10": _data.build_cifar10,
    "synthetic": _data.build_synthetic,
    "imagefolder": _data.build_imagefolder,
}


def register_dataset(name: str):
    def deco(fn):
        DATASET_REGISTRY[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------- builders --
def build_model(cfg: Config) -> nn.Module:
    """The model of ``cfg`` on the CPU, with quantizers attached per
    ``cfg.quantizer`` (none when it is absent).  Seed before calling for a
    reproducible initialisation."""
    from codeq.parametrize import attach_weight_quantizers

    fn = MODEL_REGISTRY[cfg.model]
    try:
        model = fn(num_classes=model_num_classes(fn), img_size=cfg.img_size, **cfg.model_kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ConfigError(f"cannot build model '{cfg.model}' with model_kwargs {cfg.model_kwargs}: {exc}") from None
    if cfg.quantizer is not None:
        try:
            attach_weight_quantizers(
                model,
                exclude_layers=cfg.quantizer.exclude_layers,
                quantizer=cfg.quantizer.name,
                quantizer_kwargs=cfg.quantizer.kwargs,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot build quantizer '{cfg.quantizer.name}' with kwargs {cfg.quantizer.kwargs}: {exc}") from None
    return model


def example_input(cfg: Config, batch_size: int = 1) -> torch.Tensor:
    """A batch of the shape the model takes: ``batch_size x 3 x img_size x img_size``
    (normalised-image-like values, fixed seed, CPU)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, cfg.img_size, cfg.img_size, generator=g)


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


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer with up to three param groups named base / dz / bit (in
    that order, empty ones left out).  dz and bit take base's hyper-parameters
    when the YAML has no group of their own."""
    cls = OPTIMIZER_REGISTRY[cfg.optimizer.type]
    split = split_param_groups(model)
    groups = []
    for name in ("base", "dz", "bit"):
        if not split[name]:
            continue
        gcfg = getattr(cfg.optimizer, name) or cfg.optimizer.base
        groups.append({"params": [p for _, p in split[name]], "name": name, **gcfg.hparams()})
    if not groups:
        raise ConfigError(f"model '{cfg.model}' has no trainable parameters")
    extra = {}
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    if cfg.cuda_graph is True or (cfg.cuda_graph == "auto" and on_cuda and graph_capable(cfg, cls)):
        # One CUDA graph replays the whole step (codeq/train/graph.py): the fused
        # step kernels, with Adam's step counters on the device (capturable).
        if not graph_capable(cfg, cls):
            raise ConfigError(f"cuda_graph needs a torch Adam, AdamW or SGD optimizer; "
                              f"'{cfg.optimizer.type}' is {cls!r}; set cuda_graph: auto or false")
        if not any(k in g for g in groups for k in ("fused", "foreach")):
            extra["fused"] = True
        if issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
            extra["capturable"] = True
    elif _wants_fused(cls, groups):
        # One fused kernel for all parameters instead of a Python loop per tensor:
        # QAT adds two scalar logits per layer, which the per-tensor loop pays for;
        # and torch's per-group Python trimmed (codeq/train/optim.py).
        extra["fused"] = True
        cls = lean_class(cls)
    try:
        return cls(groups, **extra)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build optimizer '{cfg.optimizer.type}': {exc}") from None


_FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def graph_capable(cfg: Config, cls=None) -> bool:
    """Whether this config's optimizer and mode allow ``cuda_graph`` (torch's Adam,
    AdamW or SGD, whose fused steps capture; not under ``use_compile``)."""
    cls = OPTIMIZER_REGISTRY.get(cfg.optimizer.type) if cls is None else cls
    return (not cfg.use_compile) and isinstance(cls, type) and issubclass(cls, _FUSED_OPTIMIZERS)


def _wants_fused(cls, groups) -> bool:
    """Use the fused implementation of Adam/AdamW/SGD when the user chose no
    implementation (``fused``/``foreach``) and every parameter is a float
    tensor on the CPU or a CUDA device (where torch has fused kernels)."""
    if not (isinstance(cls, type) and issubclass(cls, _FUSED_OPTIMIZERS)):
        return False
    if any(k in g for g in groups for k in ("fused", "foreach", "differentiable", "capturable")):
        return False
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_scheduler(cfg: Config, optimizer):
    return SCHEDULER_REGISTRY[cfg.lr_scheduler](optimizer, cfg)


def build_datasets(cfg: Config):
    """(train, val) data sets of ``cfg.dataset`` (raises ConfigError when missing)."""
    return DATASET_REGISTRY[cfg.dataset.name](cfg)
