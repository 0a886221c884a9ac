"""The audit result: one versioned JSON document, its scalars, its plot and its Markdown table.

Shape (schema_version 1)::

    {
      "schema": "cxr-relink/audit", "schema_version": 1, "created_utc": "...",
      "meta": {...free-form run information: model, checkpoint, cohort, split, epoch; "weights_not_loaded"
               (what did not load, with allow_partial_load), "preprocessing_unproven" (what the model
               folder cannot prove about its tokenizer and image normalisation)...},
      "settings": {...the audit parameters...},
      "relinkage": {                         # keys: "i2t", "t2i", "hardneg/i2t", "dedup/i2t"
        "<key>": {"direction", "variant", "n_queries", "n_candidates", "ties_policy",
                  "ties": {...}, "rank": {"mrr", "mean_rank", "median_rank", "mrr_ci"?},
                  "recall": [{"k", "n" ("100" | "full"), "n_value", "value", "ci"?,
                              "ci90"?, "chance", "x_chance", "x_chance_ci"?, "x_chance_ci90"?,
                              "effective_pool_mean",
                              "frac_queries_pool_below_n"}, ...],
                  "clipped_n": [...], ...variant extras}
      },
      "probe": {"macro_auroc", "macro_auroc_ci"?, "per_label": {name: {"auroc", ...}},
                "skipped": {name: reason}, ...},          # or absent
      "privacy": {...the DP stage's dp_state: epsilon, delta, sigma, q, steps, accountant, loss mode,
                  privacy unit, guarantee_valid, invalid_reasons, outside_guarantee...},  # or absent
      "report_quality": {"database", "mode", "k", "n_queries", "own_report_candidate", "note",
                         "green_exact"?: {"value", "ci", "categories": {name: {"green_category",
                                          "significant", "total", "per_query", "frac_queries", ...}}},
                         "labels"?: {"positive_only" | "uncertain_positive": {"micro_f1", "macro_f1",
                                     ...ci, "per_label"}},
                         "lexical"?: {"bleu4", "rouge_l", "rouge_l_ci", "library"},
                         "skipped"?: {part: reason}}                      # or absent (audit/report_quality.py)
      "adaptive": {"attacks", "n_aux_requested", "aux": {source: {...}}, "audited", "seed", "trunk", "note",
                   "n_draws", "rows": [{"attack" ("cosine" | "ridge" | "procrustes" | "head"), "aux" (null |
                             "leaked" | "public"), "n_aux_requested", "n_aux", "n_draws", "fit": {...}, "failed"?,
                             "relinkage": {...same format as "relinkage": the first draw's...},
                             "over_draws": {"<key>": [{"k", "n", "values", "min", "median", "max", "mean", "sd",
                                            "ci_draws", "ci", "chance", "x_chance", ...}]}, "draws"?: [...]}, ...],
                   "best": [{"aux", "n_aux_requested", "n_aux", "key", "k", "n", "n_value", "attack", "value" (mean
                             over draws), "ci", "n_draws", "min", "median", "max", "ci_draws", "chance", "x_chance",
                             "x_chance_ci", "baseline_value"}, ...]}
                                                                  # or absent (audit/adaptive.py)
      "risk": {"k", "n", "capability": {"value", "ci", "chance", "x_chance", ...}, "release_attributable"?:
               {"value", "ci", "ci_draws", "n_draws", "min", "median", "max", "with_mean", "without_mean", "draws"},
               "memorisation"?: {"pool", "label_matched", "attacks", "best", "pair_membership": {"auc", "auc_ci",
               "tpr_at_fpr"}}, "not_computed"?: {number: why}}           # or absent (audit/risk.py)
    }

Scalar names (stable; what loggers see): ``audit/<key>/R@<K>/N=<n>``, ``.../x_chance``,
``audit/<key>/mrr``, ``audit/hardneg/i2t/R@<K>/N=<n>/chance`` (effective chance),
``probe/macro_auroc``, ``probe/auroc/<label>``, ``report_quality/green_exact``,
``report_quality/error/<category>`` (GREEN's significant categories) and ``report_quality/matched`` (mean
counts per query), ``report_quality/label_micro_f1`` and
``.../label_macro_f1`` (positive-only), ``report_quality/bleu4``, ``report_quality/rouge_l``.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = "cxr-relink/audit"
SCHEMA_VERSION = 1
VARIANT_TITLES = {
    "i2t": "image→report",
    "t2i": "report→image",
    "hardneg/i2t": "image→report, hard negatives",
    "dedup/i2t": "image→report, dedup reports",
}


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tensors/np scalars -> Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return _clean(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def build_result(
    relinkage: dict[str, Any] | None = None,
    probe: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    privacy: dict[str, Any] | None = None,
    report_quality: dict[str, Any] | None = None,
    adaptive: dict[str, Any] | None = None,
    risk: dict[str, Any] | None = None,
) -> dict[str, Any]:
    probe = {k: v for k, v in (probe or {}).items() if k not in ("scores", "eval_labels")} or None
    res: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "meta": dict(meta or {}),
        "settings": dict(settings or {}),
        "relinkage": dict(relinkage or {}),
    }
    if probe is not None:
        res["probe"] = probe
    if privacy is not None:
        res["privacy"] = dict(privacy)
    if report_quality is not None:
        res["report_quality"] = dict(report_quality)
    if adaptive is not None:
        res["adaptive"] = dict(adaptive)
    if risk is not None:
        res["risk"] = dict(risk)
    res = _clean(res)
    validate_result(res)
    return res


def validate_result(res: Any) -> None:
    """Raise ValueError listing every way ``res`` departs from the schema."""
    errs: list[str] = []
    if not isinstance(res, dict):
        raise ValueError("audit result must be a JSON object")
    if res.get("schema") != SCHEMA:
        errs.append(f"schema must be {SCHEMA!r}, got {res.get('schema')!r}")
    if res.get("schema_version") != SCHEMA_VERSION:
        errs.append(f"schema_version must be {SCHEMA_VERSION}, got {res.get('schema_version')!r}")
    for key in ("meta", "settings", "relinkage"):
        if not isinstance(res.get(key), dict):
            errs.append(f"{key} must be an object")
    for name, sec in (res.get("relinkage") or {}).items():
        where = f"relinkage[{name!r}]"
        if not isinstance(sec, dict):
            errs.append(f"{where} must be an object")
            continue
        for f in ("direction", "n_queries", "n_candidates", "ties_policy", "recall", "rank"):
            if f not in sec:
                errs.append(f"{where} lacks {f!r}")
        for i, row in enumerate(sec.get("recall") or []):
            for f in ("k", "n", "n_value", "value", "chance", "x_chance"):
                if f not in row:
                    errs.append(f"{where}.recall[{i}] lacks {f!r}")
            v = row.get("value")
            if v is not None and not (isinstance(v, (int, float)) and -1e-9 <= v <= 1 + 1e-9):
                errs.append(f"{where}.recall[{i}].value {v!r} is not a probability")
    probe = res.get("probe")
    if probe is not None:
        if not isinstance(probe, dict) or "macro_auroc" not in probe or "per_label" not in probe:
            errs.append("probe must be an object with macro_auroc and per_label")
    rq = res.get("report_quality")
    if rq is not None and (not isinstance(rq, dict) or "n_queries" not in rq or "database" not in rq):
        errs.append("report_quality must be an object with n_queries and database")
    ad = res.get("adaptive")
    if ad is not None:
        if not isinstance(ad, dict) or not isinstance(ad.get("rows"), list) or not isinstance(ad.get("best"), list):
            errs.append("adaptive must be an object with rows and best lists")
        else:
            for i, row in enumerate(ad["rows"]):
                if not isinstance(row, dict) or any(f not in row for f in ("attack", "aux", "n_aux", "relinkage")):
                    errs.append(f"adaptive.rows[{i}] must have attack, aux, n_aux, relinkage")
    rk = res.get("risk")
    if rk is not None and (not isinstance(rk, dict) or not isinstance(rk.get("capability"), dict)):
        errs.append("risk must be an object with a capability object")
    if errs:
        raise ValueError("invalid audit result: " + "; ".join(errs))


def write_result(res: dict[str, Any], path: str | os.PathLike) -> str:
    validate_result(res)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def write_bundle(res: dict[str, Any], out_dir: str | os.PathLike) -> str:
    """The audit's output bundle in ``out_dir`` (train.py's final audit and evaluate.py): audit.json,
    recall_vs_n.png (when there is a re-linkage section) and report.md. Returns the Markdown report
    (aggregate numbers only, never report text)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_result(res, out / "audit.json")
    if res.get("relinkage"):
        fig = plot_recall_vs_n(res, out / "recall_vs_n.png")  # selects the Agg backend first
        import matplotlib.pyplot as plt

        plt.close(fig)
    table = markdown_table(res)
    (out / "report.md").write_text(table)
    return table


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        res = json.load(f)
    validate_result(res)
    return res


