"""The specialisation ladder: several models audited on one cohort, one table and one figure
(the comparison of arXiv 2606.02276, generic CLIP -> biomedical CLIP -> CXR-specific CLIP).

    python -m experiments.ladder --out ladder/ \
        --model "CLIP: model=hf_clip model.path=/models/clip-vit-base-patch16" \
        --model "BiomedCLIP: model=open_clip model.path=/models/BiomedCLIP" \
        --model "CheXzero: model=open_clip model.arch=ViT-B-32-quickgelu model.path=/models/chexzero.pt" \
        --model "ours: ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt" \
        data=mimic_cxr data.root=/data/mimic audit=all

Each `--model "NAME: overrides"` is one evaluate.py run (a checkpoint, an existing model or an
embeddings file); the trailing overrides (cohort, split, audit) are shared by all. Writes, under
--out: `<NAME>/` (each model's audit.json, report.md, recall_vs_n.png), `ladder.md` (R@1/5/10 at
N = 100, 1k, 10k and the full database as % and × chance with 95% CIs; hard negatives; probe macro
AUROC), `ladder.json` (the same rows) and `ladder_recall_vs_n.png` (Recall@K ÷ chance vs N, a curve
per model; one panel per variant).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from cxr_relink import configs  # noqa: F401  (sets CXR_RELINK_ROOT)
from cxr_relink.audit import result as R

log = logging.getLogger("ladder")

KS = (1, 5, 10)
NS = ("100", "1000", "10000", "full")
PLOT_VARIANTS = ("i2t", "hardneg/i2t")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def parse_model(spec: str) -> tuple[str, list[str]]:
    """"NAME: override override ..." -> (NAME, overrides)."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not sep or not NAME.match(name):
        raise ValueError(f"--model {spec!r}: expected 'NAME: overrides' with NAME made of letters, digits, _.+-")
    overrides = rest.split()
    if not overrides:
        raise ValueError(f"--model {spec!r}: no overrides (e.g. model=hf_clip model.path=/models/x)")
    return name, overrides


def run_ladder(models: Sequence[tuple[str, Sequence[str]]], shared: Sequence[str], out: str | Path) -> dict[str, Any]:
    """evaluate.py once per model into out/<name>/, then the comparison. Returns {"rows", "paths"}."""
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate

    out = Path(out)
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be distinct, got {names}")
    results = {}
    for name, overrides in models:
        log.info("ladder: auditing %s", name)
        cfg = compose("evaluate.yaml", [*shared, *overrides, f"paths.output_dir={out / name}"])
        _, objects = evaluate(cfg)
        results[name] = objects["result"]
    return write_comparison(results, out)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    ci = row.get("x_chance_ci")
    ci_s = f" [{ci[0]:.2f}–{ci[1]:.2f}]" if ci else ""
    return f"{100 * row['value']:.2f}% = {row['x_chance']:.2f}×{ci_s}"


def _find(res: dict[str, Any], key: str, k: int, n: str) -> dict[str, Any] | None:
    sec = (res.get("relinkage") or {}).get(key) or {}
    return next((r for r in sec.get("recall", []) if r["k"] == k and r["n"] == n), None)


