"""The models of the registry (CIFAR ResNet-20, an MLP, timm's ViT-Tiny and
TinyViT-5M, torchvision's ResNet-18/50), any timm or torchvision classifier by
name (``timm/<arch>``, ``torchvision/<arch>``; :func:`resolve_model`), and
:func:`build_model`, which builds one by name with quantizers attached: what
the trainer, ``codeq.report`` and ``codeq.export`` build a model with.

Adding a model is one decorator::

    @register_model("lenet")
    def lenet(num_classes=10, img_size=32, width=6): ...

``num_classes`` is the default of the function's own ``num_classes`` argument
(1000 for the ImageNet models, 10 otherwise); ``img_size`` is the config's.

A model by name needs no registration: ``timm/resnet10t`` is
``timm.create_model("resnet10t", pretrained=False, ...)`` and
``torchvision/mobilenet_v3_small`` is
``torchvision.models.get_model("mobilenet_v3_small", weights=None, ...)``
(never a download), built with ``model_kwargs`` (its ``num_classes`` included:
the trainer's config sets it from the data set) and, given
``model_kwargs.pretrained_path``, a local state dict loaded into it.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from codeq.errors import ConfigError
from codeq.parametrize import attach_weight_quantizers
from codeq.registry import MODEL_REGISTRY, register_model

__all__ = ["ResNet20", "MLP", "MODEL_SOURCES", "build_model", "example_input", "load_pretrained", "model_num_classes",
           "check_model_kwargs", "model_source", "resolve_model"]


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


# ------------------------------------------------------- models by name --
MODEL_SOURCES = ("timm", "torchvision")  # the prefixes of a model by name: timm/<arch>, torchvision/<arch>

# model_kwargs that would download weights: codeq builds every model from a random init (or a local file)
_DOWNLOAD_KWARGS = {"timm": ("pretrained",), "torchvision": ("weights",)}


def _did_you_mean(word: str, names) -> str:
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _timm_builder(arch: str):
    def build(num_classes: int = 10, img_size: int = 224, pretrained_path: str | None = None, **kwargs) -> nn.Module:
        import timm

        # img_size only where the model takes it (the ViTs do; ResNets, ConvNeXts, TinyViT ... do not)
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
        if pretrained_path is not None:
            load_pretrained(model, pretrained_path, f"timm {arch} with {num_classes} classes")
        return model

    return build


def _torchvision_builder(arch: str):
    def build(num_classes: int = 10, img_size: int = 224, pretrained_path: str | None = None, **kwargs) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        if pretrained_path is not None:
            load_pretrained(model, pretrained_path, f"torchvision {arch} with {num_classes} classes")
        return model

    return build


def _timm_archs() -> tuple:
    """(is_model(arch), names()) of timm's models."""
    import timm

    return timm.is_model, timm.list_models


