"""Stage 3: DP-SGD on the projection heads, trained on cached frozen-encoder features.

Trainable: copies of the dual tower's ``image_head`` and ``text_head`` (linear | mlp, no BatchNorm;
checked with Opacus' ModuleValidator). Frozen: both towers (kept inside the module so that
``encode_images``/``encode_reports`` and evaluate.py work on raw data) and ``logit_scale``.

Why ``logit_scale`` is frozen: it is a bare scalar parameter outside any layer Opacus has a
per-sample gradient rule for; training it privately would need a custom grad sampler and would
add a parameter whose per-example gradient is large and badly scaled relative to the heads'
(clipping would then spend most of C on the temperature). The temperature learned in stage 2 is
kept; it is a buffer, so the DP parameters are exactly the heads' weights.

What epsilon covers (the privacy statement, also saved in the checkpoint as ``dp_state``):
epsilon bounds what *this stage* reveals about each training unit, given the frozen checkpoint it
starts from. It is an end-to-end guarantee for the released heads only if that checkpoint (encoders
and initial heads) was trained without the DP stage's training units -- e.g. on a public or
another institution's cohort. If stage 2 was trained on the same studies, stage 2 itself leaks
them with no bound, and the member/non-member linkage test (audit/membership.py) will show it.

Opacus is wired by hand for Lightning 2.x (manual optimisation): ``configure_optimizers`` asks the
datamodule for a plain loader of expected batch size B, finds sigma for the target epsilon over the
planned steps (``models.dp.accounting.noise_multiplier_for``), wraps the heads and optimizer with
``PrivacyEngine.make_private`` and hands a Poisson loader (q = 1/len(loader)) back to the datamodule.
``group_clipping`` uses the same Poisson loader and an Opacus accountant stepped explicitly (noise
sigma * 2C, see models/dp/losses.py). The accountant's history is saved in every checkpoint and
restored on resume, so a resumed run continues the same budget with the same sigma and q.

Secret randomness. The adversary of DP knows the code, the config (``cfg.seed`` included) and every
other record. Noise and Poisson batches therefore come from generators seeded from the OS entropy
pool (``secrets``), never from ``cfg.seed``, and the seeds are kept nowhere: two runs of the same
command release different heads, and retraining without a target unit cannot reproduce the release
(with a seeded generator it did, bit for bit, deciding membership with certainty). The debugging
switch ``dp.INSECURE_replayable_seed`` brings that back and marks the run ``guarantee_valid = False``.
Other randomness (the public bank draw, group assignment) is public by design and stays seeded.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import secrets
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator

from cxr_relink.audit.embeddings import validation_outputs
from cxr_relink.models.checkpoint import (KEY, current_name, current_names, import_module_class, load_checkpoint_dict,
                                         load_module, plain, restore_external_weights, save_extras)
from cxr_relink.models.contract import LoadedState
from cxr_relink.models.dp import record
from cxr_relink.models.dp.accounting import ACCOUNTANTS, accountant_state, epsilon_kwargs, load_accountant_state
from cxr_relink.models.dp.plan import DataFacts, DPPlan, check_trainer, make_plan, settings
from cxr_relink.models.hashing import file_sha256
from cxr_relink.models.dp.losses import (
    LOSS_MODES,
    SENSITIVITY_FACTOR,
    group_assignment,
    group_loss,
    in_batch_loss,
    public_negatives_loss,
)
from cxr_relink.models.heads import ProjectionHead

log = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("hooks", "ghost")
HEAD_INITS = ("fresh", "stage2")


def reinit_head_(head: nn.Module, clip_projection: bool = False) -> str:
    """Re-initialise ``head`` in place with its architecture's own init, drawing from the global RNG (the
    caller seeds it). Returns the rule used (recorded in dp_state.head_init).

    * A single ``nn.Linear`` taken from an existing CLIP-family model (``clip_projection``): weight
      ~ N(0, 1/in_features), bias 0 -- the init Hugging Face CLIP and open_clip give their projections.
    * Anything else (the project's ProjectionHead, an existing model's MLP projection): every layer's own
      ``reset_parameters`` -- the init its constructor draws (tests check it against a fresh constructor).
    """
    if clip_projection and isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=head.in_features ** -0.5)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        return "CLIP projection init: weight ~ N(0, 1/in_features), bias 0"
    covered: set[int] = set()
    for mod in head.modules():
        if callable(getattr(mod, "reset_parameters", None)):
            mod.reset_parameters()
            covered.update(id(p) for p in mod.parameters(recurse=False))
    missed = [n for n, p in head.named_parameters() if id(p) not in covered]
    if missed:
        raise ValueError(f"dp.head_init=fresh: {type(head).__name__} parameters {missed} belong to no layer with "
                         "reset_parameters(); cannot re-initialise them (use dp.head_init=stage2)")
    return "each layer's own reset_parameters() (the init its constructor draws)"


def heads_sha256(*heads: nn.Module) -> str:
    """Fingerprint of head weights (names, shapes and float32 values): lets an audit check the initial heads."""
    h = hashlib.sha256()
    for head in heads:
        for name, t in sorted(head.state_dict().items()):
            h.update(f"\x00{name}\x01{tuple(t.shape)}\x01".encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Heads(nn.Module):
    """The DP parameters: both heads, one forward (what Opacus wraps)."""

    def __init__(self, image_head: nn.Module, text_head: nn.Module) -> None:
        super().__init__()
        self.image_head, self.text_head = image_head, text_head

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_head(img), self.text_head(txt)


class DPAlignmentModule(LoadedState, L.LightningModule):  # an embedding model (models/contract.py)
    """Heads-only finetune on cached features: DP-SGD (``dp.enabled``) or the same run without noise.

    Args:
        backbone_ckpt: stage-2 checkpoint (``models.checkpoint.load_module``); its towers are frozen.
        loss: ``mode`` (public_negatives | group_clipping | in_batch), ``bank_size`` (public pairs per
            step), ``group_size`` (expected units per group), ``seed`` (public randomness).
        dp: models/dp/plan.py DP_DEFAULTS (the one source of the defaults).
        optimizer: a partial optimizer config (``_target_``, ``_partial_: true``).
        backbone: filled automatically ({module_class, hparams, checkpoint_sha256}); lets a DP
            checkpoint rebuild its frozen towers without the stage-2 file.
        heads: standalone heads without a backbone ({image_dim, text_dim, embed_dim, kind}) for
            features computed elsewhere (tests, benchmarks).
        tokenizer_spec: ignored (the backbone's own tokenizer is used; the key is shared with the
            data config).
        external: an existing model instead of ``backbone_ckpt`` ({path, family, arch, ...}, the options
            of configs/model/hf_clip.yaml | open_clip.yaml; models/external_heads.py): its trunk is
            frozen and copies of its own projection layers are the heads.
        export_dir: with ``external``: where ``on_fit_end`` writes the model in its own format with the
            trained projections, plus dp_record.json (``export_model``).
    """

    def __init__(
        self,
        backbone_ckpt: str | None = None,
        loss: dict | None = None,
        dp: dict | None = None,
        optimizer: dict | None = None,
        backbone: dict | None = None,
        heads: dict | None = None,
        temperature_init: float = 0.07,
        tokenizer: Any = None,
        tokenizer_spec: dict | None = None,
        external: dict | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        loss = settings("loss", plain(loss or {}))
        dp = settings("dp", plain(dp or {}))
        # The experiment config's default (chosen by the DP optimizer sweep, docs/dp_results.md).
        optimizer = plain(optimizer) or {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2}
        if loss["mode"] not in LOSS_MODES:
            raise ValueError(f"loss.mode must be one of {LOSS_MODES}, got {loss['mode']!r}")
        if dp["accountant"] not in ACCOUNTANTS:
            raise ValueError(f"dp.accountant must be one of {ACCOUNTANTS}, got {dp['accountant']!r}")
        if dp["head_init"] not in HEAD_INITS:
            raise ValueError(f"model.dp.head_init must be one of {HEAD_INITS}, got {dp['head_init']!r}")
        if dp["grad_sample_mode"] not in GRAD_SAMPLE_MODES:
            raise ValueError(f"dp.grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {dp['grad_sample_mode']!r}")
        self.automatic_optimization = False

        self.backbone_module = None
        # An existing model (models/external_heads.py) instead of a stage-2 checkpoint: its trunk is
        # frozen and copies of its own projections are the heads; rebuilt the same way from a DP checkpoint.
        ext = None
        if (external or {}).get("path"):
            from cxr_relink.models.external_heads import ExternalSplit

            if backbone_ckpt:
                raise ValueError("give one frozen backbone: model.backbone_ckpt (a stage-2 checkpoint) or "
                                 "model.external.path (an existing model), not both")
            ext = ExternalSplit.load(external)
            if backbone is not None and backbone.get("checkpoint_sha256") not in (None, ext.fingerprint):
                raise ValueError(f"{ext.spec['path']}: the model's files differ from those this DP run was trained "
                                 "on (fingerprint mismatch)")
            backbone = ext.backbone_record()
            bb = None
        elif backbone is None and backbone_ckpt:
            ckpt = load_checkpoint_dict(backbone_ckpt)
            if KEY not in ckpt:
                raise ValueError(f"{backbone_ckpt} was not written by cxr-relink")
            backbone = {
                "module_class": current_name(ckpt[KEY]["module_class"]),
                "hparams": current_names(plain(ckpt["hyper_parameters"])),
                "checkpoint_sha256": file_sha256(backbone_ckpt),
            }
            bb = load_module(backbone_ckpt)
        elif backbone is not None:
            # Rebuilt from a DP checkpoint: architecture from config, weights from this state_dict.
            bb = import_module_class(backbone["module_class"], backbone["hparams"], "DP checkpoint backbone")(
                **backbone["hparams"], tokenizer=tokenizer
            )
        else:
            bb = None
        self.save_hyperparameters(
            plain(dict(backbone_ckpt=backbone_ckpt, loss=loss, dp=dp, optimizer=optimizer, backbone=backbone, heads=heads,
                       temperature_init=temperature_init, external=external, export_dir=export_dir))
        )
        self.__dict__["_external"] = ext
        self.outside_base = list(record.OUTSIDE_GUARANTEE)
        if ext is not None:
            self.backbone_module = ext.trunk
            self.tokenizer = ext.trunk.tokenizer
            self.data_preprocessing = ext.trunk.data_preprocessing
            self.image_head, self.text_head = ext.image_head, ext.text_head
            self.register_buffer("logit_scale", ext.logit_scale.clone())
            self.outside_base[0] = (f"the frozen encoders of the existing model {ext.spec['path']} (and, with dp.head_init="
                                    "stage2, its projections training starts from): trained by others on data this run does "
                                    "not control; epsilon is end to end only if they never saw these units")
        elif bb is not None:
            bb.requires_grad_(False).eval()
            self.backbone_module = bb
            self.tokenizer = bb.tokenizer
            self.image_head = copy.deepcopy(bb.image_head)
            self.text_head = copy.deepcopy(bb.text_head)
            self.register_buffer("logit_scale", bb.logit_scale.detach().clone().float())
        else:
            if not heads:
                raise ValueError("DPAlignmentModule needs backbone_ckpt (a stage-2 checkpoint) or a standalone `heads` spec")
            self.tokenizer = tokenizer
            h = dict(heads)
            image_dim, text_dim, embed_dim = h.pop("image_dim"), h.pop("text_dim"), h.pop("embed_dim")
            self.image_head = ProjectionHead(image_dim, embed_dim, **h)
            self.text_head = ProjectionHead(text_dim, embed_dim, **h)
            self.register_buffer("logit_scale", torch.tensor(math.log(1.0 / temperature_init)))
        self.head_init_record = self._init_heads(dp, from_model=ext is not None or bb is not None, clip_projection=ext is not None)
        # Copies of an eval-mode backbone's heads start in eval mode: Opacus captures activations
        # only in training mode, and Lightning 2.x keeps a module's mode at fit start.
        self.image_head.requires_grad_(True).train()
        self.text_head.requires_grad_(True).train()
        heads_mod = _Heads(self.image_head, self.text_head)
        ModuleValidator.validate(heads_mod, strict=True)  # raises on BatchNorm & co.
        # Not registered as submodules: the state_dict keys stay image_head.* / text_head.* whether
        # or not Opacus has wrapped the heads (resume loads into an unwrapped module).
        self.__dict__["_heads"] = heads_mod
        self.__dict__["_gsm"] = None
        self.__dict__["_accountant"] = None
        # Every DP quantity (sigma, q, steps, delta, unit, divisor): set once in configure_optimizers, read after.
        self.plan: DPPlan | None = None
        self.outside_guarantee: list[str] = list(self.outside_base)
        self._outside_data: list[str] = []  # set from the data in configure_optimizers
        self._restored_dp: dict | None = None
        self._noise_gen: torch.Generator | None = None
        self._epsilon_spent: float = 0.0

    def _init_heads(self, dp: dict, from_model: bool, clip_projection: bool) -> dict[str, Any]:
        """Apply dp.head_init and describe the heads training starts from (dp_state.head_init)."""
        if dp["head_init"] == "stage2":
            if not from_model:
                raise ValueError("model.dp.head_init=stage2 needs trained heads to start from (model.backbone_ckpt or "
                                 "model.external.path); standalone `heads` have none (use head_init=fresh)")
            rec = {"mode": "stage2", "source": "the trained heads of the frozen model (backbone_checkpoint_sha256): "
                                              "the release is a DP fine-tune of them"}
        else:
            seed = int(dp["head_init_seed"])
            # A forked RNG: the init is the same whatever ran before, and the global stream is left untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                rule = reinit_head_(self.image_head, clip_projection)
                reinit_head_(self.text_head, clip_projection)
            rec = {"mode": "fresh", "seed": seed, "rule": rule + "; image head first, then text head, from one "
                   "torch.manual_seed(seed) stream",
                   "secrecy": "not needed: the initial weights depend on no data (DP-SGD's analysis holds for any "
                              "data-independent start); the seed is public and recorded"}
        rec["initial_heads_sha256"] = heads_sha256(self.image_head, self.text_head)
        return rec

    # ---- frozen towers ----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_module is not None:
            self.backbone_module.eval()  # frozen: no dropout, ever
        return self

    # ---- the embedding contract -------------------------------------------------------------------
    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone_module.image_features(image)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone_module.text_features(input_ids, attention_mask)

    def encode_image_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(feats), dim=-1)

    def encode_report_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(feats), dim=-1)

    def encode_images(self, image: torch.Tensor) -> torch.Tensor:
        """Raw images [B, C, H, W] through the frozen tower, or cached features [B, Di] directly.

        The DP stage's feature batches carry the cached pre-projection features under "image", so
        the audit callbacks (which call ``encode_images(batch["image"])``) work unchanged.
        """
        if image.ndim == 2:
            return self.encode_image_features(image)
        if self.backbone_module is None:
            raise RuntimeError("standalone heads: no image tower; use encode_image_features")
        with torch.no_grad():
            feats = self.image_features(image)
        return self.encode_image_features(feats)

    def encode_reports(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.backbone_module is None:
            raise RuntimeError("standalone heads: no text tower; use encode_report_features")
        with torch.no_grad():
            feats = self.text_features(input_ids, attention_mask)
        return self.encode_report_features(feats)

    # ---- privacy state ----------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.hparams.loss["mode"]

    @property
    def dp_enabled(self) -> bool:
        return bool(self.hparams.dp["enabled"])

    @property
    def guarantee_valid(self) -> bool:
        return self.dp_enabled and not self.invalid_reasons()

    def invalid_reasons(self) -> list[str]:
        """Why the printed epsilon does not hold for the released heads (empty: it holds)."""
        return record.invalid_reasons(self.hparams.dp, self.mode, self.plan)

    # Read-only views of the plan (None before configure_optimizers).
    noise_multiplier = property(lambda self: self.plan.noise_multiplier if self.plan else None)
    sample_rate = property(lambda self: self.plan.sample_rate if self.plan else None)
    delta = property(lambda self: self.plan.delta if self.plan else None)
    n_train_units = property(lambda self: self.plan.n_units if self.plan else None)
    steps_planned = property(lambda self: self.plan.steps_planned if self.plan else None)
    expected_batch_size = property(lambda self: self.plan.expected_batch_size if self.plan else None)

    @property
    def grad_sample_mode(self) -> str:
        """Ghost clipping rescales per-example *losses*, which equals per-sample gradient clipping
        only when each loss reads one example (public_negatives); in_batch reproduces arXiv 2606.02276 with
        Opacus' per-sample gradient hooks."""
        return "hooks" if self.mode == "in_batch" else self.hparams.dp["grad_sample_mode"]

    @property
    def accountant(self):
        return self._accountant

    def epsilon_spent(self) -> float:
        if not self.dp_enabled or self._accountant is None or not self._accountant.history:
            return 0.0 if self.dp_enabled else math.inf
        dp = self.hparams.dp
        return float(self._accountant.get_epsilon(delta=self.delta, **epsilon_kwargs(dp["accountant"], float(dp["target_epsilon"]))))

    def dp_state(self) -> dict[str, Any]:
        """Everything a privacy team needs to check the claim (saved in every checkpoint): models/dp/record.py."""
        return record.build(self.plan, self.hparams.dp, self.mode, epsilon_spent=self._epsilon_spent,
                            accountant=accountant_state(self._accountant) if self._accountant is not None else None,
                            head_init=self.head_init_record, outside_guarantee=self.outside_guarantee,
                            backbone=self.hparams.backbone, external=self._external is not None)

    # ---- optimisation -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or not self.dp_enabled:
            return
        check_trainer(self.trainer, "example")

    def _datamodule(self):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "set_train_loader"):
            raise ValueError("DPAlignmentModule trains on cached features: use datamodules.features.FeatureDataModule (experiment=dp_alignment)")
        return dm

    def configure_optimizers(self):
        dm = self._datamodule()
        opt = instantiate(self.hparams.optimizer)(params=[p for p in self._heads.parameters() if p.requires_grad])
        if self.mode == "public_negatives" and dm.public_bank() is None:
            raise ValueError("loss.mode=public_negatives needs a public cohort (data.public_reader)")
        dp = self.hparams.dp
        prev = self._restored_dp
        if self.dp_enabled and prev is not None and (not prev.get("enabled") or prev.get("loss_mode") != self.mode):
            raise ValueError(
                f"resuming a run saved with dp.enabled={prev.get('enabled')}, loss.mode={prev.get('loss_mode')!r} as "
                f"dp.enabled=True, loss.mode={self.mode!r}: earlier epochs are not covered by this accounting (start a new run)"
            )
        restored = prev if self.dp_enabled and (prev or {}).get("accountant") else None
        self.plan = plan = make_plan(dp, self.mode, DataFacts.of(dm), int(dp["epochs"] or self.trainer.max_epochs), restored)
        self._outside_data = record.outside_guarantee_of_data(plan)
        loader = dm.plain_train_loader()
        if not plan.enabled:
            dm.set_train_loader(loader)
            log.info("DP disabled: non-private head finetune (same loss %r, same data)", self.mode)
            return opt
        if plan.delta_ge_1_over_n:  # make_plan refused it unless allowed
            log.warning("dp.target_delta=%.3g is not below 1/N; allowed by dp.allow_delta_ge_1_over_n, run marked "
                        "guarantee_valid=0", plan.delta)
        sample_gen, self._noise_gen = self._generators()
        engine = None
        if self.mode in ("public_negatives", "in_batch"):
            engine = PrivacyEngine(accountant=plan.accountant, secure_mode=bool(dp["secure_mode"]))
            if dp["secure_mode"]:
                sample_gen = engine.secure_rng
        elif dp["secure_mode"]:
            raise ValueError("dp.secure_mode is wired for Opacus' optimizer noise (public_negatives, in_batch) only")
        # Poisson sampling at the planned rate, from our generator (not Opacus' default, the global RNG).
        dp_loader = DPDataLoader(loader.dataset, sample_rate=plan.sample_rate, collate_fn=loader.collate_fn,
                                 generator=sample_gen)
        if len(dp_loader) != plan.steps_per_epoch:
            raise RuntimeError(f"Poisson loader of {len(dp_loader)} steps per epoch != planned {plan.steps_per_epoch}")
        if engine is not None:
            if restored:
                load_accountant_state(engine.accountant, restored["accountant"])
            # The Poisson loader goes in (poisson_sampling=False: not replaced), so Opacus' accountant hook
            # takes q = 1/len(dp_loader), the planned rate.
            out = engine.make_private(
                module=self._heads, optimizer=opt, data_loader=dp_loader, noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm, poisson_sampling=False, grad_sample_mode=self.grad_sample_mode,
                noise_generator=None if dp["secure_mode"] else self._noise_gen,
            )
            # ghost mode also returns a criterion wrapper; our per-unit losses are wrapped directly.
            self.__dict__["_gsm"] = out[0]
            self.__dict__["_accountant"] = engine.accountant
            out_opt = out[1]
            # Opacus divides the noisy sum by int(len(dataset) * q) = int(N / ceil(N/B)): a function of the
            # private N (up to ~N/B^2 units off B), so neighbouring datasets N, N-1 would give differently
            # scaled updates from the same clipped sum and noise. The plan's divisor is the configured B.
            out_opt.expected_batch_size = plan.expected_batch_size
        else:  # group_clipping: explicit accountant and noise (the sum is divided by the public group count)
            acc = create_accountant(mechanism=plan.accountant)
            if restored:
                load_accountant_state(acc, restored["accountant"])
            self.__dict__["_accountant"] = acc
            out_opt = opt
        if restored:  # the saved budget carries over only to the same mechanism
            now = record.build(plan, dp, self.mode, epsilon_spent=None, accountant=None, head_init={}, outside_guarantee=[])
            for key in ("sample_rate", "n_train_units", "n_train_units_upper", "delta"):
                if restored.get(key) is not None and now[key] is not None and \
                        not math.isclose(float(restored[key]), float(now[key]), rel_tol=1e-12):
                    raise ValueError(
                        f"resumed DP run: {key} was {restored[key]} and is now {now[key]}; the saved budget "
                        "does not carry over to different data, batch size or delta (start a new run)"
                    )
        dm.set_train_loader(dp_loader)
        self._epsilon_spent = self.epsilon_spent()
        if self.mode == "in_batch":
            log.warning("DP with %s. The epsilon Opacus reports for it does not hold.", record.INVALID_LABEL)
        log.info(
            "DP-SGD: mode=%s sigma=%.4f q=%.5f C=%g delta=%.3g target eps=%g over %d epochs = %d steps (%s %s units); "
            "heads %s; noise %s",
            self.mode, plan.noise_multiplier, plan.sample_rate, plan.max_grad_norm, plan.delta, plan.target_epsilon,
            plan.epochs, plan.steps_planned, plan.n_text(), plan.privacy_unit, self.head_init_record["mode"],
            record.noise_source(dp),
        )
        return out_opt

    def _generators(self) -> tuple[torch.Generator, torch.Generator]:
        """(Poisson sampling generator on the CPU, noise generator on the heads' device)."""
        seed = self.hparams.dp["INSECURE_replayable_seed"]
        if seed is None:
            seeds = (secrets.randbits(63), secrets.randbits(63))  # never derived from cfg.seed; kept nowhere
        else:
            log.warning("dp.INSECURE_replayable_seed=%s: DP noise and batches are REPLAYABLE from the config; "
                        "the epsilon of this run does NOT hold (dp/guarantee_valid=0). Debugging only.", seed)
            seeds = (int(seed), int(seed) + 1)
        return torch.Generator().manual_seed(seeds[0]), torch.Generator(device=self.device).manual_seed(seeds[1])

    def _bank(self, batch_device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A public bank drawn (public randomness) and embedded with the current heads, no gradient."""
        dm = self._datamodule()
        bank = dm.public_bank()
        if bank is None:
            return None
        u, v = bank
        k = int(self.hparams.loss["bank_size"])
        if k and k < u.shape[0]:
            idx = torch.randperm(u.shape[0])[:k]
            u, v = u[idx], v[idx]
        with torch.no_grad():  # Opacus captures no activations without grad: grad_sample stays per-example
            return self.encode_image_features(u.to(batch_device)), self.encode_report_features(v.to(batch_device))

    def unit_losses(self, z: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, bank) -> torch.Tensor:
        if self.mode == "public_negatives":
            return public_negatives_loss(z, w, mask, bank[0], bank[1], self.logit_scale)
        return in_batch_loss(z, w, mask, self.logit_scale)

    def _forward(self, img: torch.Tensor, txt: torch.Tensor, private: bool) -> tuple[torch.Tensor, torch.Tensor]:
        net = self._gsm if (private and self._gsm is not None) else self._heads
        if img.ndim == 3 and img.shape[1] == 1:  # study units: 2-D inputs keep Opacus' per-sample norms cheap
            zi, zt = net(img[:, 0], txt[:, 0])
            zi, zt = zi.unsqueeze(1), zt.unsqueeze(1)
        else:
            zi, zt = net(img, txt)
        return F.normalize(zi, dim=-1), F.normalize(zt, dim=-1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        img, txt, mask, unit_id = batch
        opt = self.optimizers()
        opt.zero_grad()
        n = img.shape[0]
        bank = None
        if self.mode == "group_clipping":
            loss = self._group_step(img, txt, mask, unit_id, opt)
        else:
            bank = self._bank(img.device) if self.mode == "public_negatives" else None
            # An empty Poisson batch skips the backward that would consume the ghost hooks' activations and
            # forward counters: a forward with gradients leaves them behind (the hooks sit on the heads' layers
            # whichever wrapper calls them), and the next step's forward fails ("Parameter tying is not
            # supported"). Its forward reads no data and needs no gradient.
            ghost_empty = n == 0 and self.dp_enabled and self.grad_sample_mode == "ghost"
            with torch.set_grad_enabled(not ghost_empty):
                z, w = self._forward(img, txt, private=True)
            per_unit = self.unit_losses(z, w, mask, bank)
            loss = per_unit.sum() / max(1, n)  # mean; Opacus 'mean' reduction rescales by the batch length
            if self.dp_enabled and self.grad_sample_mode == "ghost":
                if n > 0:
                    # Two backward passes: per-unit norms (ghost), then sum_i clip_i * loss_i.
                    DPTensorFastGradientClipping(self._gsm, opt.optimizer, per_unit, "mean").backward()
                else:  # empty Poisson batch: the release is noise alone, and it still counts
                    for p in self._heads.parameters():
                        p.grad = torch.zeros_like(p)
            else:
                self.manual_backward(loss)
            opt.step()
        self._log_train_loss(loss, n, bank, img.device)
        return loss.detach()

    def _log_train_loss(self, loss: torch.Tensor, n: int, bank, device: torch.device) -> None:
        """Under DP, the private batch's loss (and the Poisson batch size weighting its epoch mean) would be a
        release outside the accountant: only a loss on public data is logged, ``train/public_loss`` -- the
        in-batch InfoNCE of the public bank under the current heads (an iterate DP-SGD already releases,
        applied to public pairs: post-processing). Without DP the private loss is logged as ``train/loss``."""
        if not self.dp_enabled:
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=max(1, n))
            return
        if bank is None:
            bank = self._bank(device)
        if bank is None:
            return
        u, v = bank
        ones = torch.ones(u.shape[0], 1, device=u.device, dtype=u.dtype)
        public = in_batch_loss(u[:, None], v[:, None], ones, self.logit_scale).mean()
        self.log("train/public_loss", public, on_step=True, on_epoch=True, prog_bar=True, batch_size=u.shape[0])

    def n_groups(self, batch_units: int) -> int:
        """Number of groups: configured batch size / group_size under DP (a public constant: a count
        derived from N or from the sampled batch would regroup every unit when one comes or goes)."""
        expected = self.expected_batch_size if self.dp_enabled else batch_units
        return max(1, round(max(1, expected or 1) / int(self.hparams.loss["group_size"])))

    def group_clipped_sum(self, img, txt, mask, unit_id, n_groups: int, step: int, clip: bool = True):
        """Sum over groups of each group's gradient (clipped to C when ``clip``), before noise.

        Returns (per-parameter sums, mean group loss). Groups come from ``group_assignment`` (a hash
        of seed, step and unit id), so one unit more or less changes one group only: sensitivity 2C.
        """
        params = [p for p in self._heads.parameters() if p.requires_grad]
        groups = group_assignment(unit_id, n_groups, step=step, seed=int(self.hparams.loss["seed"]))
        c = float(self.hparams.dp["max_grad_norm"])
        summed = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), device=img.device)
        for k in range(n_groups):
            sel = groups == k
            if int(sel.sum()) == 0:
                continue
            z, w = self._forward(img[sel], txt[sel], private=False)
            lk = group_loss(z, w, mask[sel], self.logit_scale)
            grads = torch.autograd.grad(lk, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            if clip:
                norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
                factor = (c / (norm + 1e-6)).clamp(max=1.0)
                grads = [g * factor for g in grads]
            for s, g in zip(summed, grads):
                s.add_(g)
            total = total + lk.detach()
        return summed, total / n_groups

    def _group_step(self, img, txt, mask, unit_id, opt) -> torch.Tensor:
        """Group clipping: per-group gradients clipped to C; noise std sigma * 2C (see losses.py)."""
        params = [p for p in self._heads.parameters() if p.requires_grad]
        n_groups = self.n_groups(img.shape[0])
        summed, loss = self.group_clipped_sum(img, txt, mask, unit_id, n_groups, int(self.global_step), clip=self.dp_enabled)
        c = float(self.hparams.dp["max_grad_norm"])
        for p, s in zip(params, summed):
            if self.dp_enabled:
                std = self.noise_multiplier * SENSITIVITY_FACTOR["group_clipping"] * c
                s = s + torch.normal(0.0, std, size=s.shape, device=s.device, generator=self._noise_gen)
            p.grad = s / n_groups
        opt.step()
        if self.dp_enabled:
            self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return loss

    def on_fit_start(self) -> None:
        """Record the run's other uses of private data next to epsilon (dp_state.outside_guarantee)."""
        extra = []
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "monitor", None):
            extra.append(f"the released checkpoint is chosen by {ckpt.monitor!r} on the val split (a selection on private data)")
        for cb in self.trainer.callbacks:
            if (getattr(cb, "settings", None) or {}).get("train_split") == "train":
                extra.append(f"{type(cb).__name__} is fitted on the DP training units (train split): a non-private release about them")
        self.outside_guarantee = list(self.outside_base) + self._outside_data + extra
        if self._restored_dp is None:  # the weights training starts from now (a caller may have set them after __init__)
            self.head_init_record["initial_heads_sha256"] = heads_sha256(self.image_head, self.text_head)

    def on_train_start(self) -> None:
        if self.dp_enabled and not isinstance(self.trainer.train_dataloader, DPDataLoader):
            raise RuntimeError("DP training must draw batches by Poisson sampling (DPDataLoader); the accountant assumes it")

    def on_train_epoch_start(self) -> None:
        self.train()  # heads in training mode (Opacus hooks), backbone stays in eval (see train())

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Epsilon is logged after the epoch's last step, not in on_train_epoch_end: Lightning runs the
        # progress bar's epoch-end hook (and validation) before the module's, so a value logged
        # there would show one epoch stale.
        last = self.trainer.is_last_batch or batch_idx + 1 >= self.trainer.num_training_batches
        if not (self.dp_enabled and last):
            return
        # Step-level values (logged once an epoch, at its last step): epoch-level ones would only
        # be reduced, and shown, after validation.
        self._epsilon_spent = self.epsilon_spent()
        name = "dp/epsilon" if self.guarantee_valid else "dp/epsilon_nominal_INVALID"
        metrics = {name: self._epsilon_spent, "dp/delta": self.delta, "dp/noise_multiplier": self.noise_multiplier,
                   "dp/sample_rate": self.sample_rate, "dp/guarantee_valid": self.guarantee_valid}
        # self.log serves the progress bar and callback_metrics; the loggers are written directly, because
        # Lightning writes step-level values only every trainer.log_every_n_steps steps, and a DP epoch often
        # has fewer steps than that (then no epoch's epsilon reached the CSV / W&B).
        for key, value in metrics.items():
            self.log(key, float(value), on_step=True, on_epoch=False, prog_bar=key == name, logger=False)
        for lg in self.loggers:
            lg.log_metrics({k: float(v) for k, v in metrics.items()}, step=self.global_step)

    def on_train_epoch_end(self) -> None:
        if not self.dp_enabled:
            return
        if self._epsilon_spent > float(self.hparams.dp["target_epsilon"]) + float(self.hparams.dp["epsilon_tolerance"]):
            log.warning("epsilon spent %.4f exceeds the target %.4g (more steps than planned: max_epochs raised on resume?)",
                        self._epsilon_spent, self.hparams.dp["target_epsilon"])
        if not self.guarantee_valid:
            log.warning("epoch %d: %s (nominal eps %.3f)", self.current_epoch, record.INVALID_LABEL, self._epsilon_spent)
        else:
            log.info("epoch %d: eps spent %.4f (delta %.3g, %s)", self.current_epoch, self._epsilon_spent, self.delta, self.hparams.dp["accountant"])

    # ---- validation: the embedding contract ------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        img = self.encode_images(batch["image"])  # cached features or raw images (evaluate.py)
        if "text_feat" in batch:
            txt = self.encode_report_features(batch["text_feat"])
        else:
            txt = self.encode_reports(batch["input_ids"], batch["attention_mask"])
        bs = img.shape[0]
        per_pair = public_negatives_loss(img[:, None], txt[:, None], torch.ones(bs, 1, device=img.device), *self._val_bank(img.device), self.logit_scale) \
            if self._has_bank() else in_batch_loss(img[:, None], txt[:, None], torch.ones(bs, 1, device=img.device), self.logit_scale)
        self.log(f"{prefix}/loss", per_pair.mean(), on_epoch=True, prog_bar=True, batch_size=bs)
        return validation_outputs(img, txt, batch)

    def _has_bank(self) -> bool:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return dm is not None and hasattr(dm, "public_bank") and dm.public_bank() is not None

    def _val_bank(self, device):
        u, v = self._datamodule().public_bank()
        k = int(self.hparams.loss["bank_size"]) or u.shape[0]
        return self.encode_image_features(u[:k].to(device)), self.encode_report_features(v[:k].to(device))

    # ---- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._external is not None:
            # The frozen model is rebuilt from its folder (fingerprint checked): not copied into every checkpoint.
            sd = checkpoint.get("state_dict") or {}
            for k in [k for k in sd if k.startswith("backbone_module.")]:
                del sd[k]
        elif self.tokenizer is not None:
            # A stage-2 backbone with an LLM tower: its frozen base weights are rebuilt from the base
            # folder (fingerprint checked), not copied into every DP checkpoint (GBs for a real LLM).
            save_extras(self, checkpoint, strip_external=True)
        if self.dp_enabled and self._accountant is not None:
            self._epsilon_spent = self.epsilon_spent()
        checkpoint["dp_state"] = plain(self.dp_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_dp = checkpoint.get("dp_state")
        if (self._restored_dp or {}).get("head_init"):
            saved = self._restored_dp["head_init"]
            # A resume with another head init would continue the saved heads while its config says otherwise.
            for key in ("mode", "seed"):
                if saved.get(key) != self.head_init_record.get(key):
                    raise ValueError(f"resumed DP run: model.dp.head_init{'_seed' if key == 'seed' else ''} was "
                                     f"{saved.get(key)!r} and is now {self.head_init_record.get(key)!r}; the saved heads "
                                     "and their record started from the former (start a new run to change it)")
            self.head_init_record = dict(saved)  # what the saved run started from (its initial_heads_sha256)
        if self._external is not None and "state_dict" in checkpoint:
            saved = (checkpoint.get("hyper_parameters") or {}).get("backbone") or {}
            if saved.get("checkpoint_sha256") not in (None, self._external.fingerprint):
                raise ValueError("this DP checkpoint was trained on a model whose files differ from model.external.path")
            checkpoint["state_dict"].update({f"backbone_module.{k}": v for k, v in self.backbone_module.state_dict().items()})
        restore_external_weights(self, checkpoint)  # what save_extras(strip_external=True) left out (resume)

    # ---- the release in the existing model's own format ---------------------------------------------
    def on_fit_end(self) -> None:
        if self._external is not None and self.hparams.get("export_dir") and self.trainer.is_global_zero:
            out = self.export_model(self.hparams.export_dir)
            log.info("trained projections written in the model's own format (with %s): %s", "dp_record.json", out)

    def dp_record(self) -> dict[str, Any]:
        """The DP record saved beside an exported model: dp_state plus what was trained and what was not."""
        if self.dp_enabled and self._accountant is not None:
            self._epsilon_spent = self.epsilon_spent()
        ext = self._external
        return {
            "format": "cxr-relink dp_record v1",
            "source_model": ext.spec if ext is not None else None,
            "source_fingerprint": ext.fingerprint if ext is not None else None,
            "trained_tensors": ext.trunk.trained_tensor_names() if ext is not None else None,
            "frozen": "every other tensor of the source model, written back unchanged",
            "covers": "epsilon bounds what the trained projection weights reveal about each DP training unit of the "
                      "private cohort's train split, given the frozen encoders",
            **plain(self.dp_state()),
        }

    def export_model(self, out) -> Any:
        """Write the existing model with the trained projections in its own format + dp_record.json."""
        from cxr_relink.models.external_heads import export_model

        if self._external is None:
            raise ValueError("export_model is for DP runs on an existing model (model.external.path)")
        return export_model(self._external.spec, self.image_head, self.text_head, out, self.dp_record())
