"""The paper's experiments as configs (configs/paper/), the theta_l2 loss term,
the ImageNet models (local pretrained weights) and the imagefolder data set."""

import glob
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import codeq
from codeq.losses import theta_l2
from codeq.models import example_input, load_pretrained, model_num_classes
from codeq.registry import LOSS_REGISTRY, MODEL_REGISTRY
from codeq.train.data import build_datasets
from codeq.train.optim import build_optimizer, lean_class
from codeq.train.trainer import build_run_model as build_model
from codeq.train.cli import main
from codeq.train.config import ConfigError, config_from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "configs", "paper")
NO_WEIGHTS = ["model_kwargs.pretrained_path=null"]

# The paper's section 6.1 (shared/paper/RESULTS.md), per config: model, epochs, batch, precision,
# theta lr (1e-3 from scratch, 1e-4 fine-tuned), lambda_dz / lambda_bit (fixed 4-bit: the MP run's
# lambda_dz), the weights' optimizer and lr.
EXPECTED = {
    "resnet20_cifar10_baseline": dict(model="resnet20", epochs=300, batch=512, mixed=None, opt="sgd", lr=0.4),
    "resnet20_cifar10_fixed4": dict(model="resnet20", epochs=300, batch=512, mixed=False, theta_lr=1e-3, ldz=0.01,
                                    lbit=0.0, opt="sgd", lr=0.4),
    "resnet20_cifar10_mixed": dict(model="resnet20", epochs=300, batch=512, mixed=True, theta_lr=1e-3, ldz=0.01,
                                   lbit=0.01, opt="sgd", lr=0.4),
    "tinyvit_cifar10_fixed4": dict(model="tiny_vit", epochs=200, batch=128, mixed=False, theta_lr=1e-3, ldz=0.5,
                                   lbit=0.0, opt="adamw", lr=3e-4),
    "tinyvit_cifar10_mixed": dict(model="tiny_vit", epochs=200, batch=128, mixed=True, theta_lr=1e-3, ldz=0.5,
                                  lbit=0.75, opt="adamw", lr=3e-4),
    "resnet18_imagenet_fixed4": dict(model="resnet18", epochs=120, batch=512, mixed=False, theta_lr=1e-4, ldz=0.02,
                                     lbit=0.0, opt="sgd", lr=0.02),
    "resnet18_imagenet_mixed": dict(model="resnet18", epochs=120, batch=512, mixed=True, theta_lr=1e-4, ldz=0.02,
                                    lbit=0.1, opt="sgd", lr=0.02),
    "resnet50_imagenet_fixed4": dict(model="resnet50", epochs=120, batch=256, mixed=False, theta_lr=1e-4, ldz=0.02,
                                     lbit=0.0, opt="sgd", lr=0.01),
    "resnet50_imagenet_mixed": dict(model="resnet50", epochs=120, batch=256, mixed=True, theta_lr=1e-4, ldz=0.02,
                                    lbit=0.05, opt="sgd", lr=0.01),
}
PAPER_FILES = sorted(glob.glob(os.path.join(PAPER, "*.yaml")))


def test_paper_config_set_is_complete():
    assert sorted(os.path.splitext(os.path.basename(f))[0] for f in PAPER_FILES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: os.path.basename(p))
