"""experiments/report_quality_results.py: the style arms' evaluation composes on their training cohort (fast),
and one shrunk arm trains, evaluates, writes the table and is reused on a second call (seconds)."""

from __future__ import annotations

import pytest

import json

from experiments import report_quality_results as rqr
from experiments import reproduce as rp


def test_style_eval_sees_the_training_cohort(tmp_path) -> None:
    for style, train_mix in (("style_structured", None), ("style_mixed_train", 0.4)):
        ev = rp.compose_cfg("evaluate.yaml", ["ckpt_path=/x/last.ckpt", "audit=[standard,report_quality]",
                                               *rqr.STYLE_DATA[style]], tmp_path)
        tr = rp.compose_cfg("train.yaml", rqr.arm_train_overrides(f"{style}/bert", 0, tmp_path)[0], tmp_path)
        assert ev.data.reader.style_mix == tr.data.reader.style_mix
        assert ev.data.reader.train_style_mix == tr.data.reader.train_style_mix
        assert (ev.data.reader.train_style_mix or {}).get("structured") == train_mix
        assert ev.audit.report_quality is not None


@pytest.mark.slow
def test_one_arm_end_to_end_and_resume(tmp_path, cache_dir, monkeypatch) -> None:
    tiny = dict(rp.SCALES["tiny"], patients=60, n_boot=5, probe_boot=5, probe_train=64)
    monkeypatch.setitem(rp.SCALES, "tiny", tiny)
    path = rqr.main(["--scale", "tiny", "--arms", "bert", "--out", str(tmp_path)])
    row = json.loads(path.read_text())["arms"]["bert"]
    assert "error" not in row, row.get("error")
    s = row["summary"]
    assert 0.0 <= s["green_exact"] <= 1.0 and s["same_labels_report"] is not None and s["relink_r1"] is not None
    assert "GREEN-exact" in (tmp_path / "tiny" / "report_quality.md").read_text()
    again = json.loads(rqr.main(["--scale", "tiny", "--arms", "bert", "--out", str(tmp_path)]).read_text())["arms"]["bert"]
    assert again["reused"] and again["summary"] == s and again["train_seconds"] == row["train_seconds"]
