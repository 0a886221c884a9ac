"""The re-linkage audit: every variant of Recall@K at N as JSON-able sections.

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
  95% CIs: percentile bootstrap over patients (the studies of one patient are correlated);
  ``ci90`` / ``x_chance_ci90`` (5th, 95th percentiles) are the one-sided 95% bounds.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from cxr_relink.audit.counting import TIES_POLICIES, apply_ties, rank_counts
from cxr_relink.audit.embeddings import EmbeddingSet, _as_long, as_embeddings, l2_normalize
from cxr_relink.audit.labels import LABEL_MAPPINGS, has_labels, label_groups
from cxr_relink.audit.recall import effective_draws, expected_recall, rank_stats, resolve_ns
from cxr_relink.audit.settings import config_settings
from cxr_relink.audit.settings import resolve as resolve_settings
from cxr_relink.audit.stats import bootstrap_patient_means, percentile_ci

DIRECTIONS = ("i2t", "t2i")

# Degenerate embeddings come from a broken pipeline, not from a model (a folder without its tokenizer
# files encodes every report the same), and audit to about chance: a headline read as "no risk". They
# are refused unless allow_degenerate, and then flagged in every section. Degenerate means either:
# * collapsed: every image (or every report) row is the same unit vector, up to this L2 distance;
COLLAPSE_DISTANCE = 1e-4
# * tied: more than this fraction of image->report queries have their true report tied with at least
#   one other report (of another text, when report hashes are given). Identical report texts tie
#   legitimately (templated normal reports): 25-32% of queries in the paper-scale synthetic test
#   split, 20% in the external one (docs/audit.md).
TIED_QUERY_FRACTION = 0.5


class DegenerateEmbeddingsError(ValueError):
    """The embeddings are collapsed or tied beyond TIED_QUERY_FRACTION (see above)."""


def _whole(x: Any, name: str, minimum: int) -> int:
    """``x`` as an int when it is a whole number >= ``minimum`` (1.0 is 1); 1.5, True, "1" raise naming
    ``name`` (int() would truncate 1.5 to 1 silently)."""
    ok = not isinstance(x, (bool, np.bool_)) and (
        isinstance(x, numbers.Integral) or (isinstance(x, numbers.Real) and float(x).is_integer()))
    if not ok or int(x) < minimum:
        raise ValueError(f"{name}: {x!r} is not a whole number >= {minimum}")
    return int(x)


def check_settings(ks: Sequence[Any], ns: Sequence[Any], directions: Sequence[str], n_boot: Any,
                   seed: Any, hardneg: bool = False, dedup: bool = False
                   ) -> tuple[list[int], list[int | str], list[str], int, int]:
    """The re-linkage settings validated: K and N whole numbers (N may be "full"), at least one of each,
    a direction unless a hard-negative or dedup variant runs (they are image->report variants of their
    own), n_boot >= 0. Returns them as ints."""
    for name, v in (("ks", ks), ("ns", ns), ("directions", directions)):
        if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
            raise ValueError(f"{name} must be a list, got {v!r}")
        if len(v) == 0 and (name != "directions" or not (hardneg or dedup)):
            raise ValueError(f"{name} is empty: nothing would be audited"
                             + (f" (give a subset of {DIRECTIONS})" if name == "directions" else ""))
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}; expected a subset of {DIRECTIONS}")
    ks = [_whole(k, "ks", 1) for k in ks]
    ns = [n if isinstance(n, str) else _whole(n, "ns", 1) for n in ns]
    return ks, ns, list(directions), _whole(n_boot, "n_boot", 0), _whole(seed, "seed", 0)


def _collapsed(x: torch.Tensor, name: str) -> str | None:
    """Why ``x``'s rows are one vector (unit-normalised here, whatever the caller did), or None."""
    if x.shape[0] < 2:
        return None

    def unit(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.double()
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)

    first, spread = unit(x[:1]), 0.0
    for s in range(0, x.shape[0], 4096):  # in blocks: real embeddings leave at the first one
        spread = max(spread, float((unit(x[s : s + 4096]) - first).norm(dim=1).max()))
        if spread > COLLAPSE_DISTANCE:
            return None
    return (f"all {x.shape[0]} {name} rows are one vector (largest distance between unit rows {spread:.1e} "
            f"<= {COLLAPSE_DISTANCE:g})")


