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
