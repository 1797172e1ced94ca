"""Integer-quantized weights: codes, scales and zero points, and the one decoding rule.

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
    zero_point: torch.Tensor  # int64, same shape as scale
    bits: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
) -> torch.Tensor:
    """The one decoding rule, shared by the technique and the artifact reader."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return (codes.float() - zero_point.float().view(shape)) * scale.view(shape)
