"""A run stops at its first non-finite loss: exit code 3, one line naming
epoch, step and term, the last good checkpoint.th / best.th untouched (they
load and resume), no report; under DDP every rank stops.  And the config
refuses non-finite or negative learning rates, weight decays and λ."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from codeq.checkpoint import load_checkpoint
from codeq.errors import DIVERGED_EXIT_CODE
from codeq.registry import LOSS_REGISTRY
from codeq.train.cli import main
from test_train_cli import write
from test_train_ddp import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = {"n": 0}


def _nan_at_call(model, call: int = 0):
    """0 (no effect on training), and NaN at its ``call``-th call of the process."""
    CALLS["n"] += 1
    p = next(model.parameters())
    bad = call > 0 and CALLS["n"] == call
    return p.sum() * 0 + (float("nan") if bad else 0.0)


@pytest.fixture(autouse=True)
def _nan_term(monkeypatch):
    """The test's loss term, registered for this module's tests only."""
    monkeypatch.setitem(LOSS_REGISTRY, "test_nan_at_call", _nan_at_call)


def cfg_dict(tmp_path, **over) -> dict:
    d = {
        "model": "mlp",
        "model_kwargs": {"hidden": [16]},
        "epochs": 3,
        "batch_size": 8,
        "device": "cpu",
        "workers": 0,
        "save_dir": str(tmp_path / "runs"),
        "run_name": "d",
        "log_interval": 2,
        "dataset": {"name": "synthetic", "train_size": 48, "val_size": 16},
        "quantizer": {"name": "deadzone", "kwargs": {}, "exclude_layers": []},
        "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 0.001}, "dz": {"lr": 0.01}}},
        "loss_terms": [{"name": "group_lasso", "lambda": 1.0, "kwargs": {"lambda_linear": 0.001}}],
    }
    d.update(over)
    return d


def test_a_nan_term_stops_the_run_and_the_last_checkpoint_resumes(tmp_path, capsys):
    """6 steps an epoch; the term goes NaN at its 9th call: epoch 2, step 3."""
    CALLS["n"] = 0
    terms = cfg_dict(tmp_path)["loss_terms"] + [{"name": "test_nan_at_call", "lambda": 0.5, "kwargs": {"call": 9}}]
    rc = main(["--config", write(tmp_path, cfg_dict(tmp_path, loss_terms=terms))])
    out, err = capsys.readouterr()
    assert rc == DIVERGED_EXIT_CODE == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: training diverged: loss term loss_terms[1] (test_nan_at_call) is nan at "
                               "epoch 2/3, step 3/6;"), lines[0]
    (run,) = [os.path.join(tmp_path / "runs", x) for x in os.listdir(tmp_path / "runs")]
    assert "checkpoint.th (epoch 1) and best.th are untouched" in lines[0]
    files = set(os.listdir(run))
    assert not {f for f in files if f.startswith("compression_report")}, files  # no report of NaN weights
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 1
    ckpt = load_checkpoint(os.path.join(run, "checkpoint.th"))
    best = load_checkpoint(os.path.join(run, "best.th"))
    assert ckpt["epoch"] == 1 and best["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())

    # the same epoch 1 without the NaN: the kept checkpoint is exactly that epoch's
    CALLS["n"] = 0
    clean = [t if t["name"] != "test_nan_at_call" else dict(t, kwargs={"call": 0}) for t in terms]
    assert main(["--config", write(tmp_path, cfg_dict(tmp_path, loss_terms=clean, epochs=1, run_name="ref"),
                                   "ref.yaml")]) == 0
    ref = load_checkpoint(os.path.join(tmp_path / "runs", next(x for x in os.listdir(tmp_path / "runs")
                                                                    if x.startswith("ref")), "checkpoint.th"))
    assert ref["model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(ref["model"][k], ckpt["model"][k]) for k in ref["model"])

    # and it resumes to the end
    capsys.readouterr()
    rc = main(["--config", write(tmp_path, cfg_dict(tmp_path, loss_terms=clean), "resume.yaml"),
               "--resume", os.path.join(run, "checkpoint.th")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert load_checkpoint(os.path.join(run, "checkpoint.th"))["epoch"] == 3


def test_huge_lr_stops_at_the_first_bad_step_exit_3(tmp_path):
    """The issue's case: lr 1e30 makes the second step's cross-entropy NaN; the
    run stops there (first epoch: no checkpoint, no report)."""
    cfg = write(tmp_path, cfg_dict(tmp_path, log_interval=50,
                                   optimizer={"type": "adamw", "param_groups": {"base": {"lr": 1e30}}}))
    r = subprocess.run([sys.executable, os.path.join(REPO, "run_training.py"), "--config", cfg],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: training diverged: the cross-entropy is nan at epoch 1/3, step 2/6; no checkpoint was written"), lines
    (run,) = [os.path.join(tmp_path / "runs", x) for x in os.listdir(tmp_path / "runs")]
    assert os.listdir(run) == ["config.yaml"]


def test_total_loss_overflow_is_named():
    """Finite parts whose weighted sum overflows: 'the total loss'."""
    from codeq.train.config import config_from_dict
    from codeq.train.trainer import Trainer
    from codeq.errors import TrainingDiverged
    from codeq.train.values import Named

    t = Trainer.from_config(config_from_dict(cfg_dict(pathlib.Path("unused"))), "cpu")
    names = ("loss", "ce", t.loss_terms[0].value_name, "correct")
    finite = Named(names, torch.tensor([1.0, 1.0, 0.5, 3.0]))
    over = Named(names, torch.tensor([float("inf"), 1.0, 0.5, 3.0]))
    with pytest.raises(TrainingDiverged, match=r"the total loss is inf at epoch 2/3, step 6/9$") as e:
        t._read_window([finite, finite, over], [8, 8, 8], None, 1, 6, 9)
    assert (e.value.epoch, e.value.step, e.value.term) == (2, 6, "the total loss")


@pytest.mark.parametrize("override, message", [
    ("optimizer.param_groups.base.lr=.inf", "optimizer.param_groups.base.lr must be a finite number, got inf"),
    ("optimizer.param_groups.base.lr=-0.1", "optimizer.param_groups.base.lr must be at least 0, got -0.1"),
    ("optimizer.param_groups.dz.weight_decay=.nan", "optimizer.param_groups.dz.weight_decay must be a finite number"),
    ("optimizer.param_groups.base.weight_decay=-1", "optimizer.param_groups.base.weight_decay must be at least 0"),
    ("loss_terms.0.lambda=-2", "loss_terms[0].lambda must be at least 0, got -2.0"),
    ("loss_terms.0.kwargs.lambda_linear=-1e-3", "loss_terms[0].kwargs.lambda_linear must be at least 0"),
    ("loss_terms.0.kwargs.lambda_linear=.inf", "loss_terms[0].kwargs.lambda_linear must be a finite number"),
    ("optimizer.param_groups.base.betas=[0.9,.nan]", "optimizer.param_groups.base.betas[1] must be a finite number"),
])
def test_bad_lr_weight_decay_lambda_is_one_config_error(tmp_path, capsys, override, message):
    assert main(["--config", write(tmp_path, cfg_dict(tmp_path)), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not os.path.exists(tmp_path / "runs")


DDP_SCRIPT = """
import os, sys, torch
from codeq.registry import register_loss
calls = [0]

