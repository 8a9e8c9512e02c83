"""The loss terms of a run as objects: ``loss = CE + sum of strength x fn(model, **kwargs)``."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from codeq.registry import LOSS_REGISTRY
from codeq.train.budget import Setting

__all__ = ["LossTerm", "build_loss_terms"]


@dataclasses.dataclass(eq=False)
class LossTerm:
    """``loss_terms[index]`` of the config: ``strength x fn(model, **kwargs)``.
    ``key``: its name in the epoch record's ``train_loss_terms`` (``name``, or
    ``name_index`` where two terms share a name).  ``kwargs`` holds every
    argument ``fn`` has a default for (the config's values over ``fn``'s
    defaults), so that each path computing the term sees the same values."""

    index: int
    name: str
    fn: Callable
    strength: float
    kwargs: dict
    key: str

    @property
    def value_name(self) -> str:
        """Its name among a step's values (prefixed: apart from the step's own, loss, ce, ...)."""
        return f"term:{self.key}"

    @property
    def title(self) -> str:
        """How messages name it (the divergence check)."""
        return f"loss term loss_terms[{self.index}] ({self.name})"

    def __call__(self, model):
        return self.fn(model, **self.kwargs)

    def knob(self, kwarg: str) -> Setting:
        """The handle on one of its kwargs (what a budget steers): the next call uses what it sets."""
        return Setting(lambda: [self.kwargs], kwarg)

    @property
    def fusable(self) -> bool:
        """Whether ``fn`` declares itself a group lasso the fused path can compute
        (``register_loss(..., group_lasso_layers=...)``)."""
        return getattr(self.fn, "group_lasso_layers", None) is not None

    def fused_layers(self, model) -> list:
        """The (module, lambda) pairs of a fusable term, for its kwargs now."""
        return self.fn.group_lasso_layers(model, **self.kwargs)


def _defaults(fn) -> dict:
    """{argument: default} of ``fn``'s keyword arguments (``model`` aside; none
    where Python cannot read its signature)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p.default for n, p in params.items() if n != "model" and p.kind in kinds and p.default is not p.empty}


def build_loss_terms(configs) -> list[LossTerm]:
    """The terms of a config's ``loss_terms`` (validated: names are registered)."""
    names = [c.name for c in configs]
    return [LossTerm(i, c.name, LOSS_REGISTRY[c.name], float(c.lam), {**_defaults(LOSS_REGISTRY[c.name]), **c.kwargs},
                     c.name if names.count(c.name) == 1 else f"{c.name}_{i}")
            for i, c in enumerate(configs)]
