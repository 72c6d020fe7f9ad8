"""A resumable, DDP-aware batch sampler that can group samples of similar caption length.

Grouping cuts padding: a batch of short captions is not padded to its longest neighbour's length. The
batches are a pure function of ``(seed, epoch)``, so a resumed run that passes ``start_batch`` (the number
of batches of this epoch already trained) continues at exactly the same data position.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[list[int]]):
    """Yields lists of dataset indices (use as ``DataLoader(ds, batch_sampler=...)``).

    Per epoch: shuffle all indices, cut them into mega-batches of ``batch_size * mega_batch``, sort each by
    length (longest first), cut into batches, shuffle the batch order. With ``group_by_length=False`` batches are
    plain shuffled slices. For DDP, batch ``b`` goes to rank ``b % world_size``; every rank gets the same
    number of batches (at most ``world_size - 1`` trailing batches are dropped).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, mega_batch: int = 50, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, epoch: int = 0, start_batch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size 必须 ≥ 1，实际是 {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank 必须在 [0, world_size) 内：rank={rank}, world_size={world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.group_by_length, self.mega_batch, self.drop_last = group_by_length, mega_batch, drop_last
        self.rank, self.world_size = rank, world_size
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Call at the start of each epoch; ``start_batch`` skips batches already trained (resume)."""
        self.epoch, self.start_batch = epoch, max(0, int(start_batch))

    def batches(self) -> list[list[int]]:
        """All of this rank's batches of the current epoch, ``start_batch`` not applied."""
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            size = self.batch_size * self.mega_batch
            groups = [order[i:i + size] for i in range(0, n, size)]
            # Stable sort keeps ties in the shuffled order.
            order = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups]) if n else order
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        per_rank = len(batches) // self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank::self.world_size][:per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start_batch:]

    def __len__(self) -> int:
        n = -(-len(self.lengths) // self.batch_size)
        if self.drop_last and len(self.lengths) % self.batch_size:
            n -= 1
        if self.world_size > 1:
            n //= self.world_size
        return max(0, n - self.start_batch)
