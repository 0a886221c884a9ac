"""Stage 1: domain adaptation of the bidirectional LLM text tower (`experiment=text_adapt`).

loss = mntp_weight * MNTP + supcon_weight * supervised contrastive
- MNTP (masked next-token prediction, LLM2Vec): ~mask_prob of the tokens are masked; token i is
  predicted from the bidirectional model's output at position i-1 (the decoder's LM head was trained
  to predict the next token, so this keeps the head's alignment); only masked positions count.
- Supervised contrastive over clinically equivalent report variants: the variants of a study are
  positives, every other study's variants in the (all-gathered) batch negatives, one-error variants of
  the same report hard negatives (datamodules/report_variants.py builds the batches).
LoRA or full finetune is the text tower's `use_lora`. At the end of training the tower is written in
Hugging Face format (base weights + adapter + tokenizer + llm_encoder.json) to `hf_output_dir`, which
stage 2 loads by path: `model=llm_encoder model.text_tower.pretrained=<hf_output_dir>`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from cxr_relink.models.checkpoint import plain, restore_external_weights, save_extras
from cxr_relink.models.losses import IGNORE_INDEX, SupConLoss, mask_tokens, mntp_labels, mntp_loss
from cxr_relink.models.optim import configure_optimizers

log = logging.getLogger(__name__)


def error_discrimination(s_pos: torch.Tensor, s_err: torch.Tensor, own: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one definition of ``error_disc`` (validation metric here, experiments/text_eval.py):
    (wins, pairs) over (anchor, one-error variant) pairs, a win when the anchor scores its clinically
    equivalent text(s) ``s_pos`` [A] strictly above the error variant ``s_err`` [A, E]; ``own`` [A, E]
    keeps the pairs of the anchor's own study (all pairs when None)."""
    wins = s_pos[:, None] > s_err
    if own is None:
        return wins.sum(), torch.tensor(s_err.numel())
    return (wins & own).sum(), own.sum()