def scalars(res: dict[str, Any]) -> dict[str, float]:
    """Flat {stable name: value} for loggers."""
    out: dict[str, float] = {}
    for key, sec in res.get("relinkage", {}).items():
        for row in sec["recall"]:
            base = f"audit/{key}/R@{row['k']}/N={row['n']}"
            out[base] = row["value"]
            if row.get("x_chance") is not None:
                out[base + "/x_chance"] = row["x_chance"]
            if sec.get("variant") == "hardneg":
                out[base + "/chance"] = row["chance"]
        out[f"audit/{key}/mrr"] = sec["rank"]["mrr"]
    probe = res.get("probe")
    if probe:
        out["probe/macro_auroc"] = probe["macro_auroc"]
        for name, d in probe.get("per_label", {}).items():
            out[f"probe/auroc/{name}"] = d["auroc"]
    rq = res.get("report_quality")
    if rq:
        g = rq.get("green_exact")
        if g:
            out["report_quality/green_exact"] = g["value"]
            for name, c in g["categories"].items():
                if c["significant"]:
                    out[f"report_quality/error/{name}"] = c["per_query"]
            out["report_quality/matched"] = g["categories"]["matched"]["per_query"]
        lab = (rq.get("labels") or {}).get("positive_only")
        if lab:
            out["report_quality/label_micro_f1"] = lab["micro_f1"]
            out["report_quality/label_macro_f1"] = lab["macro_f1"]
        lex = rq.get("lexical")
        if lex:
            out["report_quality/bleu4"] = lex["bleu4"]
            out["report_quality/rouge_l"] = lex["rouge_l"]
    for b in (res.get("adaptive") or {}).get("best", []):  # the best attack per aux source and size
        out[f"adaptive/best/{b['aux']}@{b['n_aux_requested']}/{b['key']}/R@{b['k']}/N={b['n']}"] = b["value"]
    if res.get("risk"):
        from cxr_relink.audit.risk_report import risk_scalars

        out.update(risk_scalars(res["risk"]))
    return {k: float(v) for k, v in out.items() if v is not None}


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.2f}" if pct else f"{v:.2f}"


