"""The trainer end to end on the synthetic data (in-process CLI): each model
family, run directory contents, metrics, report, determinism and resume."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from codeq.checkpoint import CHECKPOINT_KEYS, load_checkpoint
from codeq.train.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    "mlp": ({"hidden": [16]}, [], 32),
    "resnet20": ({"num_blocks": [1, 1, 1], "width": 4}, ["bn"], 32),
    "vit": ({"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}, ["norm"], 32),
}


def tiny(tmp_path, model="mlp", **over) -> dict:
    kw, exclude, img = MODELS[model]
    d = {
        "model": model,
        "model_kwargs": kw,
        "img_size": img,
        "epochs": 2,
        "batch_size": 16,
        "device": "cpu",
        "workers": 0,
        "seed": 0,
        "save_dir": str(tmp_path / "runs"),
        "run_name": "t",
        "dataset": {"name": "synthetic", "train_size": 48, "val_size": 32},
        "quantizer": {"name": "deadzone", "kwargs": {"max_bits": 8, "fixed_bit_val": 8}, "exclude_layers": exclude},
        "optimizer": {"type": "adamw", "param_groups": {
            "base": {"lr": 0.001}, "dz": {"lr": 0.01, "weight_decay": 2.5}, "bit": {"lr": 0.001}}},
        "loss_terms": [{"name": "group_lasso", "lambda": 1.0, "kwargs": {"lambda_linear": 0.001, "lambda_conv": 0.001}}],
    }
    d.update(over)
    return d


def write(tmp_path, d, name="c.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return str(p)


def run_dirs(tmp_path, sub="runs"):
    return sorted(glob.glob(str(tmp_path / sub / "*")))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("model", ["mlp", "resnet20", "vit"])
def test_cli_end_to_end_each_model(tmp_path, capsys, model):
    rc = main(["--config", write(tmp_path, tiny(tmp_path, model))])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (run,) = run_dirs(tmp_path)
    assert os.path.basename(run).startswith("t-")
    files = set(os.listdir(run))
    assert {"config.yaml", "metrics.jsonl", "checkpoint.th"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    # the resolved config: defaults filled in
    saved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert saved["model"] == model and saved["lr_scheduler"] == "cosine" and saved["dataset"]["augment"] == "standard"
    recs = read_metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time", "sparsity_mean", "bits_mean",
                  "deadzone_width_mean", "layers"):
            assert r[k] is not None, k
        assert 0 <= r["val_acc"] <= 1 and r["train_loss"] > 0
        for name, st in r["layers"].items():
            assert 0 <= st["sparsity"] <= 1 and st["bits"] == 8 and st["deadzone_width"] >= 0
            assert "bn" not in name and "norm" not in name
    assert recs[1]["lr"] < recs[0]["lr"]  # cosine schedule
    ckpt = load_checkpoint(os.path.join(run, "checkpoint.th"))
    assert set(CHECKPOINT_KEYS) <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["config"]["model"] == model
    # the compression report of codeq.report is written at the end
    assert "compression_report.json" in files and "relative BOPs" in out


def test_layer_stats_match_the_model(tmp_path):
    """Per-layer sparsity and bit-width in metrics.jsonl are those of the final model."""
    from torch.nn.utils import parametrize

    from codeq.parametrize import iter_quantizers
    from codeq.train.trainer import build_run_model as build_model
    from codeq.train.config import config_from_dict

    assert main(["--config", write(tmp_path, tiny(tmp_path, epochs=1))]) == 0
    (run,) = run_dirs(tmp_path)
    rec = read_metrics(run)[-1]
    ckpt = load_checkpoint(os.path.join(run, "checkpoint.th"))
    model = build_model(config_from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    with torch.no_grad(), parametrize.cached():
        for name, module, q in iter_quantizers(model):
            st = rec["layers"][name]
            assert st["sparsity"] == pytest.approx((module.weight == 0).double().mean().item(), abs=1e-12)
            assert st["bits"] == q.get_bitwidth().item()
    assert rec["sparsity_mean"] == pytest.approx(sum(s["sparsity"] for s in rec["layers"].values()) / len(rec["layers"]))


def test_baseline_no_quantizer_and_sgd(tmp_path):
    d = tiny(tmp_path, epochs=1, lr_scheduler="none",
             optimizer={"type": "sgd", "param_groups": {"base": {"lr": 0.05, "momentum": 0.9, "nesterov": True}}})
    del d["quantizer"], d["loss_terms"]
    assert main(["--config", write(tmp_path, d)]) == 0
    (run,) = run_dirs(tmp_path)
    rec = read_metrics(run)[0]
    assert "layers" not in rec and rec["lr"] == 0.05
    ckpt = load_checkpoint(os.path.join(run, "checkpoint.th"))
    assert ckpt["scheduler"] is None
    g = ckpt["optimizer"]["param_groups"]
    assert len(g) == 1 and g[0]["momentum"] == 0.9 and g[0]["nesterov"] is True


def test_same_seed_same_numbers(tmp_path):
    for sub in ("a", "b"):
        assert main(["--config", write(tmp_path, tiny(tmp_path, epochs=1)), "--set", f"save_dir={tmp_path / sub}"]) == 0
    (a,), (b,) = run_dirs(tmp_path, "a"), run_dirs(tmp_path, "b")
    ra, rb = read_metrics(a)[0], read_metrics(b)[0]
    for k in ("train_loss", "val_loss", "val_acc", "sparsity_mean"):
        assert ra[k] == rb[k]
    assert main(["--config", write(tmp_path, tiny(tmp_path, epochs=1)), "--set", f"save_dir={tmp_path / 'c'}",
                 "--set", "seed=1"]) == 0
    (c,) = run_dirs(tmp_path, "c")
    assert read_metrics(c)[0]["train_loss"] != ra["train_loss"]


# The paper's ResNet recipe: SGD for the weights and AdamW for the logits (two torch optimizers
# stepped as one), the theta regulariser and a warmup (a LambdaLR: its checkpoint must load with
# weights_only) that ends after the first epoch.
PAPER_RECIPE = dict(
    warmup_epochs=1, epochs=3, quantizer={"name": "deadzone", "kwargs": {"learnable_bit": True}},
    optimizer={"type": "sgd", "param_groups": {"base": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
                                               "dz": {"type": "adamw", "lr": 0.05},
                                               "bit": {"type": "adamw", "lr": 0.05}}},
    loss_terms=[{"name": "theta_l2", "kwargs": {"lambda_dz": 0.01, "lambda_bit": 0.01}}])


@pytest.mark.parametrize("recipe", [{}, PAPER_RECIPE], ids=["adamw", "sgd_adamw_warmup"])
def test_resume_equals_uninterrupted(tmp_path, capsys, recipe):
    """2 epochs straight == 1 epoch, stop, --resume for the rest (losses exactly equal)."""
    d = tiny(tmp_path, epochs=2, dataset={"name": "synthetic", "train_size": 48, "val_size": 32, "augment": "standard"})
    d.update(recipe)
    cfg = write(tmp_path, d)
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 'straight'}"]) == 0
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 'split'}", "--stop-after", "1"]) == 0
    (split,) = run_dirs(tmp_path, "split")
    assert [r["epoch"] for r in read_metrics(split)] == [1]
    assert not os.path.exists(os.path.join(split, "compression_report.json"))  # not finished yet
    ckpt_path = os.path.join(split, "checkpoint.th")
    assert load_checkpoint(ckpt_path)["epoch"] == 1
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 'split'}", "--resume", ckpt_path]) == 0
    assert run_dirs(tmp_path, "split") == [split]  # continued in the same run directory
    (straight,) = run_dirs(tmp_path, "straight")
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["epoch"] for r in b] == list(range(1, d["epochs"] + 1))
    for ra, rb in zip(a, b):
        for k in ("train_loss", "train_ce", "train_acc", "val_loss", "val_acc", "lr", "sparsity_mean", "bits_mean"):
            assert ra[k] == rb[k], (k, ra[k], rb[k])
        assert ra["layers"] == rb["layers"] or all(
            ra["layers"][n]["sparsity"] == rb["layers"][n]["sparsity"] for n in ra["layers"])
    ca, cb = load_checkpoint(os.path.join(straight, "checkpoint.th")), load_checkpoint(ckpt_path)
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert [g["lr"] for g in ca["optimizer"]["param_groups"]] == [g["lr"] for g in cb["optimizer"]["param_groups"]]
    for i, st in ca["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, cb["optimizer"]["state"][i][k]), (i, k)


def test_resume_incompatible_config_is_exit_2(tmp_path, capsys):
    cfg = write(tmp_path, tiny(tmp_path, epochs=2))
    assert main(["--config", cfg, "--stop-after", "1"]) == 0
    (run,) = run_dirs(tmp_path)
    ckpt = os.path.join(run, "checkpoint.th")
    capsys.readouterr()
    for override in (["model_kwargs.hidden=[32]"], ["quantizer.kwargs.max_bits=4"],
                     ["model=resnet20", "model_kwargs={}"], ["quantizer.exclude_layers=[fc1]"]):
        rc = main(["--config", cfg, "--resume", ckpt] + [a for o in override for a in ("--set", o)])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.splitlines()) == 1 and "cannot resume" in err, (override, err)
    d = tiny(tmp_path, epochs=2)
    del d["quantizer"]
    rc = main(["--config", write(tmp_path, d, "noq.yaml"), "--resume", ckpt])
    err = capsys.readouterr().err
    assert rc == 2 and "quantizer" in err
    # a finished run cannot be resumed without more epochs
    assert main(["--config", cfg, "--resume", ckpt]) == 0
    capsys.readouterr()
    assert main(["--config", cfg, "--resume", ckpt]) == 2
    assert "--set epochs=" in capsys.readouterr().err
    # missing and corrupt checkpoints
    assert main(["--config", cfg, "--resume", str(tmp_path / "nope.th")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["--config", cfg, "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot read checkpoint" in err


def test_resume_with_more_epochs_extends_cosine(tmp_path):
    cfg = write(tmp_path, tiny(tmp_path, epochs=1))
    assert main(["--config", cfg]) == 0
    (run,) = run_dirs(tmp_path)
    assert main(["--config", cfg, "--resume", os.path.join(run, "checkpoint.th"), "--set", "epochs=3"]) == 0
    recs = read_metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    ckpt = load_checkpoint(os.path.join(run, "checkpoint.th"))
    assert ckpt["epoch"] == 3 and ckpt["scheduler"]["T_max"] == 3
    assert yaml.safe_load(open(os.path.join(run, "config.yaml")))["epochs"] == 3


def test_best_checkpoint_written(tmp_path):
    assert main(["--config", write(tmp_path, tiny(tmp_path, epochs=1))]) == 0
    (run,) = run_dirs(tmp_path)
    recs = read_metrics(run)
    if recs[0]["val_acc"] > 0:
        best = load_checkpoint(os.path.join(run, "best.th"))
        assert best["best_acc"] == recs[0]["val_acc"] == recs[0]["best_acc"]


def test_subprocess_demo_like_run(tmp_path):
    """run_training.py as a script: exit 0, plain log lines (stderr is not a TTY)."""
    cfg = write(tmp_path, tiny(tmp_path, epochs=1))
    r = subprocess.run([sys.executable, os.path.join(REPO, "run_training.py"), "--config", cfg],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1 train_loss" in r.stdout and "done:" in r.stdout
    assert "Traceback" not in r.stderr


def test_synthetic_is_learnable(tmp_path):
    d = tiny(tmp_path, epochs=3, batch_size=32, model_kwargs={"hidden": [32]},
             dataset={"name": "synthetic", "train_size": 640, "val_size": 100, "augment": "none"})
    del d["quantizer"], d["loss_terms"]
    d["optimizer"] = {"type": "adam", "param_groups": {"base": {"lr": 0.001}}}
    assert main(["--config", write(tmp_path, d)]) == 0
    (run,) = run_dirs(tmp_path)
    assert read_metrics(run)[-1]["val_acc"] > 0.5  # chance is 0.1


@pytest.mark.slow
def test_use_compile(tmp_path):
    assert main(["--config", write(tmp_path, tiny(tmp_path, epochs=1, use_compile=1))]) == 0
    (run,) = run_dirs(tmp_path)
    ckpt = load_checkpoint(os.path.join(run, "checkpoint.th"))
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