class TextAdaptModule(L.LightningModule):
    def __init__(
        self,
        text_tower: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        mntp_weight: float = 1.0,
        supcon_weight: float = 1.0,
        mask_prob: float = 0.2,
        mask_token: str | None = None,
        temperature: float = 0.05,
        hf_output_dir: str | None = None,
        grad_checkpointing: bool = False,
        tokenizer: Any = None,
        tokenizer_spec: dict | None = None,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError("TextAdaptModule needs the tokenizer (train.py passes dm.tokenizer)")
        self.save_hyperparameters(
            plain(
                dict(
                    text_tower=text_tower, optimizer=optimizer, scheduler=scheduler, mntp_weight=mntp_weight,
                    supcon_weight=supcon_weight, mask_prob=mask_prob, mask_token=mask_token, temperature=temperature,
                    hf_output_dir=hf_output_dir, grad_checkpointing=grad_checkpointing, tokenizer_spec=tokenizer_spec,
                )
            )
        )
        self.tokenizer = tokenizer
        self.mask_token_id = self._ensure_mask_token(tokenizer, mask_token)
        self.text_tower = instantiate(self.hparams.text_tower, tokenizer=tokenizer, with_lm_head=True)
        if grad_checkpointing:
            self.text_tower.set_grad_checkpointing(True)
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        self.supcon = SupConLoss(temperature=temperature)

    @staticmethod
    def _ensure_mask_token(tokenizer, mask_token: str | None) -> int:
        """The mask token's id; added to the tokenizer when absent (decoder LLM tokenizers have none).
        The tower resizes its embeddings to the grown vocabulary."""
        if mask_token is None:
            mask_token = tokenizer.mask_token or "<mask>"
        if tokenizer.convert_tokens_to_ids(mask_token) in (None, tokenizer.unk_token_id):
            tokenizer.add_special_tokens({"mask_token": mask_token})
        elif tokenizer.mask_token != mask_token:
            tokenizer.mask_token = mask_token
        return int(tokenizer.convert_tokens_to_ids(mask_token))

    def setup(self, stage: str) -> None:
        self.supcon = SupConLoss(temperature=self.hparams.temperature, rank=self.global_rank, world_size=self.trainer.world_size)

    # ---- losses ----------------------------------------------------------------------------------
    def mntp(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        masked, selected = mask_tokens(
            input_ids, attention_mask, self.mask_token_id, mask_prob=self.hparams.mask_prob,
            special_ids=self.special_ids, vocab_size=len(self.tokenizer), generator=generator,
        )
        labels = mntp_labels(input_ids, selected)
        hidden = self.text_tower.hidden_states(masked, attention_mask)
        # The LM head runs only where a label is set ([M, V] instead of [B, L, V]).
        keep = labels != IGNORE_INDEX
        return mntp_loss(self.text_tower.lm_logits(hidden[keep]), labels[keep])

    def _losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        hp = self.hparams
        out: dict[str, torch.Tensor] = {}
        total = 0.0
        if hp.mntp_weight:
            out["mntp_loss"] = self.mntp(batch["input_ids"], batch["attention_mask"], generator)
            total = total + hp.mntp_weight * out["mntp_loss"]
        emb = self.text_tower(batch["input_ids"], batch["attention_mask"])
        hard = None
        if batch["hard_input_ids"].shape[0]:
            hard = self.text_tower(batch["hard_input_ids"], batch["hard_attention_mask"])
        if hp.supcon_weight:
            out["supcon_loss"] = self.supcon(emb, batch["group_ids"], hard)["supcon_loss"]
            total = total + hp.supcon_weight * out["supcon_loss"]
        out["loss"] = total
        out.update(self._retrieval_metrics(emb.detach(), batch["group_ids"], hard, batch["hard_group_ids"]))
        return out

    @staticmethod
    @torch.no_grad()
    def _retrieval_metrics(emb, groups, hard, hard_groups) -> dict[str, torch.Tensor]:
        """variant_acc: top-1 other text in the batch is a variant of the same study (chance ~ V-1 / N).
        error_disc: a variant scores above its study's one-error variant (pairs: every variant x every error)."""
        z = F.normalize(emb.float(), dim=-1)
        sim = z @ z.T
        sim.fill_diagonal_(float("-inf"))
        out = {"variant_acc": (groups[sim.argmax(1)] == groups).float().mean()}
        if hard is not None and hard.shape[0]:
            h = F.normalize(hard.float(), dim=-1)
            same = groups[:, None] == groups[None, :]
            same.fill_diagonal_(False)
            pos = torch.where(same, z @ z.T, torch.full_like(sim, float("nan")))
            # mean similarity of each anchor to its positives vs to its own study's error variants
            own = groups[:, None] == hard_groups[None, :]
            wins, pairs = error_discrimination(torch.nanmean(pos, dim=1), z @ h.T, own)
            if pairs:
                out["error_disc"] = wins.float() / pairs
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._losses(batch)
        bs = batch["study_idx"].shape[0]
        for k, v in out.items():
            self.log(f"train/{k}", v, on_step=True, on_epoch=True, prog_bar=k == "loss", batch_size=bs)
        return out["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Fixed masks in validation, so epochs are comparable.
        g = torch.Generator(device=batch["input_ids"].device).manual_seed(1234 + batch_idx)
        out = self._losses(batch, generator=g)
        bs = batch["study_idx"].shape[0]
        for k, v in out.items():
            self.log(f"val/{k}", v, on_step=False, on_epoch=True, prog_bar=k == "loss", batch_size=bs, sync_dist=True)

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optimizer, self.hparams.scheduler)

    # ---- output ------------------------------------------------------------------------------------
    def export_hf(self, path: str | Path) -> Path:
        """Write the adapted tower in Hugging Face format (base + adapter + tokenizer + settings)."""
        path = self.text_tower.save_pretrained(path, tokenizer=self.tokenizer)
        log.info("stage-1 text tower written to %s (stage 2: model.text_tower.pretrained=%s)", path, path)
        return path

    def on_train_end(self) -> None:
        if self.hparams.hf_output_dir and self.trainer.is_global_zero:
            self.export_hf(self.hparams.hf_output_dir)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_extras(self, checkpoint, strip_external=True)  # frozen base-LLM weights left out (models/checkpoint.py)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_external_weights(self, checkpoint)  # resuming: base weights from the (checked) base folder
