"""Retrieved-report quality (issue 15): exact GREEN error counts against hand-built report pairs with
known counts (one per category, and combinations), label F1 against scikit-learn, BLEU-4 / ROUGE-L
against closed-form values, retrieval against a brute-force argsort, and the wiring (evaluate.py
from an embeddings file and from a checkpoint, the validation callback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxr_relink.audit.report_quality import (
    COUNT_KEYS,
    ReportSet,
    bleu4,
    count_errors,
    green_from_counts,
    label_f1,
    merge_labels,
    merge_truths,
    report_quality_audit,
    retrieve_topk,
    rouge_l,
)


def T(*items, normal=False, negated=()):
    return {"findings": list(items), "negated": list(negated), "normal": normal}


EFF_L_SMALL = {"kind": "effusion", "side": "left", "size": "small", "certainty": "present"}
PTX_R = {"kind": "pneumothorax", "side": "right", "size": "small", "certainty": "present"}
CONSOL = {"kind": "consolidation", "side": "right", "zone": "lower", "size": "moderate", "certainty": "present"}
CM_MILD = {"kind": "cardiomegaly", "size": "mild", "certainty": "present"}
ETT_4 = {"kind": "ett", "tip_cm": 4, "certainty": "present"}
CVC = {"kind": "cvc", "side": "right", "approach": "internal jugular", "tip": "svc", "certainty": "present"}
PNA = {"kind": "pneumonia", "side": "right", "zone": "lower", "certainty": "present"}


def _with(item, **kw):
    return {**item, **kw}


def _counts(**nonzero):
    return {k: nonzero.get(k, 0) for k in COUNT_KEYS}


# (reference, candidate, expected non-zero counts, expected GREEN)
PAIRS = {
    "identical": (T(EFF_L_SMALL, CONSOL, ETT_4), T(ETT_4, CONSOL, EFF_L_SMALL), dict(matched=3), 1.0),
    "false_finding": (T(EFF_L_SMALL), T(EFF_L_SMALL, PTX_R), dict(matched=1, false_finding=1), 0.5),
    "missed_finding": (T(EFF_L_SMALL, PTX_R), T(EFF_L_SMALL), dict(matched=1, missed_finding=1), 0.5),
    "wrong_side": (T(CONSOL, CM_MILD), T(_with(CONSOL, side="left"), CM_MILD), dict(matched=1, wrong_location=1), 0.5),
    "wrong_zone": (T(CONSOL, CM_MILD), T(_with(CONSOL, zone="upper"), CM_MILD), dict(matched=1, wrong_location=1), 0.5),
    "wrong_severity": (T(EFF_L_SMALL, CM_MILD), T(_with(EFF_L_SMALL, size="large"), CM_MILD),
                       dict(matched=1, wrong_severity=1), 0.5),
    "wrong_ett_position": (T(ETT_4, CM_MILD), T(_with(ETT_4, tip_cm=7), CM_MILD),
                           dict(matched=1, wrong_device_position=1), 0.5),
    "wrong_cvc_tip": (T(CVC, CM_MILD), T(_with(CVC, tip="right atrium"), CM_MILD),
                      dict(matched=1, wrong_device_position=1), 0.5),
    # hedged vs stated is counted, but is not one of GREEN's categories
    "certainty_only": (T(PNA), T(_with(PNA, certainty="uncertain")), dict(matched=1, certainty_mismatch=1), 1.0),
    "borderline_heart": (T(CM_MILD), T({"kind": "cardiomegaly", "certainty": "uncertain"}),
                         dict(matched=1, certainty_mismatch=1), 1.0),
    # one finding, two wrong attributes: one error in each category, not matched
    "side_and_size": (T(EFF_L_SMALL, CM_MILD), T(_with(EFF_L_SMALL, side="right", size="moderate"), CM_MILD),
                      dict(matched=1, wrong_location=1, wrong_severity=1), 1 / 3),
    # side and zone are one location error
    "side_and_zone": (T(CONSOL), T(_with(CONSOL, side="left", zone="upper")), dict(wrong_location=1), 0.0),
    "false_and_missed": (T(EFF_L_SMALL, CM_MILD), T(PTX_R, CM_MILD), dict(matched=1, false_finding=1, missed_finding=1),
                         1 / 3),
    "everything": (T(EFF_L_SMALL, CONSOL, ETT_4, CM_MILD, PNA),
                   T(_with(EFF_L_SMALL, size="large"), _with(CONSOL, side="left"), _with(ETT_4, tip_cm=2), CM_MILD, PTX_R),
                   dict(matched=1, wrong_severity=1, wrong_location=1, wrong_device_position=1, false_finding=1,
                        missed_finding=1), 1 / 6),
    # a negation is not a finding: the candidate that denies the effusion has missed it (once)
    "negated_reference_finding": (T(EFF_L_SMALL, CM_MILD), T(CM_MILD, negated=["Pleural Effusion"]),
                                  dict(matched=1, missed_finding=1), 0.5),
    "finding_the_reference_negates": (T(CM_MILD, negated=["Pneumothorax"]), T(CM_MILD, PTX_R),
                                      dict(matched=1, false_finding=1), 0.5),
    # the normal statement is one finding
    "both_normal": (T(normal=True, negated=["Pneumothorax"]), T(normal=True), dict(matched=1), 1.0),
    "normal_vs_abnormal": (T(normal=True), T(PTX_R), dict(false_finding=1), 0.0),
    "abnormal_vs_normal": (T(PTX_R), T(normal=True), dict(missed_finding=1), 0.0),
    "normal_with_incidental": (T({"kind": "granuloma", "side": "left", "zone": "upper"}, normal=True),
                               T({"kind": "granuloma", "side": "right", "zone": "upper"}, normal=True),
                               dict(matched=1, wrong_location=1), 0.5),
    # nothing on either side: GREEN's reference implementation gives 0 when nothing is matched
    "both_empty": (T(), T(), dict(), 0.0),
    # two findings of one kind are paired optimally (old with old, acute with acute)
    "two_fractures": (T({"kind": "fracture", "age": "old", "side": "left", "rib": 5, "certainty": "present"},
                        {"kind": "fracture", "age": "acute", "side": "right", "rib": 7, "certainty": "present"}),
                      T({"kind": "fracture", "age": "acute", "side": "right", "rib": 7, "certainty": "present"},
                        {"kind": "fracture", "age": "old", "side": "left", "rib": 6, "certainty": "present"}),
                      dict(matched=1, wrong_location=1), 0.5),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_exact_error_counts_of_hand_built_pairs(name):
    ref, cand, expected, green = PAIRS[name]
    counts = count_errors(ref, cand)
    assert counts == _counts(**expected)
    assert green_from_counts(counts) == pytest.approx(green)


def test_green_is_matched_over_matched_plus_significant_errors():
    c = _counts(matched=3, false_finding=1, missed_finding=2, wrong_location=1, wrong_severity=1,
                wrong_device_position=1, certainty_mismatch=5, other_attribute=2)
    assert green_from_counts(c) == pytest.approx(3 / (3 + 6))  # certainty / other do not count
    assert green_from_counts(_counts(false_finding=2)) == 0.0


def test_every_synthetic_report_matches_itself_and_its_one_error_variant_differs(cache_dir):
    from cxr_relink.datamodules.synthetic.cohort import SyntheticReader

    studies = SyntheticReader(num_patients=30, seed=3, image_size=32, cache_dir=cache_dir).load()
    truths = ReportSet.from_studies(studies).truths
    assert truths is not None and len(truths) == len(studies)
    n_items = 0
    for st, t in zip(studies, truths):
        c = count_errors(t, t)
        n_items += len(t["findings"])
        assert green_from_counts(c) == 1.0 and c["matched"] == len(t["findings"]) + bool(t["normal"])
        # The generator's severity / side / zone variants change one attribute of one finding: rebuilt
        # from its record of the change, that is exactly one error of the matching category.
        for ev in st.extras["error_variants"]:
            ch = ev["changed"]
            if ev["error"] not in ("severity", "side", "zone"):
                continue
            items = [dict(it) for it in t["findings"]]
            i = next(i for i, it in enumerate(items) if it["kind"] == ch["kind"] and it.get(ch["attribute"]) == ch["from"])
            items[i][ch["attribute"]] = ch["to"]
            cat = {"severity": "wrong_severity", "side": "wrong_location", "zone": "wrong_location"}[ev["error"]]
            if ch["kind"] in ("cvc", "picc", "chest_tube"):
                cat = "wrong_device_position"
            got = count_errors(t, dict(t, findings=items))
            assert got[cat] == 1 and sum(got[k] for k in got if k not in ("matched", cat)) == 0
    assert n_items > 20


def test_merges_for_concatenation():
    m = merge_truths([T(EFF_L_SMALL), T(EFF_L_SMALL, PTX_R), T(normal=True)])
    assert m["findings"] == [EFF_L_SMALL, PTX_R] and m["normal"] is False
    assert merge_truths([T(normal=True), T(normal=True)])["normal"] is True
    lab = np.full((3, 14), np.nan, np.float32)
    lab[0, 2], lab[1, 2], lab[2, 2] = 0, -1, np.nan
    lab[0, 5], lab[1, 5] = 1, -1
    lab[2, 7] = 0
    out = merge_labels(lab)
    assert out[2] == -1 and out[5] == 1 and out[7] == 0 and np.isnan(out[0])


# ---- labels --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["positive_only", "uncertain_positive"])
def test_label_f1_matches_scikit_learn(mode):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    vals = np.array([1.0, 0.0, -1.0, np.nan], np.float32)
    true = vals[rng.choice(4, size=(200, 14), p=[0.2, 0.3, 0.1, 0.4])]
    pred = vals[rng.choice(4, size=(200, 14), p=[0.2, 0.3, 0.1, 0.4])]
    true[:, 11] = np.nan  # a label nobody states: F1 undefined, left out of the macro average
    pred[:, 11] = 0
    pos = (lambda x: x == 1) if mode == "positive_only" else (lambda x: (x == 1) | (x == -1))
    t, p = pos(true).astype(int), pos(pred).astype(int)
    got = label_f1(true, pred, mode)
    assert got["micro_f1"] == pytest.approx(f1_score(t, p, average="micro"))
    defined = [j for j in range(14) if t[:, j].any() or p[:, j].any()]
    assert got["macro_f1"] == pytest.approx(f1_score(t, p, average="macro", labels=defined))
    assert got["n_labels_macro"] == 13
    for j, (name, d) in enumerate(got["per_label"].items()):
        if j in defined:
            assert d["f1"] == pytest.approx(f1_score(t[:, j], p[:, j]))
        else:
            assert d["f1"] is None


# ---- lexical -------------------------------------------------------------------------------------------
def test_bleu4_closed_form():
    # unigrams 5/6, bigrams 3/5, trigrams 2/4, 4-grams 1/3, equal lengths (brevity penalty 1)
    got = bleu4(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert got == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    # a shorter candidate: brevity penalty exp(1 - r/c)
    got = bleu4(["the cat sat on the red mat"], ["the cat sat on the mat"])
    assert got == pytest.approx(np.exp(1 - 7 / 6) * (6 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, abs=1e-6)


def test_rouge_l_closed_form():
    # LCS "the cat sat on mat" = 5 tokens of 6 and 6: P = R = F = 5/6; LCS 3 of 4 and 6: F = 2PR/(P+R)
    got = rouge_l(["the cat sat on a mat", "a b c d e f"], ["the cat sat on the mat", "a x c e"])
    p, r = 3 / 4, 3 / 6
    assert got == pytest.approx([5 / 6, 2 * p * r / (p + r)])


# ---- retrieval and the audit ---------------------------------------------------------------------------
def test_topk_matches_argsort_with_exclusion():
    g = torch.Generator().manual_seed(0)
    q, db = torch.randn(37, 5, generator=g), torch.randn(50, 5, generator=g)
    ex = torch.rand(37, 50, generator=g) < 0.3
    got = retrieve_topk(q, db, 4, ex, chunk_size=8)
    sim = (torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(db, dim=1).T).numpy()
    sim[ex.numpy()] = -np.inf
    ref = np.argsort(-sim, axis=1, kind="stable")[:, :4]
    assert np.array_equal(got.numpy(), ref)


def _sets():
    """Three audited studies (patients a, a, b) and a database of four reports; embeddings are one-hot
    so each query's retrieval is known."""
    lab = np.full((4, 14), np.nan, np.float32)
    lab[:, 10] = [1, 1, 0, np.nan]  # Pleural Effusion
    db = ReportSet(ids=["d0", "d1", "d2", "d3"], patient=["x", "y", "z", "w"], labels=lab,
                   texts=["small left effusion", "large left effusion", "no effusion", "normal chest"],
                   truths=[T(EFF_L_SMALL), T(_with(EFF_L_SMALL, size="large")), T(normal=True), T(normal=True)])
    q = ReportSet(ids=["q0", "q1", "q2"], patient=["a", "a", "b"], labels=lab[[0, 0, 2]],
                  texts=["small left effusion", "small left effusion", "no effusion"],
                  truths=[T(EFF_L_SMALL), T(EFF_L_SMALL), T(normal=True)])
    return q, db


