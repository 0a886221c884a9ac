"""Reproduction table of both papers on the synthetic cohort: one command -> RESULTS.md (+ plots).

    python -m experiments.reproduce --scale tiny                 # ~3.5 min on 2 CPU cores (tests/test_reproduce.py runs it)
    python -m experiments.reproduce --scale small --seeds 3      # 600 patients at 64 px, ~1 h per seed
    python -m experiments.reproduce --scale full --seeds 3 --resume   # the configs' defaults, ~2.5 h per seed
    python -m experiments.reproduce --scale paper --seeds 3 --resume --results RESULTS.md   # see below
Writes <out>/<scale>/RESULTS.md, RESULTS_claims.png, runs.json and every run under <out>/<scale>/runs/
(--out defaults to logs/reproduce; --results puts RESULTS.md elsewhere, e.g. the repository root).

Scale `paper` decides the claims at the papers' pool sizes: the default training data (1,200 patients,
128 px, the default epochs) with a MIMIC-like label structure (data.reader.label_profile=mimic) and
4,500 extra test-only patients (~12,400 test studies: N = 100 / 1,000 / 10,000 / full are all real
pools), the external cohort's test split enlarged the same way (1,000 extra patients). Runs resume
one by one within a session (--resume, from <out>); across sessions a seed is the unit: when all of
a seed's runs have finished, their audit JSONs and run records are kept in --keep (default
experiments/results/<scale>/s<seed>/, committed), and a later `--resume` loads kept seeds instead of
running them (their checkpoints are not needed any more). `--render-only` writes RESULTS.md from the
kept seeds alone.

Every number comes from `train.train()` / `evaluate.evaluate()` on configs composed from configs/
(the row names its overrides) and is read back from the audit JSON they write
(`<run>/final_audit/audit.json`: test split, best checkpoint; evaluate.py's `audit.json`). Claims
(issue 7):
  1. re-linkage rises with clinical specialisation: generic text tower < bert_encoder < llm_encoder
     (with stage-1 adaptation). "Generic" offline = experiment=generic_text (a text tower frozen at
     random init: its weights never see a report; see that file).
  2. R@1 as a multiple of chance at N = 100, 1,000, 10,000 (those the test split allows) and the full DB.
  3. the signal persists under pathology-matched hard negatives.
  4. DP on the heads (valid loss modes) cuts R@1 at the largest N by X% while macro AUROC moves by Y
     points; plus transfer to synthcxr_external without retraining.
  5. style robustness when abbreviation-heavy impression-only reports join training.
CIs: with one seed, the audit's 95% bootstrap-over-patients CI; with >= 2 seeds, a 95% t-interval
over seeds (training randomness included); differences are paired by seed. Where a stage cannot be
imported, its rows say "not available: <reason>"; a run that fails says "failed: <error>".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs import ROOT  # also sets CXR_RELINK_ROOT

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

log = logging.getLogger("reproduce")

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
# Wall time on 2 CPU cores shared with other jobs, per seed. tiny: measured (3.5 min). small: one
# bert_encoder stage-2 run measured at 4.5 min; ~11 runs per seed (LLM runs heavier). full: the default
# `python train.py` is sized at ~10 min; ~9 stage-1/2 runs per seed plus DP and evaluations.
RUNTIME_NOTE = {"tiny": "~3.5 min per seed (measured)", "small": "~1 h per seed (estimate)",
                "full": "~2.5 h per seed (estimate)", "paper": "~22 min per seed (measured 2026-12-01 on 2 AMD EPYC cores, load ~2)"}


def _kv(key: str, value: Any) -> list[str]:
    return [] if value is None else [f"{key}={value}"]


def scale_overrides(scale: dict[str, Any], kind: str) -> list[str]:
    """Hydra overrides that size a run: kind = stage2 | stage1 | dp | evaluate."""
    s = scale
    ov = ["trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]
    if kind != "evaluate":
        ov += ["logger=csv"]
    if kind == "evaluate":
        ov = ["data=synthcxr_external", *_kv("data.reader.num_patients", s["ext_patients"])]
        ov += _kv("data.reader.test_patients", s.get("ext_test_patients"))
    else:
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
    if kind == "evaluate":
        ov += _kv("audit.relinkage.n_boot", s["n_boot"]) + _kv("audit.probe.n_boot", s["probe_boot"])
        ov += _kv("audit.relinkage.directions", s["directions"]) + _kv("audit.probe.max_train_samples", s["probe_train"])
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

    from configs import compose

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


def execute(run: Run, resume: bool) -> Run:
    """train()/evaluate() on the composed config; the result is the audit JSON they write."""
    from audit.result import load_result

    path = audit_json_path(run)
    if resume and done(run):
        run.result = None if is_stage1(run) else load_result(path)
        log.info("%s: reused %s", run.name, run.out)
        return run
    t0 = time.time()
    try:
        run.out.mkdir(parents=True, exist_ok=True)
        cfg = compose_cfg(f"{run.entry}.yaml", run.overrides + run.sizing, run.out)
        if run.entry == "train":
            from train import train

            metrics, _ = train(cfg)
        else:
            from evaluate import evaluate

            metrics, _ = evaluate(cfg)
        run.extra["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, float)}
        if path.exists():
            run.result = load_result(path)
        elif not is_stage1(run):
            raise FileNotFoundError(f"{path} was not written")
    except Exception as e:  # noqa: BLE001 -- recorded in RESULTS.md, the other claims still run
        run.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        log.error("%s failed:\n%s", run.name, traceback.format_exc())
    run.seconds = time.time() - t0
    log.info("%s: %s in %.0f s", run.name, "failed" if run.error else "done", run.seconds)
    return run


def availability() -> dict[str, str | None]:
    """None when a stage can run, else the reason it cannot."""
    out: dict[str, str | None] = {}
    for stage, mods, cfgs in (("llm", ("models.llm_encoder", "models.text_adapt"), ("model/llm_encoder", "experiment/text_adapt")),
                              ("dp", ("models.dp.module", "models.dp.features"), ("experiment/dp_alignment",))):
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


@dataclass
class Stat:
    mean: float
    lo: float
    hi: float
    n: int
    how: str  # "bootstrap" (one seed) | "seeds" (t-interval over seeds)

    def fmt(self, pct: bool = True, digits: int = 1) -> str:
        f = 100.0 if pct else 1.0
        return f"{f * self.mean:.{digits}f} [{f * self.lo:.{digits}f}, {f * self.hi:.{digits}f}]"


NOT_SHOWN = "not shown (difference not significant)"


def ci_verdict(signs: list[int]) -> str:
    """+1: CI above chance, -1: CI below chance, 0: CI covers chance; for every tower/N checked."""
    if not signs:
        return "not available"
    if all(x == 1 for x in signs):
        return "holds"
    return "contradicted" if any(x == -1 for x in signs) else "not shown (× chance CI includes 1)"


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    from scipy import stats

    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, m, m
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    h = stats.t.ppf(0.975, len(xs) - 1) * sd / math.sqrt(len(xs))
    return m, m - h, m + h


def stat(rows: list[dict | None], value: str = "value", ci: str = "ci") -> Stat | None:
    rows = [r for r in rows if r is not None and r.get(value) is not None]
    if not rows:
        return None
    if len(rows) == 1:
        c = rows[0].get(ci) or [rows[0][value]] * 2
        return Stat(rows[0][value], c[0], c[1], 1, "bootstrap")
    m, lo, hi = t_interval([r[value] for r in rows])
    return Stat(m, lo, hi, len(rows), "seeds")


def compare(a: list[dict | None], b: list[dict | None], value: str = "value", ci: str = "ci") -> tuple[str, str]:
    """Is b > a? Paired by seed (t-interval of b - a) with >= 2 seeds; CI overlap with one."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return "not available", "–"
    if len(pairs) >= 2:
        m, lo, hi = t_interval([y[value] - x[value] for x, y in pairs])
        text = f"Δ = {100 * m:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] points (paired over {len(pairs)} seeds)"
    else:
        x, y = pairs[0]
        xl, xh = x.get(ci) or [x[value]] * 2
        yl, yh = y.get(ci) or [y[value]] * 2
        m = y[value] - x[value]
        lo, hi = (1.0, 1.0) if yl > xh else ((-1.0, -1.0) if yh < xl else (-1.0, 1.0))
        text = f"Δ = {100 * m:+.2f} points (one seed: 95% bootstrap CIs {'do not ' if lo * hi > 0 else ''}overlap)"
    verdict = "higher" if lo > 0 else ("lower" if hi < 0 else "no significant difference")
    return verdict, text


