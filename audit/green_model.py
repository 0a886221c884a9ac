"""GREEN scored by its language model (Ostmeier et al., 2024), from a local folder: the judged
counterpart of audit/report_quality.py's exact counts, for cohorts without structured truth.

The published GREEN model (e.g. StanfordAIMI/GREEN-radllama2-7b) is a 7B causal LM fine-tuned to
answer one prompt with its error analysis. It is loaded from a local path only (``local_files_only``,
no remote code, never downloaded). The prompt is the one the model was trained on, taken from the
user's installed ``green_score`` package (``green_score.utils.make_prompt``); a different prompt can
be passed (the tests pass a stand-in to a tiny random-init model). The answer is parsed for GREEN's
sections ``[Clinically Significant Errors]:`` ((a)-(f) with their counts) and ``[Matched
Findings]:``; GREEN = matched / (matched + significant errors), 0 when nothing is matched; an answer
without the significant-error section scores None (unparsable), and the share of such answers is
reported. Report texts go to the model only; nothing is logged.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from cxr_relink.audit.green_categories import ERROR_CATEGORIES, LETTERS


def _section(text: str, name: str) -> str | None:
    m = re.search(r"\[" + re.escape(name) + r"\]:\s*(.*?)(?:\n\s*\n|\Z)", text, re.DOTALL)
    return None if m is None else m.group(1)


def parse_green_response(text: str) -> dict[str, Any]:
    """Counts from one GREEN answer: {"matched", "a".."f", "green"} (green None when the answer has no
    significant-error section)."""
    sig = _section(text, "Clinically Significant Errors")
    out: dict[str, Any] = {letter: 0 for letter in LETTERS}
    matched_text = _section(text, "Matched Findings")
    m = re.match(r"\s*(\d+)\s*\.", matched_text or "")
    out["matched"] = int(m.group(1)) if m else 0
    if sig is None:
        out["green"] = None
        return out
    for letter in LETTERS:
        # "(a) <error type>: <count>. <errors>" -- the first number after the colon
        hit = re.search(r"\(" + letter + r"\)[^\n]*?:\s*(\d+)", sig)
        if hit:
            out[letter] = int(hit.group(1))
    errors = sum(out[letter] for letter in LETTERS)
    out["green"] = 0.0 if out["matched"] == 0 else out["matched"] / (out["matched"] + errors)
    return out


def installed_green_prompt() -> Callable[[str, str], str]:
    """``green_score.utils.make_prompt`` (reference, candidate) -> prompt: the prompt GREEN's model
    was trained on, from the user's installation of the ``green_score`` package."""
    try:
        from green_score.utils import make_prompt
    except ImportError as e:
        raise ImportError("GREEN's model answers the prompt it was trained on: install the `green-score` package "
                          "(it provides green_score.utils.make_prompt) or pass prompt=") from e
    return make_prompt


class GreenModel:
    """GREEN's causal LM from ``path`` (a local folder): ``score(references, candidates)`` -> one
    parsed answer per pair (greedy decoding)."""

    def __init__(self, path: str, prompt: Callable[[str, str], str] | None = None, batch_size: int = 4,
                 max_new_tokens: int = 512, max_length: int = 2048, device: str | None = None):
        import os

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"GREEN model folder {path} does not exist (it is never downloaded)")
        self.prompt = prompt or installed_green_prompt()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        self.tokenizer.padding_side = "left"  # decoder-only generation continues the prompt
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                          dtype="auto").to(self.device).eval()
        self.batch_size, self.max_new_tokens, self.max_length = batch_size, max_new_tokens, max_length

    def _inputs(self, prompts: list[str]) -> list[str]:
        if getattr(self.tokenizer, "chat_template", None):
            return [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                       add_generation_prompt=True) for p in prompts]
        return prompts

    def generate(self, prompts: Sequence[str]) -> list[str]:
        import torch

        out = []
        for s in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(self._inputs(list(prompts[s:s + self.batch_size])), return_tensors="pt",
                                 padding=True, truncation=True, max_length=self.max_length).to(self.device)
            with torch.inference_mode():
                gen = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id)
            out += self.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    def score(self, references: Sequence[str], candidates: Sequence[str]) -> list[dict[str, Any]]:
        answers = self.generate([self.prompt(r, c) for r, c in zip(references, candidates)])
        return [parse_green_response(a) for a in answers]


def green_model_section(scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate of parsed answers (one per query): mean GREEN over the parsable ones, the share
    unparsable and the mean count per category (GREEN's letters, named as the exact counter names them)."""
    ok = [s for s in scores if s["green"] is not None]
    names = {letter: [n for n, x in ERROR_CATEGORIES.items() if x == letter] for letter in LETTERS}
    return {
        "value": sum(s["green"] for s in ok) / len(ok) if ok else None,
        "n_scored": len(ok), "frac_unparsable": 1 - len(ok) / len(scores) if scores else None,
        "per_query": {"matched": sum(s["matched"] for s in ok) / len(ok) if ok else None,
                      **{f"({letter}) {'/'.join(names[letter])}": (sum(s[letter] for s in ok) / len(ok) if ok else None)
                         for letter in LETTERS}},
        "judged_by": "GREEN's language model (model-judged, not exact)",
    }
