"""Trainer checkpoints: atomic writes, ``weights_only`` loading, RNG state as
plain tensors/builtins, and the model a checkpoint holds.

A checkpoint is a dict with the keys ``model`` (state_dict), ``optimizer``,
``scheduler`` (state_dict or None), ``epoch`` (completed epochs),
``best_acc``, ``config`` (the resolved config, plain builtins; its ``model``,
``model_kwargs``, ``img_size`` and ``quantizer`` entries describe the model),
``budget`` (the budget controller's state, or None), ``scaler`` (fp16's
gradient scaler, or None),
``rng`` (torch / numpy / python RNG states) and ``codeq_version``.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn

from codeq._io import atomic_file
from codeq.errors import ConfigError
from codeq.models import build_model

__all__ = [
    "CheckpointError",
    "CHECKPOINT_KEYS",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "get_rng_state",
    "set_rng_state",
]

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_acc", "config", "budget", "scaler", "rng",
                   "codeq_version")


class CheckpointError(ConfigError):
    """A checkpoint file that is missing, unreadable or not a codeq checkpoint."""


def save_checkpoint(state: dict, path: str) -> str:
    """Write ``state`` with torch.save to a temporary file in the same
    directory, fsync it, then ``os.replace`` it onto ``path``: a crash or kill
    mid-save leaves the previous file at ``path`` intact."""
    path = os.fspath(path)
    with atomic_file(path) as f:
        torch.save(state, f)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a codeq checkpoint with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` (a ConfigError, one-line message) when the
    file is missing, corrupt or not a codeq checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, unpickling error, weights_only refusal, I/O error, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or not a torch checkpoint): {first}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a codeq checkpoint (needs the keys {', '.join(CHECKPOINT_KEYS)})")
    return ckpt


def load_model(path, map_location="cpu") -> tuple[nn.Module, dict, dict]:
    """(model, config, checkpoint) of a trainer checkpoint: the model rebuilt
    from the config's ``model``, ``model_kwargs``, ``img_size`` and
    ``quantizer``, its trained state loaded, in eval mode.  CheckpointError
    (one line) when the file or its contents do not fit."""
    ckpt = load_checkpoint(path, map_location=map_location)
    config = ckpt["config"]
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise CheckpointError(f"{path}: its config does not name a model")
    try:
        model = build_model(config["model"], img_size=int(config.get("img_size", 32)),
                            model_kwargs=config.get("model_kwargs"), quantizer=config.get("quantizer"))
        model.load_state_dict(ckpt["model"])
    except Exception as exc:  # a registry name this codeq lacks, bad kwargs, mismatched state
        raise CheckpointError(f"cannot rebuild the model of {path}: {' '.join(str(exc).split())[:300]}") from None
    return model.eval(), config, ckpt


# ---------------------------------------------------------------------- RNG --
def get_rng_state() -> dict:
    """torch (CPU and CUDA), NumPy and Python RNG states as tensors and builtins
    (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
