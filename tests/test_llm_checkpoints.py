"""Real LLM checkpoints in the text tower: bf16 releases on a CPU, LoRA targets per architecture (fused
attention projections), the Ko et al. preset, and stage-2 checkpoints that store only what was trained
plus a fingerprint of the base (relocatable, refusing a different base)."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from cxr_relink.datamodules.datamodule import CXRDataModule
from cxr_relink.datamodules.text import build_tokenizer, train_wordpiece
from cxr_relink.models.checkpoint import load_checkpoint_dict, load_module
from cxr_relink.models.dual_tower import DualTowerModule
from cxr_relink.models.llm_encoder import BidirectionalLLMEncoder, attention_linear_names, resolve_lora_targets
from tests.conftest import InMemoryReader, random_studies

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             max_position_embeddings=64)


def save_tiny_llama(path: Path, texts: list[str], dtype=torch.bfloat16, tie: bool = False, seed: int = 0) -> Path:
    """A random tiny Llama causal LM saved as a release is (bf16 safetensors + tokenizer in one folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_wordpiece(texts, vocab_size=200)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=tie, pad_token_id=tok.pad_token_id, **SMALL)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def tower_cfg(base: Path, **kw) -> dict:
    cfg = {"_target_": "cxr_relink.models.llm_encoder.BidirectionalLLMEncoder", "pretrained": str(base), "pooling": "latent_attention",
           "pooler_kwargs": {"num_latents": 8, "num_heads": 4}, "lora_r": 4, "lora_alpha": 8}
    cfg.update(kw)
    return cfg


TOWERS = dict(
    image_tower={"_target_": "cxr_relink.models.image_towers.SmallCNN", "in_channels": 1, "widths": [8, 16]},
    optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2},
    embed_dim=16,
)


@pytest.fixture
def base_and_dm(tmp_path):
    studies = random_studies()
    base = save_tiny_llama(tmp_path / "llama_bf16", [s.report for s in studies] * 3)
    dm = CXRDataModule(InMemoryReader(studies), tokenizer={"pretrained": str(base)}, batch_size=4, image_size=32,
                       cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    return base, dm


def saved_stage2(base, dm, path):
    """A stage-2 module with the base's LLM tower, trained two steps and saved to ``path`` by Lightning."""
    L.seed_everything(0)
    module = DualTowerModule(**TOWERS, text_tower=tower_cfg(base), tokenizer=dm.tokenizer)
    fit(module, dm, path.parent).save_checkpoint(path)
    return module


def fit(module, dm, root, steps=2):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=1, logger=False, enable_progress_bar=False,
                        default_root_dir=root, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return trainer


# ---- dtype -----------------------------------------------------------------------------------------


def test_bf16_release_trains_and_encodes_on_cpu(base_and_dm, tmp_path):
    base, dm = base_and_dm
    assert next(iter(load_file(str(base / "model.safetensors")).values())).dtype == torch.bfloat16
    L.seed_everything(0)
    module = DualTowerModule(**TOWERS, text_tower=tower_cfg(base), tokenizer=dm.tokenizer)  # dtype: null (default)
    tower = module.text_tower
    assert {p.dtype for p in tower.parameters()} == {torch.float32}  # null = float32, whatever the release
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    fit(module, dm, tmp_path)
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters() if "lora_B" in n)  # it trained
    module.eval()
    batch = next(iter(dm.eval_dataloader("test")))
    with torch.no_grad():
        z = module.encode_reports(batch["input_ids"], batch["attention_mask"])
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(len(z)))


