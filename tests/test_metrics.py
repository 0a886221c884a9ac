"""Re-linkage metrics against independent references: brute-force argsort ranking, explicit
random pools, scipy.stats.hypergeom. Embeddings are small integers so every dot product is
exact in float32 whatever the kernel, which makes ties deliberate and reproducible."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import hypergeom

from cxr_relink.audit import counting
from cxr_relink.audit.counting import hardneg_counts, rank_counts
from cxr_relink.audit.embeddings import EmbeddingSet
from cxr_relink.audit.labels import label_groups
from cxr_relink.audit.recall import hypergeom_cdf
from cxr_relink.audit.reference import hardneg_pools, monte_carlo_recall
from cxr_relink.audit.relinkage import relinkage_audit


def _cohort(seed=0, n_studies=60, extra_views=30, dim=6, n_patients=25, levels=3):
    """Integer-valued embeddings (many exact ties), multi-view studies, a few patients."""
    rng = np.random.default_rng(seed)
    item_study = np.concatenate([np.arange(n_studies), rng.integers(0, n_studies, extra_views)])
    study_patient = rng.integers(0, n_patients, n_studies)
    rep = rng.integers(-levels, levels + 1, (n_studies, dim)).astype(np.float32)
    img = rep[item_study] + rng.integers(-levels, levels + 1, (item_study.size, dim)).astype(np.float32)
    labels = rng.choice([0.0, 1.0, -1.0, np.nan], size=(n_studies, 14), p=[0.3, 0.2, 0.1, 0.4]).astype(np.float32)
    labels[:, 2:] = 0.0  # few distinct label vectors -> sizeable groups
    return img, rep, item_study, study_patient, labels


def _brute_rank(scores_row: np.ndarray, target: int, allowed: np.ndarray, pessimistic: bool) -> int:
    """1-based rank of the target among the allowed columns by a full argsort."""
    cols = np.flatnonzero(allowed)
    s = scores_row[cols]
    is_t = cols == target
    # lexsort: last key primary. Descending score; among ties the target goes last
    # (pessimistic) or first (optimistic).
    tie_key = is_t.astype(int) if pessimistic else (~is_t).astype(int)
    order = np.lexsort((tie_key, -s))
    return int(np.flatnonzero(is_t[order])[0]) + 1


@pytest.mark.parametrize("pessimistic", [True, False])
def test_full_database_equals_bruteforce_argsort(pessimistic):
    img, rep, st, sp, _ = _cohort()
    scores = img.astype(np.int64) @ rep.astype(np.int64).T  # exact
    ks = [1, 5, 10]
    ranks = np.array([_brute_rank(scores[i], st[i], np.ones(rep.shape[0], bool), pessimistic) for i in range(len(st))])
    es = EmbeddingSet(torch.tensor(img), torch.tensor(rep), torch.tensor(st), torch.tensor(sp))
    ties = "pessimistic" if pessimistic else "optimistic"
    res = relinkage_audit(es, ks=ks, ns=["full"], directions=["i2t"], ties=ties, n_boot=0, normalize=False, chunk_size=7)
    sec = res["i2t"]
    got = {r["k"]: r["value"] for r in sec["recall"]}
    for k in ks:
        assert got[k] == pytest.approx(np.mean(ranks <= k), abs=1e-12)
    assert sec["rank"]["mrr"] == pytest.approx(np.mean(1 / ranks), abs=1e-12)
    assert sec["rank"]["mean_rank"] == pytest.approx(ranks.mean())
    assert sec["rank"]["median_rank"] == pytest.approx(np.median(ranks))
    # ties are reported, and this cohort has them
    n_ties = sum(int((scores[i] == scores[i, st[i]]).sum()) - 1 for i in range(len(st)))
    assert sec["ties"]["total_ties"] == n_ties > 0


def test_rank_counts_exclude_target_by_index():
    img, rep, st, _, _ = _cohort(seed=1)
    scores = img.astype(np.int64) @ rep.astype(np.int64).T
    r = rank_counts(torch.tensor(img), torch.tensor(rep), torch.tensor(st), chunk_size=5)
    above, ties = r["above"], r["ties"]
    for i in range(len(st)):
        others = np.delete(scores[i], st[i])
        assert above[i] == (others > scores[i, st[i]]).sum()
        assert ties[i] == (others == scores[i, st[i]]).sum()


def test_hypergeom_cdf_matches_scipy():
    pops, sucs, draws = np.meshgrid([1, 7, 50, 300], [0, 1, 3, 7, 40, 300], [0, 1, 4, 9, 99, 300], indexing="ij")
    ok = (sucs <= pops) & (draws <= pops)
    pops, sucs, draws = pops[ok], sucs[ok], draws[ok]
    got = hypergeom_cdf(10, pops, sucs, draws).numpy()
    for x in range(10):
        ref = hypergeom.cdf(x, pops, sucs, draws)
        np.testing.assert_allclose(got[:, x], ref, atol=1e-10)


def _bruteforce_pools(scores, targets, allowed_fn, n, ks, n_pools, rng, pessimistic=True):
    """Mean and standard error of Recall@K over explicit random pools, argsort-ranked."""
    q = len(targets)
    hits = np.zeros((q, len(ks)))
    for i in range(q):
        popn = np.flatnonzero(allowed_fn(i))
        for _ in range(n_pools):
            neg = rng.choice(popn, size=min(n - 1, popn.size), replace=False)
            pool = np.concatenate([[targets[i]], neg])
            mask = np.zeros(scores.shape[1], bool)
            mask[pool] = True
            r = _brute_rank(scores[i], targets[i], mask, pessimistic)
            hits[i] += [r <= k for k in ks]
    frac = hits / n_pools
    se = np.sqrt((frac * (1 - frac) * n_pools / (n_pools - 1)).sum(0) / n_pools) / q
    return frac.mean(0), se


def test_exact_equals_monte_carlo_pools_i2t():
    img, rep, st, sp, _ = _cohort(seed=2, n_studies=50, extra_views=10)
    scores = img.astype(np.int64) @ rep.astype(np.int64).T
    ks, ns = [1, 5], [5, 20]
    es = EmbeddingSet(torch.tensor(img), torch.tensor(rep), torch.tensor(st), torch.tensor(sp))
    sec = relinkage_audit(es, ks=ks, ns=ns, directions=["i2t"], n_boot=0, normalize=False)["i2t"]
    exact = {(r["n"], r["k"]): r["value"] for r in sec["recall"]}
    rng = np.random.default_rng(0)
    for n in ns:
        allowed = lambda i: np.arange(rep.shape[0]) != st[i]  # noqa: E731
        mean, se = _bruteforce_pools(scores, st, allowed, n, ks, 200, rng)
        for j, k in enumerate(ks):
            assert abs(exact[(str(n), k)] - mean[j]) <= 5 * se[j] + 1e-9, (n, k, exact[(str(n), k)], mean[j], se[j])
    # the library's Monte Carlo sampler agrees too
    mc, mc_se = monte_carlo_recall(torch.tensor(img), torch.tensor(rep), torch.tensor(st), ks, ns, n_pools=200, seed=1)
    for ni, n in enumerate(ns):
        for j, k in enumerate(ks):
            assert abs(exact[(str(n), k)] - float(mc[ni, j])) <= 5 * float(mc_se[ni, j]) + 1e-9


def test_t2i_excludes_other_views_and_matches_bruteforce():
    img, rep, st, sp, _ = _cohort(seed=3, n_studies=40, extra_views=25)
    q = rep[st]  # one query per image item: its study's report
    scores = q.astype(np.int64) @ img.astype(np.int64).T
    n_items = len(st)
    allowed = lambda i: (st != st[i]) | (np.arange(n_items) == i)  # noqa: E731
    ranks = np.array([_brute_rank(scores[i], i, allowed(i), True) for i in range(n_items)])
    es = EmbeddingSet(torch.tensor(img), torch.tensor(rep), torch.tensor(st), torch.tensor(sp))
    sec = relinkage_audit(es, ks=[1, 5], ns=[10, "full"], directions=["t2i"], n_boot=0, normalize=False)["t2i"]
    full = {r["k"]: r["value"] for r in sec["recall"] if r["n"] == "full"}
    assert full[1] == pytest.approx(np.mean(ranks <= 1), abs=1e-12)
    assert full[5] == pytest.approx(np.mean(ranks <= 5), abs=1e-12)
    at10 = {r["k"]: r["value"] for r in sec["recall"] if r["n"] == "10"}
    allowed_neg = lambda i: allowed(i) & (np.arange(n_items) != i)  # noqa: E731
    mean, se = _bruteforce_pools(scores, np.arange(n_items), allowed_neg, 10, [1, 5], 150, np.random.default_rng(1))
    assert abs(at10[1] - mean[0]) <= 5 * se[0] + 1e-9
    assert abs(at10[5] - mean[1]) <= 5 * se[1] + 1e-9


def test_hardneg_population_and_pools():
    img, rep, st, sp, labels = _cohort(seed=4, n_studies=80, extra_views=20, n_patients=30)
    scores = img.astype(np.int64) @ rep.astype(np.int64).T
    # independent reference of the population: identical label vector with NaN read as 0
    mapped = np.nan_to_num(labels, nan=0.0)
    item_pat = sp[st]
    above, ties, pop = hardneg_counts(
        torch.tensor(img), torch.tensor(rep), torch.tensor(st), label_groups(labels), torch.tensor(sp),
        torch.tensor(item_pat), chunk_size=3,
    )
    for i in range(len(st)):
        same = (mapped == mapped[st[i]]).all(1) & (sp != item_pat[i])
        ts = scores[i, st[i]]
        assert pop[i] == same.sum()
        assert above[i] == (scores[i][same] > ts).sum()
        assert ties[i] == (scores[i][same] == ts).sum()
    # explicit pools never contain a different label vector nor the query patient's studies
    pools = hardneg_pools(st, label_groups(labels), sp, item_pat, n=10, seed=0)
    for i, pool in enumerate(pools):
        assert pool[0] == st[i]
        assert (mapped[pool] == mapped[st[i]]).all()
        assert (sp[pool[1:]] != item_pat[i]).all()
        assert len(set(pool.tolist())) == len(pool)
    # exact hard-negative recall == mean over explicit pools (within 5 SE)
    es = EmbeddingSet(torch.tensor(img), torch.tensor(rep), torch.tensor(st), torch.tensor(sp), labels)
    sec = relinkage_audit(es, ks=[1, 3], ns=[10], directions=[], hardneg=True, n_boot=0, normalize=False)["hardneg/i2t"]
    has = pop.numpy() > 0
    assert sec["n_queries"] == has.sum() and sec["n_queries_no_negatives"] == (~has).sum()
    hits = np.zeros((len(st), 2))
    n_rep = 150
    for r in range(n_rep):
        for i, pool in enumerate(hardneg_pools(st, label_groups(labels), sp, item_pat, n=10, seed=100 + r)):
            mask = np.zeros(rep.shape[0], bool)
            mask[pool] = True
            rk = _brute_rank(scores[i], st[i], mask, True)
            hits[i] += [rk <= 1, rk <= 3]
    frac = hits[has] / n_rep
    mean = frac.mean(0)
    se = np.sqrt((frac * (1 - frac) * n_rep / (n_rep - 1)).sum(0) / n_rep) / has.sum()
    got = {r["k"]: r for r in sec["recall"]}
    assert abs(got[1]["value"] - mean[0]) <= 5 * se[0] + 1e-9
    assert abs(got[3]["value"] - mean[1]) <= 5 * se[1] + 1e-9
    # effective pool size and chance reported per query
    eff = np.minimum(pop.numpy()[has], 9) + 1
    assert got[1]["effective_pool_mean"] == pytest.approx(eff.mean())
    assert got[1]["chance"] == pytest.approx(np.mean(np.minimum(1.0, 1.0 / eff)))


def test_label_mappings():
    lab = np.zeros((4, 14), np.float32)
    lab[1, 0] = np.nan  # blank
    lab[2, 0] = -1.0  # uncertain
    lab[3, 0] = 1.0
    g = label_groups(lab, "blank_negative")
    assert g[0] == g[1] and g[0] != g[2] and g[2] != g[3]
    g = label_groups(lab, "raw")
    assert len(set(g.tolist())) == 4
    g = label_groups(lab, "positive_only")
    assert g[0] == g[1] == g[2] != g[3]
    g = label_groups(lab, "uncertain_positive")
    assert g[0] == g[1] and g[2] == g[3] and g[0] != g[2]


def test_dedup_collapses_identical_reports():
    img, rep, st, sp, _ = _cohort(seed=5, n_studies=40, extra_views=0)
    text = [f"r{i % 25}" for i in range(40)]  # studies i and i+25 share a report text
    # identical texts -> identical report embeddings (as a deterministic text tower gives)
    for i in range(25, 40):
        rep[i] = rep[i - 25]
    scores = img.astype(np.int64) @ rep[:25].astype(np.int64).T
    tgt = np.array([int(text[s][1:]) for s in st])
    ranks = np.array([_brute_rank(scores[i], tgt[i], np.ones(25, bool), True) for i in range(len(st))])
    es = EmbeddingSet(torch.tensor(img), torch.tensor(rep), torch.tensor(st), torch.tensor(sp), study_text_hash=text)
    sec = relinkage_audit(es, ks=[1], ns=["full"], directions=[], dedup=True, n_boot=0, normalize=False)["dedup/i2t"]
    assert sec["dedup"] is True and sec["n_unique_reports"] == 25
    assert sec["recall"][0]["value"] == pytest.approx(np.mean(ranks <= 1))


def test_ns_clipped_and_bootstrap_ci():
    img, rep, st, sp, _ = _cohort(seed=6)
    es = EmbeddingSet(torch.tensor(img), torch.tensor(rep), torch.tensor(st), torch.tensor(sp))
    sec = relinkage_audit(es, ks=[1], ns=[10, 100, 1000, "full"], directions=["i2t"], n_boot=300, seed=0)["i2t"]
    assert [r["n"] for r in sec["recall"]] == ["10", "full"]
    assert sec["clipped_n"] == [100, 1000]
    for r in sec["recall"]:
        assert r["ci"][0] <= r["value"] <= r["ci"][1]
        assert r["x_chance"] == pytest.approx(r["value"] / r["chance"])
    again = relinkage_audit(es, ks=[1], ns=[10, "full"], directions=["i2t"], n_boot=300, seed=0)["i2t"]
    assert again["recall"][0]["ci"] == sec["recall"][0]["ci"]  # seeded


def test_bad_inputs_raise_clear_errors():
    img, rep, st, sp, labels = _cohort(seed=7)
    es = EmbeddingSet(torch.tensor(img), torch.tensor(rep), torch.tensor(st), torch.tensor(sp))
    bad = img.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="image_emb has NaN/inf"):
        relinkage_audit(EmbeddingSet(torch.tensor(bad), torch.tensor(rep), torch.tensor(st), torch.tensor(sp)))
    bad = rep.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="report_emb has NaN/inf"):
        relinkage_audit(EmbeddingSet(torch.tensor(img), torch.tensor(bad), torch.tensor(st), torch.tensor(sp)))
    with pytest.raises(ValueError, match="dim"):
        relinkage_audit(EmbeddingSet(torch.tensor(img[:, :3]), torch.tensor(rep), torch.tensor(st), torch.tensor(sp)))
    with pytest.raises(ValueError, match="labels is None"):
        relinkage_audit(es, hardneg=True)
    with pytest.raises(ValueError, match="all blank"):
        relinkage_audit(EmbeddingSet(es.image_emb, es.report_emb, es.item_study, es.study_patient,
                                     np.full_like(labels, np.nan)), hardneg=True)
    with pytest.raises(ValueError, match="report_text_hash"):
        relinkage_audit(es, dedup=True)
    with pytest.raises(ValueError, match="empty"):
        EmbeddingSet.from_items(np.zeros((0, 4)), np.zeros((0, 4)), [], [])
    with pytest.raises(ValueError, match="report_emb has 3 rows"):
        EmbeddingSet.from_items(np.ones((4, 4)), np.ones((3, 4)), [0, 1, 2, 3], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="more than one patient_id"):
        EmbeddingSet.from_items(np.ones((2, 4)), np.ones((2, 4)), ["a", "a"], ["p", "q"])
    with pytest.raises(ValueError, match="ties policy"):
        relinkage_audit(es, ties="random")
    with pytest.raises(ValueError, match="direction"):
        relinkage_audit(es, directions=["x2y"])


def test_from_items_groups_views_by_study():
    rng = np.random.default_rng(0)
    rep_s = rng.normal(size=(3, 4)).astype(np.float32)
    study = np.array(["s2", "s1", "s2", "s3"])
    rep_items = rep_s[[1, 0, 1, 2]]
    es = EmbeddingSet.from_items(rng.normal(size=(4, 4)), rep_items, study, ["p2", "p1", "p2", "p1"])
    assert es.item_study.tolist() == [0, 1, 0, 2]
    np.testing.assert_allclose(es.report_emb.numpy(), rep_s[[1, 0, 2]])
    assert es.study_patient[1] == es.study_patient[2] != es.study_patient[0]



def _bruteforce_counts(scores, st, study_patient, groups, sub_mask, sub_target):
    """Every count of the one-pass audit, each direction from its own definition on exact scores."""
    n_items, n_st = scores.shape
    item_pat = study_patient[st]
    ref = {k: np.zeros(n_items, np.int64) for k in ("above", "ties", "hn_above", "hn_ties", "hn_pop", "sub_above",
                                                     "sub_ties", "rev_above", "rev_ties")}
    for i in range(n_items):
        row, t = scores[i], scores[i, st[i]]
        others = np.arange(n_st) != st[i]
        ref["above"][i], ref["ties"][i] = (row[others] > t).sum(), (row[others] == t).sum()
        pop = (groups == groups[st[i]]) & (study_patient != item_pat[i])
        ref["hn_above"][i], ref["hn_ties"][i], ref["hn_pop"][i] = (row[pop] > t).sum(), (row[pop] == t).sum(), pop.sum()
        d = row[sub_target[i]]
        cand = sub_mask & (np.arange(n_st) != sub_target[i])
        ref["sub_above"][i], ref["sub_ties"][i] = (row[cand] > d).sum(), (row[cand] == d).sum()
        # report->image: the study's report ranks every image; the study's other images are no negatives
        col, other_studies = scores[:, st[i]], st != st[i]
        ref["rev_above"][i], ref["rev_ties"][i] = (col[other_studies] > t).sum(), (col[other_studies] == t).sum()
    return ref


@pytest.mark.parametrize("chunk", [None, 4, (3, 5), (7, 2), (1, 1), (50, 9)])
@pytest.mark.slow
def test_one_pass_counts_every_direction_as_bruteforce(chunk):
    # One tiled pass must give what each direction's own pass gives: items in shuffled order,
    # several images per study, many exact ties, tiles smaller than a run of targets.
    img, rep, st, sp, labels = _cohort(seed=9, n_studies=45, extra_views=35, n_patients=15, levels=2)
    perm = np.random.default_rng(0).permutation(len(st))
    img, st = img[perm], st[perm]
    rep[40:] = rep[:5]  # identical reports in different studies (dedup ties across tiles)
    text = np.array([f"r{i % 40}" for i in range(45)])
    _, first, inv = np.unique(text, return_index=True, return_inverse=True)
    sub_mask = np.zeros(45, bool)
    sub_mask[first] = True
    sub_target = first[inv][st]
    groups = label_groups(labels).numpy()
    scores = img.astype(np.int64) @ rep.astype(np.int64).T
    ref = _bruteforce_counts(scores, st, sp, groups, sub_mask, sub_target)
    assert ref["ties"].sum() > 0 and ref["rev_ties"].sum() > 0 and ref["sub_ties"].sum() > 0
    got = rank_counts(torch.tensor(img), torch.tensor(rep), torch.tensor(st), chunk_size=chunk, fused=False,
                      hardneg=(groups, sp, sp[st]), subset=(sub_mask, sub_target), reverse=True)
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k].numpy(), ref[k], err_msg=k)
    # ... and the audit's sections equal those of an audit whose every tile holds whole rows
    es = EmbeddingSet(torch.tensor(img), torch.tensor(rep), torch.tensor(st), torch.tensor(sp), labels, list(text))
    kw = dict(ks=[1, 3], ns=[5, "full"], directions=["i2t", "t2i"], hardneg=True, dedup=True, n_boot=20,
              normalize=False, fused=False)
    assert relinkage_audit(es, chunk_size=chunk, **kw) == relinkage_audit(es, chunk_size=(1, 45), **kw)


def test_rank_counts_exclude_across_tiles():
    img, rep, st, _, _ = _cohort(seed=10, n_studies=30, extra_views=0)
    scores = img.astype(np.int64) @ rep.astype(np.int64).T
    rng = np.random.default_rng(1)
    ex = rng.integers(-1, 30, (30, 4))
    ex[ex == st[:, None]] = -1
    r = rank_counts(torch.tensor(img), torch.tensor(rep), torch.tensor(st), exclude=torch.tensor(ex), chunk_size=(4, 6))
    for i in range(len(st)):
        keep = np.ones(30, bool)
        keep[st[i]] = False
        ts = scores[i, st[i]]
        drop = ex[i][ex[i] >= 0]
        assert r["above"][i] == (scores[i][keep] > ts).sum() - (scores[i, drop] > ts).sum()
        assert r["ties"][i] == (scores[i][keep] == ts).sum() - (scores[i, drop] == ts).sum()

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numba", "inductor"])
def test_fused_counts_equal_eager(monkeypatch, backend):
    # The fused kernels (numba, the CPU's; torch.compile, the accelerators', here on the CPU): same
    # comparisons, same counts, on every view (they otherwise leave the small ones to eager counting).
    monkeypatch.setattr(counting, "_SMALL", 0)
    monkeypatch.setitem(counting._BACKEND, "cpu", backend)
    img, rep, st, sp, labels = _cohort(seed=8, n_studies=300, extra_views=200, n_patients=120)
    hn = (label_groups(labels), torch.tensor(sp), torch.tensor(sp[st]))
    args = (torch.tensor(img), torch.tensor(rep), torch.tensor(st))
    sub = (np.arange(300) % 3 == 0, torch.tensor((st // 3) * 3))  # every third study stands for its text
    kw = dict(hardneg=hn, subset=sub, reverse=True, chunk_size=(97, 130))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fused counting unavailable")  # no silent eager fallback
        fused = rank_counts(*args, fused=True, **kw)
    eager = rank_counts(*args, fused=False, **kw)
    assert int(eager["ties"].sum()) > 0 and int(eager["hn_ties"].sum()) > 0 and int(eager["rev_ties"].sum()) > 0
    for k in eager:
        assert torch.equal(fused[k], eager[k]), k
