"""The privacy record of a DP run (``dp_state``: saved in every checkpoint, beside every audit of it, and as
dp_record.json beside an exported model), built from the plan (models/dp/plan.py) and what the run spent.
Pure functions: a test builds a plan and reads the record without training anything."""

from __future__ import annotations

from typing import Any

from cxr_relink.models.dp.accounting import group_privacy
from cxr_relink.models.dp.losses import SENSITIVITY_FACTOR, VALID_DP_MODES
from cxr_relink.models.dp.plan import DPPlan

INVALID_LABEL = "in_batch: NO valid epsilon (InfoNCE is not per-example decomposable)"
SCOPE = "epsilon covers this stage given the frozen checkpoint; end-to-end only if that checkpoint never saw these units"
# Outputs of a DP run that touch private data outside the mechanism (stated next to epsilon).
OUTSIDE_GUARANTEE = (
    "the frozen stage-2 checkpoint (and, with dp.head_init=stage2, the heads training starts from): epsilon is "
    "end to end only if it was trained without these units",
    "audits of the val/test splits (re-linkage, probe scores): those patients are not DP training units "
    "and are not protected by epsilon; only aggregate numbers are written",
    "repeated runs and hyper-parameter sweeps on the same units: each run spends its own epsilon "
    "(k runs: up to k * epsilon by composition; choosing the best run is a further release)",
)


def noise_source(dp: dict[str, Any]) -> str:
    if dp["INSECURE_replayable_seed"] is not None:
        return "INSECURE: seeded from dp.INSECURE_replayable_seed (replayable)"
    if dp["secure_mode"]:
        return "Opacus secure_mode (cryptographically secure generator)"
    return "secret: generators seeded from the OS entropy pool, seeds recorded nowhere"


def invalid_reasons(dp: dict[str, Any], mode: str, plan: DPPlan | None) -> list[str]:
    """Why the printed epsilon does not hold for the released heads (empty: it holds)."""
    if not dp["enabled"]:
        return ["DP disabled"]
    reasons = []
    if mode not in VALID_DP_MODES:
        reasons.append(INVALID_LABEL)
    if dp["INSECURE_replayable_seed"] is not None:
        reasons.append("dp.INSECURE_replayable_seed is set: noise and batches can be replayed by anyone with the config")
    if plan is not None and plan.delta_ge_1_over_n:
        reasons.append(f"delta {plan.delta:.3g} >= 1/N ({plan.n_text()})")
    return reasons


def per_patient_guarantee(plan: DPPlan, epsilon: float) -> dict[str, Any] | None:
    """(epsilon, delta) for one patient and all their studies: the unit's own with patient units; the
    group-privacy bound over k study units otherwise, k a public cap when one is set -- stated as no meaningful
    guarantee when its delta reaches 1/#patients."""
    if not plan.enabled:
        return None
    if plan.privacy_unit == "patient":
        return {"epsilon": epsilon, "delta": plan.delta, "k": 1, "meaningful": True,
                "basis": "patient units: all studies of a patient are one unit"}
    k = plan.max_studies_cap or plan.observed_max_studies
    if not k:
        return None
    g_eps, g_delta = group_privacy(epsilon, plan.delta, int(k))
    source = ("public cap data.max_studies_per_patient" if plan.max_studies_cap else
              "observed: the most studies of one train patient, read from the private data (outside the guarantee)")
    out = {"epsilon": g_eps, "delta": g_delta, "k": int(k), "k_source": source,
           "basis": "group privacy over k study units: (k eps, k e^((k-1) eps) delta)", "meaningful": True}
    # The same rule as for the unit itself (delta < 1/N): a delta of 1/#patients or more admits a mechanism
    # that publishes one patient whole. #patients is private; the study units' public bound B*ceil(N/B) is
    # >= #patients, so delta < 1/bound implies delta < 1/#patients (conservative, and it reads no private count).
    bound = plan.n_released
    if g_delta >= 1.0 / bound:
        out["meaningful"] = False
        out["why_not"] = (f"group privacy gives delta {g_delta:.3g} >= 1/{bound} (1 / the public bound on the number of "
                          "train patients): no meaningful per-patient guarantee; use data.privacy_unit=patient")
    return out


