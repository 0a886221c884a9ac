"""Three numbers per released model (docs/audit.md, "Capability, release-attributable, memorisation"):

* **capability**: re-linkage of unseen patients by the released embeddings (the standard audit's image ->
  report Recall@1 at N, with its patient-bootstrap CI): what any model good at the task does;
* **release-attributable**: per auxiliary draw, the best attack *with* the release (the baseline cosine and
  audit.adaptive's attacks on the released model's features) minus the best attack *without* it on the
  same auxiliary pairs, over ``n_draws`` seeded draws: what releasing adds. The no-release attackers run on
  release-free features the caller supplies, by source (evaluate.py: ``raw`` pooled pixels + hashed report
  bag-of-words; ``public`` a trunk trained on public data only): ``pool_centring`` (features centred on the
  audited pool, linked through the k aux pairs: image i and report t are scored by
  sum_j cos(x_i, x_j) cos(y_t, y_j) over the aux pairs j), ``ridge`` and ``head`` (audit.adaptive's ridge and
  fresh linear heads trained from scratch on the aux pairs, same budget as the with-release head), and for a
  source with its own released space ``cosine`` and ``procrustes``;
* **memorisation**: the same attacks scored on the model's training patients (members) vs
  distribution-matched held-out patients (non-members): equal, label-matched pools drawn within each group,
  the difference of image -> report R@1 (each query against its own group's pool) with a two-sample patient
  bootstrap CI and a one-sided lower bound; and the pair-level membership test (audit.membership): the cosine
  of each true pair, calibrated by reference models trained without it, AUC and TPR at 1% / 0.1% FPR. What DP
  bounds.

Every best is a maximum over attacks selected on the audited split (optimistic for the attacker on both
sides of the difference). No Lightning: arrays in, a JSON-able dict out.

API (callers outside evaluate.py, e.g. a privacy-utility frontier, call these on arrays):
  risk_audit(target, aux, relink, *, members=None, nonmembers=None, no_release_sources=None,
             member_references=(), nonmember_references=(), n_aux=100, n_draws=5, attacks=("ridge",
             "procrustes", "head"), no_release=NO_RELEASE, k=1, n=100, seed=0, head=None, ridge=None, pool=None,
             n_boot=1000, label_match=True, label_mapping="positive_only", fprs=(0.01, 0.001)) -> dict
    target, aux, members, nonmembers, references: audit.adaptive.PairedFeatures (torch / numpy arrays);
    relink: EmbeddingSet -> re-linkage dict, e.g. audit.relinkage.Relinkage(ks=[1], ns=[100, "full"],
    directions=["i2t"], hardneg=False).audit. Returns {"capability", "release_attributable"?, "memorisation"?}.
  memorisation(members, nonmembers, embeds, pool=None, n_boot=1000, seed=0, label_match=True) -> dict
  audit.membership.pair_membership_test(member_score, nonmember_score, member_patient, nonmember_patient,
             member_reference=None, nonmember_reference=None, fprs=(0.01, 0.001), n_boot=1000, seed=0) -> dict
  capability_only(relinkage, k=1, n=100, not_computed=None) -> dict   (an embeddings file: no trunk)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxr_relink.audit.adaptive import BASELINE, PairedFeatures, _t975, check_disjoint, draw_order, draw_seed, fit_attack
from cxr_relink.audit.embeddings import EmbeddingSet
from cxr_relink.audit.membership import equal_pools, pair_membership_test, true_pair_cosines
from cxr_relink.audit.relinkage import DegenerateEmbeddingsError
from cxr_relink.audit.stats import bootstrap_patient_means, percentile_ci

WITH_RELEASE = (BASELINE, "ridge", "procrustes", "head")
NO_RELEASE = ("pool_centring", "ridge", "head")
# What a no-release source may be attacked with: cosine / procrustes only make sense for a source with its own
# released space (a public-only model).
NO_RELEASE_ATTACKS = ("pool_centring", "ridge", "head", "cosine", "procrustes")


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


def capability_only(relinkage: dict[str, Any], k: int = 1, n: int | str = 100,
                    not_computed: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``risk`` section when only embeddings are at hand (no trunk, no training split): capability from an
    existing re-linkage result (its image -> report R@k at N = n, else full), and ``not_computed`` {number: why}
    for the other two."""
    nn = _pick_n(relinkage, k, n)
    cap = _r_at(relinkage, k, nn)
    if cap is None:
        raise ValueError(f"capability needs image -> report R@{k} in the re-linkage result")
    return {"k": int(k), "n": nn, "capability": {"value": cap["value"], "ci": cap.get("ci"), "chance": cap["chance"],
                                                 "x_chance": cap["x_chance"], "n_value": cap["n_value"]},
            "not_computed": dict(not_computed or {})}