def describe(meta: dict[str, Any]) -> str:
    """What was audited, in one line: cohort, split, model and which weights (checkpoint + its
    0-based epoch, as in the file name ``epoch_NNN.ckpt``)."""
    parts = [f"{k}={meta[k]}" for k in ("cohort", "split", "model") if meta.get(k) is not None]
    if meta.get("checkpoint"):
        parts.append(f"checkpoint={os.path.basename(str(meta['checkpoint']))}")
    if meta.get("epoch") is not None:
        parts.append(f"epoch={meta['epoch']} (0-based)")
    if meta.get("checkpoint_selection"):
        parts.append(f"chosen by {meta['checkpoint_selection']}")
    return ", ".join(parts)


def _row(res: dict[str, Any], key: str, k: int = 1) -> dict[str, Any] | None:
    """The R@k row at N = 100 (the first paper's headline pool), else the full database."""
    rows = [r for r in (res.get("relinkage", {}).get(key) or {}).get("recall", []) if r["k"] == k]
    return next((r for r in rows if r["n"] == "100"), None) or next((r for r in rows if r["n"] == "full"), None)


def degenerate_reasons(res: dict[str, Any]) -> list[str]:
    """Why the audited embeddings are degenerate (audit.relinkage: refused unless allow_degenerate,
    then flagged in every section), or []."""
    return list(dict.fromkeys(why for sec in (res.get("relinkage") or {}).values() for why in sec.get("degenerate") or []))


def weights_not_loaded(res: dict[str, Any]) -> list[str]:
    """What of the audited model's weights did not load (models/load_guard.py: refused unless
    model.allow_partial_load, then flagged in the headline and report), or []."""
    return list(res.get("meta", {}).get("weights_not_loaded") or [])


# Why the hard-negative chance is not 1 / (mean effective pool): one clause, beside the numbers.
HARDNEG_CHANCE_CLAUSE = ("chance {chance}% is the mean of 1/pool over queries, each ranked among its own "
                         "label-matched candidates only, so small pools lift it above 1/{pool}")
HARDNEG_CHANCE_EQUAL = ("chance {chance}% is the mean of 1/pool over queries, each ranked among its own "
                        "label-matched candidates only")


def headline(res: dict[str, Any], where: str | os.PathLike | None = None) -> str:
    """The one-paragraph summary a run prints: R@1 × chance, hard negatives × chance, probe AUROC,
    the DP verdict, and where the full results are."""
    meta = res.get("meta", {})
    bits = []
    r = _row(res, "i2t")
    if r:
        n = r["n"] if r["n"] != "full" else f"full ({r['n_value']})"
        bits.append(f"image→report R@1 at N = {n}: {_fmt(r['value'])}% = {_fmt(r['x_chance'], False)}× chance "
                    f"({_fmt(r['chance'])}%)")
    r = _row(res, "hardneg/i2t")
    if r:
        pool = f"{r['effective_pool_mean']:.0f}"
        above = r["k"] == 1 and r["chance"] * r["effective_pool_mean"] > 1.005
        clause = HARDNEG_CHANCE_CLAUSE if above else HARDNEG_CHANCE_EQUAL
        bits.append(f"with hard negatives: {_fmt(r['value'])}% = {_fmt(r['x_chance'], False)}× chance "
                    f"(mean effective pool {pool}; {clause.format(chance=_fmt(r['chance']), pool=pool)})")
    probe = res.get("probe")
    if probe:
        bits.append(f"linear probe macro AUROC {_fmt(probe['macro_auroc'])}%")
    rq = res.get("report_quality") or {}
    if rq.get("green_exact"):
        bits.append(f"retrieved-report GREEN-exact {rq['green_exact']['value']:.3f} ({rq['database']} reports)")
    ab = adaptive_best(res, 100) or adaptive_best(res, "full")  # image->report R@1, best over attacks and aux sets
    if ab:
        bits.append(f"adaptive attacker (best of {', '.join(res['adaptive']['attacks'])}; {ab['aux']} aux, "
                    f"{ab['n_aux']} studies): {_fmt(ab['value'])}% = {_fmt(ab['x_chance'], False)}× chance by {ab['attack']}")
    if res.get("risk"):
        from cxr_relink.audit.risk_report import risk_headline

        bits += risk_headline(res["risk"])
    for name, why in (meta.get("skipped") or {}).items():
        bits.append(f"{name} skipped ({why})")
    p = res.get("privacy")
    if p and p.get("enabled"):
        eps = p.get("epsilon_spent")
        unit = p.get("privacy_unit") or "study"
        verdict = f"valid per {unit}" if p.get("guarantee_valid") else "NOT VALID"
        pp = p.get("per_patient")
        if unit != "patient" and p.get("guarantee_valid") and (not pp or pp.get("meaningful") is False or pp["delta"] >= 1):
            verdict += ", no meaningful per-patient guarantee"
        bits.append(f"DP epsilon {eps:.3g}, delta {p.get('delta'):.2g} per {unit}: {verdict}" if eps is not None
                    else "DP: epsilon not computed")
    text = f"Audit ({describe(meta)}): " + "; ".join(bits) + "."
    degenerate = degenerate_reasons(res)
    if degenerate:  # before any number: these do not measure the model
        text = ("DEGENERATE EMBEDDINGS, audited on request (allow_degenerate): " + "; ".join(degenerate)
                + ". The numbers below reflect the broken inputs, not the model's re-linkage risk. " + text)
    partial = weights_not_loaded(res)
    if partial:  # first of all: the audited model is not the one named
        text = ("WEIGHTS DID NOT FULLY LOAD, audited on request (allow_partial_load): " + "; ".join(partial)
                + ". The numbers below measure a partly random model, not the named one. " + text)
    if where is not None:  # the files write_bundle writes (the plot only with a re-linkage section)
        files = "audit.json, report.md" + (", recall_vs_n.png" if res.get("relinkage") else "")
        text += f" Full results: {os.fspath(where)}/ ({files})."
    return text