def adjacency(plan: DPPlan) -> str:
    if plan.n_units_bound is not None:
        out = (f"add/remove one unit (Poisson sampling) among datasets of at most {plan.n_units_bound} units "
               "(model.dp.n_units_bound, declared public: q and the step count are set from it, not from N)")
    else:
        out = ("add/remove one unit (Poisson sampling) among datasets with the same ceil(N/B) (q = 1/ceil(N/B) and the "
               "step count are set from N: a neighbour across a multiple of B runs another mechanism, told apart by the "
               "number of steps; declare a public bound, model.dp.n_units_bound, for plain add/remove)")
    if plan.max_studies_cap and plan.privacy_unit == "study":
        out += (f"; with the cap of {plan.max_studies_cap} studies per patient, a study added to a patient at the cap "
                "can displace one of that patient's studies (two units change: (2 eps, 2 e^eps delta) for it)")
    return out


def outside_guarantee_of_data(plan: DPPlan) -> list[str]:
    """What a run releases about the private data beyond the heads, read off its plan (listed beside epsilon)."""
    extra = []
    if plan.n_public:
        extra.append(f"N = {plan.n_units} private training units (and q, delta and the step count derived from "
                     "it) is released exactly: declared public by the data holder (model.dp.n_public=true); "
                     "add/remove adjacency does not protect it")
    elif plan.n_units_bound is None:
        extra.append(f"q = 1/{plan.steps_per_epoch} and the number of steps are set from N: they reveal N rounded up to a "
                     f"multiple of the expected batch {plan.expected_batch_size} (N <= {plan.n_units_upper}); exact N is "
                     "withheld from the DP record, checkpoint and this stage's log lines (model.dp.n_public=false)")
    if not plan.n_public:
        extra.append("the cohort loader's setup log lines (datamodules/datamodule.py: studies per split, reports "
                     "truncated) count the train split's studies: keep the run's console and log files with the "
                     "private data, or declare N public")
    if plan.privacy_unit == "study":
        if plan.max_studies_cap:
            extra.append(f"the cap data.max_studies_per_patient={plan.max_studies_cap} drops studies from the DP train "
                         "split; how many is logged for the operator (console), not covered by epsilon")
        elif plan.observed_max_studies:
            extra.append(f"max_studies_per_patient = {plan.observed_max_studies} (the most studies of one train patient) is "
                         "read from the private data to state the per-patient guarantee: set a public cap "
                         "(data.max_studies_per_patient) or use data.privacy_unit=patient to release none")
    return extra


def build(plan: DPPlan | None, dp: dict[str, Any], mode: str, *, epsilon_spent: float | None, accountant: dict | None,
          head_init: dict, outside_guarantee: list[str], backbone: dict | None = None,
          external: bool = False) -> dict[str, Any]:
    """The record: every quantity of the plan, what was spent, and what the guarantee does and does not cover.
    Before the plan exists (a module not yet trained), its quantities are None."""
    reasons = invalid_reasons(dp, mode, plan)
    enabled = bool(dp["enabled"])
    p = plan
    unit = p.privacy_unit if p else "study"
    state = {
        "enabled": enabled,
        "loss_mode": mode,
        "guarantee_valid": enabled and not reasons,
        "invalid_reasons": reasons,
        "noise_source": noise_source(dp) if enabled else None,
        "privacy_unit": unit,
        "adjacency": adjacency(p) if p else None,
        "per_patient": per_patient_guarantee(p, epsilon_spent or 0.0) if p else None,
        # Study units only (patient units need no k, and their observed k would be a release).
        "max_studies_per_patient": (p.max_studies_cap or p.observed_max_studies) if p and unit == "study" else None,
        "head_init": dict(head_init),
        "n_public": bool(dp["n_public"]),
        "n_train_units": p.n_units if p and p.n_public else None,
        "n_train_units_upper": p.n_units_upper if p else None,
        "n_units_bound": dp.get("n_units_bound"),
        "target_epsilon": dp["target_epsilon"],
        "delta": p.delta if p else None,
        "noise_multiplier": p.noise_multiplier if p else None,
        "sample_rate": p.sample_rate if p else None,
        "expected_batch_size": p.expected_batch_size if p else None,
        # What the noisy sum is divided by: public, never a count derived from N.
        "gradient_divisor": p.gradient_divisor() if p else None,
        "steps_planned": p.steps_planned if p else None,
        "max_grad_norm": dp["max_grad_norm"],
        "sensitivity": (SENSITIVITY_FACTOR[mode] * dp["max_grad_norm"]) if mode in VALID_DP_MODES else None,
        "accountant": accountant,
        "epsilon_spent": epsilon_spent if enabled else None,
        "backbone_checkpoint_sha256": (backbone or {}).get("checkpoint_sha256"),
        **({"backbone_model": {k: (backbone or {}).get(k) for k in ("external", "projections")}} if external else {}),
        "scope": SCOPE,
        "outside_guarantee": list(outside_guarantee),
    }
    if mode == "in_batch" and enabled:
        state["warning"] = INVALID_LABEL
    return state