def test_audit_of_a_known_retrieval():
    q, db = _sets()
    db_emb = torch.eye(4)
    # queries: image 0 (study q0) -> d0 (exact), image 1 (study q1) -> d1 (severity), image 2 (q1 again) -> d1,
    # image 3 (q2) -> d0 (false finding, missed normal)
    img = torch.eye(4)[[0, 1, 1, 0]]
    res = report_quality_audit(img, [0, 1, 1, 2], q, db_emb, db, n_boot=50)
    g = res["green_exact"]
    assert g["value"] == pytest.approx((1 + 0 + 0 + 0) / 4)
    cats = g["categories"]
    assert cats["wrong_severity"]["total"] == 2 and cats["wrong_severity"]["per_query"] == pytest.approx(0.5)
    assert cats["false_finding"]["total"] == 1 and cats["missed_finding"]["total"] == 0
    assert cats["matched"]["total"] == 1
    assert res["own_report_candidate"] is False and "not a candidate" in res["note"]
    assert res["n_queries"] == 4 and res["n_patients"] == 2 and len(g["ci"]) == 2
    lab = res["labels"]["positive_only"]
    assert lab["micro_f1"] == pytest.approx(label_f1(q.labels[[0, 1, 1, 2]], db.labels[[0, 1, 1, 0]])["micro_f1"])
    # ROUGE-L F1: identical 1; "large left effusion" 2 of 3 tokens; "small left effusion" for "no effusion":
    # P = 1/3, R = 1/2, F = 0.4
    assert res["lexical"]["rouge_l"] == pytest.approx(np.mean([1.0, 2 / 3, 2 / 3, 0.4]))
    # nothing in the result is text
    assert "effusion" not in json.dumps(res)


