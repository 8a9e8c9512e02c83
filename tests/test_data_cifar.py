"""Data sets: the CIFAR-10 binary reader, layout detection and errors, the
synthetic set, transforms and loaders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from codeq.train.config import ConfigError, config_from_dict
from codeq.train.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    CIFAR10Binary,
    SyntheticCIFAR,
    build_cifar10,
    build_loaders,
    build_synthetic,
    build_transforms,
)

SHARED_CIFAR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "cifar10")


def cfg(**dataset):
    return config_from_dict({
        "model": "mlp", "epochs": 1, "workers": 0, "batch_size": 4,
        "optimizer": {"param_groups": {"base": {"lr": 0.1}}},
        "dataset": dataset,
    })


def fake_records(n, seed):
    """n records: label byte, then R, G, B planes; image i has R=i, G=2i, B=255-i, pixel (0,0) of R = label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    recs = np.zeros((n, 3073), np.uint8)
    recs[:, 0] = labels
    for i in range(n):
        planes = np.stack([np.full(1024, i % 256), np.full(1024, (2 * i) % 256), np.full(1024, 255 - i % 256)])
        planes[1, 5 * 32 + 7] = 77  # G at row 5, column 7
        recs[i, 1:] = planes.reshape(-1)
    return recs, labels


def write_bin_layout(root, n_per_file=3):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    all_train = []
    for i in range(1, 6):
        recs, labels = fake_records(n_per_file, i)
        recs.tofile(folder / f"data_batch_{i}.bin")
        all_train.append(labels)
    recs, test_labels = fake_records(n_per_file, 99)
    recs.tofile(folder / "test_batch.bin")
    return np.concatenate(all_train), test_labels


def test_binary_reader_decodes_records(tmp_path):
    train_labels, test_labels = write_bin_layout(tmp_path)
    ds = CIFAR10Binary(str(tmp_path), train=True)
    assert len(ds) == 15
    assert ds.targets == train_labels.tolist()
    img, label = ds[4]  # second record of data_batch_2
    a = np.asarray(img)
    assert a.shape == (32, 32, 3) and label == int(train_labels[4])
    assert a[0, 0].tolist() == [1, 2, 254]
    assert a[5, 7, 1] == 77 and a[7, 5, 1] == 2  # row-major planes, channels last
    test = CIFAR10Binary(str(tmp_path / "cifar-10-batches-bin"), train=False)  # the batches dir itself
    assert test.targets == test_labels.tolist()


def test_binary_reader_errors(tmp_path):
    write_bin_layout(tmp_path)
    folder = tmp_path / "cifar-10-batches-bin"
    (folder / "data_batch_3.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(ConfigError, match="not a CIFAR-10 binary batch"):
        CIFAR10Binary(str(tmp_path), train=True)
    os.remove(folder / "data_batch_3.bin")
    with pytest.raises(ConfigError, match="data_batch_3.bin"):
        CIFAR10Binary(str(tmp_path), train=True)


def test_build_cifar10_uses_binary_layout_and_subsets(tmp_path):
    write_bin_layout(tmp_path)
    train, val = build_cifar10(cfg(name="cifar10", root=str(tmp_path), train_size=7, val_size=2))
    assert len(train) == 7 and len(val) == 2
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)


def test_missing_dataset_error_names_path_and_layouts(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_cifar10(cfg(name="cifar10", root=str(tmp_path / "nowhere")))
    msg = str(e.value)
    assert "nowhere" in msg and "cifar-10-batches-py" in msg and "cifar-10-batches-bin" in msg and "download" in msg
    assert "\n" not in msg


def test_transforms():
    from PIL import Image

    img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    x = build_transforms(32, train=False)(img)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[:, 0, 0], (128 / 255 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD))
    assert build_transforms(64, train=True)(img).shape == (3, 64, 64)
    names = [type(t).__name__ for t in build_transforms(224, True, "randaugment").transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "RandAugment", "Resize", "ToTensor", "Normalize"]
    ra = build_transforms(32, True, "randaugment").transforms[2]
    assert (ra.num_ops, ra.magnitude) == (2, 9)
    assert [type(t).__name__ for t in build_transforms(32, True, "none").transforms] == ["ToTensor", "Normalize"]
    crop = build_transforms(32, True).transforms[0]
    assert crop.size == (32, 32) and crop.padding == 4


