"""Benchmark: the full re-linkage audit vs the bare chunked similarity GEMM of the same shapes.

    .venv/bin/python -m bench.bench_audit            # M = 43,793 queries, D = 512 (MIMIC test-size)
    .venv/bin/python -m bench.bench_audit --quick    # M = 6,000: under a minute on 2 CPU cores

The audit = image->report counts (exact, at the K and N of configs/audit/settings/relinkage.yaml,
the settings the callbacks and evaluate.py use), hard negatives (pathology-matched populations,
realistic label prevalences), rank statistics and the bootstrap CIs over patients. Also: the Monte Carlo pool sampler (time, and agreement
with the exact value in standard errors) and torchmetrics' RetrievalRecall at a size it can
hold (it needs all Q x C scores flattened).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from audit.counting import _auto_chunk, rank_counts
from audit.embeddings import EmbeddingSet
from audit.labels import label_groups
from audit.reference import monte_carlo_recall
from audit.relinkage import relinkage_audit
from bench.machine import describe
from configs import audit_settings

# Rough CheXpert-like prevalences of positive (1) and uncertain (-1) mentions, per label.
POS = [0.10, 0.04, 0.12, 0.22, 0.03, 0.10, 0.05, 0.03, 0.12, 0.04, 0.20, 0.01, 0.02, 0.25]
UNC = [0.00, 0.03, 0.02, 0.02, 0.01, 0.04, 0.02, 0.05, 0.04, 0.01, 0.03, 0.00, 0.00, 0.00]


def make_data(m: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    rep = torch.nn.functional.normalize(img + 1.6 * torch.randn(m, d, generator=g) / d**0.5 * 8, dim=1)
    rng = np.random.default_rng(seed)
    u = rng.random((m, 14))
    pos, unc = np.array(POS), np.array(UNC)
    labels = np.where(u < pos, 1.0, np.where(u < pos + unc, -1.0, np.nan)).astype(np.float32)
    labels[:, 0] = np.where(np.isnan(labels[:, 1:]).all(1) | (labels[:, 1:] != 1).all(1), 1.0, np.nan)
    patient = torch.as_tensor(np.sort(rng.integers(0, max(1, int(m / 2.5)), m)))
    return img, rep, patient, labels


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def bare_gemm(q: torch.Tensor, c: torch.Tensor, chunk: int) -> float:
    """The reference: the same chunked GEMM as the audit, into the same reused buffer."""
    ct = c.t()
    buf = torch.empty(min(chunk, q.shape[0]), c.shape[0], dtype=q.dtype, device=q.device)
    s = 0.0
    for i in range(0, q.shape[0], chunk):
        sims = torch.matmul(q[i : i + chunk], ct, out=buf[: min(chunk, q.shape[0] - i)])
        s += float(sims[0, 0])
    return s


def main() -> None:
    settings = audit_settings("relinkage")  # the audit as the callbacks and evaluate.py run it
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=43793, help="queries = reports (one image per study)")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="M = 6,000 (under a minute on 2 cores)")
    ap.add_argument("--n-boot", type=int, default=settings["n_boot"])
    ap.add_argument("--eager-queries", type=int, default=4096, help="queries for the eager-counting comparison")
    ap.add_argument("--mc-queries", type=int, default=500)
    ap.add_argument("--mc-pools", type=int, default=10)
    ap.add_argument("--tm-size", type=int, default=1500, help="queries = candidates for torchmetrics")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    m = 6000 if args.quick else args.m
    dev = torch.device(args.device)
    ks, ns = settings["ks"], settings["ns"]

    img, rep, patient, labels = make_data(m, args.d)
    img, rep = img.to(dev), rep.to(dev)
    es = EmbeddingSet(img, rep, torch.arange(m), patient, labels)
    chunk = _auto_chunk(m)
    hn = (label_groups(labels, settings["label_mapping"]), patient, patient)

    print(f"# bench_audit  M={m:,}  D={args.d}  device={dev}  chunk={chunk} queries")
    print(f"# machine: {describe()}")
    # Compile the fused counting kernels once (a per-process cost, reported, not in the ratio).
    # Warm up on the audit's own shapes (one full chunk and a remainder chunk).
    qw = min(m, chunk + 7)
    t_compile, _ = timed(lambda: rank_counts(img[:qw], rep, torch.arange(qw), hardneg=(hn[0], patient, patient[:qw]),
                                             fused=True, chunk_size=chunk), dev)
    bare_gemm(img[:chunk], rep, chunk)  # warm-up
    t_gemm, _ = timed(lambda: bare_gemm(img, rep, chunk), dev)
    t_audit, res = timed(
        lambda: relinkage_audit(es, ks=ks, ns=ns, directions=["i2t"], hardneg=True, label_mapping=settings["label_mapping"],
                                ties=settings["ties"], n_boot=args.n_boot, seed=settings["seed"], normalize=False,
                                device=dev, fused=True),
        dev,
    )
    # Eager (unfused) counting vs fused on a subset of queries, against the GEMM of the subset.
    qe = min(args.eager_queries, m)
    t_gemm_e, _ = timed(lambda: bare_gemm(img[:qe], rep, chunk), dev)
    t_eager, eager = timed(lambda: rank_counts(img[:qe], rep, torch.arange(qe), hardneg=(hn[0], patient, patient[:qe]),
                                               fused=False, chunk_size=chunk), dev)
    t_fused, fusedc = timed(lambda: rank_counts(img[:qe], rep, torch.arange(qe), hardneg=(hn[0], patient, patient[:qe]),
                                                fused=True, chunk_size=chunk), dev)
    same = all(torch.equal(eager[k], fusedc[k]) for k in eager)
    hn_sec = res["hardneg/i2t"]
    rows = [
        (f"bare chunked GEMM, {m:,} x {m:,} x {args.d}", t_gemm, 1.0),
        (f"full audit: i2t + hardneg counts (fused), exact R@K for K {ks} x N {ns}, MRR/ranks, "
         f"{args.n_boot} bootstrap", t_audit, t_audit / t_gemm),
        (f"bare GEMM, first {qe:,} queries", t_gemm_e, 1.0),
        (f"counts i2t + hardneg, eager (unfused), first {qe:,} queries", t_eager, t_eager / t_gemm_e),
        (f"counts i2t + hardneg, fused, first {qe:,} queries", t_fused, t_fused / t_gemm_e),
    ]
    print("\n| step | seconds | x bare GEMM |\n|---|---:|---:|")
    for name, t, r in rows:
        print(f"| {name} | {t:.2f} | {r:.2f} |")
    print(f"\none-off compile + warm-up of the fused kernels (not in the ratios): {t_compile:.1f} s; fused counts == eager counts: {same}")
    print(f"hard negatives: {hn_sec['n_label_groups']} label groups, median population "
          f"{hn_sec['population_median']:.0f}, {hn_sec['n_queries_no_negatives']} queries without negatives")
    r1 = {(r['n'], r['k']): r for r in res["i2t"]["recall"]}
    print("i2t R@1: " + ", ".join(f"N={n}: {r1[(n, 1)]['value']:.4f} ({r1[(n, 1)]['x_chance']:.1f}x chance)"
                                  for n in [str(n) for n in ns] if (n, 1) in r1))
    h1 = {(r['n'], r['k']): r for r in hn_sec["recall"]}
    print("hardneg R@1: " + ", ".join(f"N={n}: {h1[(n, 1)]['value']:.4f} (eff. pool {h1[(n, 1)]['effective_pool_mean']:.0f}, "
                                      f"{h1[(n, 1)]['x_chance']:.1f}x chance)" for n in ["100", "full"] if (n, 1) in h1))

    # Monte Carlo pools on a subset of queries, vs the exact value on the same subset.
    q = min(args.mc_queries, m)
    sub = EmbeddingSet(img[:q], rep, torch.arange(q), patient)
    exact = relinkage_audit(sub, ks=ks, ns=[100, 1000], directions=["i2t"], n_boot=0, normalize=False, device=dev)
    ex = {(r["n"], r["k"]): r["value"] for r in exact["i2t"]["recall"]}
    t_mc, (mc, se) = timed(lambda: monte_carlo_recall(img[:q], rep, torch.arange(q), ks, [100, 1000],
                                                     n_pools=args.mc_pools, seed=0), dev)
    z = max(abs(ex[(str(n), k)] - float(mc[i, j])) / max(float(se[i, j]), 1e-12)
            for i, n in enumerate([100, 1000]) for j, k in enumerate(ks))
    print(f"\nMonte Carlo: {q} queries x {args.mc_pools} pools x N in {{100, 1000}}: {t_mc:.2f} s; "
          f"max |exact - MC| = {z:.2f} standard errors")

    # torchmetrics RetrievalRecall (full database) at a size it can hold.
    try:
        from torchmetrics.retrieval import RetrievalRecall
    except ImportError:
        print("torchmetrics RetrievalRecall: not installed")
        return
    n_tm = min(args.tm_size, m)
    qi, ci = img[:n_tm].cpu(), rep[:n_tm].cpu()
    t_ours, ours = timed(lambda: relinkage_audit(EmbeddingSet(qi, ci, torch.arange(n_tm), torch.arange(n_tm)),
                                                 ks=ks, ns=["full"], directions=["i2t"], n_boot=0,
                                                 normalize=False), torch.device("cpu"))

    def tm():
        sims = qi @ ci.t()
        target = torch.eye(n_tm, dtype=torch.bool)
        idx = torch.arange(n_tm).unsqueeze(1).expand(n_tm, n_tm)
        vals = []
        for k in ks:
            metric = RetrievalRecall(top_k=k)
            vals.append(float(metric(sims.flatten(), target.flatten(), indexes=idx.flatten())))
        return vals

    t_tm, tm_vals = timed(tm, torch.device("cpu"))
    ours_vals = [r["value"] for r in ours["i2t"]["recall"]]
    diff = max(abs(a - b) for a, b in zip(ours_vals, tm_vals))
    print(f"torchmetrics RetrievalRecall, {n_tm} x {n_tm}, K in {ks}: {t_tm:.2f} s vs ours {t_ours:.2f} s; "
          f"max |difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
