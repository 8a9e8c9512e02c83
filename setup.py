"""Build script of codeq: the Python package plus the codeq._C extension.

    pip install --no-build-isolation .

Builds a CUDA extension when torch has CUDA and nvcc is found (CUDA_HOME, or
/usr/local/cuda), a CPU-only one otherwise.  Environment switches:

    CODEQ_FORCE_CPU=1        build the CPU-only extension even when CUDA is there
    TORCH_CUDA_ARCH_LIST     CUDA architectures (default: the visible GPUs, or
                             "8.0;9.0+PTX" when none is visible)
    CODEQ_PTXAS_VERBOSE=1    print ptxas register/spill reports (-Xptxas -v)
    MAX_JOBS                 parallel compile jobs (ninja)
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _say(msg):
    # pip shows build output with -v; stderr also lands in the build log.
    print(f"codeq setup: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    """A CUDA toolkit root with bin/nvcc and include/cuda_runtime.h (a bare nvcc
    wrapper script on PATH, e.g. /usr/local/bin/nvcc, is not a toolkit root)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _import_torch():
    """torch must be the one you run.  Under pip's build isolation it is hidden,
    so look in this interpreter's own site-packages before giving up."""
    try:
        import torch  # noqa: F401
    except ImportError:
        import sysconfig

        for key in ("purelib", "platlib"):
            path = sysconfig.get_paths()[key]
            if path not in sys.path:
                sys.path.append(path)
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("codeq setup: PyTorch is not installed. Install it first (https://pytorch.org), then run "
                     "`pip install --no-build-isolation .` in the codeq source tree.")
        _say(f"using the installed torch from {os.path.dirname(torch.__file__)} (pip build isolation bypassed)")
    import torch

    return torch


def _source_digest():
    """codeq/_digest.py's digest of csrc/ (loaded by path: codeq itself needs the extension being built)."""
    spec = importlib.util.spec_from_file_location("_codeq_digest", os.path.join(ROOT, "codeq", "_digest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_digest(ROOT)


def _extension():
    torch = _import_torch()

    force_cpu = os.environ.get("CODEQ_FORCE_CPU", "0") not in ("", "0", "false", "False")
    cuda_home = None if force_cpu else _find_cuda_home()
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = (not force_cpu) and torch.version.cuda is not None and cuda_home is not None

    if use_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when imported.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp", f'-DCODEQ_TORCH_VERSION="{torch.__version__}"',
           f'-DCODEQ_SOURCE_DIGEST="{_source_digest()}"']
    link = ["-fopenmp"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; torch's parallel_for then runs serially
        cxx.remove("-fopenmp")
        link = []

    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # With no GPU visible torch's arch detection fails: pick a portable default.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPUs")
        nvcc = ["-O3", "--fmad=false", "--expt-relaxed-constexpr"]
        if os.environ.get("CODEQ_PTXAS_VERBOSE", "0") not in ("", "0"):
            nvcc.append("-Xptxas=-v")
        macros = [("CODEQ_WITH_CUDA", None), ("CODEQ_CUDA_ARCHS", f'"{archs}"')]
        _say(f"building the CUDA extension (CUDA {torch.version.cuda}, nvcc in {cuda_home}, archs {archs}, "
             f"{len(cuda_sources)} CUDA source(s))")
        ext = CUDAExtension(
            "codeq._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        why = ("CODEQ_FORCE_CPU is set" if force_cpu else
               "this torch has no CUDA" if torch.version.cuda is None else
               "nvcc was not found (set CUDA_HOME)")
        _say(f"building the CPU-only extension ({why})")
        ext = CppExtension(
            "codeq._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    name="codeq",
    version="0.1.0",
    description="CoDeQ: joint pruning and quantization-aware training with a learned dead-zone quantizer",
    packages=find_packages(include=["codeq", "codeq.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision", "timm", "pyyaml", "tqdm", "matplotlib"],
    extras_require={"wandb": ["wandb"], "test": ["pytest"], "onnx": ["onnx>=1.16", "onnxscript", "onnxruntime>=1.20"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["codeq-train=codeq.train.cli:main", "codeq-report=codeq.report:main"]},
    zip_safe=False,
)
