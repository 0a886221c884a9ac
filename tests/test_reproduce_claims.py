"""experiments/reproduce/render.py, one claim at a time, on small synthetic run records (no run, no file): each
claim function gets only the runs it reads, with numbers chosen so that its verdict is known, and the verdict
and evidence it renders are checked against the same statistics worked out here with numpy/scipy (paired
log ratios with a one-sided 95% t-bound, non-inferiority of a paired difference, per-run bootstrap bounds)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from experiments import verdict as V
from experiments.reproduce import render as R
from experiments.reproduce.records import Records, Run
from tests.test_reproduce import _row

SEEDS = [0, 1, 2, 3, 4]
OUT = Path("/runs")


def audit(r100: float | None = None, r10k: float | None = None, spread: float = 0.004, auroc: float | None = None,
          hardneg: float | None = None, attacks: dict[str, float] | None = None) -> dict:
    """An audit result: image→report R@1 at N = 100 (chance 1/100) and N = 10,000 (chance 1/10,000); a one-sided
    95% bootstrap interval of ±spread/2 around each value (tests.test_reproduce._row)."""
    rows = [] if r100 is None else [_row("100", 100, r100, 0.01, spread)]
    rows += [] if r10k is None else [_row("10000", 10000, r10k, 1e-4, spread)]
    res: dict = {"relinkage": {"i2t": {"recall": rows}}}
    if hardneg is not None:  # hard negatives: an effective pool of 20 (chance 1/20)
        res["relinkage"]["hardneg/i2t"] = {"recall": [_row("100", 100, hardneg, 0.05, spread)]}
    if auroc is not None:
        res["probe"] = {"macro_auroc": auroc}
    if attacks is not None:  # the adaptive audit: each attack's R@1 at N = 10,000 (its pre-specified aux set)
        res["adaptive"] = {"rows": [{"attack": a, "aux": None if a == "cosine" else "leaked",
                                     "n_aux_requested": 0 if a == "cosine" else "all",
                                     "relinkage": {"i2t": {"recall": [_row("10000", 10000, v, 1e-4, spread)]}}}
                                    for a, v in attacks.items()]}
    return res


def records(by_tag: dict[str, list[dict]], base: str | None = None) -> Records:
    """Records of five seeds: ``by_tag[tag][s]`` is seed s's audit result of run ``tag/s<s>``."""
    rec = Records("tiny", list(SEEDS), OUT, 0.34)
    for tag, results in by_tag.items():
        for s, res in zip(SEEDS, results):
            rec.runs[f"{tag}/s{s}"] = Run(f"{tag}/s{s}", "train", [f"tag={tag}", f"seed={s}"], [], OUT / tag, res)
    if base:
        for s in SEEDS:
            rec.runs[f"base/s{s}"] = rec.runs[f"{base}/s{s}"]
            rec.aliases.add(f"base/s{s}")
    return rec


