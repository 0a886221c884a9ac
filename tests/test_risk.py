"""The risk audit's three numbers (audit/risk.py): release-attributable is ~0 for a release that carries
nothing beyond the release-free features and clearly > 0 for one that does; the members-vs-non-members
difference detects planted duplicate pairs and is at chance on an independent split; the two-sample
patient bootstrap and the per-query hits against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_relink.audit.adaptive import PairedFeatures
from cxr_relink.audit.relinkage import relinkage_audit
from cxr_relink.audit.risk import memorisation, per_query_hits, pool_centring_embed, risk_audit

pytestmark = pytest.mark.usefixtures("one_thread")
HEAD = {"steps": 150, "eval_every": 25, "restarts": 1}


def _relink(es):
    return relinkage_audit(es, ks=[1], ns=[100, "full"], directions=["i2t"], n_boot=200, seed=0)


def _cohort(n_patients, seed, first_patient=0, noise=0.3, released=None, di=24, dt=20, dz=8):
    """Two studies per patient, one view each. Trunk features linear in a per-study latent plus ``noise``;
    released = fixed random projections of the trunk (they hide the pairing), or ``released`` (img, txt)."""
    rng, fixed = np.random.default_rng(seed), np.random.default_rng(100)
    a, b = fixed.normal(size=(dz, di)), fixed.normal(size=(dz, dt))
    hi, ht = fixed.normal(size=(di, 6)), fixed.normal(size=(dt, 6))
    n = 2 * n_patients
    z = rng.normal(size=(n, dz))
    img = z @ a + noise * rng.normal(size=(n, di)) * np.sqrt(dz)
    txt = z @ b + noise * rng.normal(size=(n, dt)) * np.sqrt(dz)
    ri, rt = released if released is not None else (img @ hi, txt @ ht)
    return PairedFeatures(torch.tensor(img), torch.tensor(txt), torch.tensor(ri), torch.tensor(rt),
                          torch.arange(n), np.repeat(np.arange(n_patients), 2) + first_patient)


@pytest.mark.slow
def test_release_attributable_is_zero_when_the_release_adds_nothing():
    """The released model's trunk features *are* the release-free features (and its released embeddings
    hide them): whatever an attacker does with the release, it can do without it."""
    target, aux = _cohort(60, 0), _cohort(150, 1, first_patient=10_000)
    res = risk_audit(target, aux, _relink, no_release_target=target, no_release_aux=aux, n_aux=60, n_draws=5,
                     head=HEAD, seed=0)
    ra = res["release_attributable"]
    assert ra["n_draws"] == 5 and len({d["seed"] for d in ra["draws"]}) == 5
    assert ra["without_mean"] > 0.3  # the no-release attack works: the aux pairs alone link these studies
    assert abs(ra["value"]) < 0.05 and ra["ci"][0] <= 0.0 <= ra["ci"][1], ra
    assert res["capability"]["value"] < 0.1  # the released space hides the pairing


def test_release_attributable_positive_when_the_release_carries_the_link():
    """Release-free features are the same studies seen through heavy noise; the released trunk is clean."""
    target, aux = _cohort(60, 0), _cohort(150, 1, first_patient=10_000)
    blur_t, blur_a = _cohort(60, 0, noise=3.0), _cohort(150, 1, first_patient=10_000, noise=3.0)
    res = risk_audit(target, aux, _relink, no_release_target=blur_t, no_release_aux=blur_a, n_aux=60, n_draws=5,
                     head=HEAD, attacks=("ridge",))
    ra = res["release_attributable"]
    assert ra["ci"][0] > 0.2 and ra["min"] > 0, ra


def test_pool_centring_equals_the_aux_bridge_score():
    """cos(description_i, description_t) is sum_j cos(x_i, x_j) cos(y_t, y_j) over the aux pairs, up to norms,
    with every feature centred on the audited pool."""
    target, aux = _cohort(10, 0), _cohort(12, 1, first_patient=100)
    qi, qt = pool_centring_embed(aux, target)
    x, y = target.image_trunk.double().numpy(), target.text_trunk.double().numpy()
    xa, ya = aux.image_trunk.double().numpy() - x.mean(0), aux.text_trunk.double().numpy() - y.mean(0)
    xc, yc = x - x.mean(0), y - y.mean(0)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    ref = (unit(xc) @ unit(xa).T) @ (unit(ya) @ unit(yc).T)
    np.testing.assert_allclose((qi @ qt.T).numpy(), ref, rtol=1e-9, atol=1e-9)


def test_per_query_hits_and_two_sample_bootstrap():
    rng = np.random.default_rng(0)
    img, rep = torch.tensor(rng.normal(size=(30, 5))), torch.tensor(rng.normal(size=(12, 5)))
    study = torch.tensor(rng.integers(0, 12, size=30))
    s = img.numpy() @ (rep.numpy() / np.linalg.norm(rep.numpy(), axis=1, keepdims=True)).T
    ref = (np.argsort(-s, axis=1)[:, 0] == study.numpy()).astype(float)
    np.testing.assert_array_equal(per_query_hits(img, rep, study).numpy(), ref)
    # Members identical to non-members: the difference is exactly 0, and so is its bootstrap.
    g = _cohort(40, 3)
    m = memorisation(g, _cohort(40, 3, first_patient=1000), {"cosine": lambda t: (t.image_released, t.text_released)},
                     n_boot=200)
    row = m["attacks"]["cosine"]
    assert row["difference"] == 0 and row["members"]["r1"] == row["nonmembers"]["r1"]
    assert m["pool"] == 80 and m["chance"] == pytest.approx(1 / 80)


def _memorising(n_patients, seed, first_patient, planted):
    """A released model whose cosine links a study weakly (noisy shared latent), or, for ``planted`` studies,
    almost exactly (a duplicate pair it saw in training: its image embedding ~ its report's)."""
    rng = np.random.default_rng(seed)
    n = 2 * n_patients
    z = rng.normal(size=(n, 6))
    ri, rt = z + 2.0 * rng.normal(size=(n, 6)), z + 2.0 * rng.normal(size=(n, 6))
    if planted:
        ri = rt + 0.05 * rng.normal(size=(n, 6))
    return _cohort(n_patients, seed, first_patient, released=(ri, rt))


def test_memorisation_detects_planted_duplicates_and_is_at_chance_on_an_independent_split():
    aux = _cohort(60, 1, first_patient=10_000)
    target = _cohort(60, 2, first_patient=20_000)
    planted = risk_audit(target, aux, _relink, members=_memorising(50, 3, 0, planted=True),
                         nonmembers=_memorising(50, 4, 5_000, planted=False), attacks=(), n_aux=60, n_boot=300)
    mem = planted["memorisation"]
    assert mem["best"]["attack"] == "cosine" and mem["best"]["difference_ci"][0] > 0.3, mem["best"]
    diffs, covered = [], 0
    for s in range(8):  # both groups drawn from one distribution: no difference in expectation
        m = risk_audit(target, aux, _relink, members=_memorising(50, 30 + s, 0, planted=False),
                       nonmembers=_memorising(50, 60 + s, 5_000, planted=False), attacks=(), n_aux=60,
                       n_boot=300, seed=s)["memorisation"]["attacks"]["cosine"]
        diffs.append(m["difference"])
        covered += m["difference_ci"][0] <= 0 <= m["difference_ci"][1]
    assert abs(np.mean(diffs)) < 0.03 and covered >= 7, (diffs, covered)


# ----------------------------------------------------------------------------- the pair-level membership test
def test_auc_and_tpr_at_fpr_match_sklearn():
    """AUC = sklearn's roc_auc_score; TPR at FPR a = the largest TPR of sklearn's roc_curve with fpr <= a; ties
    and bootstrap-style integer weights (sklearn's sample_weight) included."""
    skm = pytest.importorskip("sklearn.metrics")
    from cxr_relink.audit.membership import auc_and_tpr

    rng = np.random.default_rng(0)
    for trial in range(5):
        pos = np.round(rng.normal(0.4, 1, 300), 1)  # rounded: many ties, within and across groups
        neg = np.round(rng.normal(0.0, 1, 1200), 1)
        wp = rng.integers(0, 3, pos.size).astype(float) if trial % 2 else None
        wn = rng.integers(0, 3, neg.size).astype(float) if trial % 2 else None
        y, s = np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg]
        w = None if wp is None else np.r_[wp, wn]
        fprs = (0.01, 0.001, 0.1)
        auc, tprs = auc_and_tpr(pos, neg, fprs, wp, wn)
        assert auc == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w), abs=1e-12)
        f, t, _ = skm.roc_curve(y, s, sample_weight=w, drop_intermediate=False)
        for a, got in zip(fprs, tprs):
            assert got == pytest.approx(t[f <= a + 1e-12].max(), abs=1e-12)


