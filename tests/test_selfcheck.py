"""The runtime self-check that guards the device (CUDA) kernels."""

import warnings

import pytest
import torch

import codeq
from codeq import devicecheck as sc


def test_comparison_runs_and_agrees_on_cpu():
    # The comparison itself (every op, both CUDA paths' sizes) on the CPU kernels vs themselves.
    assert sc._compare(torch.device("cpu")) is None
    assert codeq.selfcheck("cpu") is True


def test_failed_check_warns_once_and_is_cached(monkeypatch):
    monkeypatch.setattr(sc, "_RESULTS", {})
    calls = []

    def broken(device):
        calls.append(device)
        return "deadzone_forward n=1000: 17 elements differ"

    monkeypatch.setattr(sc, "_compare", broken)
    dev = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert sc.selfcheck(dev) is False
        assert sc.selfcheck(dev) is False
        assert sc.device_ok(dev) is False
    assert len(calls) == 1
    msgs = [str(r.message) for r in rec]
    assert len(msgs) == 1 and "reference" in msgs[0] and "17 elements differ" in msgs[0]


def test_exception_in_check_is_a_failed_check(monkeypatch):
    monkeypatch.setattr(sc, "_RESULTS", {})

    def boom(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(sc, "_compare", boom)
    with pytest.warns(RuntimeWarning, match="illegal memory access"):
        assert sc.selfcheck(torch.device("cuda", 1)) is False


def test_env_switch_disables_cuda_kernels(monkeypatch):
    monkeypatch.setattr(sc, "_RESULTS", {})
    monkeypatch.setenv("CODEQ_CUDA_KERNELS", "0")
    monkeypatch.setattr(sc, "_compare", lambda d: pytest.fail("must not run"))
    assert sc.selfcheck(torch.device("cuda", 0)) is False
