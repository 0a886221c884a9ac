"""One table for one large GPU (≤ 8 minutes), or for a CPU at tiny sizes (under a minute):

1. Stage 2: the dual tower of `model=llm_encoder`, built through the project's own path
   (configs.compose("train.yaml", ["model=llm_encoder", "trainer=gpu" | "trainer=cpu", ...]), then
   hydra instantiate, as train.py does), its text tower a random-init Llama-architecture decoder with
   LoRA (PEFT, the config's r / alpha / targets) and gradient checkpointing
   (`model.grad_checkpointing=true`), bf16 weights and autocast on CUDA (`model.text_tower.dtype=bfloat16
   model.text_tower.autocast_bf16=true`, trainer/gpu.yaml's bf16-mixed). Trained with Lightning on
   random images and token ids (no padding) for `--warmup` untimed + `--steps` timed steps (fewer if
   `--dual-budget-s` runs out). Reports tokens/s, samples/s, MFU and HFU against the GPU's dense bf16
   peak, and peak memory.
2. The re-linkage audit (audit.relinkage.relinkage_audit: i2t + hard negatives, the settings of
   audit/settings.py) on M random unit vectors in D dimensions held on the device,
   vs the bare chunked GEMM with the same chunk (bench.bench_audit.bare_gemm), both synchronised.
3. A DP epoch (models.dp.module.DPAlignmentModule, public_negatives, ε = 3) on cached features of
   the dual tower's shapes (bench.bench_dp.features), and the same epoch without DP.

    python -m bench.gpu_check            # CUDA: the big sizes below; no CUDA: --tiny
    python -m bench.gpu_check --tiny     # under a minute on 2 CPU cores (tests/test_gpu_check.py)
    python -m bench.gpu_check --parts dual --batch 256 --peak-tflops 989

Big sizes (CUDA default): Llama hidden 2048, 18 layers, 16 heads (no GQA), intermediate 5504, vocab
32,000, sequence 256, batch 128 image-report pairs at 128². Parameters: 18 x 50.6M per layer
(4·2048² attention + 3·2048·5504 MLP) + 65.5M tied embeddings = 0.976B base decoder; + 4.7M LoRA
(r 16 on q/k/v/o) + 50.5M latent-attention pooler (trainable) = 1.031B in the text tower. (16 layers,
as first suggested, would be 0.875B.)

Model FLOPs of one step (text tower, counted analytically by `text_tower_flops`; all L positions of
every sequence, bidirectional full L x L attention; d hidden, Lyr layers, per-token matmul weights
P = Σ in·out over q, k, v, o, gate, up, down; LoRA rank r on targets T, R = Σ_T r·(in + out)):

    forward   per token  F = Lyr·(2P + 2R + 4·L·d)                      (+ pooler, per text)
    backward  per token  activation grads: Lyr·(2P + 2R + 8·L·d)  (attention: dQ, dK, dP, dV)
                         weight grads:     Lyr·2R                 (LoRA only; frozen base: none)
                         minus, in layer 0, the input grads of the q/k/v base matmuls and of their
                         LoRA A matrices (2·d·(d_q + 2·d_kv) + 2·r·3·d) when the embedding output
                         needs no gradient (not the case with checkpointing: transformers'
                         activation_checkpointing_enable() hooks enable_input_require_grads() on)
    recompute per token  Lyr·(2P + 2R + 4·L·d − 2·I·d)  (checkpointing re-runs each decoder layer;
                         torch's non-reentrant checkpoint stops once every saved tensor is back, so
                         the layer's last matmul, down_proj (I·d), is not re-run)
    pooler (latent attention, n latents, FFN width f) per text: forward
        L·2·(2d² + 2·d·f) + n·4d² + 4·L·n·d, backward 2x forward (weights and inputs all need grads)

So for LoRA on a frozen base a step costs ≈ 4·N·tokens model FLOPs (2N forward + 2N activation
grads), not the 6·N of full training; ≈ 5.5·N·tokens hardware FLOPs with the recompute. At the big
sizes (N = 0.976B base): forward 64.1, backward 68.6, recompute 47.9 TFLOP per step of 32,768 tokens
(2.00 / 2.14 / 1.50 x N per token).
MFU = (forward + backward) / step time / peak (PaLM's definition: recompute not counted);
HFU = (forward + backward + recompute) / step time / peak (flash attention's own recompute of the
scores in its backward is not counted: ≈ 1% of a layer at L = 256). The image tower and both
projection heads are added from torch.utils.flop_counter on one sample (forward + backward) times the
batch; the contrastive logits (≈ 6·B²·embed FLOPs) are left out (< 0.01% at the big sizes).
tests/test_gpu_check.py checks `text_tower_flops` against torch.utils.flop_counter.FlopCounterMode on
one forward + backward of the tiny tower (LoRA with and without checkpointing, and a full finetune):
equal within a relative 1e-6.

Peak: dense bf16 tensor-core TFLOP/s looked up from the device name (H100/H200 SXM 989, A100 312,
...; `--peak-tflops` overrides). On a CPU, MFU/HFU print "n/a".
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
import warnings
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from bench.machine import describe

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. First
# substring match of torch.cuda.get_device_name() wins, so variants come before their family.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
    ("GH200", 989.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
]

BIG = dict(hidden=2048, layers=18, heads=16, kv_heads=16, intermediate=5504, vocab=32000, seq_len=256, batch=128,
           image_size=128, warmup=3, steps=20, audit_m=1_000_000, audit_d=512, dp_units=100_000, dp_batch=256)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, seq_len=32, batch=8,
            image_size=32, warmup=1, steps=3, audit_m=2_000, audit_d=512, dp_units=300, dp_batch=64)

# The rows of the table, in order (tests/test_gpu_check.py checks every one is printed).
ROWS = [
    ("dual tower", "text tower params (total / trainable)"),
    ("dual tower", "step time (s)"),
    ("dual tower", "tokens/s"),
    ("dual tower", "samples/s"),
    ("dual tower", "model TFLOP per step (fwd+bwd / +recompute)"),
    ("dual tower", "achieved TFLOP/s (model)"),
    ("dual tower", "MFU (bf16 peak)"),
    ("dual tower", "HFU (with recompute)"),
    ("dual tower", "peak memory"),
    ("audit", "bare chunked GEMM (s)"),
    ("audit", "relinkage_audit i2t + hardneg (s)"),
    ("audit", "audit / bare GEMM"),
    ("DP", "DP epoch on cached features (s)"),
    ("DP", "non-private epoch (s)"),
    ("DP", "DP / non-private"),
]


# ---- FLOPs --------------------------------------------------------------------------------------------
def text_tower_flops(tower, batch: int, seq_len: int) -> dict[str, float]:
    """Model FLOPs of one training step of a BidirectionalLLMEncoder on `batch` sequences of `seq_len`
    positions: {"forward", "backward", "recompute"} (the formula of the module docstring). Which
    weights and inputs need gradients is read from the module (LoRA or full finetune)."""
    cfg = tower.base_model.config
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or d // nh
    inter = cfg.intermediate_size
    shapes = {"q_proj": (d, nh * hd), "k_proj": (d, nkv * hd), "v_proj": (d, nkv * hd), "o_proj": (nh * hd, d),
              "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    r = tower.lora_settings["r"] if tower.use_lora else 0
    targets = set(tower.lora_settings["target_modules"]) if tower.use_lora else set()
    named = list(tower.base_model.named_parameters())
    base_trained = any(p.requires_grad for n, p in named if "q_proj" in n and "lora_" not in n)
    # Does the embedding output carry a gradient? Yes when the embedding is trained, and also when
    # transformers' activation_checkpointing_enable() has hooked enable_input_require_grads() onto it.
    emb = tower.base_model.get_input_embeddings()
    with torch.enable_grad():
        emb_grad = bool(emb(torch.zeros(1, 1, dtype=torch.long, device=emb.weight.device)).requires_grad)
    bm = tower.base_model
    checkpointed = bool(getattr(bm, "is_activation_checkpointing" if hasattr(bm, "is_activation_checkpointing")
                                else "is_gradient_checkpointing", False))
    # torch's non-reentrant checkpoint stops recomputing once every saved tensor is back: the last
    # matmul of a layer (down_proj, or its LoRA B) saves its inputs before it runs, so it is not re-run.
    last = 2 * r * shapes["down_proj"][1] if "down_proj" in targets else 2 * shapes["down_proj"][0] * shapes["down_proj"][1]
    L, tokens = seq_len, batch * seq_len

    fwd = bwd = rec = 0.0
    for layer in range(n_layers):
        f_layer = 0.0
        needs = {}  # does the output of q/k/v need a gradient
        for name, (i, o) in shapes.items():
            lora = name in targets
            f_layer += 2 * i * o + (2 * r * (i + o) if lora else 0)
            # input of q/k/v in layer 0 = RMSNorm(embedding): no grad unless the embedding is trained
            in_grad = not (layer == 0 and name in ("q_proj", "k_proj", "v_proj") and not emb_grad)
            needs[name] = in_grad or base_trained or lora
            bwd_m = 0.0
            if in_grad:
                bwd_m += 2 * i * o + (2 * r * i if lora else 0)  # dX through the base weight and LoRA A
            if lora:
                bwd_m += 2 * r * o + 2 * r * (i + o)  # dX of LoRA B (A's output) + dA, dB
            if base_trained:
                bwd_m += 2 * i * o
            bwd += tokens * bwd_m
        att = 2 * L * nh * hd  # per token: QK^T, and again for P·V
        f_layer += 2 * att
        qk = needs["q_proj"] or needs["k_proj"]
        bwd += tokens * att * (needs["q_proj"] + needs["k_proj"] + qk + needs["v_proj"])  # dQ, dK, dP, dV
        fwd += tokens * f_layer
        rec += tokens * (f_layer - last) if checkpointed else 0.0
    # the latent-attention pooler (trainable; every input and weight needs a gradient)
    pooler = tower.pooler
    if hasattr(pooler, "latents"):
        n_lat = pooler.latents.shape[0]
        f = pooler.ffn[1].out_features
        pf = L * 2 * (2 * d * d + 2 * d * f) + n_lat * 4 * d * d + 4 * L * n_lat * d
        fwd += batch * pf
        bwd += batch * 2 * pf
    return {"forward": fwd, "backward": bwd, "recompute": rec}


def other_flops_per_sample(module, image_size: int, channels: int) -> float:
    """Image tower + both projection heads, forward + backward, one sample (counted, not modelled)."""
    from torch.utils.flop_counter import FlopCounterMode

    img = torch.randn(1, channels, image_size, image_size)
    feat = torch.randn(1, module.text_tower.output_dim, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        (module.image_head(module.image_tower(img)).sum() + module.text_head(feat).sum()).backward()
    module.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def peak_bf16_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# ---- part 1: the stage-2 dual tower -------------------------------------------------------------------
def synthetic_tokenizer(vocab: int):
    """A word-level tokenizer of exactly `vocab` entries with the project's special tokens (the tower
    is sized by it; the benchmark feeds random ids, so no text is ever tokenized)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cxr_relink.datamodules.text import SPECIAL_TOKENS

    words = list(SPECIAL_TOKENS.values())
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def compose_dual_tower(s: SimpleNamespace, cuda: bool):
    """train.yaml with model=llm_encoder, shrunk or grown to the benchmark's sizes, as the CLI would."""
    from cxr_relink.configs import compose

    overrides = [
        "model=llm_encoder", f"trainer={'gpu' if cuda else 'cpu'}",
        f"data.image_size={s.image_size}", f"data.max_length={s.seq_len}",
        f"model.text_tower.hidden_size={s.hidden}", f"model.text_tower.num_layers={s.layers}",
        f"model.text_tower.num_heads={s.heads}", f"model.text_tower.num_kv_heads={s.kv_heads}",
        f"model.text_tower.intermediate_size={s.intermediate}",
        f"model.text_tower.max_position_embeddings={max(512, s.seq_len)}",
        "model.text_tower.use_lora=true", f"model.grad_checkpointing={str(s.grad_checkpointing).lower()}",
    ]
    if cuda:
        overrides += ["model.text_tower.dtype=bfloat16", "model.text_tower.autocast_bf16=true"]
    return compose("train.yaml", overrides)


