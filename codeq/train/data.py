"""Data sets and loaders: CIFAR-10 (torchvision's ``cifar-10-batches-py`` or
the official binary ``cifar-10-batches-bin`` layout), a learnable synthetic
CIFAR-shaped set for offline smoke runs, and an ImageNet-style image folder
(``root/train/<class>/*``, ``root/val/<class>/*``).

Each builder is ``fn(cfg) -> (train_dataset, val_dataset)``; items are
``(image tensor 3 x img_size x img_size, label int)``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from codeq.errors import ConfigError
from codeq.models import model_num_classes, resolve_model
from codeq.registry import DATASET_REGISTRY, register_dataset
from codeq.train.device_data import DeviceLoader
from codeq.train.sampling import EpochDistributedSampler, ShardSampler, epoch_seed

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CIFAR10Binary",
    "SyntheticCIFAR",
    "build_transforms",
    "build_cifar10",
    "build_synthetic",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_imagenet_transforms",
    "build_imagefolder",
    "build_datasets",
    "build_loaders",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

BIN_DIR = "cifar-10-batches-bin"
PY_DIR = "cifar-10-batches-py"
BIN_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
BIN_TEST = ("test_batch.bin",)
RECORD = 3073  # 1 label byte + 32*32*3 pixel bytes
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def build_transforms(img_size: int, train: bool, augment: str = "standard"):
    """Train: RandomCrop(32, padding=4) + RandomHorizontalFlip (+ RandAugment(2, 9)
    with ``augment: randaugment``; nothing with ``augment: none``), then Resize
    to img_size when it is not 32, ToTensor, Normalize(CIFAR mean/std).
    Validation: Resize (when needed), ToTensor, Normalize."""
    from torchvision import transforms as T

    ops = []
    if train and augment != "none":
        ops += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        if augment == "randaugment":
            ops.append(T.RandAugment(num_ops=2, magnitude=9))
    if img_size != 32:
        ops.append(T.Resize((img_size, img_size), antialias=True))
    ops += [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    return T.Compose(ops)


class _ArrayImages(Dataset):
    """Images as a uint8 array N x 32 x 32 x 3 plus int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.data = images
        self.targets = [int(t) for t in labels]
        self.transform = transform
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


