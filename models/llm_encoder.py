"""A decoder LLM (Llama, Qwen2, ... any Hugging Face decoder using transformers' mask utilities) as a
bidirectional text encoder (LLM2Vec-style), optionally LoRA-adapted.

Bidirectionality uses the mechanism transformers 5.x supports: `config.is_causal = False` set on the
config object *before* the model is built or loaded. Mask creation (`masking_utils.create_causal_mask`)
then falls back to `create_bidirectional_mask` for eager, SDPA and flex attention, and the model's
forward passes `is_causal=False` down to the SDPA kernel (`merge_with_config_defaults`), so the
no-padding shortcut (mask = None) is not silently causal either. No modeling code is copied and nothing
depends on a model's name; `bidirectional=False` keeps the causal model (the ablation).
(Passing `is_causal` to `from_pretrained` raises, and flipping only the attention modules'
`is_causal` attribute leaves eager attention causal - tests/test_llm_encoder.py checks both kernels.)

Text-tower contract (shared with models/text_towers.py): built as `Tower(tokenizer=..., **cfg)`;
`forward(input_ids, attention_mask) -> [B, output_dim]` pooled, not normalised, pre-projection;
attribute `output_dim`; `set_grad_checkpointing(enable)`.

`save_pretrained(dir)` writes a directory that `BidirectionalLLMEncoder(tokenizer, pretrained=dir)`
(and `AutoModel.from_pretrained(dir)`) loads:
    config.json, model.safetensors   base weights, WITHOUT the LoRA delta (the adapter is only valid
                                     against exactly these weights, so they travel together)
    adapter/                         PEFT LoRA adapter (when LoRA is on)
    pooler.safetensors               trainable pooler weights (latent attention)
    lm_head.safetensors              untied LM head (stage 1 / MNTP only)
    tokenizer files                  the tokenizer it was trained with (incl. an added mask token)
    llm_encoder.json                 pooling, pooler kwargs, max length, bidirectionality, LoRA settings
Loading reads llm_encoder.json so inference matches training; explicit arguments that disagree win,
with a warning.

Lightning checkpoints (models/checkpoint.py) of a module holding this tower on a `pretrained` base under
LoRA leave the base's weights out (`external_state`) and record the folder's `base_fingerprint`; loading
rebuilds the base from the folder and refuses one whose fingerprint differs.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from cxr_relink.models.poolers import build_pooler

log = logging.getLogger(__name__)

ENCODER_JSON = "llm_encoder.json"
ADAPTER_DIR = "adapter"
FORMAT_VERSION = 1
# "attention": every linear projection inside the attention blocks, found from the model's structure
# (q/k/v/o for Llama/Qwen2/Mistral, the fused qkv_proj + o_proj for Phi-3), so LLM2Vec's "LoRA on the
# attention projections" means the same thing on every architecture.
DEFAULT_LORA_TARGETS = "attention"
FINGERPRINT_FILES = ("config.json", "model.safetensors.index.json", f"{ADAPTER_DIR}/adapter_config.json")

# Built-in defaults for settings that a saved directory may override (see _resolve).
_DEFAULTS = {"pooling": "latent_attention", "pooler_kwargs": {}, "max_length": 512, "bidirectional": True}


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """None -> float32 (not the checkpoint's own dtype: Llama-3 / Qwen ship bfloat16, which CPUs and
    32-bit trainers cannot mix with the float32 pooler and heads); "auto" -> the checkpoint's dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[str(dtype)]


