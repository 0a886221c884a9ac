"""Benchmark: the re-linkage audit, in process and end to end (`evaluate.py`), vs the bare GEMM.

    .venv/bin/python -m bench.bench_audit                     # M = 43,793 and 100,000 queries, D = 512
    .venv/bin/python -m bench.bench_audit --m 43793 --repeats 3
    .venv/bin/python -m bench.bench_audit --quick             # M = 4,000: a smoke run of every row

One run, side by side, for each M (one image per study, realistic label prevalences, 5% of the
studies sharing a report text with another; 2,000 more "train" rows for the probe). For each audit
setting (i2t only; the default `standard`, i2t + t2i; `hardneg`, + hard negatives + dedup; `all`,
+ the linear probe), ``--repeats`` times: the bare GEMM (the audit's own tile loop over the M x M
similarities, matmul and nothing else), then the in-process audit (`relinkage_audit` with the
settings of configs/audit/, kernels already compiled), then `python evaluate.py audit=...
embeddings=<npz>` as a subprocess (start-up, loading, compilation and writing included). Each ratio
is to the bare GEMM measured just before it; medians over the repeats are printed. Also: the
previous loop (full rows of ~128 MiB), a bare script end to end (start Python, import torch, load the
npz, the bare GEMM: the floor under `evaluate.py`), the fused counting kernels' start-up in a fresh
process (their on-disk cache warm, and cold), and eager vs fused counting on the first queries.

Every row prints the load average beside it (the 2-core machine is shared). The first M also
cross-checks the closed form against Monte Carlo pools and times torchmetrics' RetrievalRecall.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr_relink.audit.counting import _backend, rank_counts, tile_shape
from cxr_relink.audit.embeddings import EmbeddingSet
from cxr_relink.audit.labels import label_groups
from cxr_relink.audit.reference import monte_carlo_recall
from cxr_relink.audit.relinkage import relinkage_audit
from bench.machine import describe
from cxr_relink.configs import ROOT, audit_settings

# Rough CheXpert-like prevalences of positive (1) and uncertain (-1) mentions, per label.
POS = [0.10, 0.04, 0.12, 0.22, 0.03, 0.10, 0.05, 0.03, 0.12, 0.04, 0.20, 0.01, 0.02, 0.25]
UNC = [0.00, 0.03, 0.02, 0.02, 0.01, 0.04, 0.02, 0.05, 0.04, 0.01, 0.03, 0.00, 0.00, 0.00]

# The evaluate.py settings (configs/audit/*.yaml) and what the in-process row runs for each.
SETTINGS = {
    "i2t": (["audit=standard", "audit.relinkage.directions=[i2t]"], dict(directions=["i2t"], hardneg=False, dedup=False)),
    "standard": (["audit=standard"], dict(hardneg=False, dedup=False)),
    "hardneg": (["audit=hardneg"], dict(hardneg=True, dedup=True)),
    "all": (["audit=all"], dict(hardneg=True, dedup=True)),
}
N_TRAIN = 2000  # the probe's training rows (its max_train_samples default)


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


def with_duplicate_texts(rep: torch.Tensor, frac: float = 0.05, seed: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """Report hashes with ``frac`` of the studies copying another's text (and so its embedding)."""
    m = rep.shape[0]
    rng = np.random.default_rng(seed)
    text = np.array([f"{i:016x}" for i in range(m)])
    dup = np.flatnonzero(rng.random(m) < frac)
    src = rng.integers(0, m, dup.size)
    text[dup] = text[src]
    rep = rep.clone()
    rep[torch.as_tensor(dup)] = rep[torch.as_tensor(src)]
    return rep, text


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def bare_gemm(q: torch.Tensor, c: torch.Tensor, chunk_size=None) -> float:
    """The reference: the audit's tile loop (audit.counting.tile_shape) into one reused buffer,
    matmul and nothing else. ``chunk_size`` as rank_counts takes it."""
    rows, cols = tile_shape(chunk_size, q.shape[0], c.shape[0], q.device)
    ct = c.t()
    buf = torch.empty(rows * cols, dtype=q.dtype, device=q.device)
    s = 0.0
    for i in range(0, q.shape[0], rows):
        qi = q[i : i + rows]
        for j in range(0, c.shape[0], cols):
            w = min(cols, c.shape[0] - j)
            s += float(torch.matmul(qi, ct[:, j : j + w], out=buf[: qi.shape[0] * w].view(qi.shape[0], w))[0, 0])
    return s