def by_hand(xs: list[float]) -> tuple[float, float, float]:
    """Mean of xs and its one-sided 95% t-bounds (lower, upper)."""
    x = np.asarray(xs, float)
    h = stats.t.ppf(0.95, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean(), x.mean() - h, x.mean() + h


def ratio_word(ratios: list[float], above: bool) -> str:
    """A > B (above) or A < B on paired ratios: the one-sided 95% bound of the geometric mean against 1."""
    _, lo, hi = by_hand(list(np.log(ratios)))
    if (lo > 0) if above else (hi < 0):
        return "holds"
    return "contradicted" if ((hi < 0) if above else (lo > 0)) else "not shown"


def summary_of(rows: list[R.Summary]) -> dict[str, tuple[str, str]]:
    return {c.split(" ")[0]: (v, e) for c, v, e, _ in rows}


def test_claim1_verdict_is_the_paired_ratio_test() -> None:
    generic = [0.02 * (1 + 0.05 * s) for s in SEEDS]
    to_bert = [2.0, 2.2, 1.8, 2.1, 1.9]  # clearly above 1 on every seed
    to_llm = [0.9, 1.1, 1.0, 0.95, 1.05]  # no difference
    bert = [g * k for g, k in zip(generic, to_bert)]
    llm = [b * k for b, k in zip(bert, to_llm)]
    rec = records({"generic": [audit(r) for r in generic], "bert": [audit(r) for r in bert], "llm": [audit(r) for r in llm]})
    lines, rows = R.claim1(rec)
    md = "\n".join(lines)
    assert (ratio_word(to_bert, True), ratio_word(to_llm, True)) == ("holds", "not shown")  # the input does what it says
    assert "- bert_encoder / generic: **holds**: ratio " + f"{math.exp(np.mean(np.log(to_bert))):.3f}" in md
    assert "- llm_encoder (+stage 1) / bert_encoder: **not shown" in md
    # one part not shown: the claim is not shown
    verdict, evidence = summary_of(rows)["1."]
    assert verdict.startswith("not shown")
    assert evidence == (f"R@1 ratio bert/generic {math.exp(np.mean(np.log(to_bert))):.2f}, "
                        f"llm/bert {math.exp(np.mean(np.log(to_llm))):.2f} over 5 seeds")
    # each seed's R@1 (%) in the table
    assert f"| bert_encoder | `python train.py tag=bert seed=<s>` | {100 * bert[0]:.2f} (≥ {100 * (bert[0] - 0.002):.2f}) |" in md


@pytest.mark.parametrize("weakest, word", [(0.015, "holds"), (0.009, "not shown"), (0.007, "contradicted")])
def test_claims_2_and_3_need_every_trained_runs_lower_bound_above_chance(weakest, word) -> None:
    """Per released model: the lowest one-sided 95% lower bound of × chance over the trained towers' runs decides
    (the generic tower is shown, not tested). R@1 ±0.002 around ``weakest`` at chance 0.01: lower bound
    (weakest - 0.002) / 0.01, upper bound (weakest + 0.002) / 0.01."""
    strong = [0.05 + 0.01 * s for s in SEEDS]
    llm = [weakest if s == 3 else r for s, r in zip(SEEDS, strong)]
    runs = {"generic": [audit(0.001, hardneg=0.001) for _ in SEEDS],  # far below chance: not part of the test
            "bert": [audit(r, hardneg=5 * r) for r in strong], "llm": [audit(r, hardneg=5 * r) for r in llm]}
    lines, rows = R.claim2(records(runs))
    lo, hi = (weakest - 0.002) / 0.01, (weakest + 0.002) / 0.01
    expect = "holds" if lo > 1 else ("contradicted" if hi < 1 else "not shown")
    assert expect == word
    verdict, evidence = summary_of(rows)["2."]
    assert verdict.startswith(word)
    assert evidence == (f"lowest one-sided 95% lower bound over 10 (run, N) of the trained towers: {lo:.2f}× "
                        "(llm, seed 3, N = 100)")
    assert "| generic text tower (frozen at random init) | geometric mean |" in "\n".join(lines)
    # claim 3 reads the hard-negative rows (chance 1/20 here): five times the R@1 is the same × chance
    _, rows3 = R.claim3(records(runs))
    verdict3, evidence3 = summary_of(rows3)["3."]
    lo3 = (5 * weakest - 0.002) / 0.05
    assert verdict3.startswith("holds" if lo3 > 1 else "contradicted" if (5 * weakest + 0.002) / 0.05 < 1 else "not shown")
    assert f"{lo3:.2f}× effective chance (llm, seed 3, N = 100)" in evidence3


def test_claim4_readings_against_paired_ratios_and_auroc_noninferiority() -> None:
    before = [0.004 + 0.0005 * s for s in SEEDS]  # R@1 at N = 10,000 of the stage-2 model
    cut = [0.5, 0.55, 0.45, 0.6, 0.5]  # DP / before
    auroc = [0.80 + 0.001 * s for s in SEEDS]  # matched probe, before DP
    small, large = [0.002, 0.003, 0.001, 0.002, 0.004], [0.03, 0.032, 0.028, 0.031, 0.029]  # AUROC drops
    dp = [b * c for b, c in zip(before, cut)]
    runs = {"llm": [audit(r10k=b, auroc=0.9) for b in before],  # its own probe: not in any comparison
            "before_dp": [audit(r10k=b, auroc=a) for b, a in zip(before, auroc)],
            "nonprivate": [audit(r10k=b, auroc=a) for b, a in zip(before, auroc)],
            "dp_public_negatives": [audit(r10k=d, auroc=a - x) for d, a, x in zip(dp, auroc, small)],
            "nonprivate_fresh_patient": [audit(r10k=b, auroc=a) for b, a in zip(before, auroc)],
            "dp_fresh_public_negatives_patient": [audit(r10k=d, auroc=a - x) for d, a, x in zip(dp, auroc, large)]}
    lines, rows = R.claim4(records(runs, base="llm"))
    got = summary_of(rows)
    assert ratio_word(cut, above=False) == "holds"
    # non-inferiority of the AUROC (DP − before, margin −1 point): holds when the lower bound is above −0.01,
    # contradicted when the upper bound is below it
    _, lo_small, _ = by_hand([-x for x in small])
    _, _, hi_large = by_hand([-x for x in large])
    assert lo_small > -V.AUROC_MARGIN and hi_large < -V.AUROC_MARGIN
    assert got["4."][0] == "holds"  # R@1 cut and AUROC within the margin
    assert got["4p."][0] == "contradicted"  # R@1 cut, but the AUROC drop beyond the margin
    assert got["4f."][0] == "not decided (not run yet)"  # its runs are not in the records
    gm = math.exp(np.mean(np.log(cut)))
    assert got["4."][1].startswith(f"R@1 DP/before ×{gm:.3f} (cut {100 * (1 - gm):.1f}%)")
    assert f"AUROC drop vs before {100 * np.mean(small):.2f} points" in got["4."][1]
    # the stage-2 run's own probe (90%, fitted on the private split) is shown but in no comparison: with it, the
    # drops above would be ten points
    assert "own final audit fits its probe on the private train split (macro AUROC 90.00" in "\n".join(lines)


def test_claim4b_per_released_model_on_the_external_cohort() -> None:
    r = [0.03 + 0.002 * s for s in SEEDS]
    lines, rows = R.claim4b(records({"external/base": [audit(x, auroc=0.7) for x in r]}))
    verdict, evidence = summary_of(rows)["4b."]
    lo = min((x - 0.002) / 0.01 for x in r)
    assert lo > 1 and verdict == "holds"
    assert evidence == f"lowest one-sided 95% lower bound {lo:.2f}× over 5 seeds"
    assert "| DP group clipping, stage-2 heads | – (not run yet) | – | not run yet |" in "\n".join(lines)


def test_claim4c_states_trunk_attacks_and_tests_released_ones() -> None:
    base = [0.004 + 0.0005 * s for s in SEEDS]
    cut = [0.5, 0.55, 0.45, 0.6, 0.5]
    before = [audit(attacks={"cosine": b, "ridge": 2 * b, "procrustes": b, "head": 3 * b}) for b in base]
    after = [audit(attacks={"cosine": b * c, "ridge": 2 * b, "procrustes": b / c, "head": 3 * b}) for b, c in zip(base, cut)]
    runs = {"llm": [audit(r10k=b) for b in base], "adaptive/base": before, "adaptive/dp_public_negatives": after}
    lines, rows = R.claim4c(records(runs, base="llm"))  # the stage-2 model's pools set N (10,000)
    assert (ratio_word(cut, False), ratio_word([1 / c for c in cut], False)) == ("holds", "contradicted")
    verdict, evidence = summary_of(rows)["4c."]
    assert verdict == ("trunk attacks (ridge, head): head-only DP cannot change them (by construction); "
                       "cosine on the released embeddings: holds; procrustes on the released embeddings: contradicted")
    assert evidence.startswith("ridge, head: identical before and after DP on every seed; cosine DP/before "
                               f"×{math.exp(np.mean(np.log(cut))):.3f}")
    assert "\n".join(lines).count("×1.000 on every one of 5 seeds (as construction implies)") == 2


@pytest.mark.parametrize("ratios, word", [([0.97, 0.99, 1.0, 0.98, 1.01], "holds"),
                                          ([0.8, 0.82, 0.79, 0.81, 0.8], "contradicted")])
def test_claim5_noninferiority_of_the_llm_tower(ratios, word) -> None:
    structured = [0.04 + 0.002 * s for s in SEEDS]
    runs = {"style_structured/llm": [audit(x) for x in structured],
            "style_mixed_train/llm": [audit(x * k) for x, k in zip(structured, ratios)]}
    _, lo, hi = by_hand(list(np.log(ratios)))
    m = math.log(V.STYLE_MARGIN)
    assert ("holds" if lo > m else "contradicted" if hi < m else "not shown") == word
    lines, rows = R.claim5(records(runs))
    verdict, evidence = summary_of(rows)["5."]
    assert verdict == word
    assert evidence == f"llm R@1 ratio {math.exp(np.mean(np.log(ratios))):.3f} (≥ {math.exp(lo):.3f}) over 5 seeds"
    assert "| bert_encoder | not run yet |" in "\n".join(lines)  # the BERT arm is not in the records


def test_head_lists_every_summary_row_and_appendix_only_old_protocol_runs() -> None:
    rec = records({})
    summary = [("1. a claim", "holds", "ev one", "cfg one"), ("5. another", "not shown (x)", "ev two", "cfg two")]
    head = "\n".join(R.head(rec, 90.0, "--scale tiny", summary))
    assert "This invocation: 1.5 min wall, 0 runs executed, rendered no kept runs." in head
    assert "| 1. a claim | **holds** | ev one | cfg one |\n| 5. another | **not shown (x)** | ev two | cfg two |" in head
    assert R.appendix(rec) == []  # no older-protocol seed: no appendix
    rec.old = {(1, 2): [("bert/s2", audit(0.04)), ("external/base/s2", audit(0.5)),
                        ("dp_public_negatives/s2", audit(r10k=0.003))]}
    app = "\n".join(R.appendix(rec))
    assert "| 1 | 2 | bert | 4.00 (≥ 3.80) | – | – | – | – | – |" in app  # × chance 0.04 / 0.01, bound 0.038 / 0.01
    assert "| 1 | 2 | dp_public_negatives | – | – | – | – | – | 0.300 (≥ 0.100) |" in app  # R@1 (%), its bound
    assert "external" not in app  # transfer runs are not part of the appendix table
    assert "Seeds kept under older protocols (protocol 1 s2)" in "\n".join(R.head(rec, 90.0, "", summary))


# ------------------------------------------------------------------ beyond the papers (experiments/reproduce/beyond.py)
def frontier_arm(ridge: float, head: float, mem: float, mem_lb: float, ra: float, ra_ci: tuple[float, float]) -> dict:
    """A kept frontier record with the numbers the section reads (two aux draws with these trunk-attack values)."""
    draws = [{"attacks": {"with": {"cosine": 0.05, "ridge": ridge + d, "head": head - d}}} for d in (-0.01, 0.01)]
    return {"scale": {"draws": 2, "seed": 1, "patients": 60, "image_size": 32, "public_patients": 40, "epochs": 1,
                      "head_epochs": 2, "n_aux": 10, "epsilons": [1, 3]},
            "privacy": {"enabled": True, "guarantee_valid": True, "epsilon_spent": 1.0},
            "capability": {"value": 0.1, "ci": [0.08, 0.12]},
            "best_attack_with_release": {"attack": "ridge", "mean_over_draws": ridge},
            "release_attributable": {"value": ra, "ci": list(ra_ci), "draws": draws},
            "memorisation": {"best": {"attack": "ridge", "difference": mem, "difference_ci": [mem_lb - 0.01, mem + 0.02],
                                      "difference_lower95_one_sided": mem_lb}},
            "probe": {"macro_auroc": 0.7, "macro_auroc_ci": [0.65, 0.75]}, "cpu_s": 60.0}


def test_beyond_states_what_each_arm_shows_from_its_own_numbers() -> None:
    from experiments.reproduce.beyond import beyond

    rec = Records("paper", SEEDS, OUT, 0.34)
    rec.frontier_dir = Path("experiments/results/frontier")
    rec.frontier = {"control": frontier_arm(0.07, 0.06, 0.03, 0.004, 0.05, (0.01, 0.09)),
                    "head_dp_eps1": frontier_arm(0.07, 0.06, 0.01, -0.01, 0.0, (-0.02, 0.02)),
                    "whole_dp_eps1": frontier_arm(0.05, 0.065, 0.0, -0.02, 0.01, (-0.03, 0.05))}
    L, rows = beyond(rec)
    by = {r[0]: r[1] for r in rows}
    # control: one-sided lower bound 0.4 points > 0; its release-attributable CI [1, 9] excludes 0
    assert by["B. control"].startswith("memorisation shown (one-sided 95% lower bound 0.4 > 0)")
    assert "release-attributable shown" in by["B. control"]
    assert by["B. head_dp_eps1"].startswith("memorisation not shown") and "by construction" in by["B. head_dp_eps1"]
    # whole-model DP: ridge below the control's (5.0 < 7.0 mean over draws), head above it (6.5 > 6.0)
    assert "trunk-attack means below the control's (point estimates): ridge" in by["B. whole_dp_eps1"] and "head" not in by["B. whole_dp_eps1"].split(": ")[-1]
    text = "\n".join(L)
    assert "| whole_dp_eps3 | not run |" in text and "whole_dp_eps1: ridge 5.0, head 6.5" in text


def test_beyond_without_frontier_records_says_not_available() -> None:
    from experiments.reproduce.beyond import beyond

    rec = Records("paper", SEEDS, OUT, 0.34)
    assert beyond(rec) == ([], [])  # no frontier asked for: no section
    rec.frontier_dir = Path("/nowhere")  # asked for, none kept: the section says so
    L, rows = beyond(rec)
    assert rows == [] and any(line.startswith("not available") for line in L)
