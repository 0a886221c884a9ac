"""Learning-rate schedules (built from config with `_partial_: true`)."""

from __future__ import annotations

import math

from hydra.utils import instantiate
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer, total_steps: int, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up to the base LR, then cosine decay to `min_lr_ratio` x base LR."""
    warmup = max(1, int(round(warmup_fraction * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def configure_optimizers(module, optimizer_cfg, scheduler_cfg=None):
    """AdamW-style param groups for a LightningModule: no weight decay on biases, norms and the
    temperature (as CLIP / open_clip), frozen parameters left out; optional per-step schedule."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    optimizer = instantiate(optimizer_cfg)(params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    if not scheduler_cfg:
        return optimizer
    scheduler = instantiate(scheduler_cfg)(optimizer=optimizer, total_steps=int(module.trainer.estimated_stepping_batches))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
