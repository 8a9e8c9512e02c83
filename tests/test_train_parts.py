"""Trainer parts: the 3-way optimizer groups, the loss terms' gradients, one
quantizer run per step, models, checkpoints (atomic, weights_only), wandb."""

from __future__ import annotations

import io
import os
import sys
import types

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import codeq
from codeq.parametrize import iter_quantizers
from codeq import checkpoint as ckpt_mod
from codeq.models import example_input
from codeq.train.optim import build_optimizer, split_param_groups
from codeq.train.trainer import build_run_model as build_model
from codeq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from codeq.train.config import ConfigError, config_from_dict
from codeq.train.trainer import Trainer


def cfg_dict(**over) -> dict:
    d = {
        "model": "mlp",
        "model_kwargs": {"hidden": [16, 12]},
        "epochs": 1,
        "batch_size": 8,
        "device": "cpu",
        "workers": 0,
        "save_dir": "unused",
        "dataset": {"name": "synthetic", "train_size": 16, "val_size": 8},
        "quantizer": {"name": "deadzone", "kwargs": {}, "exclude_layers": []},
        "optimizer": {"type": "adamw", "param_groups": {
            "base": {"lr": 0.001, "weight_decay": 0.01},
            "dz": {"lr": 0.05, "weight_decay": 2.5},
            "bit": {"lr": 0.002, "weight_decay": 0.0, "betas": [0.8, 0.9]}}},
        "loss_terms": [],
    }
    d.update(over)
    return d


# ------------------------------------------------------------- optimizer --
def test_three_way_param_groups():
    cfg = config_from_dict(cfg_dict())
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["base", "dz", "bit"]
    assert (groups["base"]["lr"], groups["base"]["weight_decay"]) == (0.001, 0.01)
    assert (groups["dz"]["lr"], groups["dz"]["weight_decay"]) == (0.05, 2.5)
    assert (groups["bit"]["lr"], groups["bit"]["weight_decay"], groups["bit"]["betas"]) == (0.002, 0.0, (0.8, 0.9))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("logit_dz" in names[id(p)] for p in groups["dz"]["params"])
    assert all("logit_bit" in names[id(p)] for p in groups["bit"]["params"])
    assert not any("logit" in names[id(p)] for p in groups["base"]["params"])
    assert len(groups["dz"]["params"]) == len(groups["bit"]["params"]) == 3  # one per quantized layer
    n_all = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_all


def test_absent_groups_take_base_hparams_and_frozen_left_out():
    d = cfg_dict(quantizer={"name": "deadzone", "kwargs": {"learnable_bit": False}})
    d["optimizer"] = {"type": "sgd", "param_groups": {"base": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}}}
    cfg = config_from_dict(d)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["base", "dz"]  # logit_bit is frozen (learnable_bit false): no bit group
    assert groups["dz"]["lr"] == 0.1 and groups["dz"]["momentum"] == 0.9 and groups["dz"]["weight_decay"] == 1e-4
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all("logit_bit" in n for n in frozen)
    assert "bit" not in {k for k, v in split_param_groups(model).items() if v}


# ------------------------------------------------------------------ loss --
def _trainer(**over) -> Trainer:
    return Trainer.from_config(config_from_dict(cfg_dict(**over)), "cpu")


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_group_lasso_term_changes_w_gradient_by_its_own_gradient():
    lam, lin = 0.7, 0.05
    gl = [{"name": "group_lasso", "lambda": lam, "kwargs": {"lambda_linear": lin, "lambda_conv": 0.0}}]
    x, y = _batch()
    grads = {}
    for key, terms in (("none", []), ("gl", gl)):
        t = _trainer(loss_terms=terms)  # same seed: same initial weights
        t.optimizer.zero_grad()
        loss, parts, _ = t.compute_loss(x, y)
        ce = parts["ce"]
        loss.backward()
        grads[key] = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
        if key == "gl":
            assert loss.item() > ce.item()
            model = t.model
    w_name = "net.fc1.parametrizations.weight.original"
    diff = grads["gl"][w_name] - grads["none"][w_name]
    assert diff.abs().max() > 0
    # the difference is exactly lambda * d(group lasso of the quantized weights)/dw
    model.zero_grad()
    with parametrize.cached():
        (lam * codeq.group_lasso(model, lambda_linear=lin, lambda_conv=0.0)).backward()
    expected = dict(model.named_parameters())[w_name].grad
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-7)
    # and it reaches the dead-zone logits too (through the quantizer)
    dz = "net.fc1.parametrizations.weight.0.logit_dz"
    assert grads["gl"][dz] != grads["none"][dz]


