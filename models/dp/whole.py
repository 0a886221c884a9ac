"""Whole-model DP-SGD (issue #31, item 2): a dual tower trained end to end with DP-SGD, patient as the unit.

Why: head-only DP (models/dp/module.py) never touches the trunks, so every attack fitted on trunk features
(ridge, the adaptive head) is unchanged by construction. Here the trained parameters are chosen by ``scope``:

* ``whole``: every trainable parameter of both towers and both heads (an LLM tower with LoRA: its adapters;
  peft keeps the base frozen);
* ``lora``: the text tower's LoRA adapters + both heads (image tower and LLM base frozen) -- DP on the adapters;
* ``heads``: the heads only, on raw data (the head-only comparison without a feature cache).

The temperature (``logit_scale``) is frozen at its init (as in the head stage: a bare scalar would take a badly
scaled share of the clipping norm).

Mechanism (one step): units are drawn by Poisson sampling at rate q (datamodules/patient_units.py). For each drawn
unit u its loss l_u reads only u's own pairs and a bank of **public** pairs embedded with the current model
without gradient (``public_negatives``, models/dp/losses.py), so its gradient g_u does not depend on any other
private unit. g_u is computed by its own backward pass (one per unit: exact per-unit gradients for any
architecture, no per-sample hook rules needed), clipped to C, summed; Gaussian noise N(0, sigma^2 C^2) is added
and the sum divided by the configured expected batch B (public). Adding or removing one patient changes the sum
by one clipped term: sensitivity C, so Opacus' accountant for the sampled Gaussian mechanism (sigma, q, steps)
is the epsilon. sigma comes from models/dp/plan.py's ``make_plan`` (one planning function), the record from
models/dp/record.py.

No BatchNorm: in training mode it mixes the units of a forward pass, and its running statistics are updated by
every batch outside the clipped-and-noised gradient (a release DP does not cover). Towers are passed through
``opacus.validators.ModuleValidator.fix`` (BatchNorm -> GroupNorm) and then checked to hold no BatchNorm.

Noise and Poisson batches come from generators seeded from the OS entropy pool (``secrets``), never from
``cfg.seed``; ``dp.INSECURE_replayable_seed`` seeds them for debugging and marks the run invalid. The public
bank draw is public randomness (``loss.seed`` and the step).
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from opacus.accountants import create_accountant
from opacus.validators import ModuleValidator

from cxr_relink.models.checkpoint import plain
from cxr_relink.models.dp import record
from cxr_relink.models.dp.accounting import ACCOUNTANTS, accountant_state, epsilon_kwargs
from cxr_relink.models.dp.losses import in_batch_loss, public_negatives_loss
from cxr_relink.models.dp.plan import DataFacts, DPPlan, check_trainer, make_plan, settings
from cxr_relink.models.dual_tower import DualTowerModule

log = logging.getLogger(__name__)

SCOPES = ("whole", "lora", "heads")
# The only loss with a per-unit bound here: group_clipping's groups would need every drawn unit's forward inside
# one group's graph, and in_batch has no valid epsilon (models/dp/losses.py).
WHOLE_LOSS_MODES = ("public_negatives",)
SCOPE_TEXT = ("epsilon covers the released weights end to end (both towers and heads start from a data-independent "
              "init; every trained parameter is updated only through the DP mechanism); the frozen parts are the "
              "config's init, or, for an LLM tower with pretrained weights, that base model, trained by others")
OUTSIDE = (
    "the frozen parameters (temperature; with scope=lora the image tower and the LLM base; with scope=heads both "
    "towers): their values are the config's init or a pretrained base, which the private units never touch here; if "
    "a pretrained base saw these patients, epsilon does not cover that",
    "the tokenizer, when trained on the private train reports (the default WordPiece is fitted on them): a "
    "vocabulary is a release outside the mechanism; use a tokenizer from public text (model.tokenizer_spec.pretrained) "
    "for an end-to-end guarantee",
    "audits of the val/test splits (re-linkage, probe scores): those patients are not DP training units and are "
    "not protected by epsilon; only aggregate numbers are written",
    "repeated runs and hyper-parameter sweeps on the same units: each run spends its own epsilon",
)


def replace_batchnorm(module: nn.Module, where: str) -> nn.Module:
    """BatchNorm -> GroupNorm (Opacus' fix); refuse whatever still keeps running statistics."""
    fixed = ModuleValidator.fix(module)
    left = [n for n, m in fixed.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            or getattr(m, "track_running_stats", False)]
    if left:
        raise ValueError(f"{where}: layers {left[:5]} keep running statistics (a release outside DP-SGD); use a "
                         "tower with GroupNorm/LayerNorm")
    return fixed


class DPWholeModule(DualTowerModule):
    """A dual tower (the model config's towers and heads) trained with per-patient DP-SGD.

    Args (besides DualTowerModule's): ``dp`` (models/dp/plan.py DP_DEFAULTS), ``loss`` (LOSS_DEFAULTS; mode
    public_negatives), ``scope`` (whole | lora | heads), ``dp_optimizer`` (a partial optimizer for the DP update;
    the model config's own ``optimizer`` is kept in the hparams for the record of the architecture only).
    """

    def __init__(self, *, dp: dict | None = None, loss: dict | None = None, scope: str = "whole",
                 dp_optimizer: dict | None = None, public_loss_weight: float = 1.0, init_ckpt: str | None = None,
                 **tower_kwargs: Any) -> None:
        tower_kwargs.pop("scheduler", None)  # one constant-lr optimizer: a schedule has no per-step meaning here
        super().__init__(scheduler=None, **tower_kwargs)
        dp = settings("dp", plain(dp or {}))
        loss = settings("loss", plain(loss or {}))
        if scope not in SCOPES:
            raise ValueError(f"model.scope must be one of {SCOPES}, got {scope!r}")
        if loss["mode"] not in WHOLE_LOSS_MODES:
            raise ValueError(f"whole-model DP: model.loss.mode must be one of {WHOLE_LOSS_MODES} (a loss whose per-unit "
                             f"sensitivity is bounded by C on raw data), got {loss['mode']!r}")
        if dp["accountant"] not in ACCOUNTANTS:
            raise ValueError(f"dp.accountant must be one of {ACCOUNTANTS}, got {dp['accountant']!r}")
        if dp["secure_mode"]:
            raise ValueError("dp.secure_mode is not wired for whole-model DP (its noise is drawn here, not by Opacus)")
        dp_optimizer = plain(dp_optimizer) or {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
        if float(public_loss_weight) < 0:
            raise ValueError(f"model.public_loss_weight must be >= 0, got {public_loss_weight}")
        self.hparams.update(plain(dict(dp=dp, loss=loss, scope=scope, dp_optimizer=dp_optimizer,
                                       public_loss_weight=float(public_loss_weight), init_ckpt=init_ckpt)))
        self.hparams.scheduler = None
        self.automatic_optimization = False
        self.image_tower = replace_batchnorm(self.image_tower, "image tower")
        self.text_tower = replace_batchnorm(self.text_tower, "text tower")
        self.init_record = {"mode": "config init", "seed": "cfg.seed (public: the init depends on no data)"}
        if init_ckpt:
            self._load_init(init_ckpt)
        self.logit_scale.requires_grad_(False)  # frozen temperature (module docstring)
        self._select_scope(scope)
        self.plan: DPPlan | None = None
        self.__dict__["_accountant"] = None
        self._noise_gen: torch.Generator | None = None
        self._epsilon_spent = 0.0
        self._restored_dp: dict | None = None

    def _load_init(self, path: str) -> None:
        """Start from a dual tower trained on **public** data only (e.g. `python train.py data=synthcxr_external`):
        DP-SGD's analysis holds for any start that depends on no private unit. Its towers, heads and temperature
        are loaded; the datamodule takes its tokenizer too (data.tokenizer_ckpt), so token ids keep their meaning.
        Why: from a random init the public-negatives loss found the collapse (every embedding one point) first."""
        from cxr_relink.models.checkpoint import load_checkpoint_dict
        from cxr_relink.models.hashing import file_sha256

        sd = load_checkpoint_dict(path)["state_dict"]
        sd = {k: v for k, v in sd.items() if k.split(".")[0] in ("image_tower", "text_tower", "image_head", "text_head",
                                                                   "logit_scale")}
        own = self.state_dict()
        bad = sorted(k for k in own if k.split(".")[0] != "loss_fn" and (k not in sd or sd[k].shape != own[k].shape))
        if bad:
            raise ValueError(f"model.init_ckpt={path}: its dual tower does not match this model's config "
                             f"({len(bad)} tensors missing or of another shape, e.g. {bad[:3]})")
        self.load_state_dict(sd, strict=False)
        self.init_record = {"mode": "public checkpoint", "path": str(path), "sha256": file_sha256(path),
                            "requirement": "trained on data holding none of the DP units (e.g. the public cohort)"}

    # ---- which parameters DP trains -------------------------------------------------------------------------
    def _select_scope(self, scope: str) -> None:
        heads = list(self.image_head.parameters()) + list(self.text_head.parameters())
        if scope == "heads":
            self.image_tower.requires_grad_(False)
            self.text_tower.requires_grad_(False)
        elif scope == "lora":
            lora = [(n, p) for n, p in self.text_tower.named_parameters() if "lora_" in n]
            if not lora:
                raise ValueError("model.scope=lora needs a text tower with LoRA adapters (model=llm_encoder with "
                                 "model.text_tower.use_lora=true)")
            self.image_tower.requires_grad_(False)
            for n, p in self.text_tower.named_parameters():
                p.requires_grad_("lora_" in n)
        for p in heads:
            p.requires_grad_(True)
        self.__dict__["_dp_params"] = [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def dp_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self._dp_params)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen towers stay in eval (no dropout): they are a fixed map.
        if self.hparams.scope in ("heads", "lora"):
            self.image_tower.eval()
        if self.hparams.scope == "heads":
            self.text_tower.eval()
        return self

    # ---- privacy state ------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.hparams.loss["mode"]

    @property
    def dp_enabled(self) -> bool:
        return bool(self.hparams.dp["enabled"])

    @property
    def guarantee_valid(self) -> bool:
        return self.dp_enabled and not record.invalid_reasons(self.hparams.dp, self.mode, self.plan)

    def epsilon_spent(self) -> float:
        acc = self._accountant
        if not self.dp_enabled or acc is None or not acc.history:
            return 0.0 if self.dp_enabled else math.inf
        dp = self.hparams.dp
        return float(acc.get_epsilon(delta=self.plan.delta, **epsilon_kwargs(dp["accountant"], float(dp["target_epsilon"]))))

    def dp_state(self) -> dict[str, Any]:
        trained = [n for n, _ in self._dp_params]
        state = record.build(self.plan, self.hparams.dp, self.mode, epsilon_spent=self._epsilon_spent,
                             accountant=accountant_state(self._accountant) if self._accountant is not None else None,
                             head_init=self.init_record,
                             outside_guarantee=list(OUTSIDE) + (record.outside_guarantee_of_data(self.plan) if self.plan else []))
        state.update({"dp_scope": self.hparams.scope, "scope": SCOPE_TEXT,
                      "trained_parameters": {"count": int(sum(p.numel() for _, p in self._dp_params)),
                                             "tensors": len(trained), "names_head": trained[:8]},
                      "per_unit_gradient": "exact: one backward pass per drawn unit, clipped to C",
                      "public_loss": {"weight": self.hparams.public_loss_weight,
                                      "basis": "in-batch InfoNCE of the public bank's pairs, added to the noisy private "
                                               "gradient without clipping or noise: a function of the current (released) "
                                               "weights and public data only, so post-processing; it reads no private unit"}})
        return state

    # ---- optimisation -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        check_trainer(self.trainer, "unit")

    def _datamodule(self):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "poisson_loader"):
            raise ValueError("DPWholeModule needs datamodules.patient_units.PatientUnitDataModule (experiment=dp_whole)")
        return dm

    def configure_optimizers(self):
        if self._restored_dp is not None:
            raise ValueError("resuming a whole-model DP run is not supported (its accountant would restart): start a new run")
        dm = self._datamodule()
        dp = self.hparams.dp
        opt = instantiate(self.hparams.dp_optimizer)(params=[p for _, p in self._dp_params])
        facts = DataFacts(n_units=dm.n_train_units, batch_size=int(dm.batch_size), privacy_unit="patient")
        self.plan = plan = make_plan(dp, self.mode, facts, int(dp["epochs"] or self.trainer.max_epochs))
        sample_gen, self._noise_gen = self._generators()
        dm.set_train_loader(dm.poisson_loader(plan.sample_rate, sample_gen))
        if plan.enabled:
            self.__dict__["_accountant"] = create_accountant(mechanism=plan.accountant)
            log.info("whole-model DP-SGD (scope=%s): sigma=%.4f q=%.5f C=%g delta=%.3g target eps=%g over %d steps "
                     "(%s patient units); %d trained parameters; noise %s", self.hparams.scope, plan.noise_multiplier,
                     plan.sample_rate, plan.max_grad_norm, plan.delta, plan.target_epsilon, plan.steps_planned,
                     plan.n_text(), sum(p.numel() for _, p in self._dp_params), record.noise_source(dp))
        else:
            log.info("DP disabled: the same per-unit schedule and loss without clipping or noise (scope=%s)", self.hparams.scope)
        return opt

    def _generators(self) -> tuple[torch.Generator, torch.Generator]:
        seed = self.hparams.dp["INSECURE_replayable_seed"]
        if seed is None:
            seeds = (secrets.randbits(63), secrets.randbits(63))  # never derived from cfg.seed; kept nowhere
        else:
            log.warning("dp.INSECURE_replayable_seed=%s: noise and batches are REPLAYABLE; epsilon does NOT hold", seed)
            seeds = (int(seed), int(seed) + 1)
        return torch.Generator().manual_seed(seeds[0]), torch.Generator(device=self.device).manual_seed(seeds[1])

    def public_embeddings(self, bank: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The public bank through the current model, no gradient: fixed negatives of this step. In the same mode
        as the private units (dropout included): with the bank in eval mode and the units in training mode, a
        report's own (dropped-out) embedding sat farther from its image than the eval-mode negatives, and the
        cheapest way down for the loss was to collapse every embedding to one point (measured)."""
        with torch.no_grad():
            u = self.encode_images(bank["image"].to(self.device))
            v = self.encode_reports(bank["input_ids"].to(self.device), bank["attention_mask"].to(self.device))
        return u, v

    def unit_loss(self, unit: dict[str, torch.Tensor], bank: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One unit's loss: its image items against their own reports, negatives from the public bank only."""
        z = self.encode_images(unit["image"].to(self.device))
        w = self.encode_reports(unit["input_ids"].to(self.device), unit["attention_mask"].to(self.device))
        m = torch.ones(1, z.shape[0], device=z.device)
        return public_negatives_loss(z[None], w[None], m, bank[0], bank[1], self.logit_scale)[0]

    def clipped_sum(self, units: list[dict[str, torch.Tensor]], bank, clip: bool = True
                    ) -> tuple[list[torch.Tensor], list[float], torch.Tensor]:
        """Sum over units of each unit's gradient (clipped to C when ``clip``), before noise. Returns the sums,
        each unit's unclipped gradient norm, and the mean unit loss."""
        params = [p for _, p in self._dp_params]
        c = float(self.hparams.dp["max_grad_norm"])
        summed = [torch.zeros_like(p) for p in params]
        norms, total = [], torch.zeros((), device=self.device)
        for unit in units:
            lu = self.unit_loss(unit, bank)
            grads = torch.autograd.grad(lu, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
            norms.append(float(norm))
            if clip:
                factor = float(min(1.0, c / (float(norm) + 1e-12)))  # exact: ||factor * g|| <= C
                grads = [g * factor for g in grads]
            for s, g in zip(summed, grads):
                s.add_(g)
            total = total + lu.detach()
        return summed, norms, total / max(1, len(units))

    def _bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        dm = self._datamodule()
        gen = torch.Generator().manual_seed(int(self.hparams.loss["seed"]) * 1_000_003 + int(self.global_step))
        bank = dm.public_bank(int(self.hparams.loss["bank_size"]), gen)
        if bank is None:
            raise ValueError("loss.mode=public_negatives needs a public cohort (data.public_reader)")
        return self.public_embeddings(bank)

    def public_gradient(self) -> list[torch.Tensor] | None:
        """Gradient of ``public_loss_weight`` x the in-batch InfoNCE of a public bank draw (its own draw, public
        randomness), through the towers: what keeps the towers from collapsing. Negatives seen only through a
        stop-gradient bank let the private loss fall to chance by mapping everything to one point (measured: the
        loss went to log(K+1) and the embeddings tied); in-batch negatives with gradient push embeddings apart.
        It reads public data and the current weights only (no private unit): it needs no clipping or noise."""
        w = float(self.hparams.public_loss_weight)
        if w == 0:
            return None
        gen = torch.Generator().manual_seed(int(self.hparams.loss["seed"]) * 1_000_003 + int(self.global_step) + 7_919)
        bank = self._datamodule().public_bank(int(self.hparams.loss["bank_size"]), gen)
        u = self.encode_images(bank["image"].to(self.device))
        v = self.encode_reports(bank["input_ids"].to(self.device), bank["attention_mask"].to(self.device))
        ones = torch.ones(u.shape[0], 1, device=u.device)
        loss = w * in_batch_loss(u[:, None], v[:, None], ones, self.logit_scale).mean()
        params = [p for _, p in self._dp_params]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        units = list(batch or [])
        opt = self.optimizers()
        opt.zero_grad()
        bank = self._bank()
        summed, _, loss = self.clipped_sum(units, bank, clip=self.dp_enabled)
        params = [p for _, p in self._dp_params]
        public = self.public_gradient()
        if self.dp_enabled:
            std = self.plan.noise_multiplier * self.plan.max_grad_norm
            divisor = float(self.plan.expected_batch_size)  # public, never a count derived from N or the batch
            for p, s in zip(params, summed):
                p.grad = (s + torch.normal(0.0, std, size=s.shape, device=s.device, generator=self._noise_gen)) / divisor
        else:
            for p, s in zip(params, summed):
                p.grad = s / max(1, len(units))
        if public is not None:
            for p, g in zip(params, public):
                p.grad = p.grad + g
        opt.step()
        if self.dp_enabled:
            # One step of the sampled Gaussian mechanism, empty batch included (its release is noise alone).
            self._accountant.step(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate)
        else:
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=max(1, len(units)))
        # Under DP the private loss is not logged (a release outside the accountant); the public bank's is.
        u, v = bank
        ones = torch.ones(u.shape[0], 1, device=u.device)
        self.log("train/public_loss", in_batch_loss(u[:, None], v[:, None], ones, self.logit_scale).mean(),
                 on_step=True, on_epoch=True, batch_size=u.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # (no temperature clamp: logit_scale is frozen)
        last = self.trainer.is_last_batch or batch_idx + 1 >= self.trainer.num_training_batches
        if self.dp_enabled and last:
            self._epsilon_spent = self.epsilon_spent()
            name = "dp/epsilon" if self.guarantee_valid else "dp/epsilon_nominal_INVALID"
            metrics = {name: self._epsilon_spent, "dp/delta": self.plan.delta,
                       "dp/noise_multiplier": self.plan.noise_multiplier, "dp/sample_rate": self.plan.sample_rate}
            for k, v in metrics.items():
                self.log(k, float(v), on_step=True, on_epoch=False, logger=False, prog_bar=k == name)
            for lg in self.loggers:
                lg.log_metrics({k: float(v) for k, v in metrics.items()}, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.dp_enabled and self._accountant is not None:
            self._epsilon_spent = self.epsilon_spent()
        checkpoint["dp_state"] = plain(self.dp_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # A resume (fit) is refused in configure_optimizers; loading for an audit (load_module, trainer.test) is fine.
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit":
            self._restored_dp = checkpoint.get("dp_state")
