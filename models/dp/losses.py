"""Loss modes of the DP alignment stage, and the sensitivity each one gives.

All losses act on *units* (the privacy unit: a study by default, a patient optionally). A batch
holds B units; unit b carries m pairs (m = 1 for studies; the studies of a patient, padded, for
patients): image features x [B, m, Di], report features y [B, m, Dt], mask [B, m]. The heads map
them to z = normalize(g(x)), w = normalize(h(y)).

Sensitivity is the L2 change of the clipped gradient sum that DP-SGD releases (before noise) when
one unit is added to or removed from the batch (Opacus' add/remove adjacency, the one its
Poisson-subsampled accountants assume). With clipping norm C:

``public_negatives`` (default) -- sensitivity C, exactly.
    Each private pair is contrasted only against a bank of *public* pairs (a disjoint public
    cohort), embedded with the current heads under ``torch.no_grad``. Unit b's loss
    l_b(theta; x_b, y_b, public bank) reads no other private unit, so its gradient g_b does not
    change when another unit comes or goes. The released sum sum_b clip_C(g_b) changes by exactly
    one term, of norm <= C. The bank's stop-gradient is part of the loss definition (the bank is a
    function of the released parameters and public data only, so it is post-processing).

``group_clipping`` -- sensitivity 2C.
    Units are assigned to one of n_groups groups by a hash of (seed, step, unit id), i.e. by public
    randomness and the unit's own identity only -- never by its position in the batch, which would
    let one unit shift every later unit into another group. InfoNCE runs within each group; each
    group's gradient G_k = grad L(S_k) is clipped to C and the clipped group gradients are summed.
    Adding unit u (in group k) to the sampled set S changes only group k:

        F(S + u) - F(S) = clip_C(G(S_k + u)) - clip_C(G(S_k)).

    Both terms lie in the ball of radius C, so the difference is at most 2C (triangle
    inequality), and 2C is attained: u can be a near-duplicate "hub" that turns the group's
    gradient around (the tests build such a batch). Re-clipping the group does *not* bring this
    down to C: clipping bounds each term, not their difference. (If S_k is empty or a singleton,
    L(S_k) = 0 and the change is <= C; the bound must hold for every S, so it is 2C.) Noise is
    therefore drawn with std sigma * 2C, which is exactly the Gaussian mechanism with noise
    multiplier sigma on a sensitivity-1 query after rescaling by 2C; the Poisson-subsampled
    Gaussian accounting (Mironov, Talwar, Zhang 2019) applies unchanged with (sigma, q): the
    Renyi divergence of the sampling mixture is jointly convex, so the worst case over the other
    units' sampled set S is the one-dimensional mixture (1-q) N(0, sigma^2) + q N(1, sigma^2)
    against N(0, sigma^2).

``in_batch`` (arXiv 2606.02276's method) -- NO valid guarantee.
    Every pair's softmax denominator holds every other pair of the batch, so removing one unit
    changes every per-sample gradient: the clipped sum can move by up to (2B - 1) C, not C.
    Opacus' accountant assumes C, so the epsilon it prints for this loss does not hold.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOSS_MODES = ("public_negatives", "group_clipping", "in_batch")
# Loss modes whose DP-SGD release has a derived sensitivity (and so a valid epsilon).
VALID_DP_MODES = ("public_negatives", "group_clipping")
# L2 sensitivity of the released clipped sum, in units of the clipping norm C.
SENSITIVITY_FACTOR = {"public_negatives": 1.0, "group_clipping": 2.0}


def _masked_mean(per_pair: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, m] per-pair values -> [B] mean over the unit's real pairs (padding has mask 0)."""
    m = mask.to(per_pair.dtype)
    return (per_pair * m).sum(1) / m.sum(1).clamp(min=1.0)


def public_negatives_loss(
    z: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor,
    bank_img: torch.Tensor,
    bank_txt: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Per-unit symmetric InfoNCE of each private pair against the public bank only.

    z, w [B, m, E] normalised private embeddings; bank_img, bank_txt [K, E] normalised public
    embeddings (computed without gradient). Image->report: the positive is the pair's own report,
    the negatives are the K public reports; report->image symmetrically with the public images.
    Returns [B] (unit b's loss reads only unit b and the public bank).
    """
    s = logit_scale.exp()
    pos = (z * w).sum(-1, keepdim=True)  # [B, m, 1]
    neg_i2t = torch.einsum("bme,ke->bmk", z, bank_txt)
    neg_t2i = torch.einsum("bme,ke->bmk", w, bank_img)
    l_i2t = torch.logsumexp(s * torch.cat([pos, neg_i2t], -1), -1) - s * pos.squeeze(-1)
    l_t2i = torch.logsumexp(s * torch.cat([pos, neg_t2i], -1), -1) - s * pos.squeeze(-1)
    return _masked_mean((l_i2t + l_t2i) / 2, mask)


def in_batch_pair_losses(z: torch.Tensor, w: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric InfoNCE over a set of P pairs (diagonal targets): z, w [P, E] -> [P]."""
    s = logit_scale.exp()
    logits = s * z @ w.T
    target = torch.arange(z.shape[0], device=z.device)
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2


def in_batch_loss(z: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Per-unit in-batch InfoNCE (every real pair of the batch is a negative of every other).

    Returns [B]; unit b's value depends on every unit of the batch (no valid DP sensitivity).
    """
    b, m = mask.shape
    flat = mask.reshape(-1).bool()
    per_pair = torch.zeros(b * m, dtype=z.dtype, device=z.device)
    if int(flat.sum()) > 0:
        per_pair = per_pair.masked_scatter(flat, in_batch_pair_losses(z.reshape(b * m, -1)[flat], w.reshape(b * m, -1)[flat], logit_scale))
    return _masked_mean(per_pair.reshape(b, m), mask)


def group_loss(z: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Loss of one group: mean over its units of the within-group InfoNCE (0 for < 2 pairs)."""
    if int(mask.sum()) < 2:
        return (z.sum() + w.sum()) * 0.0  # keeps the graph (and the parameters' grads) well defined
    return in_batch_loss(z, w, mask, logit_scale).mean()


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLD
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def group_assignment(unit_ids: torch.Tensor, n_groups: int, step: int, seed: int = 0) -> torch.Tensor:
    """Group of each unit for this step: a hash of (seed, step, unit id) mod n_groups.

    A unit's group depends on nothing but its own id and public randomness, so adding or removing
    one unit never moves another unit to a different group (the premise of the 2C bound).
    """
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    ids = unit_ids.detach().cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        salt = _splitmix64(np.asarray([seed], dtype=np.uint64) * _M1 + np.uint64(step))
        key = _splitmix64(salt + ids)
    return torch.as_tensor((key % np.uint64(n_groups)).astype(np.int64), device=unit_ids.device)
