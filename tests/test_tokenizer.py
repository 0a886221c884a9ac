"""The trained WordPiece vocabulary: HF's algorithm, made deterministic (datamodules/text.py)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from cxr_relink.datamodules.text import SPECIAL_TOKENS, learn_wordpiece_vocab, train_wordpiece

SPECIALS = list(SPECIAL_TOKENS.values())
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force(words: dict[str, int], vocab_size: int, min_frequency: int) -> tuple[dict[str, int], int]:
    """Reference: recount every pair before each merge; most frequent first, ties by text.
    Also returns how many merges were made before the first tie at the top."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    split = {w: [w[0]] + ["##" + c for c in w[1:]] for w in words}
    for piece in sorted({c for w in words for c in w}) + sorted({p for s in split.values() for p in s[1:]}):
        vocab.setdefault(piece, len(vocab))
    untied = None
    merges = 0
    while len(vocab) < vocab_size:
        counts: dict[tuple[str, str], int] = {}
        for w, s in split.items():
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + words[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < min_frequency:
            break
        if untied is None and sum(c == counts[best] for c in counts.values()) > 1:
            untied = merges
        a, b = best
        merged = a + b[2:] if b.startswith("##") else a + b
        vocab.setdefault(merged, len(vocab))
        merges += 1
        for w, s in split.items():
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            split[w] = out
    return vocab, merges if untied is None else untied


def random_words(seed: int, n: int = 40, letters: str = "abcdef", max_count: int = 1000) -> dict[str, int]:
    rng = random.Random(seed)
    words: dict[str, int] = {}
    while len(words) < n:
        words["".join(rng.choice(letters) for _ in range(rng.randint(2, 5)))] = rng.randint(1, max_count)
    return words


@pytest.mark.parametrize("seed", range(4))
def test_incremental_merges_equal_brute_force(seed):
    # Few letters and small counts: many ties, pairs shared across words, min_frequency reached.
    words = random_words(seed, n=60, letters="abcd", max_count=20)
    for vocab_size, min_frequency in ((40, 1), (200, 2), (200, 15)):
        assert learn_wordpiece_vocab(words, vocab_size, min_frequency, SPECIALS) == brute_force(words, vocab_size, min_frequency)[0]


@pytest.mark.parametrize("seed", range(3))
def test_same_vocabulary_as_hf_trainer_until_the_first_tie(seed):
    """HF's WordPieceTrainer (BPE merges) is the reference; only its tie-breaking is arbitrary, so the
    vocabularies are compared for the merges made before the first tie at the top."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = random_words(seed)
    _, untied = brute_force(words, 10_000, 1)
    assert untied >= 5, "the fixture must allow some untied merges"
    alphabet = len(SPECIALS) + len({c for w in words for c in w}) + len({"##" + c for w in words for c in w[1:]})
    hf = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordPieceTrainer(vocab_size=alphabet + untied, min_frequency=1, special_tokens=SPECIALS,
                                        show_progress=False)
    hf.train_from_iterator([" ".join([w] * c) for w, c in words.items()], trainer=trainer)
    ours = learn_wordpiece_vocab(words, alphabet + untied, 1, SPECIALS)
    assert set(ours) == set(hf.get_vocab())
    assert {t: ours[t] for t in SPECIALS} == {t: hf.get_vocab()[t] for t in SPECIALS}


@pytest.mark.slow
def test_tokenizer_is_identical_across_processes():
    """HF's trainer numbered pieces in hash-map order, so two processes trained on the same reports
    gave different vocabularies (huggingface/tokenizers#1794); string hashing differs per process."""
    code = (
        "import hashlib, random, sys\n"
        "from datamodules.text import train_wordpiece\n"
        "rng = random.Random(0)\n"
        "words = ['effusion', 'pleural', 'left', 'right', 'small', 'no', 'pneumothorax', 'tube', 'tip', 'lobe']\n"
        "texts = [' '.join(rng.choice(words) for _ in range(12)) for _ in range(300)]\n"
        "tok = train_wordpiece(texts, vocab_size=120, min_frequency=2)\n"
        "print(hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest())\n"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip().splitlines()[-1])
    assert len(digests) == 1


def test_trained_tokenizer_round_trips_and_keeps_rare_words_in_pieces():
    texts = ["small left pleural effusion", "no pneumothorax", "small right pleural effusion"] * 5 + ["smithson"]
    tok = train_wordpiece(texts, vocab_size=200, min_frequency=2)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIALS] == list(range(len(SPECIALS)))
    assert "pleural" in vocab and "smithson" not in vocab  # seen once: spelled in pieces
    enc = tok("Small left pleural effusion Smithson")  # characters all seen in training
    assert tok.unk_token_id not in enc["input_ids"][1:-1]
    assert enc["input_ids"][0] == vocab["[CLS]"] and enc["input_ids"][-1] == vocab["[SEP]"]
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "small left pleural effusion smithson"
