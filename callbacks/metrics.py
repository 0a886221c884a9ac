"""Re-linkage metrics: pure functions, no Lightning. The one home of "Recall@K at N".

Definitions (DESIGN.md, "The re-linkage metric, precisely"):

* Image->report (i2t, primary): every image item is a query; the candidates are the M
  reports of the split (one per study); the target t(i) is the report of the image's own
  study. Images of one study are separate queries sharing one target.
* For query i, ``above[i]`` counts candidates j != t(i) with s_ij > s_i,t(i) and
  ``ties[i]`` those with s_ij == s_i,t(i). The target is excluded *by index*: its score
  is gathered from the same similarity chunk, so no recomputed diagonal is ever compared.
* Ties policy: "pessimistic" (default) counts ties as beating the target (a privacy
  audit should not credit the model with luck); "optimistic" ignores them. Tie counts are
  always reported so the choice can be checked.
* A random pool of size N holds t(i) plus N-1 negatives drawn without replacement from
  the population of M_i negatives, so the number of beaters in the pool is
  Hypergeom(M_i, c_i, N-1) and the expected Recall@K at N is
  mean_i P[Hypergeom(M_i, c_i, N-1) <= K-1], exact, from one pass over the similarities.
  The full database (N = M) gives 1[c_i <= K-1].
* Report->image (t2i): one query per image item (its study's report); the target is that
  image and the study's *other* images are removed from the population (they are neither
  negatives nor targets).
* Hard negatives (i2t): the population of query i is restricted to reports whose mapped
  14-label vector equals the target's, minus the query patient's own other studies.
  When that group is smaller than N the pool is the whole group; the effective pool size
  and its chance level are reported, and queries with no hard negative at all are counted
  and left out.
* Dedup (i2t): identical report strings collapsed into one candidate (CXR-CLIP style); a
  query is correct when its report *text* is retrieved.
* Chance is K/N_eff (N_eff = pool size actually drawn, <= N); "x chance" = Recall / chance.
  95% CIs: percentile bootstrap over patients (the studies of one patient are correlated).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from datamodules.records import NUM_LABELS

TIES_POLICIES = ("pessimistic", "optimistic")
DIRECTIONS = ("i2t", "t2i")

# How a 14-label vector with values {1, 0, -1, NaN} is mapped before "identical label
# vector" is decided for hard negatives.
#   blank_negative (default): NaN (not mentioned) -> 0, -1 kept as its own value.
#       Blank and explicit negative both mean "not positive"; keeping them apart would
#       split groups by whether the radiologist happened to write "no pneumothorax", i.e.
#       by report *style*, not pathology. An uncertain finding is a distinct clinical
#       statement, so it is not merged with positive or negative.
#   raw: the four values are all distinct (strictest; tiny groups on real cohorts).
#   positive_only: 1 -> 1, everything else -> 0.
#   uncertain_positive: 1 and -1 -> 1, everything else -> 0 (CheXpert "U-Ones").
LABEL_MAPPINGS = ("blank_negative", "raw", "positive_only", "uncertain_positive")


# --------------------------------------------------------------------------- validation


def as_embeddings(x: Any, name: str) -> torch.Tensor:
    """A finite, non-empty float [n, d] tensor, or a ValueError naming ``name``."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows): nothing to audit; is the split empty?")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has embedding dimension 0")
    if not t.is_floating_point():
        t = t.float()
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has NaN/inf values in {int(bad.sum())} rows (first rows: {rows})")
    return t.float()


