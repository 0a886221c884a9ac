"""ClipLoss against a brute-force reference, and its 2-process (gloo) result against 1 process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cxr_relink.models.losses import ClipLoss


def brute_force_clip(img: torch.Tensor, txt: torch.Tensor, scale: float, groups: list[int] | None = None) -> float:
    """Symmetric InfoNCE by explicit loops in float64; positives = same group (uniform target mass)."""
    img, txt = img.double(), txt.double()
    n = img.shape[0]
    groups = list(range(n)) if groups is None else groups
    total = 0.0
    for direction in ("i2t", "t2i"):
        q, c = (img, txt) if direction == "i2t" else (txt, img)
        for i in range(n):
            scores = [scale * float(q[i] @ c[j]) for j in range(n)]
            log_z = math.log(sum(math.exp(s) for s in scores))
            pos = [j for j in range(n) if groups[j] == groups[i]]
            total += -sum((scores[j] - log_z) / len(pos) for j in pos) / n
    return total / 2


@pytest.mark.parametrize("with_groups", [False, True])
def test_clip_loss_matches_brute_force(with_groups: bool) -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(9, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(9, 16, generator=g), dim=-1)
    groups = [0, 1, 1, 2, 3, 3, 3, 4, 5] if with_groups else None
    ids = torch.tensor(groups) if with_groups else None
    got = ClipLoss()(img, txt, torch.tensor(14.0), group_ids=ids)["contrastive_loss"]
    assert got.item() == pytest.approx(brute_force_clip(img, txt, 14.0, groups), rel=1e-5)


def test_distinct_groups_equal_plain_clip() -> None:
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    a = ClipLoss()(img, txt, torch.tensor(3.0))["contrastive_loss"]
    b = ClipLoss()(img, txt, torch.tensor(3.0), group_ids=torch.arange(6) * 7)["contrastive_loss"]
    ref = (F.cross_entropy(3 * img @ txt.T, torch.arange(6)) + F.cross_entropy(3 * txt @ img.T, torch.arange(6))) / 2
    assert a.item() == pytest.approx(ref.item(), rel=1e-6)
    assert b.item() == pytest.approx(ref.item(), rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, img, txt, groups, local_loss: bool, out) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        n = img.shape[0] // world_size
        sl = slice(rank * n, (rank + 1) * n)
        x, y = img[sl].clone().requires_grad_(True), txt[sl].clone().requires_grad_(True)
        loss = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world_size)(
            x, y, torch.tensor(10.0), group_ids=groups[sl]
        )["contrastive_loss"]
        loss.backward()
        out[rank] = (loss.detach(), x.grad.detach(), y.grad.detach())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.slow
def test_two_process_gloo_equals_single_process(local_loss: bool) -> None:
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(8, 12, generator=g), dim=-1)
    txt = F.normalize(torch.randn(8, 12, generator=g), dim=-1)
    groups = torch.tensor([0, 1, 2, 2, 3, 4, 4, 5])  # a study split across the two ranks' halves too
    groups[4] = 3
    ref_img, ref_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    ref = ClipLoss()(ref_img, ref_txt, torch.tensor(10.0), group_ids=groups)["contrastive_loss"]
    ref.backward()

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), img, txt, groups, local_loss, out), nprocs=2, join=True)
    losses = torch.stack([out[r][0] for r in range(2)])
    # Global loss: every rank's loss when not local; the mean of the ranks' losses when local.
    if local_loss:
        assert losses.mean().item() == pytest.approx(ref.item(), rel=1e-5)
    else:
        assert torch.allclose(losses, ref.detach().expand(2), rtol=1e-5)
    # DDP averages gradients over ranks; all_gather's backward sums them, so each rank holds
    # world_size x the gradient of the global loss w.r.t. its own slice.
    for r in range(2):
        sl = slice(r * 4, (r + 1) * 4)
        assert torch.allclose(out[r][1] / 2, ref_img.grad[sl], atol=1e-6)
        assert torch.allclose(out[r][2] / 2, ref_txt.grad[sl], atol=1e-6)
