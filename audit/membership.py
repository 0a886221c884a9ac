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


# --------------------------------------------------------------------------- distribution matching
def label_matched_pools(labels_a: np.ndarray | None, labels_b: np.ndarray | None, m: int | None,
                        rng: np.random.Generator, mapping: str = "positive_only") -> tuple[np.ndarray, np.ndarray, dict]:
    """Equal, label-matched samples of two groups of studies: indices into a and into b, sorted, with the
    same number of studies of every label pattern (``audit.labels.label_groups`` under ``mapping``) in both.

    Why exact pattern matching: a pathology changes how linkable a study is (rare findings are distinctive),
    so two groups whose label mixes differ would differ in R@1 or in pair cosines without any memorisation,
    and a membership test would read the label shift as membership. Per pattern p at most
    min(#a_p, #b_p) studies can be matched; ``m`` (None: all of them) slots are drawn uniformly among those,
    then that many studies of p within each group. Without labels on either side: (None, None, info), and
    ``equal_pools`` falls back to uniform equal-size draws (said in its info)."""
    from cxr_relink.audit.labels import has_labels, label_groups

    if labels_a is None or labels_b is None or not (has_labels(labels_a) and has_labels(labels_b)):
        return None, None, {"label_matched": False}
    g = label_groups(np.concatenate([np.asarray(labels_a, np.float32), np.asarray(labels_b, np.float32)]),
                     mapping).numpy()
    ga, gb = g[: len(labels_a)], g[len(labels_a):]
    slots = []
    for p in np.unique(ga):
        k = min(int((ga == p).sum()), int((gb == p).sum()))
        slots += [p] * k
    slots = np.asarray(slots, dtype=np.int64)
    cap = slots.size
    want = cap if m is None else int(m)
    if want > cap:
        raise ValueError(f"label-matched pools: {want} studies per group requested but only {cap} can be matched "
                         f"on label patterns ({mapping}); lower the pool or turn label matching off")
    chosen = rng.choice(slots, want, replace=False) if want < cap else slots
    ia, ib = [], []
    for p, k in zip(*np.unique(chosen, return_counts=True)):
        ia.append(rng.choice(np.flatnonzero(ga == p), k, replace=False))
        ib.append(rng.choice(np.flatnonzero(gb == p), k, replace=False))
    ia = np.sort(np.concatenate(ia)) if ia else np.zeros(0, np.int64)
    ib = np.sort(np.concatenate(ib)) if ib else np.zeros(0, np.int64)
    return ia, ib, {"label_matched": True, "label_mapping": mapping, "matchable": int(cap),
                    "n_patterns": int(np.unique(chosen).size)}


def equal_pools(labels_a, labels_b, n_a: int, n_b: int, m: int | None, rng: np.random.Generator,
                label_match: bool = True, mapping: str = "positive_only") -> tuple[np.ndarray, np.ndarray, dict]:
    """Equal pools of ``m`` studies (None: as many as possible) drawn within each group: label-matched when
    ``label_match`` and both groups have labels, else uniform (recorded in the info)."""
    if label_match:
        ia, ib, info = label_matched_pools(labels_a, labels_b, m, rng, mapping)
        if ia is not None:
            return ia, ib, info
        info["why_not"] = "no labels on one of the groups: pools are equal-size uniform draws, not label-matched"
    else:
        info = {"label_matched": False, "why_not": "label_match=false"}
    k = min(n_a, n_b) if m is None else int(m)
    if k > min(n_a, n_b):
        raise ValueError(f"pools of {k} studies requested but the groups hold {n_a} and {n_b}")
    return np.sort(rng.choice(n_a, k, replace=False)), np.sort(rng.choice(n_b, k, replace=False)), info


# --------------------------------------------------------------------------- pair-level membership test
def true_pair_cosines(image: torch.Tensor, report: torch.Tensor, item_study: torch.Tensor) -> torch.Tensor:
    """Per study: the mean over its image items of cos(image item, the study's report) [S]."""
    a = torch.nn.functional.normalize(image.double(), dim=1)
    b = torch.nn.functional.normalize(report.double(), dim=1)
    c = (a * b[item_study]).sum(1)
    n = report.shape[0]
    return torch.zeros(n, dtype=torch.float64).index_add_(0, item_study, c) / torch.bincount(
        item_study, minlength=n).double()


