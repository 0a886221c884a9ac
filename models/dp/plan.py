"""The DP stage's plan: its settings (the one source of their defaults), the facts of the data the plan reads,
and a pure function from both to a frozen plan -- sigma, q, steps, delta, the unit, the gradient divisor.

The module (models/dp/module.py) asks for the plan once, in ``configure_optimizers``, and its training step
and privacy record (models/dp/record.py) read it; nothing else sets a DP quantity. The settings are
registered as the Hydra configs ``dp/settings/dp`` and ``dp/settings/loss`` (configs/__init__.py), which
configs/experiment/dp_alignment.yaml composes: the YAML states only what differs from here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

LOSS_DEFAULTS: dict[str, Any] = {
    "mode": "public_negatives",  # public_negatives | group_clipping | in_batch (no valid epsilon)
    "bank_size": 1024,  # public pairs per step (embedded without gradient)
    "group_size": 16,  # group_clipping: expected units per group
    "seed": 0,  # public randomness for bank draws and group assignment
}
DP_DEFAULTS: dict[str, Any] = {
    "enabled": True,  # false: the same run without clipping, noise or accountant (a non-private control)
    "target_epsilon": 3.0,
    "target_delta": None,  # null: 1 / (10 N), N the train units' count (n_public) or its public upper bound
    "accountant": "rdp",  # rdp | prv
    "max_grad_norm": 1.0,
    "epochs": None,  # null: trainer.max_epochs (sigma is set for the whole planned run)
    "epsilon_tolerance": 1e-3,  # binary search for sigma: eps in [target - tol, target]
    "secure_mode": False,  # cryptographically secure noise (needs torchcsprng)
    # Debugging only: noise and Poisson batches drawn from this seed, so the run can be replayed by
    # anyone who reads the config -- and so it is marked guarantee_valid = False.
    "INSECURE_replayable_seed": None,
    # delta >= 1/N admits a mechanism that publishes one whole record: refused unless this is set
    # (and the run is then marked guarantee_valid = False).
    "allow_delta_ge_1_over_n": False,
    # Opacus' per-sample clipping: "hooks" materialises per-sample gradients (grad_sample);
    # "ghost" (ghost clipping, Li et al. 2021) computes the same per-sample norms from activations
    # and output gradients and takes a second, rescaled backward: the same clipped sum, faster.
    "grad_sample_mode": "ghost",
    # Which heads DP training starts from (docs/dp.md, "Which heads are trained"): "fresh" re-initialises
    # them with the head architecture's own init, drawn from head_init_seed; "stage2" fine-tunes the
    # trained heads of the stage-2 checkpoint / existing model. The initial weights depend on no data, so
    # DP needs no secret here: the seed is public (the experiment config sets it to the run's seed).
    "head_init": "fresh",
    "head_init_seed": 0,
    # N, the number of private training units, is not public under add/remove adjacency. Unless the data
    # holder declares it public (true), records carry only N rounded up to a multiple of the expected
    # batch B (what q = 1/ceil(N/B) and the step count reveal anyway) and the default delta is set from
    # that upper bound; true releases N exactly and defaults delta to 1/(10 N).
    "n_public": False,
    # q = 1/ceil(N/B) and the step count are functions of the private N: neighbouring datasets on either side
    # of a multiple of B run different mechanisms (the number of released steps tells them apart). A bound
    # the data holder declares public (N <= n_units_bound) fixes q = 1/ceil(bound/B) and the steps instead:
    # then nothing but the Poisson batches depends on N and the adjacency is plain add/remove.
    "n_units_bound": None,
}
SETTINGS = {"dp": DP_DEFAULTS, "loss": LOSS_DEFAULTS}
PRIVACY_UNITS = ("study", "patient")


def settings(name: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``name`` settings ("dp" | "loss") updated with ``given``; a key the defaults do not define is a
    TypeError (a misspelt override would otherwise be ignored silently)."""
    base = copy.deepcopy(SETTINGS[name])
    unknown = sorted(set(given or {}) - set(base))
    if unknown:
        raise TypeError(f"unknown model.{name} settings {unknown}; known: {sorted(base)}")
    return {**base, **(given or {})}


@dataclass(frozen=True)
class DataFacts:
    """What the plan reads of the training data. ``batch_size`` and ``max_studies_cap`` are public
    (configured); ``n_units`` and ``observed_max_studies`` are private and reach no record unless declared."""

    n_units: int  # N, the DP units of the train split
    batch_size: int  # B, the configured expected Poisson batch
    privacy_unit: str = "study"
    max_studies_cap: int | None = None  # data.max_studies_per_patient (public)
    observed_max_studies: int | None = None  # the most studies of one train patient (private)

    @classmethod
    def of(cls, dm) -> DataFacts:
        """The facts of a feature datamodule (datamodules/features.py): read, never defaulted, so a datamodule
        that lacks one is an AttributeError rather than a plan for the wrong unit."""
        return cls(n_units=int(dm.n_train_units), batch_size=int(dm.batch_size), privacy_unit=str(dm.privacy_unit),
                   max_studies_cap=dm.max_studies_per_patient, observed_max_studies=dm.train_max_studies_per_patient)


