"""RESULTS.md's section beyond both papers (issue #31): per released model of the privacy-utility frontier
(experiments/frontier.py, kept in experiments/results/frontier/), the three numbers of docs/audit.md —
capability, release-attributable, memorisation — with the best adaptive attack, the trunk attacks and the
matched-probe AUROC. A function of the kept frontier records alone (Records.frontier), like every claim."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from experiments.reproduce.records import Records
from experiments.reproduce.text import rel_path

Claim = tuple[list[str], list[tuple[str, str, str, str]]]
TRUNK = ("ridge", "head")  # fitted on the frozen trunk's features: head-only DP cannot move them


def _covers_zero(ci) -> bool:
    return ci is not None and ci[0] <= 0 <= ci[1]


def trunk_means(r: dict) -> dict[str, float]:
    """Each trunk attack's R@1 with the release, the mean over the arm's auxiliary draws."""
    draws = r["release_attributable"]["draws"]
    return {a: float(np.mean([d["attacks"]["with"][a] for d in draws])) for a in TRUNK
            if all(a in d["attacks"]["with"] for d in draws)}


def beyond(rec: Records) -> Claim:
    from experiments.frontier import arm_names, table

    fr = rec.frontier
    if rec.frontier_dir is None:  # this reproduction was not given a frontier (scale tiny, --frontier none)
        return [], []
    L = ["## Beyond the papers: what a release adds, what DP protects, and a defence that moves the trunk attacks", ""]
    if not fr:
        return L + ["not available: no frontier records kept (`python -m experiments.frontier`, "
                    "experiments/results/frontier/)", ""], []
    scale = next(iter(fr.values()))["scale"]
    L += [f"`python -m experiments.frontier --draws {scale['draws']}` (kept in `{rel_path(rec.frontier_dir)}`; "
          f"**one seed ({scale['seed']}) at a small scale**: synthcxr {scale['patients']} patients at "
          f"{scale['image_size']} px, tiny bert_encoder towers, public cohort {scale['public_patients']} patients; "
          f"whole-model arms {scale['epochs']} epochs from the public-only model, head-only arms "
          f"{scale['head_epochs']} epochs on the control's trunk; ε per patient). Per released model: *capability* "
          "(R@1 of held-out patients, N = 100, patient-bootstrap 95% CI), the best attack with the release (mean "
          "over draws, selected on the audited split), *release-attributable* (best with minus best without the "
          f"release on the same {scale['n_aux']} auxiliary pairs, {scale['draws']} draws; CI over draws and "
          "patients), *memorisation* (training patients minus label-matched held-out patients, equal pools, best "
          "attack; two-sample patient bootstrap) and the matched public-cohort probe's macro AUROC. Percent; "
          "docs/audit.md explains the three numbers with a worked example.", "",
          table(fr, SimpleNamespace(epsilons=scale["epsilons"])), ""]
    rows = []
    trunk = {arm: trunk_means(r) for arm, r in fr.items()}
    ctrl = trunk.get("control", {})
    L += ["Trunk attacks (R@1 %, with the release, mean over draws): "
          + "; ".join(f"{arm}: " + ", ".join(f"{a} {100 * v:.1f}" for a, v in trunk[arm].items())
                      for arm in arm_names(scale["epsilons"]) if arm in trunk) + ".", ""]
    for arm in arm_names(scale["epsilons"]):
        r = fr.get(arm)
        if r is None or arm == "public_init":
            continue
        m, ra = r["memorisation"]["best"], r["release_attributable"]
        # "members are more linkable" is one-sided: its 95% lower bound above 0 (the two-sided CI's lower end,
        # more conservative, for records without one); release-attributable by its two-sided CI
        lb = m.get("difference_lower95_one_sided", m["difference_ci"][0])
        mem = (f"memorisation shown (one-sided 95% lower bound {100 * lb:.1f} > 0)" if lb > 0 else
               f"memorisation not shown (one-sided 95% lower bound {100 * lb:.1f} ≤ 0)")
        rel = ("release-attributable not shown (CI includes 0)" if _covers_zero(ra.get("ci"))
               else "release-attributable shown (CI excludes 0)")
        moved = [a for a in TRUNK if a in ctrl and a in trunk[arm] and trunk[arm][a] < ctrl[a]]
        note = ("trunk attacks identical to the control's (by construction: same trunk)" if arm.startswith("head_dp")
                else f"trunk-attack means below the control's (point estimates): {', '.join(moved) or 'none'}" if arm != "control" else "")
        rows.append((f"B. {arm}", f"{mem}; {rel}" + (f"; {note}" if note else ""),
                     f"memorisation {100 * m['difference']:.1f} [{100 * m['difference_ci'][0]:.1f}, "
                     f"{100 * m['difference_ci'][1]:.1f}] points; release-attributable {100 * ra['value']:.1f} points",
                     "python -m experiments.frontier"))
        L.append(f"- **{arm}**: {rows[-1][1]} ({rows[-1][2]}).")
    n_mem = sum(r[1].startswith("memorisation shown") for r in rows)
    L += ["", f"{n_mem} of {len(rows)} arms' memorisation lower bounds exceed 0 at one-sided 95% each, without a "
          f"correction for {len(rows)} tests (≈ {0.05 * len(rows):.1f} expected by chance alone)"
          + ("; the non-private control's does not, so no DP arm can be said to protect members here."
             if not any(r[0] == "B. control" and r[1].startswith("memorisation shown") for r in rows) else ".")]
    L += ["", "What each number means: capability is what the model *can do* to unseen patients; only "
          "release-attributable is what releasing it *adds* over an attacker without it; only memorisation is what "
          "DP's ε protects (training patients). Where memorisation is not shown for the non-private control, no arm "
          "here can show DP protecting anyone: the test's power is shown on `experiment=memorise` (docs/audit.md).",
          f"Reading and caveats: `{rel_path(rec.frontier_dir)}/README.md`.", ""]
    return L, rows