def weighted_roc(pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray | None = None,
                 w_neg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of "member if score >= threshold" at every distinct score, from (0, 0) to (1, 1), with
    per-example weights (bootstrap counts; None = 1). Ties between a member and a non-member move both
    rates at one threshold, so the trapezoid area counts them as 1/2 (the Mann-Whitney convention)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    wp = np.ones(pos.size) if w_pos is None else np.asarray(w_pos, np.float64)
    wn = np.ones(neg.size) if w_neg is None else np.asarray(w_neg, np.float64)
    s = np.concatenate([pos, neg])
    wpos = np.concatenate([wp, np.zeros(neg.size)])
    wneg = np.concatenate([np.zeros(pos.size), wn])
    order = np.argsort(-s, kind="stable")
    s, wpos, wneg = s[order], wpos[order], wneg[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # the last row of each distinct score
    tp, fp = np.cumsum(wpos)[last], np.cumsum(wneg)[last]
    return np.r_[0.0, fp / wn.sum()], np.r_[0.0, tp / wp.sum()]


def auc_and_tpr(pos, neg, fprs: Sequence[float], w_pos=None, w_neg=None) -> tuple[float, list[float]]:
    """ROC AUC and, per target FPR a, the largest TPR at a threshold whose FPR is <= a."""
    fpr, tpr = weighted_roc(pos, neg, w_pos, w_neg)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return auc, [float(tpr[fpr <= a + 1e-12].max()) for a in fprs]


def _patient_weights(patient: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap counts per example: patients drawn with replacement, each example weighted by how often its
    patient was drawn (a patient's studies are correlated: they move together)."""
    _, code = np.unique(np.asarray(patient).reshape(-1), return_inverse=True)
    code = code.reshape(-1)
    n_p = int(code.max()) + 1
    return np.bincount(rng.integers(0, n_p, n_p), minlength=n_p)[code].astype(np.float64)


def pair_membership_test(member_score: np.ndarray, nonmember_score: np.ndarray, member_patient: np.ndarray,
                         nonmember_patient: np.ndarray, member_reference: np.ndarray | None = None,
                         nonmember_reference: np.ndarray | None = None, fprs: Sequence[float] = (0.01, 0.001),
                         n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Membership inference on (image, report) pairs: score = the audited model's cosine of the true pair,
    calibrated per example by subtracting ``*_reference`` (that pair's cosine under reference models trained
    without it, [n] or [n, R] averaged over R; e.g. a public-only model or shadow models) when given.

    Members score higher if the model memorised its training pairs. Returns the AUC with a 95% two-sample
    patient-bootstrap CI and a one-sided 95% lower bound (the question is "above 0.5?"), and TPR at each FPR
    in ``fprs`` with its bootstrap CI; an FPR below 1 / #non-members cannot be resolved (no threshold lets
    fewer than one non-member through): its TPR is None with the reason. The groups should be
    distribution-matched (``equal_pools``): with out-of-distribution non-members the test detects the shift,
    not membership."""
    ms, ns = np.asarray(member_score, np.float64).reshape(-1), np.asarray(nonmember_score, np.float64).reshape(-1)
    calibrated = member_reference is not None and nonmember_reference is not None
    if calibrated:
        mr, nr = np.asarray(member_reference, np.float64), np.asarray(nonmember_reference, np.float64)
        mr, nr = (mr.mean(1) if mr.ndim == 2 else mr), (nr.mean(1) if nr.ndim == 2 else nr)
        if mr.shape != ms.shape or nr.shape != ns.shape:
            raise ValueError(f"reference scores must have one value per example: members {mr.shape} vs {ms.shape}, "
                             f"non-members {nr.shape} vs {ns.shape}")
        ms, ns = ms - mr, ns - nr
    if ms.size < 2 or ns.size < 2:
        raise ValueError(f"pair membership test needs >= 2 members and >= 2 non-members, got {ms.size} and {ns.size}")
    auc, tprs = auc_and_tpr(ms, ns, fprs)
    rng = np.random.default_rng(seed)
    reps = np.array([(lambda a, t: [a, *t])(*auc_and_tpr(ms, ns, fprs, _patient_weights(member_patient, rng),
                                                         _patient_weights(nonmember_patient, rng)))
                     for _ in range(int(n_boot))]) if n_boot else None
    res: dict[str, Any] = {"n_members": int(ms.size), "n_nonmembers": int(ns.size), "calibrated": calibrated,
                           "score": "cosine of the true pair" + (" minus the reference models' cosine" if calibrated
                                                                 else " (uncalibrated: no reference model)"),
                           "auc": auc, "n_boot": int(n_boot)}
    if reps is not None:
        res["auc_ci"] = [float(np.quantile(reps[:, 0], 0.025)), float(np.quantile(reps[:, 0], 0.975))]
        res["auc_lower95_one_sided"] = float(np.quantile(reps[:, 0], 0.05))
    res["tpr_at_fpr"] = []
    for j, a in enumerate(fprs):
        row: dict[str, Any] = {"fpr": float(a)}
        if a * ns.size < 1:
            row.update(tpr=None, why=f"FPR {a:g} is below 1/{ns.size} non-members: not resolvable")
        else:
            row["tpr"] = tprs[j]
            if reps is not None:
                row["ci"] = [float(np.quantile(reps[:, 1 + j], 0.025)), float(np.quantile(reps[:, 1 + j], 0.975))]
        res["tpr_at_fpr"].append(row)
    return res
