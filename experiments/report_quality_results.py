"""Issue 15's results: retrieved-report quality of the reproduction's text-tower and style arms.

    python -m experiments.report_quality_results                       # default scale (the configs' defaults), seed 0
    python -m experiments.report_quality_results --scale tiny --arms bert,generic
Trains each arm exactly as experiments/reproduce.py does (same overrides, same run folders:
<out>/<scale>/runs/<arm>/s<seed>, so a reproduce run's checkpoints are reused and vice versa), then
evaluates the arm's selected checkpoint (lowest val/loss) with
`python evaluate.py "audit=[standard,report_quality]" ckpt_path=...` on the cohort it was trained on,
into <out>/<scale>/report_quality/<arm>/s<seed>/audit.json. Resumable run by run: a train run whose
audit JSON and checkpoint exist, and an evaluation whose audit.json exists, are reused. Writes
<out>/<scale>/report_quality.md (table) and report_quality.json (the numbers, commands, seconds), merged
with earlier invocations at the same scale and seed.
Arms run in the order given; an arm whose stage 1 failed or is missing is reported, not silently dropped.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: shared CPU (see tests/conftest.py)

import argparse
import json
import logging
import platform
import time
import warnings
from pathlib import Path
from typing import Any

from cxr_relink.configs import ROOT
from experiments.reproduce import SCALES, Run, execute, recall, scale_overrides

log = logging.getLogger("report_quality_results")

# The style arms train on other reports than the default cohort, so their evaluation must see the same
# cohort (test reports *and* the training reports that form the retrieval database).
_STRUCTURED = "data.reader.style_mix={structured:1.0,impression_only:0.0,abbreviated:0.0}"
STYLE_DATA = {
    "style_structured": [_STRUCTURED, "data.reader.train_style_mix=null"],
    "style_mixed_train": [_STRUCTURED, "data.reader.train_style_mix={structured:0.4,impression_only:0.3,abbreviated:0.3}"],
}
ALL_ARMS = ["bert", "generic", "stage1", "llm", "style_structured/bert", "style_mixed_train/bert",
            "style_structured/llm", "style_mixed_train/llm"]
TITLES = {"generic": "generic text tower (frozen at random init)", "bert": "bert_encoder (default)",
          "llm": "llm_encoder + stage 1", "style_structured/bert": "bert_encoder, structured-only training",
          "style_mixed_train/bert": "bert_encoder, mixed-style training",
          "style_structured/llm": "llm_encoder + stage 1, structured-only training",
          "style_mixed_train/llm": "llm_encoder + stage 1, mixed-style training"}


def arm_train_overrides(arm: str, seed: int, stage1_dir: Path) -> tuple[list[str], str]:
    """(overrides, kind) of an arm, as experiments/reproduce.py's Reproduction.execute_all builds them."""
    s = f"seed={seed}"
    llm = ["model=llm_encoder", f"model.text_tower.pretrained={stage1_dir / 'text_tower_hf'}"]
    if arm == "generic":
        return ["experiment=generic_text", s], "stage2"
    if arm == "bert":
        return ["model=bert_encoder", s], "stage2"
    if arm == "stage1":
        return ["experiment=text_adapt", s], "stage1"
    if arm == "llm":
        return [*llm, s], "stage2"
    style, tower = arm.split("/")
    return [f"experiment={style}", *(llm if tower == "llm" else ["model=bert_encoder"]), s], "stage2"


def eval_sizing(scale: dict[str, Any]) -> list[str]:
    """The scale's data sizes on the *training* cohort (reproduce's evaluate kind targets the external one)."""
    ov = ["trainer.enable_progress_bar=false"]
    for key, val in (("data.reader.num_patients", scale["patients"]), ("data.reader.image_size", scale["image"]),
                     ("data.image_size", scale["image"]), ("audit.relinkage.n_boot", scale["n_boot"]),
                     ("audit.report_quality.n_boot", scale["n_boot"])):
        if val is not None:
            ov.append(f"{key}={val}")
    return ov


def selected_ckpt(run_dir: Path) -> Path:
    """The checkpoint the final audit used: the one kept by lowest val/loss (save_top_k=1), else last.ckpt."""
    best = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    return best[-1] if len(best) == 1 else run_dir / "checkpoints" / "last.ckpt"


def summarise(res: dict | None) -> dict[str, Any] | None:
    """The table's numbers from an evaluate.py audit.json."""
    if not res or not res.get("report_quality"):
        return None
    rq = res["report_quality"]
    g, lab, lex = rq.get("green_exact") or {}, (rq.get("labels") or {}).get("positive_only") or {}, rq.get("lexical") or {}
    bl = g.get("baselines") or {}
    sl, rnd = bl.get("same_labels_report") or {}, bl.get("random_report") or {}
    r1 = recall(res, n="100") or recall(res, n="full") or {}
    return {
        "n_queries": rq["n_queries"], "n_database_reports": rq.get("n_database_reports"),
        "green_exact": g.get("value"), "green_exact_ci": g.get("ci"),
        "frac_queries_perfect": g.get("frac_queries_perfect"),
        "label_micro_f1": lab.get("micro_f1"), "label_micro_f1_ci": lab.get("micro_f1_ci"),
        "label_macro_f1": lab.get("macro_f1"), "label_macro_f1_ci": lab.get("macro_f1_ci"),
        "bleu4": lex.get("bleu4"), "rouge_l": lex.get("rouge_l"),
        "random_report": rnd.get("value"), "same_labels_report": sl.get("value"), "same_labels_ci": sl.get("ci"),
        "same_labels_n_without": sl.get("n_queries_without_one"),
        "model_on_same_label_queries": sl.get("model_value_same_queries"),
        "model_on_same_label_queries_ci": sl.get("model_value_same_queries_ci"),
        "relink_n": r1.get("n"), "relink_r1": r1.get("value"), "relink_r1_ci": r1.get("ci"),
        "relink_x_chance": r1.get("x_chance"), "relink_x_chance_ci": r1.get("x_chance_ci"),
    }