def test_paper_config_validates_and_builds(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    exp = EXPECTED[stem]
    imagenet = "imagenet" in stem
    cfg = load_config(path, overrides=NO_WEIGHTS if imagenet else [])
    assert cfg.model == exp["model"] and cfg.epochs == exp["epochs"] and cfg.batch_size == exp["batch"]
    assert cfg.lr_scheduler == "cosine"
    base = cfg.optimizer.param_groups.base
    assert (base.type or cfg.optimizer.type) == exp["opt"] and base.lr == pytest.approx(exp["lr"])
    if exp["opt"] == "sgd":  # the ResNet recipe: momentum and weight decay on the weights
        assert base.extra["momentum"] == 0.9 and base.weight_decay == 1e-4
    else:
        assert base.weight_decay == 0.0
    if stem.startswith("resnet20"):  # the original ResNet augmentation, no RandAugment
        assert cfg.dataset.augment == "standard"
    if imagenet:
        assert cfg.dataset.name == "imagefolder" and cfg.img_size == 224
        assert load_yaml_raw(path)["model_kwargs"]["pretrained_path"]  # the file names a weights file
    if exp["mixed"] is None:  # the fp32 baseline
        assert cfg.quantizer is None and not cfg.loss_terms
        assert not list(codeq.iter_quantizers(build_model(cfg)))
        return
    q = cfg.quantizer.kwargs
    assert cfg.quantizer.name == "deadzone" and q["learnable_bit"] is exp["mixed"] and q["learnable_deadzone"] is True
    assert q["init_deadzone_logit"] == 3.0 and q["init_bit_logit"] == 3.0
    assert (q["min_bits"], q["max_bits"]) == (2, 8)
    if not exp["mixed"]:
        assert q["fixed_bit_val"] == 4
    # the paper's form of the theta regulariser: a loss term, no weight decay on theta
    (term,) = cfg.loss_terms
    assert term.name == "theta_l2" and term.lam == 1.0
    assert term.kwargs["lambda_dz"] == exp["ldz"] and term.kwargs["lambda_bit"] == exp["lbit"]
    for g in (cfg.optimizer.param_groups.dz, cfg.optimizer.param_groups.bit):
        assert g.lr == exp["theta_lr"] and g.weight_decay == 0.0
        assert (g.type or cfg.optimizer.type) == "adamw"  # the logits: AdamW, as the authors' code

    model = build_model(cfg)
    quantized = list(codeq.iter_quantizers(model))
    assert quantized and all(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m, _ in quantized)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for _, m, _ in quantized)
    opt = build_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == ({"base", "dz", "bit"} if exp["mixed"] else {"base", "dz"})
    if exp["opt"] == "sgd":  # SGD for the weights, AdamW for the logits: one optimizer per kind
        assert [type(p) for p in opt.parts] == [torch.optim.SGD, lean_class(torch.optim.AdamW)]
    n_out = [m for _, m, _ in quantized][-1].out_features
    assert n_out == (1000 if imagenet else 10)
    # the regulariser at theta = 3: lambda_dz * 9 * L (+ lambda_bit * 9 * L)
    value = theta_l2(model, **term.kwargs)
    L = len(quantized)
    want = term.kwargs["lambda_dz"] * 9 * L + (term.kwargs["lambda_bit"] * 9 * L if exp["mixed"] else 0.0)
    assert value.item() == pytest.approx(want, rel=1e-6)


def load_yaml_raw(path):
    with open(path) as f:
        return yaml.safe_load(f)


# ----------------------------------------------------------------- theta_l2 --
def _quantized_model(learnable_bit=True, learnable_deadzone=True):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 3))
    codeq.attach_weight_quantizers(model, quantizer="deadzone",
                                   quantizer_kwargs=dict(learnable_bit=learnable_bit, learnable_deadzone=learnable_deadzone))
    return model


def _set_logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    dz, bit = [], []
    with torch.no_grad():
        for _, _, q in codeq.iter_quantizers(model):
            q.logit_dz.copy_(torch.randn((), generator=g) * 3)
            q.logit_bit.copy_(torch.randn((), generator=g) * 3)
            dz.append(q.logit_dz)
            bit.append(q.logit_bit)
    return dz, bit


def test_theta_l2_registered():
    assert LOSS_REGISTRY["theta_l2"] is theta_l2


def test_theta_l2_value_and_gradient_by_hand():
    model = _quantized_model()
    dz, bit = _set_logits(model)
    ldz, lbit = 0.3, 0.7
    out = theta_l2(model, lambda_dz=ldz, lambda_bit=lbit)
    assert out.dim() == 0
    want = ldz * sum(t.detach().item() ** 2 for t in dz) + lbit * sum(t.detach().item() ** 2 for t in bit)
    assert out.item() == pytest.approx(want, rel=1e-6)
    out.backward()
    for t in dz:
        assert t.grad.item() == pytest.approx(2 * ldz * t.item(), rel=1e-6)
    for t in bit:
        assert t.grad.item() == pytest.approx(2 * lbit * t.item(), rel=1e-6)
    # the weights get no gradient from the term
    for _, m, _ in codeq.iter_quantizers(model):
        assert m.parametrizations["weight"].original.grad is None


def test_theta_l2_zero_when_lambdas_are_zero():
    model = _quantized_model()
    _set_logits(model)
    out = theta_l2(model)  # defaults: both 0
    assert out.dim() == 0 and out.item() == 0.0
    out = theta_l2(model, lambda_dz=0.0, lambda_bit=0.5)
    out.backward()
    assert all(q.logit_dz.grad is None for _, _, q in codeq.iter_quantizers(model))
    assert all(q.logit_bit.grad is not None for _, _, q in codeq.iter_quantizers(model))
    # a model without quantizers: a zero tensor
    assert theta_l2(nn.Linear(2, 2), lambda_dz=1.0, lambda_bit=1.0).item() == 0.0


