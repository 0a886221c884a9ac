"""Three numbers per released model (docs/audit.md, "Capability, release-attributable, memorisation"):

* **capability**: re-linkage of unseen patients by the released embeddings (the standard audit's image ->
  report Recall@1 at N, with its patient-bootstrap CI): what any model good at the task does;
* **release-attributable**: per auxiliary draw, the best attack *with* the release (the baseline cosine and
  audit.adaptive's attacks on the released model's features) minus the best attack *without* it on the
  same auxiliary pairs, over ``n_draws`` seeded draws: what releasing adds. The no-release attackers
  here need no training of a model: ``pool_centring`` (release-free features centred on the audited pool,
  linked through the k aux pairs: image i and report t are scored by sum_j cos(x_i, x_j) cos(y_t, y_j)
  over the aux pairs j) and ``ridge`` (audit.adaptive's ridge on the release-free features). The caller
  supplies the release-free features (e.g. downsampled pixels and report bag-of-words; a trunk trained on
  public data only, where one exists);
* **memorisation**: the same attacks scored on the model's training patients (members) vs
  distribution-matched held-out patients (non-members), equal pool sizes with each pool drawn within its
  group, the difference of image -> report R@1 (each query against its own group's pool) with a
  two-sample patient bootstrap CI. What DP bounds.

Every best is a maximum over attacks selected on the audited split (optimistic for the attacker on both
sides of the difference). No Lightning: arrays in, a JSON-able dict out.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxr_relink.audit.adaptive import BASELINE, PairedFeatures, _t975, check_disjoint, draw_order, draw_seed, fit_attack
from cxr_relink.audit.embeddings import EmbeddingSet
from cxr_relink.audit.relinkage import DegenerateEmbeddingsError
from cxr_relink.audit.stats import bootstrap_patient_means, percentile_ci

WITH_RELEASE = (BASELINE, "ridge", "procrustes", "head")
NO_RELEASE = ("pool_centring", "ridge")


def pool_centring_embed(aux: PairedFeatures, target: PairedFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """The training-free no-release attacker: release-free features (``*_trunk`` of ``aux`` and ``target``)
    centred on the audited pool's means, each image item and report described by its cosines to the k aux
    images / reports; the cosine of two descriptions is then sum_j cos(x_i, x_j) cos(y_t, y_j), up to norms."""
    mi, mt = target.image_trunk.double().mean(0), target.text_trunk.double().mean(0)
    ai = F.normalize(aux.study_mean(aux.image_trunk) - mi, dim=1)
    at = F.normalize(aux.text_trunk.double() - mt, dim=1)
    qi = F.normalize(target.image_trunk.double() - mi, dim=1) @ ai.T
    qt = F.normalize(target.text_trunk.double() - mt, dim=1) @ at.T
    return qi, qt


def _r_at(relinkage: dict[str, Any], k: int, n: str) -> dict[str, Any] | None:
    return next((r for r in (relinkage.get("i2t") or {}).get("recall", []) if r["k"] == k and str(r["n"]) == str(n)),
                None)


def _pick_n(relinkage: dict[str, Any], k: int, n: int | str) -> str:
    """N = n when the audited pool holds it, else the full pool."""
    return str(n) if _r_at(relinkage, k, str(n)) is not None else "full"


def per_query_hits(image: torch.Tensor, report: torch.Tensor, item_study: torch.Tensor) -> torch.Tensor:
    """Per image item: 1 if its own study's report has the highest cosine among the given reports (ties
    pessimistic), else 0: Recall@1 against a pool of exactly these reports."""
    s = F.normalize(image.double(), dim=1) @ F.normalize(report.double(), dim=1).T
    own = s.gather(1, item_study.view(-1, 1))
    return ((s >= own).sum(1) == 1).double()


def memorisation(members: PairedFeatures, nonmembers: PairedFeatures,
                 embeds: dict[str, Callable[[PairedFeatures], tuple[torch.Tensor, torch.Tensor]]],
                 pool: int | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Members vs non-members, equal pools: ``pool`` studies (default: the smaller group's size) drawn
    within each group (seeded), each image item ranked against its own group's pool. Per attack: R@1 of
    each group with patient-bootstrap CIs and the difference members - non-members with a two-sample
    patient bootstrap (patients resampled within each group independently)."""
    m = min(members.n_studies, nonmembers.n_studies) if pool is None else int(pool)
    if m < 2 or m > min(members.n_studies, nonmembers.n_studies):
        raise ValueError(f"memorisation: pool {m} must be in 2..{min(members.n_studies, nonmembers.n_studies)} "
                         "(both groups hold that many studies)")
    rng = np.random.default_rng(seed)
    groups = {name: g.select(np.sort(rng.choice(g.n_studies, m, replace=False)))
              for name, g in (("members", members), ("nonmembers", nonmembers))}
    out: dict[str, Any] = {"pool": m, "n_boot": int(n_boot), "attacks": {}}
    for a, embed in embeds.items():
        row: dict[str, Any] = {}
        reps = {}
        for j, (name, g) in enumerate(groups.items()):
            qi, qt = embed(g)
            hits = per_query_hits(qi, qt, g.item_study)
            _, pcode = np.unique(g.study_patient[g.item_study.numpy()], return_inverse=True)
            r = bootstrap_patient_means(hits.unsqueeze(1), torch.as_tensor(pcode.reshape(-1)), n_boot, seed + j)[:, 0]
            lo, hi = percentile_ci(r.unsqueeze(1))
            row[name] = {"r1": float(hits.mean()), "ci": [float(lo[0]), float(hi[0])], "n_queries": int(hits.numel())}
            reps[name] = r
        diff = reps["members"] - reps["nonmembers"]
        lo, hi = percentile_ci(diff.unsqueeze(1))
        row["difference"] = row["members"]["r1"] - row["nonmembers"]["r1"]
        row["difference_ci"] = [float(lo[0]), float(hi[0])]
        out["attacks"][a] = row
    best = max(out["attacks"], key=lambda a: out["attacks"][a]["difference"])
    out["best"] = {"attack": best, **out["attacks"][best], "selected_on_audited_split": True}
    out["chance"] = 1.0 / m
    return out


