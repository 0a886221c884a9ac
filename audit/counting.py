"""Per-query counts of the candidates that beat (or tie) the true target: every direction of the
audit counted from one tiled pass over the similarities (definitions: audit/relinkage.py)."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from cxr_relink.audit.embeddings import _as_long

TIES_POLICIES = ("pessimistic", "optimistic")

# The tile of the similarity matrix computed at a time: (query rows, candidate columns). On a CPU,
# 1,024 x 8,192 float32 = 32 MiB: the GEMM runs faster on such tiles than on full rows (the output
# stays in the last-level cache and each call packs a slice of the candidates, not all of them:
# ~90 vs ~60 GFLOP/s per core measured, docs/audit.md#speed), and the counting passes then read the
# tile from cache. A GPU wants far larger launches (8,192 x 65,536 = 2 GiB). Memory is this one tile
# whatever the audit's size: rows never shrink as the database grows.
TILE = {"cpu": (1024, 8192), "accelerator": (8192, 65536)}


def tile_shape(chunk_size: int | Sequence[int] | None, q_n: int, c_n: int, device: torch.device) -> tuple[int, int]:
    """(rows, columns) of a tile: ``chunk_size`` is the query rows, or (rows, columns); None: TILE."""
    rows, cols = TILE["cpu" if device.type == "cpu" else "accelerator"]
    if chunk_size is not None:
        if isinstance(chunk_size, (int, np.integer)):
            rows = int(chunk_size)
        else:
            rows, cols = (int(v) for v in chunk_size)
    if rows < 1 or cols < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size!r}")
    return min(rows, max(1, q_n)), min(cols, max(1, c_n))


def _count_rows(sims: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    return [(sims > t).sum(1, dtype=torch.int32), (sims == t).sum(1, dtype=torch.int32)]


# Rows summed per step of the column counts: a column's walk down the tile is a strided read the
# prefetcher cannot follow; 8 rows side by side are 8 sequential streams (3x faster, measured).
_COL_BLOCK = 8


def _count_cols(sims: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    # ``sims`` has a multiple of _COL_BLOCK rows (the padding rows are -inf: they count nothing). A
    # NaN threshold (a column nobody targets) compares false both ways: it counts nothing either.
    x = sims.view(sims.shape[0] // _COL_BLOCK, _COL_BLOCK, sims.shape[1])
    return [(x > t).sum(1, dtype=torch.int32).sum(0), (x == t).sum(1, dtype=torch.int32).sum(0)]


# Views of fewer scores are counted eagerly: there a fused kernel's call costs more than it saves.
_SMALL = 1 << 15
# Elements before every tensor the kernels read, so that no view of one starts at offset 0 or 1.
_PAD = 16


def _padded(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(_PAD + n, dtype=dtype, device=device)[_PAD:]


# The fused kernels: each reads its view of the tile once and writes no boolean intermediates (in
# eager mode every comparison and reduction is a separate pass over the tile, together 0.76x the GEMM
# at M = 43,793 on a CPU; fused, 0.04-0.10x; docs/audit.md#speed). On a CPU they are numba loops:
# compiled once and cached on disk (~1.5 s the first time, ~0.3 s to load in later processes), where
# torch.compile costs ~2.5 s per process even with inductor's cache warm and ~12 s cold. On an
# accelerator, torch.compile (its CPU path stays testable through ``_BACKEND``).
_BACKEND = {"cpu": "numba", "accelerator": "inductor"}
_NUMBA: dict[str, Any] = {}


def _numba_kernels() -> dict[str, Any]:
    if not _NUMBA:
        import numba

        @numba.njit(parallel=True, cache=True, nogil=True)
        def rows(x, t):  # x [R, W] (any strides), t [R] -> per row #(x > t), #(x == t)
            above = np.zeros(x.shape[0], np.int32)
            ties = np.zeros(x.shape[0], np.int32)
            for r in numba.prange(x.shape[0]):
                a, e, tr, row = 0, 0, t[r], x[r]
                for c in range(row.shape[0]):
                    a += row[c] > tr
                    e += row[c] == tr
                above[r], ties[r] = a, e
            return above, ties

        @numba.njit(parallel=True, cache=True, nogil=True)
        def cols(x, t):  # x [R, W], t [W] -> per column; blocks of columns, rows read in order
            w, blk = x.shape[1], 1024
            above = np.zeros(w, np.int32)
            ties = np.zeros(w, np.int32)
            for b in numba.prange((w + blk - 1) // blk):
                c0, c1 = b * blk, min(w, b * blk + blk)
                a, e, tb = above[c0:c1], ties[c0:c1], t[c0:c1]
                for r in range(x.shape[0]):
                    row = x[r, c0:c1]
                    for c in range(c1 - c0):
                        a[c] += row[c] > tb[c]
                        e[c] += row[c] == tb[c]
            return above, ties

        _NUMBA.update(rows=rows, cols=cols)
    return _NUMBA


def _numba_run(fn, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """``fn``'s counts by the numba kernel of the same name, on as many threads as torch uses."""
    import numba

    kern = _numba_kernels()["rows" if fn is _count_rows else "cols"]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return [torch.from_numpy(v) for v in kern(x.numpy(), t.reshape(-1).numpy())]


