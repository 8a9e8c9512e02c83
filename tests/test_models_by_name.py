"""Any timm or torchvision model by name (``model: timm/<arch>``,
``model: torchvision/<arch>``): built with quantizers attached, num_classes
from the data set, a local pretrained_path, one-line errors, and a real run
of the trainer's CLI whose checkpoint rebuilds the model."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import yaml
from torch import nn

from codeq.checkpoint import load_model
from codeq.errors import ConfigError
from codeq.models import build_model, model_num_classes, resolve_model
from codeq.parametrize import iter_quantizers
from codeq.train.cli import main
from codeq.train.config import config_from_dict, config_to_dict

QUANTIZER = {"name": "deadzone", "kwargs": {}, "exclude_layers": ["bn"]}


def base(tmp_path, model="timm/resnet10t", **over) -> dict:
    d = {
        "model": model,
        "epochs": 1,
        "batch_size": 16,
        "device": "cpu",
        "workers": 0,
        "save_dir": str(tmp_path / "runs"),
        "run_name": "byname",
        "dataset": {"name": "synthetic", "train_size": 32, "val_size": 16},
        "quantizer": copy.deepcopy(QUANTIZER),
        "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 0.001}}},
    }
    d.update(over)
    return d


@pytest.mark.parametrize("name,num_classes", [("timm/resnet10t", 10), ("torchvision/mobilenet_v3_small", 7)])
def test_build_with_quantizers(name, num_classes):
    torch.manual_seed(0)
    model = build_model(name, img_size=32, model_kwargs={"num_classes": num_classes}, quantizer=QUANTIZER)
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    quantized = {id(m) for _, m, _ in iter_quantizers(model)}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(id(m) in quantized for _, m in layers), [n for n, m in layers if id(m) not in quantized]
    assert not any("bn" in n for n, _, _ in iter_quantizers(model))


def test_num_classes_from_the_data_set(tmp_path):
    cfg = config_from_dict(base(tmp_path, dataset={"name": "cifar10", "root": str(tmp_path)}))
    assert cfg.model_kwargs == {"num_classes": 10}
    d = config_to_dict(cfg)
    assert d["model_kwargs"]["num_classes"] == 10 and config_from_dict(d) == cfg  # saved, round trip
    cfg = config_from_dict(base(tmp_path, "torchvision/mobilenet_v3_small", model_kwargs={"num_classes": 100}))
    assert cfg.model_kwargs == {"num_classes": 100}
    assert model_num_classes(resolve_model(cfg.model), cfg.model_kwargs) == 100
    with pytest.raises(ConfigError, match="has 10 classes"):  # fewer outputs than the data set's labels
        config_from_dict(base(tmp_path, model_kwargs={"num_classes": 5}))
    # registered models keep num_classes reserved
    with pytest.raises(ConfigError, match="num_classes"):
        config_from_dict(base(tmp_path, "mlp", model_kwargs={"num_classes": 5}))


def test_imagefolder_needs_num_classes(tmp_path):
    d = base(tmp_path, dataset={"name": "imagefolder", "root": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"model_kwargs\.num_classes") as exc:
        config_from_dict(d)
    assert "\n" not in str(exc.value)
    d["model_kwargs"] = {"num_classes": 3}
    assert config_from_dict(d).model_kwargs == {"num_classes": 3}


@pytest.mark.parametrize("name,expect", [
    ("timm/resnet10tt", ["unknown timm model 'resnet10tt'", "did you mean 'resnet10t'"]),
    ("torchvision/mobilenetv3_small", ["unknown torchvision model 'mobilenetv3_small'",
                                       "did you mean 'mobilenet_v3_small'"]),
    ("torchvision/fasterrcnn_resnet50_fpn", ["'fasterrcnn_resnet50_fpn' is not an image classifier"]),
    ("timm/", ["names no architecture"]),
    ("tim/resnet10t", ["'tim/' is not a model source", "did you mean 'timm'"]),
    ("resnet99", ["unknown model 'resnet99'", "timm/<name>"]),
])
def test_unknown_model_one_line(tmp_path, name, expect):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(base(tmp_path, name))
    msg = str(exc.value)
    assert "\n" not in msg
    for s in expect:
        assert s in msg, (s, msg)


def test_no_download_kwargs(tmp_path):
    for name, k in (("timm/resnet10t", "pretrained"), ("torchvision/mobilenet_v3_small", "weights")):
        with pytest.raises(ConfigError, match="never downloads"):
            config_from_dict(base(tmp_path, name, model_kwargs={k: True}))
        with pytest.raises(ConfigError, match="never downloads"):
            build_model(name, model_kwargs={k: True})


def test_pretrained_path(tmp_path):
    torch.manual_seed(0)
    src = build_model("timm/resnet10t", model_kwargs={"num_classes": 10})
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    plain = build_model("timm/resnet10t", model_kwargs={"num_classes": 10})
    torch.manual_seed(1)
    loaded = build_model("timm/resnet10t", model_kwargs={"num_classes": 10, "pretrained_path": str(path)},
                         quantizer=QUANTIZER)
    w = src.state_dict()["fc.weight"]
    assert not torch.equal(plain.state_dict()["fc.weight"], w)
    assert torch.equal(loaded.fc.parametrizations.weight.original, w)
    with pytest.raises(ConfigError, match="does not fit"):  # another class count
        build_model("timm/resnet10t", model_kwargs={"num_classes": 5, "pretrained_path": str(path)})


def test_cli_end_to_end_and_checkpoint(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base(tmp_path)))
    rc = main(["--config", str(p)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (run,) = sorted((tmp_path / "runs").iterdir())
    saved = yaml.safe_load(open(run / "config.yaml"))
    assert saved["model"] == "timm/resnet10t" and saved["model_kwargs"] == {"num_classes": 10}
    model, config, ckpt = load_model(os.fspath(run / "checkpoint.th"))
    assert config["model"] == "timm/resnet10t"
    assert len(list(iter_quantizers(model))) > 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
