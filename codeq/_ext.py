"""Loading of the compiled extension codeq._C (the fused kernels).

If the extension is missing (a source checkout that was never built, a failed
build) the fused classes fall back to the pure-PyTorch reference with one
warning naming the cause and the fix; ``CODEQ_REQUIRE_EXT=1`` turns that into
an error (CI sets it).

A source checkout without a build of its own loads the extension of an
installed codeq (see :func:`_installed_twin`).  That build records the digest
of the C++ sources it was compiled from (``build_info()["source_digest"]``,
codeq/_digest.py); when the checkout's ``csrc/`` differs, the first use warns
once, naming both and the fix (with ``CODEQ_REQUIRE_EXT=1``: an error), since
the kernels running are not the checkout's.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings

import torch

from codeq._digest import source_digest
from codeq._env import env_flag

_C = None
_LOAD_ERROR: str | None = None
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TWIN_PATH: str | None = None  # the installed extension file loaded in place of the checkout's


def _installed_twin():
    """The compiled codeq/_C of an installed copy of codeq elsewhere on sys.path.

    Running ``python run_training.py`` from a source checkout after
    ``pip install .`` imports the checkout's codeq/ (the script's directory
    comes first on sys.path), which holds no compiled _C: the installed
    build is the one to load then."""
    for entry in sys.path:
        pkg = os.path.join(os.path.abspath(entry or os.getcwd()), "codeq")
        if os.path.realpath(pkg) == os.path.realpath(_PACKAGE_DIR) or not os.path.isdir(pkg):
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(pkg, "_C" + suffix)
            if os.path.isfile(path):
                spec = importlib.util.spec_from_file_location("codeq._C", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules["codeq._C"] = module
                global _TWIN_PATH
                _TWIN_PATH = path
                return module
    return None


def twin_mismatch(checkout_root: str, twin_path: str, built_digest: str | None) -> str | None:
    """The warning for a checkout at ``checkout_root`` running the installed
    extension ``twin_path`` built from C++ sources of digest ``built_digest``;
    None when they are the checkout's (or the checkout has no csrc/)."""
    ours = source_digest(checkout_root)
    if ours is None or ours == built_digest:
        return None
    built = f"digest {built_digest}" if built_digest else "no recorded digest (an older build)"
    return (f"codeq: this checkout ({checkout_root}) runs the compiled extension installed at {twin_path}, which was "
            f"built from other C++ sources ({built}; this checkout's csrc/: {ours}); the kernels are not this "
            f"checkout's. Fix: `pip install --no-build-isolation .` in {checkout_root}.")


try:  # importing the module runs the TORCH_LIBRARY registrations
    from codeq import _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:
    try:
        _C = _installed_twin()
    except Exception as twin_exc:  # an installed build that does not load (torch mismatch)
        _LOAD_ERROR = f"{type(twin_exc).__name__}: {twin_exc}"
    else:
        if _C is None:
            _LOAD_ERROR = (f"no compiled codeq._C in {_PACKAGE_DIR} nor in an installed codeq "
                           f"({type(exc).__name__}: {exc})")
except Exception as exc:  # an undefined symbol from a torch mismatch, ...
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

_warned = False
_twin_checked = False


def require_ext() -> bool:
    return env_flag("CODEQ_REQUIRE_EXT", False)


def available() -> bool:
    """True when the fused kernels (codeq._C) are loaded."""
    if _C is not None:
        if _TWIN_PATH is not None and not _twin_checked:
            _check_twin()
        return True
    _report_missing()
    return False


def _check_twin() -> None:
    global _twin_checked
    _twin_checked = True
    msg = twin_mismatch(os.path.dirname(_PACKAGE_DIR), _TWIN_PATH, build_info().get("source_digest"))
    if msg is None:
        return
    if require_ext():
        raise RuntimeError(msg + " (CODEQ_REQUIRE_EXT is set, so this is an error.)")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _report_missing() -> None:
    global _warned
    msg = (
        f"codeq: the compiled extension codeq._C could not be loaded ({_LOAD_ERROR}); "
        "the fused kernels are unavailable. Fix: build it with "
        "`pip install --no-build-isolation .` in the codeq source tree (with the same torch you run)."
    )
    if require_ext():
        raise RuntimeError(msg + " (CODEQ_REQUIRE_EXT is set, so this is an error.)")
    if not _warned:
        _warned = True
        warnings.warn(msg + " Falling back to the pure-PyTorch reference (slow).", RuntimeWarning, stacklevel=3)


def has_kernel(device: torch.device | str) -> bool:
    """True when the fused ops have kernels for this device type."""
    if not available():
        return False
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return bool(build_info().get("cuda"))  # a CUDA build registers the CUDA kernels of every op
    return False


def build_info() -> dict:
    if _C is None:
        return {}
    return dict(_C.build_info())
