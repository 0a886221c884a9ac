"""The DP plan (models/dp/plan.py) and record (models/dp/record.py): one source of defaults, a pure plan whose
quantities match independent computations, and a record read off a plan without training anything."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from cxr_relink.models.dp import record
from cxr_relink.models.dp.plan import DP_DEFAULTS, LOSS_DEFAULTS, DataFacts, make_plan, settings


def test_the_experiment_config_composes_the_one_source_of_defaults() -> None:
    """configs/experiment/dp_alignment.yaml states only what differs from DP_DEFAULTS / LOSS_DEFAULTS (the
    public head-init seed is the run's seed): a key added to the defaults reaches the config without a copy."""
    from omegaconf import OmegaConf

    from cxr_relink.configs import compose

    cfg = compose("train.yaml", ["experiment=dp_alignment", "seed=7"])
    dp = OmegaConf.to_container(cfg.model.dp, resolve=True)
    assert dp == {**DP_DEFAULTS, "head_init_seed": 7}
    assert OmegaConf.to_container(cfg.model.loss) == LOSS_DEFAULTS


def test_a_misspelt_setting_is_refused() -> None:
    with pytest.raises(TypeError, match=r"unknown model.dp settings \['target_epsilom'\]"):
        settings("dp", {"target_epsilom": 1.0})
    from cxr_relink.models.dp.module import DPAlignmentModule

    with pytest.raises(TypeError, match="n_unit_bound"):
        DPAlignmentModule(heads={"image_dim": 4, "text_dim": 4, "embed_dim": 4}, dp={"n_unit_bound": 10})


@pytest.mark.parametrize("n, b, epochs, eps", [(2300, 256, 20, 0.34), (230, 48, 3, 2.0), (17, 8, 1, 3.0)])
@pytest.mark.slow
def test_plan_matches_independent_computations(n, b, epochs, eps) -> None:
    """q = 1/ceil(N/B), steps = epochs ceil(N/B), delta = 1/(10 B ceil(N/B)) (N withheld), the divisor B, and
    Opacus' own RDP accountant spends the target epsilon (to the search tolerance) for the planned sigma."""
    plan = make_plan(settings("dp", {"target_epsilon": eps}), "public_negatives", DataFacts(n_units=n, batch_size=b), epochs)
    k = -(-n // b)
    assert plan.sample_rate == pytest.approx(1 / k) and plan.steps_planned == epochs * k
    assert plan.delta == pytest.approx(1 / (10 * b * k)) and plan.n_units_upper == b * k and plan.expected_batch_size == b
    acc = RDPAccountant()
    acc.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps_planned)]
    assert eps - 1e-3 - 1e-9 <= acc.get_epsilon(delta=plan.delta) <= eps + 1e-9
    assert make_plan(settings("dp", {"target_epsilon": eps}), "public_negatives", DataFacts(n_units=n, batch_size=b),
                     epochs) == plan  # pure: the same inputs, the same plan


@pytest.mark.slow
def test_delta_rule_and_declared_bound_are_the_plans() -> None:
    facts = DataFacts(n_units=100, batch_size=10)
    with pytest.raises(ValueError, match="not below 1/N"):
        make_plan(settings("dp", {"target_delta": 0.01}), "public_negatives", facts, 1)
    allowed = make_plan(settings("dp", {"target_delta": 0.01, "allow_delta_ge_1_over_n": True}), "public_negatives", facts, 1)
    assert allowed.delta_ge_1_over_n and record.invalid_reasons(settings("dp"), "public_negatives", allowed)
    bounded = make_plan(settings("dp", {"n_units_bound": 1000}), "public_negatives", facts, 2)
    assert bounded.sample_rate == pytest.approx(1 / 100) and bounded.steps_planned == 200 and bounded.n_units_upper == 1000


def test_record_is_read_off_the_plan() -> None:
    """The record states the plan's quantities, N withheld (unless declared), the per-unit sensitivity, and for
    patient units a per-patient guarantee equal to the unit's own."""
    dp = settings("dp", {"target_epsilon": 1.0})
    plan = make_plan(dp, "group_clipping", DataFacts(n_units=230, batch_size=48, privacy_unit="patient"), 2)
    rec = record.build(plan, dp, "group_clipping", epsilon_spent=0.9, accountant=None, head_init={"mode": "fresh"},
                       outside_guarantee=[])
    assert rec["guarantee_valid"] and rec["privacy_unit"] == "patient" and rec["n_train_units"] is None
    assert rec["n_train_units_upper"] == 240 and rec["noise_multiplier"] == plan.noise_multiplier
    assert rec["sensitivity"] == 2.0 and "groups" in rec["gradient_divisor"]
    assert rec["per_patient"] == {"epsilon": 0.9, "delta": plan.delta, "k": 1, "meaningful": True,
                                  "basis": "patient units: all studies of a patient are one unit"}
    assert not any("230" in x for x in record.outside_guarantee_of_data(plan))
    assert math.isclose(rec["delta"], 1 / 2400)


@pytest.mark.parametrize("change, message", [({"world_size": 2}, "one device"),
                                             ({"precision": "bf16-mixed"}, "fp32"),
                                             ({"gradient_clip_val": 1.0}, "gradient_clip_val=null")])
def test_every_dp_module_refuses_a_trainer_dp_sgd_cannot_run_under(change, message):
    from types import SimpleNamespace

    from cxr_relink.models.dp.plan import check_trainer

    ok = {"world_size": 1, "precision": "32-true", "gradient_clip_val": None}
    check_trainer(SimpleNamespace(**ok), "unit")  # the supported set-up passes
    with pytest.raises(ValueError, match=message):
        check_trainer(SimpleNamespace(**{**ok, **change}), "unit")