def test_theta_l2_only_learnable_logits():
    model = _quantized_model(learnable_bit=False)
    dz, bit = _set_logits(model)
    out = theta_l2(model, lambda_dz=0.2, lambda_bit=10.0)  # frozen logit_bit: its lambda has no effect
    assert out.item() == pytest.approx(0.2 * sum(t.detach().item() ** 2 for t in dz), rel=1e-6)
    model = _quantized_model(learnable_deadzone=False)
    dz, bit = _set_logits(model)
    out = theta_l2(model, lambda_dz=10.0, lambda_bit=0.2)
    assert out.item() == pytest.approx(0.2 * sum(t.detach().item() ** 2 for t in bit), rel=1e-6)
    model = _quantized_model(learnable_bit=False, learnable_deadzone=False)
    assert theta_l2(model, lambda_dz=1.0, lambda_bit=1.0).item() == 0.0
    # a parameter named like a logit outside any quantizer is not counted
    model = _quantized_model()
    dz, bit = _set_logits(model)
    model.logit_dz = nn.Parameter(torch.tensor(100.0))
    assert theta_l2(model, lambda_dz=1.0).item() == pytest.approx(sum(t.detach().item() ** 2 for t in dz), rel=1e-6)


def test_theta_l2_in_a_training_run(tmp_path, capsys):
    """The trainer runs with the term (CE + 1 * theta_l2) and theta moves towards 0."""
    d = {
        "model": "mlp", "epochs": 1, "batch_size": 32, "device": "cpu", "workers": 0,
        "save_dir": str(tmp_path / "runs"), "model_kwargs": {"hidden": [8]},
        "dataset": {"name": "synthetic", "train_size": 64, "val_size": 32},
        "quantizer": {"name": "deadzone", "kwargs": {"learnable_bit": True}},
        "optimizer": {"type": "sgd", "param_groups": {"base": {"lr": 0.01}, "dz": {"lr": 0.1}, "bit": {"lr": 0.1}}},
        "loss_terms": [{"name": "theta_l2", "lambda": 1.0, "kwargs": {"lambda_dz": 1.0, "lambda_bit": 1.0}}],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["--config", str(path)]) == 0
    capsys.readouterr()
    (run,) = os.listdir(tmp_path / "runs")
    ckpt = torch.load(tmp_path / "runs" / run / "checkpoint.th", weights_only=True)
    logits = [v for k, v in ckpt["model"].items() if k.endswith("logit_dz") or k.endswith("logit_bit")]
    assert logits and all(float(v) < 3.0 for v in logits)


def test_theta_l2_unknown_kwarg_is_a_config_error():
    d = {"model": "mlp", "epochs": 1, "optimizer": {"param_groups": {"base": {"lr": 0.1}}},
         "loss_terms": [{"name": "theta_l2", "kwargs": {"lambda_dzz": 1.0}}]}
    with pytest.raises(ConfigError, match="did you mean 'lambda_dz'"):
        config_from_dict(d)