class RandomPairs(torch.utils.data.Dataset):
    """`n` image-report pairs cycling over one batch of random images and token ids (all valid)."""

    def __init__(self, n: int, batch: int, seq_len: int, vocab: int, image_size: int, channels: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, channels, image_size, image_size, generator=g)
        self.ids = torch.randint(5, vocab, (batch, seq_len), generator=g)
        self.n, self.batch = n, batch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = i % self.batch
        return {"image": self.images[j], "input_ids": self.ids[j], "attention_mask": torch.ones_like(self.ids[j]),
                "study_idx": torch.tensor(i)}


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def dual_tower_part(s: SimpleNamespace, cuda: bool, peak_tflops: float | None) -> dict[str, Any]:
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    L.seed_everything(0, verbose=False)
    cfg = compose_dual_tower(s, cuda)
    tok = synthetic_tokenizer(s.vocab)
    t0 = time.perf_counter()
    module = instantiate(cfg.model, tokenizer=tok)
    build_s = time.perf_counter() - t0
    counts = module.text_tower.parameter_counts()
    channels = int(cfg.data.image_channels)
    flops = text_tower_flops(module.text_tower, s.batch, s.seq_len)
    other = other_flops_per_sample(module, s.image_size, channels) * s.batch
    model_flops = flops["forward"] + flops["backward"] + other
    hw_flops = model_flops + flops["recompute"]

    class StepTimer(L.Callback):
        """Times steps warmup .. warmup+steps-1; stops early when the part's budget runs out."""

        def __init__(self) -> None:
            self.t0 = self.t1 = None
            self.timed = 0
            self.start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == s.warmup:
                _sync(cuda)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx < s.warmup:
                return
            _sync(cuda)
            self.t1 = time.perf_counter()
            self.timed = batch_idx - s.warmup + 1
            if self.t1 - self.start > s.dual_budget_s and self.timed >= 1:
                trainer.should_stop = True

    timer = StepTimer()
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=False)
    n_batches = s.warmup + s.steps
    tmp = tempfile.TemporaryDirectory(prefix="gpu_check_")
    tcfg.update(default_root_dir=tmp.name, max_epochs=1, max_steps=n_batches, limit_train_batches=n_batches,
                limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False)
    trainer = instantiate(OmegaConf.create(tcfg), callbacks=[timer], logger=False)
    data = torch.utils.data.DataLoader(
        RandomPairs(n_batches * s.batch, s.batch, s.seq_len, len(tok), s.image_size, channels),
        batch_size=s.batch, shuffle=False, num_workers=0, drop_last=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tmp:
        trainer.fit(module, train_dataloaders=data)
    if timer.t0 is None or not timer.timed:
        raise RuntimeError("the dual tower trained no timed step")
    step_s = (timer.t1 - timer.t0) / timer.timed
    if cuda:
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (max allocated)"
    else:
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak RSS of the process)"
    mfu = hfu = "n/a"
    if cuda and peak_tflops:
        mfu = f"{100 * model_flops / step_s / (peak_tflops * 1e12):.1f}% of {peak_tflops:.0f} TFLOP/s"
        hfu = f"{100 * hw_flops / step_s / (peak_tflops * 1e12):.1f}%"
    elif cuda:
        mfu = hfu = "n/a (unknown GPU: pass --peak-tflops)"
    rows = {
        "text tower params (total / trainable)": f"{counts['total']:,} / {counts['trainable']:,}",
        "step time (s)": f"{step_s:.3f} (mean of {timer.timed} after {s.warmup} warm-up)",
        "tokens/s": f"{s.batch * s.seq_len / step_s:,.0f}",
        "samples/s": f"{s.batch / step_s:,.1f}",
        "model TFLOP per step (fwd+bwd / +recompute)": f"{model_flops / 1e12:.4g} / {hw_flops / 1e12:.4g}",
        "achieved TFLOP/s (model)": f"{model_flops / step_s / 1e12:.4g}",
        "MFU (bf16 peak)": mfu,
        "HFU (with recompute)": hfu,
        "peak memory": mem,
    }
    note = (f"dual tower: Llama d={s.hidden} x {s.layers} layers, {s.heads} heads / {s.kv_heads} kv, "
            f"intermediate {s.intermediate}, vocab {len(tok):,}, LoRA r={module.text_tower.lora_settings['r']} on "
            f"{','.join(module.text_tower.lora_settings['target_modules'])}, grad checkpointing "
            f"{'on' if s.grad_checkpointing else 'off'}, {'bf16 weights + autocast, ' if cuda else 'fp32, '}"
            f"trainer precision {tcfg.get('precision')}; batch {s.batch} pairs x {s.seq_len} tokens + "
            f"{channels}x{s.image_size}² images; built in {build_s:.1f} s")
    return {"rows": rows, "note": note, "flops": flops, "other_flops": other, "step_s": step_s,
            "image_dim": module.image_tower.output_dim, "text_dim": module.text_tower.output_dim,
            "embed_dim": int(cfg.model.embed_dim)}


