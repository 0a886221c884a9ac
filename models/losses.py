"""Contrastive losses.

`ClipLoss` is told its distributed setting (rank, world size) instead of reading global state, keeps
`get_logits`, `get_ground_truth` and `forward` apart, and returns a dict so further loss terms need
no change in the training step (the shape of open_clip's ClipLoss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and returns this rank's slice.

    Written on the stable collectives (all_gather / all_reduce) rather than torch's autograd
    collectives, whose module paths keep moving between releases.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world_size, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_features(x: torch.Tensor, rank: int, world_size: int, with_grad: bool, keep_local_grad: bool = True) -> torch.Tensor:
    """All-gather `x` along dim 0 across ranks (rank order; equal local batch sizes).

    with_grad: gradients flow back to every rank's features. Otherwise only the local slice keeps
    its gradient (open_clip's cheaper default), or none if keep_local_grad is False.
    """
    if world_size == 1:
        return x
    if with_grad:
        return _AllGatherWithGrad.apply(x)
    parts = [torch.zeros_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    if keep_local_grad:
        parts[rank] = x
    return torch.cat(parts, dim=0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution per row (rows of `targets` sum to 1)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


class ClipLoss(nn.Module):
    """Symmetric InfoNCE between image and report embeddings.

    Ground truth is the study: when `group_ids` (study indices) are given, every report of the
    same study in the (global) batch is a positive, with the target mass split evenly between
    them. Without `group_ids`, the diagonal is the target (plain CLIP).

    local_loss: each rank scores its own queries against all gathered candidates (memory O(n·N)
    instead of O(N²)); the global loss is then the mean of the ranks' losses.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def get_logits(self, image_features, text_features, logit_scale):
        if self.world_size > 1:
            all_img = gather_features(image_features, self.rank, self.world_size, self.gather_with_grad)
            all_txt = gather_features(text_features, self.rank, self.world_size, self.gather_with_grad)
            if self.local_loss:
                return logit_scale * image_features @ all_txt.T, logit_scale * text_features @ all_img.T
            logits_per_image = logit_scale * all_img @ all_txt.T
            return logits_per_image, logits_per_image.T
        logits_per_image = logit_scale * image_features @ text_features.T
        return logits_per_image, logits_per_image.T

    def get_ground_truth(self, n_local: int, device, group_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Target distributions, shape [rows, cols] matching `get_logits` (same for both directions:
        'same study' is symmetric)."""
        if group_ids is None:
            n_all = n_local * self.world_size
            cols = torch.arange(n_all, device=device)
            if self.world_size > 1 and self.local_loss:
                rows = torch.arange(n_local, device=device) + n_local * self.rank
            else:
                rows = cols
            eq = rows[:, None] == cols[None, :]
        else:
            all_ids = gather_features(group_ids, self.rank, self.world_size, with_grad=False, keep_local_grad=False)
            rows = group_ids if (self.world_size > 1 and self.local_loss) else all_ids
            eq = rows[:, None] == all_ids[None, :]
        eq = eq.float()
        return eq / eq.sum(dim=1, keepdim=True)

    def forward(self, image_features, text_features, logit_scale, group_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        targets = self.get_ground_truth(image_features.shape[0], image_features.device, group_ids)
        loss = (soft_cross_entropy(logits_per_image, targets) + soft_cross_entropy(logits_per_text, targets)) / 2
        return {"contrastive_loss": loss}


@torch.no_grad()
def in_batch_accuracy(logits: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose top-scoring column belongs to the same study (ties: first index)."""
    return (col_ids[logits.argmax(dim=1)] == row_ids).float().mean()


# ---- Stage 1 text adaptation losses (LLM helper): supervised contrastive + MNTP ------------------------

from collections.abc import Sequence  # noqa: E402


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020) over report-variant embeddings.

    Rows sharing a `group_id` (the variants of one study) are positives for each other; every other
    row in the global batch is a negative. `hard_negatives` (e.g. one-error variants of a report) only
    ever appear as candidates, never as anchors, so they are negatives even for their own study.
    For anchor i with positives P(i) and candidates A(i) (everything but i itself):
        l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t) )
    averaged over anchors that have at least one positive. Similarities are cosine.

    Like ClipLoss it is told its distributed setting: local anchors are scored against the
    variants gathered from all ranks (group ids must be global, e.g. study indices) plus the local
    hard negatives.
    """

    def __init__(self, temperature: float = 0.05, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def forward(
        self,
        features: torch.Tensor,
        group_ids: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        z = F.normalize(features.float(), dim=-1)
        n = z.shape[0]
        all_z = gather_features(z, self.rank, self.world_size, self.gather_with_grad)
        all_ids = gather_features(group_ids, self.rank, self.world_size, with_grad=False, keep_local_grad=False)
        logits = z @ all_z.T / self.temperature  # [n, N]
        self_idx = torch.arange(n, device=z.device) + n * self.rank
        not_self = torch.ones_like(logits, dtype=torch.bool)
        not_self[torch.arange(n, device=z.device), self_idx] = False
        pos = (group_ids[:, None] == all_ids[None, :]) & not_self
        if hard_negatives is not None and hard_negatives.numel():
            # Hard negatives stay local: they are variants of this rank's own studies (where they
            # matter), and their count may differ between ranks.
            h = F.normalize(hard_negatives.float(), dim=-1)
            logits = torch.cat([logits, z @ h.T / self.temperature], dim=1)
            extra = torch.zeros(n, h.shape[0], dtype=torch.bool, device=z.device)
            not_self = torch.cat([not_self, ~extra], dim=1)
            pos = torch.cat([pos, extra], dim=1)
        log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
        n_pos = pos.sum(1)
        has_pos = n_pos > 0
        if not has_pos.any():
            return {"supcon_loss": logits.sum() * 0.0}
        per_anchor = -(log_prob * pos).sum(1)[has_pos] / n_pos[has_pos]
        return {"supcon_loss": per_anchor.mean()}


IGNORE_INDEX = -100


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_token_id: int,
    mask_prob: float = 0.2,
    special_ids: Sequence[int] = (),
    vocab_size: int | None = None,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ~mask_prob of the valid, non-special tokens for MNTP; return (masked_ids, selected [B,L] bool).

    Of the selected tokens, `replace_prob` become the mask token, `random_prob` a random token, the rest
    stay (BERT's 80/10/10, which LLM2Vec keeps). The first valid token of a row is never selected: under
    MNTP it would be predicted from position -1, which does not exist.
    """
    valid = attention_mask.bool()
    for sid in special_ids:
        valid &= input_ids != sid
    first = attention_mask.long().argmax(1)
    valid[torch.arange(input_ids.shape[0], device=input_ids.device), first] = False
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    selected = valid & (u < mask_prob)
    # Every row with a candidate gets at least one masked token, so no example is silently skipped.
    none = ~selected.any(1) & valid.any(1)
    if none.any():
        pick = torch.where(valid, u, torch.full_like(u, 2.0)).argmin(1)
        selected[none, pick[none]] = True
    masked = input_ids.clone()
    v = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked[selected & (v < replace_prob)] = mask_token_id
    if vocab_size is not None and random_prob > 0:
        rnd = selected & (v >= replace_prob) & (v < replace_prob + random_prob)
        masked[rnd] = torch.randint(vocab_size, (int(rnd.sum()),), generator=generator, device=input_ids.device)
    return masked, selected


def mntp_labels(input_ids: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the *logits* positions: label[:, i-1] = original token i where i was masked.

    Masked next-token prediction reads the prediction for token i from the output at position i-1 (the
    decoder's LM head was trained that way); the last position predicts nothing.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    tgt = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    labels[:, :-1] = tgt[:, 1:]
    return labels


def mntp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over positions whose label is set (only masked tokens count). logits [B,L,V], labels from `mntp_labels`."""
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)