def console_summary(res: dict[str, Any], where: str | os.PathLike) -> str:
    """What train.py and evaluate.py print once at the end: the headline (with where the bundle
    is), then the report's tables."""
    return headline(res, where) + "\n\n" + markdown_table(res, with_headline=False)


def markdown_table(res: dict[str, Any], with_headline: bool = True) -> str:
    """A short Markdown report (report.md): headline, re-linkage table (percent), the probe and
    the DP statement."""
    lines = [headline(res), ""] if with_headline else []
    meta = res.get("meta", {})
    head = describe(meta)
    rl = res.get("relinkage", {})
    degenerate = degenerate_reasons(res)
    if rl or degenerate or weights_not_loaded(res):  # (audit=report_quality alone: no empty heading)
        lines.append("## Re-linkage audit" + (f" ({head})" if head else ""))
    elif meta.get("skipped"):
        lines += ["## Skipped audits", ""]
    for why in weights_not_loaded(res):
        lines += ["", f"**Weights did not fully load** (audited with allow_partial_load): {why}."]
    for why in degenerate:
        lines += ["", f"**Degenerate embeddings** (audited with allow_degenerate): {why}."]
    if rl:
        lines += [
            "",
            "| variant | K | N | Recall@K (%) | 95% CI | chance (%) | × chance | × chance 95% CI |",
            "|---|---:|---:|---:|---|---:|---:|---|",
        ]
        for key, sec in rl.items():
            title = VARIANT_TITLES.get(key, key)
            for row in sec["recall"]:
                n = row["n"] if row["n"] != "full" else f"full ({row['n_value']})"
                if sec.get("variant") == "hardneg" and row["frac_queries_pool_below_n"] > 0:
                    n += f" (eff. {row['effective_pool_mean']:.0f})"
                ci = row.get("ci")
                xci = row.get("x_chance_ci")
                lines.append(
                    f"| {title} | {row['k']} | {n} | {_fmt(row['value'])} | "
                    f"{'[' + _fmt(ci[0]) + ', ' + _fmt(ci[1]) + ']' if ci else '–'} | {_fmt(row['chance'])} | "
                    f"{_fmt(row['x_chance'], False)} | "
                    f"{'[' + _fmt(xci[0], False) + ', ' + _fmt(xci[1], False) + ']' if xci else '–'} |"
                )
        lines.append("")
        for key, sec in rl.items():
            t = sec["ties"]
            extra = ""
            if sec.get("variant") == "hardneg":
                extra = (f"; chance per row: the mean over queries of K / (the query's own label-matched pool), "
                         f"so above K / (mean effective pool) when pools differ"
                         f"; label mapping {sec['label_mapping']}, {sec['n_label_groups']} label groups, "
                         f"median population {sec['population_median']:.0f}, "
                         f"{sec['n_queries_no_negatives']} queries without hard negatives left out")
            if sec.get("variant") == "dedup":
                extra = f"; {sec['n_unique_reports']} unique reports of {sec['n_studies']} studies"
            if sec.get("clipped_n"):
                extra += (f"; N = {', '.join(str(n) for n in sec['clipped_n'])} not reported: not below the "
                          f"{sec['n_candidates']} candidates (the full database covers them)")
            lines.append(
                f"- {VARIANT_TITLES.get(key, key)}: {sec['n_queries']} queries, {sec['n_candidates']} candidates, "
                f"MRR {sec['rank']['mrr']:.4f}, median rank {sec['rank']['median_rank']:.0f}; ties "
                f"{sec['ties_policy']} ({t['n_queries_with_ties']} queries with ties){extra}"
            )
    for name, why in (meta.get("skipped") or {}).items():
        lines.append(f"- {VARIANT_TITLES.get(name, name)}: skipped: {why}")
    unproven = meta.get("preprocessing_unproven") or []
    if unproven:  # an existing model's tokenizer / normalisation, read from files beside its weights
        lines += ["", "## Preprocessing not proven by the model's files", "",
                  *(f"- {why}." for why in unproven)]
    probe = res.get("probe")
    if probe:
        ci = probe.get("macro_auroc_ci")
        lines += ["", "## Linear probe", "",
                  f"Macro AUROC over {probe['n_labels_evaluated']} labels: {_fmt(probe['macro_auroc'])}%"
                  + (f" (95% CI {_fmt(ci[0])}–{_fmt(ci[1])})" if ci else "")
                  + f"; train {probe['n_train']}, test {probe['n_test']} images; uncertainty policy "
                  f"{probe['uncertainty_policy']}.", "", "| label | AUROC (%) | pos | neg |", "|---|---:|---:|---:|"]
        for name, d in probe["per_label"].items():
            lines.append(f"| {name} | {_fmt(d['auroc'])} | {d['n_pos']} | {d['n_neg']} |")
        for name, why in probe.get("skipped", {}).items():
            lines.append(f"| {name} | skipped: {why} | | |")
    if res.get("report_quality"):
        lines += ["", *report_quality_lines(res["report_quality"])]
    if res.get("adaptive"):
        lines += ["", *adaptive_lines(res["adaptive"])]
    if res.get("risk"):
        from cxr_relink.audit.risk_report import risk_lines

        lines += ["", *risk_lines(res["risk"])]
    if res.get("privacy"):
        lines += ["", *privacy_lines(res["privacy"])]
    return "\n".join(lines) + "\n"


