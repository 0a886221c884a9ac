"""Per-query counts of the candidates that beat (or tie) the true target: the audit's one chunked
pass over the similarities (definitions: audit/relinkage.py)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from audit.embeddings import _as_long

TIES_POLICIES = ("pessimistic", "optimistic")


def _auto_chunk(n_cols: int, budget_elems: int = 1 << 25) -> int:
    # ~128 MiB of float32 similarities per chunk: big enough for an efficient GEMM.
    return max(1, budget_elems // max(1, n_cols))


def _counts_plain(sims: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (sims > t).sum(1, dtype=torch.int32), (sims == t).sum(1, dtype=torch.int32)


def _counts_hardneg(
    sims: torch.Tensor, t: torch.Tensor, cg: torch.Tensor, cp: torch.Tensor, qg: torch.Tensor, qp: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    above, eq = sims > t, sims == t
    pop = (cg == qg) & (cp != qp)  # same label group as the target, another patient
    i32 = torch.int32
    return (above.sum(1, dtype=i32), eq.sum(1, dtype=i32), (above & pop).sum(1, dtype=i32),
            (eq & pop).sum(1, dtype=i32), pop.sum(1, dtype=i32))


_COMPILED: dict[str, Any] = {}


def _kernel(name: str, fused: bool):
    """The counting step; ``fused`` compiles it (torch.compile) into one pass over the
    similarity chunk, so no boolean intermediates are written: in eager mode each comparison
    and reduction is a separate pass, which costs more than the GEMM on a CPU."""
    fn = _counts_plain if name == "plain" else _counts_hardneg
    if not fused:
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def _want_fused(fused: bool | str, n_elems: int) -> bool:
    if isinstance(fused, bool):
        return fused
    env = os.environ.get("CXR_RELINK_FUSED_COUNTS")
    if env is not None:
        return env not in ("0", "false", "False", "")
    # Compiling costs seconds once per process: worth it only for large audits.
    return n_elems >= (1 << 28)


def rank_counts(
    query: torch.Tensor,
    cand: torch.Tensor,
    target: torch.Tensor,
    exclude: torch.Tensor | None = None,
    chunk_size: int | None = None,
    hardneg: tuple[Any, Any, Any] | None = None,
    fused: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """Per-query counts from one chunked pass over the similarities, target excluded by index.

    query [Q, D], cand [C, D], target [Q] (column of each query's target). Returns long [Q]
    (CPU) tensors: ``above`` (#candidates j != t(i) with s_ij > s_i,t(i)) and ``ties``
    (#j != t(i) with s_ij == s_i,t(i)). The target's score is gathered from the same chunk;
    its own column always equals it exactly, so it is removed by subtracting one from the
    equal count, never by comparing a recomputed score.

    ``exclude`` [Q, E] (padding -1): columns removed from the population of each query.
    ``hardneg`` = (cand_group [C], cand_patient [C], query_patient [Q]) adds ``hn_above``,
    ``hn_ties`` and ``hn_pop`` over the pathology-matched population {j : group[j] ==
    group[t(i)], patient[j] != patient(i)} (the target is the query patient's, so it is
    outside that population by construction). ``fused``: compile the counting step ("auto":
    for large audits, or per the CXR_RELINK_FUSED_COUNTS environment variable); falls back to
    eager if compilation fails. The full Q x C matrix is never held.
    """
    q_n, c_n = query.shape[0], cand.shape[0]
    if query.shape[1] != cand.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} != candidate dim {cand.shape[1]}")
    target = _as_long(target, "target", q_n)
    if (target < 0).any() or (target >= c_n).any():
        raise ValueError(f"target indices must lie in [0, {c_n})")
    dev = query.device
    chunk = chunk_size or _auto_chunk(c_n)
    out = {k: torch.empty(q_n, dtype=torch.long) for k in ("above", "ties")}
    if hardneg is not None:
        cg = _as_long(hardneg[0], "cand_group", c_n)
        cp = _as_long(hardneg[1], "cand_patient", c_n)
        qp = _as_long(hardneg[2], "query_patient", q_n)
        if not torch.equal(cp[target], qp):
            raise ValueError("each query's target must belong to the query's own patient")
        qg = cg[target]
        cg_d, cp_d = cg.to(dev, torch.int32).unsqueeze(0), cp.to(dev, torch.int32).unsqueeze(0)
        for k in ("hn_above", "hn_ties", "hn_pop"):
            out[k] = torch.empty(q_n, dtype=torch.long)
    use_fused = _want_fused(fused, q_n * c_n)
    kern = _kernel("plain" if hardneg is None else "hardneg", use_fused)
    cand_t = cand.t()
    buf = torch.empty(min(chunk, q_n), c_n, dtype=torch.result_type(query, cand), device=dev)
    for s in range(0, q_n, chunk):
        e = min(q_n, s + chunk)
        sims = torch.matmul(query[s:e], cand_t, out=buf[: e - s])  # [B, C], buffer reused
        tgt = target[s:e].to(dev).unsqueeze(1)
        t = sims.gather(1, tgt)  # the target's score, from this very matrix
        args = (sims, t)
        if hardneg is not None:
            args += (cg_d, cp_d, qg[s:e].to(dev, torch.int32).unsqueeze(1), qp[s:e].to(dev, torch.int32).unsqueeze(1))
        try:
            res = kern(*args)
        except Exception as err:  # compilation unavailable (no compiler, ...): eager is exact too
            if not use_fused:
                raise
            warnings.warn(f"fused counting unavailable ({type(err).__name__}: {err}); using eager counting")
            use_fused, kern = False, _kernel("plain" if hardneg is None else "hardneg", False)
            res = kern(*args)
        above, eq = res[0].long(), res[1].long() - 1  # the target column equals itself
        if exclude is not None:
            ex = exclude[s:e].to(dev)
            valid = ex >= 0
            xs = sims.gather(1, ex.clamp(min=0))
            above = above - ((xs > t) & valid).sum(1)
            eq = eq - ((xs == t) & valid).sum(1)
        out["above"][s:e] = above.cpu()
        out["ties"][s:e] = eq.cpu()
        if hardneg is not None:
            out["hn_above"][s:e] = res[2].long().cpu()
            out["hn_ties"][s:e] = res[3].long().cpu()
            out["hn_pop"][s:e] = res[4].long().cpu()
    return out


def hardneg_counts(
    query: torch.Tensor,
    cand: torch.Tensor,
    target: torch.Tensor,
    cand_group: Any,
    cand_patient: Any,
    query_patient: Any,
    chunk_size: int | None = None,
    fused: bool | str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(above, ties, population) within each query's pathology-matched population."""
    r = rank_counts(query, cand, target, chunk_size=chunk_size,
                    hardneg=(cand_group, cand_patient, query_patient), fused=fused)
    return r["hn_above"], r["hn_ties"], r["hn_pop"]


def apply_ties(above: torch.Tensor, ties: torch.Tensor, policy: str) -> torch.Tensor:
    """Number of candidates that beat the target under the ties policy."""
    if policy == "pessimistic":
        return above + ties
    if policy == "optimistic":
        return above.clone()
    raise ValueError(f"unknown ties policy {policy!r}; expected one of {TIES_POLICIES}")
