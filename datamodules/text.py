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
    """Train a BERT-style WordPiece tokenizer on `texts`: the same texts always give the same vocabulary.

    The vocabulary is learned from report text and travels in every checkpoint, so a piece must be
    seen `min_frequency` times to become a token: a rare word (e.g. a name that survived
    de-identification) is then spelled in sub-word pieces instead of being stored whole.

    HF `tokenizers` normalises, pre-tokenises and tokenises; only the vocabulary is learned here
    (`learn_wordpiece_vocab`), because its WordPieceTrainer is not deterministic: it numbers
    continuing pieces in hash-map order and breaks ties between equally frequent merges by those
    numbers, so two processes trained on the same reports got different vocabularies (and the
    default run different numbers on a fresh clone): huggingface/tokenizers#1794, open as of 2026-12.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    norm = [normalizers.NFD(), normalizers.StripAccents()]
    if lowercase:
        norm.insert(0, normalizers.Lowercase())
    normalizer = normalizers.Sequence(norm)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    vocab = learn_wordpiece_vocab(words, vocab_size, min_frequency, list(SPECIAL_TOKENS.values()))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"], continuing_subword_prefix=PREFIX))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix=PREFIX)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


PREFIX = "##"  # WordPiece's continuing-piece prefix


def learn_wordpiece_vocab(words: dict[str, int], vocab_size: int, min_frequency: int, special_tokens: list[str]) -> dict[str, int]:
    """WordPiece vocabulary by byte-pair merges, as HF's WordPieceTrainer learns it, deterministically.

    words: pre-tokenised word -> count. Each word starts as its characters, continuing ones with the
    ``##`` prefix. Ids: the special tokens, every character (sorted), the continuing character
    pieces (sorted), then merged pieces in merge order. Each step merges the most frequent adjacent
    pair (counts weighted by the word's count), ties broken by the pair's text; merging stops at
    `vocab_size` tokens or when the best pair is seen fewer than `min_frequency` times. Pair counts
    are updated for the changed words only.
    """
    import heapq

    vocab = {t: i for i, t in enumerate(special_tokens)}
    keys = sorted(words)  # a fixed word order: everything below is independent of hashing
    split = [[w[0], *(PREFIX + c for c in w[1:])] for w in keys]
    freq = [words[w] for w in keys]
    # As HF: every character as a word-initial piece, then the continuing ones that occur.
    for piece in sorted({c for w in keys for c in w}) + sorted({p for s in split for p in s[1:]}):
        vocab.setdefault(piece, len(vocab))
    pairs: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for i, s in enumerate(split):
        for pair in zip(s, s[1:]):
            pairs[pair] = pairs.get(pair, 0) + freq[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        n, pair = heapq.heappop(heap)
        if -n != pairs.get(pair, 0):  # a stale entry: the pair's count changed since it was pushed
            continue
        if -n < min_frequency:
            break
        a, b = pair
        merged = a + b[len(PREFIX):] if b.startswith(PREFIX) else a + b
        vocab.setdefault(merged, len(vocab))
        changed: dict[tuple[str, str], int] = {}
        for i in sorted(where.pop(pair, ())):
            s, out, j = split[i], [], 0
            for p in zip(s, s[1:]):
                changed[p] = changed.get(p, 0) - freq[i]
            while j < len(s):
                if j + 1 < len(s) and s[j] == a and s[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            split[i] = out
            for p in zip(out, out[1:]):
                changed[p] = changed.get(p, 0) + freq[i]
                where.setdefault(p, set()).add(i)
        for p, delta in changed.items():
            if delta:
                pairs[p] = pairs.get(p, 0) + delta
                if pairs[p] > 0:
                    heapq.heappush(heap, (-pairs[p], p))
                else:
                    pairs.pop(p)
    return vocab


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
    key.update(json.dumps({"vocab_size": vocab_size, "lowercase": lowercase, "min_frequency": min_frequency, "v": 2}).encode())
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
