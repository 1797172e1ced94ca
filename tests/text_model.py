"""A user's text classifier over int64 token ids: an embedding and a transformer encoder,
written the way a user would, nothing paretoopt-specific."""

import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

VOCAB, LENGTH, CLASSES = 64, 16, 4


class TextClassifier(nn.Module):
    def __init__(self, width=32, heads=4, hidden=64, layers=1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, heads, hidden, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


def build(**kwargs):
    return TextClassifier(**kwargs)


def sentences(n=900, seed=0):
    """Random token ids; the class is a token (0-3) placed somewhere in the sentence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(CLASSES, VOCAB, (n, LENGTH), generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    ids[torch.arange(n), torch.randint(0, LENGTH, (n,), generator=g)] = labels
    data = TensorDataset(ids, labels)
    a, b = int(0.7 * n), int(0.85 * n)
    return Subset(data, range(a)), Subset(data, range(a, b)), Subset(data, range(b, n))