def _refuse_degenerate(reasons: list[str]) -> None:
    raise DegenerateEmbeddingsError(
        "re-linkage audit refused, degenerate embeddings: " + "; ".join(reasons) + ". These come from a broken "
        "pipeline (e.g. a model folder without its tokenizer files encodes every report the same) and audit to "
        "about chance, which reads as 'no re-linkage risk'. Fix the inputs; to audit them anyway, with the result "
        "flagged degenerate, pass allow_degenerate=True (audit.relinkage.allow_degenerate=true).")


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
        # Two-sided 90% = the one-sided 95% bounds (5th / 95th percentiles): a per-model claim such as
        # "above chance" is one-sided (experiments/verdict.py).
        ci90_r, ci90_x = percentile_ci(reps[:, :f], 0.90), percentile_ci(xr, 0.90)
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
                row["ci90"] = [float(ci90_r[0][j]), float(ci90_r[1][j])]
                row["x_chance_ci90"] = [float(ci90_x[0][j]), float(ci90_x[1][j])]
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
    chunk_size: int | Sequence[int] | None = None,
    normalize: bool = True,
    device: str | torch.device | None = None,
    fused: bool | str = "auto",
    allow_degenerate: bool = False,
) -> dict[str, dict[str, Any]]:
    """All requested re-linkage variants as JSON-able sections keyed
    "i2t", "t2i", "hardneg/i2t", "dedup/i2t". Degenerate embeddings (COLLAPSE_DISTANCE,
    TIED_QUERY_FRACTION) raise DegenerateEmbeddingsError; with ``allow_degenerate`` they are audited
    and every section carries ``"degenerate": [reasons]``."""
    if ties not in TIES_POLICIES:
        raise ValueError(f"unknown ties policy {ties!r}; expected one of {TIES_POLICIES}")
    ks, ns, directions, n_boot, seed = check_settings(ks, ns, directions, n_boot, seed, hardneg, dedup)
    if label_mapping not in LABEL_MAPPINGS:
        raise ValueError(f"unknown label mapping {label_mapping!r}; expected one of {LABEL_MAPPINGS}")
    img = as_embeddings(es.image_emb, "image_emb")
    rep = as_embeddings(es.report_emb, "report_emb")
    if img.shape[1] != rep.shape[1]:
        raise ValueError(f"image_emb dim {img.shape[1]} != report_emb dim {rep.shape[1]}")
    degenerate = [why for why in (_collapsed(img, "image_emb"), _collapsed(rep, "report_emb")) if why]
    if degenerate and not allow_degenerate:
        _refuse_degenerate(degenerate)  # before the similarities are computed
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
    if n_boot > 0 and int(torch.unique(item_patient).numel()) < 2:
        raise ValueError(f"the {n_items} queries all belong to one patient (is patient_id constant?): the bootstrap "
                         "over patients would resample one cluster and its 95% CI collapse to a point; give real "
                         "patient ids, or n_boot=0 for point estimates without intervals")
    common = dict(ks=list(ks), ns=list(ns), ties_policy=ties, n_boot=n_boot, seed=seed)
    # One pass over the image x report similarities counts every direction: i2t from the rows,
    # t2i from the columns, hard negatives and dedup from the same rows under their masks.
    hn = sub = None
    if hardneg:
        hn = (label_groups(es.study_labels, label_mapping), study_patient, item_patient)
    if dedup and es.study_text_hash is None:
        raise ValueError("dedup needs a report text hash per study (report_text_hash)")
    n_texts = 0
    if es.study_text_hash is not None:
        uniq, first, inv = np.unique(np.asarray(es.study_text_hash), return_index=True, return_inverse=True)
        n_texts = int(uniq.size)
        if dedup and n_texts < 2:
            raise ValueError("dedup: fewer than 2 distinct report texts")
        # The first study of each distinct text stands for it (its column is the candidate). Counted
        # whenever hashes are given, dedup or not: the tie guard below reads it, so one file gets one
        # verdict whichever variants run.
        if n_texts >= 2:
            is_first = np.zeros(n_st, dtype=bool)
            is_first[first] = True
            sub = (is_first, torch.as_tensor(first[inv.reshape(-1)])[item_study])
    t2i = "t2i" in directions
    if t2i:
        per_study = torch.bincount(item_study, minlength=n_st)
        t2i_pop = n_items - per_study[item_study]  # the study's other images are no negatives
        if int(t2i_pop.max()) < 1:
            raise ValueError("report->image needs images of at least 2 studies")
    r = rank_counts(img, rep, item_study, chunk_size=chunk_size, hardneg=hn, subset=sub, reverse=t2i, fused=fused)
    # With report hashes (whichever variants run), a tie with a report of the same text is no sign of a
    # broken pipeline; one text only: no other text to tie with.
    hashed = es.study_text_hash is not None
    if not hashed:
        tied = float((r["ties"] > 0).to(torch.float64).mean())
    else:
        tied = float((r["sub_ties"] > 0).to(torch.float64).mean()) if sub is not None else 0.0
    if tied > TIED_QUERY_FRACTION:
        degenerate.append(f"{100 * tied:.1f}% of image->report queries have their true report tied with another "
                          f"report{' of another text' if hashed else ''} (more than {100 * TIED_QUERY_FRACTION:.0f}%)")
        if not allow_degenerate:
            _refuse_degenerate(degenerate)
    out: dict[str, dict[str, Any]] = {}
    if "i2t" in directions:
        pop = torch.full((n_items,), n_st - 1, dtype=torch.long)
        out["i2t"] = {"direction": "i2t", "variant": "standard",
                      **_section(r["above"], r["ties"], pop, item_patient, n_candidates=n_st, **common)}
    if t2i:
        out["t2i"] = {"direction": "t2i", "variant": "standard",
                      **_section(r["rev_above"], r["rev_ties"], t2i_pop, item_patient, n_candidates=n_items, **common)}
    if hardneg:
        groups = hn[0]
        a, t, pop = r["hn_above"], r["hn_ties"], r["hn_pop"]
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
        pop = torch.full((n_items,), n_texts - 1, dtype=torch.long)
        sec = _section(r["sub_above"], r["sub_ties"], pop, item_patient, n_candidates=n_texts, **common)
        sec.update({"direction": "i2t", "variant": "dedup", "dedup": True,
                    "n_unique_reports": n_texts, "n_studies": n_st})
        out["dedup/i2t"] = sec
    if degenerate:  # allowed: every section says so (the headline, report.md and audit.json show it)
        for sec in out.values():
            sec["degenerate"] = list(degenerate)
    return out