_COMPILED: dict[Any, Any] = {}


def _compiled(fn, dtype: torch.dtype, device: torch.device):
    """``fn`` compiled (torch.compile) into one loop over its input. The kernels read views of many
    sizes, strides and offsets; traced first (dynamic shapes, no duck sizing nor 0/1 specialisation,
    under ``_one_trace``) on a view of the general kind past offset 1, one graph serves them all,
    except a view of one row or column, which ``rank_counts`` counts eagerly."""
    key = (fn.__name__, dtype, device.type)
    if key not in _COMPILED:
        kern = torch.compile(fn, dynamic=True)
        x = _padded(_COL_BLOCK * 6, dtype, device).zero_().view(_COL_BLOCK, 6)
        if fn is _count_rows:  # rectangles of tiles; the column counts read whole (contiguous) tiles
            kern(x[:, 1:5], _padded(_COL_BLOCK, dtype, device).zero_().unsqueeze(1))
        else:
            kern(x, _padded(6, dtype, device).zero_().unsqueeze(0))
        _COMPILED[key] = kern
    return _COMPILED[key]


@contextlib.contextmanager
def _one_trace():
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=False, backed_size_oblivious=True):
        yield


def _backend(device: torch.device) -> str:
    return _BACKEND["cpu" if device.type == "cpu" else "accelerator"]


def _want_fused(fused: bool | str, n_elems: int, device: torch.device = torch.device("cpu")) -> bool:
    if isinstance(fused, bool):
        return fused
    env = os.environ.get("CXR_RELINK_FUSED_COUNTS")
    if env is not None:
        return env not in ("0", "false", "False", "")
    # A fused kernel costs a fixed time per process (numba: ~0.3 s to load from its cache; inductor:
    # ~3 s even with its cache warm, ~15 s cold) and saves ~0.7 GEMMs of eager counting: worth it from
    # ~8,000 x 8,000 scores on a CPU (~0.35 s of GEMM there), far later with inductor.
    return n_elems >= (1 << 26 if _backend(device) == "numba" else 1 << 28)


def _runs(ts: np.ndarray, rows: int, cols: int, whole_groups: bool) -> list[tuple[int, int]]:
    """Consecutive runs [s, e) of the target-sorted queries: at most ``rows`` queries whose targets
    span fewer than ``cols`` columns (one tile holds all of them); with ``whole_groups`` a run never
    splits the queries of one target (it grows past ``rows`` for a target with more queries)."""
    out, s, q_n = [], 0, ts.size
    while s < q_n:
        e = min(q_n, s + rows, int(np.searchsorted(ts, ts[s] + cols, "left")))
        if whole_groups and e < q_n and ts[e] == ts[e - 1]:
            g = int(np.searchsorted(ts, ts[e - 1], "left"))
            e = g if g > s else int(np.searchsorted(ts, ts[s], "right"))
        out.append((s, e))
        s = e
    return out


