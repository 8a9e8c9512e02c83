"""Attaching quantizers to a model's weights (torch parametrizations)."""

from __future__ import annotations

import copy
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from codeq.quantizers import QuantizerBase
from codeq.registry import QUANTIZER_REGISTRY

__all__ = ["attach_weight_quantizers", "toggle_quantization", "iter_quantizers", "is_quantizer", "strip_quantizers"]


def is_quantizer(m: nn.Module) -> bool:
    return isinstance(m, QuantizerBase)


class ExternalQuantizer(QuantizerBase):
    """Wraps a user quantizer (any nn.Module with ``forward(w) -> w_hat``) so that
    ``toggle_quantization`` and ``iter_quantizers`` work for it too."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        return self.inner(w)

    def get_bitwidth(self):
        fn = getattr(self.inner, "get_bitwidth", None)
        return fn() if fn is not None else torch.tensor(32.0)


def attach_weight_quantizers(
    model: nn.Module,
    exclude_layers: Iterable[str] = (),
    quantizer="deadzone",
    quantizer_kwargs: dict | None = None,
    enabled: bool = True,
) -> list[str]:
    """Register one quantizer instance as a parametrization of the ``weight`` of
    every module that has a ``weight`` nn.Parameter and whose qualified name
    contains none of the ``exclude_layers`` strings.

    ``quantizer`` is a registry name (see ``codeq.QUANTIZER_REGISTRY``) or a
    class / callable returning an nn.Module with ``forward(w) -> w_hat``.
    Returns the names of the quantized modules.
    """
    if isinstance(exclude_layers, str):
        exclude_layers = [exclude_layers]
    exclude = [str(e) for e in (exclude_layers or [])]
    if isinstance(quantizer, str):
        if quantizer not in QUANTIZER_REGISTRY:
            raise KeyError(f"unknown quantizer {quantizer!r}; choose one of: {', '.join(sorted(QUANTIZER_REGISTRY))}")
        factory = QUANTIZER_REGISTRY[quantizer]
    else:
        factory = quantizer
    kwargs = dict(quantizer_kwargs or {})

    targets = []
    for name, module in model.named_modules():
        if any(e and e in name for e in exclude):
            continue
        if parametrize.is_parametrized(module, "weight"):
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and "weight" in module._parameters:
            targets.append((name, module))
    for name, module in targets:
        q = factory(**kwargs)
        if not isinstance(q, QuantizerBase):
            q = ExternalQuantizer(q)
        q.enabled = bool(enabled)
        q.to(device=module.weight.device)
        parametrize.register_parametrization(module, "weight", q, unsafe=True)
    return [name for name, _ in targets]


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(module name, module, quantizer) for every quantized weight of the model."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations["weight"]:
                if is_quantizer(p):
                    yield name, module, p


def toggle_quantization(model: nn.Module, enabled: bool) -> int:
    """Switch every attached quantizer on or off; returns how many were switched."""
    n = 0
    for _, _, q in iter_quantizers(model):
        q.enabled = bool(enabled)
        n += 1
    return n


@torch.no_grad()
def strip_quantizers(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without parametrizations: each parametrized
    tensor an ordinary parameter holding its value (a quantized weight holds
    ŵ).  ``model`` is left as it is.

    torch's deep copy of a parametrized module shares the module's class, and
    removing a parametrization deletes the tensor's property from that class;
    so each copied module first gets a class of its own, the same as the one
    it shares."""
    plain = copy.deepcopy(model)
    with parametrize.cached():
        for module in plain.modules():
            if not parametrize.is_parametrized(module):
                continue
            cls = type(module)
            own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, own)
            for attr in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return plain
