"""channels_last input, autocast (bf16, fp16 with a gradient scaler) and the
CUDA backend flags: the config, what a training step computes, and resume."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.nn.utils import parametrize

import codeq
from codeq.checkpoint import load_checkpoint
from codeq.losses import group_lasso_of
from codeq.train.cli import main
from codeq.train.config import ConfigError, config_from_dict
from codeq.train.optim import build_optimizer, build_scheduler
from codeq.train.precision import backend_flags, wants_channels_last
from codeq.train.trainer import Trainer, build_run_model
from test_train_cli import read_metrics, run_dirs, tiny, write
from test_train_ddp import torchrun

RESNET = {"num_blocks": [1, 1, 1], "width": 8}


def trainer_for(tmp_path, **over) -> Trainer:
    d = tiny(tmp_path, "resnet20", model_kwargs=RESNET, **over)
    cfg = config_from_dict(d)
    torch.manual_seed(0)
    model = build_run_model(cfg)
    opt = build_optimizer(cfg, model)
    return Trainer(cfg, torch.device("cpu"), model, opt, build_scheduler(cfg, opt), None, None, torch.Generator())


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("bad, words", [
    ({"amp": "fp8"}, "unknown amp mode 'fp8'"),
    ({"amp": True}, "amp must be a string"),
    ({"matmul_precision": "medium"}, "unknown matmul_precision 'medium'"),
    ({"channels_last": "yes"}, "channels_last must be auto, true or false"),
    ({"cudnn_benchmark": "fast"}, "cudnn_benchmark must be true/false"),
    ({"amp": "fp16", "cuda_graph": True}, "cuda_graph does not work with amp: fp16"),
])
def test_config_errors(tmp_path, bad, words):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny(tmp_path, **bad))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_channels_last_auto_means_convolutional_networks(tmp_path):
    assert trainer_for(tmp_path).channels_last
    assert not trainer_for(tmp_path, channels_last=False).channels_last
    mlp = build_run_model(config_from_dict(tiny(tmp_path)))
    assert not wants_channels_last("auto", mlp) and wants_channels_last(True, mlp)
    vit = build_run_model(config_from_dict(tiny(tmp_path, "vit")))  # one patch-embedding Conv2d
    assert any(isinstance(m, torch.nn.Conv2d) for m in vit.modules()) and not wants_channels_last("auto", vit)
    x, y = trainer_for(tmp_path).batch(*batch())
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_channels_last_step_equals_contiguous(tmp_path):
    """ResNet-20 with quantizers and the group lasso: the same ŵ and group
    lasso bit for bit (the quantizers see the same parameters); the loss to
    float32 rounding (NHWC batch norm and convolutions sum in another order);
    the gradients as a whole to 2 %: where a ReLU input lies within rounding of
    0 the two layouts can take the other side of the kink, and that element's
    gradient differs by its whole size (this batch has such a flip)."""
    loss_terms = [{"name": "group_lasso", "kwargs": {"lambda_linear": 0.01, "lambda_conv": 0.01}}]
    a = trainer_for(tmp_path, channels_last=False, loss_terms=loss_terms)
    b = trainer_for(tmp_path, channels_last=True, loss_terms=loss_terms)
    x, y = batch()
    outs = []
    for tr in (a, b):
        tr.model.train()
        tr.optimizer.zero_grad()
        loss, parts, _ = tr.compute_loss(*tr.batch(x, y))
        loss.backward()
        with parametrize.cached():
            w_hat = {n: m.weight.detach().clone() for n, m, _ in tr.quantized}
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        outs.append((loss.detach(), parts[tr.loss_terms[0].value_name].detach(), w_hat, grads))
    (la, gla, wa, ga), (lb, glb, wb, gb) = outs
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert torch.equal(gla, glb)  # the group lasso of ŵ
    assert lb == pytest.approx(la.item(), rel=1e-5)
    assert ga.keys() == gb.keys() and any("logit_dz" in n for n in ga)
    for n in ga:
        assert (gb[n] - ga[n]).norm() <= 2e-2 * ga[n].norm(), n


def test_bf16_step_is_close_to_float32(tmp_path):
    """A bf16-autocast step on the CPU: loss within 2 % of float32's (bf16 keeps
    8 bits of mantissa), float32 parameters and gradients, float32 ŵ."""
    a, b = trainer_for(tmp_path), trainer_for(tmp_path, amp="bf16")
    x, y = batch(32)
    la, lb = a.train_step(*a.batch(x, y)), b.train_step(*b.batch(x, y))
    assert torch.isfinite(lb.data).all()
    assert lb["loss"].item() == pytest.approx(la["loss"].item(), rel=2e-2)
    assert lb["correct"] >= 0
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in b.model.parameters())
    with parametrize.cached(), b.autocast():
        assert all(m.weight.dtype == torch.float32 for _, m, _ in b.quantized)
        assert b.model(x[:2]).dtype == torch.bfloat16  # ... while the layers compute in bf16


def test_fp16_is_always_scaled(tmp_path):
    tr = trainer_for(tmp_path, amp="fp16")
    assert tr.scaler is not None and tr.scaler.is_enabled() and tr.scaler.get_scale() == 2.0 ** 16
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    x, y = batch()
    for _ in range(3):
        out = tr.train_step(*tr.batch(x, y))
        assert torch.isfinite(out.data).all()
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())  # steps were taken
    # a non-finite gradient: the step is skipped and the scale halved
    scale, params = tr.scaler.get_scale(), {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    hook = next(iter(tr.model.parameters())).register_hook(lambda g: torch.full_like(g, float("inf")))
    tr.train_step(*tr.batch(x, y))
    hook.remove()
    assert tr.scaler.get_scale() == scale / 2
    assert all(torch.equal(params[n], p) for n, p in tr.model.named_parameters())


def test_fp16_resume_keeps_the_scaler(tmp_path):
    d = tiny(tmp_path, "resnet20", model_kwargs=RESNET, amp="fp16", epochs=2)
    cfg = write(tmp_path, d)
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 'straight'}"]) == 0
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 'split'}", "--stop-after", "1"]) == 0
    (split,) = run_dirs(tmp_path, "split")
    ckpt = os.path.join(split, "checkpoint.th")
    assert load_checkpoint(ckpt)["scaler"]["scale"] > 0
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 'split'}", "--resume", ckpt]) == 0
    (straight,) = run_dirs(tmp_path, "straight")
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert load_checkpoint(os.path.join(straight, "checkpoint.th"))["scaler"] == load_checkpoint(ckpt)["scaler"]


def test_backend_flags_only_on_cuda_and_restored(tmp_path):
    cfg = config_from_dict(tiny(tmp_path, matmul_precision="highest", cudnn_benchmark=False))
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    with backend_flags(cfg, torch.device("cpu")):  # nothing changes off CUDA
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision()) == before
    # the flags are plain torch attributes: set and restored without a GPU
    high = copy.copy(cfg)
    high.matmul_precision, high.cudnn_benchmark = "high", True
    with backend_flags(high, torch.device("cuda")):
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    with backend_flags(cfg, torch.device("cuda")):
        assert not torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision()) == before


def test_cli_runs_with_channels_last_and_bf16(tmp_path, capsys):
    d = tiny(tmp_path, "resnet20", model_kwargs=RESNET, amp="bf16", epochs=1)
    assert main(["--config", write(tmp_path, d)]) == 0
    out = capsys.readouterr().out
    assert "channels_last input, amp bf16" in out
    (run,) = run_dirs(tmp_path)
    rec = read_metrics(run)[-1]
    assert rec["val_acc"] >= 0 and rec["train_loss"] == rec["train_loss"]


def test_fp16_under_ddp(tmp_path):
    d = tiny(tmp_path, "resnet20", model_kwargs=RESNET, amp="fp16", epochs=1)
    r = torchrun(["--config", write(tmp_path, d)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "amp fp16" in r.stdout and r.stdout.count("done:") == 1
    (run,) = run_dirs(tmp_path)
    assert load_checkpoint(os.path.join(run, "checkpoint.th"))["scaler"]["scale"] > 0


def test_quantizer_and_group_lasso_take_channels_last_weights_bit_for_bit():
    """A user's model in channels_last (model.to(memory_format=...)): the ops
    compute on a contiguous copy of an NHWC weight (benchmarks/results/
    channels_last_cpu.md has what the copies cost) and give the contiguous
    results bit for bit: ŵ, the group lasso, and every gradient."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(32, 16, 3, 3, generator=g)
    up = torch.randn(32, 16, 3, 3, generator=g)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        q = codeq.DeadZoneLDZCompander(init_deadzone_logit=0.7, init_bit_logit=0.5)
        w = w0.clone(memory_format=fmt).requires_grad_()
        assert w.is_contiguous(memory_format=fmt)
        w_hat = q(w)
        gl = group_lasso_of([(w_hat, 0.01)])
        ((w_hat * up.contiguous(memory_format=fmt)).sum() + gl).backward()
        outs.append((w_hat.detach(), gl.detach(), w.grad, q.logit_dz.grad, q.logit_bit.grad))
    assert outs[1][0].equal(outs[0][0]) and outs[1][1].equal(outs[0][1])
    for a, b in zip(outs[0][2:], outs[1][2:]):
        assert torch.equal(a, b)
