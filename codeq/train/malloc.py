"""Keep the C heap from handing large blocks back to the OS between steps.

glibc's malloc serves blocks over its mmap threshold with fresh mappings, and
returns freed memory at the top of the heap to the OS once it exceeds the trim
threshold (both adapt at run time).  A CPU training step allocates and frees
tensors of the same few sizes every step; with QAT (the quantized weights, the
gradients of both) glibc can end up mapping megabytes afresh every step of the
CIFAR MLP, and every 4 KiB page of it then costs a page fault and a zeroing
the first time it is written (tests/test_malloc.py counts them;
benchmarks/results/ab_special_paths.md has what it does to a step).  Fixing
both thresholds (32 MiB, glibc's largest mmap threshold, and a 256 MiB trim
threshold) keeps those blocks in the process: no faults a step.

:func:`tune_malloc` does that once per process.  It is a no-op off Linux/glibc,
when ``CODEQ_MALLOC_TUNING=0``, and when the user set glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``GLIBC_TUNABLES``.
The cost: up to 256 MiB of freed heap stays mapped in the process.
"""

from __future__ import annotations

import ctypes
import os
import sys

from codeq._env import env_flag

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3

_state: bool | None = None


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once); True if set."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if not env_flag("CODEQ_MALLOC_TUNING", True):
        return False
    if not sys.platform.startswith("linux"):
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False  # the user tuned malloc: leave it alone
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return False  # not glibc (musl and others have no such mallopt)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _state = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _state
