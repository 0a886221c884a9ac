"""Projection heads: tower features -> the shared embedding space. No BatchNorm (DP-SGD needs
per-example gradients, and the DP stage trains exactly these heads)."""

from __future__ import annotations

import torch.nn as nn


class ProjectionHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim, bias=False)
        elif kind == "mlp":
            hidden = hidden_dim or in_dim
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
        else:
            raise ValueError(f"projection head kind must be 'linear' or 'mlp', got {kind!r}")
        self.in_dim, self.out_dim, self.kind = in_dim, out_dim, kind

    def forward(self, x):
        return self.net(x)