def attention_linear_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear children of the model's attention blocks (the modules reached as
    `self_attn` / `attention`, or whose class name ends in "Attention", as in every transformers decoder)."""
    names: set[str] = set()
    for qual, mod in model.named_modules():
        leaf = qual.rsplit(".", 1)[-1]
        if leaf in ("self_attn", "attention", "attn") or type(mod).__name__.endswith("Attention"):
            names.update(n for n, c in mod.named_children() if isinstance(c, nn.Linear))
    return sorted(names)


def resolve_lora_targets(model: nn.Module, requested: str | Sequence[str]) -> str | list[str]:
    """The LoRA target module names for this model, or a loud error.

    "attention": every linear projection of the attention blocks (q/k/v/o on Llama/Qwen2, the fused
    qkv_proj + o_proj on Phi-3). "all-linear" is passed to PEFT as is. An explicit list must match: each
    name must be the last component of some nn.Linear in the model; PEFT itself only fails when *none*
    matches, so [q_proj, k_proj, v_proj, o_proj] on Phi-3 would silently adapt o_proj alone.
    """
    if requested == "all-linear":
        return requested
    linear_leaves = {q.rsplit(".", 1)[-1] for q, m in model.named_modules() if isinstance(m, nn.Linear)}
    attention = attention_linear_names(model)
    if requested == "attention":
        if not attention:
            raise ValueError(f"{type(model).__name__}: no linear projections found in its attention blocks; "
                             "give model.text_tower.lora_target_modules explicitly")
        return attention
    if isinstance(requested, str):
        raise ValueError(f"lora_target_modules must be 'attention', 'all-linear' or a list of module names, got {requested!r}")
    missing = [t for t in requested if t not in linear_leaves]
    if missing:
        raise ValueError(
            f"LoRA targets {missing} match no linear layer of {type(model).__name__} (its attention projections "
            f"are {attention}); use lora_target_modules=attention or name existing modules")
    return list(requested)


def base_fingerprint(path: str | Path) -> dict:
    """sha256 of what a base folder contributes to a model's frozen weights: every `*.safetensors` file under
    it (recursive: shards, a stage-1 adapter, pooler and LM head), config.json, the shard index and the
    adapter's config. Returns {"algorithm", "files": {relative path: sha256}, "digest": sha256 over the
    sorted "path:sha256" lines}. Tokenizer files are not covered (checkpoints carry their tokenizer).
    Cost: one sequential read and sha256 of the weights (sha256 ran at ~0.7 GB/s on the 2-core dev CPU:
    ~25 s for 16 GB), once per process."""
    import hashlib

    from cxr_relink.models.hashing import file_sha256

    root = Path(path)
    files = sorted({p for p in root.rglob("*.safetensors")} | {root / f for f in FINGERPRINT_FILES if (root / f).exists()})
    hashes = {}
    for f in files:
        hashes[f.relative_to(root).as_posix()] = file_sha256(f, chunk=1 << 24)
    digest = hashlib.sha256("\n".join(f"{k}:{v}" for k, v in sorted(hashes.items())).encode()).hexdigest()
    return {"algorithm": "sha256", "files": hashes, "digest": digest}


class BidirectionalLLMEncoder(nn.Module):
    """Decoder LLM -> pooled text embedding.

    tokenizer: PreTrainedTokenizerFast. Tiny default: the cohort's trained tokenizer (vocabulary size,
        pad id taken from it). `pretrained=`: the tokenizer from the same local directory.
    pretrained: local directory of a Hugging Face decoder checkpoint, or one written by `save_pretrained`
        (stage 1). Loaded with `local_files_only=True`, no remote code, safetensors only.
    model_type / hidden_size / num_layers / ...: the tiny model built from a config when no
        `pretrained` is given ("llama", "qwen2", or any decoder model type with the same config keys).
    bidirectional: False = the causal ablation. None = from the saved directory, else True.
    pooling: a name from models.poolers.POOLERS (None = saved, else latent attention as in the seed).
    use_lora: PEFT LoRA on `lora_target_modules` (base weights and LM head frozen); False = full finetune;
        "auto" (default) = LoRA iff `pretrained` is given (a from-scratch tiny model trains in full).
    adapter_mode: when `pretrained` holds an adapter (stage-1 output): "merge" folds it into the base
        weights and (with use_lora) starts a fresh LoRA (LLM2Vec's recipe); "continue" trains it further.
    with_lm_head: keep the LM head (stage 1 MNTP needs it; the dual tower does not).
    dtype: weight dtype of the base. None = float32 whatever the checkpoint's dtype (a bf16 release then
        trains on a CPU and under 32-bit precision); "bfloat16" on a GPU (LoRA, pooler and heads stay
        float32; hidden states are cast to the pooler's dtype); "auto" = the checkpoint's own dtype.
    lora_target_modules: "attention" (every linear projection of the attention blocks, per architecture),
        "all-linear", or explicit names, each of which must exist (see resolve_lora_targets).
    autocast_bf16 / gradient_checkpointing: GPU switches (bf16 autocast, activation checkpointing).
    verify_attention: probe once after building that the model really is (non-)causal as asked, so a
        model family whose masks ignore `config.is_causal` fails loudly instead of silently staying causal.
    """

    def __init__(
        self,
        tokenizer,
        pretrained: str | None = None,
        bidirectional: bool | None = None,
        pooling: str | None = None,
        pooler_kwargs: dict | None = None,
        max_length: int | None = None,
        # tiny model built from a config
        model_type: str = "llama",
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int | None = 2,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 512,
        tie_word_embeddings: bool = True,
        # LoRA
        use_lora: bool | str = "auto",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: str | Sequence[str] = DEFAULT_LORA_TARGETS,
        adapter_mode: str = "merge",
        # runtime switches
        attn_implementation: str = "sdpa",
        with_lm_head: bool = False,
        autocast_bf16: bool = False,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        verify_attention: bool = True,
    ) -> None:
        super().__init__()
        if adapter_mode not in ("merge", "continue"):
            raise ValueError(f"adapter_mode must be 'merge' or 'continue', got {adapter_mode!r}")
        saved = self._read_saved(pretrained)
        self.bidirectional = bool(self._resolve("bidirectional", bidirectional, saved))
        self.pooling = self._resolve("pooling", pooling, saved)
        self.pooler_kwargs = dict(self._resolve("pooler_kwargs", pooler_kwargs, saved) or {})
        self.max_length = int(self._resolve("max_length", max_length, saved))
        if use_lora not in (True, False, "auto"):
            raise ValueError(f"use_lora must be true, false or 'auto', got {use_lora!r}")
        # auto: LoRA on a pretrained (or stage-1) base; a tiny model built from a config has random
        # weights with nothing to preserve, so it is trained in full.
        self.use_lora = bool(pretrained) if use_lora == "auto" else bool(use_lora)
        targets = lora_target_modules if isinstance(lora_target_modules, str) else list(lora_target_modules)
        self.lora_settings = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=targets)
        self.pretrained = str(pretrained) if pretrained else None
        self._fingerprint: dict | None = None
        self.autocast_bf16 = autocast_bf16
        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (datamodules.text.build_tokenizer sets one)")

        base, lm_head = self._build_base(
            tokenizer, pretrained, model_type=model_type, hidden_size=hidden_size, num_layers=num_layers,
            num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
            attn_implementation=attn_implementation, with_lm_head=with_lm_head, dtype=_as_dtype(dtype),
        )
        self.lm_head = lm_head
        if self.use_lora and lm_head is not None and not self._lm_head_is_new:
            # LLM2Vec trains only the adapters: an untied LM head (~525M parameters for Llama-3-8B) stays
            # frozen like the rest of the base. (A tied head is the frozen input embedding anyway.)
            lm_head.requires_grad_(False)
        self.backbone = self._attach_adapter(base, pretrained, saved, adapter_mode)
        self.output_dim = int(self.base_model.config.hidden_size)
        self.pooler = build_pooler(self.pooling, self.output_dim, **self.pooler_kwargs)
        if pretrained and saved is not None and (Path(pretrained) / "pooler.safetensors").exists():
            if self.pooling == saved.get("pooling") and self.pooler_kwargs == dict(saved.get("pooler_kwargs") or {}):
                from safetensors.torch import load_file

                self.pooler.load_state_dict(load_file(str(Path(pretrained) / "pooler.safetensors")))
            else:
                log.warning("pooler differs from the saved one in %s; its saved weights are not loaded", pretrained)
        if verify_attention:
            self.verify_attention()
        if gradient_checkpointing:
            self.set_grad_checkpointing(True)
        # from_pretrained returns modules in eval mode; a new tower starts in train mode like any nn.Module
        # (Lightning does not switch modes at fit start, so LoRA dropout would otherwise stay off).
        self.train()

    # ---- construction -------------------------------------------------------------------------------
    @staticmethod
    def _read_saved(pretrained: str | None) -> dict | None:
        if not pretrained:
            return None
        path = Path(pretrained)
        if not path.is_dir():
            raise FileNotFoundError(f"LLM path {pretrained!r} is not a local directory (nothing is downloaded)")
        meta = path / ENCODER_JSON
        return json.loads(meta.read_text()) if meta.exists() else None

    @staticmethod
    def _resolve(key: str, given: Any, saved: dict | None) -> Any:
        if saved is not None and key in saved:
            if given is not None and given != saved[key]:
                log.warning("llm encoder: %s=%r overrides the saved %r", key, given, saved[key])
                return given
            return saved[key]
        return _DEFAULTS[key] if given is None else given

    def _build_base(self, tokenizer, pretrained, *, model_type, hidden_size, num_layers, num_heads, num_kv_heads,
                    intermediate_size, max_position_embeddings, tie_word_embeddings, attn_implementation,
                    with_lm_head, dtype):
        if pretrained:
            config = AutoConfig.from_pretrained(pretrained, local_files_only=True, trust_remote_code=False)
        else:
            config = AutoConfig.for_model(
                model_type,
                vocab_size=len(tokenizer),
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads or num_heads,
                intermediate_size=intermediate_size or 4 * hidden_size,
                max_position_embeddings=max_position_embeddings,
                tie_word_embeddings=tie_word_embeddings,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.cls_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id,
                eos_token_id=tokenizer.sep_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id,
            )
        # The one switch that makes the decoder bidirectional (read by transformers' mask creation).
        config.is_causal = not self.bidirectional
        config.use_cache = False
        auto = AutoModelForCausalLM if with_lm_head else AutoModel
        self._lm_head_is_new = False
        self._resized = False
        if pretrained:
            # A causal-LM checkpoint loads into AutoModel (the head is dropped) and a base-model
            # checkpoint into AutoModelForCausalLM (an untied head is then new, or read from lm_head.safetensors).
            model, info = auto.from_pretrained(
                pretrained, config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                attn_implementation=attn_implementation, dtype=dtype, output_loading_info=True,
            )
            # An untied head missing from a base-model checkpoint is new (random): it must train, not freeze.
            self._lm_head_is_new = with_lm_head and not model.config.tie_word_embeddings and any(
                k.startswith("lm_head") for k in info.get("missing_keys", ()))
        else:
            model = auto.from_config(config, attn_implementation=attn_implementation,
                                     dtype=torch.float32 if dtype == "auto" else dtype)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            # e.g. a mask token added for MNTP; mean-resizing keeps new rows in the embedding distribution.
            # The new rows are random, so a checkpoint must keep these matrices (see external_state).
            model.resize_token_embeddings(len(tokenizer))
            self._resized = True
        if not with_lm_head:
            return model, None
        lm_head = model.get_output_embeddings()
        head_file = Path(pretrained) / "lm_head.safetensors" if pretrained else None
        if head_file is not None and head_file.exists() and not model.config.tie_word_embeddings:
            from safetensors.torch import load_file

            lm_head.load_state_dict(load_file(str(head_file)))
            self._lm_head_is_new = False
        # Keep the bare decoder as the backbone; the head is held separately (tied weights stay shared).
        return model.base_model, lm_head

    def _attach_adapter(self, base: nn.Module, pretrained: str | None, saved: dict | None, adapter_mode: str) -> nn.Module:
        from peft import LoraConfig, PeftModel, get_peft_model

        adapter = Path(pretrained) / ADAPTER_DIR if pretrained else None
        if adapter is not None and adapter.is_dir():
            if adapter_mode == "continue" and self.use_lora:
                return PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
            base = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        if not self.use_lora:
            return base
        self.lora_settings["target_modules"] = resolve_lora_targets(base, self.lora_settings["target_modules"])
        cfg = LoraConfig(
            r=self.lora_settings["r"],
            lora_alpha=self.lora_settings["alpha"],
            lora_dropout=self.lora_settings["dropout"],
            target_modules=self.lora_settings["target_modules"],
            bias="none",
        )
        return get_peft_model(base, cfg)

    @torch.no_grad()
    def verify_attention(self) -> None:
        """Two 4-token inputs that differ only in their last token: the first token's state must
        differ iff the model is bidirectional."""
        m = self.base_model
        was_training = m.training
        m.eval()
        device = m.get_input_embeddings().weight.device
        n = m.get_input_embeddings().num_embeddings
        ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]], device=device) % n
        h = m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
        m.train(was_training)
        sees_future = bool((h[0, 0] - h[1, 0]).abs().max() > 0)
        if sees_future != self.bidirectional:
            raise RuntimeError(
                f"{type(m).__name__} ({m.config._attn_implementation} attention) is "
                f"{'bidirectional' if sees_future else 'causal'} although bidirectional={self.bidirectional} was asked: "
                "this model family does not build its masks through transformers' masking utilities, so "
                "config.is_causal has no effect on it"
            )

    # ---- the text-tower contract ----------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The transformers decoder (LoRA layers injected when LoRA is on)."""
        from peft import PeftModel

        return self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        m = self.base_model
        if enable:
            kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs (LoRA) without hooks
            if hasattr(m, "activation_checkpointing_enable"):
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif hasattr(m, "activation_checkpointing_disable"):
            m.activation_checkpointing_disable()
        else:
            m.gradient_checkpointing_disable()

    def _autocast(self, device: torch.device):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer token states [B, L, H]. Positions count valid tokens only, so left padding does not
        shift them (padding never changes the states of the unpadded text)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        with self._autocast(input_ids.device):
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False)
        return out.last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The pooler's dtype (float32) wins over the base's (e.g. bfloat16 weights on a GPU): under
        # autocast its matmuls still run in bfloat16; without autocast, mixed dtypes would not multiply.
        param = next(self.pooler.parameters(), None)
        if param is not None:
            hidden = hidden.to(param.dtype)
        with self._autocast(hidden.device):
            pooled = self.pooler(hidden, attention_mask)
        return pooled.float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.hidden_states(input_ids, attention_mask), attention_mask)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise RuntimeError("built without an LM head (with_lm_head=False)")
        with self._autocast(hidden.device):
            return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()

    # ---- persistence ---------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "pooling": self.pooling,
            "pooler_kwargs": self.pooler_kwargs,
            "max_length": self.max_length,
            "bidirectional": self.bidirectional,
            "use_lora": self.use_lora,
            "lora": self.lora_settings if self.use_lora else None,
        }

    def _base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base weights without any LoRA delta (PEFT wraps targets as `<name>.base_layer`)."""
        sd = {}
        for k, v in self.base_model.state_dict().items():
            if "lora_" in k:
                continue
            sd[k.replace(".base_layer.", ".")] = v
        return sd

    def save_pretrained(self, path: str | Path, tokenizer=None) -> Path:
        from safetensors.torch import save_file

        from peft import PeftModel

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        base = self.base_model
        base.config.is_causal = not self.bidirectional  # recorded in config.json as well
        base.save_pretrained(str(path), state_dict=self._base_state_dict(), safe_serialization=True)
        if isinstance(self.backbone, PeftModel):
            self.backbone.save_pretrained(str(path / ADAPTER_DIR), safe_serialization=True)
        pooler_sd = {k: v.detach().contiguous().cpu() for k, v in self.pooler.state_dict().items()}
        if pooler_sd:
            save_file(pooler_sd, str(path / "pooler.safetensors"))
        if self.lm_head is not None and not base.config.tie_word_embeddings:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.lm_head.state_dict().items()},
                      str(path / "lm_head.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        (path / ENCODER_JSON).write_text(json.dumps(self.settings(), indent=2))
        return path

    # ---- checkpoints without the base (models/checkpoint.py) -----------------------------------------
    def base_fingerprint(self) -> dict | None:
        """Fingerprint of the `pretrained` folder (None for a model built from a config); computed once."""
        if not self.pretrained:
            return None
        if self._fingerprint is None:
            self._fingerprint = base_fingerprint(self.pretrained)
        return self._fingerprint

    def external_state(self) -> dict | None:
        """The state-dict keys (relative to this module) that rebuilding from `pretrained` reproduces
        exactly, with the folder's fingerprint, so a Lightning checkpoint can store only what was trained.
        None when nothing comes from a base folder: no `pretrained`, or a full finetune (use_lora=False).
        Under LoRA these are the base model's weights (with a stage-1 adapter merged in, deterministically)
        and the LM head, never the LoRA weights or the pooler, even when a later stage froze them too (DP).
        Kept as well: anything that requires grad, buffers, and the embedding / LM-head matrices when the
        vocabulary was grown (their new rows are random, not in the base) or the head was new."""
        if not self.pretrained or not self.use_lora:
            return None
        keep = set()
        if self._resized:
            keep.add(id(self.base_model.get_input_embeddings().weight))
        if self.lm_head is not None and (self._resized or self._lm_head_is_new):
            keep.add(id(self.lm_head.weight))
        from_base = {id(p) for n, p in self.named_parameters(remove_duplicate=False)
                     if n.startswith(("backbone.", "lm_head.")) and "lora_" not in n
                     and not p.requires_grad and id(p) not in keep}
        keys = [k for k, v in self.state_dict(keep_vars=True).items() if id(v) in from_base]
        if not keys:
            return None
        return {"pretrained": self.pretrained, "fingerprint": self.base_fingerprint(), "keys": keys}

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable}