def _ci(c: Any, pct: bool = False) -> str:
    if not c:
        return ""
    return f" [{_fmt(c[0], pct)}, {_fmt(c[1], pct)}]" if pct else f" [{c[0]:.3f}, {c[1]:.3f}]"


def adaptive_best(res: dict[str, Any], n: int | str = 100, k: int = 1, key: str = "i2t", aux: str | None = None,
                  n_aux: int | str | None = None) -> dict[str, Any] | None:
    """The adaptive attacker's best row (``res["adaptive"]["best"]``: the largest Recall over the attacks, the
    baseline cosine included) at Recall@k, pool N = n (100 or "full"), re-linkage section ``key``: of one
    auxiliary group (``aux`` "leaked" | "public", ``n_aux`` the requested size, e.g. 1000 or "all") or, left
    None, the largest over the groups. None when the result has no such row."""
    rows = [b for b in (res.get("adaptive") or {}).get("best", []) if b["key"] == key and b["k"] == k
            and str(b["n"]) == str(n) and (aux is None or b["aux"] == aux)
            and (n_aux is None or str(b["n_aux_requested"]) == str(n_aux))]
    return max(rows, key=lambda b: b["value"]) if rows else None


def adaptive_lines(ad: dict[str, Any]) -> list[str]:
    """The adaptive attacker's section of report.md: image->report R@1 at N = 100 (else full) per attack,
    auxiliary source and size, and the best attack per group (aggregate numbers only)."""
    lines = ["## Adaptive attacker", "",
             f"An attacker holding the released model and n auxiliary paired studies ({', '.join(ad['aux'])}; none "
             f"shares a patient with the {ad['audited']['n_studies']} audited studies) fits each attack on them; "
             f"trunk: {ad.get('trunk', '?')}. {ad['note']}.", "",
             "R@1: the mean over the row's auxiliary draws, its 95% interval over draws and audited patients, and "
             "the draws' min / median / max.", "",
             "| attack | aux | n aux studies | draws | R@1 (%) | 95% CI | min / median / max | × chance | N | fit |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---|"]

    def pick(recall: list[dict]) -> dict | None:
        r1 = [r for r in recall if r["k"] == 1]
        return next((r for r in r1 if str(r["n"]) == "100"), None) or next((r for r in r1 if str(r["n"]) == "full"), None)

    for row in ad["rows"]:
        r = pick(((row.get("relinkage") or {}).get("i2t") or {}).get("recall", []))
        od = pick((row.get("over_draws") or {}).get("i2t") or [])
        fit = row.get("fit") or {}
        how = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fit.items()
                        if k in ("space", "penalty", "steps_chosen", "val_mrr", "budget_binding") and v is not None)
        if r is None:
            lines.append(f"| {row['attack']} | {row['aux'] or '–'} | {row['n_aux']} | {row.get('n_draws', 1)} | failed: "
                         f"{row.get('failed', '–')} | | | | | {how} |")
            continue
        if od is None:  # a result written before the draws (one draw: its own CI)
            od = {"mean": r["value"], "ci": r.get("ci"), "min": r["value"], "median": r["value"], "max": r["value"],
                  "x_chance": r["x_chance"], "n_draws": 1}
        ci = od.get("ci")
        lines.append(f"| {row['attack']} | {row['aux'] or '–'} | {row['n_aux']} | {od['n_draws']} | {_fmt(od['mean'])} | "
                     f"{'[' + _fmt(ci[0]) + ', ' + _fmt(ci[1]) + ']' if ci else '–'} | "
                     f"{_fmt(od['min'])} / {_fmt(od['median'])} / {_fmt(od['max'])} | {_fmt(od['x_chance'], False)} | "
                     f"{r['n_value']} | {how} |")
    best = [b for b in ad["best"] if b["key"] == "i2t" and b["k"] == 1 and str(b["n"]) in ("100", "full")]
    if best:
        lines += ["", "Best attack per auxiliary set (selected on the audited split: optimistic for the attacker):", ""]
        for b in best:
            spread = (f" over {b['n_draws']} draws [{_fmt(b['min'])}–{_fmt(b['max'])}]" if b.get("n_draws", 1) > 1 else "")
            lines.append(f"- {b['aux']}, {b['n_aux']} studies, N = {b['n_value']}: {b['attack']} {_fmt(b['value'])}%{spread} "
                         f"(baseline cosine {_fmt(b['baseline_value'])}%), {_fmt(b['x_chance'], False)}× chance")
    return lines


