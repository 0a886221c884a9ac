"""Expand a W&B sweep file offline, as `wandb sweep` + `wandb agent` would (no W&B server needed).

Two halves, mirroring where W&B does the work:
- parameter suggestion (server side, the `sweeps` engine's `next_run`): an in-repo equivalent for
  grid and random search, and for bayes search's suggestions before any run has finished (random
  draws from the same distributions). It consumes `random.uniform(0, 1)` once per parameter in
  sorted-name order and maps it through each parameter's quantile function, as the engine does, so
  with the same `random` state the two give the same values (tests/test_sweeps.py checks this when
  the optional `sweeps` package is installed; it pins numpy<2, so it is not a requirement).
- the command line (client side, `wandb agent`): wandb's own `create_sweep_command` and
  `create_sweep_command_args`, assembled as `wandb.wandb_agent.Agent._command_run` does.

    python -m tests.sweep_sampler configs/sweep/dual_tower.yaml -n 3     # print 3 agent command lines
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

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


def _main() -> None:
    import argparse
    import shlex

    ap = argparse.ArgumentParser(description="print the command lines a W&B agent would run for a sweep file")
    ap.add_argument("sweep")
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sweep = load_sweep(args.sweep)
    for values in suggestions(sweep, args.n, args.seed):
        print(shlex.join(agent_command(sweep, values)))


if __name__ == "__main__":
    _main()
