"""The documented offline path for W&B sweep files (docs/sweeps.md): `python -m cxr_relink.configs.sweep_local`
suggests runs with W&B's own engine from the same sweep yaml and runs train.py with each; and the
sweep table's best row carries its 95% CI (issue #29)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cxr_relink.audit import result as R
from cxr_relink.callbacks.sweep_table import JOB_FILE, metric_ci, sweep_table
from tests.conftest import CONFIG_DIR, ROOT, compose_config

SWEEP_DIR = Path(CONFIG_DIR) / "sweep"


def _engine():
    import warnings

    sw = pytest.importorskip("sweeps", reason="optional: the W&B sweeps engine (pins numpy<2)")
    warnings.filterwarnings("ignore", module="pydantic")
    return sw


@pytest.mark.slow
def test_grid_suggestions_follow_the_engine_and_stop_when_exhausted() -> None:
    """dp_alignment.yaml is a grid: the controller's suggestions, fed back as finished runs, are the
    engine's grid in order (the in-repo grid as the independent reference), then None."""
    from cxr_relink.configs.sweep_local import LocalController, as_served, grid_suggestions, load_sweep

    sweep = load_sweep(SWEEP_DIR / "dp_alignment.yaml")
    want = [as_served(p) for p in grid_suggestions(sweep["parameters"])]
    for engine in ("auto", None):
        ctl = LocalController(sweep, engine=engine)
        got = []
        while (values := ctl.next()) is not None:
            got.append(values)
            ctl.record(f"r{len(got)}", values, [0.5], True)
            assert len(got) <= len(want)
        assert got == want