def comparison_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: i2t R@K at each N (value, × chance, CIs), hard negatives, probe."""
    rows = []
    for name, res in results.items():
        row: dict[str, Any] = {"model": name, "what": R.describe(res.get("meta", {}))}
        for k in KS:
            for n in NS:
                row[f"i2t R@{k} N={n}"] = _find(res, "i2t", k, n)
        for k in KS:
            # The hard-negative population is label-matched, often smaller than 100: its N = 100 row
            # (effective pool reported) and the full label-matched pool.
            for n in ("100", "full"):
                row[f"hardneg R@{k} N={n}"] = _find(res, "hardneg/i2t", k, n)
        probe = res.get("probe")
        row["probe macro AUROC"] = None if not probe else {"value": probe["macro_auroc"], "ci": probe.get("macro_auroc_ci")}
        sec = (res.get("relinkage") or {}).get("i2t") or {}
        row["n_queries"], row["n_candidates"] = sec.get("n_queries"), sec.get("n_candidates")
        row["clipped_n"] = sec.get("clipped_n") or []
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Specialisation ladder: image→report re-linkage", "",
             "Recall@K as % and × chance (95% CI of × chance, bootstrap over patients). N beyond the pool is "
             "clipped to the full database (–).", ""]
    for k in KS:
        cols = [f"i2t R@{k} N={n}" for n in NS]
        lines += [f"## R@{k}", "", "| model | queries / candidates | " + " | ".join(f"N = {n}" for n in NS) + " |",
                  "|---|---|" + "---|" * len(NS)]
        for r in rows:
            cells = [("–" if n != "full" and int(n) in r["clipped_n"] else _cell(r[c])) for n, c in zip(NS, cols)]
            lines.append(f"| {r['model']} | {r['n_queries']} / {r['n_candidates']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Hard negatives (label-matched pools) and the linear probe", "",
              "| model | " + " | ".join(f"hard-neg R@{k} N=100 | hard-neg R@{k} full" for k in KS)
              + " | probe macro AUROC |", "|---|" + "---|" * (2 * len(KS) + 1)]
    for r in rows:
        cells = [_cell(r[f"hardneg R@{k} N={n}"]) for k in KS for n in ("100", "full")]
        p = r["probe macro AUROC"]
        ps = "–" if p is None else f"{100 * p['value']:.2f}%" + (f" [{100 * p['ci'][0]:.2f}–{100 * p['ci'][1]:.2f}]"
                                                                  if p.get("ci") else "")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {ps} |")
    lines += ["", "Models:", ""] + [f"- {r['model']}: {r['what']}" for r in rows]
    return "\n".join(lines) + "\n"


def plot_ladder(results: dict[str, dict[str, Any]], path: str | Path | None = None, k: int = 1):
    """Recall@k ÷ chance vs N, log-log, a curve (with its CI band) per model; one panel per variant
    present (image→report; hard negatives at their mean effective pool), as audit.result.plot_recall_vs_n
    draws one model. Pools clipped to the full database are the full point only."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = [v for v in PLOT_VARIANTS if any(v in (r.get("relinkage") or {}) for r in results.values())] or ["i2t"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.8 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        hard = key.startswith("hardneg")
        R.x_chance_axes(ax, f"{R.VARIANT_TITLES.get(key, key)}, R@{k}", hard, f"Recall@{k} ÷ chance")
        for i, (name, res) in enumerate(results.items()):
            sec = (res.get("relinkage") or {}).get(key)
            if sec:
                R.plot_x_chance(ax, [r for r in sec["recall"] if r["k"] == k], hard, f"C{i}", name, band_alpha=0.15)
        ax.axhline(1.0, color="k", ls="--", lw=1, label="chance (1×)")
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(True, which="both", alpha=0.3)
    meta = next(iter(results.values()), {}).get("meta", {})
    where = ", ".join(f"{k}={meta[k]}" for k in ("cohort", "split") if meta.get(k))
    fig.suptitle(f"Re-linkage by model{': ' + where if where else ''}", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path), dpi=120)
    return fig


def write_comparison(results: dict[str, dict[str, Any]], out: str | Path) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(results)
    paths = {"markdown": out / "ladder.md", "json": out / "ladder.json", "plot": out / "ladder_recall_vs_n.png"}
    paths["markdown"].write_text(markdown(rows))
    paths["json"].write_text(json.dumps({"models": list(results), "rows": rows}, indent=1, default=str))
    plt.close(plot_ladder(results, paths["plot"]))
    log.info("ladder: wrote %s", ", ".join(str(p) for p in paths.values()))
    return {"rows": rows, "paths": {k: str(v) for k, v in paths.items()}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="'NAME: overrides'",
                    help="one model: a name and its evaluate.py overrides (repeat, in ladder order)")
    ap.add_argument("--out", required=True, help="output folder (one sub-folder per model + the comparison)")
    ap.add_argument("overrides", nargs="*", help="evaluate.py overrides shared by every model (data=, split=, audit=)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    res = run_ladder([parse_model(m) for m in args.model], args.overrides, args.out)
    print(Path(res["paths"]["markdown"]).read_text())
    return res


if __name__ == "__main__":
    main()
