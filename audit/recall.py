"""Exact expected Recall@K at N: the hypergeometric expectation over random candidate pools, from
the per-query counts (definitions: audit/relinkage.py), and the rank statistics."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch


def _log_comb(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def hypergeom_cdf(k_max: int, population: Any, successes: Any, draws: Any) -> torch.Tensor:
    """P[X <= x] for x = 0..k_max-1, X ~ Hypergeom(population, successes, draws), log-gamma.

    Inputs broadcast together (float64). Returns [..., k_max].
    """
    pop = torch.as_tensor(population, dtype=torch.float64)
    suc = torch.as_tensor(successes, dtype=torch.float64)
    drw = torch.as_tensor(draws, dtype=torch.float64)
    pop, suc, drw = torch.broadcast_tensors(pop, suc, drw)
    x = torch.arange(k_max, dtype=torch.float64)
    pop, suc, drw = pop.unsqueeze(-1), suc.unsqueeze(-1), drw.unsqueeze(-1)
    fail = pop - suc
    valid = (x <= suc) & (x <= drw) & (drw - x <= fail)
    # clamp only to keep lgamma's arguments legal where the pmf is masked out anyway
    xs = torch.minimum(x.expand_as(valid), suc)
    rest = (drw - x).clamp(min=0)
    rest = torch.minimum(rest, fail)
    logp = _log_comb(suc, xs) + _log_comb(fail, rest) - _log_comb(pop, drw)
    pmf = torch.where(valid, torch.exp(logp), torch.zeros((), dtype=torch.float64))
    return torch.cumsum(pmf, dim=-1).clamp(0.0, 1.0)


def expected_recall(
    beaten: torch.Tensor, population: torch.Tensor, ks: Sequence[int], ns: Sequence[int | None]
) -> torch.Tensor:
    """Per-query expected Recall@K at N: [Q, len(ns), len(ks)] float64.

    ``beaten`` c_i (ties policy already applied), ``population`` M_i = number of negatives
    available to query i. ``ns`` are pool sizes (target included); None = the whole
    population (full database). Draws are min(N-1, M_i), so a population smaller than the
    pool gives the whole population (reported as the effective pool size).
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"K values must be >= 1, got {ks}")
    if (beaten.reshape(-1) > population.reshape(-1)).any():
        raise ValueError("a query has more beaters than negatives in its population")
    # Queries with the same (beaten, population) have the same expectation: each pair once.
    pairs, inv = torch.unique(torch.stack([beaten.reshape(-1).long(), population.reshape(-1).long()], 1),
                              dim=0, return_inverse=True)
    c, m = pairs[:, 0].to(torch.float64), pairs[:, 1]
    draws = effective_draws(m, ns)  # [U, nN]
    kt = torch.tensor(ks, dtype=torch.float64)
    # Whole population drawn: exactly 1[c <= K-1]; the closed form is evaluated only elsewhere.
    out = (c.view(-1, 1, 1) <= kt - 1).to(torch.float64).expand(-1, draws.shape[1], -1).clone()
    rows, cols = (draws < m.unsqueeze(1)).nonzero(as_tuple=True)
    if rows.numel():
        cdf = hypergeom_cdf(max(ks), m[rows].to(torch.float64), c[rows], draws[rows, cols].to(torch.float64))
        out[rows, cols] = cdf[:, [k - 1 for k in ks]]
    # Fewer than K negatives drawn: the target is always in the top K (avoid 1 - 1e-14).
    out = torch.where(draws.unsqueeze(-1) <= kt - 1, torch.ones((), dtype=torch.float64), out)
    return out[inv]


def effective_draws(population: torch.Tensor, ns: Sequence[int | None]) -> torch.Tensor:
    """Negatives drawn per query and N: min(N-1, M_i); None (full) -> M_i. long [Q, nN]."""
    m = population.reshape(-1, 1).long()
    cols = []
    for n in ns:
        if n is None:
            cols.append(m)
        else:
            if int(n) < 1:
                raise ValueError(f"pool size N must be >= 1, got {n}")
            cols.append(torch.clamp(m, max=int(n) - 1))
    return torch.cat(cols, dim=1)


def rank_stats(beaten: torch.Tensor) -> dict[str, float]:
    """Full-database rank statistics: rank = 1 + beaten."""
    rank = beaten.to(torch.float64) + 1
    return {
        "mrr": float((1.0 / rank).mean()),
        "mean_rank": float(rank.mean()),
        "median_rank": float(torch.quantile(rank, 0.5)),  # midpoint for even counts
    }


def resolve_ns(ns: Iterable[int | str], n_candidates: int) -> tuple[list[tuple[str, int | None]], list[int]]:
    """[(label, N or None for full)], clipped: int N >= n_candidates is dropped (the full
    database covers it) and listed in ``clipped``."""
    out: list[tuple[str, int | None]] = []
    clipped: list[int] = []
    want_full = False
    for n in ns:
        if isinstance(n, str):
            if n != "full":
                raise ValueError(f"pool size {n!r}: use an integer or 'full'")
            want_full = True
            continue
        n = int(n)
        if n < 1:
            raise ValueError(f"pool size N must be >= 1, got {n}")
        if n >= n_candidates:
            clipped.append(n)
            want_full = True
        elif (str(n), n) not in out:
            out.append((str(n), n))
    out.sort(key=lambda p: p[1])
    if want_full:
        out.append(("full", None))
    return out, clipped
