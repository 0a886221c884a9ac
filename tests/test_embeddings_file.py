"""Embeddings files and EmbeddingSet input checks (issue 13): rows that disagree, blank or mistyped ids,
extreme scales, zero vectors, probe leakage and the probe's training subset. Each case that used to
pass silently (or fail with a raw numpy error) must now raise naming the row or key, or be handled
exactly; references are computed independently (float64 numpy, hand-built expectations)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from cxr_relink.audit.embeddings import EmbeddingSet, l2_normalize
from cxr_relink.audit.probe import linear_probe, subsample_rows
from cxr_relink.audit.relinkage import relinkage_audit


def _rows(seed: int = 0, n_st: int = 40, extra: int = 20, dim: int = 8, off: int = 0, split: str = "test"):
    """One row per image item: n_st studies (2 studies per patient), `extra` second views."""
    rng = np.random.default_rng(seed)
    st = np.concatenate([np.arange(n_st), rng.integers(0, n_st, extra)])
    rep = rng.normal(size=(n_st, dim)).astype(np.float32)
    lab = (rng.random((n_st, 14)) < 0.4).astype(np.float32)
    lab[:, 4:] = 0  # few distinct label vectors: hard-negative groups hold several patients
    img = rep[st] + 0.8 * rng.normal(size=(len(st), dim)).astype(np.float32)
    img[:, :4] += 2 * lab[st, :4]  # a linear signal for the probe
    return dict(image_emb=img, report_emb=rep[st], labels=lab[st], study_id=st + off, patient_id=(st + off) // 2,
                report_text_hash=np.array([f"h{s}" for s in st + off]), split=np.array([split] * len(st)))


@pytest.fixture(scope="module")
def rows():
    return _rows()


def _cat(*parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _es(d, **kw):
    args = dict(d, **kw)
    return EmbeddingSet.from_items(args["image_emb"], args["report_emb"], args["study_id"], args["patient_id"],
                                   args.get("labels"), args.get("report_text_hash"))


def _evaluate(tmp_path, data, *overrides):
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate

    path = tmp_path / "emb.npz"
    np.savez(path, **data)
    out = tmp_path / "out"
    evaluate(compose("evaluate.yaml", [f"embeddings={path}", f"paths.output_dir={out}", *overrides]))
    return json.loads((out / "audit.json").read_text())


# ---- rows of one study must agree ------------------------------------------------------------------
@pytest.mark.parametrize("key", ["labels", "report_text_hash", "report_emb"])
def test_conflicting_rows_of_a_study_raise_naming_the_row(rows, key):
    d = {k: v.copy() for k, v in rows.items()}
    r = 45  # a second view: its study's first row is the study's own index
    s = int(d["study_id"][r])
    if key == "labels":
        d["labels"][r, 2] = 1 - d["labels"][r, 2]
    elif key == "report_text_hash":
        d["report_text_hash"][r] = "another report"
    else:
        d["report_emb"][r] = np.random.default_rng(9).normal(size=d["report_emb"].shape[1])
    # before: accepted, the first row won
    with pytest.raises(ValueError, match=rf"1 rows have {key} different .*study_id {s} row {r} vs row {s}\b"):
        _es(d)


def test_report_rows_of_a_study_may_differ_by_float_noise(rows):
    d = dict(rows, report_emb=rows["report_emb"] * (1 + 1e-3 * np.random.default_rng(1).normal(size=rows["report_emb"].shape)))
    es = _es(d)
    assert es.n_studies == 40  # batch / bf16 noise is not a conflict


# ---- ids ---------------------------------------------------------------------------------------------
def test_blank_ids_raise_naming_rows(rows):
    s = rows["study_id"].astype(str)
    s[[3, 41]] = ""  # np.unique would merge the blank rows into one study
    with pytest.raises(ValueError, match=r"study_id is blank \(empty\) in 2 rows \(first rows: \[3, 41\]\)"):
        _es(rows, study_id=s)
    s[[3, 41]] = " "
    with pytest.raises(ValueError, match=r"study_id is blank .*first rows: \[3, 41\]"):
        _es(rows, study_id=s)


def test_float_ids_are_refused(rows):
    # MIMIC-CXR-scale ids saved as float32 collide: float32 holds integers exactly only up to 2**24.
    pid = np.arange(17_000_000, 17_000_177)
    assert np.unique(pid.astype(np.float32)).size < 177  # the collision itself (independent of the audit)
    n = len(rows["study_id"])
    for name, key in (("patient_id", "patient_id"), ("study_id", "study_id")):
        ids = (rows[key] + 17_000_000).astype(np.float32)  # before: accepted, ids merged
        with pytest.raises(ValueError, match=rf"{name} has dtype float32: ids must be integers or strings"):
            _es(rows, **{key: ids})
    nan = rows["study_id"].astype(np.float64)
    nan[3] = np.nan  # NaN ids (blank) are float ids too
    with pytest.raises(ValueError, match="study_id has dtype float64: ids must be integers"):
        _es(rows, study_id=nan)
    assert n == 60


def test_ids_with_surrounding_spaces_are_refused(rows):
    sid = np.array([f"s{v}" for v in rows["study_id"]])
    sid[[45, 50]] = [sid[45] + " ", " " + sid[50]]  # before: "s1 " and "s1" were two studies (more candidates)
    with pytest.raises(ValueError, match=r"study_id has leading/trailing whitespace in 2 rows \(first rows: \[45, 50\], "
                                         r"e.g. 's\d+ '\)"):
        _es(rows, study_id=sid)
    pid = np.array([f"p{v}" for v in rows["patient_id"]])
    pid[7] = pid[7] + "\t"
    with pytest.raises(ValueError, match=r"patient_id has leading/trailing whitespace in 1 rows \(first rows: \[7\]"):
        _es(rows, patient_id=pid)


def test_rows_appended_twice_are_refused_naming_rows(rows):
    d = _cat(rows, {k: v[:5] for k, v in rows.items()})  # the first 5 rows again, at rows 60..64
    # before: accepted, 65 queries (5 images counted twice)
    with pytest.raises(ValueError, match=r"5 rows repeat an earlier row exactly .* first row 60 = row 0 \(study_id 0\)"):
        _es(d)
    # a second view of a study with its own image is no repeat
    assert _es(rows).n_items == 60


def test_errors_name_the_files_rows_not_the_splits(tmp_path):
    tr, te = _train_test()
    data = _cat(tr, te)  # 90 train rows first: test row 5 is the file's row 95
    data["image_emb"] = data["image_emb"].copy()
    data["image_emb"][95, 2] = np.nan
    with pytest.raises(ValueError, match=r"image_emb has NaN/inf values in 1 rows \(first rows: \[95\]\)"):
        _evaluate(tmp_path, data, "audit=standard", "audit.relinkage.n_boot=0")
    data = _cat(tr, te, {k: v[90:91] for k, v in _cat(tr, te).items()})  # test row 90 appended at row 150
    with pytest.raises(ValueError, match=r"first row 150 = row 90"):
        _evaluate(tmp_path, data, "audit=standard", "audit.relinkage.n_boot=0")


def test_split_name_suggests_close_matches(tmp_path):
    data = dict(_rows(), split=np.array(["Test"] * 60))
    # before: "no rows with split == 'test' (splits present: ['Test'])", no suggestion
    with pytest.raises(ValueError, match=r"no rows with split == 'test' .*did you mean split=Test\?"):
        _evaluate(tmp_path, data, "audit=standard", "audit.relinkage.n_boot=0")

    # the probe's train split too: 'Train' rows beside 'test' ones (before: "add a `split` array with 'train'
    # rows" although the file has one)
    tr, te = _train_test()
    data = _cat(tr, te)
    data["split"] = np.where(data["split"] == "train", "Train", data["split"])
    res = _evaluate(tmp_path, data, "audit=all", "audit.relinkage.n_boot=0", "audit.probe.n_boot=0")
    assert "probe" not in res and "is 'Train' the train split?" in res["meta"]["skipped"]["probe"]


def test_one_patient_is_refused_when_bootstrapping(rows, tmp_path):
    one = dict(rows, patient_id=np.zeros_like(rows["patient_id"]))
    # before: a 95% CI that is a point (one cluster resampled)
    with pytest.raises(ValueError, match="all belong to one patient .*n_boot=0"):
        relinkage_audit(_es(one), ks=[1], ns=["full"], n_boot=50)
    assert relinkage_audit(_es(one), ks=[1], ns=["full"], n_boot=0)["i2t"]["recall"][0]["value"] > 0
    with pytest.raises(ValueError, match="every audited row has patient_id 0"):
        _evaluate(tmp_path, one, "audit=standard", "audit.relinkage.n_boot=20")


def test_object_ids_and_string_labels_name_the_key(rows, tmp_path):
    from cxr_relink.evaluation import load_embeddings

    # object ids of one kind (a pandas column) read as their values (#29); a mix or a missing one is refused
    ints = [int(x) for x in rows["study_id"]]
    assert _es(rows, study_id=np.array(ints, dtype=object)).item_study.tolist() == \
        _es(rows, study_id=np.array(ints)).item_study.tolist()
    with pytest.raises(ValueError, match="study_id has dtype object .* holding a str at row 1"):
        _es(rows, study_id=np.array([ints[0], str(ints[1]), *ints[2:]], dtype=object))
    with pytest.raises(ValueError, match=r"labels has dtype <U\d+; expected numbers"):
        _es(rows, labels=rows["labels"].astype(str))
    path = tmp_path / "obj.npz"
    np.savez(path, **dict(rows, patient_id=rows["patient_id"].astype(object)))  # pickled by np.savez
    with pytest.raises(ValueError, match=r"obj.npz: patient_id cannot be read without pickle"):
        load_embeddings(path)
    np.savez(path, **dict(rows, labels=rows["labels"].astype(str)))
    with pytest.raises(ValueError, match=r"labels has dtype <U\d+"):
        load_embeddings(path)
    np.savez(path, **dict(rows, split=np.arange(len(rows["split"]))))
    with pytest.raises(ValueError, match="split has dtype int64; expected strings"):
        load_embeddings(path)


# ---- scale ---------------------------------------------------------------------------------------------
def test_l2_normalize_is_scale_safe():
    x = torch.tensor(np.random.default_rng(0).normal(size=(6, 5)), dtype=torch.float32)
    ref = x.double() / x.double().norm(dim=1, keepdim=True)  # independent: float64, no scaling
    for scale in (1.0, 1e20, 1e-25, 1e-30, 2.0**66):
        got = l2_normalize(x * scale, "x")
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)
    # a power-of-two scale is exact in float: the normalised rows are bit-identical
    assert torch.equal(l2_normalize(x * 2.0**66, "x"), l2_normalize(x, "x"))
    assert torch.equal(l2_normalize(x * 2.0**-90, "x"), l2_normalize(x, "x"))
    with pytest.raises(ValueError, match=r"1 all-zero rows .* first rows \[2\]"):
        l2_normalize(torch.cat([x[:2], torch.zeros(1, 5)]), "x")


def test_l2_normalize_is_plain_division_on_ordinary_rows():
    rng = np.random.default_rng(1)
    for x in (torch.tensor(rng.normal(size=(500, 64)), dtype=torch.float32),
              torch.tensor(rng.integers(-3, 4, (500, 8)), dtype=torch.float32) + 0.0):
        x = x[(x != 0).any(1)]
        # before: every row was first divided by its largest |value| (rounding): 100% of rows differed
        assert torch.equal(l2_normalize(x, "x"), x / x.norm(dim=1, keepdim=True))
    # a scale-safe row among ordinary ones leaves the ordinary rows untouched
    mixed = torch.cat([x[:3], x[3:4] * 1e20, x[4:6]])
    assert torch.equal(l2_normalize(mixed, "x")[[0, 1, 2, 4, 5]], (x / x.norm(dim=1, keepdim=True))[[0, 1, 2, 4, 5]])


def test_exact_ties_on_a_lattice_survive_normalisation():
    rng = np.random.default_rng(0)  # a lattice of small integers: many exact ties between candidates
    rep = torch.tensor(rng.integers(-3, 4, (300, 8)), dtype=torch.float32)
    img = rep + torch.tensor(rng.integers(-3, 4, (300, 8)), dtype=torch.float32)
    keep = (rep != 0).any(1) & (img != 0).any(1)
    rep, img = rep[keep], img[keep]
    ids = torch.arange(len(rep))
    es = EmbeddingSet(img, rep, ids, ids)
    got = relinkage_audit(es, ks=[1], ns=["full"], directions=["i2t"], n_boot=0)["i2t"]["ties"]["total_ties"]
    # reference: the same audit on plainly normalised rows (x / ||x||, float32)
    plain = EmbeddingSet(img / img.norm(dim=1, keepdim=True), rep / rep.norm(dim=1, keepdim=True), ids, ids)
    ref = relinkage_audit(plain, ks=[1], ns=["full"], directions=["i2t"], n_boot=0, normalize=False)["i2t"]
    assert ref["ties"]["total_ties"] > 0 and got == ref["ties"]["total_ties"]  # before: 9 vs 8


def test_relinkage_results_do_not_depend_on_scale(rows):
    ref = relinkage_audit(_es(rows), ks=[1, 5], ns=[10, "full"], n_boot=0)
    for scale in (1e20, 1e-25):  # before: 1e20 rows overflowed to zeros; 1e-25 rows were "all-zero"
        got = relinkage_audit(_es(rows, image_emb=rows["image_emb"] * scale, report_emb=rows["report_emb"] * scale),
                              ks=[1, 5], ns=[10, "full"], n_boot=0)
        assert [r["value"] for r in got["i2t"]["recall"]] == [r["value"] for r in ref["i2t"]["recall"]]
    with pytest.raises(ValueError, match="beyond float32's range in 1 rows"):
        _es(rows, image_emb=np.where(np.arange(60)[:, None] == 5, 1e300, rows["image_emb"].astype(np.float64)))


# ---- the probe's rows ----------------------------------------------------------------------------------
def test_probe_rejects_zero_vectors(rows):
    x = rows["image_emb"].copy()
    x[4] = 0  # before: fitted on silently, though re-linkage rejects it
    with pytest.raises(ValueError, match=r"probe train embeddings has 1 all-zero rows .* first rows \[4\]"):
        linear_probe(x, rows["labels"], rows["image_emb"], rows["labels"], n_boot=0)


def test_subsample_rows_is_a_seeded_random_subset():
    idx = subsample_rows(1000, 100, seed=3)
    assert len(idx) == len(set(idx.tolist())) == 100 and list(idx) == sorted(idx)
    assert np.array_equal(idx, subsample_rows(1000, 100, seed=3)) and not np.array_equal(idx, subsample_rows(1000, 100, 4))
    assert idx.max() > 500  # not the first 100 rows
    assert np.array_equal(subsample_rows(50, 100, 0), np.arange(50)) and np.array_equal(subsample_rows(5, None), np.arange(5))
    # uniform: every row equally likely (binomial sd of the count per row over 2000 draws is ~13)
    counts = np.bincount(np.concatenate([subsample_rows(20, 5, s) for s in range(2000)]), minlength=20)
    assert np.abs(counts - 500).max() < 70


def _train_test(n_train_st=60):
    tr = _rows(seed=1, n_st=n_train_st, extra=30, off=1000, split="train")
    te = _rows(seed=2)
    return tr, te


def test_evaluate_probe_trains_on_a_random_subset(tmp_path):
    tr, te = _train_test()
    tr["labels"] = tr["labels"].copy()
    tr["labels"][tr["study_id"] < 1030] = 0  # the first rows (studies 1000..1029) are all negative
    assert (tr["labels"][:25] == 0).all() and tr["labels"][:, :4].any(0).all()
    # before: the first 25 rows (all negative) -> "no label has both classes"
    res = _evaluate(tmp_path, _cat(tr, te), "audit=probe", "audit.probe.max_train_samples=25", "audit.probe.n_boot=0",
                    "audit.probe.eval_labels=[No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity]")
    assert res["probe"]["n_train"] == 25 and res["probe"]["n_labels_evaluated"] >= 1


def test_same_study_in_train_and_test_rows_raises(tmp_path):
    tr, te = _train_test()
    te = dict(te, study_id=te["study_id"].copy(), patient_id=te["patient_id"].copy())
    leak = te["study_id"] == 7
    te["study_id"][leak], te["patient_id"][leak] = 1003, 1001  # study 1003 is also a train study
    for k in ("report_emb", "labels", "report_text_hash"):
        te[k] = te[k].copy()
        te[k][leak] = tr[k][tr["study_id"] == 1003][0]
    with pytest.raises(ValueError, match=r"1 study_id\(s\) have rows in both the train split and the evaluated split \(e.g. \[1003\]\)"):
        _evaluate(tmp_path, _cat(tr, te), "audit=probe", "audit.probe.n_boot=0")


def test_probe_zero_vector_in_the_file_raises_before_any_audit(tmp_path, monkeypatch):
    # What the embeddings path runs (evaluate.audit_embeddings -> audit.relinkage.Relinkage; the
    # callback RelinkageAudit wraps the same class, so this also stands for the Trainer path).
    from cxr_relink.audit.relinkage import Relinkage

    tr, te = _train_test()
    tr["image_emb"] = tr["image_emb"].copy()
    tr["image_emb"][3] = 0
    monkeypatch.setattr(Relinkage, "audit", lambda *a, **k: pytest.fail("re-linkage computed before the probe's inputs were checked"))
    with pytest.raises(ValueError, match=r"probe train embeddings has 1 all-zero rows"):
        _evaluate(tmp_path, _cat(tr, te), "audit=all", "audit.relinkage.n_boot=0")


# ---- split labelling and audit=all ---------------------------------------------------------------------
def test_file_without_split_is_labelled_all_and_audit_all_skips_the_probe(tmp_path, caplog, monkeypatch):
    # audit.probe.Probe is what evaluate.audit_embeddings calls (and callbacks.audit.LinearProbe wraps).
    from cxr_relink.audit.probe import Probe

    data = {k: v for k, v in _rows().items() if k != "split"}
    monkeypatch.setattr(Probe, "probe", lambda *a, **k: pytest.fail("the probe ran without train rows"))
    caplog.set_level(logging.INFO)
    res = _evaluate(tmp_path, data, "audit=all", "audit.relinkage.n_boot=0")
    # before: labelled split=test; and the probe raised after the whole re-linkage audit was computed
    assert res["meta"]["split"] == "all" and res["meta"]["n_items"] == 60
    assert set(res["relinkage"]) >= {"i2t", "hardneg/i2t"} and "probe" not in res
    assert "train-split rows" in res["meta"]["skipped"]["probe"]
    assert caplog.text.index("probe skipped") < caplog.text.index("Full results")


def test_audit_all_with_blank_labels_skips_the_probe(tmp_path):
    tr, te = _train_test()
    data = _cat(tr, te)
    data["labels"] = np.full_like(data["labels"], np.nan)
    res = _evaluate(tmp_path, data, "audit=all", "audit.relinkage.hardneg=false", "audit.relinkage.n_boot=0")
    assert "probe" not in res and "no label has both classes" in res["meta"]["skipped"]["probe"]
    assert "i2t" in res["relinkage"]
