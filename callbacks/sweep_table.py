"""Offline sweeps (Hydra multirun, no W&B server): one comparison table of the trials.

``python train.py -m model.optimizer.lr=3e-4,1e-3`` runs one job per combination, each in
``<sweep dir>/<job number>/``. This Hydra callback records, as each job ends, its overrides, its
status and the value main() returned (``optimized_metric``) in ``<job>/sweep_job.json`` (in the
job's own process, so any launcher works), then rewrites ``<sweep dir>/sweep_table.md`` from every
job recorded so far: the table exists while the sweep runs and after a job fails. At the end of the
sweep the table is also printed. Columns: the overrides that differ between jobs, the metric, the
status; the best row (by ``goal``) is marked. Single runs are left alone.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

JOB_FILE = "sweep_job.json"
TABLE_FILE = "sweep_table.md"


def _is_multirun(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN")


def sweep_table(sweep_dir: str | Path, goal: str = "maximize") -> str:
    """The Markdown table of the jobs recorded under ``sweep_dir`` (``*/sweep_job.json``)."""
    jobs = []
    for f in Path(sweep_dir).glob(f"*/{JOB_FILE}"):
        jobs.append(json.loads(f.read_text()))
    jobs.sort(key=lambda j: j["num"])
    if not jobs:
        return "(no finished jobs)\n"
    parsed = [dict(o.split("=", 1) for o in j["overrides"] if "=" in o) for j in jobs]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1] or keys
    metric = jobs[0]["metric"] or "returned value"
    values = [j["value"] if isinstance(j["value"], (int, float)) and math.isfinite(j["value"]) else None for j in jobs]
    scored = [v for v in values if v is not None]
    best = (max if goal == "maximize" else min)(scored) if scored else None
    lines = [f"| job | {' | '.join(varying)} | {metric} | status |", "|---:|" + "---|" * len(varying) + "---:|---|"]
    for j, p, v in zip(jobs, parsed, values):
        shown = "–" if v is None else f"{v:.4f}" + (" (best)" if v == best and len(scored) > 1 else "")
        lines.append(f"| {j['num']} | {' | '.join(p.get(k, '') for k in varying)} | {shown} | {j['status']} |")
    return "\n".join(lines) + "\n"


class SweepTable(Callback):
    """``goal``: maximize | minimize, which value is marked best (the default optimised metric,
    R@1 at N = 100, is a re-linkage rate: set goal=minimize when sweeping for privacy)."""

    def __init__(self, goal: str = "maximize") -> None:
        if goal not in ("maximize", "minimize"):
            raise ValueError(f"goal must be maximize or minimize, got {goal!r}")
        self.goal = goal

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        status = job_return.status.name.lower()
        value = job_return._return_value if status == "completed" else None  # (a failed job holds its error)
        record = {"num": int(config.hydra.job.num), "overrides": list(config.hydra.overrides.task),
                  "metric": OmegaConf.select(config, "optimized_metric", default=None),
                  "value": float(value) if isinstance(value, (int, float)) else None, "status": status}
        out = Path(config.hydra.runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / JOB_FILE).write_text(json.dumps(record) + "\n")
        sweep_dir = Path(config.hydra.sweep.dir)
        (sweep_dir / TABLE_FILE).write_text(sweep_table(sweep_dir, self.goal))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        table = Path(config.hydra.sweep.dir) / TABLE_FILE
        if table.exists():
            log.info("sweep results (%s):\n%s", table, table.read_text())
