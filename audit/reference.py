"""Independent references for the exact audit (tests and cross-checks, never the audit itself):
Monte Carlo random pools and explicit hard-negative pools."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from cxr_relink.audit.counting import TIES_POLICIES
from cxr_relink.audit.embeddings import _as_long


def monte_carlo_recall(
    query: torch.Tensor,
    cand: torch.Tensor,
    target: torch.Tensor,
    ks: Sequence[int],
    ns: Sequence[int],
    n_pools: int = 20,
    seed: int = 0,
    ties: str = "pessimistic",
    exclude: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall@K at N by sampling ``n_pools`` random pools per query (cross-check).

    Each pool: the target plus min(N-1, M_i) negatives drawn uniformly without replacement
    from the query's population; the target is hit at K when fewer than K pool members beat
    it (ties per policy). Returns (mean [nN, nK], standard error [nN, nK]).
    """
    if ties not in TIES_POLICIES:
        raise ValueError(f"unknown ties policy {ties!r}; expected one of {TIES_POLICIES}")
    q_n, c_n = query.shape[0], cand.shape[0]
    target = _as_long(target, "target", q_n)
    dev = query.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    kt = torch.tensor([int(k) for k in ks], device=dev)
    hits = torch.zeros(q_n, len(ns), len(ks), dtype=torch.float64)
    chunk = chunk_size or max(1, (1 << 23) // max(1, c_n))  # ~32 MiB of scores and of random keys
    for s in range(0, q_n, chunk):
        e = min(q_n, s + chunk)
        b = e - s
        sims = query[s:e] @ cand.t()
        tgt = target[s:e].to(dev).unsqueeze(1)
        t = sims.gather(1, tgt)
        beat = (sims >= t) if ties == "pessimistic" else (sims > t)
        out_of_pop = torch.zeros(b, c_n, dtype=torch.bool, device=dev)
        out_of_pop.scatter_(1, tgt, True)
        if exclude is not None:
            ex = exclude[s:e].to(dev)
            valid = ex >= 0
            rows = torch.arange(b, device=dev).unsqueeze(1).expand_as(ex)
            out_of_pop[rows[valid], ex[valid]] = True
        beat &= ~out_of_pop
        pop = (~out_of_pop).sum(1)
        for ni, n in enumerate(ns):
            draws = torch.clamp(pop, max=int(n) - 1)
            width = int(draws.max())
            if width == 0:
                hits[s:e, ni, :] += n_pools
                continue
            keep = torch.arange(width, device=dev).unsqueeze(0) < draws.unsqueeze(1)
            for _ in range(n_pools):
                r = torch.rand(b, c_n, generator=gen, device=dev)
                r.masked_fill_(out_of_pop, 2.0)
                idx = r.topk(width, dim=1, largest=False).indices
                nbeat = (beat.gather(1, idx) & keep).sum(1)
                hits[s:e, ni, :] += (nbeat.unsqueeze(1) <= kt - 1).cpu().to(torch.float64)
    frac = hits / n_pools
    mean = frac.mean(0)
    # Variance of the estimate with the query set fixed: sum_i p_i(1-p_i) / (n_pools Q^2).
    per_q_var = frac * (1 - frac) * n_pools / max(1, n_pools - 1)
    se = (per_q_var.sum(0) / n_pools).sqrt() / q_n
    return mean, se


def hardneg_pools(
    target: Any, cand_group: Any, cand_patient: Any, query_patient: Any, n: int, seed: int = 0
) -> list[np.ndarray]:
    """Explicit hard-negative pools (cross-checks, inspection): per query, the target first,
    then min(n-1, M_i) negatives drawn without replacement from its pathology-matched
    population (same mapped label group as the target, other patients only)."""
    tgt = np.asarray(target).reshape(-1)
    grp = np.asarray(cand_group).reshape(-1)
    cpat = np.asarray(cand_patient).reshape(-1)
    qpat = np.asarray(query_patient).reshape(-1)
    rng = np.random.default_rng(seed)
    by_group: dict[int, np.ndarray] = {}
    for g in np.unique(grp):
        by_group[int(g)] = np.flatnonzero(grp == g)
    pools = []
    for i, t in enumerate(tgt):
        members = by_group[int(grp[t])]
        popn = members[cpat[members] != qpat[i]]
        take = min(int(n) - 1, popn.size)
        neg = rng.choice(popn, size=take, replace=False) if take else popn[:0]
        pools.append(np.concatenate([[t], neg]).astype(np.int64))
    return pools
