import os

import pytest
import torch


def pytest_report_header(config):
    import codeq

    info = codeq.info()
    return [
        f"codeq {info['codeq']} from {os.path.dirname(codeq.__file__)}",
        f"torch {info['torch']}, extension loaded: {info['extension_loaded']}, fused devices: {info['fused_devices']}, "
        f"CUDA built: {info['cuda_built']} ({info['cuda_archs']}), CUDA available: {info['cuda_available']}",
    ]


@pytest.fixture
def seed():
    """A fresh seed per test (printed on failure through the assertion messages)."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s
