"""W&B sweeps, offline: every sweep file is expanded exactly as `wandb agent` would run it, and every
generated command line must land in the composed Hydra config (and run, for one of them).

No W&B server is reachable here, so: the parameter suggestions come from tests/sweep_sampler.py
(checked equal to the `sweeps` engine's `next_run` when that optional package is installed; it pins
numpy<2, so it is not a requirement) and the command line from wandb's own
`create_sweep_command` / `create_sweep_command_args`.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from tests.conftest import CONFIG_DIR, ROOT, TINY, compose_config
from tests.sweep_sampler import agent_command, as_served, grid_suggestions, hydra_overrides, load_sweep, suggestions

SWEEP_DIR = Path(CONFIG_DIR) / "sweep"
SWEEPS = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
# W&B's parameter-name pattern (sweeps/config/schema.json).
PARAM_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]*$"
# What the agent's environment holds (wandb_agent.Agent sets these before running the command).
AGENT_ENV = {"WANDB_SWEEP_ID": "sweep0test", "WANDB_RUN_ID": "run0test"}
FAKE_CKPT = "/nonexistent/stage2/last.ckpt"  # the DP sweep reads its backbone from the environment


@pytest.fixture(autouse=True)
def agent_env(monkeypatch, cache_dir):
    for k, v in {**AGENT_ENV, "CXR_RELINK_BACKBONE_CKPT": FAKE_CKPT}.items():
        monkeypatch.setenv(k, v)


def compose_overrides(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose train.yaml as the CLI would (tests/conftest.py); the hydra node is in HydraConfig."""
    return compose_config("train.yaml", overrides, output_dir)


def hydra_node():
    return HydraConfig.get()


# A val split with >= 100 studies, so that audit/i2t/R@1/N=100 exists (pools larger than the split
# are clipped away: on a smaller split the sweep metric is never logged), and a test split with
# hard negatives for the final audit.
RUN_EXTRAS = ("data.reader.num_patients=120", "data.reader.split_fractions=[0.35,0.5,0.15]",
              "trainer.limit_val_batches=null", "trainer.limit_train_batches=2",
              "callbacks.linear_probe.n_boot=10", "callbacks.linear_probe.max_train_samples=256",
              "callbacks.relinkage_audit.n_boot=20", "final_audit=false")


def tiny_extras(swept: set[str], *extra: str) -> list[str]:
    """TINY settings for the keys the sweep does not set (`++`: add or override), then `extra`."""
    return ["++" + o for o in TINY if o.split("=", 1)[0] not in swept] + list(RUN_EXTRAS) + list(extra)


def expected_value(served) -> object:
    """What Hydra should make of `key=<str(value)>`, parsed independently (YAML + env interpolation)."""
    s = str(served)
    if s.startswith("${oc.env:") and s.endswith("}"):
        return os.environ[s[len("${oc.env:") : -1]]
    return yaml.safe_load(s)


def assert_landed(cfg: DictConfig, values: dict, choices=None) -> None:
    """Every swept value is in the composed config (groups: in the choices Hydra recorded)."""
    choices = hydra_node().runtime.choices if choices is None else choices
    for key, value in as_served(values).items():
        if key in choices:  # a config group (model=llm_encoder, experiment=dp_alignment)
            assert choices[key] == value, f"group {key}: chose {choices[key]!r}, sweep said {value!r}"
            continue
        got = OmegaConf.select(cfg, key, throw_on_missing=True)
        if isinstance(got, (DictConfig, ListConfig)):
            got = OmegaConf.to_container(got, resolve=True)
        want = expected_value(value)
        assert got == want and type(got) is type(want), f"{key}: composed {got!r}, sweep said {value!r} ({want!r})"


# --------------------------------------------------------------------------- the files themselves


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_is_an_agent_ready_hydra_sweep(name) -> None:
    sweep = load_sweep(SWEEP_DIR / f"{name}.yaml")
    assert sweep["program"] == "train.py" and sweep["method"] in ("grid", "random", "bayes")
    cmd = [str(c) for c in sweep["command"]]
    assert cmd[:3] == ["${env}", "${interpreter}", "${program}"] and cmd[-1] == "${args_no_hyphens}"
    assert "logger.wandb.offline=false" in cmd, "an agent run must report online to its sweep"
    assert sweep["metric"]["goal"] in ("minimize", "maximize")
    import re

    for key, spec in sweep["parameters"].items():
        assert re.match(PARAM_NAME, key), f"{key}: not a valid W&B parameter name"
        for v in [spec.get("value", "")] + list(spec.get("values", [])):
            # A YAML null reaches Hydra as the string "None": nulls must be written "null".
            assert v is not None, f"{key}: write null as the string \"null\""