class CIFAR10Binary(_ArrayImages):
    """CIFAR-10 in the official binary layout: ``root/cifar-10-batches-bin/``
    with data_batch_1..5.bin (train) and test_batch.bin, each a sequence of
    3073-byte records (1 label byte, then 1024 R, 1024 G, 1024 B bytes, each
    plane row-major 32x32).  ``root`` may also be the batches directory itself."""

    def __init__(self, root: str, train: bool = True, transform=None):
        folder = root if os.path.basename(os.path.normpath(root)) == BIN_DIR else os.path.join(root, BIN_DIR)
        files = BIN_TRAIN if train else BIN_TEST
        chunks = []
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise ConfigError(f"CIFAR-10 binary file missing: {path} (expected {', '.join(files)} in {folder})")
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size == 0 or raw.size % RECORD:
                raise ConfigError(
                    f"{path} is not a CIFAR-10 binary batch: {raw.size} bytes is not a multiple of {RECORD}-byte records"
                )
            chunks.append(raw.reshape(-1, RECORD))
        arr = np.concatenate(chunks)
        labels = arr[:, 0].astype(np.int64)
        if labels.max() > 9:
            raise ConfigError(f"{folder}: label byte {int(labels.max())} out of range 0-9 (corrupt file?)")
        images = np.ascontiguousarray(arr[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        super().__init__(images, labels, transform)
        self.root = folder


class SyntheticCIFAR(_ArrayImages):
    """A learnable CIFAR-shaped set (32x32 RGB uint8, 10 classes): each class is
    a fixed smooth colour pattern (8x8-pixel blocks, mirror-symmetric so flips
    keep it), each image that pattern plus Gaussian noise.  Deterministic:
    the patterns come from ``seed`` and the images from ``(seed, split)``."""

    def __init__(self, size: int, train: bool = True, transform=None, seed: int = 0, noise: float = 64.0, amplitude: float = 10.0):
        pat_rng = np.random.default_rng([seed, 7])
        protos = pat_rng.normal(size=(10, 4, 4, 3))
        protos = (protos + protos[:, :, ::-1, :]) / 2  # horizontal-flip invariant
        protos = np.kron(protos, np.ones((1, 8, 8, 1)))  # 10 x 32 x 32 x 3
        rng = np.random.default_rng([seed, 1 if train else 2])
        labels = np.arange(size) % 10
        rng.shuffle(labels)
        imgs = 128.0 + amplitude * protos[labels] + rng.normal(scale=noise, size=(size, 32, 32, 3))
        images = np.clip(np.rint(imgs), 0, 255).astype(np.uint8)
        super().__init__(images, labels, transform)


def _subset(ds, n):
    return ds if n is None or n >= len(ds) else Subset(ds, range(n))


# The published trainer's CIFAR-10 recipe: crop + flip + RandAugment(2, 9).
@register_dataset("cifar10", augment="randaugment", num_classes=10)
def build_cifar10(cfg):
    """CIFAR-10 from ``dataset.root``: the binary layout when
    ``root/cifar-10-batches-bin`` exists, else torchvision's
    ``root/cifar-10-batches-py`` (downloaded there when ``dataset.download``)."""
    d = cfg.dataset
    root = os.path.expanduser(d.root)
    tr = build_transforms(cfg.img_size, True, d.augment)
    te = build_transforms(cfg.img_size, False)
    if os.path.isdir(os.path.join(root, BIN_DIR)) or os.path.basename(os.path.normpath(root)) == BIN_DIR:
        train, val = CIFAR10Binary(root, True, tr), CIFAR10Binary(root, False, te)
    elif os.path.isdir(os.path.join(root, PY_DIR)) or d.download:
        from torchvision.datasets import CIFAR10

        try:
            train = CIFAR10(root, train=True, transform=tr, download=d.download)
            val = CIFAR10(root, train=False, transform=te, download=False)
        except Exception as exc:  # corrupt files, no network, ...
            raise ConfigError(f"cannot load CIFAR-10 from {os.path.join(root, PY_DIR)}: {exc}") from None
    else:
        raise ConfigError(
            f"CIFAR-10 not found under dataset.root={d.root!r}: expected {os.path.join(root, PY_DIR)} "
            f"(torchvision layout; set dataset.download: true to fetch it) or {os.path.join(root, BIN_DIR)} "
            f"(the binary layout of the official cifar-10-binary.tar.gz, unpacked there)"
        )
    return _subset(train, d.train_size), _subset(val, d.val_size)


@register_dataset("synthetic", num_classes=10)
def build_synthetic(cfg):
    d = cfg.dataset
    n_train = d.train_size if d.train_size is not None else 1000
    n_val = d.val_size if d.val_size is not None else 200
    # The images are fixed (seed 0), whatever the training seed.
    train = SyntheticCIFAR(n_train, True, build_transforms(cfg.img_size, True, d.augment))
    val = SyntheticCIFAR(n_val, False, build_transforms(cfg.img_size, False))
    return train, val


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_imagenet_transforms(img_size: int, train: bool, augment: str = "standard"):
    """The standard ImageNet transforms.  Train: RandomResizedCrop(img_size) +
    RandomHorizontalFlip (+ RandAugment(2, 9) with ``augment: randaugment``;
    ``augment: none`` uses the validation transform), ToTensor, Normalize
    (ImageNet mean/std).  Validation: Resize(img_size * 256 / 224, i.e. 256 for
    224) + CenterCrop(img_size), ToTensor, Normalize."""
    from torchvision import transforms as T

    if train and augment != "none":
        ops = [T.RandomResizedCrop(img_size, antialias=True), T.RandomHorizontalFlip()]
        if augment == "randaugment":
            ops.append(T.RandAugment(num_ops=2, magnitude=9))
    else:
        ops = [T.Resize(int(round(img_size * 256 / 224)), antialias=True), T.CenterCrop(img_size)]
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def _spread_subset(ds, n):
    """n items evenly spread over ds (an image folder is sorted by class, so the
    first n would hold only the first classes)."""
    if n is None or n >= len(ds):
        return ds
    idx = np.unique(np.linspace(0, len(ds) - 1, n).round().astype(np.int64))
    return Subset(ds, idx.tolist())


@register_dataset("imagefolder")
def build_imagefolder(cfg):
    """An ImageNet-style data set: ``torchvision.datasets.ImageFolder`` over
    ``dataset.root/train`` and ``dataset.root/val`` (one sub-folder per class,
    the same class folders in both), with :func:`build_imagenet_transforms`.
    ``train_size`` / ``val_size`` take that many images evenly spread over the
    (class-sorted) set.  Never downloads."""
    from torchvision.datasets import ImageFolder

    d = cfg.dataset
    root = os.path.expanduser(d.root)
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    missing = [p for p in (train_dir, val_dir) if not os.path.isdir(p)]
    if missing:
        raise ConfigError(
            f"image folder data set not found under dataset.root={d.root!r}: expected {train_dir} and {val_dir} "
            f"(one sub-folder of images per class in each); missing: {', '.join(missing)}"
        )
    sets = []
    for folder, train in ((train_dir, True), (val_dir, False)):
        try:
            sets.append(ImageFolder(folder, transform=build_imagenet_transforms(cfg.img_size, train, d.augment)))
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(f"cannot read the image folder {folder}: {' '.join(str(exc).split())}") from None
    train, val = sets
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))[:3]
        only_v = sorted(set(val.classes) - set(train.classes))[:3]
        raise ConfigError(
            f"{train_dir} and {val_dir} must have the same class folders "
            f"({len(train.classes)} vs {len(val.classes)}; only in train: {only_t}, only in val: {only_v})"
        )
    try:
        n_out = model_num_classes(resolve_model(cfg.model), cfg.model_kwargs)
    except ConfigError:
        n_out = None
    if n_out is not None and len(train.classes) > n_out:
        raise ConfigError(
            f"{train_dir} has {len(train.classes)} class folders but model '{cfg.model}' has {n_out} outputs"
        )
    return _spread_subset(train, d.train_size), _spread_subset(val, d.val_size)


