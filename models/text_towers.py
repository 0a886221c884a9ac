"""BERT-style text tower: built from a config (tiny CPU default) or loaded from a local path.

Contract shared with models/llm_encoder.py: constructed as `Tower(tokenizer=..., **cfg)`,
`forward(input_ids, attention_mask) -> [B, output_dim]` (pooled, not normalised),
`output_dim`, `set_grad_checkpointing(enable)`.

Speed: a batch is padded to its longest report, but report lengths are long-tailed (on the default
cohort the mean is ~46 tokens and most batches hold one near max_length=128), so most of the work
would be spent on padding. `forward` runs the tower on a few groups of rows of similar length, each
trimmed to its own longest row (`length_buckets`); every row's output is the same as in one padded
call (up to float rounding), and the batch, the loss and the gradients are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoModel, BertConfig, BertModel

from cxr_relink.models.poolers import build_pooler


def split_by_length(lengths: torch.Tensor, max_buckets: int, hidden_size: int, overhead_tokens: int = 256) -> list[torch.Tensor]:
    """Row indices of a batch split into at most ``max_buckets`` groups of similar length.

    Rows are sorted by length and cut into k groups of equal count; k minimises the estimated cost
    sum_i n_i * L_i * (1 + L_i / (3 * hidden_size)) (the dense layers, plus attention's quadratic
    term) + k * ``overhead_tokens`` (the fixed cost of one more call), where n_i is the group's row
    count and L_i its longest row. Measured on 2 CPU cores at the default scale: padded tokens per
    batch fall from ~8,000 to ~3,500 and the tower's forward+backward by ~2x (docs/benchmarks.md).
    """
    order = torch.argsort(lengths.cpu(), stable=True)
    srt = lengths.cpu()[order].tolist()
    best, best_cost = [order], None
    for k in range(1, max(1, min(max_buckets, len(srt))) + 1):
        parts = torch.tensor_split(order, k)
        cost, end = k * overhead_tokens, 0
        for part in parts:
            end += len(part)
            longest = srt[end - 1]
            cost += len(part) * longest * (1 + longest / (3 * hidden_size))
        if best_cost is None or cost < best_cost:
            best, best_cost = list(parts), cost
    return best


class BertTextEncoder(nn.Module):
    def __init__(
        self,
        tokenizer,
        pretrained: str | None = None,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 512,
        max_position_embeddings: int = 512,
        dropout: float = 0.1,
        pooler: str = "mean",
        attn_implementation: str = "sdpa",
        length_buckets: int = 8,
    ) -> None:
        super().__init__()
        # At most this many groups of similar-length rows per forward call (1: one padded call).
        self.length_buckets = int(length_buckets)
        if pretrained:
            if not Path(pretrained).is_dir():
                raise FileNotFoundError(f"text tower path {pretrained!r} is not a local directory (nothing is downloaded)")
            self.model = AutoModel.from_pretrained(
                pretrained, local_files_only=True, trust_remote_code=False, attn_implementation=attn_implementation
            )
        else:
            config = BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=intermediate_size,
                max_position_embeddings=max_position_embeddings,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
                pad_token_id=tokenizer.pad_token_id,
            )
            config._attn_implementation = attn_implementation
            self.model = BertModel(config, add_pooling_layer=False)
        self.output_dim = self.model.config.hidden_size
        self.pooler = build_pooler(pooler, self.output_dim)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pooler(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.length_buckets <= 1 or attention_mask is None or input_ids.shape[0] < 2:
            return self._encode(input_ids, attention_mask)
        lengths = attention_mask.sum(1)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        # Only right padding can be trimmed by slicing (the absolute positions stay those of the
        # padded call); a left-padded or holed mask runs as one call.
        if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
            return self._encode(input_ids, attention_mask)
        parts = split_by_length(lengths, self.length_buckets, self.output_dim)
        if len(parts) == 1:
            return self._encode(input_ids, attention_mask)
        outs = []
        for rows in parts:
            rows = rows.to(input_ids.device)
            width = int(lengths[rows].max())
            outs.append(self._encode(input_ids[rows, :width], attention_mask[rows, :width]))
        inverse = torch.empty_like(lengths, dtype=torch.long)
        order = torch.cat(parts).to(input_ids.device)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return torch.cat(outs)[inverse]
