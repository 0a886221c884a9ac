"""Image towers. All map [B, C, H, W] -> [B, output_dim] pre-projection features.

The CPU default is a small GroupNorm CNN (the one tower with a config: configs/model/*.yaml).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    """Conv-GroupNorm-GELU stages with stride 2, then global average pooling.

    GroupNorm, not BatchNorm: contrastive batches are small on a CPU and BatchNorm leaks
    information across the examples of a batch.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128, 256), groups: int = 8) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(min(groups, c_out), c_out), nn.GELU()]

        # A stride-2 stem: full-resolution convolutions dominate CPU cost and add little here.
        layers: list[nn.Module] = block(in_channels, widths[0], 2)
        c = widths[0]
        for w in widths:
            layers += block(c, w, 2) + block(w, w, 1)
            c = w
        # channels_last: oneDNN's convolutions and GroupNorm run NHWC without layout conversions
        # (on 2 CPU cores, forward+backward ~10% and inference ~20% faster; docs/benchmarks.md).
        self.features = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        self.output_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))
