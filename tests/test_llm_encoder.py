"""The bidirectional LLM text tower: bidirectionality per attention kernel and padding side, padding
invariance, poolers, LoRA adapter save -> load, checkpointing and autocast switches."""

from __future__ import annotations

import json

import pytest
import torch

from cxr_relink.datamodules.text import train_wordpiece
from cxr_relink.models.llm_encoder import ENCODER_JSON, BidirectionalLLMEncoder
from cxr_relink.models.poolers import POOLERS, build_pooler

TEXTS = [
    "no acute cardiopulmonary process",
    "small left pleural effusion with adjacent atelectasis",
    "right lower lobe consolidation concerning for pneumonia",
    "heart size is normal and the lungs are clear",
    "endotracheal tube terminates 4 cm above the carina",
    "moderate cardiomegaly with mild pulmonary edema",
]
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(TEXTS * 5, vocab_size=300)


def make(tok, **kw):
    torch.manual_seed(0)
    args = dict(TINY, pooling="mean", use_lora=False)
    args.update(kw)
    return BidirectionalLLMEncoder(tok, **args).eval()


def pad_batch(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def valid_states(enc, ids, mask, row):
    with torch.no_grad():
        h = enc.hidden_states(ids, mask)[row]
    return h[mask[row].bool()]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_bidirectionality_and_padding(tok, model_type, attn, side, bidirectional):
    enc = make(tok, model_type=model_type, attn_implementation=attn, bidirectional=bidirectional)
    assert enc.base_model.config._attn_implementation == attn
    assert enc.base_model.config.is_causal is (not bidirectional)  # the mechanism: the config flag
    short = tok(TEXTS[0])["input_ids"]
    long_ = tok(TEXTS[1])["input_ids"]
    assert len(short) < len(long_)
    # Change the last real token (before [SEP]) of the short text; it is the padded row.
    changed = list(short)
    changed[-2] = tok.convert_tokens_to_ids("effusion")
    assert changed[-2] != short[-2]
    ids_a, mask_a = pad_batch([short, long_], tok.pad_token_id, side)
    ids_b, mask_b = pad_batch([changed, long_], tok.pad_token_id, side)
    h_a, h_b = valid_states(enc, ids_a, mask_a, 0), valid_states(enc, ids_b, mask_b, 0)
    earlier = slice(0, len(short) - 2)  # tokens before the changed one
    diff = (h_a[earlier] - h_b[earlier]).abs().amax(-1)
    if bidirectional:
        assert (diff > 1e-4).all(), "every earlier token must see the later change"
    else:
        assert diff.max() < 1e-6, "a causal model must not see later tokens"
    # The other row is untouched either way (no leakage across the batch).
    torch.testing.assert_close(valid_states(enc, ids_a, mask_a, 1), valid_states(enc, ids_b, mask_b, 1))
    # Padding never changes the unpadded text's states or embedding.
    alone = torch.tensor([short])
    torch.testing.assert_close(valid_states(enc, ids_a, mask_a, 0), valid_states(enc, alone, torch.ones_like(alone), 0),
                               atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(enc(ids_a, mask_a)[0], enc(alone, torch.ones_like(alone))[0], atol=1e-5, rtol=1e-5)


def test_unpadded_batch_sdpa_is_bidirectional(tok):
    # No padding: transformers skips the mask (None) and SDPA must then not fall back to is_causal=True.
    enc = make(tok, attn_implementation="sdpa", bidirectional=True)
    ids = torch.tensor([tok(TEXTS[3])["input_ids"]])
    ids2 = ids.clone()
    ids2[0, -2] = tok.convert_tokens_to_ids("effusion")
    m = torch.ones_like(ids)
    with torch.no_grad():
        d = (enc.hidden_states(ids, m)[0, 0] - enc.hidden_states(ids2, m)[0, 0]).abs().max()
    assert d > 1e-4


def test_attention_module_flag_alone_stays_causal(tok):
    # Why the config flag: flipping only the attention modules' attribute leaves eager attention causal.
    enc = make(tok, attn_implementation="eager", bidirectional=False)
    for mod in enc.base_model.modules():
        if hasattr(mod, "is_causal"):
            mod.is_causal = False
    ids = torch.tensor([tok(TEXTS[3])["input_ids"]])
    ids2 = ids.clone()
    ids2[0, -2] = tok.convert_tokens_to_ids("effusion")
    m = torch.ones_like(ids)
    with torch.no_grad():
        d = (enc.hidden_states(ids, m)[0, :-2] - enc.hidden_states(ids2, m)[0, :-2]).abs().max()
    assert d < 1e-6


@pytest.mark.parametrize("name", sorted(POOLERS))
def test_poolers_ignore_padding(name):
    torch.manual_seed(0)
    p = build_pooler(name, 16, num_latents=8, num_heads=4).eval()
    h = torch.randn(1, 5, 16)
    right = torch.cat([h, torch.randn(1, 3, 16)], 1)
    left = torch.cat([torch.randn(1, 3, 16), h], 1)
    m_right = torch.tensor([[1] * 5 + [0] * 3])
    m_left = torch.tensor([[0] * 3 + [1] * 5])
    with torch.no_grad():
        ref = p(h, torch.ones(1, 5, dtype=torch.long))
        torch.testing.assert_close(p(right, m_right), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p(left, m_left), ref, atol=1e-5, rtol=1e-5)
    assert ref.shape == (1, 16)


def test_last_and_mean_pooler_values():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    m = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    assert POOLERS["last"](1)(h, m).flatten().tolist() == [1.0, 7.0]
    assert POOLERS["first"](1)(h, m).flatten().tolist() == [0.0, 5.0]
    assert POOLERS["mean"](1)(h, m).flatten().tolist() == [0.5, 6.0]
    # weighted mean: weights 1..n over valid tokens -> (0*1 + 1*2)/3 and (5*1 + 6*2 + 7*3)/6
    torch.testing.assert_close(POOLERS["weighted_mean"](1)(h, m).flatten(), torch.tensor([2 / 3, 38 / 6]))


@pytest.mark.parametrize("adapter_mode", ["merge", "continue"])
def test_adapter_save_load_identical(tok, tmp_path, adapter_mode):
    enc = make(tok, model_type="qwen2", use_lora=True, lora_r=4, lora_alpha=8, pooling="latent_attention",
               pooler_kwargs={"num_latents": 8, "num_heads": 4}, max_length=96, bidirectional=True)
    assert type(enc.backbone).__name__ == "PeftModel"
    counts = enc.parameter_counts()
    assert 0 < counts["trainable"] < counts["total"]
    # Give the adapter (zero-initialised B) and the pooler non-trivial weights.
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    b = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = enc(b["input_ids"], b["attention_mask"])
        # the adapter matters: without it the embeddings differ
        with enc.backbone.disable_adapter():
            no_adapter = enc(b["input_ids"], b["attention_mask"])
    assert (ref - no_adapter).abs().max() > 1e-3
    out = enc.save_pretrained(tmp_path / "enc", tokenizer=tok)
    meta = json.loads((out / ENCODER_JSON).read_text())
    assert meta["pooling"] == "latent_attention" and meta["max_length"] == 96 and meta["bidirectional"] is True
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "model.safetensors").exists()
    # Settings come from the saved json: nothing but the path (and the lora switch) is given.
    loaded = BidirectionalLLMEncoder(tok, pretrained=str(out), adapter_mode=adapter_mode, use_lora=True).eval()
    assert loaded.pooling == "latent_attention" and loaded.max_length == 96 and loaded.bidirectional
    with torch.no_grad():
        torch.testing.assert_close(loaded(b["input_ids"], b["attention_mask"]), ref, atol=1e-5, rtol=1e-4)


def test_saved_causal_flag_is_restored(tok, tmp_path):
    enc = make(tok, bidirectional=False)
    enc.save_pretrained(tmp_path / "c", tokenizer=tok)
    loaded = BidirectionalLLMEncoder(tok, pretrained=str(tmp_path / "c"), use_lora=False)
    assert loaded.bidirectional is False and loaded.base_model.config.is_causal is True


def test_grad_checkpointing_and_bf16_autocast(tok):
    enc = make(tok)
    enc.train()
    enc.set_grad_checkpointing(True)
    assert getattr(enc.base_model, "is_activation_checkpointing", None) or enc.base_model.is_gradient_checkpointing
    b = tok(TEXTS[:3], padding=True, return_tensors="pt")
    enc(b["input_ids"], b["attention_mask"]).pow(2).sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
    enc.set_grad_checkpointing(False)
    enc.eval()
    with torch.no_grad():
        ref = enc(b["input_ids"], b["attention_mask"])
        enc.autocast_bf16 = True
        low = enc(b["input_ids"], b["attention_mask"])
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low, ref).min() > 0.98


def test_missing_path_raises(tok, tmp_path):
    with pytest.raises(FileNotFoundError):
        BidirectionalLLMEncoder(tok, pretrained=str(tmp_path / "nope"))


def test_verify_attention_catches_a_causal_model(tok):
    enc = make(tok, bidirectional=True)
    enc.verify_attention()  # fine
    enc.bidirectional = False  # pretend the flag had no effect
    with pytest.raises(RuntimeError, match="bidirectional"):
        enc.verify_attention()