def risk_audit(target: PairedFeatures, aux: PairedFeatures, relink: Callable[[EmbeddingSet], dict],
               no_release_target: PairedFeatures | None = None, no_release_aux: PairedFeatures | None = None,
               members: PairedFeatures | None = None, nonmembers: PairedFeatures | None = None,
               n_aux: int = 100, n_draws: int = 5, attacks: Sequence[str] = ("ridge", "procrustes", "head"),
               no_release: Sequence[str] = NO_RELEASE, k: int = 1, n: int | str = 100, seed: int = 0,
               head: dict[str, Any] | None = None, ridge: dict[str, Any] | None = None, pool: int | None = None,
               n_boot: int = 1000) -> dict[str, Any]:
    """The ``risk`` section: capability, release-attributable (when release-free features of the audited
    split and of the aux studies, ``no_release_*``, are given; the same studies in the same order as
    ``target`` / ``aux``), memorisation (when ``members`` and ``nonmembers`` are given). Image -> report
    Recall@``k`` at N = ``n`` (else the full pool). Auxiliary draws as audit.adaptive's."""
    check_disjoint(target, aux, "aux")
    dim = target.image_released.shape[1]
    base = relink(target.embedding_set(target.image_released, target.text_released))
    nn = _pick_n(base, k, n)
    cap = _r_at(base, k, nn)
    out: dict[str, Any] = {
        "k": int(k), "n": nn, "n_aux": int(min(n_aux, aux.n_studies)), "seed": int(seed),
        "capability": {"value": cap["value"], "ci": cap.get("ci"), "chance": cap["chance"],
                       "x_chance": cap["x_chance"], "n_value": cap["n_value"], "n_studies": target.n_studies}}
    if no_release_target is not None:
        if no_release_aux is None:
            raise ValueError("release-attributable needs release-free features of the aux studies too")
        if no_release_target.n_studies != target.n_studies or no_release_aux.n_studies != aux.n_studies:
            raise ValueError("release-free features must describe the same studies as the released ones")
        used = min(int(n_aux), aux.n_studies)
        draws_here = 1 if used >= aux.n_studies else int(n_draws)
        draws = []
        for d in range(draws_here):
            pick = np.sort(draw_order(aux.n_studies, seed, d)[:used])
            sub, sub_nr = aux.select(pick), no_release_aux.select(pick)
            side: dict[str, dict[str, Any]] = {"with": {}, "without": {}}
            for a in (BASELINE, *attacks):
                embed, _ = fit_attack(a, sub, dim, seed=draw_seed(seed, d), head=head, ridge=ridge)
                side["with"][a] = _score(relink, target, embed(target), k, nn)
            for a in no_release:
                if a == "pool_centring":
                    emb = pool_centring_embed(sub_nr, no_release_target)
                else:
                    embed, _ = fit_attack(a, sub_nr, dim, seed=draw_seed(seed, d), head=head, ridge=ridge)
                    emb = embed(no_release_target)
                side["without"][a] = _score(relink, no_release_target, emb, k, nn)
            bw = max(side["with"], key=lambda a: side["with"][a]["value"])
            bo = max(side["without"], key=lambda a: side["without"][a]["value"])
            hw, ho = side["with"][bw], side["without"][bo]
            half_p = (math.hypot((hw["ci"][1] - hw["ci"][0]) / 2, (ho["ci"][1] - ho["ci"][0]) / 2)
                      if hw.get("ci") and ho.get("ci") else None)
            draws.append({"draw": d, "seed": draw_seed(seed, d), "best_with": bw, "best_without": bo,
                          "with": hw["value"], "without": ho["value"], "difference": hw["value"] - ho["value"],
                          "half_patients": half_p, "attacks": {s: {a: v["value"] for a, v in side[s].items()}
                                                               for s in side}})
        v = np.array([x["difference"] for x in draws])
        mean, sd = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
        half_d = _t975(v.size - 1) * sd / math.sqrt(v.size) if v.size > 1 else 0.0
        hp = [x["half_patients"] for x in draws if x["half_patients"] is not None]
        half = math.hypot(half_d, float(np.mean(hp))) if hp else None
        out["release_attributable"] = {
            "value": mean, "ci": None if half is None else [mean - half, mean + half],
            "ci_draws": [mean - half_d, mean + half_d] if v.size > 1 else None, "n_draws": int(v.size),
            "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max()),
            "with_mean": float(np.mean([x["with"] for x in draws])),
            "without_mean": float(np.mean([x["without"] for x in draws])), "draws": draws,
            "no_release_attackers": list(no_release), "release_attackers": [BASELINE, *attacks],
            "note": ("per draw: the best attack with the release minus the best without it on the same aux pairs, "
                     "each best selected on the audited split; ci: the t interval over draws and the two selected "
                     "attacks' patient half-widths in quadrature (approximate: ignores their correlation)")}
    if members is not None and nonmembers is not None:
        check_disjoint(members, nonmembers, "non-members")
        check_disjoint(members, aux, "aux")
        check_disjoint(nonmembers, aux, "aux")
        pick = np.sort(draw_order(aux.n_studies, seed, 0)[:min(int(n_aux), aux.n_studies)])
        sub = aux.select(pick)
        embeds = {a: fit_attack(a, sub, dim, seed=seed, head=head, ridge=ridge)[0] for a in (BASELINE, *attacks)}
        out["memorisation"] = memorisation(members, nonmembers, embeds, pool=pool, n_boot=n_boot, seed=seed)
    return out


def _score(relink: Callable[[EmbeddingSet], dict], feats: PairedFeatures, emb: tuple[torch.Tensor, torch.Tensor],
           k: int, n: str) -> dict[str, Any]:
    try:
        r = _r_at(relink(feats.embedding_set(emb[0].float(), emb[1].float())), k, n)
    except DegenerateEmbeddingsError:  # a collapsed attack links nothing
        return {"value": 0.0, "ci": None, "failed": True}
    return {"value": r["value"], "ci": r.get("ci")}