def _pairs(n_patients, seed, first_patient, planted, labels=None):
    """Released embeddings whose true-pair cosine is moderate (a shared latent under noise), or, for
    ``planted`` studies, near 1 (a duplicate pair the model saw in training)."""
    g = _memorising(n_patients, seed, first_patient, planted)
    if labels is not None:
        g.study_labels = labels
    return g


def test_pair_membership_detects_planted_pairs_and_is_at_chance_on_an_independent_split():
    from cxr_relink.audit.membership import pair_membership_test, true_pair_cosines

    def cos(g):
        return true_pair_cosines(g.image_released, g.text_released, g.item_study).numpy()

    m, n = _pairs(60, 3, 0, True), _pairs(60, 4, 5_000, False)
    # The reference model never trained on any of these pairs: it sees the members as the audited model would
    # without the planting (the same studies, unplanted).
    ref_m = cos(_pairs(60, 3, 0, False))
    res = pair_membership_test(cos(m), cos(n), m.study_patient, n.study_patient, ref_m, cos(n) * 0.9, n_boot=300)
    assert res["calibrated"] and res["auc_lower95_one_sided"] > 0.9, res
    assert res["tpr_at_fpr"][0]["tpr"] is not None and res["tpr_at_fpr"][1]["tpr"] is None  # 120 non-members: 1% ok, 0.1% not
    aucs, covered = [], 0
    for s in range(10):  # members and non-members from one distribution, no planting
        a, b = _pairs(60, 100 + s, 0, False), _pairs(60, 200 + s, 5_000, False)
        r = pair_membership_test(cos(a), cos(b), a.study_patient, b.study_patient, n_boot=300, seed=s)
        aucs.append(r["auc"])
        covered += r["auc_ci"][0] <= 0.5 <= r["auc_ci"][1]
    assert abs(np.mean(aucs) - 0.5) < 0.05 and covered >= 8, (aucs, covered)