def _spans(c0: int, c1: int, width: int) -> list[tuple[int, int]]:
    return [(c, min(c1, c + width)) for c in range(c0, c1, width)]


def _codes(*arrays: np.ndarray) -> list[np.ndarray]:
    """Arrays of ids as shared dense codes 0..n-1."""
    _, inv = np.unique(np.concatenate(arrays), return_inverse=True)
    return np.split(inv.reshape(-1), np.cumsum([a.size for a in arrays])[:-1])


def _members(keys: np.ndarray, qkeys: np.ndarray) -> np.ndarray:
    """[Q, E] (padding -1): for each query key, the columns whose key equals it."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    lo, hi = np.searchsorted(sk, qkeys, "left"), np.searchsorted(sk, qkeys, "right")
    width = int((hi - lo).max(initial=0))
    idx = lo[:, None] + np.arange(max(width, 1))
    return np.where(idx < hi[:, None], order[idx.clip(max=max(0, sk.size - 1))], -1)


def rank_counts(
    query: torch.Tensor,
    cand: torch.Tensor,
    target: torch.Tensor,
    exclude: torch.Tensor | None = None,
    chunk_size: int | Sequence[int] | None = None,
    hardneg: tuple[Any, Any, Any] | None = None,
    subset: tuple[Any, Any] | None = None,
    reverse: bool = False,
    fused: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """Per-query counts from one tiled pass over the similarities, every score computed once.

    query [Q, D], cand [C, D], target [Q] (column of each query's target). Returns long [Q] (CPU)
    tensors: ``above`` (#candidates j != t(i) with s_ij > s_i,t(i)) and ``ties`` (#j != t(i) with
    s_ij == s_i,t(i)). The target's score is gathered from the very tile that holds it, computed
    before any other tile of its rows (the queries are taken in target order, so a tile's worth of
    them has its targets in one tile); its own column always equals it exactly, so it is removed by
    subtracting one from the equal count, never by comparing a recomputed score.

    From the same tiles, optionally:

    * ``exclude`` [Q, E] (padding -1): columns removed from the population of each query.
    * ``hardneg`` = (cand_group [C], cand_patient [C], query_patient [Q]): ``hn_above``, ``hn_ties``
      and ``hn_pop`` over the pathology-matched population {j : group[j] == group[t(i)],
      patient[j] != patient(i)} (the target is the query patient's, so outside it by construction).
    * ``subset`` = (mask [C] bool, sub_target [Q], a column in the mask): ``sub_above`` and
      ``sub_ties`` over the masked columns against the score at sub_target (excluded by index):
      the dedup variant, where identical reports collapse into their first study's column. Where
      sub_target is not the target, its score is gathered from the target tile when it lies there,
      else from a GEMM of these few columns; it is compared with the tile that holds the column.
    * ``reverse``: ``rev_above`` and ``rev_ties``, the other direction read from the same scores:
      #{j : t(j) != t(i), s_j,t(i) > s_i,t(i)} (resp. ==), i.e. query i ranked among the queries of
      other targets by its target (report->image, the study's other images removed). A target's
      column is counted against its queries' scores after the pass has gathered them: the tiles
      left of each run's targets come first, the rest after every target score is known.

    No mask is evaluated per score: the columns are taken in (subset first, label group) order and
    the queries in the same order, so a hard-negative population or the subset is a rectangle of a
    tile, counted like the full rows; the query patient's own studies are then subtracted by index.

    ``chunk_size``: query rows per tile, or (rows, columns); None: ``TILE``. ``fused``: count with
    fused kernels (numba on a CPU, torch.compile elsewhere; "auto": for large audits, or per the
    CXR_RELINK_FUSED_COUNTS environment variable); falls back to eager counting if they fail. The full Q x C matrix is never
    held.
    """
    q_n, c_n = query.shape[0], cand.shape[0]
    if query.shape[1] != cand.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} != candidate dim {cand.shape[1]}")
    target = _as_long(target, "target", q_n)
    if (target < 0).any() or (target >= c_n).any():
        raise ValueError(f"target indices must lie in [0, {c_n})")
    dev = query.device
    dtype = torch.result_type(query, cand)
    out: dict[str, torch.Tensor] = {}
    names = ["above", "ties"]

    # Column order: the subset's columns first, each part by label group (stable).
    seg = np.zeros(c_n, dtype=np.int64)
    grp = np.zeros(c_n, dtype=np.int64)
    if subset is not None:
        mask = np.asarray(subset[0], dtype=bool).reshape(-1)
        sub_t = _as_long(subset[1], "sub_target", q_n)
        if mask.size != c_n:
            raise ValueError(f"subset mask has {mask.size} entries, expected {c_n}")
        if (sub_t < 0).any() or (sub_t >= c_n).any() or not mask[sub_t.numpy()].all():
            raise ValueError("each sub_target must be a column inside the subset mask")
        seg = (~mask).astype(np.int64)
        names += ["sub_above", "sub_ties"]
    if hardneg is not None:
        cg = _as_long(hardneg[0], "cand_group", c_n)
        cp = _as_long(hardneg[1], "cand_patient", c_n)
        qp = _as_long(hardneg[2], "query_patient", q_n)
        if not torch.equal(cp[target], qp):
            raise ValueError("each query's target must belong to the query's own patient")
        grp = _codes(cg.numpy())[0]
        cp_c, qp_c = _codes(cp.numpy(), qp.numpy())
        # The population's size: the target's group less the query patient's studies in it.
        pair = grp * (int(cp_c.max(initial=0)) + 1) + cp_c  # (group, patient) of a column
        own = _members(pair, pair[target.numpy()])  # the query patient's studies in its group
        out["hn_pop"] = torch.as_tensor(np.bincount(grp)[grp[target.numpy()]] - (own >= 0).sum(1))
        names += ["hn_above", "hn_ties"]
    perm = np.lexsort((np.arange(c_n), grp, seg))  # new column -> old column
    pos = np.empty(c_n, dtype=np.int64)
    pos[perm] = np.arange(c_n)
    permuted = not np.array_equal(perm, np.arange(c_n))
    if permuted:
        cand = cand.index_select(0, torch.as_tensor(perm, device=dev))
    tgt_np = pos[target.numpy()]
    order_np = np.argsort(tgt_np, kind="stable")
    ts_np = tgt_np[order_np]  # sorted targets, in the new column order
    order = torch.as_tensor(order_np)
    order_d, ts_d = order.to(dev), torch.as_tensor(ts_np).to(dev)
    if not np.array_equal(order_np, np.arange(q_n)):
        query = query.index_select(0, order_d)
    rows, cols = tile_shape(chunk_size, q_n, c_n, dev)
    runs = _runs(ts_np, rows, cols, reverse)
    n_sub = int((seg == 0).sum())  # the subset's columns are [0, n_sub); all columns without one

    def sorted_cols(x: np.ndarray) -> torch.Tensor:  # column indices (-1 kept) per sorted query
        x = x[order_np]
        return torch.as_tensor(np.where(x >= 0, pos[x.clip(min=0)], -1)).to(dev)

    # Per sorted query, columns whose scores are subtracted after counting, by index.
    minus: list[tuple[torch.Tensor, str, str, str]] = []  # (columns [Q, E], threshold, above, ties)
    if exclude is not None:
        minus.append((sorted_cols(np.asarray(exclude.cpu()).reshape(q_n, -1)), "t", "above", "ties"))
    if hardneg is not None:
        # Blocks of columns of one (part, group): a query's population is its group's blocks (one per
        # part), and the sorted queries of one target block are contiguous.
        new_block = np.r_[True, (seg[perm][1:] != seg[perm][:-1]) | (grp[perm][1:] != grp[perm][:-1])]
        bstart = np.flatnonzero(new_block)
        bend = np.r_[bstart[1:], c_n]
        bgroup = grp[perm][bstart]
        q_blk = (np.cumsum(new_block) - 1)[ts_np]
        others = np.where(own == target.numpy()[:, None], -1, own)  # the patient's other studies there
        minus.append((sorted_cols(others), "t", "hn_above", "hn_ties"))
    if subset is not None:
        sub_s = torch.as_tensor(pos[sub_t.numpy()][order_np]).to(dev)
        d_s = _padded(q_n, dtype, dev)
        s1 = int(np.searchsorted(ts_np, n_sub))  # queries from s1 on have their target outside
        # the subset: their sub-target's score is another column's, subtracted where counted
        minus.append((torch.where(torch.arange(q_n, device=dev) >= s1, sub_s, -1).unsqueeze(1), "d",
                      "sub_above", "sub_ties"))
    acc = {k: torch.zeros(q_n, dtype=torch.long, device=dev) for k in names}
    t_s = _padded(q_n, dtype, dev)  # each query's target score, in target order
    if reverse:
        first = np.ones(q_n, dtype=bool)  # the first query of each target
        first[1:] = ts_np[1:] != ts_np[:-1]
        first_d = torch.as_tensor(first).to(dev)
        x_pos = np.flatnonzero(~first)  # a target's further queries: their columns are gathered
        x_col = ts_np[x_pos]
        x_pos_d, x_col_d = torch.as_tensor(x_pos).to(dev), torch.as_tensor(x_col).to(dev)
        col_thr = _padded(c_n, dtype, dev).fill_(float("nan"))
        col_acc = torch.zeros(2, c_n, dtype=torch.long, device=dev)
        rev_x = torch.zeros(2, q_n, dtype=torch.long, device=dev)

    use_fused = _want_fused(fused, q_n * c_n, dev)
    backend = _backend(dev)
    if backend == "numba" and dtype not in (torch.float32, torch.float64):
        use_fused = False  # numba reads numpy arrays: no bfloat16
    kern: dict[Any, Any] = {}

    def run(fn, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        nonlocal use_fused
        if not use_fused or min(x.shape) < 2 or x.numel() < _SMALL:
            return fn(x, t)
        try:
            if backend == "numba":
                return _numba_run(fn, x, t)
            if fn not in kern:
                kern[fn] = _compiled(fn, dtype, dev)
            return kern[fn](x, t)
        except Exception as err:  # no numba / no compiler, ...: eager counting is exact too
            warnings.warn(f"fused counting unavailable ({type(err).__name__}: {err}); using eager counting")
            use_fused = False
            return fn(x, t)

    def add_rows(sims: torch.Tensor, s: int, r0: int, r1: int, a: int, b: int, thr: torch.Tensor, keys) -> list:
        """Counts of the rectangle: sorted queries [r0, r1) x the tile's columns [a, b)."""
        res = run(_count_rows, sims[r0 - s : r1 - s, a:b], thr[r0:r1].unsqueeze(1))
        for k, v in zip(keys, res):
            acc[k][r0:r1] += v
        return res

    def group_rows(s: int, e: int) -> dict[int, list[tuple[int, int]]]:
        """The run's sorted queries by the label group of their target: group -> row spans."""
        b = q_blk[s:e]
        cut = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        spans: dict[int, list[tuple[int, int]]] = {}
        for c, d in zip(cut, np.r_[cut[1:], e - s]):
            spans.setdefault(int(bgroup[b[c]]), []).append((s + int(c), s + int(d)))
        return spans

    cand_t = cand.t()
    pad_rows = -max((e - s for s, e in runs), default=0) // _COL_BLOCK * -_COL_BLOCK
    buf = _padded(pad_rows * cols, dtype, dev)

    def tile(q: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """The scores of q x columns [c0, c1), with -inf rows below up to a multiple of _COL_BLOCK."""
        b, w = q.shape[0], c1 - c0
        b8 = -b // _COL_BLOCK * -_COL_BLOCK
        torch.matmul(q, cand_t[:, c0:c1], out=buf[: b * w].view(b, w))
        buf[b * w : b8 * w].fill_(float("-inf"))
        return buf[: b8 * w].view(b8, w)

    def count(padded: torch.Tensor, s: int, e: int, c0: int, c1: int) -> None:
        w = c1 - c0
        sims = padded[: e - s]
        for a, b, in_sub in ((c0, min(c1, n_sub), True), (max(c0, n_sub), c1, False)):
            if a >= b:
                continue
            res = add_rows(sims, s, s, e, a - c0, b - c0, t_s, ("above", "ties"))
            if subset is not None and in_sub:  # the subset, against the sub-target's score
                m = min(max(s, s1), e)
                if m > s:  # target in the subset: sub-target is the target (the same counts)
                    acc["sub_above"][s:m] += res[0][: m - s]
                    acc["sub_ties"][s:m] += res[1][: m - s]
                if e > m:
                    add_rows(sims, s, m, e, a - c0, b - c0, d_s, ("sub_above", "sub_ties"))
        if hardneg is not None:  # each group's rows x that group's columns in this tile
            k0, k1 = np.searchsorted(bend, c0, "right"), np.searchsorted(bstart, c1, "left")
            for k in k0 + np.flatnonzero(np.isin(bgroup[k0:k1], run_groups)):
                for r0, r1 in spans[int(bgroup[k])]:
                    add_rows(sims, s, r0, r1, max(c0, int(bstart[k])) - c0, min(c1, int(bend[k])) - c0, t_s,
                             ("hn_above", "hn_ties"))
        for idx, thr, ka, kt in minus:
            ix = idx[s:e]
            inside = (ix >= c0) & (ix < c1)
            if bool(inside.any()):
                v = sims.gather(1, (ix - c0).clamp(0, w - 1))
                th = (t_s if thr == "t" else d_s)[s:e].unsqueeze(1)
                acc[ka][s:e] -= ((v > th) & inside).sum(1)
                acc[kt][s:e] -= ((v == th) & inside).sum(1)
        if reverse:
            ca, ce = run(_count_cols, padded, col_thr[c0:c1].unsqueeze(0))
            col_acc[0, c0:c1] += ca
            col_acc[1, c0:c1] += ce
            a, b = np.searchsorted(x_col, [c0, c1])
            if b > a:
                g = _padded(padded.shape[0] * (b - a), dtype, dev).view(padded.shape[0], b - a)
                tx = _padded(b - a, dtype, dev)
                torch.index_select(padded, 1, x_col_d[a:b] - c0, out=g)
                torch.index_select(t_s, 0, x_pos_d[a:b], out=tx)
                xa, xe = run(_count_cols, g, tx.unsqueeze(0))
                rev_x[0, x_pos_d[a:b]] += xa
                rev_x[1, x_pos_d[a:b]] += xe

    with _one_trace() if use_fused and backend == "inductor" else contextlib.nullcontext():
        later = []
        for s, e in runs:
            q = query[s:e]
            lo, hi = int(ts_np[s]), int(ts_np[e - 1]) + 1
            padded = tile(q, lo, hi)  # the run's targets: their scores first
            sims = padded[: e - s]
            t_s[s:e] = sims.gather(1, (ts_d[s:e] - lo).unsqueeze(1)).squeeze(1)
            if reverse:
                f = first_d[s:e].nonzero().flatten()
                col_thr[ts_d[s:e][f]] = t_s[s:e][f]
            if hardneg is not None:
                spans = group_rows(s, e)
                run_groups = np.fromiter(spans, dtype=np.int64)
            if subset is not None:
                st = sub_s[s:e]
                d_s[s:e] = sims.gather(1, (st - lo).clamp(0, hi - lo - 1).unsqueeze(1)).squeeze(1)
                away = ((st < lo) | (st >= hi)).nonzero().flatten()
                if away.numel():
                    ucols, at = torch.unique(st[away], return_inverse=True)
                    d_s[s + away] = (q[away] @ cand[ucols].t()).gather(1, at.unsqueeze(1)).squeeze(1)
            count(padded, s, e, lo, hi)
            for c0, c1 in _spans(0, lo, cols):
                count(tile(q, c0, c1), s, e, c0, c1)
            if reverse:  # columns right of the run hold later runs' targets: counted once all are known
                later.append((s, e, hi))
            else:
                for c0, c1 in _spans(hi, c_n, cols):
                    count(tile(q, c0, c1), s, e, c0, c1)
        for s, e, hi in later:
            q = query[s:e]
            if hardneg is not None:
                spans = group_rows(s, e)
                run_groups = np.fromiter(spans, dtype=np.int64)
            for c0, c1 in _spans(hi, c_n, cols):
                count(tile(q, c0, c1), s, e, c0, c1)

    # The target column equals itself: counted as a tie in the rows (and the subset, the group).
    for k in ("ties", "sub_ties", "hn_ties"):
        if k in acc:
            acc[k][: s1 if k == "sub_ties" else q_n] -= 1
    for k, v in acc.items():
        out[k] = torch.empty(q_n, dtype=torch.long)
        out[k][order] = v.cpu()
    if reverse:
        rev = rev_x.cpu()
        heads = torch.as_tensor(np.flatnonzero(first))
        rev[:, heads] = col_acc.cpu()[:, ts_d.cpu()[heads]]
        rev -= _group_counts(t_s.cpu(), first)  # a target's own queries (the query itself included)
        for j, k in enumerate(("rev_above", "rev_ties")):
            out[k] = torch.empty(q_n, dtype=torch.long)
            out[k][order] = rev[j]
    return out


def _group_counts(t: torch.Tensor, first: np.ndarray) -> torch.Tensor:
    """[2, Q]: per query, how many queries of its own target (contiguous, starting where ``first``)
    score above / equal to it, itself included."""
    q_n = t.numel()
    out = torch.zeros(2, q_n, dtype=torch.long)
    out[1] = 1
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, q_n))
    for v in np.unique(sizes[sizes > 1]):
        idx = torch.as_tensor(starts[sizes == v][:, None] + np.arange(v))  # [groups, v]
        tv = t[idx]
        out[0, idx] = (tv.unsqueeze(1) > tv.unsqueeze(2)).sum(2)
        out[1, idx] = (tv.unsqueeze(1) == tv.unsqueeze(2)).sum(2)
    return out


def hardneg_counts(
    query: torch.Tensor,
    cand: torch.Tensor,
    target: torch.Tensor,
    cand_group: Any,
    cand_patient: Any,
    query_patient: Any,
    chunk_size: int | Sequence[int] | None = None,
    fused: bool | str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(above, ties, population) within each query's pathology-matched population."""
    r = rank_counts(query, cand, target, chunk_size=chunk_size,
                    hardneg=(cand_group, cand_patient, query_patient), fused=fused)
    return r["hn_above"], r["hn_ties"], r["hn_pop"]


def apply_ties(above: torch.Tensor, ties: torch.Tensor, policy: str) -> torch.Tensor:
    """Number of candidates that beat the target under the ties policy."""
    if policy == "pessimistic":
        return above + ties
    if policy == "optimistic":
        return above.clone()
    raise ValueError(f"unknown ties policy {policy!r}; expected one of {TIES_POLICIES}")