def _device_loaders(cfg, train_ds, val_ds, device: torch.device, world: int, rank: int, g):
    """``dataset.on_device``: the same samplers, the data on the device (codeq.train.device_data)."""
    sampler = EpochDistributedSampler(train_ds, world, rank, seed=cfg.seed, generator=None if world > 1 else g)
    augment = cfg.dataset.augment == "standard"
    norm = dict(mean=CIFAR_MEAN, std=CIFAR_STD, img_size=cfg.img_size)
    train = DeviceLoader(train_ds, device, cfg.batch_size, sampler=sampler, augment=augment, **norm)
    val_sampler = ShardSampler(val_ds, world, rank) if world > 1 else None
    val = DeviceLoader(val_ds, device, cfg.batch_size, sampler=val_sampler, augment=False, **norm)
    return train, val, g


def build_loaders(cfg, train_ds, val_ds, device: torch.device, dist=None):
    """(train_loader, val_loader, generator).  Reseed ``generator`` with
    :func:`codeq.train.sampling.epoch_seed` before each epoch (and call ``train_loader.sampler.set_epoch``):
    the data order then depends only on (seed, epoch), which makes --resume
    continue the same sequence.  The order of epoch ``e`` is ``torch.randperm(n)``
    from a generator seeded with ``epoch_seed(seed, e)``
    (:class:`~codeq.train.sampling.EpochDistributedSampler`); ``generator``
    also gives the DataLoader's worker seeds.

    ``dist`` (an enabled :class:`codeq.train.distributed.DistContext`): each
    process loads ``cfg.batch_size`` samples per step, rank r taking positions
    r, r + W, ... of the same permutation; validation through
    :class:`~codeq.train.sampling.ShardSampler` (each image once)."""
    world, rank = (dist.world_size, dist.rank) if dist is not None and dist.enabled else (1, 0)
    g = torch.Generator()
    g.manual_seed(epoch_seed(cfg.seed + rank, 0))
    if cfg.dataset.on_device:
        return _device_loaders(cfg, train_ds, val_ds, device, world, rank, g)
    common = dict(
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )
    # One process: the order follows the seed put into g (epoch_seed(seed, e)).
    # DDP: g is per rank (worker seeds), the order follows set_epoch(e).
    train_sampler = EpochDistributedSampler(train_ds, world, rank, seed=cfg.seed, generator=None if world > 1 else g)
    train = DataLoader(train_ds, sampler=train_sampler, generator=g, drop_last=False, **common)
    if world > 1:
        val = DataLoader(val_ds, sampler=ShardSampler(val_ds, world, rank), **common)
    else:
        val = DataLoader(val_ds, shuffle=False, **common)
    return train, val, g


def build_datasets(cfg):
    """(train, val) data sets of ``cfg.dataset`` (ConfigError when missing)."""
    return DATASET_REGISTRY[cfg.dataset.name](cfg)
