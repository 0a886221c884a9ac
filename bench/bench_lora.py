"""Throughput and peak memory of LoRA vs full finetuning of the LLM text tower (CPU; GPU when present).

Each configuration runs in a fresh subprocess (so peak RSS is its own): build the tower, then time
`--steps` optimisation steps (AdamW) of an in-batch InfoNCE loss between two views of random token
batches, after `--warmup` untimed steps. Memory:
- CPU: peak resident set size (ru_maxrss) of the process, and its growth during training over the
  RSS after the model was built (activations + gradients + optimizer state);
- CUDA: torch.cuda.max_memory_allocated during training.

    python -m bench.bench_lora                       # tiny default + a small (~9M) model, on CPU
    python -m bench.bench_lora --device cuda --sizes small,medium

CPU wall-clock timings on a shared machine are noisy (the table prints the load average next to them);
CPU s/step (process CPU time, all threads) is the steadier figure there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from cxr_relink.configs import ROOT

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (128, 2, 4, 2, 512, 4096),  # the CPU default of configs/model/llm_encoder.yaml
    "small": (384, 4, 6, 2, 1024, 8192),
    "medium": (1024, 8, 16, 4, 2816, 32000),  # GPU only in practice
}
MODES = {
    "full": dict(use_lora=False),
    "lora": dict(use_lora=True),
    "lora+ckpt": dict(use_lora=True, gradient_checkpointing=True),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> dict:
    import torch
    import torch.nn.functional as F

    from cxr_relink.datamodules.text import train_wordpiece
    from cxr_relink.models.llm_encoder import BidirectionalLLMEncoder

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    hidden, layers, heads, kv, inter, vocab = SIZES[args.size]
    words = [f"w{i}" for i in range(vocab)]
    tok = train_wordpiece([" ".join(words[i : i + 50]) for i in range(0, vocab, 50)] * 2, vocab_size=vocab)
    mode = dict(MODES[args.mode])
    enc = BidirectionalLLMEncoder(
        tok, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, intermediate_size=inter,
        pooling="mean", lora_r=16, lora_alpha=32, attn_implementation="sdpa",
        autocast_bf16=args.device == "cuda", **mode,
    ).to(args.device)
    # (full finetuning of a tiny model trains everything; LoRA on it freezes the base, as it would a real LLM)
    enc.train()
    counts = enc.parameter_counts()
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-4)
    n_vocab = len(tok)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, n_vocab, (args.batch, args.seq_len), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    mask[: args.batch // 2, args.seq_len * 3 // 4 :] = 0  # some padding, as real batches have

    def step():
        a = F.normalize(enc(ids, mask), dim=-1)
        b = F.normalize(enc(ids.flip(1), mask.flip(1)), dim=-1)
        loss = F.cross_entropy(a @ b.T / 0.05, torch.arange(len(a), device=a.device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    base_rss = rss_mb()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {
        "size": args.size, "mode": args.mode, "params_total": counts["total"], "params_trainable": counts["trainable"],
        "steps_per_s": args.steps / dt, "cpu_s_per_step": cpu / args.steps, "texts_per_s": 2 * args.batch * args.steps / dt,
        "peak_rss_mb": peak_rss, "train_rss_growth_mb": peak_rss - base_rss, "load1": os.getloadavg()[0],
    }
    if args.device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--modes", default="full,lora,lora+ckpt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return

    rows = []
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            cmd = [sys.executable, "-m", "bench.bench_lora", "--child", "--size", size, "--mode", mode, "--device", args.device,
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if res.returncode or not line:
                print(f"{size}/{mode} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[0][7:]))
            print(rows[-1], flush=True)

    import torch

    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else (platform.processor() or platform.machine())
    print()
    print(f"machine: {dev} | {os.cpu_count()} cores visible, {args.threads} torch threads | torch {torch.__version__} | "
          f"batch {args.batch} x2 views x {args.seq_len} tokens, AdamW, {args.steps} timed steps after {args.warmup} warm-up")
    mem = "cuda peak MB" if args.device == "cuda" else "peak RSS MB"
    hdr = (f"| {'size':<6} | {'mode':<9} | {'params':>8} | {'trainable':>9} | {'steps/s':>7} | {'texts/s':>7} | {'CPU s/step':>10} | "
           f"{mem:>12} | {'train growth MB':>15} | {'load1':>5} |")
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        m = r.get("cuda_peak_mb", r["peak_rss_mb"])
        print(f"| {r['size']:<6} | {r['mode']:<9} | {r['params_total'] / 1e6:>7.2f}M | {r['params_trainable'] / 1e6:>8.3f}M | "
              f"{r['steps_per_s']:>7.2f} | {r['texts_per_s']:>7.1f} | {r['cpu_s_per_step']:>10.2f} | {m:>12.0f} | {r['train_rss_growth_mb']:>15.0f} | {r['load1']:>5.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