# ---- part 2: the re-linkage audit vs the bare GEMM ----------------------------------------------------
def audit_part(m: int, d: int, device: torch.device, chunk: int | None) -> dict[str, Any]:
    import torch.nn.functional as F

    from cxr_relink.audit.counting import _want_fused, rank_counts, tile_shape
    from cxr_relink.audit.embeddings import EmbeddingSet
    from cxr_relink.audit.labels import label_groups
    from cxr_relink.audit.relinkage import relinkage_audit
    from bench.bench_audit import bare_gemm, make_data, timed
    from cxr_relink.configs import audit_settings

    st = audit_settings("relinkage")
    _, _, patient, labels = make_data(m, 1)  # patients and realistic labels (the vectors are drawn below)
    g = torch.Generator(device=device).manual_seed(0)
    img = F.normalize(torch.randn(m, d, device=device, generator=g), dim=1)
    rep = F.normalize(img + 1.6 * 8 / d**0.5 * torch.randn(m, d, device=device, generator=g), dim=1)  # as make_data
    chunk = chunk or tile_shape(None, m, m, device)[0]  # the audit's own tile rows on this device
    fused = _want_fused(st["fused"], m * m, device)
    groups = label_groups(labels, st["label_mapping"])
    qw = min(m, chunk + 7)  # warm-up (and compilation) on one full chunk and a remainder chunk
    t_warm, _ = timed(lambda: rank_counts(img[:qw], rep, torch.arange(qw), hardneg=(groups, patient, patient[:qw]),
                                          fused=fused, chunk_size=chunk), device)
    bare_gemm(img[:chunk], rep, chunk)
    t_gemm, _ = timed(lambda: bare_gemm(img, rep, chunk), device)
    es = EmbeddingSet(img, rep, torch.arange(m), patient, labels)
    t_audit, _ = timed(lambda: relinkage_audit(es, ks=st["ks"], ns=st["ns"], directions=["i2t"], hardneg=True,
                                               label_mapping=st["label_mapping"], ties=st["ties"], n_boot=st["n_boot"],
                                               seed=st["seed"], chunk_size=chunk, normalize=False, device=device,
                                               fused=fused), device)
    tflops = 2 * m * m * d / t_gemm / 1e12
    rows = {
        "bare chunked GEMM (s)": f"{t_gemm:.2f} ({tflops:.3g} TFLOP/s fp32)",
        "relinkage_audit i2t + hardneg (s)": f"{t_audit:.2f}",
        "audit / bare GEMM": f"{t_audit / t_gemm:.2f}x",
    }
    note = (f"audit: M = {m:,} x D = {d} on {device.type}, chunk {chunk} queries, counting "
            f"{'fused (compiled)' if fused else 'eager'}, K {st['ks']} x N {st['ns']}, {st['n_boot']} bootstrap; "
            f"warm-up/compile {t_warm:.1f} s (not in the ratio)")
    del img, rep
    return {"rows": rows, "note": note, "t_gemm": t_gemm, "t_audit": t_audit}