@dataclass(frozen=True)
class DPPlan:
    """Every quantity of the mechanism, fixed before the first step. ``noise_multiplier`` is None when DP is
    disabled (the same schedule without clipping or noise)."""

    enabled: bool
    mode: str
    privacy_unit: str
    target_epsilon: float
    delta: float
    noise_multiplier: float | None
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    expected_batch_size: int  # the gradient divisor: the configured B, never a count derived from N
    n_units: int  # private: released only with n_public
    n_units_upper: int  # public: B * steps_per_epoch >= N
    n_public: bool
    n_units_bound: int | None
    max_grad_norm: float
    accountant: str
    max_studies_cap: int | None
    observed_max_studies: int | None
    delta_allowed_ge_1_over_n: bool = False

    @property
    def steps_planned(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def delta_ge_1_over_n(self) -> bool:
        return self.delta >= 1.0 / self.n_units

    @property
    def n_released(self) -> int:
        """The N a record may state: exact only when declared public, else the public upper bound."""
        return self.n_units if self.n_public else self.n_units_upper

    def n_text(self) -> str:
        if self.n_public:
            return f"N = {self.n_units}"
        return f"N <= {self.n_units_upper}, exact N withheld (model.dp.n_public=false)"

    def gradient_divisor(self) -> str | None:
        if not self.enabled:
            return None
        if self.mode == "group_clipping":
            return "the number of groups, round(B / group_size) (public)"
        return f"B = {self.expected_batch_size} (configured expected batch)"


def make_plan(dp: dict[str, Any], mode: str, facts: DataFacts, epochs: int, restored: dict | None = None) -> DPPlan:
    """The plan of a DP (or, with ``dp["enabled"]`` false, non-private) head fine-tune: pure, from the settings,
    the data facts and the planned epochs. ``restored``: a resumed run's saved record, whose sigma is kept (the
    accountant's history continues with it). Raises on a delta >= 1/N unless allowed, and on a declared bound
    below N."""
    from cxr_relink.models.dp.accounting import default_delta, noise_multiplier_for

    if facts.privacy_unit not in PRIVACY_UNITS:
        raise ValueError(f"data.privacy_unit must be one of {PRIVACY_UNITS}, got {facts.privacy_unit!r}")
    if facts.n_units < 1:
        raise ValueError("the DP train split holds no units")
    b = int(facts.batch_size)
    bound = dp.get("n_units_bound")
    if bound is not None and facts.n_units > int(bound):
        raise ValueError(f"model.dp.n_units_bound={int(bound)} is below the number of {facts.privacy_unit} units in the "
                         "train split: raise the declared bound (it must hold for every dataset the guarantee covers)")
    # ceil(N/B) batches an epoch (what a plain loader of batch B has), or ceil(bound/B) for a declared bound.
    steps_per_epoch = math.ceil((int(bound) if bound is not None else facts.n_units) / b)
    n_upper = b * steps_per_epoch
    n_public = bool(dp["n_public"])
    delta = float(dp["target_delta"]) if dp["target_delta"] is not None else default_delta(
        facts.n_units if n_public else n_upper)
    enabled = bool(dp["enabled"])
    if enabled and delta >= 1.0 / facts.n_units:
        msg = (f"dp.target_delta={delta:.3g} is not below 1/N = {1 / facts.n_units:.3g} (N = {facts.n_units} "
               f"{facts.privacy_unit} units): such a delta admits a mechanism that publishes a whole record")
        if not dp["allow_delta_ge_1_over_n"]:
            raise ValueError(msg + "; lower it (null = 1/(10 N)) or set model.dp.allow_delta_ge_1_over_n=true "
                             "(the run is then marked guarantee_valid=0)")
    q = 1.0 / steps_per_epoch
    sigma = None
    if enabled:
        if restored and restored.get("noise_multiplier") is not None:
            sigma = float(restored["noise_multiplier"])
        else:
            sigma = noise_multiplier_for(float(dp["target_epsilon"]), delta, q, steps=epochs * steps_per_epoch,
                                         accountant=dp["accountant"], epsilon_tolerance=float(dp["epsilon_tolerance"]))
    return DPPlan(enabled=enabled, mode=mode, privacy_unit=facts.privacy_unit, target_epsilon=float(dp["target_epsilon"]),
                  delta=delta, noise_multiplier=sigma, sample_rate=q, steps_per_epoch=steps_per_epoch, epochs=int(epochs),
                  expected_batch_size=b, n_units=facts.n_units, n_units_upper=n_upper, n_public=n_public,
                  n_units_bound=None if bound is None else int(bound), max_grad_norm=float(dp["max_grad_norm"]),
                  accountant=str(dp["accountant"]), max_studies_cap=facts.max_studies_cap,
                  observed_max_studies=facts.observed_max_studies,
                  delta_allowed_ge_1_over_n=bool(dp["allow_delta_ge_1_over_n"]))


def check_trainer(trainer: Any, clips: str) -> None:
    """What DP-SGD here needs of the Trainer, for every DP module: one device (Opacus' DPDDP is not wired),
    fp32 (per-unit norms and the noise), and no global gradient clipping on top of its own per-`clips` one."""
    if trainer.world_size > 1:
        raise ValueError("DP-SGD runs on one device here (Opacus' DPDDP is not wired); use trainer=cpu or gpu with "
                         "devices=1")
    if str(trainer.precision) not in ("32-true", "32", "64-true"):
        raise ValueError(f"DP-SGD runs in fp32 here (per-unit norms and noise), got trainer.precision={trainer.precision}")
    if trainer.gradient_clip_val:
        raise ValueError(f"set trainer.gradient_clip_val=null: DP-SGD clips per {clips} itself")

