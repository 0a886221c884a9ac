"""The embedding model contract, written once: what evaluate.py, the audit callbacks (callbacks/),
the embeddings cache (models/embedding_cache.py) and the adaptive attacker read from a model.

Every model the audits run on satisfies `EmbeddingModel`: a trained dual tower (models/dual_tower.py)
and a DP stage (models/dp/module.py), in memory or rebuilt by `models.checkpoint.load_embedding_model`,
and an existing vision-language model (models/external.py's `ExternalDualEncoder`). The classes
declare the loader-filled attributes through `LoadedState` (their values for a model built in memory);
a loader overwrites them with what it read. `as_embedding_model` is the check a loader ends with.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch

# The members of the contract (checked by `as_embedding_model`, documented on `EmbeddingModel`).
MEMBERS = ("encode_images", "encode_reports", "validation_step", "test_step", "tokenizer", "data_preprocessing",
           "saved_dp_state", "saved_epoch", "load_notes", "preprocessing_notes")


@runtime_checkable
class EmbeddingModel(Protocol):
    """An image-report dual encoder the audits run on.

    encode_images(image [B, C, H, W] as the datamodule prepared it) -> [B, D] float, each row L2-normalised
        (unit norm) on the module's device. (A DP stage also takes its cached features [B, Di].)
    encode_reports(input_ids [B, L] long, attention_mask [B, L]) -> [B, D] float, each row L2-normalised,
        in the same space as encode_images (cosine = dot product).
    validation_step / test_step(batch, batch_idx) -> the dict the audit callbacks collect
        (audit.embeddings.validation_outputs: image_emb, report_emb, labels, study_idx, patient_idx, index).
    tokenizer: turns report texts into the token ids encode_reports reads (the datamodule is given it:
        `tokenizer(texts)["input_ids"]`, `pad_token_id`, `padding_side`).
    data_preprocessing: {datamodule attribute: value} the model's inputs must be prepared with (image_size,
        image_channels, mean, std, text_field, max_length; an existing model's image_transform), set on the
        datamodule before it is set up; None when the model records none (built in memory, or a checkpoint
        saved outside a Trainer).
    saved_dp_state: the privacy statement of a DP-trained release (a DP checkpoint's `dp_state`, a released
        model's dp_record.json), which travels with every audit of it; None otherwise.
    saved_epoch: Lightning's 0-based epoch of a checkpoint (as in epoch_NNN.ckpt); None when not from one.
    load_notes: the weights that did not load (models/load_guard.py, only under allow_partial_load); empty
        when everything loaded. Non-empty flags every section of an audit (meta.weights_not_loaded).
    preprocessing_notes: an existing model's preprocessing settings that are not proven to be the ones it
        was trained with (models.external.preprocessing_unproven); empty otherwise.
    """

    tokenizer: Any
    data_preprocessing: dict[str, Any] | None
    saved_dp_state: dict[str, Any] | None
    saved_epoch: int | None
    load_notes: Sequence[str]
    preprocessing_notes: Sequence[str]

    def encode_images(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_reports(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]: ...

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]: ...


class LoadedState:
    """The contract's loader-filled attributes, declared with their values for a model built in memory
    (a class mixed into the LightningModules; `models.checkpoint.load_module` and the existing-model
    constructor set them per instance)."""

    data_preprocessing: dict[str, Any] | None = None
    saved_dp_state: dict[str, Any] | None = None
    saved_epoch: int | None = None
    load_notes: Sequence[str] = ()
    preprocessing_notes: Sequence[str] = ()


def as_embedding_model(module: Any, where: str) -> EmbeddingModel:
    """`module`, checked to satisfy `EmbeddingModel`; a TypeError naming what it lacks otherwise."""
    if not isinstance(module, EmbeddingModel):
        missing = [m for m in MEMBERS if not hasattr(module, m)]
        raise TypeError(f"{where}: {type(module).__name__} is not an embedding model the audits can run on "
                        f"(models/contract.py): it lacks {missing}")
    return module