# --------------------------------------------------------------------------- the experiment plan


class Reproduction:
    def __init__(self, scale: str, seeds: list[int], out: Path, resume: bool, epsilon: float, keep: Path | None = None):
        self.scale_name, self.scale = scale, SCALES[scale]
        self.seeds, self.out, self.resume, self.epsilon = seeds, out, resume, epsilon
        self.keep = keep
        self.avail = availability()
        self.runs: dict[str, Run] = {}
        self.aliases: set[str] = set()  # names that point at another run (not listed twice)

    def run(self, name: str, entry: str, overrides: list[str], kind: str) -> Run:
        r = Run(name, entry, overrides, scale_overrides(self.scale, kind), self.out / "runs" / name)
        self.runs[name] = execute(r, self.resume)
        return r

    def skip(self, name: str, why: str) -> Run:
        r = Run(name, "train", [], [], self.out / "runs" / name, error=f"not available: {why}")
        self.runs[name] = r
        return r

    # ------------------------------------------------------------------ kept seeds (resume across sessions)

    def load_kept(self, s: int) -> bool:
        """Load seed ``s`` from --keep (its runs' records and audit JSONs) if it was kept."""
        from audit.result import load_result

        if self.keep is None or not (self.keep / f"s{s}" / "runs.json").exists():
            return False
        d = self.keep / f"s{s}"
        man = json.loads((d / "runs.json").read_text())
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
        log.info("seed %d: loaded %d kept runs from %s", s, len(man["runs"]), d)
        return True

    def keep_seed(self, s: int) -> None:
        """Copy seed ``s``'s audit JSONs and run records into --keep, once every run has finished (a run
        that failed is retried by the next --resume instead of being kept)."""
        if self.keep is None:
            return
        names = [n for n in self.runs if n.endswith(f"/s{s}") and n not in self.aliases]
        failed = [n for n in names if self.runs[n].error and not self.runs[n].error.startswith("not available")]
        if failed:
            log.warning("seed %d not kept: %s failed", s, ", ".join(failed))
            return
        d = self.keep / f"s{s}"
        d.mkdir(parents=True, exist_ok=True)
        recs = []
        for n in names:
            r = self.runs[n]
            rec = {"name": n, "entry": r.entry, "overrides": [o.replace(str(self.out), "<out>") for o in r.overrides],
                   "sizing": r.sizing, "error": r.error, "seconds": round(r.seconds, 1), "extra": r.extra, "audit_json": None}
            if r.result is not None:
                rec["audit_json"] = n.replace("/", "__") + ".json"
                # local paths (evaluate.py records its ckpt_path) as <out>, like the commands
                (d / rec["audit_json"]).write_text(audit_json_path(r).read_text().replace(str(self.out), "<out>"))
            recs.append(rec)
        aliases = {a: self.runs[a].name for a in self.aliases if a.endswith(f"/s{s}")}
        (d / "runs.json").write_text(json.dumps({"scale": self.scale_name, "runs": recs, "aliases": aliases}, indent=1))
        log.info("seed %d kept in %s", s, d)

    def execute_all(self) -> None:
        for s in self.seeds:
            if self.resume and self.load_kept(s):
                continue
            seed = f"seed={s}"
            self.run(f"generic/s{s}", "train", ["experiment=generic_text", seed], "stage2")
            self.run(f"bert/s{s}", "train", ["model=bert_encoder", seed], "stage2")
            if self.avail["llm"]:
                self.skip(f"stage1/s{s}", self.avail["llm"])
                self.skip(f"llm/s{s}", self.avail["llm"])
            else:
                st1 = self.run(f"stage1/s{s}", "train", ["experiment=text_adapt", seed], "stage1")
                hf = st1.out / "text_tower_hf"
                if st1.error or not hf.exists():
                    self.skip(f"llm/s{s}", f"stage 1 failed ({st1.error or 'no text_tower_hf written'})")
                else:
                    self.run(f"llm/s{s}", "train", ["model=llm_encoder", f"model.text_tower.pretrained={hf}", seed], "stage2")
            # claim 5: structured-only training vs abbreviation-heavy / impression-only reports joining it
            for tower in ("llm", "bert"):
                for arm in ("style_structured", "style_mixed_train"):
                    name = f"{arm}/{tower}/s{s}"
                    if tower == "llm":
                        st1 = self.runs[f"stage1/s{s}"]
                        if st1.error:
                            self.skip(name, st1.error.replace("not available: ", ""))
                            continue
                        model = ["model=llm_encoder", f"model.text_tower.pretrained={st1.out / 'text_tower_hf'}"]
                    else:
                        model = ["model=bert_encoder"]
                    self.run(name, "train", [f"experiment={arm}", *model, seed], "stage2")
            # claim 4: DP on the heads of the most specialised stage-2 model available
            base = self.runs[f"llm/s{s}"] if not self.runs[f"llm/s{s}"].error else self.runs[f"bert/s{s}"]
            self.runs[f"base/s{s}"] = base
            self.aliases.add(f"base/s{s}")
            for tag, extra in (("nonprivate", ["model.dp.enabled=false", "model.loss.mode=public_negatives"]),
                               ("dp_public_negatives", ["model.loss.mode=public_negatives", f"model.dp.target_epsilon={self.epsilon}"]),
                               ("dp_group_clipping", ["model.loss.mode=group_clipping", f"model.dp.target_epsilon={self.epsilon}"])):
                name = f"{tag}/s{s}"
                if self.avail["dp"]:
                    self.skip(name, self.avail["dp"])
                elif base.error or not base.ckpt.exists():
                    self.skip(name, f"no stage-2 checkpoint ({base.error or base.ckpt})")
                else:
                    self.run(name, "train", ["experiment=dp_alignment", f"model.backbone_ckpt={base.ckpt}", *extra, seed], "dp")
            for tag in ("base", "dp_public_negatives", "dp_group_clipping"):
                src = self.runs[f"{tag}/s{s}"]
                name = f"external/{tag}/s{s}"
                if src.error or not src.ckpt.exists():
                    self.skip(name, f"no checkpoint ({src.error or src.ckpt})")
                else:
                    self.run(name, "evaluate", [f"ckpt_path={src.ckpt}", "audit=all", f"seed={s}"], "evaluate")
            self.keep_seed(s)

    # ------------------------------------------------------------------ claims -> markdown

    def seed_minutes(self) -> str:
        """Summed run time of each seed (kept seeds: as recorded when they ran)."""
        return ", ".join(f"s{s} {sum(r.seconds for n, r in self.runs.items() if n.endswith(f'/s{s}') and n not in self.aliases) / 60:.0f} min"
                         for s in self.seeds)

    def per_seed_note(self, key: str, prefixes: list[str]) -> list[str]:
        """Supplementary, not the verdict: each run's own 95% bootstrap CI of × chance, lowest over N and
        seeds. With few seeds the t-interval over seeds is wide when one seed trains worse; this says
        whether every single run was nevertheless above chance."""
        if len(self.seeds) < 2:
            return []
        out = []
        for p in prefixes:
            lows = [(r["x_chance_ci"][0], s, r["n"]) for s, res in zip(self.seeds, self.results(p)) if res
                    for r in res["relinkage"].get(key, {}).get("recall", []) if r["k"] == 1 and r.get("x_chance_ci")]
            if lows:
                lo, s, n = min(lows)
                out.append(f"- Per run (supplementary, not the verdict's protocol): `{p}`'s lowest 95% bootstrap lower bound "
                           f"of × chance over {len(self.seeds)} seeds and every N: {lo:.2f} (seed {s}, N = {n}).")
        return out

    def dp_n(self) -> str:
        """Claim 4's pool: N = 10,000 as in arXiv 2606.02276 where the test split reaches it, else the full DB."""
        return "10000" if any(recall(r, n="10000") for r in self.results("base")) else "full"

    def dp_n_text(self) -> str:
        return ("N = 10,000 (arXiv 2606.02276's pool)" if self.dp_n() == "10000"
                else "the full test database (the largest N; the split does not reach N = 10,000)")

    def results(self, prefix: str) -> list[dict | None]:
        return [self.runs[f"{prefix}/s{s}"].result for s in self.seeds]

    def cfg_of(self, prefix: str) -> str:
        r = self.runs[f"{prefix}/s{self.seeds[0]}"]
        if r.error and r.error.startswith("not available"):
            return f"– ({r.error})"
        cmd = r.command.replace(f"seed={self.seeds[0]}", "seed=<s>").replace(f"/s{self.seeds[0]}/", "/s<s>/")
        return f"`{cmd.replace(str(self.out), '<out>')}`"

    def status(self, prefix: str) -> str | None:
        errs = [self.runs[f"{prefix}/s{s}"].error for s in self.seeds if self.runs[f"{prefix}/s{s}"].error]
        return errs[0] if errs else None

    def render(self, seconds: float) -> tuple[str, list[tuple[str, str, str, str]]]:
        lines: list[str] = []
        summary: list[tuple[str, str, str, str]] = []  # (claim, verdict, evidence, config)
        n_seeds = len(self.seeds)
        ci_note = ("95% bootstrap-over-patients CI of the one run" if n_seeds == 1
                   else f"mean over {n_seeds} seeds, 95% t-interval over seeds")

        # ---- claim 1
        towers = [("generic", "generic text tower (frozen at random init)"), ("bert", "bert_encoder"),
                  ("llm", "llm_encoder + stage-1 adaptation")]
        lines += ["## Claim 1: re-linkage rises with clinical specialisation", "",
                  f"Image→report R@1 on the internal test split (values in %, {ci_note}).", "",
                  "| text tower | config | N | R@1 (%) | × chance |", "|---|---|---|---:|---:|"]
        hn = {}
        for key, title in towers:
            res = self.results(key)
            err = self.status(key)
            n = headline_n(next((r for r in res if r), None))
            hn[key] = n
            st, xs = stat([recall(r, n=n) for r in res]), stat([recall(r, n=n) for r in res], "x_chance", "x_chance_ci")
            if not st:
                lines.append(f"| {title} | {self.cfg_of(key)} | – | {err or 'no result'} | – |")
            else:
                lines.append(f"| {title} | {self.cfg_of(key)} | {n} | {st.fmt()} | {xs.fmt(pct=False, digits=2)} |")
        n = hn["bert"]
        v1, t1 = compare([recall(r, n=n) for r in self.results("generic")], [recall(r, n=n) for r in self.results("bert")])
        v2, t2 = compare([recall(r, n=n) for r in self.results("bert")], [recall(r, n=n) for r in self.results("llm")])
        if "lower" in (v1, v2):
            verdict = "contradicted"
        elif v1 == v2 == "higher":
            verdict = "holds"
        elif "not available" in (v1, v2):
            verdict = "not available"
        else:
            verdict = NOT_SHOWN
        lines += ["", f"- bert_encoder vs generic: **{v1}** ({t1}).", f"- llm_encoder (+stage 1) vs bert_encoder: **{v2}** ({t2}).",
                  f"- Verdict: **{verdict}**.", ""]
        summary.append(("1. generic < bert_encoder < llm_encoder (+stage 1)", verdict, f"bert−generic: {t1}; llm−bert: {t2}",
                        f"{self.cfg_of('generic')}, {self.cfg_of('bert')}, {self.cfg_of('llm')}"))

        # ---- claim 2
        lines += ["## Claim 2: R@1 as a multiple of chance across pool sizes", "",
                  f"Image→report R@1 × chance (chance = 1/N) at every N the test split allows ({ci_note}).", ""]
        all_ns: list[str] = []
        for key, _ in towers:
            for r in self.results(key):
                for n_ in pool_sizes(r):
                    if n_ not in all_ns:
                        all_ns.append(n_)
        all_ns.sort(key=lambda x: (x == "full", int(x) if x.isdigit() else 0))
        m_full = next((recall(r, n="full")["n_value"] for k, _ in towers for r in self.results(k) if recall(r, n="full")), None)
        lines += ["| text tower | " + " | ".join(f"N={n_}" + (f" (M={m_full})" if n_ == "full" else "") for n_ in all_ns) + " |",
                  "|---|" + "---:|" * len(all_ns)]
        ok2 = []
        for key, title in towers:
            cells = []
            for n_ in all_ns:
                xs = stat([recall(r, n=n_) for r in self.results(key)], "x_chance", "x_chance_ci")
                cells.append(xs.fmt(pct=False, digits=2) if xs else "–")
                if xs and key != "generic":
                    ok2.append(xs.lo > 1.0 and 1 or (-1 if xs.hi < 1.0 else 0))
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        missing = [n_ for n_ in ("100", "1000", "10000") if n_ not in all_ns]
        verdict2 = ci_verdict(ok2)
        lines += ["", f"- N not reachable on this test split (pools larger than it are the full database): {missing or 'none'}.",
                  f"- Verdict (holds: every trained tower's × chance CI above 1 at every N; contradicted: one below 1): "
                  f"**{verdict2}**.", *self.per_seed_note("i2t", [k for k, _ in towers if k != "generic"]), ""]
        summary.append(("2. R@1 × chance at N = 100 … full DB", verdict2, f"N evaluated: {', '.join(all_ns)}",
                        f"{self.cfg_of('bert')}, {self.cfg_of('llm')}"))

        # ---- claim 3
        lines += ["## Claim 3: the signal persists under pathology-matched hard negatives", "",
                  f"Image→report R@1 with candidates restricted to reports with the same 14-label vector; chance is "
                  f"the effective 1/pool ({ci_note}).", "",
                  "| text tower | N | hard-neg R@1 (%) | effective chance (%) | × chance |", "|---|---|---:|---:|---:|"]
        ok3 = []
        for key, title in towers:
            res = self.results(key)
            n_ = "100" if any(recall(r, "hardneg/i2t", n="100") for r in res) else "full"
            rows = [recall(r, "hardneg/i2t", n=n_) for r in res]
            st, xs = stat(rows), stat(rows, "x_chance", "x_chance_ci")
            if not st:
                lines.append(f"| {title} | – | {self.status(key) or 'no hard-negative result'} | – | – |")
                continue
            chance = sum(r["chance"] for r in rows if r) / max(1, sum(1 for r in rows if r))
            lines.append(f"| {title} | {n_} | {st.fmt()} | {100 * chance:.1f} | {xs.fmt(pct=False, digits=2)} |")
            if key != "generic":
                ok3.append(xs.lo > 1.0 and 1 or (-1 if xs.hi < 1.0 else 0))
        verdict3 = ci_verdict(ok3)
        lines += ["", "Effective pools at every N: a pool is the query's label group less its own patient, so it is "
                  "smaller than N wherever the group is (mean over queries, averaged over seeds).", "",
                  "| text tower | N | mean effective pool | hard-neg R@1 × effective chance |", "|---|---|---:|---:|"]
        for key, title in towers:
            res = self.results(key)
            for n_ in pool_sizes(next((r for r in res if r), None), "hardneg/i2t"):
                rows = [recall(r, "hardneg/i2t", n=n_) for r in res]
                xs = stat(rows, "x_chance", "x_chance_ci")
                pools = [r["effective_pool_mean"] for r in rows if r and r.get("effective_pool_mean") is not None]
                if xs and pools:
                    lines.append(f"| {title} | {n_} | {sum(pools) / len(pools):,.0f} | {xs.fmt(pct=False, digits=2)} |")
        lines += ["", f"- Verdict (trained towers' hard-negative × chance CI above 1): **{verdict3}**.",
                  *self.per_seed_note("hardneg/i2t", [k for k, _ in towers if k != "generic"]), ""]
        summary.append(("3. signal persists under hard negatives", verdict3, "hardneg/i2t R@1 × effective chance",
                        f"{self.cfg_of('bert')}, {self.cfg_of('llm')} (audit hardneg)"))

        # ---- claim 4
        lines += ["## Claim 4: DP on the projection heads — re-linkage cut vs utility; external transfer", "",
                  f"Stage 3 (experiment=dp_alignment) on the stage-2 checkpoint {self.cfg_of('base')}, target ε = {self.epsilon} "
                  f"(valid loss modes only); before = that checkpoint's own final audit. R@1 at {self.dp_n_text()} "
                  f"and linear-probe macro AUROC ({ci_note}).", "",
                  f"| run | config | ε spent | R@1 at N = {self.dp_n()} (%) | cut vs before | macro AUROC (%) | Δ AUROC (points) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        before = self.results("base")
        n4 = self.dp_n()
        b_r = stat([recall(r, n=n4) for r in before])
        b_a = stat([probe_row(r) for r in before])
        lines.append(f"| before DP (stage 2) | {self.cfg_of('base')} | – | {b_r.fmt() if b_r else '–'} | – | "
                     f"{b_a.fmt() if b_a else '–'} | – |")
        verdict4 = "not available"
        evid4 = self.status("dp_public_negatives") or ""
        for tag in ("nonprivate", "dp_public_negatives", "dp_group_clipping"):
            res = self.results(tag)
            err = self.status(tag)
            if err and not any(res):
                lines.append(f"| {tag} | {self.cfg_of(tag)} | – | {err} | | | |")
                continue
            r_ = stat([recall(r, n=n4) for r in res])
            a_ = stat([probe_row(r) for r in res])
            eps = [self.runs[f"{tag}/s{s}"].extra.get("metrics", {}).get("dp/epsilon") for s in self.seeds]
            eps_s = "–" if tag == "nonprivate" or not any(e is not None for e in eps) else \
                f"{sum(e for e in eps if e is not None) / sum(1 for e in eps if e is not None):.3f}"
            cut = (100 * (b_r.mean - r_.mean) / b_r.mean) if (b_r and r_ and b_r.mean > 0) else None
            dA = (100 * (a_.mean - b_a.mean)) if (a_ and b_a) else None
            lines.append(f"| {tag} | {self.cfg_of(tag)} | {eps_s} | {r_.fmt() if r_ else '–'} | "
                         f"{'–' if cut is None else f'{cut:.1f}%'} | {a_.fmt() if a_ else '–'} | {'–' if dA is None else f'{dA:+.2f}'} |")
            if tag == "dp_public_negatives" and r_ and b_r:
                vr, tr = compare([recall(r, n=n4) for r in res], [recall(r, n=n4) for r in before])
                if vr == "higher":
                    verdict4 = "holds" if (dA is not None and dA > -1.0) else "contradicted (AUROC fell by 1 point or more)"
                else:
                    verdict4 = "contradicted (R@1 rose)" if vr == "lower" else NOT_SHOWN
                evid4 = (f"R@1 cut {cut:.1f}%" if cut is not None else "R@1 before DP is 0: nothing to cut") + \
                    f" (before − after: {tr})" + ("" if dA is None else f", AUROC {dA:+.2f} points")
        lines += ["", f"Criterion: with public_negatives, R@1 at N = {n4} significantly lower than before DP, and macro "
                  "AUROC down by less than 1 point. The non-private row separates the effect of noise from that of "
                  "further head training.", f"- Verdict: **{verdict4}**" + (f" ({evid4})." if evid4 else "."), ""]
        summary.append(("4. DP on heads cuts R@1 at largest N by X% while AUROC moves Y", verdict4, evid4,
                        f"{self.cfg_of('dp_public_negatives')}, {self.cfg_of('dp_group_clipping')}"))
        # external transfer
        lines += ["**External transfer** (synthcxr_external test split, no retraining; evaluate.py):", "",
                  "| checkpoint | config | N | R@1 (%) | × chance | macro AUROC (%) |", "|---|---|---|---:|---:|---:|"]
        ok_t = []
        for tag in ("base", "dp_public_negatives", "dp_group_clipping"):
            res = self.results(f"external/{tag}")
            err = self.status(f"external/{tag}")
            if err and not any(res):
                lines.append(f"| {tag} | {self.cfg_of(f'external/{tag}')} | – | {err} | | |")
                continue
            n_ = headline_n(next((r for r in res if r), None))
            r_ = stat([recall(r, n=n_) for r in res])
            x_ = stat([recall(r, n=n_) for r in res], "x_chance", "x_chance_ci")
            a_ = stat([probe_row(r) for r in res])
            lines.append(f"| {tag} | {self.cfg_of(f'external/{tag}')} | {n_} | {r_.fmt() if r_ else '–'} | "
                         f"{x_.fmt(pct=False, digits=2) if x_ else '–'} | {a_.fmt() if a_ else '–'} |")
            if tag == "base" and x_:
                ok_t.append(x_.lo > 1.0 and 1 or (-1 if x_.hi < 1.0 else 0))
        verdict_t = ci_verdict(ok_t)
        lines += ["", f"- Transfer verdict (the stage-2 model links external pairs above chance without retraining): "
                  f"**{verdict_t}**.", ""]
        summary.append(("4b. transfer to synthcxr_external without retraining", verdict_t, "external R@1 × chance",
                        self.cfg_of("external/base")))

        # ---- claim 5
        lines += ["## Claim 5: style robustness when abbreviation-heavy, impression-only reports join training", "",
                  "Same structured val/test reports in both arms (train_style_mix touches only the training split); "
                  f"image→report R@1 on the structured test reports ({ci_note}).", "",
                  "| text tower | structured-only training | + abbreviated / impression-only | difference |", "|---|---|---|---|"]
        verdict5, evid5 = "not available", ""
        for tower, title in (("llm", "llm_encoder + stage 1"), ("bert", "bert_encoder")):
            a_res, b_res = self.results(f"style_structured/{tower}"), self.results(f"style_mixed_train/{tower}")
            err = self.status(f"style_structured/{tower}") or self.status(f"style_mixed_train/{tower}")
            if err and not (any(a_res) and any(b_res)):
                lines.append(f"| {title} | {err} | | |")
                continue
            n_ = headline_n(next((r for r in a_res if r), None))
            sa, sb = stat([recall(r, n=n_) for r in a_res]), stat([recall(r, n=n_) for r in b_res])
            if not (sa and sb):
                lines.append(f"| {title} | {err or 'no result'} | | |")
                continue
            v, t = compare([recall(r, n=n_) for r in a_res], [recall(r, n=n_) for r in b_res])
            lines.append(f"| {title} (N={n_}) | {sa.fmt()} | {sb.fmt()} | {v}: {t} |")
            if tower == "llm":
                verdict5 = "contradicted" if v == "lower" else ("not available" if v == "not available" else "holds (no significant drop)")
                evid5 = f"llm: {v} ({t})"
        lines += ["", "Criterion: the LLM tower's R@1 on structured test reports does not drop significantly when the "
                  "other styles join training.", f"- Verdict: **{verdict5}**.", ""]
        summary.append(("5. LLM tower robust to abbreviated / impression-only training reports", verdict5, evid5,
                        f"{self.cfg_of('style_structured/llm')}, {self.cfg_of('style_mixed_train/llm')}"))

        head = [
            "# Reproduction on the synthetic cohort", "",
            f"`python -m experiments.reproduce --scale {self.scale_name} --seeds {len(self.seeds)}` — seeds {self.seeds}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()} ({os.cpu_count()} CPUs), "
            f"this invocation {seconds / 60:.1f} min; runs per seed: {self.seed_minutes()} "
            f"(expected: {RUNTIME_NOTE[self.scale_name]}).", "",
            f"Scale `{self.scale_name}` adds these overrides to every stage-2 run: "
            f"`{' '.join(scale_overrides(self.scale, 'stage2')) or '(none)'}` (stage 1, DP and evaluate.py runs get the "
            "matching data sizes). Each row's config is the command that made it, plus these. A claim that does not "
            "hold here is reported as such; the cohort was not tuned to make any claim hold. "
            + SCALE_CAVEAT.get(self.scale_name, SCALE_CAVEAT["tiny"]), "",
            "## Summary", "", "| claim | holds here? | evidence | config |", "|---|---|---|---|",
        ]
        head += [f"| {c} | **{v}** | {e} | {cfg} |" for c, v, e, cfg in summary]
        head += [""]
        return "\n".join(head + lines), summary

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        ax = axes[0]
        for i, (key, title) in enumerate((("generic", "generic"), ("bert", "bert_encoder"), ("llm", "llm + stage 1"))):
            res = self.results(key)
            ns = pool_sizes(next((r for r in res if r), None))
            pts = [(recall(next(r for r in res if r), n=n)["n_value"], stat([recall(r, n=n) for r in res], "x_chance", "x_chance_ci"))
                   for n in ns]
            if pts:
                xs = [p[0] for p in pts]
                ax.errorbar(xs, [p[1].mean for p in pts], yerr=[[p[1].mean - p[1].lo for p in pts], [p[1].hi - p[1].mean for p in pts]],
                            marker="o", capsize=3, label=title, color=f"C{i}")
        ax.axhline(1.0, color="k", ls="--", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("candidate pool N (largest = full test DB)")
        ax.set_ylabel("image→report R@1 × chance")
        ax.set_title("claims 1–2", fontsize=10)
        ax.legend(fontsize=8)
        ax = axes[1]
        labels, r1, auc = [], [], []
        for tag, title in (("base", "before DP"), ("nonprivate", "non-private"), ("dp_public_negatives", "DP public-neg"),
                           ("dp_group_clipping", "DP group-clip")):
            res = self.results(tag)
            s_r = stat([recall(r, n=self.dp_n()) for r in res])
            s_a = stat([probe_row(r) for r in res])
            if s_r and s_a:
                labels.append(title)
                r1.append(s_r)
                auc.append(s_a)
        if labels:
            x = range(len(labels))
            ax.bar([i - 0.2 for i in x], [100 * s.mean for s in r1], 0.4, yerr=[[100 * (s.mean - s.lo) for s in r1], [100 * (s.hi - s.mean) for s in r1]],
                   capsize=3, label=f"R@1 at N = {self.dp_n()} (%)")
            ax2 = ax.twinx()
            ax2.bar([i + 0.2 for i in x], [100 * s.mean for s in auc], 0.4, color="C1", yerr=[[100 * (s.mean - s.lo) for s in auc], [100 * (s.hi - s.mean) for s in auc]],
                    capsize=3, label="macro AUROC (%)")
            ax2.set_ylabel("macro AUROC (%)")
            ax.set_xticks(list(x), labels, fontsize=8)
            ax.set_ylabel(f"R@1 at N = {self.dp_n()} (%)")
            ax.legend(loc="upper left", fontsize=8)
            ax2.legend(loc="upper right", fontsize=8)
        ax.set_title(f"claim 4 (ε = {self.epsilon})", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1); default 1 for tiny, 3 otherwise")
    ap.add_argument("--epsilon", type=float, default=0.34, help="target epsilon of the DP rows (arXiv 2606.02276's 0.34)")
    ap.add_argument("--out", default=str(ROOT / "logs" / "reproduce"), help="runs go to <out>/<scale>/runs/")
    ap.add_argument("--results", default=None, help="RESULTS.md path (default <out>/<scale>/RESULTS.md)")
    ap.add_argument("--resume", action="store_true", help="reuse runs whose audit JSON already exists")
    ap.add_argument("--keep", default=None, help="keep finished seeds here (default: experiments/results/<scale> "
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
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.scale == "tiny" else 3)))
    out = Path(args.out) / args.scale
    t0 = time.time()
    keep = args.keep or (str(ROOT / "experiments" / "results" / args.scale) if args.scale in KEEP_BY_DEFAULT else None)
    keep = None if keep in (None, "none") else Path(keep)
    rep = Reproduction(args.scale, seeds, out, args.resume, args.epsilon, keep)
    if args.render_only:
        rep.seeds = [s for s in seeds if rep.load_kept(s)]
        if not rep.seeds:
            raise SystemExit(f"--render-only: no kept seed among {seeds} in {keep}")
    else:
        rep.execute_all()
    md, _ = rep.render(time.time() - t0)
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
    print(md)
    return results


if __name__ == "__main__":
    main()