def test_self_database_excludes_the_own_patient_and_modes():
    q, db = _sets()
    img = torch.eye(3)
    # database = the audited split itself: q0 and q1 share patient a, so q0 can only retrieve q2
    res = report_quality_audit(img, [0, 1, 2], q, torch.eye(3), q, database_name="self", n_boot=0)
    cats = res["green_exact"]["categories"]
    assert cats["missed_finding"]["total"] == 2  # q0, q1 -> q2 (normal): the effusion is missed
    assert cats["false_finding"]["total"] == 1  # q2 -> q0 (a tie with q1, broken by index)
    assert "own study" in res["note"]
    # majority of top 3: two effusion reports (d0, d1 share a label vector) outvote the normal one
    img = torch.tensor([[0.1, 0.2, 1.0, 0.0]])
    res = report_quality_audit(img, [0], q, torch.eye(4), db, mode="majority", k=3, n_boot=0, lexical=False)
    assert res["green_exact"]["value"] == 0.0 and res["green_exact"]["categories"]["wrong_severity"]["total"] == 1
    # concatenation of the top 2 (d2 normal + d1): the merged truth has the large effusion and no normal
    res = report_quality_audit(img, [0], q, torch.eye(4), db, mode="concat", k=2, n_boot=0, lexical=False)
    assert res["green_exact"]["categories"]["wrong_severity"]["total"] == 1
    assert res["labels"]["positive_only"]["micro_f1"] == 1.0