class Relinkage:
    """``relinkage_audit`` with the settings of audit/settings.py (RELINKAGE), the keys given
    overriding them: the audit the validation callback (callbacks.audit.RelinkageAudit) and
    evaluate.py run, without Lightning (evaluate.py's embeddings path never imports it)."""

    def __init__(self, **given: Any):
        s = resolve_settings("relinkage", given)
        ks, ns, directions, n_boot, seed = check_settings(s["ks"], s["ns"], s["directions"], s["n_boot"], s["seed"],
                                                          bool(s["hardneg"]), bool(s["dedup"]))
        self.settings = {
            "ks": ks, "ns": ns,
            "directions": directions, "hardneg": bool(s["hardneg"]), "label_mapping": s["label_mapping"],
            "dedup": bool(s["dedup"]), "ties": s["ties"], "n_boot": n_boot, "seed": seed,
            "allow_degenerate": bool(s["allow_degenerate"]),
        }
        self.chunk_size = s["chunk_size"]
        self.device = s["device"]
        self.fused = s["fused"]  # fused counting kernels (see audit.counting.rank_counts); results identical

    @classmethod
    def from_config(cls, node: Any) -> "Relinkage":
        """From an audit config node (configs/audit/*.yaml): its callback options are not settings."""
        return cls(**config_settings("relinkage", node))

    def skipped(self, es: EmbeddingSet) -> dict[str, str]:
        """The requested variants that cannot run on ``es``, with the reason."""
        out = {}
        if self.settings["hardneg"] and not has_labels(es.study_labels):
            out["hardneg/i2t"] = "no labels in the evaluated split (hard negatives are defined by labels)"
        if self.settings["dedup"] and es.study_text_hash is None:
            out["dedup/i2t"] = "no report hashes"
        return out

    def audit(self, es: EmbeddingSet, device: str | torch.device | None = None,
              skipped: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """relinkage_audit of ``es`` with these settings, less the variants ``skipped`` names
        (default: ``self.skipped(es)``)."""
        skip = self.skipped(es) if skipped is None else skipped
        s = {**self.settings, "hardneg": self.settings["hardneg"] and "hardneg/i2t" not in skip,
             "dedup": self.settings["dedup"] and "dedup/i2t" not in skip}
        return relinkage_audit(es, **s, chunk_size=self.chunk_size, device=self.device or device, fused=self.fused)
