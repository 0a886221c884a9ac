"""The ``risk`` section (audit/risk.py) as scalars, a headline clause and report.md lines: aggregate numbers
only, never report text. audit/result.py calls these three; they read nothing else of the result."""

from __future__ import annotations

from typing import Any


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _pts(v: Any) -> str:
    """A difference of two rates in percentage points, signed."""
    return "–" if v is None else f"{100 * v:+.2f}"


def _ci(c: Any, f=_pct) -> str:
    return f" [{f(c[0])}, {f(c[1])}]" if c else ""


def risk_scalars(sec: dict[str, Any]) -> dict[str, float]:
    """Stable scalar names (what loggers and W&B summaries see): ``risk/capability``, ``risk/release_attributable``,
    ``risk/memorisation`` (the best attack's members - non-members R@1 difference), ``risk/membership/auc``,
    ``risk/membership/tpr@fpr=<a>``, each with ``/ci_low`` and ``/ci_high`` where there is an interval; the spread
    over draws (``/min``, ``/max``) and the one-sided lower bounds (``/lower95``)."""
    out: dict[str, Any] = {}

    def put(name: str, v: Any, ci: Any = None) -> None:
        out[name] = v
        if ci:
            out[name + "/ci_low"], out[name + "/ci_high"] = ci

    cap = sec.get("capability") or {}
    put("risk/capability", cap.get("value"), cap.get("ci"))
    out["risk/capability/x_chance"] = cap.get("x_chance")
    ra = sec.get("release_attributable")
    if ra:
        put("risk/release_attributable", ra["value"], ra.get("ci"))
        out.update({"risk/release_attributable/min": ra["min"], "risk/release_attributable/max": ra["max"],
                    "risk/release_attributable/with": ra["with_mean"],
                    "risk/release_attributable/without": ra["without_mean"],
                    "risk/release_attributable/n_draws": ra["n_draws"]})
    mem = sec.get("memorisation")
    if mem:
        b = mem["best"]
        put("risk/memorisation", b["difference"], b.get("difference_ci"))
        out["risk/memorisation/lower95"] = b.get("difference_lower95_one_sided")
        out["risk/memorisation/pool"] = mem["pool"]
        pm = mem.get("pair_membership")
        if pm:
            put("risk/membership/auc", pm["auc"], pm.get("auc_ci"))
            out["risk/membership/auc/lower95"] = pm.get("auc_lower95_one_sided")
            for r in pm["tpr_at_fpr"]:
                if r.get("tpr") is not None:
                    put(f"risk/membership/tpr@fpr={r['fpr']:g}", r["tpr"], r.get("ci"))
    return {k: float(v) for k, v in out.items() if v is not None}


def risk_headline(sec: dict[str, Any]) -> list[str]:
    """Clauses for the headline: the three numbers with their intervals."""
    bits = []
    cap = sec.get("capability") or {}
    n = sec.get("n")
    bits.append(f"capability (held-out image→report R@{sec.get('k', 1)} at N = {n}): {_pct(cap.get('value'))}%"
                f"{_ci(cap.get('ci'))}")
    ra = sec.get("release_attributable")
    if ra:
        bits.append(f"release-attributable {_pts(ra['value'])} points{_ci(ra.get('ci'), _pts)} over {ra['n_draws']} "
                    f"aux draws (range {_pts(ra['min'])} to {_pts(ra['max'])})")
    mem = sec.get("memorisation")
    if mem:
        b = mem["best"]
        bits.append(f"memorisation (members − held-out, R@1 in pools of {mem['pool']}"
                    f"{', label-matched' if mem.get('label_matched') else ''}) {_pts(b['difference'])} points"
                    f"{_ci(b.get('difference_ci'), _pts)} by {b['attack']}, one-sided 95% lower bound "
                    f"{_pts(b.get('difference_lower95_one_sided'))}")
        pm = mem.get("pair_membership")
        if pm:
            bits.append(f"pair membership AUC {pm['auc']:.3f}{_ci(pm.get('auc_ci'), lambda v: f'{v:.3f}')}"
                        f" ({'calibrated' if pm['calibrated'] else 'uncalibrated'})")
    for name, why in (sec.get("not_computed") or {}).items():
        bits.append(f"{name.replace('_', '-')} not computed ({why})")
    return bits