@register_loss("nan_on_rank_1")
def nan_on_rank_1(model):
    calls[0] += 1
    bad = os.environ["RANK"] == "1" and calls[0] == 4
    return next(model.parameters()).sum() * 0 + (float("nan") if bad else 0.0)

from codeq.train.cli import main
sys.exit(main())
"""


def test_ddp_every_rank_stops_at_one_ranks_nan(tmp_path):
    """Rank 1's term goes NaN at its 4th step; both ranks stop there (no hang),
    rank 0 prints the one line."""
    script = tmp_path / "train_with_nan.py"
    script.write_text(DDP_SCRIPT)
    terms = [{"name": "nan_on_rank_1", "lambda": 1.0}]
    cfg = write(tmp_path, cfg_dict(tmp_path, loss_terms=terms, batch_size=4, dist_timeout_min=1.0))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), "--config", cfg]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode != 0, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "training diverged" in ln]
    assert errors == ["error: training diverged: loss term loss_terms[0] (nan_on_rank_1) is not finite at epoch 1/3, "
                      "step 4/6 on rank 1; no checkpoint was written (the first epoch diverged); lower the learning "
                      "rate or λ"], r.stderr
    assert "exitcode  : 3" in r.stderr  # torchrun's failure summary names our exit code
    assert "[rank" not in r.stderr and "codeq/train" not in r.stderr  # no per-rank traceback
