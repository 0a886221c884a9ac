"""Issue #31's acceptance checks (items 1 and 3, the audit side): an audit config for the three numbers exists;
the memorisation test (members vs label-matched held-out R@1, and the pair-level membership test) detects planted
duplicate pairs and is at chance on an independent split; release-attributable is ~0 for a model trained only on
the attacker's aux pairs. The DP side: RESULTS.md has the frontier with whole-model DP rows and the memorisation and
release-attributable rows; whole-model DP's ε is Opacus' for its recorded σ, q and steps (tests/test_dp_whole.py
recomputes it with a fresh accountant; the kept frontier records are checked against one here)."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_relink.audit.adaptive import fit_attack
from cxr_relink.audit.membership import pair_membership_test
from cxr_relink.audit.risk import risk_audit
from tests.conftest import one_thread  # noqa: F401  (the fixture)
from tests.test_risk import HEAD, _cohort, _memorising, _relink

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_audit_config_for_the_three_numbers_exists():
    from cxr_relink.configs import compose

    cfg = compose("evaluate.yaml", ["audit=risk", "ckpt_path=x.ckpt"])
    r = cfg.audit.risk
    assert r.n_draws >= 5 and set(r.no_release) >= {"pool_centring", "ridge", "head"}
    assert set(r.no_release_sources) == {"raw", "public"} and "public_ckpt" in r and r.label_match
    assert list(r.fprs) == [0.01, 0.001] and cfg.audit.relinkage is not None
    exp = compose("train.yaml", ["experiment=memorise"])  # the configuration that memorises
    assert exp.data.augment is False and exp.model.optimizer.weight_decay == 0 and exp.trainer.max_epochs >= 50


def test_memorisation_detects_planted_duplicates_and_is_at_chance_on_an_independent_split():
    target, aux = _cohort(40, 2, first_patient=20_000), _cohort(40, 1, first_patient=10_000)
    planted = risk_audit(target, aux, _relink, members=_memorising(50, 3, 0, planted=True),
                         nonmembers=_memorising(50, 4, 5_000, planted=False), attacks=(), n_aux=40, n_boot=300)
    mem = planted["memorisation"]
    assert mem["best"]["difference_lower95_one_sided"] > 0.3, mem["best"]
    assert mem["pair_membership"]["auc_lower95_one_sided"] > 0.9, mem["pair_membership"]
    diff_cover = auc_cover = 0
    for s in range(8):  # members and non-members from one distribution, nothing planted
        m = risk_audit(target, aux, _relink, members=_memorising(50, 30 + s, 0, planted=False),
                       nonmembers=_memorising(50, 60 + s, 5_000, planted=False), attacks=(), n_aux=40,
                       n_boot=300, seed=s)["memorisation"]
        row, pm = m["attacks"]["cosine"], m["pair_membership"]
        diff_cover += row["difference_ci"][0] <= 0 <= row["difference_ci"][1]
        auc_cover += pm["auc_ci"][0] <= 0.5 <= pm["auc_ci"][1]
    assert diff_cover >= 7 and auc_cover >= 7, (diff_cover, auc_cover)


def test_pair_membership_calibration_by_a_reference_model_removes_per_pair_difficulty():
    """Some pairs are easy (high cosine under any model). With members drawn towards easy pairs and nothing
    memorised, the raw cosine reads easiness as membership; subtracting a reference model's cosine for the same
    pair (a model trained without it) brings the AUC back to chance."""
    rng = np.random.default_rng(0)
    ease_m, ease_n = rng.normal(0.5, 0.2, 300), rng.normal(0.0, 0.2, 300)
    audited_m, audited_n = ease_m + rng.normal(0, 0.05, 300), ease_n + rng.normal(0, 0.05, 300)
    ref_m, ref_n = ease_m + rng.normal(0, 0.05, 300), ease_n + rng.normal(0, 0.05, 300)
    pat = np.arange(300)
    raw = pair_membership_test(audited_m, audited_n, pat, pat + 1000, n_boot=200)
    cal = pair_membership_test(audited_m, audited_n, pat, pat + 1000, ref_m, ref_n, n_boot=200)
    assert raw["auc_lower95_one_sided"] > 0.9
    assert cal["auc_ci"][0] <= 0.5 <= cal["auc_ci"][1], cal


def test_release_attributable_is_zero_for_a_model_trained_only_on_the_aux_pairs():
    """The released model is the head attack's architecture trained on the aux pairs alone (its trunk: the
    release-free features themselves). The attacker holds the same pairs, so the release adds nothing: the
    no-release 'trained from scratch' attacker rebuilds it."""
    target, aux = _cohort(60, 0), _cohort(75, 1, first_patient=10_000)
    released, _ = fit_attack("head", aux, 6, seed=0, head=HEAD)
    ti, tt = released(target)
    ai, at = released(aux)
    model_t = _cohort(60, 0, released=(ti.numpy(), tt.numpy()))
    model_a = _cohort(75, 1, first_patient=10_000, released=(ai.numpy(), at.numpy()))
    res = risk_audit(model_t, model_a, _relink, no_release_sources={"raw": (target, aux)}, n_aux=aux.n_studies,
                     head={**HEAD, "dim": 6}, seed=0)
    ra = res["release_attributable"]
    assert ra["without_mean"] > 0.3  # the aux pairs alone link these studies
    assert abs(ra["value"]) < 0.05 and ra["ci"][0] <= 0 <= ra["ci"][1], ra
    assert res["capability"]["value"] == pytest.approx(ra["draws"][0]["attacks"]["without"]["raw:head"], abs=1e-6)


def test_results_md_has_the_frontier_with_whole_model_dp_memorisation_and_release_attributable_rows():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    md = (root / "RESULTS.md").read_text()
    sec = md.split("## Beyond the papers", 1)
    assert len(sec) == 2, "RESULTS.md lacks the section beyond the papers"
    body = sec[1].split("\n## ", 1)[0]
    header = next(line for line in body.splitlines() if line.startswith("| arm |"))
    assert "release-attributable" in header and "memorisation" in header and "AUROC" in header
    rows = {line.split("|")[1].strip(): line for line in body.splitlines() if line.startswith("| ") and "---" not in line}
    for arm in ("control", "head_dp_eps1", "head_dp_eps3", "head_dp_eps8", "whole_dp_eps1", "whole_dp_eps3",
                "whole_dp_eps8"):
        assert arm in rows and "not run" not in rows[arm], arm
    assert "Claim 4c" in md and "three numbers" in md.split("## Claim 4c", 1)[1].split("\n## ", 1)[0]


def test_the_kept_whole_model_dp_records_spend_the_epsilon_opacus_computes():
    """Each kept whole-model arm's recorded ε equals a fresh Opacus RDP accountant on its recorded σ, q, steps."""
    import json
    from pathlib import Path

    from opacus.accountants import RDPAccountant

    folder = Path(__file__).resolve().parents[1] / "experiments" / "results" / "frontier"
    arms = sorted(folder.glob("whole_dp_eps*.json"))
    assert arms
    for path in arms:
        p = json.loads(path.read_text())["privacy"]
        assert p["enabled"] and p["guarantee_valid"] and p["privacy_unit"] == "patient" and p["dp_scope"] == "whole"
        acc = RDPAccountant()
        acc.history = [(p["noise_multiplier"], p["sample_rate"], p["steps_planned"])]
        assert acc.get_epsilon(p["delta"]) == pytest.approx(p["epsilon_spent"], rel=1e-6), path.name
        assert p["epsilon_spent"] <= p["target_epsilon"] + 1e-9