def report_quality_lines(rq: dict[str, Any]) -> list[str]:
    """The retrieved-report quality section of report.md (aggregate numbers only)."""
    how = rq["mode"] if rq["mode"] == "top1" else f"{rq['mode']} of top {rq['k']}"
    lines = ["## Retrieved-report quality", "",
             f"{rq['n_queries']} image queries, {how} from {rq['n_database_reports']} {rq['database']} reports; "
             f"{rq['note']}.", ""]
    g = rq.get("green_exact")
    if g:
        lines += [f"GREEN-exact {g['value']:.3f}{_ci(g.get('ci'))} (exact counts from the structured findings, "
                  f"no model); significant errors per query {g['significant_errors_per_query']:.2f}; "
                  f"{_fmt(g['frac_queries_perfect'])}% of queries without one.", "",
                  "| category | GREEN | per query | 95% CI | queries with one (%) |", "|---|---|---:|---|---:|"]
        bl = g.get("baselines") or {}
        if bl:
            parts = [f"{name.replace('_', ' ')} {b['value']:.3f}{_ci(b.get('ci'))}" for name, b in bl.items()
                     if b.get("value") is not None]
            sl = bl.get("same_labels_report") or {}
            if sl.get("n_queries_without_one"):
                parts.append(f"the model on the {rq['n_queries'] - sl['n_queries_without_one']} queries that have a "
                             f"same-label report {sl['model_value_same_queries']:.3f}"
                             f"{_ci(sl.get('model_value_same_queries_ci'))}")
            lines[-2:-2] = [f"Baselines (exact expectations): {'; '.join(parts)}.", ""]
        for name, c in g["categories"].items():
            tag = f"({c['green_category']})" if c["green_category"] else ("numerator" if name == "matched" else "not scored")
            lines.append(f"| {name} | {tag} | {c['per_query']:.3f} | {_ci(c.get('per_query_ci')).strip() or '–'} | "
                         f"{_fmt(c['frac_queries'])} |")
        lines.append("")
    for mode, lab in (rq.get("labels") or {}).items():
        lines.append(f"- CheXpert label F1 ({mode}): micro {_fmt(lab['micro_f1'])}%{_ci(lab.get('micro_f1_ci'), True)}, "
                     f"macro {_fmt(lab['macro_f1'])}%{_ci(lab.get('macro_f1_ci'), True)} over {lab['n_labels_macro']} labels")
    lex = rq.get("lexical")
    if lex:
        lines.append(f"- lexical (secondary, {lex['library']}): BLEU-4 {lex['bleu4']:.4f}, "
                     f"ROUGE-L {lex['rouge_l']:.4f}{_ci(lex.get('rouge_l_ci'))}")
    for part, why in (rq.get("skipped") or {}).items():
        lines.append(f"- {part}: skipped: {why}")
    return lines


def per_patient_lines(pp: dict[str, Any] | None) -> list[str]:
    """The per-patient reading of a study-level guarantee: a group-privacy (eps, delta) only where its delta is
    below 1/#patients (records before issue #28 carry no ``meaningful`` flag: checked against delta < 1 only)."""
    if not pp:
        return ["- per patient: not stated (no bound on a patient's number of studies)"]
    if pp.get("meaningful") is False or pp["delta"] >= 1:
        why = pp.get("why_not") or f"group privacy over k = {pp['k']} studies gives delta {pp['delta']:.3g} >= 1"
        return [f"- per patient: **no meaningful per-patient guarantee** ({why})"]
    return [f"- per patient: epsilon {pp['epsilon']:.4g}, delta {pp['delta']:.3g} ({pp['basis']}, k = {pp['k']})"]


