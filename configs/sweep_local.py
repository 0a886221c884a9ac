"""W&B sweeps without a W&B account or server: a local controller for the same sweep files.

    python -m cxr_relink.configs.sweep_local configs/sweep/dual_tower.yaml --count 4 [key=value ...]

reads the sweep file `wandb sweep` reads, asks W&B's own sweep engine (the `sweeps` package, the
code behind W&B's server-side controller: grid, random and bayes search, the GP fitted to the runs
finished so far) for the next run, and runs it as `wandb agent` would: the file's `command`, with
wandb's own argument helpers, from the repository root, one run after the other. Each run is
offline (`logger.wandb.offline=true`, `WANDB_MODE=offline`: `wandb sync` can upload it later) and
writes to `<sweep dir>/<run id>/`; `key=value` arguments are appended to every run (tiny settings,
another cohort). After each run its value of the sweep's `metric` (the best value logged, as the
engine scores runs; read from a CSV logger the controller adds) is fed back to the engine, and
`<sweep dir>/sweep_table.md` is rewritten (callbacks/sweep_table.py: the swept values, the metric,
its 95% CI where the audit gives one, the status).

Without the optional `sweeps` package (it pins numpy<2, so the test set-up installs it with
--no-deps) grid and random search run from the in-repo equivalent below, and bayes search falls back
to random draws from the same distributions (said at start).

The in-repo equivalent (also what tests/sweep_sampler.py and tests/test_sweeps.py use): parameter
suggestion as the engine's `next_run` for grid and random search (it consumes `random.uniform(0, 1)`
once per parameter in sorted-name order and maps it through each parameter's quantile function, as
the engine does: with the same `random` state the two give the same values, checked bit for bit by
tests/test_sweeps.py), and the command line from wandb's own `create_sweep_command` /
`create_sweep_command_args`, assembled as `wandb.wandb_agent.Agent._command_run` does.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

# Parameter kinds this expander implements (the engine has more; an unknown one raises).
_CONSTANT, _CATEGORICAL, _INT_UNIFORM, _UNIFORM, _LOG_UNIFORM_VALUES, _Q_UNIFORM = (
    "constant", "categorical", "int_uniform", "uniform", "log_uniform_values", "q_uniform")


def load_sweep(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def _kind(name: str, spec: dict[str, Any]) -> str:
    if "value" in spec:
        return _CONSTANT
    if "values" in spec:
        if "probabilities" in spec:
            raise NotImplementedError(f"{name}: categorical with probabilities is not implemented here")
        return _CATEGORICAL
    dist = spec.get("distribution")
    if dist is None:  # the engine infers it from min/max types
        if isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
            return _INT_UNIFORM
        return _UNIFORM
    if dist in (_INT_UNIFORM, _UNIFORM, _LOG_UNIFORM_VALUES, _Q_UNIFORM):
        return dist
    raise NotImplementedError(f"{name}: distribution {dist!r} is not implemented here")


def _ppf(name: str, spec: dict[str, Any], u: float) -> Any:
    """Quantile function: u in [0, 1] -> a value of the parameter (the engine's conventions)."""
    kind = _kind(name, spec)
    if kind == _CONSTANT:
        return spec["value"]
    if kind == _CATEGORICAL:
        values = spec["values"]
        # scipy's randint.ppf(u, 0, n): the smallest k with (k + 1) / n >= u
        return values[max(0, min(len(values) - 1, math.ceil(u * len(values)) - 1))]
    if kind == _INT_UNIFORM:
        lo, hi = int(spec["min"]), int(spec["max"])
        return lo + max(0, min(hi - lo, math.ceil(u * (hi - lo + 1)) - 1))
    if kind == _UNIFORM:
        return spec["min"] + u * (spec["max"] - spec["min"])
    if kind == _Q_UNIFORM:
        q = spec.get("q", 1.0)
        v = round((spec["min"] + u * (spec["max"] - spec["min"])) / q) * q
        return int(v) if isinstance(q, int) else float(v)
    lo, hi = math.log(spec["min"]), math.log(spec["max"])  # log_uniform_values
    return float(np.exp(u * (hi - lo) + lo))  # numpy exp, as the engine (bit-equal values)


def random_suggestion(parameters: dict[str, Any], rng: random.Random | None = None) -> dict[str, Any]:
    """One random-search suggestion {name: value} (also bayes search's first suggestions)."""
    rng = rng or random
    return {name: _ppf(name, parameters[name], rng.uniform(0.0, 1.0)) for name in sorted(parameters)}


def grid_suggestions(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """Every grid point, in the engine's order (sorted names, the last name varying fastest)."""
    names = sorted(parameters)
    axes = []
    for name in names:
        spec, kind = parameters[name], _kind(name, parameters[name])
        if kind == _CONSTANT:
            axes.append([spec["value"]])
        elif kind == _CATEGORICAL:
            axes.append(list(spec["values"]))
        elif kind == _INT_UNIFORM:
            axes.append(list(range(int(spec["min"]), int(spec["max"]) + 1)))
        else:
            raise ValueError(f"{name}: grid search needs constant, categorical or int_uniform parameters")
    return [dict(zip(names, point)) for point in itertools.product(*axes)]


def suggestions(sweep: dict[str, Any], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first `n` suggestions of a sweep (grid: the first n grid points; random/bayes: n draws)."""
    method, params = sweep["method"], sweep["parameters"]
    if method == "grid":
        return grid_suggestions(params)[:n]
    if method in ("random", "bayes"):
        rng = random.Random(seed)
        return [random_suggestion(params, rng) for _ in range(n)]
    raise NotImplementedError(f"method {method!r}")


def as_served(values: dict[str, Any]) -> dict[str, Any]:
    """The values as the agent receives them: JSON from the server (numpy scalars become numbers)."""
    return json.loads(json.dumps(values, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def agent_command(sweep: dict[str, Any], values: dict[str, Any], interpreter: str = "python") -> list[str]:
    """The argv `wandb agent` runs for one suggestion (Agent._command_run, with wandb's own helpers)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    command = create_sweep_command(list(sweep.get("command") or []) or None)
    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in as_served(values).items()}})
    sweep_vars["interpreter"] = [interpreter]
    sweep_vars["program"] = [sweep["program"]]
    sweep_vars["env"] = ["/usr/bin/env"]
    argv: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += sweep_vars.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def hydra_overrides(sweep: dict[str, Any], argv: list[str]) -> list[str]:
    """The part of an agent argv that train.py's Hydra parses (after env, interpreter and program)."""
    i = argv.index(sweep["program"])
    return argv[i + 1 :]


# --------------------------------------------------------------------------- the local controller

METRICS_LOGGER = "sweep_metrics"  # the CSV logger the controller adds to each run (its metric history)


def local_command(sweep: dict[str, Any], values: dict[str, Any], run_dir: Path, extra: Sequence[str] = (),
                  interpreter: str | None = None) -> list[str]:
    """The agent's argv for ``values`` (agent_command), made local: W&B offline, the run in
    ``run_dir`` (the file's `hydra.run.dir`, which names the W&B sweep and run ids, is replaced), a
    CSV logger beside the others for the metric history, then ``extra`` overrides."""
    argv = agent_command(sweep, values, interpreter=interpreter or sys.executable)
    out = []
    for a in argv:
        if a.startswith("hydra.run.dir="):
            a = f"hydra.run.dir={run_dir}"
        elif a == "logger.wandb.offline=false":
            a = "logger.wandb.offline=true"
        out.append(a)
    if not any(a.startswith("hydra.run.dir=") for a in out):
        out.append(f"hydra.run.dir={run_dir}")
    # An extra override of a swept key replaces the swept value (Hydra would refuse or keep both).
    replaced = {e.split("=", 1)[0].lstrip("+~") for e in extra if "=" in e}
    out = [a for a in out if "=" not in a or a.split("=", 1)[0].lstrip("+~") not in replaced or a.startswith("hydra.run.dir=")]
    out += [f"+logger.{METRICS_LOGGER}._target_=lightning.pytorch.loggers.csv_logs.CSVLogger",
            f"+logger.{METRICS_LOGGER}.save_dir={run_dir}", f"+logger.{METRICS_LOGGER}.name={METRICS_LOGGER}",
            f"+logger.{METRICS_LOGGER}.version=''"]
    return out + list(extra)


def metric_history(run_dir: Path, metric: str) -> list[float]:
    """Every finite value of ``metric`` the run logged, in order (its CSV logger's metrics.csv)."""
    import csv

    path = Path(run_dir) / METRICS_LOGGER / "metrics.csv"
    if not path.exists():
        return []
    out = []
    with path.open() as f:
        for row in csv.DictReader(f):
            v = row.get(metric)
            if v not in (None, ""):
                x = float(v)
                if math.isfinite(x):
                    out.append(x)
    return out


def _engine():
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sweeps
        return sweeps
    except ImportError:
        return None


class LocalController:
    """Suggests runs of one sweep file, as W&B's controller does, from the runs finished so far."""

    def __init__(self, sweep: dict[str, Any], seed: int = 0, engine: Any = "auto") -> None:
        self.sweep = sweep
        self.engine = _engine() if engine == "auto" else engine
        self.runs: list[Any] = []  # the engine's SweepRun records (or plain dicts without it)
        self._rng = random.Random(seed)
        random.seed(seed)
        np.random.seed(seed)
        self._grid = grid_suggestions(sweep["parameters"]) if sweep["method"] == "grid" else None

    @property
    def method(self) -> str:
        if self.engine is None and self.sweep["method"] == "bayes":
            return "random (bayes needs the optional `sweeps` package)"
        return self.sweep["method"]

    def next(self) -> dict[str, Any] | None:
        """The next run's parameter values, or None when the sweep is exhausted (a grid)."""
        if self.engine is not None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = self.engine.next_run(self.sweep, self.runs, validate=True)
            return None if run is None else as_served({k: v["value"] for k, v in run.config.items()})
        if self._grid is not None:
            return self._grid[len(self.runs)] if len(self.runs) < len(self._grid) else None
        return as_served(random_suggestion(self.sweep["parameters"], self._rng))

    def record(self, name: str, values: dict[str, Any], history: list[float], ok: bool) -> None:
        """A finished (or failed) run and the metric values it logged, for the next suggestion."""
        metric = self.sweep.get("metric", {}).get("name")
        if self.engine is None:
            self.runs.append({"name": name, "config": values})
            return
        sw = self.engine
        state = sw.RunState.finished if ok else sw.RunState.failed
        summary = {metric: history[-1]} if metric and history else {}
        self.runs.append(sw.SweepRun(name=name, state=state, config={k: {"value": v} for k, v in values.items()},
                                     summary_metrics=summary, history=[{metric: v} for v in history] if metric else []))


def run_sweep(sweep_path: str | Path, count: int, extra: Sequence[str] = (), sweep_dir: str | Path | None = None,
              seed: int = 0, dry_run: bool = False, engine: Any = "auto", timeout: float | None = None) -> Path:
    """Run up to ``count`` suggested runs of ``sweep_path`` one after the other; returns the sweep dir
    (holding one folder per run and sweep_table.md)."""
    import json
    import logging
    import os
    import shlex
    import subprocess
    import time

    from cxr_relink.callbacks.sweep_table import JOB_FILE, TABLE_FILE, metric_ci, sweep_table
    from cxr_relink.configs import ROOT

    log = logging.getLogger("sweep_local")
    sweep = load_sweep(sweep_path)
    name = Path(sweep_path).stem
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    sweep_dir = Path(sweep_dir) if sweep_dir else ROOT / "logs" / "sweeps" / f"local-{name}-{stamp}"
    metric = sweep.get("metric", {}).get("name")
    goal = sweep.get("metric", {}).get("goal", "maximize")
    ctl = LocalController(sweep, seed=seed, engine=engine)
    log.info("local sweep of %s (%s search, engine: %s): up to %d runs into %s", sweep_path, ctl.method,
             "W&B's `sweeps`" if ctl.engine is not None else "in-repo sampler", count, sweep_dir)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for k in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # not an agent of a server's sweep
        env.pop(k, None)
    for i in range(count):
        values = ctl.next()
        if values is None:
            log.info("the sweep is exhausted after %d runs", i)
            break
        run_id = f"run{i:03d}"
        run_dir = sweep_dir / run_id
        argv = local_command(sweep, values, run_dir, extra)
        log.info("run %d/%d: %s", i + 1, count, shlex.join(argv))
        if dry_run:
            ctl.record(run_id, values, [], True)
            continue
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with (sweep_dir / f"{run_id}.out").open("w") as out:  # (train.py refuses a run folder with files in it)
            proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        ok = proc.returncode == 0
        history = metric_history(run_dir, metric) if metric else []
        best = (max if goal == "maximize" else min)(history) if history else None
        ctl.record(run_id, values, history, ok)
        swept = [f"{k}={v}" for k, v in values.items()]
        record = {"num": i, "overrides": swept, "metric": metric, "value": best,
                  "ci": metric_ci(run_dir, metric, best) if best is not None else None,
                  "status": "completed" if ok else f"failed (exit {proc.returncode}, see {run_id}.out)"}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / JOB_FILE).write_text(json.dumps(record) + "\n")
        (sweep_dir / TABLE_FILE).write_text(sweep_table(sweep_dir, goal))
        log.info("run %d: %s %s = %s", i + 1, record["status"], metric, "–" if best is None else f"{best:.4f}")
    table = sweep_dir / TABLE_FILE
    if table.exists():
        log.info("sweep results (%s):\n%s", table, table.read_text())
    return sweep_dir


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import logging

    ap = argparse.ArgumentParser(prog="python -m cxr_relink.configs.sweep_local", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="a W&B sweep file, e.g. configs/sweep/dual_tower.yaml")
    ap.add_argument("--count", type=int, default=1, help="runs to make (a grid stops when exhausted)")
    ap.add_argument("--sweep-dir", default=None, help="default logs/sweeps/local-<file>-<time>/")
    ap.add_argument("--seed", type=int, default=0, help="seeds the engine's random draws")
    ap.add_argument("--dry-run", action="store_true", help="print the command lines, run nothing")
    ap.add_argument("overrides", nargs="*", help="key=value Hydra overrides added to every run")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    run_sweep(args.sweep, args.count, args.overrides, args.sweep_dir, args.seed, args.dry_run)


if __name__ == "__main__":
    _main()