def per_query_hits(image: torch.Tensor, report: torch.Tensor, item_study: torch.Tensor) -> torch.Tensor:
    """Per image item: 1 if its own study's report has the highest cosine among the given reports (ties
    pessimistic), else 0: Recall@1 against a pool of exactly these reports."""
    s = F.normalize(image.double(), dim=1) @ F.normalize(report.double(), dim=1).T
    own = s.gather(1, item_study.view(-1, 1))
    return ((s >= own).sum(1) == 1).double()


def pool_indices(members: PairedFeatures, nonmembers: PairedFeatures, pool: int | None = None, seed: int = 0,
                 label_match: bool = True, label_mapping: str = "positive_only") -> tuple[np.ndarray, np.ndarray, dict]:
    """Study indices of equal pools drawn within each group (seeded): label-matched (``audit.membership.equal_pools``:
    the same number of studies of every label pattern in both) when both groups have labels and ``label_match``;
    ``pool`` None: as many as can be matched."""
    n_min = min(members.n_studies, nonmembers.n_studies)
    if pool is not None and (int(pool) < 2 or int(pool) > n_min):
        raise ValueError(f"memorisation: pool {pool} must be in 2..{n_min} (both groups hold that many studies)")
    im, inn, info = equal_pools(members.study_labels, nonmembers.study_labels, members.n_studies,
                                nonmembers.n_studies, pool, np.random.default_rng(seed), label_match, label_mapping)
    if im.size < 2:
        raise ValueError(f"memorisation: only {im.size} studies per group could be matched on labels; give more "
                         "studies or set label_match=false")
    info.update(pool=int(im.size), members_available=members.n_studies, nonmembers_available=nonmembers.n_studies)
    return im, inn, info


def memorisation_pools(members: PairedFeatures, nonmembers: PairedFeatures, pool: int | None = None, seed: int = 0,
                       label_match: bool = True, label_mapping: str = "positive_only"
                       ) -> tuple[PairedFeatures, PairedFeatures, dict[str, Any]]:
    """The pools of ``pool_indices`` as features."""
    im, inn, info = pool_indices(members, nonmembers, pool, seed, label_match, label_mapping)
    return members.select(im), nonmembers.select(inn), info