# ------------------------------------------------------------- image folder --
def _fake_tree(root, classes=("ants", "bees"), n=2, splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 256, size=(40 + i, 48, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    return root


def _folder_cfg(root, **ds):
    return config_from_dict({
        "model": "resnet18", "epochs": 1, "img_size": 32,
        "optimizer": {"param_groups": {"base": {"lr": 0.1}}},
        "dataset": {"name": "imagefolder", "root": str(root), **ds},
    })


def test_imagefolder_reads_a_tree_of_pngs(tmp_path):
    _fake_tree(tmp_path)
    train, val = build_datasets(_folder_cfg(tmp_path))
    assert len(train) == 4 and len(val) == 4
    assert train.classes == ["ants", "bees"]
    labels = sorted(train[i][1] for i in range(len(train)))
    assert labels == [0, 0, 1, 1]
    x, _ = val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    x, _ = train[3]
    assert x.shape == (3, 32, 32)
    # a subset is spread over the classes (the folder is sorted by class)
    train, val = build_datasets(_folder_cfg(tmp_path, train_size=2, val_size=2))
    assert sorted(train[i][1] for i in range(2)) == [0, 1] and len(val) == 2


def test_imagefolder_transforms_are_the_imagenet_ones():
    from torchvision import transforms as T

    from codeq.train.data import IMAGENET_MEAN, build_imagenet_transforms

    tr = build_imagenet_transforms(224, True).transforms
    va = build_imagenet_transforms(224, False).transforms
    assert isinstance(tr[0], T.RandomResizedCrop) and tr[0].size == (224, 224)
    assert isinstance(tr[1], T.RandomHorizontalFlip)
    assert isinstance(va[0], T.Resize) and va[0].size == 256
    assert isinstance(va[1], T.CenterCrop) and va[1].size == (224, 224)
    assert tuple(tr[-1].mean) == IMAGENET_MEAN and tuple(va[-1].mean) == IMAGENET_MEAN


def test_imagefolder_missing_folders_name_both_paths(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_datasets(_folder_cfg(tmp_path / "nowhere"))
    msg = str(e.value)
    assert os.path.join(str(tmp_path / "nowhere"), "train") in msg
    assert os.path.join(str(tmp_path / "nowhere"), "val") in msg and "\n" not in msg
    _fake_tree(tmp_path / "half", splits=("train",))
    with pytest.raises(ConfigError, match="missing: .*val"):
        build_datasets(_folder_cfg(tmp_path / "half"))


def test_imagefolder_bad_trees_are_config_errors(tmp_path):
    _fake_tree(tmp_path / "a", splits=("train",))
    _fake_tree(tmp_path / "a", classes=("ants", "wasps"), splits=("val",))
    with pytest.raises(ConfigError, match="same class folders"):
        build_datasets(_folder_cfg(tmp_path / "a"))
    (tmp_path / "b" / "train" / "ants").mkdir(parents=True)  # no images at all
    (tmp_path / "b" / "val" / "ants").mkdir(parents=True)
    with pytest.raises(ConfigError, match="cannot read the image folder"):
        build_datasets(_folder_cfg(tmp_path / "b"))


def test_imagefolder_cli_missing_data_is_exit_2(tmp_path, capsys):
    cfg = os.path.join(PAPER, "resnet18_imagenet_fixed4.yaml")
    rc = main(["--config", cfg, "--device", "cpu", "--set", f"dataset.root={tmp_path / 'none'}",
               "--set", f"save_dir={tmp_path / 'runs'}"] + [a for o in NO_WEIGHTS for a in ("--set", o)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "train" in err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------- ImageNet models, weights --
def test_imagenet_models_have_1000_classes_and_cifar_ones_10():
    assert model_num_classes(MODEL_REGISTRY["resnet18"]) == 1000
    assert model_num_classes(MODEL_REGISTRY["resnet50"]) == 1000
    for name in ("resnet20", "mlp", "vit", "tiny_vit"):
        assert model_num_classes(MODEL_REGISTRY[name]) == 10


def test_missing_pretrained_path_is_exit_2_one_line(tmp_path, capsys):
    _fake_tree(tmp_path / "data")
    missing = tmp_path / "weights" / "resnet18.pth"
    cfg = os.path.join(PAPER, "resnet18_imagenet_fixed4.yaml")
    rc = main(["--config", cfg, "--device", "cpu", "--set", f"dataset.root={tmp_path / 'data'}",
               "--set", f"model_kwargs.pretrained_path={missing}", "--set", f"save_dir={tmp_path / 'runs'}"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(missing) in err and "never downloaded" in err
    assert not (tmp_path / "runs").exists()


def test_pretrained_path_loads_plain_and_wrapped_state_dicts(tmp_path):
    from codeq.models import ResNet20

    src = ResNet20()
    sd = src.state_dict()
    for name, obj in (("plain", sd), ("sd", {"state_dict": sd, "epoch": 3}), ("model", {"model": sd}),
                      ("ddp", {f"module.{k}": v for k, v in sd.items()})):
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        dst = load_pretrained(ResNet20(), str(path), "resnet20")
        for k, v in dst.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)
    torch.save({k: v for k, v in list(sd.items())[:-1]}, tmp_path / "short.pth")
    with pytest.raises(ConfigError, match="does not fit"):
        load_pretrained(ResNet20(), str(tmp_path / "short.pth"), "resnet20")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read"):
        load_pretrained(ResNet20(), str(tmp_path / "junk.pth"), "resnet20")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="is not a state dict"):
        load_pretrained(ResNet20(), str(tmp_path / "list.pth"), "resnet20")


def test_resnet18_built_from_a_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    cfg = load_config(os.path.join(PAPER, "resnet18_imagenet_mixed.yaml"),
                      overrides=[f"model_kwargs.pretrained_path={path}"])
    model = build_model(cfg)
    w = dict(model.named_modules())["layer1.0.conv1"].parametrizations["weight"].original
    assert torch.equal(w, ref.layer1[0].conv1.weight)
    assert model.fc.out_features == 1000


# ----------------------------------------------------------------- TinyViT --
def test_tinyvit_paper_model_forward_224():
    cfg = load_config(os.path.join(PAPER, "tinyvit_cifar10_mixed.yaml"))
    model = build_model(cfg).eval()
    x = example_input(cfg.img_size)
    assert tuple(x.shape) == (1, 3, 224, 224)
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == (1, 10) and torch.isfinite(y).all()


def test_tinyvit_other_img_size_is_a_config_error():
    cfg = load_config(os.path.join(PAPER, "tinyvit_cifar10_fixed4.yaml"), overrides=["img_size=32"])
    with pytest.raises(ConfigError, match="img_size: 224"):
        build_model(cfg)