def _torchvision_archs() -> tuple:
    """(is_model(arch), names()) of torchvision's image classifiers."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return names.__contains__, lambda: names


def _is_torchvision_model(arch: str) -> bool:
    """Any torchvision model (detection, segmentation, video, ... included)."""
    import torchvision

    return arch in torchvision.models.list_models()


def resolve_model(name: str):
    """The builder ``fn(num_classes=..., img_size=..., **model_kwargs) -> nn.Module``
    of the model ``name``: a registered name gives its MODEL_REGISTRY function;
    ``timm/<arch>`` and ``torchvision/<arch>`` a builder of that timm model
    (``timm.create_model(arch, pretrained=False, ...)``, with ``img_size``
    where the model takes it) or torchvision image classifier
    (``torchvision.models.get_model(arch, weights=None, ...)``) that loads
    ``pretrained_path`` (a local state dict) when given; never a download.
    Such a builder has the attributes ``source`` ("timm" or "torchvision") and
    ``arch``.  ConfigError (one line) for an unknown name."""
    fn = MODEL_REGISTRY.get(name) if isinstance(name, str) else None
    if fn is not None:
        return fn
    prefix, slash, arch = str(name).partition("/")
    if not slash:
        raise ConfigError(f"unknown model '{name}'{_did_you_mean(str(name), MODEL_REGISTRY)} (choose one of: "
                          f"{', '.join(sorted(MODEL_REGISTRY))}; or timm/<name>, torchvision/<name> for any timm "
                          "model or torchvision classifier)")
    if prefix not in MODEL_SOURCES:
        raise ConfigError(f"unknown model '{name}': '{prefix}/' is not a model source{_did_you_mean(prefix, MODEL_SOURCES)} "
                          "(timm/<name> or torchvision/<name>, or a registered name: "
                          f"{', '.join(sorted(MODEL_REGISTRY))})")
    if not arch:
        raise ConfigError(f"model '{name}' names no architecture: write {prefix}/<name>, e.g. "
                          f"{'timm/resnet10t' if prefix == 'timm' else 'torchvision/mobilenet_v3_small'}")
    if prefix == "timm":
        known, names = _timm_archs()
        listing = "timm.list_models() lists them"
    else:
        known, names = _torchvision_archs()
        listing = "torchvision.models.list_models(torchvision.models) lists the classifiers"
    if not known(arch):
        if prefix == "torchvision" and _is_torchvision_model(arch):
            raise ConfigError(f"torchvision model '{arch}' is not an image classifier (codeq trains classifiers; "
                              f"{listing}){_did_you_mean(arch, names())}")
        raise ConfigError(f"unknown {prefix} model '{arch}' ({listing}){_did_you_mean(arch, names())}")
    build = _timm_builder(arch) if prefix == "timm" else _torchvision_builder(arch)
    build.source, build.arch = prefix, arch
    build.__name__ = build.__qualname__ = f"{prefix}/{arch}"
    return build


def model_source(fn) -> str | None:
    """"timm" or "torchvision" for a builder of a model by name (:func:`resolve_model`), else None."""
    return getattr(fn, "source", None)


def check_model_kwargs(fn, name: str, model_kwargs: dict) -> None:
    """ConfigError (one line) for ``model_kwargs`` a model by name cannot take:
    keys that are not strings, ``img_size`` (the config's), a ``num_classes``
    that is not a positive integer, and what would download weights (timm's
    ``pretrained``, torchvision's ``weights``).  Its other keys go to timm or
    torchvision unchecked.  Nothing to check for a registered model (the
    trainer's config checks those against the function's arguments)."""
    source = model_source(fn)
    if source is None:
        return
    if not isinstance(model_kwargs, dict):
        raise ConfigError(f"model_kwargs of model '{name}' must be a mapping, got {type(model_kwargs).__name__}")
    for k, v in model_kwargs.items():
        if not isinstance(k, str):
            raise ConfigError(f"model_kwargs of model '{name}': key {k!r} is not a name")
        if k == "img_size":
            raise ConfigError("'model_kwargs.img_size' cannot be set there: the trainer passes img_size itself "
                              "(set the config's img_size)")
        if k in _DOWNLOAD_KWARGS[source]:
            raise ConfigError(f"model_kwargs.{k} cannot be set for model '{name}': codeq never downloads weights; "
                              "give a local state dict file as model_kwargs.pretrained_path instead")
        if k == "num_classes" and v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"model_kwargs.num_classes must be a positive integer, got {v!r}")


def model_num_classes(fn, model_kwargs: dict | None = None) -> int:
    """The number of classes a model is built with.  A registered model: the
    default of its ``num_classes`` argument (1000 for the ImageNet models),
    else 10.  A model by name: ``model_kwargs["num_classes"]`` (the trainer's
    config sets it from the data set), else 10."""
    if model_source(fn) is not None and (model_kwargs or {}).get("num_classes") is not None:
        return model_kwargs["num_classes"]
    try:
        default = inspect.signature(fn).parameters["num_classes"].default
    except (KeyError, TypeError, ValueError):
        return 10
    return default if isinstance(default, int) and not isinstance(default, bool) else 10


def build_model(name: str, img_size: int = 32, model_kwargs: dict | None = None, quantizer: dict | None = None) -> nn.Module:
    """The model ``name`` (a registered name, ``timm/<arch>`` or
    ``torchvision/<arch>``: :func:`resolve_model`) on the CPU, built for
    ``img_size`` inputs with ``model_kwargs``, and quantizers attached per
    ``quantizer`` (a mapping with ``name``, ``kwargs`` and ``exclude_layers``,
    as the config's ``quantizer`` section; none when it is None).  A
    registered model gets the default of its ``num_classes`` argument; a model
    by name ``model_kwargs["num_classes"]`` (10 without it).  ConfigError when
    it cannot be built.  Seed before calling for a reproducible
    initialisation."""
    fn = resolve_model(name)
    model_kwargs = dict(model_kwargs or {})
    source = model_source(fn)
    if source is not None:
        check_model_kwargs(fn, name, model_kwargs)
    try:
        if source is None:
            model = fn(num_classes=model_num_classes(fn), img_size=img_size, **model_kwargs)
        else:
            model = fn(img_size=img_size, **model_kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"cannot build model '{name}' with model_kwargs {model_kwargs}: {first}") from None
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
