"""Reproduction table of both papers on the synthetic cohort: one command -> RESULTS.md (+ plots).

    python -m experiments.reproduce --scale tiny                 # a pipeline check (tests/test_reproduce.py runs it; time: docs/results.md)
    python -m experiments.reproduce --scale small --seeds 5      # 600 patients at 64 px, ~1 h per seed
    python -m experiments.reproduce --scale full --seeds 5 --resume   # the configs' defaults, ~2.5 h per seed
    python -m experiments.reproduce --scale paper --seeds 5 --resume --results RESULTS.md   # see below
    python -m experiments.reproduce --scale paper --seeds 5 --render-only --results RESULTS.md  # kept seeds only
Writes <out>/<scale>/RESULTS.md, RESULTS_claims.png, runs.json and every run under <out>/<scale>/runs/
(--out defaults to logs/reproduce; --results puts RESULTS.md elsewhere, e.g. the repository root). One
progress line per run goes to stdout (name, seed, seconds, headline number).

Scale `paper` decides the claims at the papers' pool sizes: the default training data (1,200 patients,
128 px, the default epochs) with a MIMIC-like label structure (data.reader.label_profile=mimic) and
4,500 extra test-only patients (~12,400 test studies: N = 100 / 1,000 / 10,000 / full are all real
pools), the external cohort's test split enlarged the same way (1,000 extra patients).

Kept seeds (resuming across sessions): every finished run's audit JSON and record is copied to --keep
(default experiments/results/<scale>/s<seed>/ for scale paper, committed) as soon as it finishes; the
seed's runs.json says whether the seed is complete and under which protocol (PROTOCOL). `--resume`
loads complete kept seeds of this protocol instead of running them and re-runs the rest (runs still in
<out> are reused). A kept seed of an older protocol, or one with runs that were "not available" and can
run now, is moved to <keep>/protocol<v>/ or <keep>/superseded/ (logged) and re-run: runs of different
protocols are never mixed in one seed. Without --resume the script refuses to start when --keep holds
any requested seed. `--render-only` writes RESULTS.md from the kept seeds alone (partial seeds flagged;
older-protocol seeds in <keep>/protocol<v>/ only in a labelled appendix, never in a verdict).

Every number comes from `train.train()` / `evaluate.evaluate()` on configs composed from configs/
(the row names its overrides) and is read back from the audit JSON they write
(`<run>/final_audit/audit.json`: test split, best checkpoint; evaluate.py's `audit.json`). Claims
(issue 7; the statistics are experiments/verdict.py's, the protocol is in its docstring):
  1. re-linkage rises with clinical specialisation: generic text tower < bert_encoder < llm_encoder
     (with stage-1 adaptation). "Generic" offline = experiment=generic_text (a text tower frozen at
     random init: its weights never see a report; see that file). Recipe level: paired log ratios.
  2. R@1 as a multiple of chance at N = 100, 1,000, 10,000 (those the test split allows) and the full
     DB. Per released model: every run's one-sided 95% bootstrap lower bound above 1.
  3. the signal persists under pathology-matched hard negatives (per released model, as 2).
  4. DP on the heads (valid loss modes, the paper's epsilon) cuts R@1 at N = 10,000 by X% while macro
     AUROC moves by Y points, read twice: DP fine-tunes the trained stage-2 heads (head_init=stage2) and
     DP trains fresh heads (head_init=fresh), each against the model before DP and against its
     non-private control; AUROC by non-inferiority (margin verdict.AUROC_MARGIN). 4b: transfer to
     synthcxr_external without retraining (per released model). 4c: the adaptive adversary
     (evaluate.py audit=adaptive) against the non-private and the DP models.
  5. style robustness when abbreviation-heavy impression-only reports join training (non-inferiority,
     margin verdict.STYLE_MARGIN on the R@1 ratio).
Where a stage cannot be run here, its rows say "not available: <reason>"; a run that fails says
"failed: <error>".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_relink.configs import ROOT  # also sets CXR_RELINK_ROOT
from experiments import verdict as V

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

log = logging.getLogger("reproduce")

# The plan's version, recorded in every kept seed's runs.json. 1: before issue #22 (DP fine-tuned the
# stage-2 heads only; no fresh-head DP, no non-private fresh-head control, no adaptive adversary; audit
# JSONs with two-sided 95% bootstrap intervals only). 2: issue #22's plan (this file).
PROTOCOL = 2
PROTOCOL_NOTE = {
    1: "before issue #22: DP fine-tuned the stage-2 heads only, no fresh-head DP, no non-private fresh-head "
       "control, no adaptive adversary; the audit JSONs carry two-sided 95% bootstrap intervals only",
}

# --------------------------------------------------------------------------- scales

# Keys: patients (internal cohort), ext_patients (synthcxr_external: DP public bank + transfer test),
# image (px), epochs (stage 2), train_batches (per epoch, None = all), stage1_epochs, dp_epochs,
# dp_batch, n_boot (re-linkage), probe_boot. None = the config's own default.
SCALES: dict[str, dict[str, Any]] = {
    "tiny": dict(patients=260, ext_patients=120, image=32, epochs=1, train_batches=3, stage1_epochs=1, dp_epochs=2,
                 dp_batch=32, batch=32, n_boot=30, probe_boot=10, probe_train=256, directions="[i2t]"),
    "small": dict(patients=600, ext_patients=300, image=64, epochs=3, train_batches=None, stage1_epochs=2, dp_epochs=5,
                  dp_batch=64, batch=64, n_boot=200, probe_boot=100, probe_train=2000, directions=None),
    "full": dict(patients=None, ext_patients=None, image=None, epochs=None, train_batches=None, stage1_epochs=None,
                 dp_epochs=None, dp_batch=None, batch=None, n_boot=None, probe_boot=None, probe_train=None, directions=None),
    "paper": dict(patients=None, ext_patients=None, image=None, epochs=None, train_batches=None, stage1_epochs=None,
                  dp_epochs=None, dp_batch=None, batch=None, n_boot=None, probe_boot=None, probe_train=None, directions=None,
                  test_patients=4500, ext_test_patients=1000, label_profile="mimic"),
}
# What a scale's verdicts can and cannot say (RESULTS.md's header).
SCALE_CAVEAT = {
    "tiny": "Tiny and small scales are far below the papers' data and training budgets: read their verdicts as a "
            "smoke test of the pipeline, not as evidence about the papers.",
    "paper": "Scale `paper` reaches the papers' pool sizes (test split of ~12,400 studies: N = 100, 1,000, 10,000 and "
             "the full database are real pools) with a label structure fitted to real labeler output, but trains "
             "0.9 M-parameter towers on ~2,200 synthetic studies for a few CPU epochs: its verdicts are about this "
             "pipeline on this cohort, not a replication of the papers' models or data.",
}
# Keep-state across sessions: scales whose finished seeds are kept by default (experiments/results/<scale>).
KEEP_BY_DEFAULT = ("paper",)
# Wall time on 2 CPU cores shared with other jobs, per seed. tiny: measured (docs/results.md). small: one
# bert_encoder stage-2 run measured at 4.5 min; ~11 runs per seed (LLM runs heavier). full: the default
# `python train.py` is sized at ~10 min; ~9 stage-1/2 runs per seed plus DP and evaluations.
RUNTIME_NOTE = {"tiny": "7.7 min wall, 431 CPU-s per seed (measured 2026-12-07 beside another job, docs/results.md)", "small": "~1 h per seed (estimate)",
                "full": "~2.5 h per seed (estimate)", "paper": "32–43 min per seed under protocol 2 (measured 2026-12-05 on 2 Intel Xeon cores); issue #28's completion of a kept seed re-trains stages 1–2 and adds three short runs"}


def _kv(key: str, value: Any) -> list[str]:
    return [] if value is None else [f"{key}={value}"]


def scale_overrides(scale: dict[str, Any], kind: str) -> list[str]:
    """Hydra overrides that size a run: kind = stage2 | stage1 | dp | evaluate (external cohort) | audit
    (evaluate.py on the internal cohort)."""
    s = scale
    ov = ["trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]
    if kind not in ("evaluate", "audit"):
        ov += ["logger=csv"]
    if kind == "evaluate":
        ov = ["data=synthcxr_external", *_kv("data.reader.num_patients", s["ext_patients"])]
        ov += _kv("data.reader.test_patients", s.get("ext_test_patients"))
    else:  # stage1 / stage2 / dp, and "audit": evaluate.py on the internal cohort's test split
        ov += _kv("data.reader.num_patients", s["patients"]) + _kv("data.reader.test_patients", s.get("test_patients"))
    ov += _kv("data.reader.label_profile", s.get("label_profile"))
    ov += _kv("data.reader.image_size", s["image"]) + _kv("data.image_size", s["image"])
    if kind == "stage2":
        ov += _kv("trainer.max_epochs", s["epochs"]) + _kv("trainer.limit_train_batches", s["train_batches"])
        ov += _kv("data.batch_size", s["batch"])
    if kind == "stage1":
        ov += _kv("trainer.max_epochs", s["stage1_epochs"]) + _kv("trainer.limit_train_batches", s["train_batches"])
    if kind == "dp":
        ov += _kv("trainer.max_epochs", s["dp_epochs"]) + _kv("data.batch_size", s["dp_batch"])
        ov += _kv("public_cohort.reader.num_patients", s["ext_patients"])
        ov += _kv("public_cohort.reader.label_profile", s.get("label_profile"))
        if s["dp_epochs"] is not None:
            ov += [f"trainer.check_val_every_n_epoch={max(1, s['dp_epochs'])}"]
    if kind in ("stage2", "dp"):
        ov += _kv("callbacks.relinkage_audit.n_boot", s["n_boot"]) + _kv("callbacks.linear_probe.n_boot", s["probe_boot"])
        ov += _kv("callbacks.linear_probe.max_train_samples", s["probe_train"])
        ov += _kv("callbacks.relinkage_audit.directions", s["directions"])
    if kind in ("evaluate", "audit"):
        ov += _kv("audit.relinkage.n_boot", s["n_boot"]) + _kv("audit.relinkage.directions", s["directions"])
    if kind == "evaluate":  # audit=all's probe (the adaptive audit has none)
        ov += _kv("audit.probe.n_boot", s["probe_boot"]) + _kv("audit.probe.max_train_samples", s["probe_train"])
    return ov


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    name: str
    entry: str  # train | evaluate
    overrides: list[str]  # the claim's own overrides (named in RESULTS.md)
    sizing: list[str]  # the scale's overrides
    out: Path
    result: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return f"python {self.entry}.py " + " ".join(self.overrides)

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoints" / "last.ckpt"


def compose_cfg(config_name: str, overrides: list[str], out: Path):
    from omegaconf import open_dict

    from cxr_relink.configs import compose

    cfg = compose(config_name, overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def audit_json_path(run: Run) -> Path:
    return run.out / ("final_audit/audit.json" if run.entry == "train" else "audit.json")


def is_stage1(run: Run) -> bool:
    return "experiment=text_adapt" in run.overrides


def done(run: Run) -> bool:
    """A finished run's output: stage 1 its exported tower, stage 2/3 the audit JSON and checkpoint."""
    if is_stage1(run):
        return (run.out / "text_tower_hf").exists()
    return audit_json_path(run).exists() and (run.entry == "evaluate" or run.ckpt.exists())