def full_row_gemm(q: torch.Tensor, c: torch.Tensor) -> float:
    """The previous loop: chunks of whole rows, ~128 MiB of scores each."""
    chunk = max(1, (1 << 25) // c.shape[0])
    ct = c.t()
    buf = torch.empty(min(chunk, q.shape[0]), c.shape[0], dtype=q.dtype, device=q.device)
    s = 0.0
    for i in range(0, q.shape[0], chunk):
        s += float(torch.matmul(q[i : i + chunk], ct, out=buf[: min(chunk, q.shape[0] - i)])[0, 0])
    return s


def load() -> float:
    return os.getloadavg()[0]


# CPU seconds (user + sys) of each finished subprocess, by what it ran: on a shared machine the wall
# time of a run moves with the load, the CPU it needed much less.
CHILD_CPU: dict[str, list[float]] = {}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def compile_seconds(cold: bool) -> float:
    """Start-up of every fused counting kernel in a fresh process (torch already imported): numba's
    (CPU) or inductor's on-disk cache warm, or empty (``cold``)."""
    code = ("import time, torch\nfrom audit.counting import rank_counts\n"
            "q = torch.randn(512, 8); t = time.perf_counter()\n"  # tiles big enough to be compiled
            "rank_counts(q, q, torch.arange(512), reverse=True, fused=True, chunk_size=(256, 256))\n"
            "print(time.perf_counter() - t)")
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if cold:
            env["TORCHINDUCTOR_CACHE_DIR"] = env["NUMBA_CACHE_DIR"] = tmp
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def write_npz(path: Path, img, rep, patient, labels, text, m: int) -> None:
    split = np.array(["test"] * m + ["train"] * (img.shape[0] - m))
    np.savez(path, image_emb=img.numpy(), report_emb=rep.numpy(), study_id=np.arange(img.shape[0]),
             patient_id=patient.numpy(), labels=labels, report_text_hash=text, split=split)


def bare_script(npz: Path, m: int) -> float:
    """Wall seconds of a fresh process that imports torch, loads the npz's audited rows and runs the
    bare GEMM: what any tool must spend end to end before it counts anything."""
    rows, cols = tile_shape(None, m, m, torch.device("cpu"))
    code = ("import numpy as np, torch\n"  # bare_gemm's loop, inline: importing this module costs more
            f"z = np.load({str(npz)!r})\n"
            f"q, ct = torch.as_tensor(z['image_emb'][:{m}]), torch.as_tensor(z['report_emb'][:{m}]).t()\n"
            f"buf = torch.empty({rows}, {cols})\n"
            f"for i in range(0, {m}, {rows}):\n"
            f"    for j in range(0, {m}, {cols}):\n"
            f"        w, r = min({cols}, {m} - j), min({rows}, {m} - i)\n"
            f"        torch.matmul(q[i : i + r], ct[:, j : j + w], out=buf.view(-1)[: r * w].view(r, w))\n")
    t, c = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    CHILD_CPU.setdefault(f"bare script, M = {m:,}", []).append(_children_cpu() - c)
    return time.perf_counter() - t


def evaluate_run(name: str, npz: Path, out_dir: Path) -> tuple[float, dict]:
    args = [sys.executable, "evaluate.py", *SETTINGS[name][0], f"embeddings={npz}", f"hydra.run.dir={out_dir}"]
    t, c = time.perf_counter(), _children_cpu()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    CHILD_CPU.setdefault(f"`evaluate.py` {' '.join(SETTINGS[name][0])}, M = {int(npz.stem.split('_')[-1]):,}", []).append(
        _children_cpu() - c)
    if proc.returncode:
        raise RuntimeError(f"evaluate.py failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads((out_dir / "audit.json").read_text())


def bench_m(m: int, args, dev: torch.device, rows: list, tmp: Path) -> None:
    rel = audit_settings("relinkage")
    img_all, rep_all, patient, labels = make_data(m + N_TRAIN, args.d)
    rep_all, text = with_duplicate_texts(rep_all)
    npz = tmp / f"emb_{m}.npz"
    write_npz(npz, img_all, rep_all, patient, labels, text, m)
    img, rep = img_all[:m].to(dev), rep_all[:m].to(dev)
    es = EmbeddingSet(img, rep, torch.arange(m), patient[:m], labels[:m], list(text[:m]))
    tile = tile_shape(None, m, m, dev)

    def row(step: str, seconds: list[float], ref: list[float] | None, loads: list[float]) -> None:
        """Median seconds (and median ratio to the bare GEMM measured next to each repeat)."""
        ratio = None if ref is None else float(np.median([t / r for t, r in zip(seconds, ref)]))
        sec, ld = float(np.median(seconds)), float(np.mean(loads))
        rows.append((m, step, sec, ratio, ld))
        print(f"| {m:,} | {step} | {sec:.2f} | {'' if ratio is None else f'{ratio:.2f}'} | {ld:.1f} |", flush=True)

    def in_process(name: str):
        kw = {**{k: rel[k] for k in ("ks", "ns", "directions", "label_mapping", "ties", "n_boot", "seed")},
              **SETTINGS[name][1], "fused": True, "device": dev}
        res = relinkage_audit(es, **kw)
        if name == "all":  # + the linear probe, on the train rows, with evaluate.py's settings
            from cxr_relink.audit.probe import linear_probe

            p = audit_settings("probe")
            linear_probe(img_all[m:], labels[m:], img_all[:m], labels[:m], eval_labels=p["eval_labels"],
                         uncertain=p["uncertain"], blank=p["blank"], l2=p["l2"], max_iter=p["max_iter"],
                         test_patient=patient[:m].numpy(), n_boot=p["n_boot"], seed=p["seed"])
        return res

    # Warm-up: compile the counting kernels (a per-process cost: evaluate.py's rows include it).
    sub = es if m <= 3000 else EmbeddingSet(img[:3000], rep, torch.arange(3000), patient[:m], labels[:m], list(text[:m]))
    relinkage_audit(sub, ks=[1], ns=["full"], hardneg=True, dedup=True, n_boot=0, fused=True)
    bare_gemm(img[: tile[0]], rep)
    # Each setting: the bare GEMM, then the audit in process, then evaluate.py, repeated; every ratio
    # is to the bare GEMM measured just before it (the machine's load drifts).
    gemm: list[float] = []
    gemm_load: list[float] = []
    for name in args.settings:
        t_ref, t_in, t_ev, ld_in, ld_ev, same = [], [], [], [], [], True
        for _ in range(1 if name == "all" else args.repeats):
            t, _ = timed(lambda: bare_gemm(img, rep), dev)
            t_ref.append(t)
            gemm_load.append(load())
            t, res = timed(lambda: in_process(name), dev)
            t_in.append(t)
            ld_in.append(load())
            if not args.no_evaluate:
                t, doc = evaluate_run(name, npz, tmp / f"run_{m}_{name}_{len(t_ev)}")
                t_ev.append(t)
                ld_ev.append(load())
                same &= all(doc["relinkage"][k]["recall"] == json.loads(json.dumps(v["recall"])) for k, v in res.items())
        gemm += t_ref
        row(f"in-process audit, {name}", t_in, t_ref, ld_in)
        if t_ev:
            row(f"`evaluate.py` {' '.join(SETTINGS[name][0])} (same numbers as in process: {same})", t_ev, t_ref, ld_ev)
    row(f"bare GEMM, tiles {tile[0]:,} x {tile[1]:,} ({len(gemm)} runs: {min(gemm):.1f}-{max(gemm):.1f} s)", gemm,
        gemm, gemm_load)
    if not args.no_evaluate and dev.type == "cpu":
        t_ref = timed(lambda: bare_gemm(img, rep), dev)[0]
        row("bare script end to end: Python, import torch, load the npz, bare GEMM", [bare_script(npz, m)], [t_ref],
            [load()])
    if not args.quick:
        t_rows, _ = timed(lambda: full_row_gemm(img, rep), dev)
        row(f"previous loop: bare GEMM over full rows of {max(1, (1 << 25) // m)} queries", [t_rows],
            [float(np.median(gemm))], [load()])
    # Eager vs compiled counting (every direction) on the first queries, vs their bare GEMM.
    qe = min(args.eager_queries, m)
    hn = (label_groups(labels[:m], rel["label_mapping"]), patient[:m], patient[:qe])
    _, first, inv = np.unique(text[:m], return_index=True, return_inverse=True)
    is_first = np.zeros(m, dtype=bool)
    is_first[first] = True
    kw = dict(hardneg=hn, subset=(is_first, first[inv][:qe]), reverse=True)
    t_ge, _ = timed(lambda: bare_gemm(img[:qe], rep), dev)
    row(f"bare GEMM, first {qe:,} queries", [t_ge], None, [load()])
    for fused in (False, True):
        t, _ = timed(lambda: rank_counts(img[:qe], rep, torch.arange(qe), fused=fused, **kw), dev)
        row(f"counts, every direction, {'fused' if fused else 'eager'}, first {qe:,} queries", [t], [t_ge], [load()])


def extras(args, dev: torch.device) -> None:
    """Monte Carlo pools vs the closed form; torchmetrics' RetrievalRecall at a size it can hold."""
    rel = audit_settings("relinkage")
    ks = rel["ks"]
    m = min(args.m)
    img, rep, patient, _ = make_data(m, args.d)
    q = min(args.mc_queries, m)
    sub = EmbeddingSet(img[:q], rep, torch.arange(q), patient)
    exact = relinkage_audit(sub, ks=ks, ns=[100, 1000], directions=["i2t"], n_boot=0, normalize=False)
    ex = {(r["n"], r["k"]): r["value"] for r in exact["i2t"]["recall"]}
    t_mc, (mc, se) = timed(lambda: monte_carlo_recall(img[:q], rep, torch.arange(q), ks, [100, 1000],
                                                     n_pools=args.mc_pools, seed=0), dev)
    z = max(abs(ex[(str(n), k)] - float(mc[i, j])) / max(float(se[i, j]), 1e-12)
            for i, n in enumerate([100, 1000]) for j, k in enumerate(ks))
    print(f"\nMonte Carlo: {q} queries x {args.mc_pools} pools x N in {{100, 1000}}: {t_mc:.2f} s; "
          f"max |exact - MC| = {z:.2f} standard errors")
    try:
        from torchmetrics.retrieval import RetrievalRecall
    except ImportError:
        print("torchmetrics RetrievalRecall: not installed")
        return
    n_tm = min(args.tm_size, m)
    qi, ci = img[:n_tm], rep[:n_tm]
    t_ours, ours = timed(lambda: relinkage_audit(EmbeddingSet(qi, ci, torch.arange(n_tm), torch.arange(n_tm)),
                                                 ks=ks, ns=["full"], directions=["i2t"], n_boot=0,
                                                 normalize=False), torch.device("cpu"))

    def tm():
        sims = qi @ ci.t()
        target = torch.eye(n_tm, dtype=torch.bool)
        idx = torch.arange(n_tm).unsqueeze(1).expand(n_tm, n_tm)
        return [float(RetrievalRecall(top_k=k)(sims.flatten(), target.flatten(), indexes=idx.flatten())) for k in ks]

    t_tm, tm_vals = timed(tm, torch.device("cpu"))
    diff = max(abs(r["value"] - b) for r, b in zip(ours["i2t"]["recall"], tm_vals))
    print(f"torchmetrics RetrievalRecall, {n_tm} x {n_tm}, K in {ks}: {t_tm:.2f} s vs ours {t_ours:.2f} s; "
          f"max |difference| = {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[43793, 100000], help="queries = reports (one image per study)")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="M = 4,000, no previous-loop row (a smoke run)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--no-evaluate", action="store_true", help="skip the evaluate.py subprocess rows")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each setting (not `all`): medians reported")
    ap.add_argument("--eager-queries", type=int, default=8192, help="queries for the eager vs compiled rows")
    ap.add_argument("--mc-queries", type=int, default=500)
    ap.add_argument("--mc-pools", type=int, default=10)
    ap.add_argument("--tm-size", type=int, default=1500, help="queries = candidates for torchmetrics")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.quick:
        args.m = [4000]
    dev = torch.device(args.device)
    print(f"# bench_audit  M={args.m}  D={args.d}  device={dev}")
    print(f"# machine: {describe()}")
    print(f"# fused counting kernels ({_backend(dev)}) ready in a fresh process: {compile_seconds(cold=False):.1f} s "
          f"with their cache warm, {compile_seconds(cold=True):.1f} s cold")
    print("\n| M | step | seconds | x bare GEMM | load |\n|---:|---|---:|---:|---:|")
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.m:
            bench_m(m, args, dev, rows, Path(tmp))
    print("\n| M | step | seconds | x bare GEMM | load |\n|---:|---|---:|---:|---:|")
    for m, step, sec, ratio, ld in rows:
        print(f"| {m:,} | {step} | {sec:.2f} | {'' if ratio is None else f'{ratio:.2f}'} | {ld:.1f} |")
    if CHILD_CPU:
        print("\nCPU seconds (user + sys) of the subprocesses, median (less sensitive to the load than wall time):")
        for what, secs in CHILD_CPU.items():
            print(f"- {what}: {float(np.median(secs)):.1f} s")
    extras(args, dev)


if __name__ == "__main__":
    main()