def test_bf16_weights_with_fp32_pooler_and_autocast(base_and_dm):
    base, dm = base_and_dm
    b = dm.tokenizer(["small left effusion", "heart normal"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    ref = BidirectionalLLMEncoder(dm.tokenizer, **{k: v for k, v in tower_cfg(base).items() if k != "_target_"}).eval()
    for dtype, autocast in (("bfloat16", False), ("bfloat16", True), ("auto", False)):
        torch.manual_seed(0)  # same pooler / LoRA init as `ref`
        enc = BidirectionalLLMEncoder(dm.tokenizer, dtype=dtype, autocast_bf16=autocast,
                                      **{k: v for k, v in tower_cfg(base).items() if k != "_target_"})
        assert enc.base_model.get_input_embeddings().weight.dtype == torch.bfloat16  # GPU memory setting kept
        assert {p.dtype for p in enc.parameters() if p.requires_grad} == {torch.float32}  # LoRA + pooler
        out = enc(b["input_ids"], b["attention_mask"])  # train mode: backward through LoRA and pooler
        out.pow(2).sum().backward()
        assert out.dtype == torch.float32
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters() if p.requires_grad)
        enc.eval()
        with torch.no_grad():
            # bf16 activations: close to the float32 tower, not equal (the base's weights are the same values)
            cos = torch.nn.functional.cosine_similarity(enc(b["input_ids"], b["attention_mask"]),
                                                        ref(b["input_ids"], b["attention_mask"]))
        assert cos.min() > 0.98, (dtype, autocast, cos)


# ---- LoRA targets per architecture ------------------------------------------------------------------


def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(model_type, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL)
    return AutoModel.from_config(cfg)


def test_lora_targets_resolved_per_architecture():
    llama, phi3 = _tiny("llama"), _tiny("phi3")
    assert resolve_lora_targets(llama, "attention") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert resolve_lora_targets(phi3, "attention") == ["o_proj", "qkv_proj"]  # the fused projection is adapted
    assert attention_linear_names(phi3) == ["o_proj", "qkv_proj"]
    # An explicit list that does not fit fails loudly (PEFT alone would adapt o_proj only).
    with pytest.raises(ValueError, match=r"\['q_proj', 'k_proj', 'v_proj'\] match no linear layer"):
        resolve_lora_targets(phi3, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert resolve_lora_targets(llama, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("model_type,expected", [("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                                 ("phi3", {"qkv_proj", "o_proj"})])
def test_tower_puts_lora_on_every_attention_projection(model_type, expected):
    tok = train_wordpiece(["small left pleural effusion", "no acute process"] * 5, vocab_size=100)
    torch.manual_seed(0)
    enc = BidirectionalLLMEncoder(tok, model_type=model_type, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=128, pooling="mean", use_lora=True, lora_r=4)
    adapted = {n for n, m in enc.base_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {f"layers.{i}.self_attn.{p}" for i in range(2) for p in expected}
    assert set(enc.settings()["lora"]["target_modules"]) == expected
    with pytest.raises(ValueError, match="match no linear layer"):
        BidirectionalLLMEncoder(tok, model_type=model_type, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                intermediate_size=128, pooling="mean", use_lora=True, lora_target_modules=["nope_proj"])


# ---- the Ko et al. preset ------------------------------------------------------------------------------


def test_ko2025_preset_composes_and_builds(tmp_path):
    from hydra.utils import instantiate

    from tests.test_text_adapt import compose_stage1

    for overrides in (["model=llm_encoder"], ["experiment=text_adapt"]):
        cfg = compose_stage1(tmp_path, [*overrides, "model/text_tower=llm_ko2025", "logger=none",
                                        "model.text_tower.hidden_size=64", "model.text_tower.intermediate_size=128",
                                        "model.text_tower.use_lora=true"])
        t = cfg.model.text_tower
        assert dict(t.pooler_kwargs) == {"num_latents": 512, "num_heads": 8}
        assert (t.lora_r, t.lora_alpha, t.lora_dropout) == (16, 32, 0.1)
        assert t.lora_target_modules == "attention"
    tok = train_wordpiece(["small left pleural effusion", "no acute process"] * 5, vocab_size=100)
    enc = instantiate(cfg.model.text_tower, tokenizer=tok)
    assert enc.pooler.latents.shape == (512, 64) and enc.pooler.attn.num_heads == 8
    lora = enc.backbone.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.1)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


# ---- checkpoints without the base ----------------------------------------------------------------------


def test_checkpoint_stores_only_trained_weights_and_checks_the_base(base_and_dm, tmp_path):
    base, dm = base_and_dm
    path = tmp_path / "model.ckpt"
    module = saved_stage2(base, dm, path)
    ckpt = load_checkpoint_dict(path)
    stored = set(ckpt["state_dict"])
    full = module.state_dict()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in module.named_buffers()}
    # Exactly what was trained (LoRA, pooler, heads, image tower, logit scale) plus buffers: no base weight.
    assert stored == trainable | (buffers & set(full))
    assert not any(".base_layer." in k or "embed_tokens" in k or "mlp." in k for k in stored)
    base_bytes = (base / "model.safetensors").stat().st_size
    stored_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    frozen_bytes = sum(p.numel() * p.element_size() for n, p in module.named_parameters() if not p.requires_grad)
    assert stored_bytes == sum(full[k].numel() * full[k].element_size() for k in stored)
    assert frozen_bytes > base_bytes  # float32 in memory > bf16 on disk: every frozen base tensor was left out
    ext = ckpt["cxr_relink"]["external_weights"]["text_tower"]
    assert ext["pretrained"] == str(base) and set(ext["fingerprint"]["files"]) == {"config.json", "model.safetensors"}

    module.eval()
    batch = next(iter(dm.eval_dataloader("test")))
    with torch.no_grad():
        ref = module.encode_reports(batch["input_ids"], batch["attention_mask"])
        assert torch.equal(load_module(path).encode_reports(batch["input_ids"], batch["attention_mask"]), ref)

    # The base moves: the checkpoint says what it needs, and loads by an override with identical embeddings.
    moved = tmp_path / "elsewhere" / "llama"
    shutil.copytree(base, moved)
    shutil.rmtree(base)
    with pytest.raises(FileNotFoundError, match=r"text_tower.*pretrained"):
        load_module(path)
    loaded = load_module(path, overrides={"text_tower.pretrained": str(moved)})
    assert loaded.text_tower.pretrained == str(moved)
    # ... and by the documented evaluate.py override.
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import load_audited_module

    cfg = compose("evaluate.yaml", [f"ckpt_path={path}", f"+model.text_tower.pretrained={moved}"])
    assert load_audited_module(cfg).text_tower.pretrained == str(moved)
    with torch.no_grad():
        assert torch.equal(loaded.encode_reports(batch["input_ids"], batch["attention_mask"]), ref)
        assert torch.equal(loaded.encode_images(batch["image"]), module.encode_images(batch["image"]))

    # A different base with the same architecture (one weight changed) is refused.
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    sd = load_file(str(other / "model.safetensors"))
    key = next(k for k in sd if "layers.0.self_attn.q_proj" in k)
    sd[key] = sd[key].clone()
    sd[key][0, 0] += 1
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not the one this checkpoint was trained on.*model\.safetensors"):
        load_module(path, overrides={"text_tower": {"pretrained": str(other)}})

    # Resuming training restores the base weights from the folder (Lightning loads strictly).
    module2 = DualTowerModule(**TOWERS, text_tower=tower_cfg(moved), tokenizer=dm.tokenizer)
    trainer2 = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, enable_model_summary=False, num_sanity_val_steps=0)
    trainer2.fit(module2, datamodule=dm, ckpt_path=path)
    assert trainer2.global_step == 3


def test_fingerprint_is_deterministic_and_covers_the_weights(tmp_path):
    from cxr_relink.models.llm_encoder import base_fingerprint

    base = save_tiny_llama(tmp_path / "a", ["small left effusion", "no acute process"] * 5)
    fp = base_fingerprint(base)
    shutil.copytree(base, tmp_path / "b")
    assert base_fingerprint(tmp_path / "b") == fp  # relocatable: paths are relative
    (tmp_path / "b" / "tokenizer.json").write_text("{}")  # tokenizer files are not covered (checkpoints carry theirs)
    assert base_fingerprint(tmp_path / "b") == fp
    cfg = (tmp_path / "b" / "config.json").read_text()
    (tmp_path / "b" / "config.json").write_text(cfg.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert base_fingerprint(tmp_path / "b")["digest"] != fp["digest"]


def test_project_towers_keep_full_checkpoints(tmp_path):
    """A tower built from a config (no base folder) stores every weight, as before."""
    tok = build_tokenizer([s.report for s in random_studies()], vocab_size=200, min_frequency=1)
    tower = {"_target_": "cxr_relink.models.llm_encoder.BidirectionalLLMEncoder", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
             "num_kv_heads": 1, "intermediate_size": 64, "pooling": "mean"}
    module = DualTowerModule(**TOWERS, text_tower=tower, tokenizer=tok)
    assert module.text_tower.external_state() is None
    from cxr_relink.models.checkpoint import save_extras

    ckpt = {"state_dict": module.state_dict()}
    save_extras(module, ckpt, strip_external=True)
    assert set(ckpt["state_dict"]) == set(module.state_dict()) and ckpt["cxr_relink"]["external_weights"] == {}


def test_frozen_adapters_are_not_taken_for_base_weights(base_and_dm):
    """A later stage (DP alignment) freezes the whole tower: the LoRA weights and the pooler are still
    stored, only the base's own weights are left out; a full finetune stores everything."""
    base, dm = base_and_dm
    tower = BidirectionalLLMEncoder(dm.tokenizer, **{k: v for k, v in tower_cfg(base).items() if k != "_target_"})
    before = set(tower.external_state()["keys"])
    tower.requires_grad_(False)
    keys = set(tower.external_state()["keys"])
    assert keys == before and not any("lora_" in k or k.startswith("pooler.") for k in keys)
    assert keys == {k for k in tower.state_dict() if k.startswith("backbone.") and "lora_" not in k}
    full = BidirectionalLLMEncoder(dm.tokenizer, use_lora=False,
                                   **{k: v for k, v in tower_cfg(base).items() if k != "_target_"})
    assert full.external_state() is None


def test_dp_checkpoint_on_an_llm_backbone_leaves_out_the_base(base_and_dm, tmp_path):
    """The DP stage on a stage-2 checkpoint with an LLM tower: its checkpoints hold the heads and the
    stage-2 module's trained weights but not the frozen base (rebuilt from the base folder), and load
    back (evaluate.py's load_module, and a strict Lightning resume) to the same encoder."""
    from cxr_relink.models.dp.module import DPAlignmentModule

    base, dm = base_and_dm
    s2 = tmp_path / "stage2.ckpt"
    saved_stage2(base, dm, s2)

    dp = DPAlignmentModule(backbone_ckpt=str(s2), dp={"enabled": False})
    ckpt = {"state_dict": dp.state_dict(), "hyper_parameters": dict(dp.hparams)}
    dp.on_save_checkpoint(ckpt)
    base_keys = {k for k in dp.state_dict() if k.startswith("backbone_module.text_tower.backbone.") and "lora_" not in k}
    assert base_keys and not base_keys & set(ckpt["state_dict"])  # no base weight stored
    assert set(ckpt["cxr_relink"]["external_weights"]) == {"backbone_module.text_tower"}

    ckpt["pytorch-lightning_version"] = L.__version__
    torch.save(ckpt, tmp_path / "dp.ckpt")
    loaded = load_module(tmp_path / "dp.ckpt")
    batch = next(iter(dm.eval_dataloader("test")))
    dp.eval()
    with torch.no_grad():
        ref = dp.encode_reports(batch["input_ids"], batch["attention_mask"])
        assert torch.equal(loaded.encode_reports(batch["input_ids"], batch["attention_mask"]), ref)
    # A resume loads strictly: on_load_checkpoint puts the base back from the folder.
    resumed = DPAlignmentModule(backbone_ckpt=str(s2), dp={"enabled": False})
    again = torch.load(tmp_path / "dp.ckpt", weights_only=True)
    resumed.on_load_checkpoint(again)
    resumed.load_state_dict(again["state_dict"], strict=True)
