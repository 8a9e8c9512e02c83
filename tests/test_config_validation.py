"""Config validation and the CLI's handling of user mistakes: exit code 2, one
``error: ...`` line on stderr, nothing written to disk."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import yaml

from codeq.train.cli import main
from codeq.train.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_dict(save_dir) -> dict:
    return {
        "model": "mlp",
        "model_kwargs": {"hidden": [8]},
        "epochs": 1,
        "batch_size": 16,
        "device": "cpu",
        "workers": 0,
        "save_dir": str(save_dir),
        "run_name": "cfgtest",
        "dataset": {"name": "synthetic", "train_size": 32, "val_size": 16},
        "quantizer": {"name": "deadzone", "kwargs": {"max_bits": 8}, "exclude_layers": []},
        "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 0.001}, "dz": {"lr": 0.01, "weight_decay": 2.5}}},
        "loss_terms": [{"name": "group_lasso", "lambda": 1.0, "kwargs": {"lambda_linear": 0.001}}],
    }


def _set(d, dotted, value):
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d[int(p)] if isinstance(d, list) else d[p]
    if value is _DELETE:
        del d[parts[-1]]
    elif isinstance(d, list):
        d[int(parts[-1])] = value
    else:
        d[parts[-1]] = value


_DELETE = object()

# (mutation, extra CLI args, substrings the one error line must contain)
BAD = [
    ("unknown_key", {"epochz": 3}, [], ["unknown key 'epochz'", "did you mean 'epochs'"]),
    ("unknown_nested_key", {"dataset.rooot": "x"}, [], ["'dataset.rooot'", "did you mean 'root'"]),
    ("bad_type", {"epochs": "ten"}, [], ["epochs must be an integer", "'ten'"]),
    ("bad_type_float", {"optimizer.param_groups.base.lr": "fast"}, [], ["optimizer.param_groups.base.lr must be a number"]),
    ("bad_bool", {"use_compile": 7}, [], ["use_compile must be true/false"]),
    ("unknown_model", {"model": "resnet99"}, [], ["unknown model 'resnet99'", "mlp, resnet18, resnet20, resnet50, tiny_vit, vit"]),
    ("unknown_quantizer", {"quantizer.name": "dedzone"}, [], ["unknown quantizer 'dedzone'", "deadzone, uniform"]),
    ("unknown_optimizer", {"optimizer.type": "rmsprop"}, [], ["unknown optimizer 'rmsprop'", "adam, adamw, sgd"]),
    ("unknown_scheduler", {"lr_scheduler": "step"}, [], ["unknown lr_scheduler 'step'", "cosine, none"]),
    ("unknown_dataset", {"dataset.name": "imagenet"}, [], ["unknown dataset 'imagenet'", "cifar10, imagefolder, synthetic"]),
    ("unknown_loss", {"loss_terms.0.name": "l1"}, [], ["unknown loss term 'l1'", "group_lasso, theta_l2"]),
    ("unknown_quantizer_kwarg", {"quantizer.kwargs.max_bit": 4}, [], ["quantizer.kwargs.max_bit", "did you mean 'max_bits'"]),
    ("unknown_optimizer_kwarg", {"optimizer.param_groups.base.momentum": 0.9}, [], ["momentum", "adamw"]),
    ("unknown_model_kwarg", {"model_kwargs.hiden": [4]}, [], ["model_kwargs.hiden", "did you mean 'hidden'"]),
    ("missing_model", {"model": _DELETE}, [], ["missing required key 'model'"]),
    ("missing_epochs", {"epochs": _DELETE}, [], ["missing required key 'epochs'"]),
    ("missing_lr", {"optimizer.param_groups.base.lr": _DELETE}, [], ["missing required key 'optimizer.param_groups.base.lr'"]),
    ("missing_base_group", {"optimizer.param_groups.base": _DELETE}, [], ["'optimizer.param_groups.base'"]),
    ("bad_device_name", {"device": "gpu"}, [], ["unknown device 'gpu'", "cpu, cuda"]),
    ("bad_quantizer_value", {"quantizer.kwargs.max_bits": 30}, [], ["max_bits", "30"]),
    ("missing_dataset", {"dataset": {"name": "cifar10", "root": "NOPE"}}, [],
     ["CIFAR-10 not found", "NOPE", "cifar-10-batches-py", "cifar-10-batches-bin"]),
    ("cuda_graph_with_compile", {"cuda_graph": True, "use_compile": True}, [],
     ["cuda_graph and use_compile cannot be combined"]),
    ("cuda_graph_on_cpu", {"cuda_graph": True}, [], ["cuda_graph: true needs a CUDA device", "'cpu'"]),
    ("bad_set_syntax", {}, ["--set", "epochs"], ["--set expects key.sub=value"]),
    ("missing_config_file", None, [], ["config file not found"]),
]


@pytest.mark.parametrize("name,mutation,extra,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_config_exit_2_one_line_nothing_written(tmp_path, capsys, name, mutation, extra, expect):
    save = tmp_path / "runs"
    cfg_path = tmp_path / "c.yaml"
    if mutation is not None:
        d = base_dict(save)
        for k, v in mutation.items():
            _set(d, k, v)
        cfg_path.write_text(yaml.safe_dump(d))
    rc = main(["--config", str(cfg_path), *extra])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for s in expect:
        assert s in lines[0], (s, lines[0])
    assert "Traceback" not in err
    assert not save.exists(), "nothing may be written on a config error"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")
def test_cuda_without_gpu_is_one_line_error(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base_dict(tmp_path / "runs")))
    rc = main(["--config", str(p), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1
    assert "no CUDA GPU" in err and "--device cpu" in err
    assert not (tmp_path / "runs").exists()


def test_mps_off_mac_is_one_line_error(tmp_path, capsys):
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base_dict(tmp_path / "runs")))
    assert main(["--config", str(p), "--device", "mps"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--device cpu" in err


def test_subprocess_exit_codes(tmp_path):
    """The real script: exit 2 with one stderr line and no traceback."""
    d = base_dict(tmp_path / "runs")
    d["optimiser"] = d.pop("optimizer")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, os.path.join(REPO, "run_training.py"), "--config", str(p)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "unknown key 'optimiser'" in r.stderr and "did you mean 'optimizer'" in r.stderr
    # argparse mistakes too: one line, exit 2
    r = subprocess.run([sys.executable, os.path.join(REPO, "run_training.py")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--config" in r.stderr


def test_defaults_and_round_trip(tmp_path):
    cfg = config_from_dict(base_dict(tmp_path))
    assert cfg.seed == 0 and cfg.lr_scheduler == "cosine" and cfg.img_size == 32
    assert cfg.dataset.root == "data" and cfg.dataset.download is False and cfg.dataset.augment == "standard"
    assert cfg.optimizer.param_groups.bit is None and cfg.optimizer.param_groups.dz.weight_decay == 2.5
    assert cfg.optimizer.param_groups.base.weight_decay == 0.0
    assert cfg.loss_terms[0].lam == 1.0 and cfg.loss_terms[0].kwargs == {"lambda_linear": 0.001}
    d = config_to_dict(cfg)
    assert config_from_dict(copy.deepcopy(d)) == cfg
    # plain YAML-able builtins
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_bool_accepts_0_1_and_lists_of_betas(tmp_path):
    d = base_dict(tmp_path)
    d["use_compile"] = 0
    d["optimizer"]["param_groups"]["base"]["betas"] = [0.8, 0.99]
    cfg = config_from_dict(d)
    assert cfg.use_compile is False
    assert cfg.optimizer.param_groups.base.hparams()["betas"] == (0.8, 0.99)


def test_set_overrides_parse_yaml_scalars(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base_dict(tmp_path)))
    cfg = load_config(str(p), overrides=[
        "epochs=7", "optimizer.param_groups.base.lr=1e-2", "dataset.download=true", "run_name=abc",
        "loss_terms.0.lambda=0.5", "model_kwargs.hidden=[4, 5]", "optimizer.param_groups.bit.lr=0.002",
    ], device="cpu")
    assert cfg.epochs == 7 and cfg.optimizer.param_groups.base.lr == 0.01 and cfg.dataset.download is True
    assert cfg.run_name == "abc" and cfg.loss_terms[0].lam == 0.5 and cfg.model_kwargs == {"hidden": [4, 5]}
    assert cfg.optimizer.param_groups.bit.lr == 0.002  # a new group created by --set
    with pytest.raises(ConfigError, match="index"):
        apply_overrides(base_dict(tmp_path), ["loss_terms.3.lambda=1"])


def test_device_flag_overrides_yaml(tmp_path):
    d = base_dict(tmp_path)
    d["device"] = "cuda"
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    assert load_config(str(p), device="cpu").device == "cpu"


def test_shipped_configs_validate():
    for name in ("baseline_resnet20", "deadzone_resnet20", "deadzone_vit", "deadzone_mlp", "baseline_mlp", "demo"):
        cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
        assert cfg.epochs >= 1
    dz = load_config(os.path.join(REPO, "configs", "deadzone_resnet20.yaml"))
    assert dz.quantizer.name == "deadzone" and dz.quantizer.exclude_layers == ["bn"]
    assert dz.optimizer.param_groups.dz.weight_decay == 2.5 and dz.loss_terms[0].kwargs == {"lambda_linear": 0.1, "lambda_conv": 0.1}
    base = load_config(os.path.join(REPO, "configs", "baseline_resnet20.yaml"))
    assert base.quantizer is None and base.optimizer.type == "sgd" and base.optimizer.param_groups.base.extra == {"momentum": 0.9}
    vit = load_config(os.path.join(REPO, "configs", "deadzone_vit.yaml"))
    assert vit.img_size == 224 and vit.quantizer.exclude_layers == ["norm"]
    bm = load_config(os.path.join(REPO, "configs", "baseline_mlp.yaml"))
    assert bm.quantizer is None and bm.loss_terms == []


def test_exponent_floats_in_yaml_are_numbers(tmp_path):
    """PyYAML alone reads `1e-3` as a string; the trainer's loader reads it as a float."""
    text = yaml.safe_dump(base_dict(tmp_path)).replace("lr: 0.001", "lr: 1e-3")
    assert "lr: 1e-3" in text
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert load_config(str(p)).optimizer.param_groups.base.lr == 0.001


