"""Stage 1 text adaptation: MNTP masking and label shifting, supervised contrastive loss against a
brute-force reference, the report-variants datamodule, and a stage-1 smoke run whose Hugging Face
output loads back as the stage-2 text tower with identical embeddings."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_relink.datamodules.records import NUM_LABELS, Study
from cxr_relink.datamodules.report_variants import (
    ReportVariantsDataModule,
    StudyVariantsDataset,
    collate_variants,
    derived_variants,
    swap_first_side,
    variant_pool,
)
from cxr_relink.datamodules.text import train_wordpiece
from cxr_relink.models.losses import IGNORE_INDEX, SupConLoss, mask_tokens, mntp_labels, mntp_loss

# ---- MNTP -------------------------------------------------------------------------------------------


def test_mntp_labels_shift_hand_made():
    ids = torch.tensor([[2, 11, 12, 13, 14, 3], [0, 0, 2, 21, 22, 3]])  # row 2 left-padded (pad = 0)
    selected = torch.tensor([[0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    labels = mntp_labels(ids, selected)
    # token i is predicted at position i-1
    expected = torch.tensor([[-100, 12, -100, 14, -100, -100], [-100, -100, 21, -100, -100, -100]])
    assert torch.equal(labels, expected)
    # The loss reads exactly those logits: position 1 must predict 12, 3 -> 14, (row 2) 2 -> 21.
    V = 30
    logits = torch.randn(2, 6, V)
    ref = torch.stack([
        F.cross_entropy(logits[0, 1][None], torch.tensor([12])),
        F.cross_entropy(logits[0, 3][None], torch.tensor([14])),
        F.cross_entropy(logits[1, 2][None], torch.tensor([21])),
    ]).mean()
    torch.testing.assert_close(mntp_loss(logits, labels), ref)
    # A perfect predictor at those positions has ~zero loss, whatever the other positions say.
    perfect = torch.zeros(2, 6, V)
    perfect[0, 1, 12] = perfect[0, 3, 14] = perfect[1, 2, 21] = 50.0
    assert mntp_loss(perfect, labels) < 1e-6
    assert mntp_loss(logits, torch.full_like(labels, IGNORE_INDEX)) == 0


def test_mask_tokens_rate_and_exclusions():
    g = torch.Generator().manual_seed(0)
    B, L, pad, cls, sep, mask_id = 64, 40, 0, 2, 3, 4
    ids = torch.randint(10, 100, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[::2, -10:] = 0  # right padding on even rows
    ids[am == 0] = pad
    ids[:, 0] = cls
    ids[1::2, -1] = sep
    masked, sel = mask_tokens(ids, am, mask_id, mask_prob=0.2, special_ids=[pad, cls, sep], vocab_size=100,
                              replace_prob=1.0, random_prob=0.0, generator=g)
    assert not sel[am == 0].any() and not sel[:, 0].any() and not sel[ids == sep].any()
    rate = sel.sum().item() / ((am == 1) & (ids >= 10)).sum().item()
    assert 0.15 < rate < 0.25
    assert (masked[sel] == mask_id).all() and torch.equal(masked[~sel], ids[~sel])
    assert sel.any(1).all()  # every row trains on something


# ---- supervised contrastive -----------------------------------------------------------------------


def supcon_bruteforce(feats, groups, hard, t):
    z = F.normalize(feats.double(), dim=-1)
    h = F.normalize(hard.double(), dim=-1) if hard is not None else torch.zeros(0, z.shape[1], dtype=torch.double)
    cands = torch.cat([z, h])
    losses = []
    for i in range(len(z)):
        denom = sum(math.exp(float(z[i] @ cands[a]) / t) for a in range(len(cands)) if a != i)
        pos = [p for p in range(len(z)) if p != i and groups[p] == groups[i]]
        if not pos:
            continue
        losses.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denom) for p in pos) / len(pos))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("with_hard", [False, True])
def test_supcon_matches_bruteforce(with_hard):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(9, 8, generator=g)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])  # groups of 2, 3, 1 (no positive), 2, 1
    hard = torch.randn(4, 8, generator=g) if with_hard else None
    for t in (0.05, 0.5):
        got = SupConLoss(temperature=t)(feats, groups, hard)["supcon_loss"]
        assert got.item() == pytest.approx(supcon_bruteforce(feats, groups, hard, t), rel=1e-5)


def test_supcon_gradient_and_hard_negative_effect():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], requires_grad=True)
    groups = torch.tensor([0, 0, 1, 1])
    loss = SupConLoss(temperature=0.1)(feats, groups)["supcon_loss"]
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    # A hard negative close to the anchors raises the loss.
    close = SupConLoss(temperature=0.1)(feats.detach(), groups, torch.tensor([[1.0, 0.05]]))["supcon_loss"]
    far = SupConLoss(temperature=0.1)(feats.detach(), groups, torch.tensor([[-1.0, -1.0]]))["supcon_loss"]
    assert close > far


def test_supcon_excludes_self_at_rank_offset(monkeypatch):
    # Simulate rank 1 of 2: the gathered batch is [other rank's 3 rows, our 3 rows].
    import cxr_relink.models.losses as losses

    g = torch.Generator().manual_seed(2)
    other, mine = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    og, mg = torch.tensor([7, 7, 8]), torch.tensor([9, 9, 8])

    def fake_gather(x, rank, world_size, with_grad, keep_local_grad=True):
        if x.dtype == torch.long:
            return torch.cat([og, x])
        return torch.cat([F.normalize(other, dim=-1), x])

    monkeypatch.setattr(losses, "gather_features", fake_gather)
    got = SupConLoss(temperature=0.2, rank=1, world_size=2)(mine, mg)["supcon_loss"]
    # Reference: anchors are my rows (indices 3..5 of the full batch).
    z = F.normalize(torch.cat([other, mine]).double(), dim=-1)
    groups = torch.cat([og, mg])
    ref = []
    for i in range(3, 6):
        denom = sum(math.exp(float(z[i] @ z[a]) / 0.2) for a in range(6) if a != i)
        pos = [p for p in range(6) if p != i and groups[p] == groups[i]]
        ref.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / 0.2) / denom) for p in pos) / len(pos))
    assert got.item() == pytest.approx(sum(ref) / 3, rel=1e-5)


# ---- report variants -----------------------------------------------------------------------------

PHRASES = [
    ("small left pleural effusion", "sm L eff"),
    ("moderate right pneumothorax", "mod R PTX"),
    ("right lower lobe consolidation", "RLL consol"),
    ("mild pulmonary edema", "mild pulm edema"),
    ("heart size is normal", "nl heart"),
    ("endotracheal tube 4 cm above the carina", "ETT 4cm abv carina"),
]


def variant_studies(n: int = 24, seed: int = 0) -> list[Study]:
    """Hand-made studies in the synthetic generator's record shape (variants + error variants)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        idx = rng.choice(len(PHRASES), size=2, replace=False)
        full = [PHRASES[i][0] for i in idx]
        short = [PHRASES[i][1] for i in idx]
        report = f"FINDINGS: {full[0].capitalize()}. {full[1].capitalize()}.\nIMPRESSION: {full[0].capitalize()}."
        wrong = full[0].replace("left", "right") if "left" in full[0] else full[0].replace("right", "left").replace("mild", "severe")
        out.append(Study(
            study_id=f"s{k}", patient_id=f"p{k // 2}", images=[np.zeros((8, 8), np.uint8)], report=report,
            findings=f"{full[0]}. {full[1]}.", impression=f"{full[0]}.", labels=np.full(NUM_LABELS, np.nan, np.float32),
            split=("train", "val", "train", "test")[(k // 2) % 4], source="handmade",  # by patient
            extras={
                "variants": [
                    {"style": "structured", "text": report},
                    {"style": "impression_only", "text": f"IMPRESSION: 1. {full[0]}. 2. {full[1]}."},
                    {"style": "abbreviated", "text": "; ".join(short)},
                ],
                "error_variants": [{"error": "side", "text": report.replace(full[0].capitalize(), wrong.capitalize(), 1)}],
            },
        ))
    return out


class _Reader:
    def __init__(self, studies):
        self.studies = studies

    def load(self):
        return self.studies


def test_derived_variants_and_side_swap():
    s = Study(study_id="x", patient_id="p", images=[], report="FINDINGS: Small left pleural effusion.\nIMPRESSION: Left effusion.",
              findings="Small left pleural effusion.", impression="Left effusion.",
              labels=np.full(NUM_LABELS, np.nan, np.float32), split="train", source="openi")
    vs = derived_variants(s)
    assert len(vs) == 3 and s.report not in vs
    assert vs[0].startswith("IMPRESSION: Left effusion.")
    assert "L eff" in vs[1]
    assert variant_pool(s)[0] == s.report and len(variant_pool(s)) == 4
    assert swap_first_side(s.report) == "FINDINGS: Small right pleural effusion.\nIMPRESSION: Left effusion."
    assert swap_first_side("no side here") is None
    assert swap_first_side("LEFT apex") == "RIGHT apex"


def test_variants_batch_shapes():
    studies = variant_studies(8)
    tok = train_wordpiece([s.report for s in studies] * 3, vocab_size=200)
    ds = StudyVariantsDataset(studies, variants_per_study=3, error_variants_per_study=1, train=True)
    torch.manual_seed(0)
    batch = collate_variants([ds[i] for i in range(4)], tok, max_length=32)
    assert batch["input_ids"].shape[0] == 12 and batch["group_ids"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert batch["hard_input_ids"].shape[0] == 4 and batch["hard_group_ids"].tolist() == [0, 1, 2, 3]
    assert batch["input_ids"].shape[1] <= 32
    item = ds[0]
    assert len(set(item["texts"])) == 3  # distinct variants drawn from the pool of 3 (report == structured)


# ---- stage-1 smoke: train, export, load as the stage-2 tower ----------------------------------------


def test_stage1_smoke_and_handoff(tmp_path):
    from cxr_relink.models.llm_encoder import BidirectionalLLMEncoder
    from cxr_relink.models.text_adapt import TextAdaptModule

    L.seed_everything(0)
    studies = variant_studies(24)
    dm = ReportVariantsDataModule(_Reader(studies), tokenizer={"vocab_size": 300}, batch_size=4, max_length=48,
                                  variants_per_study=2, error_variants_per_study=1, cache_dir=str(tmp_path))
    dm.setup("fit")
    tower = {"_target_": "cxr_relink.models.llm_encoder.BidirectionalLLMEncoder", "hidden_size": 32, "num_layers": 2, "num_heads": 4,
             "num_kv_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64, "pooling": "mean", "use_lora": False}
    module = TextAdaptModule(
        text_tower=tower, optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        hf_output_dir=str(tmp_path / "hf"), tokenizer=dm.tokenizer,
    )
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    for k in ("train/mntp_loss", "train/supcon_loss", "val/loss", "val/variant_acc", "val/error_disc"):
        assert k in m and torch.isfinite(m[k]), k
    # Stage 2 loads the exported directory by path, with the tokenizer saved beside it.
    from cxr_relink.datamodules.text import build_tokenizer

    tok2 = build_tokenizer(None, pretrained=str(tmp_path / "hf"))
    assert len(tok2) == len(dm.tokenizer)
    tower2 = BidirectionalLLMEncoder(tok2, pretrained=str(tmp_path / "hf")).eval()
    module.eval()
    b = tok2([s.report for s in studies[:4]], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(tower2(b["input_ids"], b["attention_mask"]),
                                   module.text_tower(b["input_ids"], b["attention_mask"]), atol=1e-5, rtol=1e-4)
    assert tower2.use_lora  # auto: LoRA on the adapted base for stage 2


def compose_stage1(tmp_path, overrides):
    """Compose configs/train.yaml as the CLI would (own helper: independent of the shared fixtures)."""
    import os
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("WANDB_MODE", "offline")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(root / "configs")):
        cfg = compose("train.yaml", overrides=[f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
                                               *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.slow
def test_stage1_hydra_smoke(tmp_path):
    """`python train.py experiment=text_adapt` on tiny settings; the HF output loads as a stage-2 tower."""
    from train import train

    from cxr_relink.models.llm_encoder import BidirectionalLLMEncoder

    tiny = ["data.reader.num_patients=40", "data.reader.image_size=32", "data.image_size=32", "data.batch_size=4",
            "data.eval_batch_size=8", "++trainer.max_epochs=1", "++trainer.limit_train_batches=3",
            "++trainer.limit_val_batches=2", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
            "model.text_tower.hidden_size=32", "model.text_tower.intermediate_size=64",
            "model.text_tower.pooler_kwargs.num_latents=8"]
    cfg = compose_stage1(tmp_path, ["experiment=text_adapt", "logger=none", *tiny])
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert "val/error_disc" in metrics and "train/mntp_loss_epoch" in metrics
    out = tmp_path / "text_tower_hf"
    assert (out / "llm_encoder.json").exists() and (out / "model.safetensors").exists()
    tower = BidirectionalLLMEncoder(objects["datamodule"].tokenizer, pretrained=str(out))
    assert tower.pooling == "latent_attention" and tower.bidirectional and tower.max_length == cfg.data.max_length
    # Stage 2 from the stage-1 output, by path (tokenizer from the same directory), then a checkpoint
    # round trip: the dual tower rebuilds from its checkpoint alone with identical report embeddings.
    from cxr_relink.models.checkpoint import load_module

    cfg2 = compose_stage1(tmp_path / "s2", ["model=llm_encoder", f"model.text_tower.pretrained={out}", "logger=none",
                                            "callbacks=none", "final_audit=false", *tiny[:5], "++trainer.max_epochs=1",
                                            "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
                                            "++trainer.enable_progress_bar=false"])
    _, objects2 = train(cfg2)
    dual = objects2["model"]
    assert dual.text_tower.use_lora and dual.text_tower.pooling == "latent_attention"
    assert len(objects2["datamodule"].tokenizer) == len(objects["datamodule"].tokenizer)
    ckpt = tmp_path / "s2.ckpt"
    objects2["trainer"].save_checkpoint(ckpt)
    rebuilt = load_module(ckpt)
    dual.eval()
    b = objects2["datamodule"].tokenizer(["small left pleural effusion", "no acute process"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_reports(b["input_ids"], b["attention_mask"]),
                                   dual.encode_reports(b["input_ids"], b["attention_mask"]), atol=1e-5, rtol=1e-4)


def test_mask_token_added_when_absent():
    from cxr_relink.models.text_adapt import TextAdaptModule

    tok = train_wordpiece(["small left pleural effusion", "no pneumothorax"] * 5, vocab_size=100)
    n = len(tok)
    tower = {"_target_": "cxr_relink.models.llm_encoder.BidirectionalLLMEncoder", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
             "num_kv_heads": 1, "intermediate_size": 32, "pooling": "mean"}
    m = TextAdaptModule(text_tower=tower, optimizer={"_target_": "torch.optim.AdamW", "_partial_": True}, mask_token="<mask>",
                        tokenizer=tok)
    assert len(tok) == n + 1 and tok.mask_token == "<mask>" and m.mask_token_id == n
    assert m.text_tower.base_model.get_input_embeddings().num_embeddings == n + 1
    assert m.text_tower.lm_head.out_features == n + 1


def test_error_disc_has_one_definition():
    """The validation metric and experiments/text_eval.py count error_disc with one function."""
    import inspect

    import experiments.text_eval as text_eval
    from cxr_relink.models.text_adapt import error_discrimination

    s_pos = torch.tensor([0.5, 0.2, 0.9])
    s_err = torch.tensor([[0.4, 0.6], [0.1, 0.2], [0.3, 0.95]])  # a tie (0.2) is not a win
    own = torch.tensor([[True, False], [True, True], [False, True]])
    assert [int(v) for v in error_discrimination(s_pos, s_err, own)] == [2, 4]  # wins: (0,0), (1,0)
    assert [int(v) for v in error_discrimination(s_pos, s_err)] == [3, 6]  # + (2,0)
    assert "error_discrimination(" in inspect.getsource(text_eval.evaluate)


# ---- stage 1 on a pretrained base with LoRA: only the adapters (and the pooler) train ----------------


@pytest.mark.parametrize("tie", [False, True])
def test_stage1_lora_trains_only_adapters_and_pooler(tmp_path, tie):
    from cxr_relink.models.poolers import build_pooler
    from cxr_relink.models.text_adapt import TextAdaptModule
    from cxr_relink.datamodules.text import build_tokenizer
    from tests.test_llm_checkpoints import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base", [s.report for s in variant_studies(8)] * 3, tie=tie)
    tok = build_tokenizer(None, pretrained=str(base))
    tower = {"_target_": "cxr_relink.models.llm_encoder.BidirectionalLLMEncoder", "pretrained": str(base), "lora_r": 4,
             "pooling": "latent_attention", "pooler_kwargs": {"num_latents": 8, "num_heads": 4}}
    n_vocab = len(tok)
    # tied: a new "<mask>" token grows the vocabulary; untied: the WordPiece [MASK] already exists
    m = TextAdaptModule(text_tower=tower, optimizer={"_target_": "torch.optim.AdamW", "_partial_": True}, tokenizer=tok,
                        mask_token="<mask>" if tie else None)
    grown = len(tok) > n_vocab
    assert grown == tie and m.text_tower.use_lora  # auto: LoRA on for a pretrained base
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    lora = {f"text_tower.backbone.base_model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
            for i in range(2) for proj in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
    ref_pooler = build_pooler("latent_attention", 64, num_latents=8, num_heads=4)
    pooler = {f"text_tower.pooler.{n}" for n, _ in ref_pooler.named_parameters()}
    assert trainable == lora | pooler  # the (untied or tied) LM head and the grown embeddings stay frozen
    assert not m.text_tower.lm_head.weight.requires_grad
    # The MNTP loss still reaches the adapters through the frozen head.
    ids = tok(["small left pleural effusion", "no acute process"], padding=True, return_tensors="pt")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    m.mntp(ids["input_ids"], ids["attention_mask"], torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "lora_" in n)
    # A checkpoint leaves out the frozen base, except embeddings whose grown rows are random (not in the base).
    keys = m.text_tower.external_state()["keys"]
    assert any("embed_tokens" in k for k in keys) != grown and ("lm_head.weight" in keys) != grown
    assert any("mlp.down_proj" in k for k in keys) and not any("lora_" in k or "pooler" in k for k in keys)


# ---- SupCon under real DDP (2 CPU processes, gloo) ---------------------------------------------------


def _supcon_ddp_worker(rank: int, world_size: int, init_file: str, inputs: str, out_dir: str) -> None:
    """One rank: a shared linear map (wrapped in DDP) embeds this rank's rows and its own hard negatives;
    SupConLoss gathers the embeddings across ranks; writes the local loss and the averaged gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)  # as DataLoader workers do: a forked child must not enter the parent's OpenMP pool
    feats, groups, hard, weight, temperature = torch.load(inputs, weights_only=True).values()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        n = feats.shape[0] // world_size
        lin = torch.nn.Linear(feats.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(weight)
        ddp = DDP(lin)
        loss = SupConLoss(temperature=float(temperature), rank=rank, world_size=world_size)(
            ddp(feats[rank * n:(rank + 1) * n]), groups[rank * n:(rank + 1) * n], ddp(hard[rank]))["supcon_loss"]
        loss.backward()  # DDP averages the parameter gradients over ranks
        torch.save({"loss": loss.detach(), "grad": lin.weight.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_supcon_real_two_process_gather_matches_single_process(tmp_path):
    import time

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    world, n, d = 2, 4, 6
    feats = torch.randn(world * n, d, generator=g)
    # every anchor has a positive; rank 0 and rank 1 share groups 1 and 2 (positives across ranks)
    groups = torch.tensor([0, 0, 1, 2, 1, 2, 3, 3])
    hard = torch.randn(world, 2, d, generator=g)  # each rank's own hard negatives
    weight = torch.randn(5, d, generator=g)
    torch.save({"feats": feats, "groups": groups, "hard": hard, "weight": weight, "t": torch.tensor(0.1)},
               tmp_path / "inputs.pt")
    # fork: the children inherit the imported torch instead of importing it again (seconds on a shared CPU)
    ctx = mp.start_processes(_supcon_ddp_worker, nprocs=world, join=False, start_method="fork",
                             args=(world, str(tmp_path / "init"), str(tmp_path / "inputs.pt"), str(tmp_path)))
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two DDP workers did not finish within 120 s")
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    # Single process, whole batch, brute force: each rank's anchors see every row plus that rank's hard negatives;
    # the DDP objective is the mean of the ranks' losses.
    w = weight.clone().requires_grad_(True)
    z = feats @ w.T
    per_rank = []
    for r in range(world):
        zr, hr = z[r * n:(r + 1) * n], hard[r] @ w.T
        zn, an, hn = F.normalize(zr, dim=-1), F.normalize(z, dim=-1), F.normalize(hr, dim=-1)
        cand = torch.cat([an, hn])
        terms = []
        for i in range(n):
            gi = r * n + i
            logits = zn[i] @ cand.T / 0.1
            keep = torch.ones(len(cand), dtype=torch.bool)
            keep[gi] = False
            log_denom = torch.logsumexp(logits[keep], 0)
            pos = [p for p in range(world * n) if p != gi and groups[p] == groups[gi]]
            terms.append(-torch.stack([logits[p] - log_denom for p in pos]).mean())
        per_rank.append(torch.stack(terms).mean())
    ref = torch.stack(per_rank).mean()
    ref.backward()
    for r in range(world):
        torch.testing.assert_close(out[r]["loss"], per_rank[r].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[r]["grad"], w.grad, rtol=1e-4, atol=1e-6)