def _count_quantizer_calls(model, monkeypatch):
    """Counts the per-layer quantizer runs (patching the class: a forward hook
    would itself keep a quantizer off the fused path)."""
    from codeq.quantizers import DeadZoneLDZCompander

    calls = [0]
    orig = DeadZoneLDZCompander._quantize

    def counted(self, w):
        calls[0] += 1
        return orig(self, w)

    monkeypatch.setattr(DeadZoneLDZCompander, "_quantize", counted)
    return calls


@pytest.mark.parametrize("fused", [True, False], ids=["fused_weights", "per_layer"])
@pytest.mark.parametrize("model,kwargs", [("mlp", {"hidden": [16, 12]}), ("resnet20", {"num_blocks": [1, 1, 1], "width": 4})])
def test_quantizers_run_once_per_step(model, kwargs, fused, monkeypatch):
    import codeq.ops

    gl = [{"name": "group_lasso", "lambda": 1.0, "kwargs": {"lambda_linear": 0.01, "lambda_conv": 0.01}}]
    t = _trainer(model=model, model_kwargs=kwargs, loss_terms=gl, fused_weights=fused,
                 quantizer={"name": "deadzone", "kwargs": {}, "exclude_layers": ["bn"]})
    n_layers = len(list(iter_quantizers(t.model)))
    assert n_layers >= 3
    calls = _count_quantizer_calls(t.model, monkeypatch)
    op_calls = [0]
    deadzone = codeq.ops.deadzone
    monkeypatch.setattr(codeq.ops, "deadzone", lambda *a: op_calls.__setitem__(0, op_calls[0] + 1) or deadzone(*a))
    x, y = _batch()
    for _ in range(2):
        calls[0] = op_calls[0] = 0
        t.train_step(x, y)
        # fused: one op call computes every layer (and the group lasso); else each quantizer once
        assert (calls[0], op_calls[0]) == ((0, 1) if fused else (n_layers, n_layers))
    # sanity: without cached() the group lasso would run every quantizer again
    calls[0] = 0
    t.net(x)
    codeq.group_lasso(t.model, 0.01, 0.01)
    assert calls[0] == 2 * n_layers
    # a whole validation pass quantizes once
    calls[0] = 0
    t.evaluate()
    assert calls[0] == n_layers


def test_epoch_metrics_accumulate_on_device_without_item(monkeypatch):
    """No per-step host reads: Tensor.item/tolist are not called inside train_epoch
    (log_interval larger than the epoch).  The batches are loaded beforehand and
    the optimizer is plain SGD, so that the data pipeline's and Adam's own
    CPU-side .item() calls are not counted."""
    d = cfg_dict(dataset={"name": "synthetic", "train_size": 32, "val_size": 8}, log_interval=1000)
    d["optimizer"] = {"type": "sgd", "param_groups": {"base": {"lr": 0.01}}}
    t = Trainer.from_config(config_from_dict(d), "cpu")
    t.train_loader = list(t.train_loader)
    reads = [0]
    orig_item, orig_tolist = torch.Tensor.item, torch.Tensor.tolist

    def item(self):
        reads[0] += 1
        return orig_item(self)

    def tolist(self):
        reads[0] += 1
        return orig_tolist(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    out = t.train_epoch(0)
    monkeypatch.undo()
    assert reads[0] == 0
    assert out.names == ("loss", "ce", "correct", "count")
    assert out["count"] == 32 and 0 <= out["correct"] <= 32 and out["loss"] > 0


# ---------------------------------------------------------------- models --
def test_models_and_example_input():
    for name, kw, img, n_q, exclude in [
        ("mlp", {}, 32, 3, []),
        ("resnet20", {}, 32, 20, ["bn"]),
        ("vit", {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 16}, 64, 6, ["norm"]),
    ]:
        cfg = config_from_dict(cfg_dict(model=name, model_kwargs=kw, img_size=img,
                                        quantizer={"name": "deadzone", "exclude_layers": exclude}))
        model = build_model(cfg)
        x = example_input(cfg.img_size, batch_size=2)
        assert x.shape == (2, 3, img, img)
        assert model(x).shape == (2, 10)
        assert next(model.parameters()).device.type == "cpu"
        qs = list(iter_quantizers(model))
        assert len(qs) == n_q, (name, [q[0] for q in qs])
    # the full-size models: ResNet-20 has 0.27 M parameters, the MLP 3072-120-84-10
    r = build_model(config_from_dict(cfg_dict(model="resnet20", model_kwargs={}, quantizer=None)))
    assert 0.26e6 < sum(p.numel() for p in r.parameters()) < 0.28e6
    m = build_model(config_from_dict(cfg_dict(model_kwargs={}, quantizer=None)))
    assert [tuple(l.weight.shape) for l in m.modules() if isinstance(l, nn.Linear)] == [(120, 3072), (84, 120), (10, 84)]
    assert example_input(224).shape == (1, 3, 224, 224)


def test_bad_model_kwargs_value_is_config_error():
    with pytest.raises(ConfigError, match="width"):
        build_model(config_from_dict(cfg_dict(model="resnet20", model_kwargs={"width": 3})))
    with pytest.raises(ConfigError, match="vit"):
        build_model(config_from_dict(cfg_dict(model="vit", model_kwargs={"no_such_timm_arg": 1})))


# ----------------------------------------------------------- checkpoints --
class _Evil:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def _state():
    return {"model": {"w": torch.arange(6.0)}, "config": {"model": "mlp"}, "epoch": 1, "rng": ckpt_mod.get_rng_state()}


def test_checkpoint_round_trip_weights_only(tmp_path, monkeypatch):
    p = tmp_path / "c.th"
    save_checkpoint(_state(), p)
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    out = load_checkpoint(p)
    assert calls == [True]
    assert torch.equal(out["model"]["w"], torch.arange(6.0)) and out["epoch"] == 1
    assert os.listdir(tmp_path) == ["c.th"]  # no temp files left


def test_checkpoint_with_pickled_object_refused(tmp_path):
    p = tmp_path / "evil.th"
    torch.save({"model": {}, "config": {}, "obj": _Evil()}, p)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(p)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.th"
    save_checkpoint(_state(), p)
    before = p.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half the file, then "killed"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crashing_save)
    new = _state()
    new["epoch"] = 2
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(new, p)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert load_checkpoint(p)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.th"]