def risk_lines(sec: dict[str, Any]) -> list[str]:
    """report.md's section for the three numbers."""
    cap = sec.get("capability") or {}
    lines = ["## Capability, release-attributable, memorisation", "",
             "Three questions, three numbers (docs/audit.md): what the model can do on unseen patients, what releasing "
             "it adds over an attacker without it, and what it memorised of its training patients.", "",
             "| number | value | 95% CI | note |", "|---|---:|---|---|",
             f"| capability: image→report R@{sec.get('k', 1)} at N = {cap.get('n_value', sec.get('n'))} (%) | "
             f"{_pct(cap.get('value'))} | {_ci(cap.get('ci')).strip() or '–'} | chance {_pct(cap.get('chance'))}%, "
             f"{cap.get('x_chance', 0):.2f}× chance |"]
    ra = sec.get("release_attributable")
    if ra:
        lines.append(f"| release-attributable (points) | {_pts(ra['value'])} | {_ci(ra.get('ci'), _pts).strip() or '–'} | "
                     f"{ra['n_draws']} draws, range {_pts(ra['min'])} to {_pts(ra['max'])}; with the release "
                     f"{_pct(ra['with_mean'])}%, without {_pct(ra['without_mean'])}% |")
    mem = sec.get("memorisation")
    if mem:
        b = mem["best"]
        lines.append(f"| memorisation: members − held-out R@1 (points) | {_pts(b['difference'])} | "
                     f"{_ci(b.get('difference_ci'), _pts).strip()} | {b['attack']}; one-sided 95% lower bound "
                     f"{_pts(b.get('difference_lower95_one_sided'))}; pools of {mem['pool']} |")
        pm = mem.get("pair_membership")
        if pm:
            tprs = "; ".join(f"TPR at {100 * r['fpr']:g}% FPR " + (f"{_pct(r['tpr'])}%{_ci(r.get('ci'))}"
                                                                    if r.get("tpr") is not None else "not resolvable")
                             for r in pm["tpr_at_fpr"])
            lines.append(f"| pair membership AUC | {pm['auc']:.3f} | {_ci(pm.get('auc_ci'), lambda v: f'{v:.3f}').strip()} "
                         f"| {tprs}; {pm['n_members']} vs {pm['n_nonmembers']} studies |")
    for name, why in (sec.get("not_computed") or {}).items():
        lines.append(f"| {name.replace('_', '-')} | not computed | | {why} |")
    if ra:
        lines += ["", f"Release-attributable per aux draw ({sec.get('n_aux')} aux pairs each; the best attack on each "
                  "side, selected on the audited split):", "",
                  "| draw | best with the release | R@1 (%) | best without | R@1 (%) | difference (points) |",
                  "|---:|---|---:|---|---:|---:|"]
        for d in ra["draws"]:
            lines.append(f"| {d['draw']} | {d['best_with']} | {_pct(d['with'])} | {d['best_without']} | "
                         f"{_pct(d['without'])} | {_pts(d['difference'])} |")
        lines.append("")
        srcs = "; ".join(f"{s} ({', '.join(a)})" for s, a in ra["no_release_sources"].items())
        lines.append(f"- no-release sources: {srcs}")
        if ra.get("one_draw_why"):
            lines.append(f"- one draw only: {ra['one_draw_why']}")
        for s, what in (sec.get("no_release_info") or {}).items():
            lines.append(f"- {s}: {what if isinstance(what, str) else what.get('trunk', what)}")
    if mem:
        lines += ["", "Memorisation per attack (R@1 %, each group's queries against its own pool):", "",
                  "| attack | members | held-out | difference (points) | 95% CI | one-sided lower bound |",
                  "|---|---:|---:|---:|---|---:|"]
        for a, r in mem["attacks"].items():
            lines.append(f"| {a} | {_pct(r['members']['r1'])} | {_pct(r['nonmembers']['r1'])} | {_pts(r['difference'])} | "
                         f"{_ci(r['difference_ci'], _pts).strip()} | {_pts(r.get('difference_lower95_one_sided'))} |")
        match = (f"label-matched on {mem.get('label_mapping')} label patterns ({mem.get('n_patterns')} patterns)"
                 if mem.get("label_matched") else f"not label-matched: {mem.get('why_not', '')}")
        lines += ["", f"- pools: {mem['pool']} studies per group, {match}; chance {_pct(mem['chance'])}%"]
        pm = mem.get("pair_membership")
        if pm:
            lines.append(f"- pair membership score: {pm['score']} ({pm['n_references']} reference model(s))")
    return lines
