"""Running the plan with keep/resume bookkeeping: each run is train()/evaluate() on a composed config, every
finished run is kept (its audit JSON and record) as soon as it finishes, and kept seeds are loaded, completed
or set aside across sessions (the rules: cli.py's docstring)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path

from cxr_relink.configs import ROOT  # also sets CXR_RELINK_ROOT
from experiments.reproduce.plan import (ADAPTIVE, ADAPTIVE_ATTACKS, ADAPTIVE_OVERRIDES, BEFORE_DP, DP_ARMS, EXTERNAL,
                                        PROTOCOL, PROTOCOL_NOTE, SCALES, plan_names, scale_overrides)
from experiments.reproduce.records import Records, Run, adaptive_row, dp_record, headline_n, probe_row, recall

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

log = logging.getLogger("reproduce")


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
        best = [(r["value"], a) for a in ADAPTIVE_ATTACKS if (r := adaptive_row(res, a, n))]
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


# --------------------------------------------------------------------------- the reproduction


class Reproduction(Records):
    """The plan run (or loaded from kept seeds) for some seeds: it fills in the records that render.py renders."""

    def __init__(self, scale: str, seeds: list[int], out: Path, resume: bool, epsilon: float, keep: Path | None = None):
        super().__init__(scale, seeds, out, epsilon, keep=keep)
        self.scale = SCALES[scale]
        self.resume = resume
        self.avail = availability()
        self._recorded: dict[int, dict[str, dict]] = {}  # seed -> run name -> its kept record (recorded())
        # Completing a complete kept seed whose plan has grown (complete_kept): its kept runs, and those re-run
        # only because a new run needs their checkpoint (kept files hold audit JSONs, not checkpoints).
        self.kept_runs: dict[str, Run] = {}
        self.rebuild: set[str] = set()
        self.completing: set[int] = set()

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
        if seed not in self._recorded:
            self._recorded[seed] = {x["name"]: x for x in (self.manifest(seed) or {}).get("runs", [])}
        return self._recorded[seed].get(name)

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
        """Kept seeds of older protocols (<keep>/protocol<v>/s<n>, or <keep>/s<n> itself): their runs' audit
        results, for the appendix."""
        from cxr_relink.audit.result import load_result

        if self.keep is None:
            return
        for p in sorted(self.keep.glob("protocol*/s*/runs.json")) + sorted(self.keep.glob("s*/runs.json")):
            man = json.loads(p.read_text())
            v = man.get("protocol", 1)
            if v != PROTOCOL:
                self.old[(v, int(p.parent.name[1:]))] = [(rec["name"], load_result(p.parent / rec["audit_json"]))
                                                         for rec in man["runs"] if rec.get("audit_json")]

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

    def missing_runs(self, s: int) -> list[str]:
        return [n for n in plan_names(s) if n not in self.runs]

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