def l2_normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        rows = (norms.flatten() == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has all-zero rows (cannot be normalised): first rows {rows}")
    return x / norms


def _as_long(x: Any, name: str, n: int) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.reshape(-1).long().cpu()
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    return t


def _auto_chunk(n_cols: int, budget_elems: int = 1 << 25) -> int:
    # ~128 MiB of float32 similarities per chunk: big enough for an efficient GEMM.
    return max(1, budget_elems // max(1, n_cols))


# --------------------------------------------------------------------------- counting


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


# --------------------------------------------------------------------------- exact Recall@K at N


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
    c = beaten.to(torch.float64).reshape(-1, 1)
    m = population.to(torch.float64).reshape(-1, 1)
    if (c > m).any():
        raise ValueError("a query has more beaters than negatives in its population")
    draws = effective_draws(population, ns).to(torch.float64)  # [Q, nN]
    cdf = hypergeom_cdf(max(ks), m, c, draws)  # [Q, nN, Kmax]
    out = cdf[..., [k - 1 for k in ks]]
    # Whole population drawn: exactly 1[c <= K-1] (the closed form gives it too; be explicit).
    full = (draws >= m).unsqueeze(-1)
    kt = torch.tensor(ks, dtype=torch.float64)
    exact = (c.unsqueeze(-1) <= kt - 1).to(torch.float64).expand_as(out)
    out = torch.where(full, exact, out)
    # Fewer than K negatives drawn: the target is always in the top K (avoid 1 - 1e-14).
    return torch.where(draws.unsqueeze(-1) <= kt - 1, torch.ones((), dtype=torch.float64), out)


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


# --------------------------------------------------------------------------- Monte Carlo


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
    chunk = chunk_size or _auto_chunk(c_n, 1 << 23)
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


# --------------------------------------------------------------------------- bootstrap


def bootstrap_patient_means(
    values: torch.Tensor, patient: torch.Tensor, n_boot: int, seed: int = 0
) -> torch.Tensor:
    """Replicates of the per-query mean, resampling patients with replacement.

    values [Q, F] float, patient [Q] integer codes. Returns [n_boot, F] float64.
    """
    vals = values.reshape(values.shape[0], -1).to(torch.float64)
    _, pcode = torch.unique(patient.reshape(-1), return_inverse=True)
    n_p = int(pcode.max()) + 1
    sums = torch.zeros(n_p, vals.shape[1], dtype=torch.float64).index_add_(0, pcode, vals)
    counts = torch.bincount(pcode, minlength=n_p).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    reps = []
    step = max(1, min(n_boot, (1 << 22) // n_p))
    for s in range(0, n_boot, step):
        b = min(step, n_boot - s)
        draw = torch.randint(n_p, (b, n_p), generator=gen)
        w = torch.zeros(b, n_p, dtype=torch.float64).scatter_add_(1, draw, torch.ones(b, n_p, dtype=torch.float64))
        reps.append((w @ sums) / (w @ counts).unsqueeze(1))
    return torch.cat(reps, 0) if reps else torch.zeros(0, vals.shape[1], dtype=torch.float64)


def percentile_ci(reps: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    a = (1 - level) / 2
    q = torch.tensor([a, 1 - a], dtype=torch.float64)
    lo_hi = torch.quantile(reps, q, dim=0)
    return lo_hi[0], lo_hi[1]


# --------------------------------------------------------------------------- labels


def label_groups(labels: Any, mapping: str = "blank_negative") -> torch.Tensor:
    """Integer group per row: rows in one group have identical mapped label vectors."""
    if labels is None:
        raise ValueError("hard negatives need the 14 CheXpert labels per study, but labels is None")
    lab = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    if lab.ndim != 2 or lab.shape[1] != NUM_LABELS:
        raise ValueError(f"labels must have shape [n, {NUM_LABELS}], got {tuple(lab.shape)}")
    nan = torch.isnan(lab)
    if nan.all():
        raise ValueError("labels are missing (all blank/NaN): hard negatives need pathology labels")
    ok = nan | (lab == 1) | (lab == 0) | (lab == -1)
    if not ok.all():
        raise ValueError("label values must be 1, 0, -1 or NaN (blank)")
    if mapping == "blank_negative":
        m = torch.where(nan, torch.zeros_like(lab), lab)
    elif mapping == "raw":
        m = torch.where(nan, torch.full_like(lab, 2.0), lab)
    elif mapping == "positive_only":
        m = (lab == 1).float()
    elif mapping == "uncertain_positive":
        m = ((lab == 1) | (lab == -1)).float()
    else:
        raise ValueError(f"unknown label mapping {mapping!r}; expected one of {LABEL_MAPPINGS}")
    return torch.unique(m, dim=0, return_inverse=True)[1].long()


# --------------------------------------------------------------------------- the audit


@dataclass
class EmbeddingSet:
    """Embeddings of one split: image items and one report per study.

    image_emb [I, D]; report_emb [S, D]; item_study [I] in 0..S-1; study_patient [S]
    (integer codes); study_labels [S, 14] (optional); study_text_hash [S] (optional, for
    dedup; any hashable strings, never the text itself); item_index [I] optional dataset
    indices.
    """

    image_emb: torch.Tensor
    report_emb: torch.Tensor
    item_study: torch.Tensor
    study_patient: torch.Tensor
    study_labels: np.ndarray | None = None
    study_text_hash: list[str] | None = None

    @property
    def n_items(self) -> int:
        return int(self.image_emb.shape[0])

    @property
    def n_studies(self) -> int:
        return int(self.report_emb.shape[0])

    @classmethod
    def from_items(
        cls,
        image_emb: Any,
        report_emb: Any,
        study_key: Any,
        patient_key: Any,
        labels: Any = None,
        text_hash: Sequence[str] | None = None,
    ) -> "EmbeddingSet":
        """Build from per-item rows (one row per image; its study's report embedding,
        labels, ids repeated). Rows of one study are collapsed by ``study_key`` (first
        occurrence wins for the report embedding)."""
        img = as_embeddings(image_emb, "image_emb")
        rep = as_embeddings(report_emb, "report_emb")
        n = img.shape[0]
        if rep.shape[0] != n:
            raise ValueError(f"report_emb has {rep.shape[0]} rows but image_emb has {n} (one row per image item)")
        if rep.shape[1] != img.shape[1]:
            raise ValueError(f"image_emb dim {img.shape[1]} != report_emb dim {rep.shape[1]}")
        skeys = np.asarray(study_key).reshape(-1)
        pkeys = np.asarray(patient_key).reshape(-1)
        for name, arr in (("study_id", skeys), ("patient_id", pkeys)):
            if arr.shape[0] != n:
                raise ValueError(f"{name} has {arr.shape[0]} entries but image_emb has {n} rows")
        uniq, first, inv = np.unique(skeys, return_index=True, return_inverse=True)
        order = np.argsort(first)  # studies in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        item_study = torch.as_tensor(rank[inv.reshape(-1)], dtype=torch.long)
        first_rows = first[order]
        s_pat = pkeys[first_rows]
        # one patient per study
        _, p_codes_items = np.unique(pkeys, return_inverse=True)
        p_codes_items = p_codes_items.reshape(-1)
        if not np.array_equal(p_codes_items, p_codes_items[first_rows][rank[inv.reshape(-1)]]):
            raise ValueError("a study_id appears with more than one patient_id")
        study_patient = torch.as_tensor(p_codes_items[first_rows], dtype=torch.long)
        study_labels = None
        if labels is not None:
            lab = np.asarray(labels, dtype=np.float32)
            if lab.ndim != 2 or lab.shape != (n, NUM_LABELS):
                raise ValueError(f"labels must have shape [{n}, {NUM_LABELS}], got {lab.shape}")
            study_labels = lab[first_rows]
        hashes = None
        if text_hash is not None:
            th = [str(h) for h in np.asarray(text_hash).reshape(-1)]
            if len(th) != n:
                raise ValueError(f"report_text_hash has {len(th)} entries but image_emb has {n} rows")
            hashes = [th[i] for i in first_rows]
        del s_pat, uniq
        return cls(img, rep[torch.as_tensor(first_rows)], item_study, study_patient, study_labels, hashes)


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


def _section(
    above: torch.Tensor,
    ties: torch.Tensor,
    population: torch.Tensor,
    q_patient: torch.Tensor,
    ks: Sequence[int],
    ns: Iterable[int | str],
    n_candidates: int,
    ties_policy: str,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    beaten = apply_ties(above, ties, ties_policy)
    nres, clipped = resolve_ns(ns, n_candidates)
    nvals = [n for _, n in nres]
    probs = expected_recall(beaten, population, ks, nvals)  # [Q, nN, nK]
    draws = effective_draws(population, nvals).to(torch.float64)  # [Q, nN]
    pool = draws + 1
    kt = torch.tensor([float(k) for k in ks], dtype=torch.float64)
    chance = (kt.view(1, 1, -1) / pool.unsqueeze(-1)).clamp(max=1.0)  # [Q, nN, nK]
    q_n = probs.shape[0]
    rr = 1.0 / (beaten.to(torch.float64) + 1)
    feats = torch.cat([probs.reshape(q_n, -1), chance.reshape(q_n, -1), rr.unsqueeze(1)], 1)
    mean = feats.mean(0)
    f = probs[0].numel()
    ci_r = ci_x = ci_mrr = None
    if n_boot > 0:
        reps = bootstrap_patient_means(feats, q_patient, n_boot, seed)
        lo, hi = percentile_ci(reps[:, :f])
        xr = reps[:, :f] / reps[:, f : 2 * f]
        xlo, xhi = percentile_ci(xr)
        mlo, mhi = percentile_ci(reps[:, -1:])
        ci_r, ci_x, ci_mrr = (lo, hi), (xlo, xhi), (float(mlo[0]), float(mhi[0]))
    recall = []
    for ni, (label, n) in enumerate(nres):
        for ki, k in enumerate(ks):
            j = ni * len(ks) + ki
            val, ch = float(mean[j]), float(mean[f + j])
            row = {
                "k": int(k),
                "n": label,
                "n_value": int(n if n is not None else n_candidates),
                "value": val,
                "chance": ch,
                "x_chance": val / ch if ch > 0 else None,
                "effective_pool_mean": float(pool[:, ni].mean()),
                "frac_queries_pool_below_n": float((pool[:, ni] < (n if n is not None else n_candidates)).to(torch.float64).mean()),
            }
            if ci_r is not None:
                row["ci"] = [float(ci_r[0][j]), float(ci_r[1][j])]
                row["x_chance_ci"] = [float(ci_x[0][j]), float(ci_x[1][j])]
            recall.append(row)
    stats = rank_stats(beaten)
    if ci_mrr is not None:
        stats["mrr_ci"] = list(ci_mrr)
    return {
        "n_queries": int(q_n),
        "n_candidates": int(n_candidates),
        "ties_policy": ties_policy,
        "ties": {
            "n_queries_with_ties": int((ties > 0).sum()),
            "total_ties": int(ties.sum()),
            "max_ties": int(ties.max()) if q_n else 0,
        },
        "rank": stats,
        "recall": recall,
        "clipped_n": clipped,
    }


def _t2i_exclude(item_study: torch.Tensor) -> torch.Tensor:
    """[I, V-1] indices of the other images of each item's study (padding -1)."""
    st = item_study.numpy()
    order = np.argsort(st, kind="stable")
    bounds = np.flatnonzero(np.diff(st[order])) + 1
    groups = np.split(order, bounds)
    width = max(0, max(len(g) for g in groups) - 1)
    ex = np.full((st.size, max(width, 1)), -1, dtype=np.int64)
    if width:
        for g in groups:
            if len(g) > 1:
                for i in g:
                    others = g[g != i]
                    ex[i, : others.size] = others
    return torch.as_tensor(ex)


def relinkage_audit(
    es: EmbeddingSet,
    ks: Sequence[int] = (1, 5, 10),
    ns: Sequence[int | str] = (100, 1000, 10000, "full"),
    directions: Sequence[str] = ("i2t", "t2i"),
    hardneg: bool = False,
    dedup: bool = False,
    ties: str = "pessimistic",
    label_mapping: str = "blank_negative",
    n_boot: int = 1000,
    seed: int = 0,
    chunk_size: int | None = None,
    normalize: bool = True,
    device: str | torch.device | None = None,
    fused: bool | str = "auto",
) -> dict[str, dict[str, Any]]:
    """All requested re-linkage variants as JSON-able sections keyed
    "i2t", "t2i", "hardneg/i2t", "dedup/i2t"."""
    if ties not in TIES_POLICIES:
        raise ValueError(f"unknown ties policy {ties!r}; expected one of {TIES_POLICIES}")
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}; expected a subset of {DIRECTIONS}")
    if label_mapping not in LABEL_MAPPINGS:
        raise ValueError(f"unknown label mapping {label_mapping!r}; expected one of {LABEL_MAPPINGS}")
    img = as_embeddings(es.image_emb, "image_emb")
    rep = as_embeddings(es.report_emb, "report_emb")
    if img.shape[1] != rep.shape[1]:
        raise ValueError(f"image_emb dim {img.shape[1]} != report_emb dim {rep.shape[1]}")
    if normalize:
        img, rep = l2_normalize(img, "image_emb"), l2_normalize(rep, "report_emb")
    if device is not None:
        img, rep = img.to(device), rep.to(device)
    n_items, n_st = img.shape[0], rep.shape[0]
    item_study = _as_long(es.item_study, "item_study", n_items)
    study_patient = _as_long(es.study_patient, "study_patient", n_st)
    if n_st < 2:
        raise ValueError(f"re-linkage needs at least 2 studies (candidates), got {n_st}")
    item_patient = study_patient[item_study]
    common = dict(ks=list(ks), ns=list(ns), ties_policy=ties, n_boot=n_boot, seed=seed)
    out: dict[str, dict[str, Any]] = {}
    main = None
    if "i2t" in directions or hardneg:
        # One pass over the image x report similarities serves i2t and the hard negatives.
        hn = None
        if hardneg:
            hn = (label_groups(es.study_labels, label_mapping), study_patient, item_patient)
        main = rank_counts(img, rep, item_study, chunk_size=chunk_size, hardneg=hn, fused=fused)
    if "i2t" in directions:
        pop = torch.full((n_items,), n_st - 1, dtype=torch.long)
        out["i2t"] = {"direction": "i2t", "variant": "standard",
                      **_section(main["above"], main["ties"], pop, item_patient, n_candidates=n_st, **common)}
    if "t2i" in directions:
        ex = _t2i_exclude(item_study)
        q = rep[item_study.to(rep.device)]
        r = rank_counts(q, img, torch.arange(n_items), exclude=ex, chunk_size=chunk_size, fused=fused)
        a, t = r["above"], r["ties"]
        pop = n_items - 1 - (ex >= 0).sum(1)
        if int(pop.max()) < 1:
            raise ValueError("report->image needs images of at least 2 studies")
        out["t2i"] = {"direction": "t2i", "variant": "standard",
                      **_section(a, t, pop, item_patient, n_candidates=n_items, **common)}
    if hardneg:
        groups = hn[0]
        a, t, pop = main["hn_above"], main["hn_ties"], main["hn_pop"]
        has = pop > 0
        n_none = int((~has).sum())
        if not has.any():
            raise ValueError("no query has any pathology-matched hard negative (every label group holds one patient)")
        sec = _section(a[has], t[has], pop[has], item_patient[has], n_candidates=n_st, **common)
        sec.update({
            "direction": "i2t", "variant": "hardneg", "label_mapping": label_mapping,
            "n_label_groups": int(groups.max()) + 1, "n_queries_no_negatives": n_none,
            "population_mean": float(pop[has].to(torch.float64).mean()),
            "population_median": float(torch.quantile(pop[has].to(torch.float64), 0.5)),
        })
        out["hardneg/i2t"] = sec
    if dedup:
        if es.study_text_hash is None:
            raise ValueError("dedup needs a report text hash per study (report_text_hash)")
        uniq, first, inv = np.unique(np.asarray(es.study_text_hash), return_index=True, return_inverse=True)
        if uniq.size < 2:
            raise ValueError("dedup: fewer than 2 distinct report texts")
        reps_u = rep[torch.as_tensor(first, device=rep.device)]
        tgt = torch.as_tensor(inv.reshape(-1), dtype=torch.long)[item_study]
        r = rank_counts(img, reps_u, tgt, chunk_size=chunk_size, fused=fused)
        a, t = r["above"], r["ties"]
        pop = torch.full((n_items,), uniq.size - 1, dtype=torch.long)
        sec = _section(a, t, pop, item_patient, n_candidates=int(uniq.size), **common)
        sec.update({"direction": "i2t", "variant": "dedup", "dedup": True,
                    "n_unique_reports": int(uniq.size), "n_studies": n_st})
        out["dedup/i2t"] = sec
    return out
