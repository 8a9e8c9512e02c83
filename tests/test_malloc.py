"""codeq.train.malloc.tune_malloc: on Linux/glibc the step's large CPU tensors
stop being mapped afresh (page faults) every step; opt-outs are respected."""

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, torch
from codeq.train.optim import build_optimizer, build_scheduler
from codeq.train.trainer import build_run_model as build_model
from codeq.train.config import config_from_dict
from codeq.train.trainer import Trainer
cfg = config_from_dict({
    "model": "mlp", "epochs": 1, "batch_size": 128, "img_size": 32, "device": "cpu", "workers": 0,
    "save_dir": "/tmp/codeq_malloc_test", "dataset": {"name": "synthetic", "train_size": 128, "val_size": 128},
    "lr_scheduler": "cosine", "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 1e-3, "weight_decay": 0.0}}},
    "quantizer": {"name": "deadzone", "kwargs": {"init_deadzone_logit": 3.0, "init_bit_logit": 3.0}},
    "loss_terms": [{"name": "group_lasso", "lambda": 1.0, "kwargs": {"lambda_linear": 1e-4}}],
})
torch.manual_seed(0)
model = build_model(cfg)
opt = build_optimizer(cfg, model)
tr = Trainer(cfg, torch.device("cpu"), model, opt, build_scheduler(cfg, opt), None, None, torch.Generator())
from codeq.train import malloc
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
for _ in range(10):
    tr.train_step(x, y)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    tr.train_step(x, y)
r1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(malloc._state, (r1 - r0) / 40)
"""


def run(env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CODEQ_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, faults = out.stdout.split()
    return ok == "True", float(faults)


def glibc() -> bool:
    import ctypes

    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not glibc(), reason="malloc tuning applies to Linux with glibc only")
def test_training_step_has_no_page_faults():
    ok, faults = run({})
    assert ok
    # A QAT step of the CIFAR MLP (the Trainer tunes malloc when it is built):
    # untuned, glibc mapped 0.8-1.6 MB afresh every step here (200-400 faults a
    # step); tuned, the freed blocks are reused.
    assert faults < 20, f"{faults} page faults per training step with tuned malloc"


@pytest.mark.skipif(not glibc(), reason="malloc tuning applies to Linux with glibc only")
@pytest.mark.parametrize("env", [{"CODEQ_MALLOC_TUNING": "0"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}],
                         ids=["opt-out", "user-trim", "user-tunables"])
def test_opt_outs_are_respected(env):
    ok, _ = run(env)
    assert not ok
