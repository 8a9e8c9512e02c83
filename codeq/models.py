"""The models of the registry (CIFAR ResNet-20, an MLP, timm's ViT-Tiny and
TinyViT-5M, torchvision's ResNet-18/50), and :func:`build_model`, which builds
one by name with quantizers attached: what the trainer, ``codeq.report`` and
``codeq.export`` build a model with.

Adding a model is one decorator::

    @register_model("lenet")
    def lenet(num_classes=10, img_size=32, width=6): ...

``num_classes`` is the default of the function's own ``num_classes`` argument
(1000 for the ImageNet models, 10 otherwise); ``img_size`` is the config's.
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from codeq.errors import ConfigError
from codeq.parametrize import attach_weight_quantizers
from codeq.registry import MODEL_REGISTRY, register_model

__all__ = ["ResNet20", "MLP", "build_model", "example_input", "load_pretrained", "model_num_classes"]


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
    try:
        default = inspect.signature(fn).parameters["num_classes"].default
    except (KeyError, TypeError, ValueError):
        return 10
    return default if isinstance(default, int) and not isinstance(default, bool) else 10


def build_model(name: str, img_size: int = 32, model_kwargs: dict | None = None, quantizer: dict | None = None) -> nn.Module:
    """The registered model ``name`` on the CPU, built for ``img_size`` inputs
    with ``model_kwargs``, and quantizers attached per ``quantizer`` (a mapping
    with ``name``, ``kwargs`` and ``exclude_layers``, as the config's
    ``quantizer`` section; none when it is None).  ConfigError when it cannot
    be built.  Seed before calling for a reproducible initialisation."""
    fn = MODEL_REGISTRY.get(name)
    if fn is None:
        raise ConfigError(f"unknown model {name!r} (choose one of: {', '.join(sorted(MODEL_REGISTRY))})")
    model_kwargs = dict(model_kwargs or {})
    try:
        model = fn(num_classes=model_num_classes(fn), img_size=img_size, **model_kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ConfigError(f"cannot build model '{name}' with model_kwargs {model_kwargs}: {exc}") from None
    if quantizer is not None:
        kwargs = dict(quantizer.get("kwargs") or {})
        try:
            attach_weight_quantizers(model, exclude_layers=quantizer.get("exclude_layers") or [],
                                     quantizer=quantizer["name"], quantizer_kwargs=kwargs)
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot build quantizer '{quantizer.get('name')}' with kwargs {kwargs}: {exc}") from None
    return model


def example_input(img_size: int, batch_size: int = 1) -> torch.Tensor:
    """A batch of the shape the models take: ``batch_size x 3 x img_size x
    img_size`` (normalised-image-like values, fixed seed, CPU)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, img_size, img_size, generator=g)