def test_cohort_without_structured_truth_skips_green_exact():
    q, db = _sets()
    q.truths = None
    res = report_quality_audit(torch.eye(4)[[0]], [0], q, torch.eye(4), db, n_boot=0)
    assert "green_exact" not in res and "structured" in res["skipped"]["green_exact"]
    assert "labels" in res


# ---- wiring --------------------------------------------------------------------------------------------
def test_evaluate_from_an_embeddings_file_with_report_ids(tmp_path, cache_dir):
    from cxr_relink.configs import compose
    from cxr_relink.datamodules.synthetic.cohort import SyntheticReader
    from cxr_relink.evaluation import evaluate

    data_over = ["data.reader.num_patients=40", "data.image_size=32", f"data.reader.cache_dir={cache_dir}"]
    studies = SyntheticReader(num_patients=40, seed=1234, image_size=32, cache_dir=cache_dir).load()
    rng = np.random.default_rng(0)
    rows = [(s, v) for s in studies for v in range(len(s.images))]
    emb = rng.normal(size=(len(studies), 8)).astype(np.float32)
    st = np.array([i for i, s in enumerate(studies) for _ in s.images])
    data = dict(image_emb=emb[st] + rng.normal(size=(len(st), 8)).astype(np.float32), report_emb=emb[st],
                study_id=np.arange(len(studies))[st], patient_id=np.array([s.patient_id for s, _ in rows]),
                report_id=np.array([s.study_id for s, _ in rows]), split=np.array([s.split for s, _ in rows]))
    path = tmp_path / "emb.npz"
    np.savez(path, **data)
    out = tmp_path / "out"
    scal, objs = evaluate(compose("evaluate.yaml", ["audit=report_quality", f"embeddings={path}",
                                                    f"paths.output_dir={out}", "audit.report_quality.n_boot=50",
                                                    *data_over]))
    res = json.loads((out / "audit.json").read_text())
    rq = res["report_quality"]
    n_test = int(sum(1 for s, _ in rows if s.split == "test"))
    assert rq["n_queries"] == n_test and rq["database"] == "train"
    assert rq["n_database_reports"] == sum(1 for s in studies if s.split == "train")
    assert 0 <= rq["green_exact"]["value"] <= 1 and "scalars" not in rq
    assert scal["report_quality/green_exact"] == rq["green_exact"]["value"]
    md = (out / "report.md").read_text()
    assert "Retrieved-report quality" in md and "GREEN-exact" in md
    text = md + json.dumps(res)
    clauses = {c.strip() for s in studies for c in s.report.replace(";", ".").split(".") if len(c.strip()) > 20}
    assert clauses and not [c for c in clauses if c in text]  # no report text in the outputs