def test_synthetic_deterministic_and_class_dependent():
    a, b = SyntheticCIFAR(50, True), SyntheticCIFAR(50, True)
    assert np.array_equal(a.data, b.data) and a.targets == b.targets
    v = SyntheticCIFAR(50, False)
    assert not np.array_equal(a.data, v.data)
    assert a.data.shape == (50, 32, 32, 3) and a.data.dtype == np.uint8 and set(a.targets) == set(range(10))
    # class means differ far more than noise would explain
    big = SyntheticCIFAR(400, True)
    means = np.stack([big.data[np.array(big.targets) == c].mean(0) for c in range(10)]).astype(float)
    spread = np.abs(means[0] - means[1]).mean()
    assert spread > 3.0
    train, val = build_synthetic(cfg(name="synthetic", train_size=20, val_size=10))
    assert (len(train), len(val)) == (20, 10)
    train, val = build_synthetic(cfg(name="synthetic"))
    assert (len(train), len(val)) == (1000, 200)


def test_loaders_data_order_depends_on_seed_and_epoch():
    from codeq.train.sampling import epoch_seed

    c = cfg(name="synthetic", train_size=24, val_size=8, augment="none")
    train, val = build_synthetic(c)
    tl, vl, g = build_loaders(c, train, val, torch.device("cpu"))
    assert tl.num_workers == 0 and tl.pin_memory is False and vl.batch_size == 4

    def order(epoch):
        g.manual_seed(epoch_seed(c.seed, epoch))
        return torch.cat([y for _, y in tl]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    c2 = config_from_dict({**_raw(c), "workers": 2})
    tl2, _, _ = build_loaders(c2, train, val, torch.device("cpu"))
    assert tl2.num_workers == 2 and tl2.persistent_workers is True


def _raw(c):
    from codeq.train.config import config_to_dict

    return config_to_dict(c)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR), reason=f"real CIFAR-10 not present at {SHARED_CIFAR}")
def test_real_cifar10_binary(tmp_path_factory):
    """The real data (unpacked from ../shared/data/cifar10): counts, labels, channel means."""
    import subprocess

    dest = tmp_path_factory.mktemp("cifar")
    r = subprocess.run(["bash", os.path.join(SHARED_CIFAR, "unpack.sh"), str(dest)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"unpack.sh failed: {r.stderr.strip()[-200:]}")
    train = CIFAR10Binary(str(dest), train=True)
    test = CIFAR10Binary(str(dest), train=False)
    assert len(train) == 50000 and len(test) == 10000
    assert np.bincount(train.targets).tolist() == [5000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    mean = train.data.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, CIFAR_MEAN, atol=2e-4)


def test_augment_unset_is_the_data_sets_recipe(tmp_path):
    """cifar10 trains with the published trainer's recipe (crop + flip +
    RandAugment(2, 9)) unless augment is set; the others with crop + flip.
    The resolved config records it, and on_device says what to set."""
    write_bin_layout(tmp_path)
    c = cfg(name="cifar10", root=str(tmp_path))
    assert c.dataset.augment == "randaugment"
    train, _ = build_cifar10(c)
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "RandAugment", "ToTensor", "Normalize"]
    assert cfg(name="cifar10", augment="standard").dataset.augment == "standard"
    assert cfg(name="synthetic").dataset.augment == "standard"
    assert cfg(name="imagefolder").dataset.augment == "standard"
    with pytest.raises(ConfigError, match=r"not randaugment \(cifar10's recipe when augment is unset\); set "
                                          r"dataset.augment: standard to train on the device"):
        cfg(name="cifar10", on_device=True)
    assert cfg(name="cifar10", on_device=True, augment="standard").dataset.on_device