# ---- part 3: a DP epoch on cached features ------------------------------------------------------------
def dp_part(units: int, batch: int, image_dim: int, text_dim: int, embed_dim: int, cuda: bool, epochs: int = 2) -> dict[str, Any]:
    import lightning as L

    from bench.bench_dp import EpochTimer, features
    from cxr_relink.models.dp.features import InMemoryFeatureDataModule
    from cxr_relink.models.dp.module import DPAlignmentModule

    class SyncEpochTimer(EpochTimer):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            _sync(cuda)
            super().on_train_epoch_start(trainer, pl_module)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            _sync(cuda)
            super().on_train_epoch_end(trainer, pl_module)

    feats, pub = features(units, image_dim, text_dim)
    times = {}
    tmp = tempfile.TemporaryDirectory(prefix="gpu_check_dp_")
    for dp in (True, False):
        L.seed_everything(0, verbose=False)
        m = DPAlignmentModule(heads={"image_dim": image_dim, "text_dim": text_dim, "embed_dim": embed_dim},
                              loss={"mode": "public_negatives", "bank_size": 1024}, dp={"enabled": dp, "target_epsilon": 3.0})
        timer = SyncEpochTimer()
        trainer = L.Trainer(max_epochs=epochs, accelerator="gpu" if cuda else "cpu", devices=1, precision="32-true",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
                            default_root_dir=tmp.name)
        trainer.fit(m, datamodule=InMemoryFeatureDataModule(feats, pub, batch_size=batch))
        times[dp] = timer.times[-1]  # the last epoch: the first carries the warm-up
    tmp.cleanup()
    rows = {
        "DP epoch on cached features (s)": f"{times[True]:.3f}",
        "non-private epoch (s)": f"{times[False]:.3f}",
        "DP / non-private": f"{times[True] / times[False]:.2f}x",
    }
    note = (f"DP: {units:,} study units, expected batch {batch} (~{-(-units // batch)} steps/epoch), features "
            f"{image_dim}/{text_dim} -> {embed_dim}, public_negatives (bank 1024), eps 3, last of {epochs} epochs")
    return {"rows": rows, "note": note, "times": times}


