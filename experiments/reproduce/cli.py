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
import sys
import time
import warnings
from pathlib import Path

from cxr_relink.configs import ROOT
from experiments.reproduce.plan import KEEP_BY_DEFAULT, SCALES
from experiments.reproduce.plot import plot as plot_claims
from experiments.reproduce.render import render
from experiments.reproduce.runner import Reproduction, audit_json_path


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1); default 1 for tiny, 5 otherwise")
    ap.add_argument("--epsilon", type=float, default=0.34, help="target epsilon of the DP rows (arXiv 2606.02276's 0.34)")
    ap.add_argument("--out", default=str(ROOT / "logs" / "reproduce"), help="runs go to <out>/<scale>/runs/")
    ap.add_argument("--results", default=None, help="RESULTS.md path (default <out>/<scale>/RESULTS.md)")
    ap.add_argument("--resume", action="store_true", help="load complete kept seeds, reuse finished runs in <out>, run the rest")
    ap.add_argument("--keep", default=None, help="keep finished runs here, per seed (default: experiments/results/<scale> "
                    f"for {', '.join(KEEP_BY_DEFAULT)}; 'none' to keep nothing)")
    ap.add_argument("--frontier", default=None, help="the kept privacy-utility frontier (experiments/frontier.py) for the "
                    f"section beyond the papers (default: experiments/results/frontier for {', '.join(KEEP_BY_DEFAULT)}; "
                    "'none' to leave it out)")
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
    frontier = args.frontier or (str(ROOT / "experiments" / "results" / "frontier") if args.scale in KEEP_BY_DEFAULT else None)
    if frontier not in (None, "none"):
        rep.load_frontier(Path(frontier))
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
    md, _ = render(rep, time.time() - t0, " ".join(argv))
    results = Path(args.results) if args.results else out / "RESULTS.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    plot = results.with_name(results.stem + "_claims.png")
    try:
        plot_claims(rep, plot)
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
