"""Member vs non-member linkage test: does training on a pair make it easier to re-link?

For an (epsilon, delta)-DP training run (add/remove adjacency on the privacy unit), any event about
one record -- here "its image retrieves its own report within the top K of a pool" -- has
    P[event | record in the training set] <= e^epsilon * P[event | record not in it] + delta.
We estimate both sides with exchangeable records: members are training-split studies, non-members
are held-out (test-split) studies of other patients drawn from the same cohort, and every query
competes against the *same fixed pool* of non-member distractor reports (the val split's reports,
which are neither members nor queries). Recall@K at pool size N is computed exactly (hypergeometric
over the distractor pool, audit/recall.py); 95% CIs by bootstrap over patients.

Reading the result: ``holds`` compares point estimates; ``violated_significantly`` asks whether
even the member CI's lower end exceeds e^epsilon times the non-member CI's upper end plus delta.
This is a statistical check on exchangeable populations, not a proof; a significant violation
refutes the claimed epsilon for *these* weights. Note the scope: if the frozen encoders were
trained on the members (stage 2), their leakage is outside the DP stage's epsilon and shows up
here as a gap that the bound does not cover -- run the test on the "before DP" model too.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from cxr_relink.audit.counting import apply_ties, rank_counts
from cxr_relink.audit.embeddings import l2_normalize
from cxr_relink.audit.recall import expected_recall
from cxr_relink.audit.stats import bootstrap_patient_means, percentile_ci


def _counts_vs_pool(query: torch.Tensor, target: torch.Tensor, pool: torch.Tensor, ties: str, chunk: int = 256) -> torch.Tensor:
    """Per query: how many pool reports beat (or tie, if pessimistic) its own report.

    Uses ``rank_counts`` on [pool; this chunk's targets] with the chunk's other targets excluded by
    index, so the target's score comes from the same similarity matrix as the pool's.
    """
    m = pool.shape[0]
    out = []
    for s in range(0, query.shape[0], chunk):
        q, t = query[s : s + chunk], target[s : s + chunk]
        b = q.shape[0]
        cand = torch.cat([pool, t])
        tgt = m + torch.arange(b)
        others = torch.arange(b).repeat(b, 1)
        keep = others != torch.arange(b).unsqueeze(1)
        excl = (m + others[keep]).reshape(b, b - 1) if b > 1 else torch.full((b, 1), -1, dtype=torch.long)
        counts = rank_counts(q, cand, tgt, exclude=excl, chunk_size=chunk)
        out.append(apply_ties(counts["above"], counts["ties"], ties))
    return torch.cat(out)


def member_nonmember_linkage(
    member_img: torch.Tensor,
    member_txt: torch.Tensor,
    member_patient: torch.Tensor,
    nonmember_img: torch.Tensor,
    nonmember_txt: torch.Tensor,
    nonmember_patient: torch.Tensor,
    distractor_txt: torch.Tensor,
    epsilon: float | None,
    delta: float | None,
    ks: Sequence[int] = (1, 5, 10),
    ns: Sequence[int | None] = (100, None),
    ties: str = "pessimistic",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@K at N for member and non-member queries against one fixed distractor pool.

    *_img: query image embeddings [Q, D]; *_txt: each query's own report embedding [Q, D];
    *_patient: patient codes [Q] (bootstrap unit). ``ns``: pool sizes (None = the whole pool + 1).
    epsilon None (a non-private model) reports both recalls without a bound.
    """
    pool = l2_normalize(distractor_txt.float(), "distractor_txt")
    m = pool.shape[0]
    res: dict[str, Any] = {"n_members": int(member_img.shape[0]), "n_nonmembers": int(nonmember_img.shape[0]),
                           "n_distractors": int(m), "epsilon": epsilon, "delta": delta, "ties_policy": ties, "rows": []}
    per = {}
    for name, img, txt, pat in (("member", member_img, member_txt, member_patient), ("nonmember", nonmember_img, nonmember_txt, nonmember_patient)):
        beaten = _counts_vs_pool(l2_normalize(img.float(), f"{name}_img"), l2_normalize(txt.float(), f"{name}_txt"), pool, ties)
        probs = expected_recall(beaten, torch.full_like(beaten, m), ks, list(ns))  # [Q, nN, nK]
        q = probs.shape[0]
        flat = probs.reshape(q, -1)
        reps = bootstrap_patient_means(flat, torch.as_tensor(pat).reshape(-1).long(), n_boot, seed) if n_boot else None
        lo, hi = percentile_ci(reps) if reps is not None else (flat.mean(0), flat.mean(0))
        per[name] = (flat.mean(0), lo, hi)
    e = math.exp(epsilon) if epsilon is not None and math.isfinite(epsilon) else None
    d = float(delta or 0.0)
    j = 0
    for n in ns:
        for k in ks:
            mem, mlo, mhi = (float(x[j]) for x in per["member"])
            non, nlo, nhi = (float(x[j]) for x in per["nonmember"])
            row = {"k": int(k), "n": "full" if n is None else int(n), "n_value": int(m + 1 if n is None else min(n, m + 1)),
                   "member": mem, "member_ci": [mlo, mhi], "nonmember": non, "nonmember_ci": [nlo, nhi],
                   "ratio": mem / non if non > 0 else None,
                   "empirical_epsilon": math.log((mem - d) / non) if non > 0 and mem - d > 0 else None}
            if e is not None:
                bound = e * non + d
                row.update({"bound": bound, "holds": bool(mem <= bound),
                            "violated_significantly": bool(mlo > e * nhi + d)})
            res["rows"].append(row)
            j += 1
    return res


@torch.no_grad()
def embed_items(module, feats: dict[str, torch.Tensor], batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached split features -> (image embedding per item, its study's report embedding per item)."""
    module.eval()
    dev = module.device
    img = torch.cat([module.encode_image_features(feats["image"][s : s + batch].to(dev)).cpu() for s in range(0, feats["image"].shape[0], batch)])
    txt = torch.cat([module.encode_report_features(feats["text"][s : s + batch].to(dev)).cpu() for s in range(0, feats["text"].shape[0], batch)])
    return img, txt[feats["item_study"]]


def membership_test_from_features(
    module,
    features: dict[str, dict[str, torch.Tensor]],
    epsilon: float | None,
    delta: float | None,
    member_split: str = "train",
    nonmember_split: str = "test",
    distractor_split: str = "val",
    max_queries: int | None = None,
    seed: int = 0,
    **kw: Any,
) -> dict[str, Any]:
    """The linkage test on a module's heads over cached features (one query per image item).

    Members are subsampled to the non-members' count (or ``max_queries``) so both estimates have
    comparable precision.
    """
    gen = np.random.default_rng(seed)
    out = {}
    for name, split in (("member", member_split), ("nonmember", nonmember_split)):
        f = features[split]
        img, txt = embed_items(module, f)
        pat = f["study_patient"][f["item_study"]]
        out[name] = (img, txt, pat)
    n_q = out["nonmember"][0].shape[0] if max_queries is None else min(max_queries, out["nonmember"][0].shape[0])
    for name in out:
        img, txt, pat = out[name]
        if img.shape[0] > n_q:
            idx = torch.as_tensor(np.sort(gen.choice(img.shape[0], n_q, replace=False)))
            out[name] = (img[idx], txt[idx], pat[idx])
    _, dist = embed_items(module, {**features[distractor_split], "item_study": torch.arange(features[distractor_split]["text"].shape[0])})
    return member_nonmember_linkage(*out["member"], *out["nonmember"], dist, epsilon, delta, seed=seed, **kw)