def test_label_matched_pools_have_identical_label_patterns():
    from collections import Counter

    from cxr_relink.audit.membership import label_matched_pools

    rng = np.random.default_rng(0)
    la = rng.choice([0.0, 1.0, np.nan, -1.0], size=(200, 14), p=[0.5, 0.1, 0.35, 0.05])
    la[:, 2:] = np.nan  # few patterns, so that many studies match
    lb = la[rng.permutation(200)][:150].copy()
    lb[:40, 0] = 1.0  # a different mix
    ia, ib, info = label_matched_pools(la, lb, None, np.random.default_rng(1))
    key = lambda l: tuple((l == 1).astype(int))  # noqa: E731  (positive_only)
    ca, cb = Counter(key(x) for x in la[ia]), Counter(key(x) for x in lb[ib])
    assert ca == cb and ia.size == ib.size == info["matchable"]
    # The largest matchable pool: per pattern, the smaller group's count (brute force).
    full_a, full_b = Counter(key(x) for x in la), Counter(key(x) for x in lb)
    assert info["matchable"] == sum(min(full_a[p], full_b[p]) for p in full_a)
    with pytest.raises(ValueError, match="can be matched"):
        label_matched_pools(la, lb, info["matchable"] + 1, np.random.default_rng(1))


def test_label_matching_removes_a_label_confound():
    """No memorisation, but the members hold more of a distinctive finding that makes a study easy to link: an
    unmatched comparison reads the label shift as memorisation; the label-matched one does not."""
    def group(n_patients, seed, first, frac_rare):
        rng = np.random.default_rng(seed)
        n = 2 * n_patients
        rare = rng.random(n) < frac_rare
        z = rng.normal(size=(n, 6))
        noise = np.where(rare[:, None], 0.05, 2.0)  # the finding makes a study distinctive
        ri, rt = z + noise * rng.normal(size=(n, 6)), z + noise * rng.normal(size=(n, 6))
        lab = np.zeros((n, 14))
        lab[:, 5] = rare
        g = _cohort(n_patients, seed, first, released=(ri, rt))
        g.study_labels = lab
        return g

    target, aux = _cohort(60, 1, 10_000), _cohort(60, 2, 20_000)
    kw = dict(attacks=(), n_aux=60, n_boot=300)
    mem, non = group(100, 5, 0, 0.5), group(100, 6, 5_000, 0.15)
    plain = risk_audit(target, aux, _relink, members=mem, nonmembers=non, label_match=False, **kw)["memorisation"]
    matched = risk_audit(target, aux, _relink, members=mem, nonmembers=non, **kw)["memorisation"]
    assert plain["best"]["difference_lower95_one_sided"] > 0.1, plain["best"]
    assert matched["label_matched"] and matched["n_patterns"] == 2
    row = matched["attacks"]["cosine"]
    assert row["difference_ci"][0] <= 0 <= row["difference_ci"][1] and row["difference_lower95_one_sided"] <= 0, row
    assert matched["pair_membership"]["auc_ci"][0] <= 0.5 <= matched["pair_membership"]["auc_ci"][1]


def test_no_release_sources_and_their_checks():
    """A named source (the raw-feature path of evaluate.py) gives the same number as the legacy arguments; a
    source over other studies, or in another order, is refused."""
    target, aux = _cohort(40, 0), _cohort(80, 1, first_patient=10_000)
    kw = dict(n_aux=30, n_draws=2, attacks=("ridge",), no_release=("pool_centring", "ridge"), seed=0)
    a = risk_audit(target, aux, _relink, no_release_target=target, no_release_aux=aux, **kw)["release_attributable"]
    b = risk_audit(target, aux, _relink, no_release_sources={"raw": (target, aux)}, **kw)["release_attributable"]
    assert a["value"] == b["value"] and b["no_release_sources"] == {"raw": ["pool_centring", "ridge"]}
    assert set(b["no_release_attackers"]) == {"raw:pool_centring", "raw:ridge"}
    with pytest.raises(ValueError, match="same studies"):
        risk_audit(target, aux, _relink, no_release_sources={"raw": (target, aux.select(np.arange(10)))}, **kw)
    with pytest.raises(ValueError, match="order"):
        risk_audit(target, aux, _relink, no_release_sources={"raw": (target.select(np.arange(80)[::-1].copy()), aux)}, **kw)