def headline(run: Run) -> str:
    """The one number a progress line shows for a finished run."""
    if run.error:
        return run.error
    if is_stage1(run):
        return "text tower exported"
    res = run.result
    n = headline_n(res)
    if res and res.get("adaptive"):
        best = [(r["value"], a) for a in ADAPTIVE_ATTACKS if (r := Reproduction.adaptive_row(res, a, n))]
        if best:
            v, a = max(best)
            return f"strongest attack {a}: R@1 at N={n} {100 * v:.2f}%"
    row = recall(res, n=n)
    if not row:
        return "no R@1 in the audit JSON"
    eps = dp_record(run).get("epsilon_spent")
    return (f"R@1 at N={n} {100 * row['value']:.2f}% ({row['x_chance']:.2f}x chance)"
            + (f", eps {eps:.3f}" if eps is not None else ""))


def same_audit(old: dict | None, new: dict | None) -> str:
    """How a re-run's audit compares with the kept one: image->report R@K at every N, and the probe AUROC."""
    a = {(r["k"], str(r["n"])): r["value"] for r in ((old or {}).get("relinkage") or {}).get("i2t", {}).get("recall", [])}
    b = {(r["k"], str(r["n"])): r["value"] for r in ((new or {}).get("relinkage") or {}).get("i2t", {}).get("recall", [])}
    if not a or a.keys() != b.keys():
        return "not comparable (different R@K rows)"
    d = max(abs(a[key] - b[key]) for key in a)
    pa, pb = probe_row(old), probe_row(new)
    dp = abs(pa["value"] - pb["value"]) if pa and pb else 0.0
    n = headline_n(old)
    return (("identical" if max(d, dp) < 1e-9 else "DIFFERENT") + f" (largest R@K difference over {len(a)} rows {d:.1e}, "
            f"probe AUROC {dp:.1e}; R@1 at N={n}: {100 * a[(1, n)]:.4f}% kept, {100 * b[(1, n)]:.4f}% re-run)")


def per_patient_cell(recs: list[dict]) -> str:
    """The per-patient reading of a table row's DP records: "= the unit" for patient units; for study units the
    group-privacy (eps, delta) of the worst seed where its delta is below 1/#patients (records before issue #28
    carry no `meaningful` flag: the same rule, with the public bound on N for #patients), else none."""
    if all(r.get("privacy_unit") == "patient" for r in recs):
        return "= per unit"
    pps = [r.get("per_patient") for r in recs]
    if any(pp is None for pp in pps):
        return "not stated"

    def meaningful(r: dict) -> bool:
        pp = r["per_patient"]
        if "meaningful" in pp:
            return bool(pp["meaningful"])
        bound = r.get("n_train_units") or r.get("n_train_units_upper")
        return pp["delta"] < 1 and (not bound or pp["delta"] < 1.0 / bound)

    worst = max(recs, key=lambda r: r["per_patient"]["delta"])
    if not all(meaningful(r) for r in recs):
        return f"none meaningful (k = {worst['per_patient']['k']}: δ {worst['per_patient']['delta']:.2g} ≥ 1/#patients)"
    pp = worst["per_patient"]
    return f"ε {pp['epsilon']:.2f}, δ {pp['delta']:.1e} (k = {pp['k']})"


def dp_record(run: Run | None) -> dict:
    """The DP record of a run's audit JSON (empty for a non-private run): the one home of ε, kept with
    the audit JSON, where a reused run's metrics are not."""
    rec = ((run.result or {}).get("privacy") or {}) if run else {}
    return rec if rec.get("enabled") else {}


def progress(run: Run, seed: int, how: str = "") -> None:
    """One line per run on stdout (flushed; readable in a log file or a non-tty pipe)."""
    print(f"[reproduce] {time.strftime('%H:%M:%S')} {run.name:<38} seed {seed}  {run.seconds:6.0f} s  "
          f"{how}{headline(run)}", flush=True)


