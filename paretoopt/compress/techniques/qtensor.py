"""Integer-quantized weights: codes, scales and zero points (or a codebook of shared
values), and the one decoding rule of each grid.

Shared by the quantize technique (which makes them), the workbench (which holds them) and
the artifact writer and reader (which pack and unpack them), so that the model a trial
measures and the model its file decodes to are computed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QTensor:
    codes: torch.Tensor  # int64 codes in [0, 2**bits - 1], same shape as the weight
    scale: torch.Tensor  # float32, one per output channel, or a single one per tensor
    # int64, same shape as scale; on a k-means grid, the code of the value nearest zero
    # (what a pruned weight holds, so the file's mask can drop it)
    zero_point: torch.Tensor
    bits: int
    # a k-means grid (weight sharing): float32 (rows, 2**bits), the shared values of each
    # row (one row per output channel, or one for the tensor); the scale is then unused
    codebook: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        if self.codebook is not None:
            return lookup(self.codes, self.codebook)
        return dequantize(self.codes, self.scale, self.zero_point)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
) -> torch.Tensor:
    """The one decoding rule, shared by the technique and the artifact reader."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return (codes.float() - zero_point.float().view(shape)) * scale.view(shape)


def lookup(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """A k-means grid's decoding rule: each code names a shared value of its row."""
    flat = codes.reshape(codebook.shape[0], -1)
    return codebook.gather(1, flat).reshape(codes.shape)