def _f(x: float | None, digits: int = 3, pct: bool = False) -> str:
    return "–" if x is None else f"{(100 * x if pct else x):.{digits}f}"


def _ci(ci: list | None, digits: int = 3, pct: bool = False) -> str:
    return "" if not ci else f" [{_f(ci[0], digits, pct)}, {_f(ci[1], digits, pct)}]"


def render(rows: dict[str, dict], header: str) -> str:
    lines = [header, "",
             "| arm | GREEN-exact [95% CI] | perfect label retriever (same queries: model) | random report | "
             "label F1 micro / macro (%) | BLEU-4 | ROUGE-L | re-linkage R@1 (%) at N | × chance |",
             "|---|---|---|---:|---|---:|---:|---|---:|"]
    for arm, row in rows.items():
        s = row.get("summary")
        if not s:
            lines.append(f"| {TITLES.get(arm, arm)} | {row.get('error') or 'no result'} | | | | | | | |")
            continue
        pl = f"{_f(s['same_labels_report'])}{_ci(s['same_labels_ci'])} ({_f(s['model_on_same_label_queries'])})"
        lines.append(
            f"| {TITLES.get(arm, arm)} | {_f(s['green_exact'])}{_ci(s['green_exact_ci'])} | {pl} | {_f(s['random_report'])} | "
            f"{_f(s['label_micro_f1'], 1, True)} / {_f(s['label_macro_f1'], 1, True)} | {_f(s['bleu4'])} | {_f(s['rouge_l'])} | "
            f"{_f(s['relink_r1'], 1, True)}{_ci(s['relink_r1_ci'], 1, True)} at {s['relink_n']} | "
            f"{_f(s['relink_x_chance'], 1)}{_ci(s['relink_x_chance_ci'], 1)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full", help="full = the configs' defaults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default=",".join(ALL_ARMS[:6]), help=f"comma-separated, in order; of {ALL_ARMS}")
    ap.add_argument("--out", default=str(ROOT / "logs" / "reproduce"), help="runs go to <out>/<scale>/runs/ (as reproduce)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "train", "evaluate", "models", "callbacks", "datamodules"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    scale, out = SCALES[args.scale], Path(args.out) / args.scale
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ALL_ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {ALL_ARMS}")
    stage1_dir = out / "runs" / "stage1" / f"s{args.seed}"
    rows: dict[str, dict] = {}
    t0 = time.time()
    for arm in arms:
        ov, kind = arm_train_overrides(arm, args.seed, stage1_dir)
        row: dict[str, Any] = {"train_command": "python train.py " + " ".join(ov)}
        rows[arm] = row
        if "llm" in arm and arm != "stage1" and not (stage1_dir / "text_tower_hf").exists():
            row["error"] = f"no stage-1 tower at {stage1_dir / 'text_tower_hf'} (run the stage1 arm first)"
            continue
        tr = execute(Run(f"{arm}/s{args.seed}", "train", ov, scale_overrides(scale, kind), out / "runs" / arm / f"s{args.seed}"),
                     resume=True)
        row["train_seconds"], row["train_sizing"] = round(tr.seconds, 1), tr.sizing
        if tr.error:
            row["error"] = f"train failed: {tr.error}"
            continue
        if arm == "stage1":
            continue
        ckpt = selected_ckpt(tr.out)
        style = arm.split("/")[0]
        ev_ov = [f"ckpt_path={ckpt}", "audit=[standard,report_quality]", f"seed={args.seed}", *STYLE_DATA.get(style, [])]
        ev = execute(Run(f"report_quality/{arm}/s{args.seed}", "evaluate", ev_ov, eval_sizing(scale),
                         out / "report_quality" / arm / f"s{args.seed}"), resume=True)
        row["eval_command"] = ev.command.replace(str(ROOT) + "/", "")
        row["eval_seconds"] = round(ev.seconds, 1)
        if ev.error:
            row["error"] = f"evaluate failed: {ev.error}"
            continue
        row["summary"] = summarise(ev.result)
        row["audit_json"] = str(out / "report_quality" / arm / f"s{args.seed}" / "audit.json")
    header = (f"Retrieved-report quality by arm — scale `{args.scale}`, seed {args.seed}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()} ({os.cpu_count()} CPUs), "
              f"{(time.time() - t0) / 60:.1f} min this invocation (reused runs count 0).")
    # Merge with earlier invocations at this scale and seed (one table for all arms); a reused arm keeps the
    # wall times of the invocation that ran it.
    path = out / "report_quality.json"
    prev = json.loads(path.read_text()) if path.exists() else {}
    prev = prev.get("arms", {}) if (prev.get("scale"), prev.get("seed")) == (args.scale, args.seed) else {}
    for arm, row in rows.items():
        row["reused"] = not row.get("train_seconds") and not row.get("eval_seconds")
        for key in ("train_seconds", "eval_seconds"):
            if row["reused"] and prev.get(arm, {}).get(key):
                row[key] = prev[arm][key]
    merged = {a: {**prev, **rows}[a] for a in ALL_ARMS if a in {**prev, **rows}}
    md = render({a: r for a, r in merged.items() if a != "stage1"}, header)
    (out / "report_quality.md").write_text(md)
    path.write_text(json.dumps({"scale": args.scale, "seed": args.seed, "arms": merged}, indent=1, default=str))
    print(md)
    return path


if __name__ == "__main__":
    main()