def test_bayes_suggestion_uses_the_finished_runs_and_lands_in_the_config(tmp_path, monkeypatch) -> None:
    """dual_tower.yaml is bayes: after three finished runs with their metric history the engine's
    next suggestion stays in the parameter space, and the local command line composes it into the
    config with W&B offline and the run in the given folder; an extra override replaces a swept key."""
    _engine()
    from cxr_relink.configs.sweep_local import LocalController, load_sweep, local_command

    sweep = load_sweep(SWEEP_DIR / "dual_tower.yaml")
    ctl = LocalController(sweep, seed=3)
    for i in range(3):
        values = ctl.next()
        ctl.record(f"r{i}", values, [0.01 * (i + 1), 0.02 * (i + 1)], True)
    assert len(ctl.runs) == 3 and ctl.runs[-1].history[-1] == {sweep["metric"]["name"]: 0.06}
    values = ctl.next()
    p = sweep["parameters"]
    assert p["model.optimizer.lr"]["min"] <= values["model.optimizer.lr"] <= p["model.optimizer.lr"]["max"]
    assert values["data.batch_size"] in p["data.batch_size"]["values"] and values["model"] == "llm_encoder"
    run_dir = tmp_path / "sweep" / "run003"
    argv = local_command(sweep, values, run_dir, ["trainer.max_epochs=1"], interpreter="python")
    assert argv[:3] == ["/usr/bin/env", "python", "train.py"]
    assert sum(a.startswith("trainer.max_epochs=") for a in argv) == 1 and argv[-1] == "trainer.max_epochs=1"
    for k in ("WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    cfg = compose_config("train.yaml", argv[3:], tmp_path)
    from hydra.core.hydra_config import HydraConfig

    assert HydraConfig.get().run.dir == str(run_dir)
    assert cfg.logger.wandb.offline is True and cfg.trainer.max_epochs == 1
    assert cfg.model.optimizer.lr == values["model.optimizer.lr"] and cfg.data.batch_size == values["data.batch_size"]
    assert cfg.logger.sweep_metrics.save_dir == str(run_dir)


def _audit_json(path: Path, value: float, ci: list[float]) -> None:
    row = {"k": 1, "n": "100", "n_value": 100, "value": value, "chance": 0.01, "x_chance": value / 0.01,
           "ci": ci, "x_chance_ci": [c / 0.01 for c in ci], "effective_pool_mean": 100.0, "frac_queries_pool_below_n": 0.0}
    sec = {"direction": "i2t", "variant": "plain", "n_queries": 100, "n_candidates": 100, "ties_policy": "pessimistic",
           "ties": {"n_queries_with_ties": 0}, "rank": {"mrr": 0.2, "median_rank": 9}, "recall": [row], "clipped_n": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    R.write_result(R.build_result(relinkage={"i2t": sec}, meta={"split": "val"}), path)


def test_best_row_carries_its_ci_from_the_runs_audit(tmp_path) -> None:
    """Three jobs with validation audit JSONs: the best job's CI is that of the epoch whose value the
    table shows (not the last epoch's), and the jobs inside it are named."""
    metric = "audit/i2t/R@1/N=100"
    runs = {0: [(0.10, [0.05, 0.15])], 1: [(0.14, [0.09, 0.19]), (0.12, [0.08, 0.16])], 2: [(0.05, [0.02, 0.08])]}
    for num, epochs in runs.items():
        job = tmp_path / str(num)
        for e, (v, ci) in enumerate(epochs):
            _audit_json(job / "csv" / "audit" / f"val_relinkage_epoch={e:03d}.json", v, ci)
        value = max(v for v, _ in epochs)
        rec = {"num": num, "overrides": [f"model.optimizer.lr={num}"], "metric": metric, "value": value,
               "ci": metric_ci(job, metric, value), "status": "completed"}
        (job / JOB_FILE).write_text(json.dumps(rec))
    table = sweep_table(tmp_path, "maximize")
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    assert [[c.strip() for c in r] for r in rows] == [
        ["0", "0", "0.1000", "[0.0500, 0.1500]", "completed"],
        ["1", "1", "0.1400 (best)", "[0.0900, 0.1900]", "completed"],
        ["2", "2", "0.0500", "[0.0200, 0.0800]", "completed"]]
    assert "Best: job 1, audit/i2t/R@1/N=100 0.1400 (95% CI [0.0900, 0.1900]" in table
    assert "job(s) 0 lie inside that CI" in table
    assert metric_ci(tmp_path / "0", "val/loss", 1.0) is None


@pytest.mark.slow
def test_local_sweep_runs_train_py_end_to_end(tmp_path, cache_dir) -> None:
    """The command docs/sweeps.md gives, with a count of 2 and tiny settings: two runs of train.py,
    each with its suggestion, and sweep_table.md whose values and CIs are each run's own validation
    audit (read back from its JSON)."""
    sweep_dir = tmp_path / "sweep"
    tiny = ["data.batch_size=16", "trainer.max_epochs=1", "data.reader.num_patients=120",
            "data.reader.split_fractions=[0.35,0.5,0.15]", "data.reader.image_size=32", "data.image_size=32",
            "trainer.limit_val_batches=null", "trainer.limit_train_batches=2", "callbacks.relinkage_audit.n_boot=20",
            "final_audit=false", "~callbacks.linear_probe", "trainer.enable_progress_bar=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SWEEP") and k != "WANDB_RUN_ID"}
    p = subprocess.run([sys.executable, "-m", "cxr_relink.configs.sweep_local", "configs/sweep/dual_tower.yaml", "--count", "2",
                        "--sweep-dir", str(sweep_dir), *tiny], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**env, "CXR_RELINK_CACHE": str(cache_dir)})
    assert p.returncode == 0, p.stderr[-3000:]
    table = (sweep_dir / "sweep_table.md").read_text()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| job")]
    assert [r[0] for r in rows] == ["0", "1"] and all(r[-1] == "completed" for r in rows)
    for r, run in zip(rows, ("run000", "run001")):
        composed = OmegaConf.load(sweep_dir / run / ".hydra" / "config.yaml")
        choices = OmegaConf.load(sweep_dir / run / ".hydra" / "hydra.yaml").hydra.runtime.choices
        assert composed.logger.wandb.offline is True and choices.model == "llm_encoder"
        (f,) = sorted((sweep_dir / run).glob("**/audit/val_relinkage_epoch=*.json"))
        row = next(x for x in json.loads(f.read_text())["relinkage"]["i2t"]["recall"] if x["k"] == 1 and x["n"] == "100")
        assert r[-3].split()[0] == f"{row['value']:.4f}"
        assert r[-2] == f"[{row['ci'][0]:.4f}, {row['ci'][1]:.4f}]"
        assert list((sweep_dir / run / "wandb").glob("offline-run-*")), "an offline W&B run per suggestion"
    assert table.count("(best)") == 1 and "Best: job" in table
    assert math.isfinite(json.loads((sweep_dir / "run000" / JOB_FILE).read_text())["value"])
