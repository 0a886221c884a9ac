"""The embedding model contract (models/contract.py, issue #30 item 3): every loader returns an
`EmbeddingModel`, with values of the documented types: unit-norm float embeddings from encode_images /
encode_reports, a tokenizer, and the loader-filled attributes (data_preprocessing, saved_dp_state,
saved_epoch, load_notes, preprocessing_notes) set by the class or its loader, never missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_relink.models.contract import MEMBERS, EmbeddingModel, LoadedState, as_embedding_model
from tests.test_external_models import TEXTS, hf_models  # noqa: F401  (a session fixture: tiny CLIP/SigLIP folders)

pytestmark = pytest.mark.usefixtures("one_thread")


def _dual_tower(seed: int = 0):
    from cxr_relink.datamodules.text import build_tokenizer
    from cxr_relink.models.dual_tower import DualTowerModule

    torch.manual_seed(seed)
    return DualTowerModule(
        image_tower={"_target_": "cxr_relink.models.image_towers.SmallCNN", "in_channels": 1, "widths": [8, 16]},
        text_tower={"_target_": "cxr_relink.models.text_towers.BertTextEncoder", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                    "intermediate_size": 32, "max_position_embeddings": 256},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True}, embed_dim=8,
        tokenizer=build_tokenizer(TEXTS * 20, vocab_size=120),
    )


@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny dual tower saved as Lightning + models.checkpoint save one, with the preprocessing and epoch
    a Trainer would record."""
    from cxr_relink.models.checkpoint import KEY, plain, save_extras

    m = _dual_tower()
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": plain(dict(m.hparams)), "epoch": 4}
    save_extras(m, ckpt)
    data = {"image_size": 32, "image_channels": 1, "mean": 0.5, "std": 0.25, "text_field": "report", "max_length": 64}
    ckpt[KEY]["data"] = data
    path = tmp_path_factory.mktemp("stage2") / "epoch_004.ckpt"
    torch.save(ckpt, path)
    return path, data


def _tokens(model, texts):
    rows = model.tokenizer(list(texts))["input_ids"]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def check_contract(model, image: torch.Tensor) -> None:
    """`model` satisfies EmbeddingModel, with every member of the documented type."""
    assert isinstance(model, EmbeddingModel)
    assert as_embedding_model(model, "test") is model
    assert model.data_preprocessing is None or isinstance(model.data_preprocessing, dict)
    assert model.saved_dp_state is None or isinstance(model.saved_dp_state, dict)
    assert model.saved_epoch is None or isinstance(model.saved_epoch, int)
    assert all(isinstance(n, str) for n in model.load_notes) and not isinstance(model.load_notes, str)
    assert all(isinstance(n, str) for n in model.preprocessing_notes) and not isinstance(model.preprocessing_notes, str)
    ids, mask = _tokens(model, TEXTS[:2])
    with torch.no_grad():
        img = model.encode_images(image)
        txt = model.encode_reports(ids, mask)
    for emb, n in ((img, image.shape[0]), (txt, 2)):
        assert emb.dtype == torch.float32 and emb.ndim == 2 and emb.shape[0] == n
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(n))  # L2-normalised rows
    assert img.shape[1] == txt.shape[1]  # one space


def test_the_protocol_names_every_member_and_refuses_what_lacks_one():
    declared = set(EmbeddingModel.__annotations__) | {k for k in vars(EmbeddingModel) if not k.startswith("_")}
    assert set(MEMBERS) == declared
    assert set(LoadedState.__annotations__) == set(EmbeddingModel.__annotations__) - {"tokenizer"}

    class NoReports:
        tokenizer = None
        data_preprocessing = saved_dp_state = saved_epoch = None
        load_notes = preprocessing_notes = ()

        def encode_images(self, image): ...

        def validation_step(self, batch, batch_idx): ...

        def test_step(self, batch, batch_idx): ...

    assert not isinstance(NoReports(), EmbeddingModel)
    with pytest.raises(TypeError, match=r"NoReports is not an embedding model .* lacks \['encode_reports'\]"):
        as_embedding_model(NoReports(), "x")


def test_dual_tower_in_memory_and_from_its_checkpoint(stage2):
    from cxr_relink.models.checkpoint import load_embedding_model

    path, data = stage2
    image = torch.rand(3, 1, 32, 32)
    fresh = _dual_tower()
    check_contract(fresh.eval(), image)
    assert (fresh.data_preprocessing, fresh.saved_dp_state, fresh.saved_epoch) == (None, None, None)
    loaded = load_embedding_model(path)
    check_contract(loaded, image)
    assert loaded.data_preprocessing == data and loaded.saved_epoch == 4 and loaded.saved_dp_state is None
    assert list(loaded.load_notes) == [] and list(loaded.preprocessing_notes) == []
    assert "load_notes" in vars(loaded) and "saved_epoch" in vars(loaded)  # set by the loader, per instance
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(image), fresh.encode_images(image))


def test_dp_stage_in_memory_and_from_its_checkpoint(stage2, tmp_path):
    import lightning as L

    from cxr_relink.models.checkpoint import load_embedding_model
    from cxr_relink.models.dp.module import DPAlignmentModule

    path, data = stage2
    image = torch.rand(2, 1, 32, 32)
    dp = DPAlignmentModule(backbone_ckpt=str(path), dp={"enabled": False}).eval()
    check_contract(dp, image)
    ckpt = {"state_dict": dp.state_dict(), "hyper_parameters": dict(dp.hparams), "epoch": 1,
            "pytorch-lightning_version": L.__version__}
    dp.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "dp.ckpt")
    loaded = load_embedding_model(tmp_path / "dp.ckpt")
    check_contract(loaded, image)
    assert isinstance(loaded, DPAlignmentModule) and loaded.saved_epoch == 1
    assert loaded.saved_dp_state == ckpt["dp_state"] and loaded.saved_dp_state["enabled"] is False
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(image), dp.encode_images(image))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_existing_model_constructor(hf_models, name):  # noqa: F811
    from cxr_relink.models.external import ExternalDualEncoder

    model = ExternalDualEncoder("hf", str(hf_models[name]))
    transform = model.data_preprocessing["image_transform"]
    rng = np.random.default_rng(0)
    image = torch.stack([transform(rng.integers(0, 256, size=(40, 48), dtype=np.uint8)) for _ in range(2)])
    check_contract(model, image)
    assert model.saved_dp_state is None and model.saved_epoch is None and list(model.load_notes) == []


def test_evaluate_loads_through_the_contract(stage2, hf_models):  # noqa: F811
    from omegaconf import OmegaConf

    from cxr_relink.evaluation import load_audited_module

    path, _ = stage2
    ckpt_cfg = OmegaConf.create({"ckpt_path": str(path), "model": {}})
    assert isinstance(load_audited_module(ckpt_cfg), EmbeddingModel)
    ext_cfg = OmegaConf.create({"ckpt_path": None, "model": {"_target_": "cxr_relink.models.external.ExternalDualEncoder",
                                                             "family": "hf", "path": str(hf_models["clip"])}})
    assert isinstance(load_audited_module(ext_cfg), EmbeddingModel)