# ---- the table ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> SimpleNamespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the default without CUDA)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--parts", default="dual,audit,dp", help="comma-separated subset of dual,audit,dp")
    for key in BIG:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"big {BIG[key]}, tiny {TINY[key]}")
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false")
    p.add_argument("--audit-chunk", type=int, default=None, help="queries per similarity chunk (default: the audit's own)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: looked up by GPU name)")
    p.add_argument("--dual-budget-s", type=float, default=150.0, help="stop timing the dual tower after this long")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = TINY if (a.tiny or device.type != "cuda") else BIG
    for key, val in preset.items():
        if getattr(a, key) is None:
            setattr(a, key, val)
    a.device, a.preset = device, "tiny" if preset is TINY else "big"
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    unknown = set(a.parts) - {"dual", "audit", "dp"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}")
    return SimpleNamespace(**vars(a))


QUIET = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
         "lightning.fabric.utilities.rank_zero", "cxr_relink.models.dp.module", "cxr_relink.models.llm_encoder")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the parts, print the table; returns the values (and the table) for tests."""
    s = parse_args(argv)
    threads = torch.get_num_threads()
    levels = {name: logging.getLogger(name).level for name in QUIET}
    try:
        if s.threads:
            torch.set_num_threads(s.threads)
        for name in QUIET:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(s)
    finally:
        torch.set_num_threads(threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _run(s: SimpleNamespace) -> dict[str, Any]:
    cuda = s.device.type == "cuda"
    gpu_name = torch.cuda.get_device_name(s.device) if cuda else None
    peak = s.peak_tflops or (peak_bf16_tflops(gpu_name) if cuda else None)
    t_start = time.perf_counter()
    results: dict[str, Any] = {"values": {}, "notes": [], "preset": s.preset}

    dims = dict(image_dim=None, text_dim=s.hidden, embed_dim=None)
    if "dual" in s.parts:
        r = dual_tower_part(s, cuda, peak)
        results["dual"] = r
        dims = dict(image_dim=r["image_dim"], text_dim=r["text_dim"], embed_dim=r["embed_dim"])
        results["notes"].append(r["note"])
        results["values"].update({("dual tower", k): v for k, v in r["rows"].items()})
        if cuda:
            torch.cuda.empty_cache()
    if "audit" in s.parts:
        r = audit_part(s.audit_m, s.audit_d, s.device, s.audit_chunk)
        results["audit"] = r
        results["notes"].append(r["note"])
        results["values"].update({("audit", k): v for k, v in r["rows"].items()})
        if cuda:
            torch.cuda.empty_cache()
    if "dp" in s.parts:
        if dims["image_dim"] is None:  # the dual tower was not built: its shapes from the config
            cfg = compose_dual_tower(s, cuda)
            dims = dict(image_dim=int(cfg.model.image_tower.widths[-1]), text_dim=s.hidden, embed_dim=int(cfg.model.embed_dim))
        r = dp_part(s.dp_units, s.dp_batch, cuda=cuda, **dims)
        results["dp"] = r
        results["notes"].append(r["note"])
        results["values"].update({("DP", k): v for k, v in r["rows"].items()})

    total = time.perf_counter() - t_start
    results["total_s"] = total
    lines = [f"machine: {describe()}",
             f"device: {gpu_name or 'cpu'}; sizes: {s.preset}; bf16 peak: "
             f"{f'{peak:.0f} TFLOP/s' if peak else 'n/a'}; total {total:.0f} s"]
    lines += [f"  {n}" for n in results["notes"]]
    lines += ["", "| part | measure | value |", "|---|---|---|"]
    for part, measure in ROWS:
        lines.append(f"| {part} | {measure} | {results['values'].get((part, measure), 'not run')} |")
    table = "\n".join(lines)
    print(table, flush=True)
    results["table"] = table
    return results


if __name__ == "__main__":
    main()