@pytest.mark.slow
def test_validation_callback_and_evaluate_from_a_checkpoint(compose_train, tmp_path):
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate
    from train import train

    cfg = compose_train("trainer.max_epochs=1", "final_audit=false", "callbacks=none", "logger=csv",
                        "+callbacks.rq._target_=cxr_relink.callbacks.audit.ReportQualityAudit", "+callbacks.rq.n_boot=20",
                        "+callbacks.rq.lexical=false", "+callbacks.ckpt._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                        f"+callbacks.ckpt.dirpath={tmp_path}/ck", "+callbacks.ckpt.save_last=true")
    metrics, objs = train(cfg)
    rq_cb = next(cb for cb in objs["trainer"].callbacks if type(cb).__name__ == "ReportQualityAudit")
    val = rq_cb.last_result["report_quality"]
    assert val["database"] == "train" and 0 <= val["green_exact"]["value"] <= 1
    assert "report_quality/green_exact" in objs["trainer"].callback_metrics
    out = tmp_path / "eval"
    scal, eobjs = evaluate(compose("evaluate.yaml", ["audit=[standard,report_quality]", f"ckpt_path={tmp_path}/ck/last.ckpt",
                                                     "data.reader.num_patients=40", "data.image_size=32",
                                                     "audit.report_quality.n_boot=20", "audit.relinkage.n_boot=20",
                                                     f"paths.output_dir={out}"]))
    res = json.loads((out / "audit.json").read_text())
    assert res["report_quality"]["n_queries"] == res["relinkage"]["i2t"]["n_queries"]
    assert "report_quality/label_micro_f1" in scal and "test/report_quality/green_exact" not in scal


def test_baselines_are_exact_expectations(cache_dir):
    from cxr_relink.audit.report_quality import expected_green
    from cxr_relink.datamodules.synthetic.cohort import SyntheticReader

    studies = SyntheticReader(num_patients=30, seed=3, image_size=32, cache_dir=cache_dir).load()
    rs = ReportSet.from_studies(studies)
    q, db = rs.truths[:15], rs.truths[15:]
    groups = [np.arange(i % 5, len(db), 3) for i in range(len(q))]
    groups[0] = np.array([], dtype=np.int64)
    for got, g in ((expected_green(q, db), None), (expected_green(q, db, groups), groups)):
        for i, t in enumerate(q):
            idx = range(len(db)) if g is None else g[i]
            ref = [green_from_counts(count_errors(t, db[j])) for j in idx]
            assert (np.isnan(got[i]) and not ref) or got[i] == pytest.approx(np.mean(ref))
    # in the audit: the same-label baseline of a query whose label vector only d0/d1 share
    qs, dbs = _sets()
    res = report_quality_audit(torch.eye(4)[[0]], [0], qs, torch.eye(4), dbs, n_boot=0, lexical=False)
    bl = res["green_exact"]["baselines"]
    assert bl["same_labels_report"]["value"] == pytest.approx((1.0 + 0.0) / 2)  # d0 exact, d1 wrong severity
    assert bl["random_report"]["value"] == pytest.approx((1.0 + 0 + 0 + 0) / 4)


# ---- GREEN with its model (plumbing; the real model is a local 7B folder) --------------------------------
ANSWER = """[Explanation]:
The candidate misplaces the effusion.

[Clinically Significant Errors]:
(a) False report of a finding in the candidate: 1. Pneumothorax
(b) Missing a finding present in the reference: 0. No errors
(c) Misidentification of a finding's anatomic location/position: 2. Effusion side; tube tip
(d) Misassessment of the severity of a finding: 0.
(e) Mentioning a comparison that isn't in the reference: 0.
(f) Omitting a comparison detailing a change from a prior study: 0.

[Clinically Insignificant Errors]:
(a) False report of a finding in the candidate: 3.

[Matched Findings]:
3. Cardiomegaly; edema; ETT
"""


def test_parse_green_answers():
    from cxr_relink.audit.green_model import parse_green_response

    got = parse_green_response(ANSWER)
    assert (got["matched"], got["a"], got["b"], got["c"], got["d"]) == (3, 1, 0, 2, 0)  # insignificant (a) 3 ignored
    assert got["green"] == pytest.approx(3 / (3 + 3))
    assert parse_green_response(ANSWER.replace("3. Cardiomegaly", "0. None"))["green"] == 0.0
    assert parse_green_response("gibberish without sections")["green"] is None


def test_green_model_plumbing_with_a_tiny_random_causal_lm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cxr_relink.audit.green_model import GreenModel
    from cxr_relink.datamodules.text import train_wordpiece

    tok = train_wordpiece(["small left effusion", "no pneumothorax", "reference candidate"] * 20, vocab_size=60,
                          min_frequency=1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "green")
    tok.save_pretrained(tmp_path / "green")
    gm = GreenModel(str(tmp_path / "green"), prompt=lambda r, c: f"reference {r} candidate {c}", max_new_tokens=3,
                    device="cpu")
    q, db = _sets()
    res = report_quality_audit(torch.eye(4)[[0, 1, 1, 0]], [0, 1, 1, 2], q, torch.eye(4), db, n_boot=0,
                               lexical=False, green_model=gm)
    sec = res["green_model"]
    assert sec["frac_unparsable"] == 1.0 and sec["value"] is None  # a random model writes no GREEN answer
    assert "model-judged" in sec["judged_by"] and "green_exact" in res  # beside the exact counts
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        GreenModel(str(tmp_path / "missing"), prompt=lambda r, c: r)


def test_green_model_section_aggregates_parsed_answers():
    from cxr_relink.audit.green_model import parse_green_response

    class Fake:  # stands in for GreenModel: one fixed answer per pair
        def score(self, refs, cands):
            return [parse_green_response(ANSWER) for _ in refs]

    q, db = _sets()
    res = report_quality_audit(torch.eye(4)[[0, 1]], [0, 1], q, torch.eye(4), db, n_boot=0, lexical=False,
                               green_model=Fake())
    sec = res["green_model"]
    assert sec["value"] == pytest.approx(0.5) and sec["frac_unparsable"] == 0.0 and sec["n_scored"] == 2
    assert sec["per_query"]["matched"] == 3 and sec["per_query"]["(c) wrong_location/wrong_device_position"] == 2
