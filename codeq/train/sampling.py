"""The data order of a run: the permutation of each epoch, fixed by (seed,
epoch) alone, dealt out to the processes of a DDP job.  That is what makes
``--resume`` continue the same sequence and a DDP run see the batches of one
process with a W times larger batch."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DistributedSampler

__all__ = ["epoch_seed", "EpochDistributedSampler", "ShardSampler"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the data order (and worker seeds) of one epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch order is ``torch.randperm(n)`` from a
    generator seeded with ``epoch_seed(seed, epoch)`` (``set_epoch``); rank r
    takes positions r, r + W, r + 2W, ... (padded, like DistributedSampler, so
    every rank has the same number of samples).  So step k of all ranks
    together holds exactly the samples of step k of one process with a W times
    larger batch.

    ``generator`` (single-process loaders): the permutation is keyed to the
    seed last given to that generator (``generator.manual_seed(epoch_seed(seed,
    epoch))``, as the trainer does every epoch) instead of ``set_epoch``; its
    random stream is not consumed (the DataLoader draws worker seeds from it)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int = 0, shuffle: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.generator = generator

    def order_seed(self) -> int:
        if self.generator is not None:
            return int(self.generator.initial_seed())
        return epoch_seed(self.seed, self.epoch)

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.order_seed())
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        pad = self.total_size - n
        if pad > 0:
            indices += (indices * (pad // n + 1))[:pad]
        return iter(indices[self.rank:self.total_size:self.num_replicas])


class ShardSampler(DistributedSampler):
    """Evaluation shards: rank r gets items r, r + W, ... in order, without
    padding (shards may differ by one item; every item is counted once)."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))
