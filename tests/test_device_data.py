"""dataset.on_device: the device-resident CIFAR path gives the DataLoader path's
batch order, its exact pixels without augmentation, and only crops / flips the
DataLoader path could produce with it; config errors; a whole run on it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from codeq.train.data import build_datasets
from codeq.train.config import ConfigError, config_from_dict
from codeq.train.data import build_loaders
from codeq.train.device_data import DeviceLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(on_device, augment="standard", img_size=32, **over):
    d = {"model": "mlp", "epochs": 1, "batch_size": 16, "img_size": img_size, "device": "cpu", "workers": 0,
         "seed": 3, "save_dir": "unused",
         "dataset": {"name": "synthetic", "train_size": 40, "val_size": 24, "augment": augment,
                     "on_device": on_device},
         "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 1e-3}}}}
    d.update(over)
    return config_from_dict(d)


def loaders(c):
    train_ds, val_ds = build_datasets(c)
    return build_loaders(c, train_ds, val_ds, torch.device("cpu"))


def epoch_batches(loader, g, c, epoch):
    from codeq.train.sampling import epoch_seed

    g.manual_seed(epoch_seed(c.seed, epoch))  # what the trainer does each epoch
    return list(loader)


def test_device_loader_is_chosen_and_has_the_same_length():
    dev_train, dev_val, _ = loaders(cfg(True))
    cpu_train, cpu_val, _ = loaders(cfg(False))
    assert isinstance(dev_train, DeviceLoader) and isinstance(dev_val, DeviceLoader)
    assert len(dev_train) == len(cpu_train) == 3 and len(dev_val) == len(cpu_val) == 2


@pytest.mark.parametrize("img_size", [32, 48])
def test_without_augmentation_batches_equal_the_dataloader_path(img_size):
    c_dev, c_cpu = cfg(True, "none", img_size), cfg(False, "none", img_size)
    (dt, dv, dg), (ct, cv, cg) = loaders(c_dev), loaders(c_cpu)
    for epoch in (0, 1):
        a, b = epoch_batches(dt, dg, c_dev, epoch), epoch_batches(ct, cg, c_cpu, epoch)
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb)  # the same order
            if img_size == 32:
                assert torch.equal(xa, xb)  # the same pixels, bit for bit
            else:  # resized from float on the device vs from uint8 by PIL: close
                assert xa.shape == xb.shape == (ya.shape[0], 3, img_size, img_size)
                assert (xa - xb).abs().mean() < 0.05
    for (xa, ya), (xb, yb) in zip(dv, cv):
        assert torch.equal(ya, yb)
        if img_size == 32:
            assert torch.equal(xa, xb)


def test_augmented_images_are_crops_and_flips_of_the_source():
    c = cfg(True)
    train, _, g = loaders(c)
    plain = DeviceLoader(train.dataset, "cpu", 16, sampler=train.sampler, augment=False,
                         mean=train.mean.flatten().tolist(), std=train.std.flatten().tolist())
    g.manual_seed(5)
    aug = list(train)
    g.manual_seed(5)
    src = list(plain)
    mean, std = train.mean, train.std
    seen_flip = seen_shift = False
    for (xa, ya), (xs, ys) in zip(aug, src):
        assert torch.equal(ya, ys)
        for img_a, img_s in zip(xa, xs):
            # back to 0..255 integers, pad with zeros as RandomCrop(32, padding=4)
            ua = torch.round((img_a * std[0] + mean[0]) * 255).to(torch.int64)
            us = torch.round((img_s * std[0] + mean[0]) * 255).to(torch.int64)
            padded = torch.nn.functional.pad(us, (4, 4, 4, 4))
            match = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                     if torch.equal(ua, (lambda c_: c_.flip(-1) if f else c_)(padded[:, dy:dy + 32, dx:dx + 32]))]
            assert match, "an augmented image is no crop/flip of its source"
            seen_flip |= any(f for _, _, f in match) and not any(not f for _, _, f in match)
            seen_shift |= all((dy, dx) != (4, 4) for dy, dx, _ in match)
    assert seen_flip and seen_shift


def test_augmentation_is_reproducible_per_epoch():
    c = cfg(True)
    train, _, g = loaders(c)
    e0 = epoch_batches(train, g, c, 0)
    e0_again = epoch_batches(train, g, c, 0)
    e1 = epoch_batches(train, g, c, 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e0, e0_again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(e0, e1))


def test_on_device_config_errors():
    with pytest.raises(ConfigError, match="randaugment"):
        cfg(True, "randaugment")
    with pytest.raises(ConfigError, match="on_device works for"):
        config_from_dict({"model": "resnet18", "epochs": 1, "optimizer": {"param_groups": {"base": {"lr": 1.0}}},
                          "dataset": {"name": "imagefolder", "on_device": True}})


def test_a_run_on_device_data(tmp_path):
    """run_training.py with dataset.on_device trains, evaluates and checkpoints."""
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run_training.py"), "--config", os.path.join(ROOT, "configs", "demo.yaml"),
         "--device", "cpu", "--set", "epochs=2", "--set", "dataset.on_device=true", "--set", f"save_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    lines = [json.loads(x) for x in open(os.path.join(runs[0], "metrics.jsonl"))]
    assert len(lines) == 2 and lines[-1]["val_acc"] > 0.3
