"""Poolers: token hidden states [B, L, H] + attention mask [B, L] -> one vector per text [B, H].

All poolers are padding-side agnostic: they locate valid tokens from the attention mask, never
from the padding side, so the same pooler works for right-padded BERT batches and left-padded
decoder-LLM batches, and padding never changes the pooled vector of the unpadded text.

Registry `POOLERS`: name -> nn.Module class with `__init__(hidden_size, **kw)` and
`forward(hidden_states, attention_mask) -> [B, H]`. Build one with `build_pooler(name, hidden_size, **kw)`.
"""

from __future__ import annotations

import torch
from torch import nn


def _mask(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return hidden_states.new_ones(hidden_states.shape[:2])
    return attention_mask.to(hidden_states.dtype)


class MeanPooler(nn.Module):
    """Mean over valid tokens."""

    def __init__(self, hidden_size: int, **_: object) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        m = _mask(hidden_states, attention_mask).unsqueeze(-1)
        return (hidden_states * m).sum(1) / m.sum(1).clamp_min(1.0)


class WeightedMeanPooler(nn.Module):
    """Position-weighted mean (SGPT-style): the k-th valid token gets weight k.

    Under causal attention later tokens have seen more of the text, so they get more weight; the
    rank is counted over valid tokens only, so left padding does not shift the weights.
    """

    def __init__(self, hidden_size: int, **_: object) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        m = _mask(hidden_states, attention_mask)
        w = (m.cumsum(1) * m).unsqueeze(-1)
        return (hidden_states * w).sum(1) / w.sum(1).clamp_min(1.0)


def _last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    # Largest position whose mask is 1: correct for left and right padding alike.
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (pos * attention_mask.long()).argmax(1)


def _first_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.long().argmax(1)


class LastTokenPooler(nn.Module):
    """Hidden state of the last valid token (the EOS token when the tokenizer appends one)."""

    def __init__(self, hidden_size: int, **_: object) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            return hidden_states[:, -1]
        idx = _last_valid_index(attention_mask)
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), idx]


class FirstTokenPooler(nn.Module):
    """Hidden state of the first valid token ([CLS] for BERT-style towers)."""

    def __init__(self, hidden_size: int, **_: object) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            return hidden_states[:, 0]
        idx = _first_valid_index(attention_mask)
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), idx]


class LatentAttentionPooler(nn.Module):
    """Trainable latent-attention pooling (the idea of NV-Embed, used by Ko et al., arXiv 2509.15234).

    Token states are queries; a learned array of `num_latents` latent vectors serves as keys and
    values. Each token is thus re-expressed over a small trainable dictionary; a feed-forward
    block follows (both with residuals), then a mean over valid tokens.
    """

    def __init__(
        self,
        hidden_size: int,
        num_latents: int = 512,
        num_heads: int = 8,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        **_: object,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"latent attention: hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        self.hidden_size = hidden_size
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size**-0.5)
        self.norm_q = nn.LayerNorm(hidden_size)
        self.norm_kv = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, ffn_mult * hidden_size),
            nn.GELU(),
            nn.Linear(ffn_mult * hidden_size, hidden_size),
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # nn.MultiheadAttention params are float32; under autocast the matmuls follow autocast's dtype.
        b = hidden_states.shape[0]
        kv = self.norm_kv(self.latents).unsqueeze(0).expand(b, -1, -1)
        q = self.norm_q(hidden_states)
        x = hidden_states + self.attn(q, kv.to(q.dtype), kv.to(q.dtype), need_weights=False)[0]
        x = x + self.ffn(x)
        m = _mask(x, attention_mask).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


POOLERS: dict[str, type[nn.Module]] = {
    "mean": MeanPooler,
    "weighted_mean": WeightedMeanPooler,
    "last": LastTokenPooler,
    "eos": LastTokenPooler,
    "first": FirstTokenPooler,
    "cls": FirstTokenPooler,
    "latent_attention": LatentAttentionPooler,
}


def build_pooler(name: str, hidden_size: int, **kwargs: object) -> nn.Module:
    if name not in POOLERS:
        raise ValueError(f"unknown pooler {name!r}; choose one of {sorted(POOLERS)}")
    return POOLERS[name](hidden_size, **kwargs)
