"""Tokenizers: trained on the cohort's training reports for tiny towers, or loaded from a local path.

A tiny text tower built from a config needs a vocabulary that fits the cohort; a real checkpoint
brings its own tokenizer. Both end up as a `PreTrainedTokenizerFast`, so the rest of the code never
cares which it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def train_wordpiece(texts: Sequence[str], vocab_size: int, lowercase: bool = True, min_frequency: int = 10) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on `texts` with HF `tokenizers` (deterministic).

    The vocabulary is learned from report text and travels in every checkpoint, so a piece must be
    seen `min_frequency` times to become a token: a rare word (e.g. a name that survived
    de-identification) is then spelled in sub-word pieces instead of being stored whole.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    norm = [normalizers.NFD(), normalizers.StripAccents()]
    if lowercase:
        norm.insert(0, normalizers.Lowercase())
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_tokenizer(
    texts: Iterable[str] | None,
    pretrained: str | None = None,
    vocab_size: int = 4096,
    lowercase: bool = True,
    min_frequency: int = 10,
    cache_dir: str | os.PathLike | None = None,
    padding_side: str = "right",
) -> PreTrainedTokenizerBase:
    """Return the tokenizer for a text tower.

    pretrained: a local directory holding a Hugging Face tokenizer (never downloaded; no remote code).
    Otherwise a WordPiece vocabulary is trained on `texts` (the training reports) and cached under
    `cache_dir`, keyed by a hash of the texts and settings, so reruns reuse it.
    """
    if pretrained:
        if not Path(pretrained).exists():
            raise FileNotFoundError(f"tokenizer path {pretrained!r} does not exist (tokenizers load from local paths only)")
        tok = AutoTokenizer.from_pretrained(pretrained, local_files_only=True, trust_remote_code=False)
        if tok.pad_token is None:
            # Decoder LLM tokenizers often ship without a pad token; EOS is the conventional stand-in.
            if tok.eos_token is None:
                raise ValueError(f"tokenizer at {pretrained!r} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        tok.padding_side = padding_side
        return tok
    if texts is None:
        raise ValueError("build_tokenizer: `texts` are required when no `pretrained` path is given")
    texts = list(texts)
    if not texts:
        raise ValueError("build_tokenizer: no training texts to train a tokenizer on")
    key = hashlib.sha256()
    key.update(json.dumps({"vocab_size": vocab_size, "lowercase": lowercase, "min_frequency": min_frequency, "v": 1}).encode())
    for t in texts:
        key.update(t.encode())
        key.update(b"\0")
    path = Path(cache_dir) / "tokenizers" / f"wordpiece-{key.hexdigest()[:16]}.json" if cache_dir else None
    if path is not None and path.exists():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), **SPECIAL_TOKENS)
    else:
        tok = train_wordpiece(texts, vocab_size=vocab_size, lowercase=lowercase, min_frequency=min_frequency)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                f.write(tok.backend_tokenizer.to_str())
            os.replace(f.name, path)
            log.info("trained a %d-token WordPiece tokenizer on %d reports -> %s", len(tok), len(texts), path)
    tok.padding_side = padding_side
    return tok


def tokenizer_to_state(tok: PreTrainedTokenizerBase) -> dict:
    """Serialise a fast tokenizer into a checkpoint-friendly dict (JSON strings only)."""
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError("only fast tokenizers can be stored in a checkpoint")
    specials = {k: getattr(tok, k) for k in SPECIAL_TOKENS if getattr(tok, k, None) is not None}
    for k in ("bos_token", "eos_token"):
        if getattr(tok, k, None) is not None:
            specials[k] = getattr(tok, k)
    return {"tokenizer_json": tok.backend_tokenizer.to_str(), "special_tokens": specials, "padding_side": tok.padding_side}


def tokenizer_from_state(state: dict) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state["tokenizer_json"]), **state["special_tokens"])
    tok.padding_side = state.get("padding_side", "right")
    return tok
