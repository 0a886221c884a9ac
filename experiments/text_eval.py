"""Text-only evaluations of the LLM text tower on held-out synthetic studies (the text evals of Ko et al., arXiv 2509.15234).

- abbreviation retrieval R@1: each test study's abbreviation-heavy, impression-only variant (style
  "abbreviated") is the query; the structured FINDINGS/IMPRESSION texts of all test studies are the
  candidates; a hit is the query's own study ranked first (chance = 1/N).
- error discrimination: for each test study and each of its one-error variants, every other
  clinically equivalent variant of the study is an anchor; a win is sim(anchor, true report) >
  sim(anchor, one-error variant) (the error variant is rendered in the report's own style and
  phrasing, so exactly one fact differs). Chance = 0.5.

Rows: bidirectional vs causal attention x before / after stage 1 (MNTP + supervised contrastive on the
training split's variants). "Before" is the tiny model at its random initialisation (no pretrained LLM
can be downloaded here); with `--pretrained /local/llm` it is that checkpoint.

    python -m experiments.text_eval --num-patients 600 --epochs 4          # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from cxr_relink.configs import ROOT
from cxr_relink.datamodules.records import Study
from cxr_relink.datamodules.report_variants import ReportVariantsDataModule
from cxr_relink.models.text_adapt import TextAdaptModule, error_discrimination


class _Reader:
    def __init__(self, studies):
        self.studies = studies

    def load(self):
        return self.studies


def texts_by_style(st: Study) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    own_style = st.source.split("/")[-1]
    out.setdefault(own_style, []).append(st.report)
    for v in st.extras.get("variants", []):
        out.setdefault(v["style"], []).append(v["text"])
    return out


@torch.no_grad()
def embed(tower, tok, texts: list[str], max_length: int, bs: int = 128) -> torch.Tensor:
    tower.eval()
    outs = []
    for i in range(0, len(texts), bs):
        b = tok(texts[i : i + bs], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        outs.append(F.normalize(tower(b["input_ids"], b["attention_mask"]), dim=-1))
    return torch.cat(outs)


@torch.no_grad()
def evaluate(tower, tok, studies: list[Study], max_length: int) -> dict[str, float]:
    # abbreviation retrieval
    pairs = [(s["abbreviated"][0], s["structured"][0]) for s in map(texts_by_style, studies)
             if s.get("abbreviated") and s.get("structured")]
    q = embed(tower, tok, [a for a, _ in pairs], max_length)
    c = embed(tower, tok, [b for _, b in pairs], max_length)
    sim = q @ c.T
    own = sim.diagonal()
    # ties counted against the model (as the audit does)
    rank0 = ((sim > own[:, None]).sum(1) == 0) & ((sim == own[:, None]).sum(1) == 1)
    r1 = rank0.float().mean().item()
    # error discrimination
    wins = total = 0
    for st in studies:
        errs = [e["text"] for e in st.extras.get("error_variants", [])]
        anchors = [v["text"] for v in st.extras.get("variants", []) if v["text"] != st.report]
        if not errs or not anchors:
            continue
        e = embed(tower, tok, [st.report, *errs, *anchors], max_length)
        true, err, anc = e[0], e[1 : 1 + len(errs)], e[1 + len(errs) :]
        w, n = error_discrimination(anc @ true, anc @ err.T)  # positive: the study's own report
        wins, total = wins + int(w), total + int(n)
    return {"abbr_R@1": r1, "abbr_N": len(pairs), "error_disc": wins / max(total, 1), "error_pairs": total}


def tower_cfg(args, bidirectional: bool) -> dict:
    cfg = {"_target_": "cxr_relink.models.llm_encoder.BidirectionalLLMEncoder", "bidirectional": bidirectional,
           "pooling": args.pooling, "max_length": args.max_length, "model_type": args.model_type}
    if args.pretrained:
        cfg.update(pretrained=args.pretrained, use_lora=True)
    else:
        cfg.update(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=4, num_kv_heads=2,
                   intermediate_size=4 * args.hidden_size, pooler_kwargs={"num_latents": 64, "num_heads": 4}
                   if args.pooling == "latent_attention" else {})
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-patients", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="studies per batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--model-type", default="llama")
    p.add_argument("--pooling", default="latent_attention")
    p.add_argument("--mntp-weight", type=float, default=1.0)
    p.add_argument("--supcon-weight", type=float, default=1.0)
    p.add_argument("--pretrained", default=None, help="local HF decoder checkpoint instead of the tiny model")
    p.add_argument("--attention", default="both", choices=["both", "bidirectional", "causal"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    from cxr_relink.datamodules.synthetic import SyntheticReader

    cache = ROOT / ".cache"
    studies = SyntheticReader(num_patients=args.num_patients, seed=1234 + args.seed, image_size=32, cache_dir=str(cache)).load()
    test = [s for s in studies if s.split == "test"]
    dm = ReportVariantsDataModule(_Reader(studies), tokenizer={"pretrained": args.pretrained, "vocab_size": 4096},
                                  batch_size=args.batch_size, eval_batch_size=64, max_length=args.max_length,
                                  variants_per_study=2, error_variants_per_study=1, cache_dir=str(cache))
    dm.setup("fit")
    n_train = len(dm.studies("train"))
    print(f"cohort: {len(studies)} studies ({n_train} train, {len(test)} test) from {args.num_patients} patients; "
          f"vocab {len(dm.tokenizer)}", flush=True)

    rows = []
    modes = {"both": (True, False), "bidirectional": (True,), "causal": (False,)}[args.attention]
    losses = "+".join(n for n, w in (("MNTP", args.mntp_weight), ("SupCon", args.supcon_weight)) if w)
    for bidirectional in modes:
        L.seed_everything(args.seed, verbose=False)
        module = TextAdaptModule(
            text_tower=tower_cfg(args, bidirectional),
            optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": args.lr, "weight_decay": 0.01},
            scheduler={"_target_": "cxr_relink.models.optim.warmup_cosine", "_partial_": True, "warmup_fraction": 0.05},
            mntp_weight=args.mntp_weight, supcon_weight=args.supcon_weight, tokenizer=dm.tokenizer,
        )
        name = "bidirectional" if bidirectional else "causal"
        before = evaluate(module.text_tower, dm.tokenizer, test, args.max_length)
        rows.append({"attention": name, "stage": "before stage 1", **before, "train_s": 0.0})
        print(rows[-1], flush=True)
        module.train()
        trainer = L.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, gradient_clip_val=1.0)
        t0 = time.time()
        trainer.fit(module, datamodule=dm)
        dt = time.time() - t0
        after = evaluate(module.text_tower, dm.tokenizer, test, args.max_length)
        rows.append({"attention": name, "stage": f"after {losses} ({args.epochs} ep)", **after, "train_s": dt,
                     "final_mntp": float(trainer.callback_metrics.get("train/mntp_loss_epoch", float("nan"))),
                     "final_supcon": float(trainer.callback_metrics.get("train/supcon_loss_epoch", float("nan")))})
        print(rows[-1], flush=True)

    print()
    print(f"machine: {platform.machine()} {platform.processor() or ''} | {os.cpu_count()} cores visible, "
          f"{torch.get_num_threads()} torch threads | torch {torch.__version__} | python {platform.python_version()}")
    print(f"model: {'pretrained ' + args.pretrained if args.pretrained else f'tiny {args.model_type} h={args.hidden_size} x{args.num_layers} layers'}"
          f", pooling {args.pooling}, max_length {args.max_length}; test studies: {len(test)}")
    hdr = f"| {'attention':<13} | {'stage':<26} | {'abbr R@1':>8} | {'N':>4} | {'chance':>6} | {'error disc':>10} | {'pairs':>5} | {'train s':>7} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['attention']:<13} | {r['stage']:<26} | {r['abbr_R@1']:>8.3f} | {r['abbr_N']:>4d} | {1 / r['abbr_N']:>6.3f} | "
              f"{r['error_disc']:>10.3f} | {r['error_pairs']:>5d} | {r['train_s']:>7.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