def memorisation(members: PairedFeatures, nonmembers: PairedFeatures,
                 embeds: dict[str, Callable[[PairedFeatures], tuple[torch.Tensor, torch.Tensor]]],
                 pool: int | None = None, n_boot: int = 1000, seed: int = 0, label_match: bool = True,
                 label_mapping: str = "positive_only",
                 pools: tuple[PairedFeatures, PairedFeatures, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Members vs non-members, equal pools (``memorisation_pools``, or ``pools`` already drawn), each image
    item ranked against its own group's pool. Per attack: R@1 of each group with patient-bootstrap CIs and the
    difference members - non-members with a two-sample patient bootstrap (patients resampled within each group
    independently): a two-sided 95% CI and a one-sided 95% lower bound, since the question is "are members
    more linkable?" (a lower bound above 0 says yes)."""
    gm, gn, info = pools if pools is not None else memorisation_pools(members, nonmembers, pool, seed, label_match,
                                                                      label_mapping)
    groups = {"members": gm, "nonmembers": gn}
    m = gm.n_studies
    out: dict[str, Any] = {**info, "n_boot": int(n_boot), "attacks": {}}
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
        row["difference_lower95_one_sided"] = float(torch.quantile(diff, 0.05))
        out["attacks"][a] = row
    best = max(out["attacks"], key=lambda a: out["attacks"][a]["difference"])
    out["best"] = {"attack": best, **out["attacks"][best], "selected_on_audited_split": True}
    out["chance"] = 1.0 / m
    return out


def _no_release_sources(no_release_target, no_release_aux, sources, target, aux, no_release):
    """{name: (target features, aux features, attacks)} of the release-free feature sources, checked."""
    out = {}
    if no_release_target is not None or no_release_aux is not None:
        if no_release_target is None or no_release_aux is None:
            raise ValueError("release-attributable needs release-free features of both the audited and the aux studies")
        out["release_free"] = (no_release_target, no_release_aux, tuple(no_release))
    for name, v in (sources or {}).items():
        out[name] = (v[0], v[1], tuple(v[2]) if len(v) > 2 else tuple(no_release))
    for name, (t, a, atk) in out.items():
        if t.n_studies != target.n_studies or a.n_studies != aux.n_studies:
            raise ValueError(f"release-free source {name!r} must describe the same studies as the released features "
                             f"({t.n_studies} / {a.n_studies} studies vs {target.n_studies} / {aux.n_studies})")
        if not np.array_equal(t.study_patient, target.study_patient) or not np.array_equal(a.study_patient,
                                                                                            aux.study_patient):
            raise ValueError(f"release-free source {name!r}: its studies are not in the released features' order")
        bad = [x for x in atk if x not in NO_RELEASE_ATTACKS]
        if bad:
            raise ValueError(f"unknown no-release attacks {bad} for source {name!r}; expected {NO_RELEASE_ATTACKS}")
    return out


def risk_audit(target: PairedFeatures, aux: PairedFeatures, relink: Callable[[EmbeddingSet], dict],
               no_release_target: PairedFeatures | None = None, no_release_aux: PairedFeatures | None = None,
               members: PairedFeatures | None = None, nonmembers: PairedFeatures | None = None,
               n_aux: int = 100, n_draws: int = 5, attacks: Sequence[str] = ("ridge", "procrustes", "head"),
               no_release: Sequence[str] = NO_RELEASE, k: int = 1, n: int | str = 100, seed: int = 0,
               head: dict[str, Any] | None = None, ridge: dict[str, Any] | None = None, pool: int | None = None,
               n_boot: int = 1000, no_release_sources: dict[str, tuple] | None = None,
               member_references: Sequence[PairedFeatures] = (), nonmember_references: Sequence[PairedFeatures] = (),
               label_match: bool = True, label_mapping: str = "positive_only",
               fprs: Sequence[float] = (0.01, 0.001)) -> dict[str, Any]:
    """The ``risk`` section of audit.json (array-in, dict-out; no Lightning, no project imports).

    target / aux: the audited (held-out) split and the attacker's auxiliary studies seen through the released
    model (``audit.adaptive.PairedFeatures``). relink: an EmbeddingSet -> re-linkage dict (e.g.
    ``audit.relinkage.Relinkage(...).audit``). Image -> report Recall@``k`` at N = ``n`` (else the full pool).

    * capability: always;
    * release_attributable: when release-free features are given, as ``no_release_target`` / ``no_release_aux``
      (source "release_free", attacks ``no_release``) and/or ``no_release_sources`` {name: (target features,
      aux features[, attacks])} (e.g. "raw": downsampled pixels + report bag-of-words; "public": a trunk trained
      on public data only): the same studies in the same order as ``target`` / ``aux``. Per auxiliary draw
      (``n_draws``, audit.adaptive's seeds): best with-release attack minus best no-release attack on the same
      aux pairs. No-release attacks (``NO_RELEASE_ATTACKS``): pool_centring, ridge, head (fresh linear heads
      trained from scratch on the aux pairs' release-free features: audit.adaptive's head attack, same
      architecture, step budget, restarts and stopping as the with-release head), and, for a source with its
      own released space (a public-only model), cosine and procrustes;
    * memorisation: when ``members`` (training patients) and ``nonmembers`` (held-out patients) are given:
      equal label-matched pools, the with-release attacks (fitted on aux draw 0) per group and their R@1
      difference (two-sample patient bootstrap), plus ``pair_membership`` (audit.membership.pair_membership_test
      on the released cosine of each true pair, calibrated by ``member_references`` / ``nonmember_references``:
      the same studies seen through reference models trained without them, when given).
    """
    check_disjoint(target, aux, "aux")
    dim = target.image_released.shape[1]
    base = relink(target.embedding_set(target.image_released, target.text_released))
    nn = _pick_n(base, k, n)
    cap = _r_at(base, k, nn)
    out: dict[str, Any] = {
        "k": int(k), "n": nn, "n_aux": int(min(n_aux, aux.n_studies)), "seed": int(seed),
        "capability": {"value": cap["value"], "ci": cap.get("ci"), "chance": cap["chance"],
                       "x_chance": cap["x_chance"], "n_value": cap["n_value"], "n_studies": target.n_studies}}
    sources = _no_release_sources(no_release_target, no_release_aux, no_release_sources, target, aux, no_release)
    if sources:
        used = min(int(n_aux), aux.n_studies)
        draws_here = 1 if used >= aux.n_studies else int(n_draws)
        draws = []
        for d in range(draws_here):
            pick = np.sort(draw_order(aux.n_studies, seed, d)[:used])
            sub = aux.select(pick)
            side: dict[str, dict[str, Any]] = {"with": {}, "without": {}}
            for a in (BASELINE, *attacks):
                embed, _ = fit_attack(a, sub, dim, seed=draw_seed(seed, d), head=head, ridge=ridge)
                side["with"][a] = _score(relink, target, embed(target), k, nn)
            for src, (nr_target, nr_aux, atk) in sources.items():
                sub_nr = nr_aux.select(pick)
                for a in atk:
                    if a == "pool_centring":
                        emb = pool_centring_embed(sub_nr, nr_target)
                    else:
                        embed, _ = fit_attack(a, sub_nr, dim, seed=draw_seed(seed, d), head=head, ridge=ridge)
                        emb = embed(nr_target)
                    side["without"][f"{src}:{a}" if src != "release_free" else a] = _score(relink, nr_target, emb, k, nn)
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
        clip = lambda lo, hi: [max(-1.0, lo), min(1.0, hi)]  # noqa: E731  (a difference of two rates)
        out["release_attributable"] = {
            "value": mean, "ci": None if half is None else clip(mean - half, mean + half),
            "ci_draws": clip(mean - half_d, mean + half_d) if v.size > 1 else None, "n_draws": int(v.size),
            "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max()),
            "with_mean": float(np.mean([x["with"] for x in draws])),
            "without_mean": float(np.mean([x["without"] for x in draws])), "draws": draws,
            "no_release_sources": {s: list(a) for s, (_, _, a) in sources.items()},
            # Every draw of the whole pool is the same pairs: one draw, and no spread over draws, said so.
            "one_draw_why": (f"n_aux {int(n_aux)} covers the whole aux pool ({aux.n_studies} studies): every draw "
                             "would be the same pairs" if draws_here < int(n_draws) else None),
            "no_release_attackers": sorted({a for x in draws for a in x["attacks"]["without"]}),
            "release_attackers": [BASELINE, *attacks],
            "note": ("per draw: the best attack with the release minus the best without it on the same aux pairs, "
                     "each best selected on the audited split; ci: the t interval over draws and the two selected "
                     "attacks' patient half-widths in quadrature (approximate: ignores their correlation)")}
    if members is not None and nonmembers is not None:
        check_disjoint(members, nonmembers, "non-members")
        check_disjoint(members, aux, "aux")
        check_disjoint(nonmembers, aux, "aux")
        for what, refs, g in (("member", member_references, members), ("non-member", nonmember_references, nonmembers)):
            for r in refs:
                if r.n_studies != g.n_studies or not np.array_equal(r.study_patient, g.study_patient):
                    raise ValueError(f"a {what} reference model's features must describe the same studies in the same "
                                     "order as the audited model's")
        if len(member_references) != len(nonmember_references):
            raise ValueError("give the same reference models for members and non-members")
        pick = np.sort(draw_order(aux.n_studies, seed, 0)[:min(int(n_aux), aux.n_studies)])
        sub = aux.select(pick)
        embeds = {a: fit_attack(a, sub, dim, seed=seed, head=head, ridge=ridge)[0] for a in (BASELINE, *attacks)}
        # One draw of indices serves the pools, the references and the pair test: the same studies throughout.
        im, inn, info = pool_indices(members, nonmembers, pool, seed, label_match, label_mapping)
        gm, gn = members.select(im), nonmembers.select(inn)
        out["memorisation"] = memorisation(gm, gn, embeds, n_boot=n_boot, seed=seed, pools=(gm, gn, info))

        def cos(g: PairedFeatures) -> np.ndarray:
            return true_pair_cosines(g.image_released, g.text_released, g.item_study).numpy()

        ref_m = np.stack([cos(r.select(im)) for r in member_references], 1) if member_references else None
        ref_n = np.stack([cos(r.select(inn)) for r in nonmember_references], 1) if nonmember_references else None
        pm = pair_membership_test(cos(gm), cos(gn), gm.study_patient, gn.study_patient, ref_m, ref_n, fprs=fprs,
                                  n_boot=n_boot, seed=seed)
        pm.update(n_references=len(member_references), label_matched=info["label_matched"])
        out["memorisation"]["pair_membership"] = pm
    return out


def _score(relink: Callable[[EmbeddingSet], dict], feats: PairedFeatures, emb: tuple[torch.Tensor, torch.Tensor],
           k: int, n: str) -> dict[str, Any]:
    try:
        r = _r_at(relink(feats.embedding_set(emb[0].float(), emb[1].float())), k, n)
    except DegenerateEmbeddingsError:  # a collapsed attack links nothing
        return {"value": 0.0, "ci": None, "failed": True}
    return {"value": r["value"], "ci": r.get("ci")}
