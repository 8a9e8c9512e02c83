"""The selection logic of the CUDA quantile, emulated on the host.

tests/select_emulation.cpp runs the multi-pass radix select of
csrc/cuda/quantile_cuda.cu sequentially, with the same header helpers
(codeq/select.h, codeq/deadzone.h), and compares it bit for bit with a full
sort + torch.lerp's formula on ties, zeros, subnormals, +Inf, NaN and wide
ranges, for float and double keys.  Needs a C++ compiler, not a GPU.
"""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_radix_select_emulation_matches_sort(tmp_path):
    exe = tmp_path / "select_emulation"
    src = os.path.join(ROOT, "tests", "select_emulation.cpp")
    inc = os.path.join(ROOT, "csrc", "include")
    subprocess.run([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-I", inc, src, "-o", str(exe)], check=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 mismatches" in res.stdout
