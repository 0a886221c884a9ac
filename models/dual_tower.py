"""Stage 2: the CLIP-style dual tower (image tower + text tower + projection heads).

Towers are built from config dicts (not objects) so that the checkpoint's hyper-parameters alone
rebuild the model; the tokenizer travels inside the checkpoint too (see models/checkpoint.py).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from cxr_relink.audit.embeddings import validation_outputs
from cxr_relink.models.checkpoint import plain, restore_external_weights, save_extras
from cxr_relink.models.contract import LoadedState
from cxr_relink.models.heads import ProjectionHead
from cxr_relink.models.optim import configure_optimizers
from cxr_relink.models.losses import ClipLoss, in_batch_accuracy


class DualTowerModule(LoadedState, L.LightningModule):
    """Image tower + text tower, each followed by a projection head, trained with symmetric InfoNCE.

    temperature_init 0.07 as in CLIP; the learnable logit scale is clamped to <= ln(1/min_temperature)
    (CLIP uses 100) so it cannot diverge on small, easy batches. An embedding model (models/contract.py).
    """

    def __init__(
        self,
        image_tower: dict,
        text_tower: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        embed_dim: int = 128,
        head: dict | None = None,
        temperature_init: float = 0.07,
        min_temperature: float = 0.01,
        freeze_image_tower: bool = False,
        freeze_text_tower: bool = False,
        grad_checkpointing: bool = False,
        local_loss: bool = False,
        tokenizer_spec: dict | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError("DualTowerModule needs the tokenizer of its text tower (train.py passes dm.tokenizer)")
        self.save_hyperparameters(
            plain(
                dict(
                    image_tower=image_tower, text_tower=text_tower, optimizer=optimizer, scheduler=scheduler,
                    embed_dim=embed_dim, head=head, temperature_init=temperature_init, min_temperature=min_temperature,
                    freeze_image_tower=freeze_image_tower, freeze_text_tower=freeze_text_tower, grad_checkpointing=grad_checkpointing, local_loss=local_loss,
                    tokenizer_spec=tokenizer_spec,
                )
            )
        )
        self.tokenizer = tokenizer
        self.image_tower = instantiate(self.hparams.image_tower)
        self.text_tower = instantiate(self.hparams.text_tower, tokenizer=tokenizer)
        head = dict(self.hparams.head or {})
        self.image_head = ProjectionHead(self.image_tower.output_dim, embed_dim, **head)
        self.text_head = ProjectionHead(self.text_tower.output_dim, embed_dim, **head)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))
        self.max_logit_scale = math.log(1.0 / min_temperature)
        # Frozen towers keep their weights (e.g. a "generic" text tower that never sees a report)
        # and stay in eval mode (no dropout: a fixed feature map), also across Lightning's mode switches.
        if freeze_image_tower:
            self.image_tower.requires_grad_(False).eval()
        if freeze_text_tower:
            self.text_tower.requires_grad_(False).eval()
        if grad_checkpointing and hasattr(self.text_tower, "set_grad_checkpointing"):
            self.text_tower.set_grad_checkpointing(True)
        self.loss_fn = ClipLoss(local_loss=local_loss)

    # ---- the embedding contract -----------------------------------------------------------------
    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_tower(image)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_tower(input_ids, attention_mask)

    def encode_images(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(self.image_features(image)), dim=-1)

    def encode_reports(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(self.text_features(input_ids, attention_mask)), dim=-1)

    # ---- training ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # The loss is told its distributed setting rather than reading global state.
        self.loss_fn = ClipLoss(local_loss=self.hparams.local_loss, rank=self.global_rank, world_size=self.trainer.world_size)

    def _step(self, batch: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = self.encode_images(batch["image"])
        txt = self.encode_reports(batch["input_ids"], batch["attention_mask"])
        scale = self.logit_scale.exp()
        loss = self.loss_fn(img, txt, scale, group_ids=batch["study_idx"])["contrastive_loss"]
        # Log what reveals a stalled contrastive run, not just the loss: in-batch retrieval
        # accuracy (chance = 1/batch) and the temperature.
        logits = img @ txt.T
        ids = batch["study_idx"]
        bs = img.shape[0]
        on_step = prefix == "train"
        self.log(f"{prefix}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=not on_step)
        self.log(f"{prefix}/i2t_acc", in_batch_accuracy(logits, ids, ids), on_step=on_step, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=not on_step)
        self.log(f"{prefix}/t2i_acc", in_batch_accuracy(logits.T, ids, ids), on_step=on_step, on_epoch=True, batch_size=bs, sync_dist=not on_step)
        self.log(f"{prefix}/chance_acc", 1.0 / bs, on_step=False, on_epoch=True, batch_size=bs, sync_dist=not on_step)
        return loss, img, txt

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._step(batch, "train")
        self.log("train/temperature", 1.0 / self.logit_scale.exp(), on_step=True, on_epoch=False)
        return loss

    def train(self, mode: bool = True):
        super().train(mode)
        if self.hparams.freeze_image_tower:
            self.image_tower.eval()
        if self.hparams.freeze_text_tower:
            self.text_tower.eval()
        return self

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.max_logit_scale)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        _, img, txt = self._step(batch, "val")
        return validation_outputs(img, txt, batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        # The final audit (train.py) and evaluate.py: same outputs, logged under test/.
        _, img, txt = self._step(batch, "test")
        return validation_outputs(img, txt, batch)

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optimizer, self.hparams.scheduler)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_extras(self, checkpoint, strip_external=True)  # frozen base-LLM weights left out (models/checkpoint.py)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_external_weights(self, checkpoint)  # resuming: base weights from the (checked) base folder