def privacy_lines(p: dict[str, Any]) -> list[str]:
    """The DP statement, in the words a privacy team checks: what epsilon, for what, and what not."""
    if not p.get("enabled"):
        return ["## Differential privacy", "", "DP disabled: no privacy guarantee."]
    acc = p.get("accountant") or {}
    steps = sum(int(h[2]) for h in acc.get("history", []))
    eps = p.get("epsilon_spent")
    unit = p.get("privacy_unit") or "study"
    verdict = (f"VALID per {unit}" if p.get("guarantee_valid") else
               "NOT VALID (" + "; ".join(p.get("invalid_reasons") or []) + ")")
    lines = [
        "## Differential privacy",
        "",
        f"- guarantee: **{verdict}** (epsilon and delta below are per {unit})",
        f"- epsilon spent {eps:.4g} (target {p.get('target_epsilon')}), delta {p.get('delta'):.3g}, "
        f"accountant {acc.get('mechanism')}" if eps is not None else "- epsilon: not computed",
        f"- loss mode {p.get('loss_mode')}, privacy unit {p.get('privacy_unit')} ("
        + (f"N = {p['n_train_units']}" if p.get("n_train_units") is not None else
           f"N <= {p.get('n_train_units_upper')}, exact N withheld") + f"), adjacency {p.get('adjacency')}",
        *(per_patient_lines(p.get("per_patient")) if unit != "patient" else []),
        *([f"- heads trained from: {(p.get('head_init') or {}).get('mode')}"] if p.get("head_init") else []),
        f"- noise multiplier sigma {p.get('noise_multiplier'):.4g}, sample rate q {p.get('sample_rate'):.4g}, "
        f"steps {steps} (planned {p.get('steps_planned')}), clipping norm C {p.get('max_grad_norm')}, "
        f"sensitivity {p.get('sensitivity')}",
        f"- noise and sampling: {p.get('noise_source')}",
        "- outside the guarantee:",
    ]
    return lines + [f"  - {item}" for item in p.get("outside_guarantee") or []]


def _label_minor_x_when_no_decade(ax) -> None:
    """x tick labels on a log axis whose view holds fewer than two decades (a hard-negative panel with
    effective pools of 40-70 had no label at all): the 2×, 3×, 5× ticks between decades are labelled
    then, as plain numbers."""
    import matplotlib.ticker

    ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2.0, 3.0, 5.0), numticks=30))

    def minor_label(v: float, _pos) -> str:
        lo, hi = ax.get_xlim()
        decades = sum(1 for e in range(-3, 9) if lo <= 10.0**e <= hi)
        return f"{v:g}" if decades < 2 else ""

    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor_label))
    ax.tick_params(axis="x", which="minor", labelsize=7)


def x_chance_axes(ax, title: str, hard: bool, ylabel: str) -> None:
    """A log-log Recall ÷ chance panel: x is N, or the mean effective pool for hard negatives."""
    import matplotlib.ticker

    ax.set_title(title, fontsize=10)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean effective pool size (label-matched)" if hard else "candidate pool size N")
    ax.set_ylabel(ylabel)
    # A label at every decade (matplotlib's default locator skips decades on tall ranges), ticks at 2×
    # and 5× in between, labelled too while the panel spans at most three decades (more would crowd).
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, numticks=30))
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2.0, 5.0), numticks=30))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))

    def minor_label(v: float, _pos) -> str:
        lo, hi = ax.get_ylim()
        return f"{v:g}×" if lo > 0 and hi / lo <= 10**3.01 else ""

    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor_label))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    _label_minor_x_when_no_decade(ax)


def x_chance_floor(rows: list[dict[str, Any]]) -> float:
    """The bottom of a Recall ÷ chance panel: below its smallest positive value (points and CI
    bounds) and below chance (1×). A ratio of 0, or a CI's lower bound of 0, has no place on a log
    axis: it is drawn at or through this edge, never at an invented value such as 0.01×."""
    pos = [v for r in rows for v in [r.get("x_chance"), *(r.get("x_chance_ci") or [])]
           if v is not None and v > 0]
    return min(pos + [1.0]) / 1.6


def plot_x_chance(ax, rows: list[dict[str, Any]], hard: bool, color: str, label: str, band_alpha: float,
                  floor: float | None = None) -> None:
    """One curve of Recall ÷ chance over the pool sizes of ``rows`` (recall rows of one K), with its
    95% CI band when every row has one. Hard-negative rows sit at their mean effective pool. ``floor``
    (default: x_chance_floor(rows); the caller sets the panel's ylim to start there): a ratio of 0 is
    an open triangle on that edge; a CI whose lower bound is 0 leaves the panel through it (the band
    runs off the bottom edge, a ▼ on the edge marks it): the interval is unbounded below on a log axis."""
    floor = x_chance_floor(rows) if floor is None else floor
    x_of = (lambda r: r["effective_pool_mean"]) if hard else (lambda r: r["n_value"])
    rows = sorted((r for r in rows if r.get("x_chance") is not None), key=x_of)
    xs, ys = [x_of(r) for r in rows], [r["x_chance"] for r in rows]
    off = floor / 100  # below the panel: lines and bands to it are clipped at the bottom edge
    ax.plot(xs, [y if y > 0 else off for y in ys], "-", color=color, label=label)
    ax.plot([x for x, y in zip(xs, ys) if y > 0], [y for y in ys if y > 0], "o", color=color)
    ax.plot([x for x, y in zip(xs, ys) if y <= 0], [floor for y in ys if y <= 0], "v", mfc="none", ms=8,
            color=color, clip_on=False)
    if rows and all(r.get("x_chance_ci") for r in rows):
        lows, highs = [r["x_chance_ci"][0] for r in rows], [r["x_chance_ci"][1] for r in rows]
        # A band between consecutive points whose lower bounds are > 0; a point whose lower bound is 0
        # (or that stands alone) gets a vertical bar instead, from its upper bound down through the
        # bottom edge, with a ▼ there: a band interpolated towards 0 drew a wedge to an invented floor.
        i = 0
        while i < len(rows):
            j = i
            while j < len(rows) and lows[j] > 0:
                j += 1
            if len(set(xs[i:j])) >= 2:  # (rows at one pool size, e.g. hard negatives below every N: bars)
                ax.fill_between(xs[i:j], lows[i:j], highs[i:j], color=color, alpha=band_alpha, lw=0)
            else:
                for m in range(i, j):
                    ax.plot([xs[m], xs[m]], [lows[m], highs[m]], "-", color=color, alpha=band_alpha * 2, lw=5,
                            solid_capstyle="butt")
            if j < len(rows):  # lows[j] <= 0
                ax.plot([xs[j], xs[j]], [off, max(highs[j], off)], "-", color=color, alpha=band_alpha * 2, lw=5,
                        solid_capstyle="butt")
                ax.plot([xs[j]], [floor], "v", color=color, ms=7, clip_on=False)
            i = max(j + 1, i + 1)


