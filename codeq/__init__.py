"""codeq: CoDeQ joint pruning + quantization-aware training for PyTorch.

Fused C++/CUDA kernels of the dead-zone quantizer (arXiv 2512.12981) with a
pure-PyTorch reference twin (``codeq.reference``).
"""

from __future__ import annotations

import torch

from codeq import _ext, reference
from codeq.losses import group_lasso
from codeq.parametrize import attach_weight_quantizers, iter_quantizers, toggle_quantization
from codeq.quantizers import DeadZoneLDZCompander, UniformSymmetric
from codeq.registry import LOSS_REGISTRY, QUANTIZER_REGISTRY, register_loss, register_quantizer
from codeq.devicecheck import selfcheck

__version__ = "0.1.0"

__all__ = [
    "DeadZoneLDZCompander",
    "UniformSymmetric",
    "attach_weight_quantizers",
    "toggle_quantization",
    "iter_quantizers",
    "group_lasso",
    "QUANTIZER_REGISTRY",
    "LOSS_REGISTRY",
    "register_quantizer",
    "register_loss",
    "reference",
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
        "cuda_built": bool(b.get("cuda", False)),
        "cuda_archs": b.get("cuda_archs") or None,
        "openmp": b.get("openmp"),
        "fused_devices": sorted(__import__("codeq.quantizers", fromlist=["x"]).fused_device_types()),
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }
