"""Offline sweeps (Hydra multirun, no W&B server): one comparison table of the trials.

``python train.py -m model.optimizer.lr=3e-4,1e-3`` runs one job per combination, each in
``<sweep dir>/<job number>/``. This Hydra callback records, as each job ends, its overrides, its
status and the value main() returned (``optimized_metric``) in ``<job>/sweep_job.json`` (in the
job's own process, so any launcher works), then rewrites ``<sweep dir>/sweep_table.md`` from every
job recorded so far: the table exists while the sweep runs and after a job fails. At the end of the
sweep the table is also printed. Columns: the overrides that differ between jobs, the metric, the
status; the best row (by ``goal``) is marked and carries its 95% CI where the run's audit gives one
(an audit metric: the patient-bootstrap CI of the epoch whose value is reported; ``metric_ci``), with
the rows inside that CI named under the table: a best row whose CI holds another row's value is not
a clear winner. Single runs are left alone. configs/sweep_local.py writes the same table for a W&B
sweep file run locally.
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


def _cis(res: dict[str, Any]) -> dict[str, list[float]]:
    """{scalar name (audit.result.scalars): its 95% CI} for the names an audit gives a CI."""
    out: dict[str, list[float]] = {}
    for key, sec in (res.get("relinkage") or {}).items():
        for row in sec.get("recall", []):
            base = f"audit/{key}/R@{row['k']}/N={row['n']}"
            if row.get("ci"):
                out[base] = row["ci"]
            if row.get("x_chance_ci"):
                out[base + "/x_chance"] = row["x_chance_ci"]
    probe = res.get("probe") or {}
    if probe.get("macro_auroc_ci"):
        out["probe/macro_auroc"] = probe["macro_auroc_ci"]
    return out


def _values(res: dict[str, Any]) -> dict[str, float]:
    from cxr_relink.audit.result import scalars

    try:
        return scalars(res)
    except Exception:  # noqa: BLE001  (a partial result: no value to match)
        return {}


def metric_ci(run_dir: str | Path, metric: str | None, value: float | None = None) -> list[float] | None:
    """The 95% CI of ``metric`` for a run: from the validation audit JSONs the run wrote
    (``<run>/**/audit/val_*_epoch=*.json``), the epoch whose value equals ``value`` (the one the table
    shows; the latest such epoch), else the latest epoch that has the metric. None for a metric no
    audit gives a CI (val/loss)."""
    if not metric:
        return None
    found = None
    for f in sorted(Path(run_dir).glob("**/audit/val_*_epoch=*.json"), key=lambda p: p.name.rsplit("=", 1)[-1]):
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        ci = _cis(res).get(metric)
        if ci is None:
            continue
        v = _values(res).get(metric)
        if value is None or (v is not None and math.isclose(v, value, rel_tol=1e-6, abs_tol=1e-9)):
            found = ci
        elif found is None and value is None:
            found = ci
    return [float(c) for c in found] if found else None


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
    cis = [j.get("ci") if v is not None else None for j, v in zip(jobs, values)]
    with_ci = any(cis)
    head = f"| job | {' | '.join(varying)} | {metric} |" + (" 95% CI |" if with_ci else "") + " status |"
    lines = [head, "|---:|" + "---|" * len(varying) + "---:|" + ("---|" if with_ci else "") + "---|"]
    best_row = None
    for j, p, v, ci in zip(jobs, parsed, values, cis):
        is_best = v is not None and v == best and len(scored) > 1
        best_row = (j, v, ci) if is_best and best_row is None else best_row
        shown = "–" if v is None else f"{v:.4f}" + (" (best)" if is_best else "")
        ci_cell = (f" [{ci[0]:.4f}, {ci[1]:.4f}] |" if ci else " – |") if with_ci else ""
        lines.append(f"| {j['num']} | {' | '.join(p.get(k, '') for k in varying)} | {shown} |{ci_cell} {j['status']} |")
    if best_row is not None:
        j, v, ci = best_row
        if ci:
            inside = [str(o["num"]) for o, ov in zip(jobs, values) if o is not j and ov is not None and ci[0] <= ov <= ci[1]]
            lines += ["", f"Best: job {j['num']}, {metric} {v:.4f} (95% CI [{ci[0]:.4f}, {ci[1]:.4f}], the run's own "
                      "patient bootstrap)" + (f"; job(s) {', '.join(inside)} lie inside that CI: not separated from "
                                             "the best at this sample size." if inside else "; no other job inside it.")]
        else:
            lines += ["", f"Best: job {j['num']}, {metric} {v:.4f} (no CI: {metric} is not an audit value with a "
                      "bootstrap CI; compare seeds before trusting a small difference)."]
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
        record["ci"] = metric_ci(out, record["metric"], record["value"]) if record["value"] is not None else None
        (out / JOB_FILE).write_text(json.dumps(record) + "\n")
        sweep_dir = Path(config.hydra.sweep.dir)
        (sweep_dir / TABLE_FILE).write_text(sweep_table(sweep_dir, self.goal))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        table = Path(config.hydra.sweep.dir) / TABLE_FILE
        if table.exists():
            log.info("sweep results (%s):\n%s", table, table.read_text())
