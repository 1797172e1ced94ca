"""A dataset larger than memory: 256 features of 10 noisy class centres, generated a batch
at a time from seeds (never held whole), as a DataLoader over an iterable dataset."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

FEATURES, CLASSES = 256, 10


class Batches(IterableDataset):
    """`samples` samples in batches of `batch`, batch b drawn from seed (seed, b)."""

    def __init__(self, samples: int, batch: int, seed: int) -> None:
        self.samples, self.batch, self.seed = samples, batch, seed

    def __len__(self) -> int:
        return self.samples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(7))
        for b in range(math.ceil(self.samples / self.batch)):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            n = min(self.batch, self.samples - b * self.batch)
            y = torch.randint(0, CLASSES, (n,), generator=g)
            yield centres[y] + 3.0 * torch.randn(n, FEATURES, generator=g), y


def splits(
    train: int = 2_000_000, evaluation: int = 5_000, batch: int = 512
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train, val and test streams; batch_size None: the dataset yields whole batches."""
    parts = (Batches(train, batch, 0), Batches(evaluation, batch, 1), Batches(evaluation, batch, 2))
    return tuple(DataLoader(p, batch_size=None) for p in parts)  # type: ignore[return-value]


def nbytes(samples: int) -> int:
    """What `samples` of them would take in memory (inputs and labels)."""
    return samples * (FEATURES * 4 + 8)
