"""Users' models of several inputs, written the way a user would: a signal with summary
statistics beside it (two positional inputs), and token ids with an attention mask (a
dict of named inputs, as tokenizers give them)."""

import torch
from torch import nn
from torch.utils.data import Dataset

from .text_model import CLASSES, LENGTH, VOCAB


class SignalAndStats(nn.Module):
    def __init__(self, channels=8, classes=3):
        super().__init__()
        self.conv = nn.Conv1d(2, channels, 5, padding=2)
        self.pool = nn.AdaptiveAvgPool1d(4)
        self.fc = nn.Linear(channels * 4, 16)
        self.stats = nn.Linear(4, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, signal, stats):
        # the branches meet in a sum (Torch-Pruning 1.6 fails on a flattened convolution
        # concatenated with another branch: an IndexError in its index mapping)
        a = self.fc(self.pool(torch.relu(self.conv(signal))).flatten(1))
        return self.out(torch.relu(a + self.stats(stats)))


class Pairs(Dataset):
    """((signal, stats), label): the class in the signal's frequency and in the stats."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        t = torch.linspace(0, 6.28, 32)
        freq = (self.y.float() + 1.0)[:, None]
        signal = torch.stack([torch.sin(freq * t), torch.cos(freq * t)], dim=1)
        self.signal = signal + 0.3 * torch.randn(signal.shape, generator=g)
        self.stats = torch.randn(n, 4, generator=g) + self.y[:, None].float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.signal[i], self.stats[i]), self.y[i]


def build_pairs(channels=8):
    return SignalAndStats(channels)


def pairs():
    return Pairs(240, 1), Pairs(60, 2), Pairs(60, 3)


class MaskedText(nn.Module):
    """Token ids and a mask of the real tokens; padding is left out of the mean."""

    def __init__(self, width=32, heads=4, hidden=64):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, heads, hidden, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(self.embed(input_ids))
        weights = attention_mask.unsqueeze(-1).float()
        return self.head((h * weights).sum(1) / weights.sum(1).clamp(min=1.0))


class Tokenized(Dataset):
    """({"input_ids", "attention_mask"}, label): sentences of 6-16 tokens, padded with 0,
    the class a token (1-4 stands for 0-3) somewhere in the sentence."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, CLASSES, (n,), generator=g)
        lengths = torch.randint(6, LENGTH + 1, (n,), generator=g)
        self.mask = torch.arange(LENGTH)[None, :] < lengths[:, None]
        ids = torch.randint(CLASSES + 1, VOCAB, (n, LENGTH), generator=g)
        where = (torch.rand(n, generator=g) * lengths).long()
        ids[torch.arange(n), where] = self.y + 1
        self.ids = torch.where(self.mask, ids, torch.zeros_like(ids))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.y[i]


def build_masked():
    return MaskedText()


def tokenized():
    return Tokenized(600, 1), Tokenized(150, 2), Tokenized(150, 3)