def test_cuda_graph_refuses_other_optimizer_classes(tmp_path, monkeypatch):
    """A registry entry under a graph-capable name that is not torch's Adam/AdamW/SGD."""
    from codeq.registry import OPTIMIZER_REGISTRY

    monkeypatch.setitem(OPTIMIZER_REGISTRY, "sgd", torch.optim.RMSprop)
    d = base_dict(tmp_path)
    d["optimizer"] = {"type": "sgd", "param_groups": {"base": {"lr": 0.01}}}
    d["cuda_graph"] = True
    with pytest.raises(ConfigError, match="cuda_graph works with torch's Adam, AdamW and SGD"):
        config_from_dict(d)


def test_cuda_graph_builds_a_fused_capturable_adamw(tmp_path):
    from codeq.train.optim import build_optimizer
    from codeq.train.trainer import build_run_model

    d = base_dict(tmp_path)
    d["cuda_graph"] = True
    cfg = config_from_dict(d)
    assert config_to_dict(cfg)["cuda_graph"] is True
    opt = build_optimizer(cfg, build_run_model(cfg))
    assert type(opt) is torch.optim.AdamW  # torch's own step (capturable), not the lean one
    assert opt.defaults["fused"] is True and opt.defaults["capturable"] is True


def test_cuda_graph_auto_is_off_where_graphs_cannot_run(tmp_path, capsys):
    """auto: on for one process on CUDA with a capturable optimizer; here (CPU, or with
    use_compile) it is off without a word, and the eager optimizer is the lean fused one."""
    from codeq.train.optim import graph_capable
    from codeq.train.trainer import Trainer

    d = base_dict(tmp_path / "runs")
    d["cuda_graph"] = "auto"
    cfg = config_from_dict(d)
    assert cfg.cuda_graph == "auto" and config_to_dict(cfg)["cuda_graph"] == "auto"
    tr = Trainer.from_config(cfg, "cpu")
    assert tr.graph is None
    assert type(tr.optimizer).__module__ == "codeq.train.optim"  # not a capturable one
    d["use_compile"] = True
    assert config_from_dict(d).cuda_graph == "auto"  # no error: auto just stays off
    assert not graph_capable(config_from_dict(d))
    p = tmp_path / "c.yaml"
    d["use_compile"] = False
    p.write_text(yaml.safe_dump(d))
    assert main(["--config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "model mlp on cpu" in out and "CUDA graphs" not in out


def test_docs_config_table_is_the_schema():
    """docs/TRAINING.md's reference table is generated from the schema (`make docs`)."""
    from codeq.train.config import TABLE_END, TABLE_START, markdown_table

    with open(os.path.join(REPO, "docs", "TRAINING.md"), encoding="utf-8") as f:
        text = f.read()
    assert TABLE_START in text and TABLE_END in text
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == markdown_table(), "docs/TRAINING.md's config table differs from the schema: run `make docs`"


def test_a_key_is_one_declaration(tmp_path):
    """A key declared once (a field with key(...)) is read, checked, defaulted, written
    back, suggested for a typo, documented and compared on resume without another line."""
    import dataclasses

    from codeq.train import config as C

    @dataclasses.dataclass(kw_only=True)
    class Extended(C.Config):
        grad_clip: float | None = C.key(None, "clip gradients to this norm", minimum=0, resume=True)

    d = base_dict(tmp_path)
    assert C._section("", copy.deepcopy(d), Extended).grad_clip is None
    d["grad_clip"] = 2
    cfg = C._section("", copy.deepcopy(d), Extended)
    assert cfg.grad_clip == 2.0 and C._to_plain(cfg)["grad_clip"] == 2.0
    for value, message in ((-1, "grad_clip must be at least 0"), ("x", "grad_clip must be a number or null")):
        with pytest.raises(ConfigError, match=message):
            C._section("", dict(d, grad_clip=value), Extended)
    with pytest.raises(ConfigError, match="did you mean 'grad_clip'"):
        C._section("", dict(d, grad_clipp=1.0), Extended)
    assert "grad_clip" in C.resume_keys(Extended)
    assert any(row[0] == "grad_clip" and row[2] == "`null`" for row in C._rows(Extended, ""))