def plot_recall_vs_n(res: dict[str, Any], path: str | os.PathLike | None = None):
    """Recall@K as a multiple of chance vs the pool size N, both axes logarithmic (the view of
    arXiv 2606.02276's main figure): one panel per variant, one line per K with its 95% CI band, the
    chance level at 1×. The hard-negative panel plots each point at its mean *effective* pool (the
    label-matched population can be smaller than N), not at the nominal N. Pool sizes at or above
    the split's candidates are not points of their own (the full database covers them); the panel
    says which were clipped. One legend for the figure, below the panels (inside a panel it covered
    the N = 100 points); the notes sit under each panel's title. The title names model, split and
    checkpoint. Returns the matplotlib Figure (Agg backend); saved to ``path`` when given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rl = res.get("relinkage", {})
    keys = list(rl) or ["(none)"]
    # Fixed margins (inches over the figure's width) instead of tight_layout, which measured every
    # text box and took most of the plotting time (≈ 1 s of evaluate.py's fixed cost on 2 cores).
    width, height = 4.4 * len(keys), 4.6
    fig, axes = plt.subplots(1, len(keys), figsize=(width, height), squeeze=False, gridspec_kw=dict(
        left=0.75 / width, right=1 - 0.15 / width, bottom=0.95 / height, top=1 - 0.95 / height, wspace=0.3))
    ks_all: list[int] = []
    zero_ci = False
    for ax, key in zip(axes[0], keys):
        sec = rl.get(key)
        hard = bool(sec) and sec.get("variant") == "hardneg"
        x_chance_axes(ax, VARIANT_TITLES.get(key, key), hard, "Recall@K ÷ chance")
        if not sec:
            continue
        ks = sorted({r["k"] for r in sec["recall"]})
        ks_all += [k for k in ks if k not in ks_all]
        floor = x_chance_floor(sec["recall"])
        top = max([v for r in sec["recall"] for v in [r.get("x_chance"), *(r.get("x_chance_ci") or [])]
                   if v is not None] + [1.0]) * 1.6
        for k in ks:
            plot_x_chance(ax, [r for r in sec["recall"] if r["k"] == k], hard, f"C{ks_all.index(k)}", f"K={k}",
                          band_alpha=0.2, floor=floor)
        zero_ci |= any((r.get("x_chance_ci") or [1])[0] <= 0 or (r.get("x_chance") or 0) <= 0 for r in sec["recall"])
        ax.set_ylim(floor, top)
        ax.axhline(1.0, color="k", ls="--", lw=1)
        notes = [f"{sec['n_queries']} queries, {sec['n_candidates']} candidates"]
        if sec.get("clipped_n"):
            notes.append(f"N = {', '.join(str(n) for n in sec['clipped_n'])} ≥ candidates: shown as full")
        ax.text(0.5, 1.02, "\n".join(notes), transform=ax.transAxes, fontsize=7, ha="center", va="bottom")
        ax.set_title(VARIANT_TITLES.get(key, key), fontsize=10, pad=6 + 9 * len(notes))
        ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=f"C{i}", marker="o", label=f"K={k}") for i, k in enumerate(ks_all)]
    handles.append(Line2D([], [], color="k", ls="--", lw=1, label="chance (1×)"))
    if ks_all:
        handles.append(Patch(color="C0", alpha=0.2, label="95% CI"))
    if zero_ci:
        handles.append(Line2D([], [], color="0.3", marker="v", ls="none", label="95% CI (▽: value) reaches 0, off the log axis"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    title = describe(res.get("meta", {}))
    if title:
        import textwrap

        # Wrapped to the figure's width: one long line was cut at both edges.
        fig.suptitle("\n".join(textwrap.wrap(f"Re-linkage: {title}", 110)), fontsize=9)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig
