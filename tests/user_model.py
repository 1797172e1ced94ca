"""A user's own model and dataset, written the way a user would: nothing paretoopt-specific."""

import torch
from torch import nn
from torch.utils.data import TensorDataset


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv1d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm1d(c)
        self.dw = nn.Conv1d(c, c, 3, padding=1, groups=c)  # depthwise

    def forward(self, x):
        return torch.relu(x + self.dw(torch.relu(self.bn(self.a(x)))))


class SignalNet(nn.Module):
    def __init__(self, channels=8, classes=3, length=32):
        super().__init__()
        self.stem = nn.Conv1d(2, channels, 5, padding=2)
        self.block = Block(channels)
        self.pool = nn.AdaptiveAvgPool1d(4)
        self.fc = nn.Linear(channels * 4, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, x):
        x = self.pool(self.block(torch.relu(self.stem(x))))
        return self.out(torch.relu(self.fc(x.flatten(1))))


def build(channels=8):
    return SignalNet(channels=channels)


def signals(n=300, seed=1):
    """Three classes of noisy two-channel sine waves of different frequency."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    t = torch.linspace(0, 6.28, 32)
    freq = (y.float() + 1.0)[:, None]
    x = torch.stack([torch.sin(freq * t), torch.cos(freq * t)], dim=1)
    x = x + 0.3 * torch.randn(x.shape, generator=g)
    parts = (slice(0, 200), slice(200, 250), slice(250, 300))
    return tuple(TensorDataset(x[p], y[p]) for p in parts)


class Fragile(SignalNet):
    """A model with a rule of its own that channel pruning can break."""

    def forward(self, x):
        if self.fc.out_features % 8:
            raise ValueError(f"needs features in multiples of 8, has {self.fc.out_features}")
        return super().forward(x)


def build_fragile():
    return Fragile(channels=8)


class Moody(SignalNet):
    """Runs in PyTorch, but branches on a tensor's value, which torch.export cannot trace."""

    def forward(self, x):
        if x.mean() > 100.0:
            return super().forward(-x)
        return super().forward(x)


def build_moody():
    return Moody(channels=8)


class Waves(torch.utils.data.IterableDataset):
    """signals() as a stream: a dataset with no len() and no indexing."""

    def __init__(self, part, seed=1):
        self.part, self.seed = part, seed

    def __iter__(self):
        data = signals(seed=self.seed)[self.part]
        return iter(data[i] for i in range(len(data)))


def streams(batch_size=32):
    """The splits of signals() as a shuffling DataLoader and two iterable datasets."""
    train, _, _ = signals()
    loader = torch.utils.data.DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    return loader, Waves(1), Waves(2)


def bad_labels(label=-1, at=0, stream=False):
    """signals() with one training label replaced; streamed as a DataLoader if asked."""
    train, val, test = signals()
    x, y = train.tensors
    y = y.clone()
    y[at] = label
    data = TensorDataset(x, y)
    return (torch.utils.data.DataLoader(data, batch_size=32) if stream else data), val, test


def nan_inputs(stream=False):
    """signals() with a NaN in one training input."""
    train, val, test = signals()
    x, y = train.tensors
    x = x.clone()
    x[3, 0, 5] = float("nan")
    data = TensorDataset(x, y)
    return (torch.utils.data.DataLoader(data, batch_size=32) if stream else data), val, test
