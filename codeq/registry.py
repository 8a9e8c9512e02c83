"""The registries: names a YAML config may use, and what they build.

A leaf module: it imports nothing of codeq.  Quantizers, loss terms, models,
data sets, optimizers and LR schedulers register into it where they are
defined (``codeq/quantizers.py``, ``codeq/losses.py``, ``codeq/models.py``,
``codeq/train/data.py``, ``codeq/train/optim.py``); adding an entry is one
decorator::

    @register_model("lenet")
    def lenet(num_classes=10, img_size=32, width=6): ...

or one assignment (``OPTIMIZER_REGISTRY["rmsprop"] = torch.optim.RMSprop``).
"""

from __future__ import annotations

from typing import Callable

__all__ = [
    "QUANTIZER_REGISTRY",
    "LOSS_REGISTRY",
    "MODEL_REGISTRY",
    "DATASET_REGISTRY",
    "OPTIMIZER_REGISTRY",
    "SCHEDULER_REGISTRY",
    "DEFAULT_AUGMENT",
    "register_quantizer",
    "register_loss",
    "register_model",
    "register_dataset",
]

# name -> class or callable(**kwargs) -> nn.Module with forward(w) -> w_hat
QUANTIZER_REGISTRY: dict[str, Callable] = {}
# name -> fn(model, **kwargs) -> scalar tensor; fn.group_lasso_layers: see register_loss
LOSS_REGISTRY: dict[str, Callable] = {}
# name -> fn(num_classes=..., img_size=..., **model_kwargs) -> nn.Module
MODEL_REGISTRY: dict[str, Callable] = {}
# name -> fn(cfg) -> (train_dataset, val_dataset); fn.default_augment, fn.num_classes (int or None)
DATASET_REGISTRY: dict[str, Callable] = {}
# name -> torch.optim.Optimizer class
OPTIMIZER_REGISTRY: dict[str, type] = {}
# name -> fn(optimizer, cfg) -> LR scheduler (stepped once per epoch) or None
SCHEDULER_REGISTRY: dict[str, Callable] = {}
# A data set's training augmentation when it names none (register_dataset's augment;
# the config's for one put into DATASET_REGISTRY without the decorator).
DEFAULT_AUGMENT = "standard"


def _register(registry: dict, name: str):
    def deco(obj):
        registry[name] = obj
        return obj

    return deco


def register_quantizer(name: str):
    """Class decorator: ``@register_quantizer("mine") class Mine(nn.Module): ...``"""
    return _register(QUANTIZER_REGISTRY, name)


def register_loss(name: str, group_lasso_layers: Callable | None = None):
    """Function decorator: ``@register_loss("l1") def l1(model, **kw) -> Tensor``.
    ``group_lasso_layers``: declares the term a group lasso (the kernels' sum of
    column norms) of the (module, lambda) pairs this returns for the same
    ``(model, **kw)``, kept as ``fn.group_lasso_layers``; the trainer's fast path
    then computes the term inside the quantizers' fused call (codeq/fastpath.py)
    instead of calling ``fn``."""
    def deco(fn):
        fn.group_lasso_layers = group_lasso_layers
        return _register(LOSS_REGISTRY, name)(fn)

    return deco


def register_model(name: str):
    """Function decorator: ``fn(num_classes=10, img_size=32, **model_kwargs) -> nn.Module``"""
    return _register(MODEL_REGISTRY, name)


def register_dataset(name: str, augment: str = DEFAULT_AUGMENT, num_classes: int | None = None):
    """Function decorator: ``fn(cfg) -> (train_dataset, val_dataset)``.
    ``augment``: the data set's training recipe when the config leaves
    ``dataset.augment`` unset (kept as ``fn.default_augment``).
    ``num_classes``: its number of classes (kept as ``fn.num_classes``), the
    default ``model_kwargs.num_classes`` of a ``timm/`` or ``torchvision/``
    model; None: it depends on the data (such a model then needs
    ``model_kwargs.num_classes``)."""
    def deco(fn):
        fn.default_augment = augment
        fn.num_classes = num_classes
        return _register(DATASET_REGISTRY, name)(fn)

    return deco
