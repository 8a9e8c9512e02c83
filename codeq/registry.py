"""Registries of quantizers and loss terms.  Adding an entry is one decorator
(``@register_quantizer("name")``) or one dict assignment."""

from __future__ import annotations

from typing import Callable

from codeq.losses import group_lasso, theta_l2
from codeq.quantizers import DeadZoneLDZCompander, UniformSymmetric

__all__ = ["QUANTIZER_REGISTRY", "LOSS_REGISTRY", "register_quantizer", "register_loss"]

QUANTIZER_REGISTRY: dict[str, Callable] = {
    "deadzone": DeadZoneLDZCompander,
    "uniform": UniformSymmetric,
}

LOSS_REGISTRY: dict[str, Callable] = {
    "group_lasso": group_lasso,
    "theta_l2": theta_l2,
}


def register_quantizer(name: str):
    """Class decorator: ``@register_quantizer("mine") class Mine(nn.Module): ...``"""

    def deco(cls):
        QUANTIZER_REGISTRY[name] = cls
        return cls

    return deco


def register_loss(name: str):
    """Function decorator: ``@register_loss("l1") def l1(model, **kw) -> Tensor``"""

    def deco(fn):
        LOSS_REGISTRY[name] = fn
        return fn

    return deco
