"""`python evaluate.py audit=risk` end to end on a tiny untrained checkpoint (the wiring, not the numbers: those
are tests/test_risk.py's): the risk section in audit.json, report.md, the headline and the scalars; the public-only
checkpoint as a no-release source and membership reference; an embeddings file gets capability only, with why
the other two are not computed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(path, seed):
    from cxr_relink.datamodules.text import build_tokenizer
    from cxr_relink.models.checkpoint import plain, save_extras
    from cxr_relink.models.dual_tower import DualTowerModule

    torch.manual_seed(seed)
    words = "left right small large pleural effusion no acute findings heart size normal tube tip".split()
    m = DualTowerModule(
        image_tower={"_target_": "cxr_relink.models.image_towers.SmallCNN", "in_channels": 1, "widths": [8, 16]},
        text_tower={"_target_": "cxr_relink.models.text_towers.BertTextEncoder", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                    "intermediate_size": 32, "max_position_embeddings": 256},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True}, embed_dim=8,
        tokenizer=build_tokenizer([" ".join(words[i % 7 : i % 7 + 6]) for i in range(60)], vocab_size=120))
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": plain(dict(m.hparams))}
    save_extras(m, ckpt)
    torch.save(ckpt, path)
    return path


def test_evaluate_audit_risk_end_to_end(cache_dir, tmp_path):
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate

    ckpt, pub = _tiny(tmp_path / "a.ckpt", 0), _tiny(tmp_path / "pub.ckpt", 1)
    out = tmp_path / "eval"
    scalars, _ = evaluate(compose("evaluate.yaml", [
        f"ckpt_path={ckpt}", "audit=risk", f"audit.risk.public_ckpt={pub}", "data.reader.num_patients=40",
        "data.reader.image_size=32", "data.image_size=32", "audit.relinkage.n_boot=20", "audit.risk.n_boot=50",
        "audit.risk.n_aux=10", "audit.risk.n_draws=5", "audit.risk.head.steps=10", "audit.risk.head.eval_every=5",
        "audit.risk.head.restarts=1", f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}",
        "trainer.enable_progress_bar=false"]))
    risk = json.loads((out / "audit.json").read_text())["risk"]
    ra, mem = risk["release_attributable"], risk["memorisation"]
    assert ra["n_draws"] == 5 and set(ra["no_release_sources"]) == {"raw", "public"}
    assert {a.split(":")[0] for a in ra["no_release_attackers"]} == {"raw", "public"}
    for d in ra["draws"]:  # each draw: best with minus best without, the bests taken over that draw's attacks
        assert d["with"] == max(d["attacks"]["with"].values()) and d["without"] == max(d["attacks"]["without"].values())
        assert d["difference"] == pytest.approx(d["with"] - d["without"])
    assert ra["value"] == pytest.approx(np.mean([d["difference"] for d in ra["draws"]]))
    assert mem["label_matched"] and mem["pool"] >= 2
    pm = mem["pair_membership"]
    assert pm["calibrated"] and pm["n_references"] == 1 and 0 <= pm["auc"] <= 1
    # Capability is the standard audit's number of the same run.
    assert scalars["risk/capability"] == pytest.approx(scalars[f"audit/i2t/R@1/N={risk['n']}"])
    assert {"risk/release_attributable", "risk/memorisation", "risk/membership/auc"} <= set(scalars)
    report = (out / "report.md").read_text()
    assert "## Capability, release-attributable, memorisation" in report and "release-attributable" in report.split("\n")[0]


def test_evaluate_audit_risk_on_embeddings_says_what_is_not_computed(tmp_path):
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate

    rng = np.random.default_rng(0)
    npz = tmp_path / "x.npz"
    np.savez(npz, image_emb=rng.normal(size=(30, 4)), report_emb=rng.normal(size=(30, 4)), study_id=np.arange(30),
             patient_id=np.arange(30) // 2)
    scalars, _ = evaluate(compose("evaluate.yaml", ["audit=risk", f"embeddings={npz}", "audit.relinkage.n_boot=20",
                                                     f"paths.output_dir={tmp_path}"]))
    risk = json.loads((tmp_path / "audit.json").read_text())["risk"]
    assert set(risk["not_computed"]) == {"release_attributable", "memorisation"}
    assert "embeddings file" in risk["not_computed"]["memorisation"]
    assert "risk/capability" in scalars and "risk/release_attributable" not in scalars
    report = (tmp_path / "report.md").read_text()
    assert "release-attributable not computed" in report and "memorisation not computed" in report