def execute(run: Run, resume: bool) -> Run:
    """train()/evaluate() on the composed config; the result is the audit JSON they write."""
    from cxr_relink.audit.result import load_result

    path = audit_json_path(run)
    if resume and done(run):
        run.result = None if is_stage1(run) else load_result(path)
        log.info("%s: reused %s", run.name, run.out)
        run.extra["reused"] = True
        return run
    t0 = time.time()
    try:
        run.out.mkdir(parents=True, exist_ok=True)
        cfg = compose_cfg(f"{run.entry}.yaml", run.overrides + run.sizing, run.out)
        if run.entry == "train":
            from train import train

            metrics, _ = train(cfg)
        else:
            from cxr_relink.evaluation import evaluate

            metrics, _ = evaluate(cfg)
        run.extra["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, float)}
        if path.exists():
            run.result = load_result(path)
        elif not is_stage1(run):
            raise FileNotFoundError(f"{path} was not written")
    except Exception as e:  # noqa: BLE001 -- recorded in RESULTS.md, the other claims still run
        run.error = f"failed: {type(e).__name__}: {e}".splitlines()[0][:300]
        log.error("%s failed:\n%s", run.name, traceback.format_exc())
    run.seconds = time.time() - t0
    return run


def availability() -> dict[str, str | None]:
    """None when a stage can run, else the reason it cannot (its rows then say "not available: <reason>")."""
    out: dict[str, str | None] = {}
    for stage, mods, cfgs in (("llm", ("cxr_relink.models.llm_encoder", "cxr_relink.models.text_adapt"), ("model/llm_encoder", "experiment/text_adapt")),
                              ("dp", ("cxr_relink.models.dp.module", "cxr_relink.models.dp.features"), ("experiment/dp_alignment",)),
                              ("adaptive", ("cxr_relink.audit.adaptive",), ("audit/adaptive",))):
        reason = None
        for c in cfgs:
            if not (ROOT / "configs" / f"{c}.yaml").exists():
                reason = f"configs/{c}.yaml does not exist"
        for m in mods:
            try:
                __import__(m)
            except Exception as e:  # noqa: BLE001
                reason = reason or f"import {m} failed ({type(e).__name__}: {e})"
        out[stage] = reason
    # Fresh projection heads for stage 3 (issue #22): the DP settings must offer head_init.
    if out["dp"] is None:
        from cxr_relink.models.dp.plan import DP_DEFAULTS

        out["dp_fresh"] = None if "head_init" in DP_DEFAULTS else "models/dp/plan.py's DP settings have no head_init"
    else:
        out["dp_fresh"] = out["dp"]
    return out


# --------------------------------------------------------------------------- reading audit results


def recall(res: dict | None, key: str = "i2t", k: int = 1, n: str = "100") -> dict | None:
    if not res or key not in res.get("relinkage", {}):
        return None
    for row in res["relinkage"][key]["recall"]:
        if row["k"] == k and str(row["n"]) == str(n):
            return row
    return None


def pool_sizes(res: dict | None, key: str = "i2t") -> list[str]:
    """The N labels a result holds, by increasing pool size ("full" last)."""
    if not res or key not in res.get("relinkage", {}):
        return []
    rows = sorted({(r["n_value"], str(r["n"])) for r in res["relinkage"][key]["recall"]}, key=lambda t: (t[1] == "full", t[0]))
    return [n for _, n in rows]


def probe_row(res: dict | None) -> dict | None:
    """Macro AUROC of a result's linear probe, as a row that `stat` reads."""
    probe = (res or {}).get("probe")
    if not probe or probe.get("macro_auroc") is None:
        return None
    return {"value": probe["macro_auroc"], "ci": probe.get("macro_auroc_ci")}


def headline_n(res: dict | None) -> str:
    """N = 100 where the split allows it, else the full database."""
    return "100" if recall(res, n="100") else "full"




def rows_of(results: list[dict | None], key: str = "i2t", n: str = "100") -> list[dict | None]:
    return [recall(r, key, n=n) for r in results]


def values(rows: list[dict | None], key: str = "value") -> list[float | None]:
    return [None if r is None else r.get(key) for r in rows]


def x_high(rows: list[dict | None]) -> float | None:
    """× chance's range ends at 1 / chance (R@1 = 1): N / K, or the effective pool / K."""
    ch = [r["chance"] for r in rows if r and r.get("chance")]
    return 1.0 / min(ch) if ch else None


# --------------------------------------------------------------------------- formatting


def _iv(o: V.OverSeeds | None, scale: float = 1.0, digits: int = 2) -> str:
    """Centre over seeds and its interval (inside the parameter's range; see verdict.over_seeds)."""
    if o is None:
        return "–"
    c = f"{scale * o.center:.{digits}f}"
    if o.lo is None:
        return c + " (one seed)"
    return f"{c} [{scale * o.lo:.{digits}f}, {scale * o.hi:.{digits}f}]"


def _run_cell(row: dict | None, key: str = "x_chance", scale: float = 1.0, digits: int = 2) -> str:
    """One run: value and its one-sided 95% bootstrap lower bound (* = conservative 97.5% bound of an
    older audit JSON)."""
    if not row or row.get(key) is None:
        return "–"
    lb, exact = V.run_bound(row, key)
    return f"{scale * row[key]:.{digits}f}" + ("" if lb is None else f" (≥ {scale * lb:.{digits}f}{'' if exact else '*'})")


def ratio_text(p: V.Paired | None, what: str = "ratio") -> str:
    if p is None:
        return "no seed has both values"
    per = ", ".join(f"s{s} {r:.3f}" for s, r in zip(p.seeds, p.ratios))
    t = f"{what} {p.ratio:.3f} (geometric mean over {p.n} seed{'s' if p.n != 1 else ''}: {per})"
    if p.lb is not None and not p.sd:
        # Every seed gives the same ratio: no sampling spread to test against (a fact of the runs, e.g. of
        # construction); a t-bound and a "detects beyond x1.000" would only restate it.
        t += "; the same on every seed (no spread over seeds: nothing to test)"
    elif p.lb is not None:
        t += (f"; one-sided 95% bounds ≥ {p.lb:.3f} and ≤ {p.ub:.3f}; SD of the log ratio over seeds {p.sd:.3f}, "
              f"so {p.n} seeds detect (80% power) a ratio beyond ×{p.mde:.3f} or below ×{1 / p.mde:.3f}")
    if p.dropped:
        t += f"; seeds without both values: {p.dropped}"
    return t


def drop_text(d: V.PairedDiff | None, margin: float, scale: float = 100.0, unit: str = "points") -> str:
    """A "no drop beyond the margin" comparison, stated as the question is one-sided: the drop
    (before − after, paired by seed) and its one-sided 95% upper bound against the margin."""
    if d is None:
        return "no seed has both values"
    # (0.0 - x: a zero drop prints as 0.00, not -0.00)
    per = ", ".join(f"s{s} {0.0 - scale * x:.2f}" for s, x in zip(d.seeds, d.diffs))
    t = f"drop {0.0 - scale * d.mean:.2f} {unit} (mean over {d.n} seed{'s' if d.n != 1 else ''}: {per})"
    if d.lb is not None:
        t += (f"; one-sided 95% upper bound of the drop {0.0 - scale * d.lb:.2f} {unit} (margin {scale * margin:.0f}); "
              f"SD {scale * d.sd:.2f}, smallest detectable shift (80% power) {scale * d.mde:.2f} {unit}")
    return t


def combine(*verdicts: str) -> str:
    """A claim made of parts holds when every part holds; otherwise it takes the first part that is not
    available, contradicted, not decided or not shown, in that order."""
    for word in ("not available", "contradicted", "not decided", "not shown"):
        for v in verdicts:
            if v.startswith(word):
                return v
    return "holds"


# --------------------------------------------------------------------------- the experiment plan

TOWERS = (("generic", "generic text tower (frozen at random init)"), ("bert", "bert_encoder"),
          ("llm", "llm_encoder + stage-1 adaptation"))
# Claim 4's arms: (tag, title, head_init, loss mode, private). The stage-2 arms are stage 3 as it was
# (DP fine-tunes the trained stage-2 heads); the fresh arms train new heads under DP (issue #22).
# Issue #28 adds the patient-unit arms (data.privacy_unit=patient: all studies of a patient are one DP unit, the
# hospital's unit) beside the study-unit ones at the same target epsilon, with their own non-private control.
DP_ARMS = (
    ("nonprivate", "non-private, stage-2 heads", "stage2", "public_negatives", False, "study"),
    ("dp_public_negatives", "DP public negatives, stage-2 heads", "stage2", "public_negatives", True, "study"),
    ("dp_group_clipping", "DP group clipping, stage-2 heads", "stage2", "group_clipping", True, "study"),
    ("nonprivate_fresh", "non-private, fresh heads (control)", "fresh", "public_negatives", False, "study"),
    ("dp_fresh_public_negatives", "DP public negatives, fresh heads", "fresh", "public_negatives", True, "study"),
    ("dp_fresh_group_clipping", "DP group clipping, fresh heads", "fresh", "group_clipping", True, "study"),
    ("nonprivate_fresh_patient", "non-private, fresh heads, patient units (control)", "fresh", "public_negatives", False,
     "patient"),
    ("dp_fresh_public_negatives_patient", "DP public negatives, fresh heads, patient units", "fresh", "public_negatives",
     True, "patient"),
)
# The model before DP, re-audited through the DP stage's own pipeline with its heads unchanged (non-private,
# learning rate 0): its linear probe is fitted where every DP arm's is, on the public cohort (issue #28). The
# stage-2 run's own final audit fits its probe on the private train split: not comparable with the DP arms.
BEFORE_DP = ("before_dp", "before DP (stage 2), public-cohort probe")
DP_TITLE = {t: title for t, title, *_ in DP_ARMS} | {"base": "before DP (stage 2)", BEFORE_DP[0]: BEFORE_DP[1]}
# Claim 4's readings: (summary label, title, DP arm, its non-private control, head_init, the run whose R@1 is "before
# DP": the stage-2 model the arm was trained from -- the kept stage-2 run for the arms kept with it; for the arms
# issue #28 added to a kept seed, the re-trained stage-2 model, re-audited as before_dp: stage 2 is not bit-for-bit
# reproducible on a CPU, and the re-trained model's audit against the kept one is stated beside the table).
READINGS = (("4", "stage-2 heads", "dp_public_negatives", "nonprivate", "stage2", "base"),
            ("4f", "fresh heads", "dp_fresh_public_negatives", "nonprivate_fresh", "fresh", "base"),
            ("4p", "fresh heads, patient units", "dp_fresh_public_negatives_patient", "nonprivate_fresh_patient", "fresh",
             BEFORE_DP[0]))
# The one probe protocol of every claim-4 arm (stated in every table that shows an AUROC).
PROBE_PROTOCOL = ("linear probe fitted on the public cohort's train split (synthcxr_external: no DP unit, the same "
                  "images for every arm, at most `max_train_samples` of them), scored on the private test split")
EXTERNAL = ("base", "dp_public_negatives", "dp_group_clipping", "dp_fresh_public_negatives", "dp_fresh_group_clipping")
# 4c: the models attacked, the attacks read (each on its own), and the attacker's auxiliary data: every
# study pair of the training split ("leaked", distribution-matched: the strongest set configs/audit/adaptive
# offers; one set keeps the audit to 4 re-linkage passes per model).
ADAPTIVE = ("base", "dp_public_negatives", "dp_fresh_public_negatives")
ADAPTIVE_ATTACKS = ("cosine", "ridge", "procrustes", "head")
# The attacks fitted on the frozen trunk's features (audit/adaptive.py): head-only DP cannot change them. Cosine
# and Procrustes read the released (head) embeddings.
TRUNK_ATTACKS = ("ridge", "head")
ADAPTIVE_AUX = ("leaked", "all")
ADAPTIVE_OVERRIDES = ("audit.adaptive.aux=[leaked]", "audit.adaptive.n_aux=[all]")


class Reproduction:
    def __init__(self, scale: str, seeds: list[int], out: Path, resume: bool, epsilon: float, keep: Path | None = None):
        self.scale_name, self.scale = scale, SCALES[scale]
        self.seeds, self.out, self.resume, self.epsilon = seeds, out, resume, epsilon
        self.keep = keep
        self.avail = availability()
        self.runs: dict[str, Run] = {}
        self.aliases: set[str] = set()  # names that point at another run (not listed twice)
        self.kept: dict[int, str] = {}  # seed -> "complete" | "partial" (rendered from --keep)
        self.old: dict[tuple[int, int], Path] = {}  # (protocol, seed) -> kept folder of an older protocol
        self.n_ran = 0  # runs executed by this invocation
        self._records: dict[int, dict[str, dict]] = {}  # seed -> run name -> its kept record (recorded())
        # Completing a complete kept seed whose plan has grown (complete_kept): its kept runs, and those re-run
        # only because a new run needs their checkpoint (kept files hold audit JSONs, not checkpoints).
        self.kept_runs: dict[str, Run] = {}
        self.rebuild: set[str] = set()
        self.completing: set[int] = set()
        self.rebuilt_check: dict[str, str] = {}  # run name -> how its re-run's audit compares with the kept one

    # ------------------------------------------------------------------ running

    def run(self, name: str, entry: str, overrides: list[str], kind: str, seed: int) -> Run:
        if self.use_kept(name, seed):
            return self.runs[name]
        r = Run(name, entry, overrides, scale_overrides(self.scale, kind), self.out / "runs" / name)
        self.runs[name] = execute(r, self.resume)
        kept = self.kept_runs.get(name)
        if kept is not None:  # re-run only for its checkpoint (complete_kept): the kept record and audit stay
            kept.extra["rebuilt"] = (f"re-run failed: {r.error}" if r.error else same_audit(kept.result, r.result)
                                     if kept.result is not None else "re-run for its output (no audit to compare)")
            self.rebuilt_check[name] = kept.extra["rebuilt"]
            print(f"[reproduce] {name}: re-run for its checkpoint; against the kept audit: {kept.extra['rebuilt']}",
                  flush=True)
            self.runs[name] = kept  # same folder (Run.out is named by the run): its checkpoint serves the new runs
            self.keep_progress(seed)
            return kept
        self.n_ran += 0 if r.extra.get("reused") else 1
        if r.extra.get("reused"):  # its run time as recorded when it ran (a partial kept seed's record)
            rec = self.recorded(seed, name)
            if rec:  # and the metrics recorded then (the run folder's audit JSON holds only the audit)
                r.seconds, r.extra = rec["seconds"], {**(rec.get("extra") or {}), **r.extra}
        progress(r, seed, "reused: " if r.extra.get("reused") else "")
        self.keep_progress(seed)
        return r

    def recorded(self, seed: int, name: str) -> dict | None:
        """A run's record in the kept seed as it was before this invocation (read once per seed:
        keep_progress rewrites runs.json after every run, keeping only the runs made so far)."""
        if seed not in self._records:
            self._records[seed] = {x["name"]: x for x in (self.manifest(seed) or {}).get("runs", [])}
        return self._records[seed].get(name)

    def skip(self, name: str, why: str, seed: int, needs: str | None = None) -> Run:
        r = Run(name, "train", [], [], self.out / "runs" / name, error=f"not available: {why}",
                extra={"needs": needs} if needs else {})
        self.runs[name] = r
        progress(r, seed)
        return r

    # ------------------------------------------------------------------ kept seeds (resume across sessions)

    def kept_dir(self, s: int) -> Path | None:
        return None if self.keep is None else self.keep / f"s{s}"

    def manifest(self, s: int) -> dict | None:
        d = self.kept_dir(s)
        if d is None or not (d / "runs.json").exists():
            return None
        return json.loads((d / "runs.json").read_text())

    def stale(self, man: dict) -> str | None:
        """Why a kept seed must not be rendered next to this protocol's runs (None: it may)."""
        v = man.get("protocol", 1)
        if v != PROTOCOL:
            return f"kept under protocol {v} ({PROTOCOL_NOTE.get(v, 'unknown')}); this is protocol {PROTOCOL}"
        now = [r["name"] for r in man["runs"] if (r.get("extra") or {}).get("needs")
               and self.avail.get(r["extra"]["needs"]) is None]
        if now:
            return f"runs that were not available then can run now: {', '.join(now)}"
        return None

    def set_aside(self, s: int, why: str) -> None:
        """Move a stale kept seed out of the way (never overwritten): <keep>/protocol<v>/s<s> for an older
        protocol, <keep>/superseded/<UTC time>/s<s> otherwise."""
        d = self.kept_dir(s)
        v = (self.manifest(s) or {}).get("protocol", 1)
        dest = (self.keep / f"protocol{v}" / f"s{s}") if v != PROTOCOL else \
            (self.keep / "superseded" / time.strftime("%Y%m%dT%H%M%S", time.gmtime()) / f"s{s}")
        if dest.exists():
            dest = dest.with_name(f"{dest.name}_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(d), str(dest))
        log.warning("seed %d: the kept seed in %s is %s: moved to %s and re-run", s, d, why, dest)
        print(f"[reproduce] seed {s}: kept seed set aside to {dest} ({why}); re-running it", flush=True)

    def load_kept(self, s: int, partial: bool = False) -> bool:
        """Load seed ``s`` from --keep if it is kept under this protocol (complete, or any with ``partial``)."""
        from cxr_relink.audit.result import load_result

        man = self.manifest(s)
        if man is None or self.stale(man) or not (man.get("complete") or partial):
            return False
        d = self.kept_dir(s)
        for rec in man["runs"]:
            r = Run(rec["name"], rec["entry"], rec["overrides"], rec["sizing"], self.out / "runs" / rec["name"],
                    error=rec["error"], seconds=rec["seconds"], extra=rec.get("extra", {}))
            if rec.get("audit_json"):
                r.result = load_result(d / rec["audit_json"])
                kept = (d / rec["audit_json"]).resolve()
                r.extra["kept_json"] = str(kept.relative_to(ROOT) if kept.is_relative_to(ROOT) else kept)
            self.runs[r.name] = r
        for alias, target in man["aliases"].items():
            self.runs[alias] = self.runs[target]
            self.aliases.add(alias)
        self.kept[s] = "complete" if man.get("complete") else "partial"
        print(f"[reproduce] seed {s}: {len(man['runs'])} kept runs loaded from {d} ({self.kept[s]})", flush=True)
        return True

    def find_old(self) -> None:
        """Kept seeds of older protocols (<keep>/protocol<v>/s<n>, or <keep>/s<n> itself) for the appendix."""
        if self.keep is None:
            return
        for p in sorted(self.keep.glob("protocol*/s*/runs.json")) + sorted(self.keep.glob("s*/runs.json")):
            man = json.loads(p.read_text())
            v = man.get("protocol", 1)
            if v != PROTOCOL:
                self.old[(v, int(p.parent.name[1:]))] = p.parent

    def keep_progress(self, s: int, complete: bool = False) -> None:
        """Copy seed ``s``'s finished runs (audit JSONs and records) into --keep; ``complete`` once every run
        of the seed has finished without failing (a failed run is retried by the next --resume)."""
        if self.keep is None:
            return
        names = [n for n in self.runs if n.endswith(f"/s{s}") and n not in self.aliases]
        # A complete seed being completed (complete_kept) stays complete while its new runs are added: an
        # interruption leaves it complete with fewer new runs, which the next --resume completes again.
        complete = complete or s in self.completing
        d = self.kept_dir(s)
        d.mkdir(parents=True, exist_ok=True)
        recs = []
        for n in names:
            r = self.runs[n]
            rec = {"name": n, "entry": r.entry, "overrides": [o.replace(str(self.out), "<out>") for o in r.overrides],
                   "sizing": r.sizing, "error": r.error, "seconds": round(r.seconds, 1),
                   "extra": {k: v for k, v in r.extra.items() if k not in ("reused", "kept_json")}, "audit_json": None}
            if r.result is not None:
                rec["audit_json"] = n.replace("/", "__") + ".json"
                if not (d / rec["audit_json"]).exists() or not r.extra.get("kept_json"):
                    # local paths (evaluate.py records its ckpt_path) as <out>, like the commands
                    (d / rec["audit_json"]).write_text(audit_json_path(r).read_text().replace(str(self.out), "<out>"))
            recs.append(rec)
        aliases = {a: self.runs[a].name for a in self.aliases if a.endswith(f"/s{s}")}
        man = {"scale": self.scale_name, "protocol": PROTOCOL, "complete": complete, "runs": recs, "aliases": aliases}
        tmp = d / "runs.json.tmp"
        tmp.write_text(json.dumps(man, indent=1))
        tmp.replace(d / "runs.json")

    def finish_seed(self, s: int) -> None:
        names = [n for n in self.runs if n.endswith(f"/s{s}") and n not in self.aliases]
        failed = [n for n in names if self.runs[n].error and not self.runs[n].error.startswith("not available")]
        if failed:
            log.warning("seed %d not complete: %s failed (a later --resume retries it)", s, ", ".join(failed))
        self.keep_progress(s, complete=not failed)
        if self.keep is not None and not failed:
            print(f"[reproduce] seed {s}: complete, kept in {self.kept_dir(s)}", flush=True)

    def execute_all(self) -> None:
        for s in self.seeds:
            man = self.manifest(s) if self.resume else None
            if man is not None:
                why = self.stale(man)
                if why:
                    self.set_aside(s, why)
                elif self.load_kept(s):
                    missing = self.missing_runs(s)
                    if not missing:
                        continue
                    self.complete_kept(s, missing)
                    continue
                else:
                    print(f"[reproduce] seed {s}: kept partially ({len(man['runs'])} runs); completing it "
                          f"(runs still under {self.out / 'runs'} are reused)", flush=True)
            self.execute_seed(s)
            self.finish_seed(s)

    def plan_names(self, s: int) -> list[str]:
        """Every run name of seed ``s`` in this plan (the kept-seed completion compares against it)."""
        names = [f"stage1/s{s}", f"llm/s{s}", *[f"{t}/s{s}" for t, *_ in DP_ARMS], f"{BEFORE_DP[0]}/s{s}",
                 *[f"adaptive/{t}/s{s}" for t in ADAPTIVE], *[f"external/{t}/s{s}" for t in EXTERNAL],
                 f"generic/s{s}", f"bert/s{s}"]
        return names + [f"{a}/{t}/s{s}" for t in ("llm", "bert") for a in ("style_structured", "style_mixed_train")]

    def missing_runs(self, s: int) -> list[str]:
        return [n for n in self.plan_names(s) if n not in self.runs]

    def complete_kept(self, s: int, missing: list[str]) -> None:
        """A complete kept seed of this protocol lacks runs the plan has gained since (issue #28: the patient-unit
        arms, the before-DP model under the DP arms' probe): run those only. Their stage-2 model is re-trained
        (same config and seed; kept seeds hold no checkpoints) and its audit compared with the kept one, which
        is what says it is the model the kept DP arms were trained from."""
        # The kept runs stay registered (runs.json is rewritten after every run from what is registered: a seed
        # interrupted here keeps every record); stage 1 and stage 2 re-run into their own folders.
        self.kept_runs = {n: r for n, r in self.runs.items() if n.endswith(f"/s{s}") and n not in self.aliases}
        self.rebuild = {f"stage1/s{s}", f"llm/s{s}"}
        self.completing.add(s)
        print(f"[reproduce] seed {s}: kept complete but lacks {', '.join(missing)}; running those (the stage-2 model "
              "re-trained for its checkpoint)", flush=True)
        self.execute_seed(s)
        self.kept_runs, self.rebuild = {}, set()
        self.finish_seed(s)

    def execute_seed(self, s: int) -> None:
        """One seed's runs, the LLM tower and claim 4 first (so a partial seed already answers them)."""
        seed = f"seed={s}"
        if self.avail["llm"]:
            self.skip(f"stage1/s{s}", self.avail["llm"], s, "llm")
            self.skip(f"llm/s{s}", self.avail["llm"], s, "llm")
        else:
            st1 = self.run(f"stage1/s{s}", "train", ["experiment=text_adapt", seed], "stage1", s)
            hf = st1.out / "text_tower_hf"
            if st1.error or not hf.exists():
                self.skip(f"llm/s{s}", f"stage 1 failed ({st1.error or 'no text_tower_hf written'})", s)
            else:
                self.run(f"llm/s{s}", "train", ["model=llm_encoder", f"model.text_tower.pretrained={hf}", seed], "stage2", s)
        if self.runs[f"llm/s{s}"].error:  # claim 4 needs a stage-2 model: the BERT tower's then
            self.run(f"bert/s{s}", "train", ["model=bert_encoder", seed], "stage2", s)
        base = self.runs[f"llm/s{s}"] if not self.runs[f"llm/s{s}"].error else self.runs[f"bert/s{s}"]
        self.runs[f"base/s{s}"] = base
        self.aliases.add(f"base/s{s}")
        # claim 4: DP on the heads of that model, both head inits, and the non-private controls; the arms
        # the adaptive adversary attacks first, so that a partial seed already answers 4 and 4c
        arms = {t: (hi, mode, private, unit) for t, _, hi, mode, private, unit in DP_ARMS}
        first = [t for t in ADAPTIVE if t in arms]
        for tag in first:
            self.dp_arm(tag, *arms[tag], base, s)
        # 4c: the adaptive adversary against the model before DP and the DP models
        for tag in ADAPTIVE:
            src, name = self.runs[f"{tag}/s{s}"], f"adaptive/{tag}/s{s}"
            if self.use_kept(name, s):
                continue
            if self.avail["adaptive"]:
                self.skip(name, self.avail["adaptive"], s, "adaptive")
            elif src.error or not src.ckpt.exists():
                self.skip(name, f"no checkpoint ({src.error or src.ckpt})", s)
            else:
                self.run(name, "evaluate", [f"ckpt_path={src.ckpt}", "audit=adaptive", *ADAPTIVE_OVERRIDES, seed], "audit", s)
        for tag in arms:
            if tag not in first:
                self.dp_arm(tag, *arms[tag], base, s)
        self.before_dp(base, s)
        # 4b: transfer to the external cohort without retraining
        for tag in EXTERNAL:
            src, name = self.runs[f"{tag}/s{s}"], f"external/{tag}/s{s}"
            if self.use_kept(name, s):
                continue
            if src.error or not src.ckpt.exists():
                self.skip(name, f"no checkpoint ({src.error or src.ckpt})", s)
            else:
                self.run(name, "evaluate", [f"ckpt_path={src.ckpt}", "audit=all", seed], "evaluate", s)
        # claim 1: the generic and BERT towers
        self.run(f"generic/s{s}", "train", ["experiment=generic_text", seed], "stage2", s)
        if f"bert/s{s}" not in self.runs:
            self.run(f"bert/s{s}", "train", ["model=bert_encoder", seed], "stage2", s)
        # claim 5: structured-only training vs abbreviation-heavy / impression-only reports joining it
        for tower in ("llm", "bert"):
            for arm in ("style_structured", "style_mixed_train"):
                name = f"{arm}/{tower}/s{s}"
                if tower == "llm":
                    st1 = self.runs[f"stage1/s{s}"]
                    if self.use_kept(name, s):
                        continue
                    if st1.error:
                        self.skip(name, st1.error.replace("not available: ", ""), s, "llm" if self.avail["llm"] else None)
                        continue
                    model = ["model=llm_encoder", f"model.text_tower.pretrained={st1.out / 'text_tower_hf'}"]
                else:
                    model = ["model=bert_encoder"]
                self.run(name, "train", [f"experiment={arm}", *model, seed], "stage2", s)

    def before_dp(self, base: Run, s: int) -> None:
        """The model before DP through the DP arms' pipeline and probe (see BEFORE_DP)."""
        name = f"{BEFORE_DP[0]}/s{s}"
        if self.use_kept(name, s):
            return
        if self.avail["dp"]:
            self.skip(name, self.avail["dp"], s, "dp")
        elif base.error or not base.ckpt.exists():
            self.skip(name, f"no stage-2 checkpoint ({base.error or base.ckpt})", s)
        else:
            self.run(name, "train", ["experiment=dp_alignment", f"model.backbone_ckpt={base.ckpt}", "model.dp.head_init=stage2",
                                     "model.dp.enabled=false", "model.optimizer.lr=0", "trainer.max_epochs=1",
                                     "trainer.check_val_every_n_epoch=1", f"seed={s}"], "dp", s)

    def use_kept(self, name: str, s: int) -> bool:
        """A kept run of a seed being completed (complete_kept): used as it is, not re-run."""
        r = self.kept_runs.get(name)
        if r is None or name in self.rebuild:
            return False
        self.runs[name] = r
        return True

    def dp_arm(self, tag: str, head_init: str, mode: str, private: bool, unit: str, base: Run, s: int) -> None:
        name = f"{tag}/s{s}"
        if self.use_kept(name, s):
            return
        need = "dp_fresh" if head_init == "fresh" else "dp"
        if self.avail[need]:
            self.skip(name, self.avail[need], s, need)
        elif base.error or not base.ckpt.exists():
            self.skip(name, f"no stage-2 checkpoint ({base.error or base.ckpt})", s)
        else:
            ov = ["experiment=dp_alignment", f"model.backbone_ckpt={base.ckpt}"]
            ov += [] if self.avail["dp_fresh"] else [f"model.dp.head_init={head_init}"]
            ov += [f"model.loss.mode={mode}"] + ([f"data.privacy_unit={unit}"] if unit != "study" else [])
            ov += [f"model.dp.target_epsilon={self.epsilon}"] if private else ["model.dp.enabled=false"]
            self.run(name, "train", [*ov, f"seed={s}"], "dp", s)

    # ------------------------------------------------------------------ reading runs

    def has(self, prefix: str) -> list[int]:
        return [s for s in self.seeds if f"{prefix}/s{s}" in self.runs]

    def results(self, prefix: str) -> list[dict | None]:
        return [self.runs[f"{prefix}/s{s}"].result if f"{prefix}/s{s}" in self.runs else None for s in self.seeds]

    def cfg_of(self, prefix: str) -> str:
        s = next((s for s in self.seeds if f"{prefix}/s{s}" in self.runs), None)
        if s is None:
            return "– (not run yet)"
        r = self.runs[f"{prefix}/s{s}"]
        if r.error and r.error.startswith("not available"):
            return f"– ({r.error})"
        cmd = r.command.replace(f"seed={s}", "seed=<s>").replace(f"/s{s}/", "/s<s>/")
        return f"`{cmd.replace(str(self.out), '<out>')}`"

    def status(self, prefix: str) -> str | None:
        errs = [self.runs[f"{prefix}/s{s}"].error for s in self.has(prefix) if self.runs[f"{prefix}/s{s}"].error]
        if not self.has(prefix):
            return "not run yet"
        return errs[0] if errs else None

    def seed_minutes(self) -> str:
        """Summed run time of each seed (kept seeds: as recorded when they ran)."""
        return ", ".join(f"s{s} {sum(r.seconds for n, r in self.runs.items() if n.endswith(f'/s{s}') and n not in self.aliases) / 60:.0f} min"
                         for s in self.seeds)

    def dp_n(self) -> str:
        """Claim 4's pool: N = 10,000 as in arXiv 2606.02276 where the test split reaches it, else the full DB."""
        return "10000" if any(recall(r, n="10000") for r in self.results("base")) else "full"

    def seed_header(self) -> str:
        return " | ".join(f"seed {s}" for s in self.seeds)

    # ------------------------------------------------------------------ claims -> markdown

    def _seed_rows(self, key: str, title: str, section: str, ns: list[str], lbs: list, ubs: list, where: list,
                   collect: bool) -> list[str]:
        """Claims 2-3: one row per seed (× chance and its one-sided 95% lower bound at every N), then the
        geometric mean over seeds with its log-scale interval."""
        out = []
        res = self.results(key)
        for s, r in zip(self.seeds, res):
            if r is None:
                continue
            cells = []
            for n_ in ns:
                row = recall(r, section, n=n_)
                cells.append(_run_cell(row))
                if collect and row:
                    lbs.append(V.run_bound(row, "x_chance", "lower")[0])
                    ubs.append(V.run_bound(row, "x_chance", "upper")[0])
                    where.append((key, s, n_))
            out.append(f"| {title} | {s} | " + " | ".join(cells) + " |")
        if sum(r is not None for r in res) > 1:
            cells = []
            for n_ in ns:
                rows = rows_of(res, section, n_)
                cells.append(_iv(V.over_seeds(values(rows, "x_chance"), 0.0, x_high(rows))))
            out.append(f"| {title} | geometric mean | " + " | ".join(cells) + " |")
        return out

    def render(self, seconds: float, invocation: str = "") -> tuple[str, list[tuple[str, str, str, str]]]:
        L: list[str] = []
        summary: list[tuple[str, str, str, str]] = []  # (claim, verdict, evidence, config)
        seeds = self.seeds
        per_run = ("each seed: the value and (≥ its one-sided 95% bootstrap-over-patients lower bound; * = the "
                   "conservative 97.5% bound of an audit JSON without `x_chance_ci90`); geometric mean over seeds "
                   "[90% log-scale t-interval = one-sided 95% bounds, inside the parameter's range]")

        # ---- claim 1
        n1 = "100" if any(recall(r, n="100") for k, _ in TOWERS for r in self.results(k)) else "full"
        L += ["## Claim 1: re-linkage rises with clinical specialisation", "",
              f"Image→report R@1 (%) at N = {n1} on the internal test split ({per_run}). Recipe claim: the ratio of "
              "R@1 (= of × chance) between towers, paired by seed, one-sided 95% t-bound of the mean log ratio.", "",
              f"| text tower | config | {self.seed_header()} | geometric mean |", "|---|---|" + "---:|" * (len(seeds) + 1)]
        for key, title in TOWERS:
            rows = rows_of(self.results(key), n=n1)
            L.append(f"| {title} | {self.cfg_of(key)} | " + " | ".join(_run_cell(r, "value", 100) for r in rows)
                     + f" | {_iv(V.over_seeds(values(rows), 0.0, 1.0), 100)} |")
        r1 = {k: values(rows_of(self.results(k), n=n1)) for k, _ in TOWERS}
        p1, p2 = V.paired_log_ratio(r1["generic"], r1["bert"], seeds), V.paired_log_ratio(r1["bert"], r1["llm"], seeds)
        v1, v2 = V.greater_verdict(p1), V.greater_verdict(p2)
        verdict1 = combine(v1, v2)
        L += ["", f"- bert_encoder / generic: **{v1}**: {ratio_text(p1)}.",
              f"- llm_encoder (+stage 1) / bert_encoder: **{v2}**: {ratio_text(p2)}.", f"- Verdict: **{verdict1}**.", ""]
        summary.append(("1. generic < bert_encoder < llm_encoder (+stage 1)", verdict1,
                        f"R@1 ratio bert/generic {p1.ratio:.2f}, llm/bert {p2.ratio:.2f} over {p2.n} seeds" if p1 and p2 else "–",
                        f"{self.cfg_of('generic')}, {self.cfg_of('bert')}, {self.cfg_of('llm')}"))

        # ---- claim 2
        all_ns: list[str] = []
        for key, _ in TOWERS:
            for r in self.results(key):
                all_ns += [n_ for n_ in pool_sizes(r) if n_ not in all_ns]
        all_ns.sort(key=lambda x: (x == "full", int(x) if x.isdigit() else 0))
        m_full = next((recall(r, n="full")["n_value"] for k, _ in TOWERS for r in self.results(k) if recall(r, n="full")), None)
        L += ["## Claim 2: R@1 as a multiple of chance across pool sizes", "",
              f"Image→report R@1 × chance (chance = 1/N; range [0, N]) at every N the test split allows ({per_run}). "
              "Per released model: the claim holds when every trained run's one-sided 95% lower bound is above 1 at "
              "every N.", "",
              "| text tower | seed | " + " | ".join(f"N={n_}" + (f" (M={m_full})" if n_ == "full" else "") for n_ in all_ns) + " |",
              "|---|---|" + "---:|" * len(all_ns)]
        lbs: list = []
        ubs: list = []
        where: list = []
        for key, title in TOWERS:
            L += self._seed_rows(key, title, "i2t", all_ns, lbs, ubs, where, key != "generic")
        verdict2 = V.per_run_verdict(lbs, ubs)
        ev2 = "–"
        if any(x is not None for x in lbs):
            lo, (k_, s_, n_) = min((x, w) for x, w in zip(lbs, where) if x is not None)
            ev2 = (f"lowest one-sided 95% lower bound over {len(where)} (run, N) of the trained towers: {lo:.2f}× "
                   f"({k_}, seed {s_}, N = {n_})")
        missing = [n_ for n_ in ("100", "1000", "10000") if n_ not in all_ns]
        L += ["", f"- N not reachable on this test split (pools larger than it are the full database): {missing or 'none'}.",
              f"- Verdict: **{verdict2}** ({ev2}).", ""]
        summary.append(("2. R@1 × chance at N = 100 … full DB", verdict2, ev2, f"{self.cfg_of('bert')}, {self.cfg_of('llm')}"))

        # ---- claim 3
        hn_ns: list[str] = []
        for key, _ in TOWERS:
            for r in self.results(key):
                hn_ns += [n_ for n_ in pool_sizes(r, "hardneg/i2t") if n_ not in hn_ns]
        hn_ns.sort(key=lambda x: (x == "full", int(x) if x.isdigit() else 0))
        pools = []
        for n_ in hn_ns:
            ps = [r["effective_pool_mean"] for k, _ in TOWERS for r in rows_of(self.results(k), "hardneg/i2t", n_) if r]
            pools.append(f"{sum(ps) / len(ps):,.0f}" if ps else "–")
        L += ["## Claim 3: the signal persists under pathology-matched hard negatives", "",
              "Image→report R@1 with candidates restricted to reports with the same 14-label vector, less the query "
              "patient's own studies; chance is the effective 1/pool (a pool is smaller than N wherever the label group "
              f"is) ({per_run}). Per released model, as claim 2.", "",
              "| text tower | seed | " + " | ".join(f"N={n_}" for n_ in hn_ns) + " |", "|---|---|" + "---:|" * len(hn_ns),
              "| (mean effective pool) | | " + " | ".join(pools) + " |"]
        lbs, ubs, where = [], [], []
        for key, title in TOWERS:
            L += self._seed_rows(key, title, "hardneg/i2t", hn_ns, lbs, ubs, where, key != "generic")
        verdict3 = V.per_run_verdict(lbs, ubs)
        ev3 = "–"
        if any(x is not None for x in lbs):
            lo, (k_, s_, n_) = min((x, w) for x, w in zip(lbs, where) if x is not None)
            ev3 = f"lowest one-sided 95% lower bound of the trained towers: {lo:.2f}× effective chance ({k_}, seed {s_}, N = {n_})"
        L += ["", f"- Verdict: **{verdict3}** ({ev3}).", ""]
        summary.append(("3. signal persists under hard negatives", verdict3, ev3,
                        f"{self.cfg_of('bert')}, {self.cfg_of('llm')} (audit hardneg)"))

        # ---- claim 4
        n4 = self.dp_n()
        bd = BEFORE_DP[0]
        L += ["## Claim 4: DP on the projection heads — re-linkage cut vs utility", "",
              f"Stage 3 (experiment=dp_alignment) on the stage-2 model {self.cfg_of('base')}, target ε = {self.epsilon} per "
              "privacy unit (valid loss modes only), in three readings: DP fine-tunes the trained stage-2 heads "
              "(`model.dp.head_init=stage2`, what stage 3 did before issue #22), DP trains fresh heads "
              "(`model.dp.head_init=fresh`), and fresh heads with patient units (`data.privacy_unit=patient`: all studies "
              "of a patient are one unit, the unit a hospital protects), each with its non-private control "
              f"(`model.dp.enabled=false`). R@1 (%) at N = {n4} ({per_run}). ε spent and δ are per the row's unit (mean "
              "over seeds); \"per patient\" is the study-level guarantee read for a whole patient by group privacy over "
              "the k studies one patient has ((kε, k e^((k−1)ε) δ)): stated only where that δ is below 1/#patients "
              "(bounded by the public bound on N); otherwise there is no meaningful per-patient guarantee.", "",
              f"| arm | config | unit | ε spent (δ) | per patient | {self.seed_header()} | geometric mean |",
              "|---|---|---|---:|---|" + "---:|" * (len(seeds) + 1)]
        for tag in ("base", bd, *[t for t, *_ in DP_ARMS]):
            err = self.status(tag)
            res = self.results(tag)
            unit = next((u for t, *_, u in DP_ARMS if t == tag), "–")
            if err and not any(res):
                L.append(f"| {DP_TITLE[tag]} | {self.cfg_of(tag)} | {unit} | – | – | {err} |" + " |" * len(seeds))
                continue
            rows = rows_of(res, n=n4)
            recs = [r for s in self.has(tag) if (r := dp_record(self.runs[f"{tag}/s{s}"])).get("epsilon_spent")]
            eps, pp = "–", "–"
            if recs:
                eps = (f"{sum(r['epsilon_spent'] for r in recs) / len(recs):.3f} "
                       f"({max(r['delta'] for r in recs):.1e})")
                pp = per_patient_cell(recs)
            L.append(f"| {DP_TITLE[tag]} | {self.cfg_of(tag)} | {unit} | {eps} | {pp} | "
                     + " | ".join(_run_cell(r, "value", 100, 3) for r in rows)
                     + f" | {_iv(V.over_seeds(values(rows), 0.0, 1.0), 100, 3)} |")
        check = [f"s{n.split('/s')[-1]} {v}" for n, v in sorted(self.rebuilt_check.items()) if n.startswith("llm/")]
        check += [f"s{r.name.split('/s')[-1]} {r.extra['rebuilt']}" for s in seeds
                  if (r := self.runs.get(f"llm/s{s}")) and r.extra.get("rebuilt") and f"llm/s{s}" not in self.rebuilt_check]
        L += ["", f"The `{bd}` row is the stage-2 model itself, re-audited through the DP stage's pipeline with its heads "
              "unchanged (non-private, learning rate 0); its R@1 equals that of the stage-2 model it re-audits (the stage-2 "
              "row's, or the re-trained model's where stated next)."
              + (f" Seeds whose stage-2 model was re-trained to re-audit it (kept seeds hold no checkpoints), its audit "
                 f"against the kept one: {'; '.join(check)}. Stage 2 is not bit-for-bit reproducible on this CPU: where "
                 "the two differ, the matched-probe AUROC \"before DP\" of readings 4 and 4f is the re-trained model's "
                 "(the same config and seed; the size of the difference is the one stated), while their DP arms and "
                 "controls come from the kept model; reading 4p's arms were trained from the re-trained model itself, "
                 "and its R@1 \"before\" is that model's." if check else ""), "",
              f"Linear-probe macro AUROC (%), one protocol for every arm: {PROBE_PROTOCOL} (each seed; mean over seeds "
              "[90% t-interval, inside [0, 100]]):", "",
              f"| arm | probe fitted on | {self.seed_header()} | mean |", "|---|---|" + "---:|" * (len(seeds) + 1)]
        auroc = {}
        for tag in (bd, *[t for t, *_ in DP_ARMS]):
            auroc[tag] = [None if r is None else (probe_row(r) or {}).get("value") for r in self.results(tag)]
            if any(a is not None for a in auroc[tag]):
                L.append(f"| {DP_TITLE[tag]} | public cohort (train split) | "
                         + " | ".join("–" if a is None else f"{100 * a:.2f}" for a in auroc[tag])
                         + f" | {_iv(V.over_seeds(auroc[tag], 0.0, 1.0, log=False), 100)} |")
            else:
                L.append(f"| {DP_TITLE[tag]} | public cohort (train split) | " + " | ".join("–" for _ in seeds)
                         + f" | {self.status(tag) or '–'} |")
        own = [None if r is None else (probe_row(r) or {}).get("value") for r in self.results("base")]
        if any(a is not None for a in own):
            L += ["", f"Not used in any comparison: the stage-2 run's own final audit fits its probe on the private train "
                  f"split (macro AUROC {_iv(V.over_seeds(own, 0.0, 1.0, log=False), 100)} over seeds); before issue #28 "
                  "this report compared it with the DP arms' public-cohort probes and called the ~1.2-point difference a "
                  "cost of DP; the comparisons below use the matched probe."]
        L += ["", f"Criterion per reading: the DP model's R@1 at N = {n4} below the model before DP (paired by seed, "
              f"one-sided 95% upper bound of the ratio below 1), and macro AUROC not more than {100 * V.AUROC_MARGIN:.0f} "
              "point below it (non-inferiority: the one-sided 95% upper bound of the AUROC drop below "
              f"{100 * V.AUROC_MARGIN:.0f}), AUROC of the matched probe. The DP model against its non-private control "
              "separates the effect of the noise from that of (re)training the heads.", ""]
        for label, title, dp, ctrl, hi, before in READINGS:
            b, d, c = (values(rows_of(self.results(t), n=n4)) for t in (before, dp, ctrl))
            p_cut, p_ctrl, p_cb = (V.paired_log_ratio(b, d, seeds), V.paired_log_ratio(c, d, seeds),
                                   V.paired_log_ratio(b, c, seeds))
            dA, dC = V.paired_diff(auroc[bd], auroc[dp], seeds), V.paired_diff(auroc[ctrl], auroc[dp], seeds)
            err = self.status(dp)
            if err and err.startswith("not available"):
                v = err
            elif not p_cut:
                v = f"not decided ({err or 'no seed has both models'})"
            else:
                v_auc = (V.noninferior_verdict(dA.lb, dA.ub, -V.AUROC_MARGIN, dA.n) if dA else
                         "not decided (the model before DP has no matched-probe AUROC yet)")
                v = combine(V.lower_verdict(p_cut), v_auc)
            ev = "–"
            if p_cut:
                # Ratios and drops with the one-sided bound each question needs: a "cut" with a bound
                # below -100% (the ratio's upper bound above 2) reads as nonsense, a ratio does not.
                ev = f"R@1 DP/before ×{p_cut.ratio:.3f} (cut {100 * (1 - p_cut.ratio):.1f}%)"
                if p_cut.ub is not None:
                    ev += f", one-sided 95% upper bound ×{p_cut.ub:.3f}"
                for what, x in (("before", dA), ("control", dC)):
                    if x:
                        ev += f"; AUROC drop vs {what} {-100 * x.mean:.2f} points" + (
                            "" if x.lb is None else f" (one-sided 95% upper bound {-100 * x.lb:.2f})")
                ev += f", {p_cut.n} seed{'s' if p_cut.n != 1 else ''}"
            L += [f"**Reading: {title}** (`model.dp.head_init={hi}`): **{v}**.", "",
                  f"- {DP_TITLE[dp]} / before DP, R@1: {ratio_text(p_cut)}.",
                  f"- {DP_TITLE[dp]} / {DP_TITLE[ctrl]}, R@1: {ratio_text(p_ctrl)}.",
                  f"- {DP_TITLE[ctrl]} / before DP, R@1: {ratio_text(p_cb)}.",
                  f"- Macro AUROC (matched probe), before DP − {DP_TITLE[dp]}: {drop_text(dA, V.AUROC_MARGIN)}.",
                  f"- Macro AUROC (matched probe), {DP_TITLE[ctrl]} − {DP_TITLE[dp]}: {drop_text(dC, V.AUROC_MARGIN)}.", ""]
            summary.append((f"{label}. DP on heads ({title}) cuts R@1 at N = {n4} while AUROC (public-cohort probe, every "
                            f"arm) drops < {100 * V.AUROC_MARGIN:.0f} point", v, ev, self.cfg_of(dp)))

        # ---- 4b external transfer
        L += ["## Claim 4b: transfer to an external cohort without retraining", "",
              f"synthcxr_external test split, evaluate.py, R@1 × chance at the headline N ({per_run}); per released "
              "model for the stage-2 model (every seed's lower bound above 1).", "",
              f"| checkpoint | config | N | {self.seed_header()} | geometric mean | macro AUROC (%) |",
              "|---|---|---|" + "---:|" * (len(seeds) + 2)]
        lbs, ubs = [], []
        for tag in EXTERNAL:
            res = self.results(f"external/{tag}")
            err = self.status(f"external/{tag}")
            if err and not any(res):
                L.append(f"| {DP_TITLE[tag]} | {self.cfg_of(f'external/{tag}')} | – | {err} |" + " |" * (len(seeds) + 1))
                continue
            n_ = headline_n(next((r for r in res if r), None))
            rows = rows_of(res, n=n_)
            a = [None if r is None else (probe_row(r) or {}).get("value") for r in res]
            L.append(f"| {DP_TITLE[tag]} | {self.cfg_of(f'external/{tag}')} | {n_} | " + " | ".join(_run_cell(r) for r in rows)
                     + f" | {_iv(V.over_seeds(values(rows, 'x_chance'), 0.0, x_high(rows)))} | "
                     f"{_iv(V.over_seeds(a, 0.0, 1.0, log=False), 100)} |")
            if tag == "base":
                lbs = [V.run_bound(r, "x_chance", "lower")[0] for r in rows if r]
                ubs = [V.run_bound(r, "x_chance", "upper")[0] for r in rows if r]
        verdict_t = V.per_run_verdict(lbs, ubs)
        ev_t = f"lowest one-sided 95% lower bound {min(x for x in lbs if x is not None):.2f}× over {len(lbs)} seeds" \
            if any(x is not None for x in lbs) else "–"
        L += ["", f"- Verdict (the stage-2 model links external pairs above chance without retraining): **{verdict_t}** ({ev_t}).", ""]
        summary.append(("4b. transfer to synthcxr_external without retraining", verdict_t, ev_t, self.cfg_of("external/base")))

        # ---- 4c adaptive adversary
        L += self.render_adaptive(summary)

        # ---- claim 5
        L += ["## Claim 5: style robustness when abbreviation-heavy, impression-only reports join training", "",
              "Same structured val/test reports in both arms (train_style_mix touches only the training split); "
              f"image→report R@1 (%) on the structured test reports ({per_run}).", "",
              f"| text tower | training reports | {self.seed_header()} | geometric mean |", "|---|---|" + "---:|" * (len(seeds) + 1)]
        verdict5, ev5, notes = "not available", "–", []
        for tower, title in (("llm", "llm_encoder + stage 1"), ("bert", "bert_encoder")):
            a_res, b_res = self.results(f"style_structured/{tower}"), self.results(f"style_mixed_train/{tower}")
            err = self.status(f"style_structured/{tower}") or self.status(f"style_mixed_train/{tower}")
            if err and not (any(a_res) and any(b_res)):
                L.append(f"| {title} | {err} |" + " |" * (len(seeds) + 1))
                if tower == "llm":
                    verdict5 = err if err.startswith("not available") else "not available"
                continue
            n_ = headline_n(next((r for r in a_res if r), None))
            for arm, res in (("structured only", a_res), ("+ abbreviated / impression-only", b_res)):
                rows = rows_of(res, n=n_)
                L.append(f"| {title} (N={n_}) | {arm} | " + " | ".join(_run_cell(r, "value", 100) for r in rows)
                         + f" | {_iv(V.over_seeds(values(rows), 0.0, 1.0), 100)} |")
            p = V.paired_log_ratio(values(rows_of(a_res, n=n_)), values(rows_of(b_res, n=n_)), seeds)
            v = V.noninferior_verdict(p.lb, p.ub, V.STYLE_MARGIN, p.n) if p else "not available"
            notes.append(f"- {title}, mixed / structured-only training, R@1: **{v}**: {ratio_text(p)}.")
            if tower == "llm":
                verdict5 = v
                ev5 = f"llm R@1 ratio {p.ratio:.3f}" + ("" if p.lb is None else f" (≥ {p.lb:.3f})") + f" over {p.n} seeds" if p else "–"
        L += ["", *notes, "", f"Criterion: the LLM tower's R@1 on structured test reports with the other styles in training "
              f"is at least {V.STYLE_MARGIN:.2f}× that of structured-only training (non-inferiority, one-sided 95% lower "
              "bound of the paired ratio).", f"- Verdict: **{verdict5}**.", ""]
        summary.append(("5. LLM tower robust to abbreviated / impression-only training reports", verdict5, ev5,
                        f"{self.cfg_of('style_structured/llm')}, {self.cfg_of('style_mixed_train/llm')}"))

        L += self.render_old()
        return "\n".join(self.render_head(seconds, invocation, summary) + L), summary

    @staticmethod
    def adaptive_row(res: dict | None, attack: str, n: str) -> dict | None:
        """The adaptive audit's R@1 row at N for one pre-specified attack (ADAPTIVE_AUX's auxiliary set;
        the baseline cosine has none). Not its "best" row: that maximum is selected on the audited split."""
        for row in ((res or {}).get("adaptive") or {}).get("rows", []):
            if row["attack"] == attack and (attack == "cosine" or (row["aux"], str(row["n_aux_requested"])) == ADAPTIVE_AUX):
                return recall({"relinkage": row.get("relinkage") or {}}, "i2t", n=n)
        return None

    def render_adaptive(self, summary: list) -> list[str]:
        n4 = self.dp_n()
        L = ["## Claim 4c: does head-only DP still cut re-linkage against an adaptive adversary?", "",
             f"`python evaluate.py audit=adaptive {' '.join(ADAPTIVE_OVERRIDES)} ckpt_path=...` (audit/adaptive.py) on the "
             "model before DP and on the DP models (both head inits): an attacker who holds the released model and "
             f"every {ADAPTIVE_AUX[0]} training-split study pair fits each attack on the frozen trunk features; its "
             f"image→report R@1 (%) at N = {n4} on the internal test split, each seed (≥ its one-sided 95% bootstrap "
             "lower bound). Each attack is reported on its own (the audit's `best` row is a maximum selected on the "
             "audited split and is not used).", "",
             f"| model attacked | attack | {self.seed_header()} | geometric mean |", "|---|---|" + "---:|" * (len(self.seeds) + 1)]
        for tag in ADAPTIVE:
            res = self.results(f"adaptive/{tag}")
            err = self.status(f"adaptive/{tag}")
            if err and not any(res):
                L.append(f"| {DP_TITLE[tag]} | {err} |" + " |" * (len(self.seeds) + 1))
                continue
            for attack in ADAPTIVE_ATTACKS:
                rows = [self.adaptive_row(r, attack, n4) for r in res]
                L.append(f"| {DP_TITLE[tag]} | {attack} | " + " | ".join(_run_cell(r, "value", 100, 3) for r in rows)
                         + f" | {_iv(V.over_seeds(values(rows), 0.0, 1.0), 100, 3)} |")
        L += ["", "The ridge and head attacks are fitted on the frozen trunk's features, which head-only DP never "
              "changes: **head-only DP cannot change them, by construction** (no test is run on a fact of construction; "
              "their rows above are identical before and after DP wherever the attack's own draws are). The cosine and "
              "Procrustes attacks read the released (head) embeddings: those are tested, paired by seed.", ""]
        for label, title, dp, _, hi, _ in READINGS:
            if dp not in ADAPTIVE:
                continue
            err = self.status(f"adaptive/{dp}") or self.status("adaptive/base")
            trunk, released = [], []
            for attack in ADAPTIVE_ATTACKS:
                p = V.paired_log_ratio(values([self.adaptive_row(r, attack, n4) for r in self.results("adaptive/base")]),
                                       values([self.adaptive_row(r, attack, n4) for r in self.results(f"adaptive/{dp}")]),
                                       self.seeds)
                if attack not in TRUNK_ATTACKS:
                    released.append((attack, V.lower_verdict(p), p))
                    L.append(f"- {title}, {attack} on the released embeddings: DP / before, attacker's R@1: "
                             f"**{released[-1][1]}**: {ratio_text(p)}.")
                    continue
                same = p is not None and all(r == 1.0 for r in p.ratios)
                trunk.append((attack, same, p))
                L.append(f"- {title}, {attack} (frozen trunk): DP / before, attacker's R@1 "
                         + (f"×1.000 on every one of {p.n} seeds (as construction implies)." if same else
                            f"{'–' if p is None else f'×{p.ratio:.3f} over {p.n} seeds'}: the attack's own fit differs "
                            "between the two runs (its draws, not DP)."))
            if err and err.startswith("not available"):
                v, ev = err, "–"
            else:
                v = (f"trunk attacks ({', '.join(TRUNK_ATTACKS)}): head-only DP cannot change them (by construction); "
                     + "; ".join(f"{a} on the released embeddings: {va}" for a, va, _ in released))
                seen = [a for a, same, p in trunk if same]
                ev = "; ".join(([f"{', '.join(seen)}: identical before and after DP on every seed"] if seen else [])
                               + [f"{a} DP/before ×{p.ratio:.3f}" + ("" if p.ub is None else f" (≤ {p.ub:.3f})")
                                  for a, _, p in released if p])
            L.append(f"- **Reading: {title}** (`model.dp.head_init={hi}`): {v}.")
            summary.append((f"4c{label[1:]}. DP ({title}) against the adaptive adversary's trunk attacks", v, ev,
                            self.cfg_of(f"adaptive/{dp}")))
        return L + [""]

    def render_head(self, seconds: float, invocation: str, summary: list) -> list[str]:
        loaded = {s: st for s, st in self.kept.items() if s in self.seeds}
        n_kept = sum(1 for n, r in self.runs.items() if n not in self.aliases and r.extra.get("kept_json"))
        kept_txt = (f"rendered {n_kept} kept runs of seeds {sorted(loaded)} from "
                    f"`{self._rel(self.keep)}` ({', '.join(f's{s} {st}' for s, st in sorted(loaded.items()))}; their "
                    "run times are those recorded when they ran)" if loaded else "rendered no kept runs")
        partial = [s for s, st in loaded.items() if st == "partial"]
        head = [
            "# Reproduction on the synthetic cohort", "",
            f"`python -m experiments.reproduce {invocation}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{platform.node()} ({os.cpu_count()} CPUs). This invocation: {seconds / 60:.1f} min wall, {self.n_ran} runs "
            f"executed, {kept_txt}. Seeds in the tables: {self.seeds} (protocol {PROTOCOL}); run time per seed: "
            f"{self.seed_minutes()} (expected: {RUNTIME_NOTE[self.scale_name]}).", "",
        ]
        if partial:
            head += [f"**Partial seeds {partial}**: their runs are still being made (kept one by one as they finish); "
                     "rows without a value say `–` or \"not run yet\".", ""]
        if self.old:
            head += [f"Seeds kept under older protocols ({', '.join(f'protocol {v} s{s}' for v, s in sorted(self.old))}) "
                     "are **not** in any table or verdict above the appendix: their runs lack this protocol's arms. They "
                     "are listed, labelled, in the appendix.", ""]
        head += [
            f"Scale `{self.scale_name}` adds these overrides to every stage-2 run: "
            f"`{' '.join(scale_overrides(self.scale, 'stage2')) or '(none)'}` (stage 1, DP and evaluate.py runs get the "
            "matching data sizes). Each row's config is the command that made it, plus these. A claim that does not "
            "hold here is reported as such; the cohort was not tuned to make any claim hold. "
            + SCALE_CAVEAT.get(self.scale_name, SCALE_CAVEAT["tiny"]), "",
            "## Verdict protocol (experiments/verdict.py)", "",
            "Fixed before the protocol-2 runs, but after seeds 0–2 had been seen under protocol 1 (appendix); the "
            "matched probe of claim 4 and the by-construction wording of 4c were adopted after the protocol-2 numbers "
            "had been seen (issue #28); margins and test rules were not changed then.", "",
            "- **Per released model** (claims 2, 3, 4b): every trained run's one-sided 95% lower bound of R@1 × chance "
            "(5th percentile of the patient bootstrap, `x_chance_ci90[0]` in its audit JSON) must exceed 1; a run whose "
            "one-sided 95% upper bound is below 1 contradicts the claim.",
            f"- **Recipe level and A > B** (claims 1, 4, 4c): log(× chance) (a ratio of R@1 at one N), paired by seed, "
            f"one-sided {100 * (1 - V.ALPHA):.0f}% t-bounds of the mean log ratio, back-transformed; at least "
            f"{V.MIN_SEEDS} seeds for a verdict (fewer: \"not decided\", every seed still shown); each comparison states "
            f"the smallest ratio its seeds detect with {100 * V.POWER:.0f}% power given the observed SD over seeds.",
            f"- **No-drop claims** by non-inferiority (one side of a TOST) with margins fixed in advance: claim 4's macro "
            f"AUROC may fall by less than {100 * V.AUROC_MARGIN:.0f} point (the one-sided 95% upper bound of the drop, "
            f"paired by seed, below {100 * V.AUROC_MARGIN:.0f}); claim 5's R@1 ratio must stay above {V.STYLE_MARGIN:.2f}.",
            "- Intervals stay in the parameter's range: R@1 in [0, 100]%, × chance in [0, N/K], AUROC in [0, 100]%; "
            "over-seed intervals of positive quantities are log-scale t-intervals, back-transformed.", "",
            "## Summary", "", "| claim | holds here? | evidence | config |", "|---|---|---|---|",
        ]
        head += [f"| {c} | **{v}** | {e} | {cfg} |" for c, v, e, cfg in summary]
        return head + [""]

    @staticmethod
    def _rel(p: Path | None) -> str:
        if p is None:
            return "–"
        p = p.resolve()
        return str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)

    def render_old(self) -> list[str]:
        """Appendix: seeds kept under older protocols, per run, labelled; never in a verdict."""
        if not self.old:
            return []
        from cxr_relink.audit.result import load_result

        L = ["## Appendix: seeds kept under an older protocol (not in any verdict above)", ""]
        for v in sorted({v for v, _ in self.old}):
            L += [f"Protocol {v}: {PROTOCOL_NOTE.get(v, 'unknown')}. Each run: R@1 × chance (≥ its bootstrap lower bound; "
                  "* = the 2.5th percentile, a conservative one-sided 97.5% bound, as these JSONs carry no 5th "
                  "percentile). Per released model these runs are still evidence for claims 2–3.", "",
                  "| protocol | seed | run | i2t N=100 | i2t N=1000 | i2t N=10000 | i2t N=full | hard-neg N=100 | "
                  "DP-arm R@1 (%) at N=10000 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
            for (v_, s), d in sorted(self.old.items()):
                if v_ != v:
                    continue
                man = json.loads((d / "runs.json").read_text())
                for rec in man["runs"]:
                    if not rec.get("audit_json") or rec["name"].startswith(("external/", "style_")):
                        continue
                    res = load_result(d / rec["audit_json"])
                    tag = rec["name"].rsplit("/", 1)[0]
                    if tag in ("generic", "bert", "llm"):
                        cells = [_run_cell(recall(res, n=n_)) for n_ in ("100", "1000", "10000", "full")]
                        cells += [_run_cell(recall(res, "hardneg/i2t", n="100")), "–"]
                    else:
                        cells = ["–"] * 5 + [_run_cell(recall(res, n="10000"), "value", 100, 3)]
                    L.append(f"| {v} | {s} | {tag} | " + " | ".join(cells) + " |")
            L.append("")
        L += [f"Kept in `{self._rel(self.keep)}/protocol<v>/`.", ""]
        return L

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        ax = axes[0]  # claims 1-2: × chance on a log axis, each seed a point, the geometric mean a line
        for i, (key, title) in enumerate(TOWERS):
            res = self.results(key)
            ns = pool_sizes(next((r for r in res if r), None))
            xs, gm = [], []
            for n_ in ns:
                rows = [r for r in rows_of(res, n=n_) if r]
                if not rows:
                    continue
                nv = rows[0]["n_value"]
                ax.scatter([nv * (1 + 0.04 * (i - 1))] * len(rows), [r["x_chance"] for r in rows], s=14, color=f"C{i}", alpha=0.7)
                o = V.over_seeds([r["x_chance"] for r in rows], 0.0, x_high(rows))
                xs.append(nv * (1 + 0.04 * (i - 1)))
                gm.append(o.center)
            if xs:
                ax.plot(xs, gm, color=f"C{i}", label=f"{title} (geometric mean; dots: seeds)")
        ax.axhline(1.0, color="k", ls="--", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("candidate pool N (largest = full test DB)")
        ax.set_ylabel("image→report R@1 × chance (log)")
        ax.set_title("claims 1–2", fontsize=10)
        ax.legend(fontsize=7)
        # Claim 4, paired as the analysis is: each seed's DP/before and DP/control ratio of R@1 (a line joins a
        # seed's two comparisons), the geometric mean with its one-sided 95% upper bound, and "no cut" at 1; the
        # AUROC drop (matched probe) per seed, its mean with the one-sided 95% upper bound, and the 1-point margin.
        n4 = self.dp_n()
        bd = BEFORE_DP[0]
        auroc = {t: [None if r is None else (probe_row(r) or {}).get("value") for r in self.results(t)]
                 for t in (bd, *[t for t, *_ in DP_ARMS])}
        ticks = []
        for k, (label, title, dp, ctrl, _, before) in enumerate(READINGS):
            b, d, c = (values(rows_of(self.results(t), n=n4)) for t in (before, dp, ctrl))
            for j, (what, p, x) in enumerate((("before", V.paired_log_ratio(b, d, self.seeds), None),
                                              ("control", V.paired_log_ratio(c, d, self.seeds), None))):
                pos = 3 * k + j
                ticks.append((pos, f"{label}: DP /\n{what}"))
                if p:
                    axes[1].scatter([pos] * p.n, p.ratios, s=14, color="C0", alpha=0.7)
                    axes[1].plot([pos - 0.3, pos + 0.3], [p.ratio] * 2, color="k", lw=1.5)
                    if p.ub is not None:
                        axes[1].plot([pos, pos], [p.ratio, p.ub], color="k", lw=1)
                        axes[1].plot([pos - 0.12, pos + 0.12], [p.ub] * 2, color="k", lw=1)
            for j, (what, ref) in enumerate((("before", bd), ("control", ctrl))):
                x = V.paired_diff(auroc[ref], auroc[dp], self.seeds)
                pos = 3 * k + j
                if x:
                    drops = [100 * (0.0 - v) for v in x.diffs]
                    axes[2].scatter([pos] * x.n, drops, s=14, color="C1", alpha=0.7)
                    axes[2].plot([pos - 0.3, pos + 0.3], [0.0 - 100 * x.mean] * 2, color="k", lw=1.5)
                    if x.lb is not None:
                        up = 0.0 - 100 * x.lb
                        axes[2].plot([pos, pos], [0.0 - 100 * x.mean, up], color="k", lw=1)
                        axes[2].plot([pos - 0.12, pos + 0.12], [up] * 2, color="k", lw=1)
        for ax in axes[1:]:
            ax.set_xticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=6)
        axes[1].axhline(1.0, color="k", ls="--", lw=1, label="no cut (ratio 1)")
        axes[1].set_yscale("log")
        axes[1].set_ylabel(f"R@1 ratio at N = {n4} (log)")
        axes[1].set_title(f"claim 4 (ε = {self.epsilon} per unit; 4p: patient units): paired R@1 ratios\n(dots: seeds, "
                          "bar: geometric mean, whisker: one-sided 95% upper bound)", fontsize=8)
        axes[1].legend(fontsize=7)
        axes[2].axhline(100 * V.AUROC_MARGIN, color="C3", ls="--", lw=1,
                        label=f"non-inferiority margin ({100 * V.AUROC_MARGIN:.0f} point)")
        axes[2].axhline(0.0, color="k", lw=0.5)
        axes[2].set_ylabel("macro AUROC drop (points; matched probe)")
        axes[2].set_title("claim 4: AUROC drop, probe fitted on the public cohort for every arm\n(dots: seeds, bar: mean, "
                          "whisker: one-sided 95% upper bound)", fontsize=8)
        axes[2].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1); default 1 for tiny, 5 otherwise")
    ap.add_argument("--epsilon", type=float, default=0.34, help="target epsilon of the DP rows (arXiv 2606.02276's 0.34)")
    ap.add_argument("--out", default=str(ROOT / "logs" / "reproduce"), help="runs go to <out>/<scale>/runs/")
    ap.add_argument("--results", default=None, help="RESULTS.md path (default <out>/<scale>/RESULTS.md)")
    ap.add_argument("--resume", action="store_true", help="load complete kept seeds, reuse finished runs in <out>, run the rest")
    ap.add_argument("--keep", default=None, help="keep finished runs here, per seed (default: experiments/results/<scale> "
                    f"for {', '.join(KEEP_BY_DEFAULT)}; 'none' to keep nothing)")
    ap.add_argument("--render-only", action="store_true", help="write RESULTS.md from the kept seeds, run nothing")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "train", "evaluate", "models", "callbacks", "datamodules"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.scale == "tiny" else 5)))
    out = Path(args.out) / args.scale
    t0 = time.time()
    keep = args.keep or (str(ROOT / "experiments" / "results" / args.scale) if args.scale in KEEP_BY_DEFAULT else None)
    keep = None if keep in (None, "none") else Path(keep)
    rep = Reproduction(args.scale, seeds, out, args.resume, args.epsilon, keep)
    if args.render_only:
        rep.seeds = [s for s in seeds if rep.load_kept(s, partial=True)]
        rep.find_old()
        if not rep.seeds and not rep.old:
            raise SystemExit(f"--render-only: no kept seed among {seeds} in {keep}")
        if not rep.seeds:
            rep.seeds = []
    else:
        held = [s for s in seeds if rep.manifest(s) is not None]
        if held and not args.resume:
            raise SystemExit(
                f"{keep} already keeps seeds {held} (their runs.json). Refusing to overwrite kept results: pass --resume "
                "to load them (complete seeds of this protocol) and run only what is missing, --render-only to render "
                "them, or --keep <another folder> / --keep none.")
        rep.execute_all()
        rep.find_old()
    md, _ = rep.render(time.time() - t0, " ".join(argv))
    results = Path(args.results) if args.results else out / "RESULTS.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    plot = results.with_name(results.stem + "_claims.png")
    try:
        rep.plot(plot)
        md += f"\n![claims 1, 2 and 4]({plot.name})\n"
    except Exception as e:  # noqa: BLE001 -- the table matters more than the figure
        md += f"\n(plot failed: {type(e).__name__}: {e})\n"
    runs = [{"name": r.name, "command": r.command, "sizing": r.sizing, "error": r.error, "seconds": round(r.seconds, 1),
             "audit_json": (r.extra.get("kept_json") or str(audit_json_path(r))) if r.result else None}
            for name, r in rep.runs.items() if name not in rep.aliases]
    md += "\n## Runs\n\n| run | seconds | status | audit JSON |\n|---|---:|---|---|\n" + "\n".join(
        f"| {r['name']} | {r['seconds']:.0f} | {r['error'] or 'ok'} | {r['audit_json'] or '–'} |" for r in runs) + "\n"
    results.write_text(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    print(f"[reproduce] wrote {results} ({(time.time() - t0) / 60:.1f} min)", flush=True)
    return results


if __name__ == "__main__":
    main()
