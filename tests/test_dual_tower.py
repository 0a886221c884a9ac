"""Datamodule batches, the dual tower's embedding contract, and the checkpoint round-trip."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from cxr_relink.datamodules.datamodule import CXRDataModule
from cxr_relink.models.checkpoint import load_module
from cxr_relink.models.dual_tower import DualTowerModule
from tests.conftest import InMemoryReader, random_studies

TOWERS = dict(
    image_tower={"_target_": "cxr_relink.models.image_towers.SmallCNN", "in_channels": 1, "widths": [8, 16]},
    text_tower={"_target_": "cxr_relink.models.text_towers.BertTextEncoder", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
    embed_dim=16,
)


@pytest.fixture
def dm(tmp_path):
    dm = CXRDataModule(InMemoryReader(random_studies()), tokenizer={"vocab_size": 200}, batch_size=4, image_size=32, cache_dir=str(tmp_path))
    dm.setup("fit")
    return dm


def test_batches_follow_the_contract(dm) -> None:
    studies = dm.studies("train")
    n_images = sum(len(s.images) for s in studies)
    ds = dm.dataset("train")
    assert len(ds) == n_images  # one item per image (view)
    batch = next(iter(dm.eval_dataloader("train")))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["labels"].shape == (4, 14)
    for i in range(4):
        st = studies[int(batch["study_idx"][i])]
        # labels travel unchanged, NaN (blank) included
        np.testing.assert_array_equal(batch["labels"][i].numpy(), st.labels)
        assert int(batch["patient_idx"][i]) == dm.patient_index[st.patient_id]
        # dynamic right padding: mask ones first, pad ids after
        n = int(batch["attention_mask"][i].sum())
        assert (batch["input_ids"][i, n:] == dm.tokenizer.pad_token_id).all()
    # every image of a multi-view study maps to the same study
    by_study = {}
    for idx, (s, v) in enumerate(ds.items):
        by_study.setdefault(s, []).append(v)
    assert any(len(v) > 1 for v in by_study.values())


def test_unreadable_image_names_the_file(tmp_path) -> None:
    studies = random_studies()
    studies[0].images = [str(tmp_path / "missing.png")]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    studies[3].images = [str(bad)]
    dm = CXRDataModule(InMemoryReader(studies), tokenizer={"vocab_size": 200}, batch_size=2, image_size=32)
    dm.setup()
    ds = dm.dataset(studies[0].split)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ds[0]
    with pytest.raises(ValueError, match="bad.jpg"):
        dm.dataset(studies[3].split)[[i for i, (s, _) in enumerate(dm.dataset(studies[3].split).items) if dm.studies(studies[3].split)[s].study_id == studies[3].study_id][0]]


def _module(dm) -> DualTowerModule:
    return DualTowerModule(**TOWERS, tokenizer=dm.tokenizer)


def test_embeddings_are_normalised_and_validation_returns_contract(dm) -> None:
    torch.manual_seed(0)
    module = _module(dm).eval()
    batch = next(iter(dm.eval_dataloader("val")))
    img = module.encode_images(batch["image"])
    txt = module.encode_reports(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(img)), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(len(txt)), atol=1e-5)

    class Collect(L.Callback):
        outputs: list = []

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.outputs.append(outputs)

    collect = Collect()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=1, callbacks=[collect], enable_model_summary=False)
    trainer.validate(module, dataloaders=dm.eval_dataloader("val"), verbose=False)
    out = collect.outputs[0]
    assert set(out) == {"image_emb", "report_emb", "labels", "study_idx", "patient_idx", "index"}
    assert torch.allclose(out["image_emb"], img, atol=1e-5)
    assert torch.allclose(out["report_emb"], txt, atol=1e-5)
    assert torch.equal(out["index"], batch["index"])


def test_checkpoint_round_trip_rebuilds_the_model_alone(dm, tmp_path) -> None:
    L.seed_everything(0)
    module = _module(dm)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
        default_root_dir=tmp_path, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    # Loadable with weights_only=True and rebuilt from the checkpoint alone (config + tokenizer).
    loaded = load_module(path)
    module.eval()
    batch = next(iter(dm.eval_dataloader("test")))
    with torch.no_grad():
        assert torch.equal(module.encode_images(batch["image"]), loaded.encode_images(batch["image"]))
        assert torch.equal(
            module.encode_reports(batch["input_ids"], batch["attention_mask"]),
            loaded.encode_reports(batch["input_ids"], batch["attention_mask"]),
        )
    assert loaded.tokenizer("left effusion")["input_ids"] == dm.tokenizer("left effusion")["input_ids"]


def test_checkpoint_refuses_foreign_classes(tmp_path) -> None:
    torch.save({"cxr_relink": {"format_version": 1, "module_class": "os.system", "tokenizer": {}}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="refusing"):
        load_module(tmp_path / "x.ckpt")


def test_checkpoint_refuses_foreign_targets_in_its_config(dm, tmp_path) -> None:
    """Hyper-parameters are data from the file: a nested `_target_` must not reach any callable."""
    module = _module(dm)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["image_tower"] = {"_target_": "builtins.print", "args": ["pwned"]}
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="builtins.print"):
        load_module(tmp_path / "evil.ckpt")


def test_study_repr_carries_no_report_text() -> None:
    st = random_studies(1)[0]
    st.report = "SECRET-REPORT-TEXT"
    assert "SECRET" not in repr(st) and st.study_id in repr(st)


def test_patient_in_two_splits_is_refused(tmp_path) -> None:
    studies = random_studies(4)
    other = next(s for s in studies if s.patient_id != studies[0].patient_id and s.split != studies[0].split)
    other.patient_id = studies[0].patient_id
    dm = CXRDataModule(InMemoryReader(studies), tokenizer={"vocab_size": 200}, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="more than one split"):
        dm.setup()


def test_sixteen_bit_png_is_rescaled_not_saturated(tmp_path) -> None:
    from PIL import Image

    from cxr_relink.datamodules.datamodule import load_image

    a = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7) % 60000 + 1000
    Image.fromarray(a).save(tmp_path / "x16.png")
    got = load_image(str(tmp_path / "x16.png"), where="test")
    # scaled by the format's range (issue 23: one rule for 8 and 16 bits, no per-image stretch)
    ref = np.floor(a * 255.0 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="uint8"):
        load_image(a.astype(np.float32), where="test")