def test_partial_file_is_a_clear_error(tmp_path):
    p = tmp_path / "c.th"
    save_checkpoint(_state(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.th")


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt_mod.get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt_mod.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


# ----------------------------------------------------------------- wandb --
def _run_with_wandb(tmp_path, capsys, monkeypatch, fake):
    import yaml

    from codeq.train.cli import main

    if fake is None:
        monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    else:
        monkeypatch.setitem(sys.modules, "wandb", fake)
    d = cfg_dict(wandb_project="proj", save_dir=str(tmp_path / "runs"), run_name="w")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    rc = main(["--config", str(p)])
    out, err = capsys.readouterr()
    return rc, [ln for ln in err.splitlines() if ln.startswith("warning:")]


def test_wandb_missing_one_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    rc, warnings = _run_with_wandb(tmp_path, capsys, monkeypatch, None)
    assert rc == 0 and len(warnings) == 1 and "wandb" in warnings[0]


def test_wandb_init_failure_falls_back_offline_with_one_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    calls, logged = [], []

    class Run:
        def log(self, rec, step):
            logged.append((step, rec))

        def finish(self):
            calls.append("finish")

    def init(mode, **kw):
        calls.append(mode)
        if mode == "online":
            raise RuntimeError("network unreachable")
        return Run()

    fake = types.SimpleNamespace(init=init, Settings=lambda **kw: kw)
    rc, warnings = _run_with_wandb(tmp_path, capsys, monkeypatch, fake)
    assert rc == 0 and len(warnings) == 1 and "offline" in warnings[0]
    assert calls == ["online", "offline", "finish"]
    assert logged and logged[0][0] == 1 and "val_acc" in logged[0][1]


def test_wandb_mode_env_disabled_is_silent(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    rc, warnings = _run_with_wandb(tmp_path, capsys, monkeypatch, None)
    assert rc == 0 and warnings == []


def test_real_wandb_offline_logs_into_the_run_directory(tmp_path, capsys, monkeypatch):
    """wandb is installed by `make install`: offline, the run's W&B files land in
    the run directory (for `wandb sync`), with the per-epoch BOPs, and no warning."""
    if os.environ.get("CODEQ_REQUIRE_EXT", "0") in ("", "0"):
        wandb = pytest.importorskip("wandb")
    else:  # the full install (make test): wandb must be there
        import wandb
    import glob

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rc, warnings = _run_with_wandb(tmp_path, capsys, monkeypatch, wandb)
    assert rc == 0 and warnings == []
    (log,) = glob.glob(str(tmp_path / "runs" / "w-*" / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(log, "rb").read()
    assert b"relative_bops" in data and b"val_acc" in data
