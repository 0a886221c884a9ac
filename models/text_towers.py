"""BERT-style text tower: built from a config (tiny CPU default) or loaded from a local path.

Contract shared with models/llm_encoder.py: constructed as `Tower(tokenizer=..., **cfg)`,
`forward(input_ids, attention_mask) -> [B, output_dim]` (pooled, not normalised),
`output_dim`, `set_grad_checkpointing(enable)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoModel, BertConfig, BertModel

from models.poolers import build_pooler


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
    ) -> None:
        super().__init__()
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pooler(hidden, attention_mask)