@pytest.mark.parametrize("name", SWEEPS)
def test_every_suggestion_lands_in_the_composed_config(name, tmp_path) -> None:
    sweep = load_sweep(SWEEP_DIR / f"{name}.yaml")
    points = grid_suggestions(sweep["parameters"]) if sweep["method"] == "grid" else suggestions(sweep, 6, seed=1)
    if len(points) > 8:  # a grid: its corners and a few between (every axis value appears)
        points = points[:: max(1, len(points) // 6)] + [points[-1]]
    for values in points:
        argv = agent_command(sweep, values)
        assert argv[:3] == ["/usr/bin/env", "python", "train.py"]
        cfg = compose_overrides(hydra_overrides(sweep, argv), tmp_path)
        assert_landed(cfg, values)
        assert cfg.logger.wandb.offline is False
        run_dir = Path(hydra_node().run.dir)
        assert run_dir.parts[-2:] == (AGENT_ENV["WANDB_SWEEP_ID"], AGENT_ENV["WANDB_RUN_ID"])
        # the metric the sweep optimises is the one main() returns unless the experiment says otherwise
        assert sweep["metric"]["name"] in (cfg.optimized_metric, "probe/macro_auroc")


# Swept model keys that act in training, not in the built model: each lands in the composed config
# (above) and is used by configure_optimizers.
TRAINING_TIME = ("model.optimizer.", "model.scheduler.")
# Sweeps whose model cannot be built from the embedded default alone, and where their keys are checked.
NOT_BUILT = {"dp_alignment": "needs a stage-2 checkpoint; its keys act in DP training "
                             "(test_dp_sweep_point_trains_in_process)"}


def _two_values(spec: dict) -> list:
    if "values" in spec:
        return list(spec["values"])[:2]
    if "min" in spec and spec["min"] != spec["max"]:
        return [spec["min"], spec["max"]]
    return []


def _built_state(cfg: DictConfig, tokenizer) -> dict:
    import torch
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in instantiate(cfg.model, tokenizer=tokenizer).state_dict().items()}


@pytest.mark.parametrize("name", SWEEPS)
def test_every_swept_model_key_changes_the_built_model(name, tmp_path) -> None:
    """A swept key that changes nothing wastes the sweep (LoRA settings on a tower that has no LoRA):
    the model is built at two values of each swept model key, same seed, and must differ."""
    import torch
    from hydra.utils import instantiate

    if name in NOT_BUILT:
        pytest.skip(NOT_BUILT[name])
    sweep = load_sweep(SWEEP_DIR / f"{name}.yaml")
    base = {k: v["value"] for k, v in sweep["parameters"].items() if "value" in v}
    cfg = compose_overrides(hydra_overrides(sweep, agent_command(sweep, base)) + TINY, tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    swept = [k for k, v in sweep["parameters"].items() if k.startswith("model.") and not k.startswith(TRAINING_TIME)
             and _two_values(v)]
    assert swept, "no swept model key to check"
    for key in swept:
        states = []
        for value in _two_values(sweep["parameters"][key]):
            argv = agent_command(sweep, {**base, key: value})
            states.append(_built_state(compose_overrides(hydra_overrides(sweep, argv) + TINY, tmp_path), dm.tokenizer))
        a, b = states
        same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
        assert not same, f"{key}: the model built at {_two_values(sweep['parameters'][key])} is the same"


# --------------------------------------------------------------------------- equality with the engine


def engine():
    sweeps = pytest.importorskip("sweeps", reason="optional: the W&B sweeps engine (pins numpy<2)")
    warnings.filterwarnings("ignore", module="pydantic")
    return sweeps


@pytest.mark.parametrize("name", SWEEPS)
@pytest.mark.slow
def test_in_repo_sampler_equals_the_sweeps_engine(name) -> None:
    sw = engine()
    sweep = load_sweep(SWEEP_DIR / f"{name}.yaml")
    sw.next_run({**sweep, "method": "random"}, [], validate=True)  # first call initialises the engine
    from tests.sweep_sampler import random_suggestion

    for seed in range(20):  # random search: the same draws -> the same values, bit for bit
        random.seed(seed)
        run = sw.next_run({**sweep, "method": "random"}, [], validate=True)
        random.seed(seed)
        assert as_served({k: v["value"] for k, v in run.config.items()}) == random_suggestion(sweep["parameters"])
    if sweep["method"] == "grid":  # grid: the same points in the same order, then exhausted
        runs = []
        while (run := sw.next_run(sweep, runs, validate=True)) is not None:
            run.state = sw.RunState.finished
            runs.append(run)
        assert [as_served({k: v["value"] for k, v in r.config.items()}) for r in runs] == grid_suggestions(sweep["parameters"])


@pytest.mark.parametrize("name", SWEEPS)
def test_engine_suggestions_after_finished_runs_land(name, tmp_path) -> None:
    """The engine's own next suggestion (bayes fits a GP to these) composes into the config."""
    sw = engine()
    sweep = load_sweep(SWEEP_DIR / f"{name}.yaml")
    metric = sweep["metric"]["name"]
    runs = []
    for i, values in enumerate(suggestions(sweep, 4, seed=2)):
        runs.append(sw.SweepRun(name=f"r{i}", state=sw.RunState.finished, config={k: {"value": v} for k, v in values.items()},
                                summary_metrics={metric: 0.1 * (i + 1)}, history=[{metric: 0.05 * (i + 1)}, {metric: 0.1 * (i + 1)}]))
    random.seed(0)
    import numpy as np

    np.random.seed(0)
    run = sw.next_run(sweep, runs, validate=True)
    values = as_served({k: v["value"] for k, v in run.config.items()})
    cfg = compose_overrides(hydra_overrides(sweep, agent_command(sweep, values)), tmp_path)
    assert_landed(cfg, values)


# --------------------------------------------------------------------------- runs


def read_wandb_log(path: Path) -> list:
    """The records of an offline W&B run's transaction log (run-<id>.wandb; wandb 0.31 ships no Python
    reader): a 7-byte header, then 32 KiB blocks of chunks (crc32 u32, length u16, kind u8: 1 full,
    2 first, 3 middle, 4 last), each record a wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        pytest.skip(f"unknown W&B log format {data[:7]!r}")
    pos, block, records, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory, cache_dir):
    """The exact argv an agent runs for one dual-tower suggestion (interpreter = this Python), in the
    agent's environment (sweep id, run id, the sweep-parameter file wandb.init reads), W&B offline."""
    from wandb.sdk.lib import config_util

    tmp_path = tmp_path_factory.mktemp("agent")
    sweep = load_sweep(SWEEP_DIR / "dual_tower.yaml")
    values = {**suggestions(sweep, 1, seed=4)[0], "data.batch_size": 16, "trainer.max_epochs": 1}
    argv = agent_command(sweep, values, interpreter=sys.executable)
    argv += tiny_extras(set(values), f"paths.log_dir={tmp_path}", "final_audit=true", "~callbacks.linear_probe")
    param_path = tmp_path / "wandb" / "sweep-param.yaml"
    config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in as_served(values).items()})
    env = {**os.environ, **AGENT_ENV, "WANDB_SWEEP_PARAM_PATH": str(param_path), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "CXR_RELINK_CACHE": str(cache_dir)}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "sweeps" / AGENT_ENV["WANDB_SWEEP_ID"] / AGENT_ENV["WANDB_RUN_ID"]
    logs = list((run_dir / "wandb").glob(f"offline-run-*-{AGENT_ENV['WANDB_RUN_ID']}/run-*.wandb"))
    assert len(logs) == 1, "one W&B run, with the agent's run id"
    return sweep, values, run_dir, read_wandb_log(logs[0])


