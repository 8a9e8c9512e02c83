"""codeq: CoDeQ joint pruning + quantization-aware training for PyTorch.

Compiled C++/CUDA kernels of the dead-zone quantizer (arXiv 2512.12981), with
the pure-PyTorch reference of the published math in ``codeq.reference``.
Importing codeq registers its quantizers, loss terms and models in
:mod:`codeq.registry`.
"""

from __future__ import annotations

import torch

from codeq import _ext, models  # noqa: F401  (models: their registry entries)
from codeq.devicecheck import selfcheck
from codeq.losses import group_lasso, theta_l2
from codeq.parametrize import attach_weight_quantizers, iter_quantizers, toggle_quantization
from codeq.quantizers import DeadZoneLDZCompander, UniformSymmetric, fused_device_types
from codeq.registry import (
    DATASET_REGISTRY,
    LOSS_REGISTRY,
    MODEL_REGISTRY,
    QUANTIZER_REGISTRY,
    register_dataset,
    register_loss,
    register_model,
    register_quantizer,
)

__version__ = "0.1.0"

__all__ = [
    "DeadZoneLDZCompander",
    "UniformSymmetric",
    "attach_weight_quantizers",
    "toggle_quantization",
    "iter_quantizers",
    "group_lasso",
    "theta_l2",
    "QUANTIZER_REGISTRY",
    "LOSS_REGISTRY",
    "MODEL_REGISTRY",
    "DATASET_REGISTRY",
    "register_quantizer",
    "register_loss",
    "register_model",
    "register_dataset",
    "info",
    "selfcheck",
]


def info() -> dict:
    """What this installation was built with and can run."""
    b = _ext.build_info()
    return {
        "codeq": __version__,
        "torch": torch.__version__,
        "extension_loaded": _ext._C is not None,
        "extension_error": _ext._LOAD_ERROR,
        "extension_path": getattr(_ext._C, "__file__", None),
        "built_with_torch": b.get("torch_built_with"),
        "source_digest": b.get("source_digest"),
        "cuda_built": bool(b.get("cuda", False)),
        "cuda_archs": b.get("cuda_archs") or None,
        "openmp": b.get("openmp"),
        "fused_devices": sorted(fused_device_types()),
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }
