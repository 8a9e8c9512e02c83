"""A device-resident data path for CIFAR-shaped data sets (``dataset.on_device: true``).

The whole data set is copied to the training device once as uint8
(CIFAR-10's 50,000 training images are 154 MB); each batch is gathered,
augmented (RandomCrop(32, padding=4) + RandomHorizontalFlip, as the
DataLoader path), converted and normalised there.  No worker processes, no
host-to-device copies per step: on a GPU the input pipeline stops being the
bottleneck of small models such as ResNet-20.

The batch order is the DataLoader path's (the same
:class:`~codeq.train.sampling.EpochDistributedSampler`, so the same
permutation per (seed, epoch), DDP sharding and resume); the crop offsets and
flips come from a generator seeded from the epoch's order seed, so a run is
reproducible and resumable.  Without augmentation (validation, ``augment:
none``) a batch is bit for bit the DataLoader path's; with it, every image is
one of the crops / flips the DataLoader path can produce (tested), drawn from
another random stream.  When ``img_size`` is not 32 the batch is resized on
the device with bilinear + antialias interpolation of the float tensor (the
DataLoader path resizes the uint8 image), so the pixels are close, not equal.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from codeq.errors import ConfigError
from codeq.train.sampling import epoch_seed

__all__ = ["DeviceLoader", "device_arrays"]


def device_arrays(ds):
    """(uint8 images N x 32 x 32 x 3 as a numpy array, int64 labels) of a CIFAR-shaped
    data set (codeq's CIFAR10Binary / SyntheticCIFAR, torchvision's CIFAR10, or a
    Subset of one)."""
    idx = None
    while isinstance(ds, Subset):
        sub = np.asarray(ds.indices)
        idx = sub if idx is None else sub[idx]
        ds = ds.dataset
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", None)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3 \
            or targets is None:
        raise ConfigError(f"dataset.on_device needs a CIFAR-shaped data set (uint8 N x H x W x 3 images); "
                          f"{type(ds).__name__} is not one")
    labels = np.asarray(targets, dtype=np.int64)
    if idx is not None:
        data, labels = data[idx], labels[idx]
    return data, labels


class DeviceLoader:
    """Iterates (images, labels) batches of a data set held on ``device``.

    ``sampler``: the epoch order (an EpochDistributedSampler for training, a
    ShardSampler or None = in order for validation); ``augment``: random crop
    with 4 pixels of zero padding + horizontal flip; ``mean`` / ``std``: the
    normalisation; ``img_size``: output size (resized when not the stored one).
    """

    def __init__(self, ds, device: torch.device, batch_size: int, *, sampler=None, augment: bool = False,
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), img_size: int = 32):
        data, labels = device_arrays(ds)
        self.device = torch.device(device)
        # N x 3 x H x W uint8 on the device (one copy, at start-up)
        self.images = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.batch_size = int(batch_size)
        self.sampler = sampler
        self.augment = bool(augment)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.img_size = int(img_size)
        self.dataset = ds

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else self.labels.shape[0]
        return (n + self.batch_size - 1) // self.batch_size

    def _order(self) -> torch.Tensor:
        if self.sampler is None:
            return torch.arange(self.labels.shape[0], device=self.device)
        return torch.as_tensor(list(iter(self.sampler)), dtype=torch.long).to(self.device)

    def _aug_generator(self) -> torch.Generator:
        order_seed = self.sampler.order_seed() if hasattr(self.sampler, "order_seed") else 0
        rank = int(getattr(self.sampler, "rank", 0))
        g = torch.Generator(device=self.device)
        g.manual_seed(epoch_seed(order_seed, 0xA06 + rank))  # its own stream per rank, keyed to the epoch's order
        return g

    def crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """RandomCrop(H, padding=4) + RandomHorizontalFlip of a uint8 batch B x 3 x H x W."""
        b, _, h, w = x.shape
        pad = 4
        xp = F.pad(x, (pad, pad, pad, pad))  # zeros, as RandomCrop's default fill
        oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=g)
        ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=g)
        flip = torch.rand(b, device=x.device, generator=g) < 0.5
        cols = torch.arange(w, device=x.device)
        cols = torch.where(flip[:, None], w - 1 - cols, cols) + ox[:, None]  # B x W
        rows = oy[:, None] + torch.arange(h, device=x.device)  # B x H
        bi = torch.arange(b, device=x.device)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # B x H x W x 3
        return out.permute(0, 3, 1, 2)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255.0)  # as ToTensor
        x = x.sub(self.mean).div(self.std)  # as Normalize
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x.contiguous()

    def __iter__(self):
        order = self._order()
        g = self._aug_generator() if self.augment else None
        for start in range(0, order.shape[0], self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images.index_select(0, idx)
            if g is not None:
                x = self.crop_flip(x, g)
            yield self._finish(x), self.labels.index_select(0, idx)