@pytest.mark.slow
def test_agent_command_line_runs_train_py(agent_run) -> None:
    sweep, values, run_dir, records = agent_run
    composed = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert_landed(composed, values, choices=OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices)
    # W&B: the agent's run and sweep, the sweep's locked keys, and our own copy under the cfg prefix.
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.sweep_id) == (AGENT_ENV["WANDB_RUN_ID"], AGENT_ENV["WANDB_SWEEP_ID"])
    locked = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert {k: locked[k] for k in values} == as_served(values)
    ours = {_item_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
            for i in r.config.update}
    assert ours["cfg"]["model"]["optimizer"]["lr"] == values["model.optimizer.lr"]
    assert not set(ours) & set(values), "our config keys must not collide with the sweep's"
    summary = {_item_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert math.isfinite(summary[sweep["metric"]["name"]])
    assert any(r.WhichOneof("record_type") == "exit" for r in records), "the W&B run was finished"
    # The final audit's files are in the W&B run as copies: links to absolute paths broke when the
    # run folder was copied or moved.
    attached = [p for p in run_dir.glob("wandb/offline-run-*/files/final_audit/*")]
    assert sorted(p.name for p in attached) == ["audit.json", "report.md"]
    assert not any(p.is_symlink() for p in attached)
    assert all(p.read_bytes() == (run_dir / "final_audit" / p.name).read_bytes() for p in attached)


def test_sweep_metric_history_is_validation_only(agent_run) -> None:
    """The engine scores a run by the best value in the metric's history: the final test-split audit
    (final_audit=true here) must log under its own test/ names, never into this history."""
    sweep, values, run_dir, records = agent_run
    name = sweep["metric"]["name"]
    history = [json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "history"
               for i in r.history.item if _item_key(i) == name]
    val = [R for f in sorted((run_dir / "audit").glob("val_relinkage_epoch=*.json"))
           for R in [json.loads(f.read_text())] if R["meta"]["split"] == "val"]
    want = [next(r["value"] for r in res["relinkage"]["i2t"]["recall"] if r["k"] == 1 and r["n"] == "100") for res in val]
    assert want and history == pytest.approx(want, rel=1e-6)
    tests = [_item_key(i) for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item
             if _item_key(i).startswith("test/audit/i2t/R@1/")]  # (N=100 only when the test split is that large)
    assert tests, "the final audit's test-split value is logged under test/"


@pytest.mark.slow
def test_dp_sweep_point_trains_in_process(agent_run, tmp_path, monkeypatch) -> None:
    """A DP grid point through train() on the agent run's checkpoint: it lands, trains privately and
    produces the metric the DP sweep optimises (main() returns cfg.optimized_metric)."""
    from train import train

    ckpt = agent_run[2] / "checkpoints" / "last.ckpt"
    monkeypatch.setenv("CXR_RELINK_BACKBONE_CKPT", str(ckpt))
    sweep = load_sweep(SWEEP_DIR / "dp_alignment.yaml")
    values = {**grid_suggestions(sweep["parameters"])[-1], "trainer.max_epochs": 1}
    overrides = hydra_overrides(sweep, agent_command(sweep, values))
    overrides.remove("logger.wandb.offline=false")
    overrides += tiny_extras(set(values), "logger=csv", "trainer.check_val_every_n_epoch=1", "model.loss.bank_size=32",
                             "public_cohort.reader.num_patients=20", "callbacks.relinkage_audit.hardneg=false")
    cfg = compose_overrides(overrides, tmp_path)
    assert_landed(cfg, values)
    assert cfg.model.backbone_ckpt == str(ckpt)
    metrics, objects = train(cfg)
    assert math.isfinite(metrics[sweep["metric"]["name"]])
    assert 0 < metrics["dp/epsilon"] <= values["model.dp.target_epsilon"] and metrics["dp/guarantee_valid"] == 1.0


# --------------------------------------------------------------------------- offline sweeps


@pytest.mark.slow
def test_offline_multirun_sweep_writes_a_comparison_table(tmp_path, cache_dir, monkeypatch) -> None:
    """Two tiny trials with no W&B server (docs/sweeps.md, "Offline"): Hydra multirun, one folder per
    trial, and <sweep dir>/sweep_table.md comparing them (values checked against each trial's own
    metrics.csv)."""
    import csv

    for k in AGENT_ENV:  # not an agent run
        monkeypatch.delenv(k, raising=False)
    sweep_dir = tmp_path / "sweep"
    argv = [sys.executable, "train.py", "-m", f"hydra.sweep.dir={sweep_dir}", "model.optimizer.lr=1e-3,3e-3",
            "optimized_metric=val/loss", "optimized_goal=minimize", "logger=csv", "final_audit=false",
            "~callbacks.linear_probe", "trainer.max_epochs=1", *[o for o in TINY if not o.startswith("trainer.max_epochs")]]
    env = {**os.environ, "WANDB_MODE": "offline", "CXR_RELINK_CACHE": str(cache_dir)}
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    table = (sweep_dir / "sweep_table.md").read_text()
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:] if line.startswith("|")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("0", "0.001"), ("1", "0.003")]
    losses = []
    for job in ("0", "1"):
        logged = [r["val/loss"] for r in csv.DictReader((sweep_dir / job / "csv" / "metrics.csv").open()) if r.get("val/loss")]
        losses.append(float(logged[-1]))
    for r, loss in zip(rows, losses):
        assert r[2].strip().split()[0] == f"{loss:.4f}" and r[3].strip() == "completed"
    best = min(range(2), key=lambda i: losses[i])
    assert [("(best)" in r[2]) for r in rows] == [i == best for i in range(2)]
    # val/loss has no bootstrap CI: the table says so under the best row instead of showing one
    assert f"Best: job {best}, val/loss {losses[best]:.4f} (no CI" in table
    assert "sweep results" in p.stdout + p.stderr
