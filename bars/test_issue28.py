"""Issue #28's acceptance checks: a tiny stage-3 run never prints a per-patient delta >= 1/#patients beside a
valid guarantee (and patient units give a per-patient guarantee), and RESULTS.md's claim 4 states the probe's fit
data and compares DP with its non-private control on AUROC."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cxr_relink.configs import ROOT
from tests.test_dp import compose_dp, stage2_ckpt  # noqa: F401  (a module fixture: a tiny stage-2 checkpoint)

pytestmark = pytest.mark.filterwarnings("ignore:.*Secure RNG.*")

TINY_DP = ["experiment=dp_alignment", "data.reader.num_patients=30", "public_cohort.reader.num_patients=20",
           "data.reader.image_size=32", "data.image_size=32", "data.batch_size=16", "trainer.max_epochs=1",
           "model.loss.bank_size=32", "logger=csv", "trainer.enable_progress_bar=false",
           "++trainer.enable_model_summary=false", "callbacks.relinkage_audit.n_boot=10", "callbacks.linear_probe.n_boot=5",
           "callbacks.relinkage_audit.hardneg=false", "model.dp.target_epsilon=3"]


@pytest.mark.parametrize("unit", ["study", "patient"])
@pytest.mark.slow
def test_tiny_stage3_states_a_per_patient_guarantee_only_where_it_holds(tmp_path, stage2_ckpt, unit, capsys) -> None:  # noqa: F811
    from train import train

    cfg = compose_dp(tmp_path / "run", *TINY_DP, f"model.backbone_ckpt={stage2_ckpt}", f"paths.cache_dir={tmp_path / 'c'}",
                     f"data.privacy_unit={unit}")
    train(cfg)
    out = Path(cfg.paths.output_dir) / "final_audit"
    priv = json.loads((out / "audit.json").read_text())["privacy"]
    report = (out / "report.md").read_text()
    printed = capsys.readouterr()
    text = report + printed.out + printed.err
    assert priv["guarantee_valid"] and f"VALID per {unit}" in report and priv["privacy_unit"] == unit
    bound = priv["n_train_units_upper"]
    # No (epsilon, delta) per patient is printed whose delta is >= 1/#patients (its public bound), let alone >= 1.
    for eps, delta in re.findall(r"per patient: epsilon ([\d.e+-]+), delta ([\d.e+-]+)", text):
        assert float(delta) < 1.0 / bound, (eps, delta)
    pp = priv["per_patient"]
    if unit == "study":  # k >= 2 studies per patient at eps 3 per study: the group delta is far above 1/#patients
        assert pp["k"] >= 2 and pp["delta"] >= 1.0 / bound and pp["meaningful"] is False
        assert "no meaningful per-patient guarantee" in report
    else:
        assert pp["k"] == 1 and pp["meaningful"] and pp["delta"] < 1.0 / bound


def test_results_claim4_states_the_probe_fit_data_and_a_dp_vs_control_auroc_row() -> None:
    md = (ROOT / "RESULTS.md").read_text()
    c4 = md.split("## Claim 4:", 1)[1].split("\n## ", 1)[0]
    assert "probe fitted on the public cohort's train split" in c4 and "| probe fitted on |" in c4
    for reading in ("stage-2 heads", "fresh heads", "fresh heads, patient units"):
        body = c4.split(f"**Reading: {reading}**", 1)[1].split("**Reading", 1)[0]
        assert re.search(r"Macro AUROC \(matched probe\), non-private[^:]+ − DP [^:]+: (drop|no seed)", body), reading
        assert re.search(r"Macro AUROC \(matched probe\), before DP − DP [^:]+: (drop|no seed)", body), reading
    # every epsilon in the claim-4 table comes with its unit and delta
    table = c4.split("| arm | config | unit | ε spent (δ) |", 1)[1].split("\n\n", 1)[0]
    for row in table.splitlines():
        if row.startswith("| DP "):
            cells = [c.strip() for c in row.split("|")]
            assert cells[3] in ("study", "patient") and re.fullmatch(r"[\d.]+ \([\d.e+-]+\)|–", cells[4]), row
