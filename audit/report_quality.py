"""Retrieved-report quality: how good, clinically, is the report an image retrieves?

The second paper (Ko et al.) scores its retrieval system by the report it retrieves for an image,
with GREEN (Ostmeier et al., 2024). This module scores the retrieved report against the query's
true report in three ways:

1. **GREEN-exact** (cohorts with structured truth, i.e. the synthetic cohort). The generator knows
   each report's findings and their attributes (``Study.extras["attributes"]``: items with kind,
   side, zone, size, count, device tip, certainty; the stated negations; the "normal" statement).
   Findings of the two reports are paired by kind (an optimal pairing within each kind) and GREEN's
   clinically significant error categories are counted exactly, with no language model:

   (a) ``false_finding``        a candidate finding with no finding of its kind in the reference
   (b) ``missed_finding``       a reference finding with no finding of its kind in the candidate
   (c) ``wrong_location``       a paired finding with another side / zone / location / rib
   (c) ``wrong_device_position`` a paired device with another tip position, side, approach, leads
   (d) ``wrong_severity``       a paired finding with another size / severity / count / age
   (e) ``false_comparison``, (f) ``missed_comparison``: always 0 (no synthetic report compares
       with a prior study; kept so the categories are GREEN's six)

   A paired finding counts at most one error per category; it is a *matched finding* only when it
   has no significant error. ``certainty_mismatch`` (stated vs hedged) is counted but is not one of
   GREEN's categories, so it does not enter the score. Negations are not findings: a candidate that
   negates a reference finding has *missed* it (b), and a candidate finding that the reference
   negates is a *false* finding (a); neither is counted twice. The "no acute cardiopulmonary
   process" statement is one finding: two normal reports match on it (GREEN's model counts it as a
   matched finding too). GREEN = matched / (matched + significant errors), and 0 when nothing is
   matched, as GREEN's reference implementation defines it (``compute_green``: ``if
   matched_findings == 0: return 0``).
2. **Label agreement** over the 14 CheXpert labels: micro / macro F1 of the retrieved report's
   labels against the true ones, positive-only (1 is positive) and uncertain-positive (1 and -1
   positive, CheXpert's U-Ones). Macro F1 averages the labels with any true or retrieved positive.
3. **Lexical** (secondary): corpus BLEU-4 and mean ROUGE-L F1 from torchmetrics.

Retrieval: each image query takes its top-1 report by cosine similarity from a report database,
by default the *training split's* reports (retrieval-based report generation: the query's own
report is then not a candidate), or the audited split itself (``database="self"``: the query's own
study and its patient's other studies are excluded). ``mode="majority"`` takes, among the top-k,
the report whose label vector is most frequent (ties: the better-ranked); ``mode="concat"`` joins
the top-k reports (findings deduplicated, labels merged 1 > -1 > 0 > blank, texts concatenated).

95% CIs: percentile bootstrap over patients (audit.stats), as the re-linkage audit. Report texts
never leave this module: only aggregate numbers are returned.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cxr_relink.audit.green_categories import ERROR_CATEGORIES  # GREEN's categories, as counted here, with its letter
from cxr_relink.audit.labels import CHEXPERT_LABELS, NUM_LABELS
from cxr_relink.audit.settings import config_settings
from cxr_relink.audit.settings import resolve as resolve_settings
from cxr_relink.audit.stats import bootstrap_patient_means, percentile_ci

INFO_CATEGORIES = ("certainty_mismatch", "other_attribute")  # counted, not in the score
COUNT_KEYS = ("matched", *ERROR_CATEGORIES, *INFO_CATEGORIES)

LOCATION_ATTRS = frozenset(("side", "zone", "location", "rib"))
SEVERITY_ATTRS = frozenset(("size", "size_mm", "size_cm", "count", "age"))
# Support devices: any attribute of theirs says where the device is (tip, side, approach, leads).
DEVICE_KINDS = frozenset(("ett", "ng", "cvc", "picc", "pacemaker", "chest_tube", "sternotomy"))
NORMAL_KIND = "no_acute_abnormality"

DATABASES = ("train", "self")
MODES = ("top1", "majority", "concat")
LABEL_MODES = ("positive_only", "uncertain_positive")


# ============================================================================ exact error counts


def _attr_category(kind: str, attr: str) -> str:
    if kind in DEVICE_KINDS:
        return "wrong_device_position"
    if attr in LOCATION_ATTRS:
        return "wrong_location"
    if attr in SEVERITY_ATTRS:
        return "wrong_severity"
    return "other_attribute"


def _pair_errors(ref: dict, cand: dict) -> set[str]:
    """The error categories of one paired finding (same kind)."""
    kind = ref["kind"]
    same_cert = ref.get("certainty", "present") == cand.get("certainty", "present")
    cats = set() if same_cert else {"certainty_mismatch"}
    for attr in sorted((set(ref) | set(cand)) - {"kind", "certainty"}):
        if attr.startswith("_"):
            continue
        if attr in ref and attr in cand:
            if ref[attr] != cand[attr]:
                cats.add(_attr_category(kind, attr))
        elif same_cert:  # e.g. a borderline (hedged) heart has no size: the certainty says it all
            cats.add(_attr_category(kind, attr))
    return cats


def _significant(cats: set[str]) -> int:
    return sum(1 for c in cats if c in ERROR_CATEGORIES)


def _best_pairing(refs: list[dict], cands: list[dict]) -> list[tuple[int, int, set[str]]]:
    """min(len) pairs of one kind with the fewest errors (exhaustive for the few items a report
    states of one kind, greedy beyond)."""
    costs = {(i, j): _pair_errors(r, c) for i, r in enumerate(refs) for j, c in enumerate(cands)}

    def cost(c: set[str]) -> tuple[int, int]:
        return (_significant(c), len(c))

    n = min(len(refs), len(cands))
    if n == 0:
        return []
    if max(len(refs), len(cands)) <= 6:
        best, best_cost = None, None
        small_ref = len(refs) <= len(cands)
        for perm in itertools.permutations(range(max(len(refs), len(cands))), n):
            pairs = [(i, p) if small_ref else (p, i) for i, p in enumerate(perm)]
            tot = tuple(map(sum, zip(*(cost(costs[pr]) for pr in pairs))))
            if best_cost is None or tot < best_cost:
                best, best_cost = pairs, tot
        return [(i, j, costs[(i, j)]) for i, j in best]
    order = sorted(costs, key=lambda ij: (cost(costs[ij]), ij))
    used_r, used_c, out = set(), set(), []
    for i, j in order:
        if i not in used_r and j not in used_c:
            used_r.add(i)
            used_c.add(j)
            out.append((i, j, costs[(i, j)]))
    return out


def _findings(truth: dict) -> list[dict]:
    """The findings a report states: its items, plus the normal statement as one finding."""
    items = [{k: v for k, v in it.items() if not str(k).startswith("_")} for it in truth.get("findings") or []]
    if truth.get("normal"):
        items.append({"kind": NORMAL_KIND})
    return items


def count_errors(reference: dict, candidate: dict) -> dict[str, int]:
    """Exact GREEN error counts of ``candidate``'s findings against ``reference``'s.

    Both are structured truths as the synthetic cohort stores them (``Study.extras["attributes"]``):
    ``{"findings": [{"kind": ..., attributes...}], "negated": [...], "normal": bool}``. Returns
    {"matched", every ERROR_CATEGORIES key, "certainty_mismatch", "other_attribute"} (ints).
    """
    out = dict.fromkeys(COUNT_KEYS, 0)
    refs, cands = _findings(reference), _findings(candidate)
    kinds = sorted({f["kind"] for f in refs} | {f["kind"] for f in cands})
    for kind in kinds:
        r = [f for f in refs if f["kind"] == kind]
        c = [f for f in cands if f["kind"] == kind]
        if kind == NORMAL_KIND:  # matched when both reports are normal; otherwise their findings tell
            out["matched"] += min(len(r), len(c))
            continue
        pairs = _best_pairing(r, c)
        out["missed_finding"] += len(r) - len(pairs)
        out["false_finding"] += len(c) - len(pairs)
        for _, _, cats in pairs:
            for cat in cats:
                out[cat] += 1
            if _significant(cats) == 0:
                out["matched"] += 1
    return out


def significant_errors(counts: dict[str, int]) -> int:
    return int(sum(counts[c] for c in ERROR_CATEGORIES))


def green_from_counts(counts: dict[str, int]) -> float:
    """GREEN = matched / (matched + clinically significant errors); 0 when nothing is matched
    (GREEN's reference implementation, ``compute_green``)."""
    m = counts["matched"]
    return 0.0 if m == 0 else m / (m + significant_errors(counts))


def merge_truths(truths: Sequence[dict]) -> dict:
    """The structured truth of concatenated reports: every distinct finding once; normal only when
    every report is normal."""
    seen, items = set(), []
    for t in truths:
        for it in t.get("findings") or []:
            key = tuple(sorted((k, str(v)) for k, v in it.items() if not str(k).startswith("_")))
            if key not in seen:
                seen.add(key)
                items.append(it)
    return {"findings": items, "negated": sorted({n for t in truths for n in t.get("negated") or []}),
            "normal": all(bool(t.get("normal")) for t in truths) and not items}


def truth_key(truth: dict) -> tuple:
    """A hashable key of what count_errors reads of a truth (its findings and the normal statement;
    negations and phrasing do not matter): equal keys score identically."""
    items = tuple(sorted(tuple(sorted((k, str(v)) for k, v in it.items() if not str(k).startswith("_")))
                         for it in truth.get("findings") or []))
    return items, bool(truth.get("normal"))


def expected_green(query_truths: Sequence[dict], database_truths: Sequence[dict],
                   groups: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Exact expected GREEN of each query when its report is drawn uniformly from the database
    (``groups`` None) or from ``groups[i]`` (database indices) -- e.g. every report with the query's
    own label vector (a "perfect label retriever"). Identical truths are scored once."""
    keys = [truth_key(t) for t in database_truths]
    first: dict[tuple, int] = {}
    rep_of: list[int] = []  # one database row per distinct truth
    code = np.empty(len(keys), dtype=np.int64)
    for j, k in enumerate(keys):
        if k not in first:
            first[k] = len(first)
            rep_of.append(j)
        code[j] = first[k]
    all_counts = np.bincount(code, minlength=len(first))
    cache: dict[tuple, float] = {}
    out = np.full(len(query_truths), np.nan)
    for i, t in enumerate(query_truths):
        qk = truth_key(t)
        if groups is None:
            cnt = all_counts
        else:
            g = np.asarray(groups[i], dtype=np.int64)
            if g.size == 0:
                continue
            cnt = np.bincount(code[g], minlength=len(first))
        nz = np.flatnonzero(cnt)
        vals = np.empty(nz.size)
        for n, c in enumerate(nz):
            key = (qk, int(c))
            if key not in cache:
                cache[key] = green_from_counts(count_errors(t, database_truths[rep_of[int(c)]]))
            vals[n] = cache[key]
        out[i] = float((vals * cnt[nz]).sum() / cnt[nz].sum())
    return out


# ============================================================================ labels

_RANK = {1.0: 3, -1.0: 2, 0.0: 1}


def merge_labels(labels: np.ndarray) -> np.ndarray:
    """One label vector for concatenated reports: per label 1 beats -1 beats 0 beats blank."""
    lab = np.asarray(labels, dtype=np.float32).reshape(-1, NUM_LABELS)
    out = np.full(NUM_LABELS, np.nan, dtype=np.float32)
    for j in range(NUM_LABELS):
        vals = [v for v in lab[:, j] if not math.isnan(v)]
        if vals:
            out[j] = max(vals, key=lambda v: _RANK[float(v)])
    return out


def binarize(labels: np.ndarray, mode: str) -> np.ndarray:
    """positive_only: 1 -> 1, else 0; uncertain_positive: 1 and -1 -> 1, else 0 (U-Ones)."""
    lab = np.asarray(labels, dtype=np.float32)
    if mode == "positive_only":
        return (lab == 1).astype(np.int64)
    if mode == "uncertain_positive":
        return ((lab == 1) | (lab == -1)).astype(np.int64)
    raise ValueError(f"unknown label mode {mode!r}; expected one of {LABEL_MODES}")


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)


def label_f1(true: np.ndarray, pred: np.ndarray, mode: str = "positive_only") -> dict[str, Any]:
    """Micro and macro F1 of retrieved labels ``pred`` against ``true`` ([Q, 14] in {1, 0, -1,
    NaN}). Macro averages the labels with any true or predicted positive (F1 is undefined
    otherwise); per-label F1 is None for the others."""
    t, p = binarize(true, mode), binarize(pred, mode)
    tp = (t & p).sum(0).astype(np.float64)
    fp = ((1 - t) & p).sum(0).astype(np.float64)
    fn = (t & (1 - p)).sum(0).astype(np.float64)
    per = _f1(tp, fp, fn)
    micro = _f1(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))[0]
    defined = ~np.isnan(per)
    return {
        "micro_f1": None if np.isnan(micro) else float(micro),
        "macro_f1": float(per[defined].mean()) if defined.any() else None,
        "n_labels_macro": int(defined.sum()),
        "per_label": {name: {"f1": None if np.isnan(per[j]) else float(per[j]), "n_true": int(t[:, j].sum()),
                             "n_retrieved": int(p[:, j].sum())} for j, name in enumerate(CHEXPERT_LABELS)},
    }


def _label_features(true: np.ndarray, pred: np.ndarray, mode: str) -> np.ndarray:
    """Per-query [TP, FP, FN] per label, [Q, 3*14] float (bootstrap replicates of F1)."""
    t, p = binarize(true, mode), binarize(pred, mode)
    return np.concatenate([t & p, (1 - t) & p, t & (1 - p)], axis=1).astype(np.float64)


def _f1_from_means(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro and macro F1 from mean [TP, FP, FN] rows [B, 3*14] (ratios of means = of sums)."""
    tp, fp, fn = m[:, :NUM_LABELS], m[:, NUM_LABELS:2 * NUM_LABELS], m[:, 2 * NUM_LABELS:]
    den = 2 * tp + fp + fn
    per = torch.where(den > 0, 2 * tp / den.clamp_min(1e-300), torch.full_like(den, float("nan")))
    micro = 2 * tp.sum(1) / (2 * tp.sum(1) + fp.sum(1) + fn.sum(1)).clamp_min(1e-300)
    return micro, torch.nanmean(per, dim=1)


# ============================================================================ lexical


def bleu4(references: Sequence[str], candidates: Sequence[str]) -> float:
    """Corpus BLEU-4 (torchmetrics: uniform weights, brevity penalty, no smoothing)."""
    from torchmetrics.functional.text import bleu_score

    return float(bleu_score(list(candidates), [[r] for r in references], n_gram=4))


def rouge_l(references: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
    """Per-pair ROUGE-L F1 (torchmetrics, without a stemmer: no nltk needed)."""
    from torchmetrics.functional.text.rouge import rouge_score

    out = np.empty(len(references), dtype=np.float64)
    for i, (r, c) in enumerate(zip(references, candidates)):
        out[i] = float(rouge_score(c, r, rouge_keys="rougeL", use_stemmer=False)["rougeL_fmeasure"])
    return out


# ============================================================================ the report sets


@dataclass
class ReportSet:
    """What the audit needs of each study's report: its id, patient, labels, and optionally its
    text (lexical metrics) and structured truth (GREEN-exact). Never logged."""

    ids: list[str]
    patient: list[str]
    labels: np.ndarray | None = None  # [S, 14]
    texts: list[str] | None = None
    truths: list[dict | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_studies(cls, studies: Sequence[Any], text_field: str = "report") -> "ReportSet":
        """From Study records (datamodules.records.Study, or anything with study_id, patient_id,
        labels, extras and ``text(text_field)``)."""
        truths = [(getattr(s, "extras", None) or {}).get("attributes") for s in studies]
        return cls(
            ids=[str(s.study_id) for s in studies], patient=[str(s.patient_id) for s in studies],
            labels=np.stack([np.asarray(s.labels, np.float32) for s in studies]) if studies else None,
            texts=[s.text(text_field) for s in studies],
            truths=truths if truths and all(isinstance(t, dict) for t in truths) else None,
        )

    def subset(self, idx: Sequence[int]) -> "ReportSet":
        idx = [int(i) for i in idx]
        return ReportSet([self.ids[i] for i in idx], [self.patient[i] for i in idx],
                         None if self.labels is None else self.labels[idx],
                         None if self.texts is None else [self.texts[i] for i in idx],
                         None if self.truths is None else [self.truths[i] for i in idx])


# ============================================================================ retrieval


def retrieve_topk(query: torch.Tensor, database: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                  chunk_size: int = 512) -> torch.Tensor:
    """Indices [Q, k] of each query's k most similar database rows (cosine; ties: the lower index).
    ``exclude`` [Q, M] bool marks rows a query may not retrieve."""
    q = torch.nn.functional.normalize(query.float(), dim=1)
    db = torch.nn.functional.normalize(database.float(), dim=1)
    if k > db.shape[0]:
        raise ValueError(f"top-{k} retrieval from a database of {db.shape[0]} reports")
    out = []
    for s in range(0, q.shape[0], chunk_size):
        sim = q[s:s + chunk_size] @ db.T
        if exclude is not None:
            ex = exclude[s:s + chunk_size]
            if bool(ex.all(dim=1).any()):
                raise ValueError("a query has every database report excluded")
            sim = sim.masked_fill(ex, float("-inf"))
        out.append(torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k])
    return torch.cat(out)


def _majority(cands: Sequence[int], labels: np.ndarray | None) -> int:
    """Among ranked candidates, the one whose label vector (blank as 0) is most frequent."""
    if labels is None:
        return int(cands[0])
    keys = [tuple(np.nan_to_num(labels[c], nan=0.0).tolist()) for c in cands]
    freq = {key: keys.count(key) for key in keys}
    best = max(freq.values())
    return int(next(c for c, key in zip(cands, keys) if freq[key] == best))


# ============================================================================ the audit


def report_quality_audit(
    query_emb: Any,
    query_report: Sequence[int],
    queries: ReportSet,
    database_emb: Any,
    database: ReportSet,
    database_name: str = "train",
    mode: str = "top1",
    k: int = 1,
    lexical: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    baselines: bool = True,
    green_model: Any = None,
) -> dict[str, Any]:
    """The report-quality section (JSON-able) of image queries ``query_emb`` [Q, D].

    ``query_report`` [Q]: each query's true report, an index into ``queries`` (the audited split's
    reports); ``database_emb`` [M, D] and ``database``: the reports retrieved from. With
    ``database_name="self"`` the database is the audited split, and the query's own study and its
    patient's other studies are excluded from its candidates. ``green_model`` (optional): an
    audit.green_model.GreenModel (or anything with its ``score(references, candidates)``) that also
    scores each pair's texts, model-judged.
    """
    if mode not in MODES:
        raise ValueError(f"unknown retrieval mode {mode!r}; expected one of {MODES}")
    if database_name not in DATABASES:
        raise ValueError(f"unknown report database {database_name!r}; expected one of {DATABASES}")
    k = 1 if mode == "top1" else int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    qe = torch.as_tensor(np.asarray(query_emb, dtype=np.float32)) if not isinstance(query_emb, torch.Tensor) else query_emb
    de = torch.as_tensor(np.asarray(database_emb, dtype=np.float32)) if not isinstance(database_emb, torch.Tensor) else database_emb
    qr = np.asarray(query_report, dtype=np.int64).reshape(-1)
    if qe.shape[0] != qr.size:
        raise ValueError(f"{qe.shape[0]} query embeddings but {qr.size} query report indices")
    if de.shape[0] != len(database):
        raise ValueError(f"{de.shape[0]} database embeddings but {len(database)} database reports")
    q_patient = [queries.patient[i] for i in qr]
    exclude = None
    shared = sorted(set(q_patient) & set(database.patient))
    if shared:
        # The own report (database="self"), or any study of the query's patient, is never a candidate:
        # the score is about clinical content, not about finding the patient again.
        codes = {p: i for i, p in enumerate(sorted(set(q_patient) | set(database.patient)))}
        qp = torch.tensor([codes[p] for p in q_patient])
        dp = torch.tensor([codes[p] for p in database.patient])
        exclude = qp[:, None] == dp[None, :]
    top = retrieve_topk(qe, de, k, exclude).numpy()
    n_q = qr.size

    # The retrieved "report" of each query: one database row, or a merge of k of them.
    if mode == "top1":
        pick = [(int(t[0]),) for t in top]
    elif mode == "majority":
        pick = [(_majority(t, database.labels),) for t in top]
    else:
        pick = [tuple(int(x) for x in t) for t in top]

    features: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {
        "database": database_name, "mode": mode, "k": k, "n_queries": int(n_q),
        "n_database_reports": len(database), "n_patients": len(set(q_patient)),
        "own_report_candidate": False,
        "note": ("retrieved from the training split's reports: the query's own report is not a candidate"
                 if database_name == "train" else
                 "retrieved from the audited split: the query's own study and its patient's other studies "
                 "are not candidates"),
    }
    if shared and database_name == "train":
        out["n_queries_same_patient_excluded"] = int(exclude.any(dim=1).sum())

    # 1. GREEN-exact
    skipped: dict[str, str] = {}
    if queries.truths is not None and database.truths is not None:
        cache: dict[tuple, dict[str, int]] = {}
        rows = []
        for qi in range(n_q):
            key = (int(qr[qi]), pick[qi])
            if key not in cache:
                cand = (database.truths[pick[qi][0]] if len(pick[qi]) == 1
                        else merge_truths([database.truths[j] for j in pick[qi]]))
                cache[key] = count_errors(queries.truths[int(qr[qi])], cand)
            rows.append(cache[key])
        counts = np.array([[r[c] for c in COUNT_KEYS] for r in rows], dtype=np.float64)
        green = np.array([green_from_counts(r) for r in rows])
        sig = counts[:, [COUNT_KEYS.index(c) for c in ERROR_CATEGORIES]].sum(1)
        features["green"] = green[:, None]
        features["counts"] = counts
        features["any"] = (counts > 0).astype(np.float64)
        features["sig"] = sig[:, None]
        if baselines:
            # What a retriever that knows nothing (a random report) and one that knows the 14 labels
            # exactly (a random report with the query's label vector, blank as 0) score: how much of
            # the clinical content the labels alone carry, beside the model.
            uq, inv = np.unique(qr, return_inverse=True)
            q_truths = [queries.truths[int(i)] for i in uq]
            # The query's own patient is never a candidate, as for the model.
            allowed = None if exclude is None else [np.flatnonzero(~exclude[int(np.flatnonzero(qr == i)[0])].numpy())
                                                    for i in uq]
            features["baseline/random"] = expected_green(q_truths, database.truths, allowed)[inv][:, None]
            if queries.labels is not None and database.labels is not None and np.isfinite(queries.labels).any():
                from cxr_relink.audit.labels import label_groups

                grp = label_groups(np.concatenate([queries.labels[uq], database.labels]), "blank_negative").numpy()
                qg, dg = grp[:uq.size], grp[uq.size:]
                same = [np.flatnonzero(dg == qg[n]) if allowed is None else np.intersect1d(allowed[n], np.flatnonzero(dg == qg[n]))
                        for n in range(uq.size)]
                lo = expected_green(q_truths, database.truths, same)[inv]
                features["baseline/label_oracle"] = lo[:, None]
    else:
        skipped["green_exact"] = "no structured findings (only the synthetic cohort carries them)"

    # 2. labels
    if queries.labels is not None and database.labels is not None and np.isfinite(queries.labels).any():
        true = queries.labels[qr]
        pred = np.stack([database.labels[p[0]] if len(p) == 1 else merge_labels(database.labels[list(p)])
                         for p in pick])
        for lm in LABEL_MODES:
            features[f"labels/{lm}"] = _label_features(true, pred, lm)
    else:
        skipped["labels"] = "no CheXpert labels"
        true = pred = None

    # 3. lexical
    bleu = lib = None
    if lexical and queries.texts is not None and database.texts is not None:
        import torchmetrics

        lib = f"torchmetrics {torchmetrics.__version__}"
        uniq = sorted({(int(qr[i]), pick[i]) for i in range(n_q)})  # multi-view studies repeat pairs
        rl = rouge_l([queries.texts[q] for q, _ in uniq], [" ".join(database.texts[j] for j in p) for _, p in uniq])
        by_pair = dict(zip(uniq, rl.tolist()))
        features["rouge_l"] = np.array([[by_pair[(int(qr[i]), pick[i])]] for i in range(n_q)])
        # BLEU-4 is a corpus statistic: over every query's pair.
        bleu = bleu4([queries.texts[int(qr[i])] for i in range(n_q)],
                     [" ".join(database.texts[j] for j in pick[i]) for i in range(n_q)])
    elif lexical:
        skipped["lexical"] = "no report texts"
    green_model_scores = None
    if green_model is not None and queries.texts is not None and database.texts is not None:
        uniq = sorted({(int(qr[i]), pick[i]) for i in range(n_q)})
        scored = green_model.score([queries.texts[q] for q, _ in uniq],
                                   [" ".join(database.texts[j] for j in p) for _, p in uniq])
        by_pair = dict(zip(uniq, scored))
        green_model_scores = [by_pair[(int(qr[i]), pick[i])] for i in range(n_q)]
    elif green_model is not None:
        skipped["green_model"] = "no report texts"

    # One bootstrap over patients for every per-query feature.
    names = list(features)
    mat = np.concatenate([features[n] for n in names], axis=1) if names else np.zeros((n_q, 0))
    offs = dict(zip(names, np.cumsum([0] + [features[n].shape[1] for n in names[:-1]]).tolist()))
    mean = mat.mean(0) if n_q else np.zeros(mat.shape[1])
    reps = None
    if n_boot > 0 and mat.shape[1]:
        codes = {p: i for i, p in enumerate(sorted(set(q_patient)))}
        reps = bootstrap_patient_means(torch.as_tensor(mat), torch.tensor([codes[p] for p in q_patient]), n_boot, seed)

    def ci(col: int) -> list[float] | None:
        if reps is None:
            return None
        lo, hi = percentile_ci(reps[:, col:col + 1])
        return [float(lo[0]), float(hi[0])]

    if "green" in features:
        o = offs["counts"]
        cats = {}
        for j, c in enumerate(COUNT_KEYS):
            cats[c] = {
                "green_category": ERROR_CATEGORIES.get(c),
                "significant": c in ERROR_CATEGORIES,
                "total": int(features["counts"][:, j].sum()),
                "per_query": float(mean[o + j]), "per_query_ci": ci(o + j),
                "frac_queries": float(mean[offs["any"] + j]), "frac_queries_ci": ci(offs["any"] + j),
            }
        out["green_exact"] = {
            "value": float(mean[offs["green"]]), "ci": ci(offs["green"]),
            "significant_errors_per_query": float(mean[offs["sig"]]), "significant_errors_per_query_ci": ci(offs["sig"]),
            "frac_queries_perfect": float((features["sig"][:, 0] == 0).mean()) if n_q else None,
            "categories": cats,
            "definition": "matched / (matched + significant errors), 0 when nothing is matched (Ostmeier et al. 2024)",
        }
        bl = {}
        if "baseline/random" in features:
            bl["random_report"] = {"value": float(mean[offs["baseline/random"]]), "ci": ci(offs["baseline/random"]),
                                   "what": "expected GREEN-exact of a uniformly random database report"}
        if "baseline/label_oracle" in features:
            f = features["baseline/label_oracle"][:, 0]
            ok = ~np.isnan(f)
            val = float(f[ok].mean()) if ok.any() else None
            bl["same_labels_report"] = {
                "value": val, "n_queries_without_one": int((~ok).sum()),
                "what": ("expected GREEN-exact of a random database report with the query's own 14-label vector "
                         "(blank as 0): a perfect label retriever; queries whose label vector no database report "
                         "has are left out"),
            }
            # The model on the same queries, so the two compare like for like.
            bl["same_labels_report"]["model_value_same_queries"] = float(features["green"][ok, 0].mean()) if ok.any() else None
            if n_boot > 0 and ok.any():
                sub = np.stack([f[ok], features["green"][ok, 0], f[ok] - features["green"][ok, 0]], axis=1)
                codes = {p: i for i, p in enumerate(sorted(set(q_patient)))}
                pat = torch.tensor([codes[q_patient[i]] for i in np.flatnonzero(ok)])
                r = bootstrap_patient_means(torch.as_tensor(sub), pat, n_boot, seed)
                lo_, hi_ = percentile_ci(r)
                bl["same_labels_report"]["ci"] = [float(lo_[0]), float(hi_[0])]
                bl["same_labels_report"]["model_value_same_queries_ci"] = [float(lo_[1]), float(hi_[1])]
                bl["same_labels_report"]["difference_ci"] = [float(lo_[2]), float(hi_[2])]
        if bl:
            out["green_exact"]["baselines"] = bl
    if true is not None:
        lab = {}
        for lm in LABEL_MODES:
            point = label_f1(true, pred, lm)
            if reps is not None:
                o = offs[f"labels/{lm}"]
                micro, macro = _f1_from_means(reps[:, o:o + 3 * NUM_LABELS])
                for name, r in (("micro_f1", micro), ("macro_f1", macro)):
                    r = r[~torch.isnan(r)]
                    if r.numel():
                        lo, hi = percentile_ci(r[:, None])
                        point[f"{name}_ci"] = [float(lo[0]), float(hi[0])]
            lab[lm] = point
        out["labels"] = lab
    if "rouge_l" in features:
        out["lexical"] = {"bleu4": bleu, "rouge_l": float(mean[offs["rouge_l"]]), "rouge_l_ci": ci(offs["rouge_l"]),
                          "library": lib, "note": "secondary: word overlap, blind to clinical errors"}
    if green_model_scores is not None:
        from cxr_relink.audit.green_model import green_model_section

        out["green_model"] = green_model_section(green_model_scores)
    if skipped:
        out["skipped"] = skipped
    out["ci"] = {"method": "percentile bootstrap over patients", "n_boot": int(n_boot), "seed": int(seed)}
    return out


class ReportQuality:
    """``report_quality_audit`` with the settings of audit/settings.py (REPORT_QUALITY), the
    keys given overriding them (the validation callback and evaluate.py's embeddings path)."""

    def __init__(self, **given: Any):
        s = resolve_settings("report_quality", given)
        if s["database"] not in DATABASES:
            raise ValueError(f"report_quality.database must be one of {DATABASES}, got {s['database']!r}")
        if s["mode"] not in MODES:
            raise ValueError(f"report_quality.mode must be one of {MODES}, got {s['mode']!r}")
        self.settings = {"database": str(s["database"]), "mode": str(s["mode"]), "k": int(s["k"]),
                         "lexical": bool(s["lexical"]), "baselines": bool(s["baselines"]), "n_boot": int(s["n_boot"]),
                         "seed": int(s["seed"]), "green_model": s["green_model"]}
        self._green = None

    def green_model(self) -> Any:
        """GREEN's model from the ``green_model`` folder, loaded once (None when not set)."""
        if self.settings["green_model"] and self._green is None:
            from cxr_relink.audit.green_model import GreenModel

            self._green = GreenModel(str(self.settings["green_model"]))
        return self._green

    @classmethod
    def from_config(cls, node: Any) -> "ReportQuality":
        """From an audit config node (a mapping such as configs/audit/report_quality.yaml's): its
        callback options are not settings."""
        return cls(**config_settings("report_quality", node))

    def audit(self, query_emb: Any, query_report: Sequence[int], queries: ReportSet, database_emb: Any,
              database: ReportSet) -> dict[str, Any]:
        s = self.settings
        return report_quality_audit(query_emb, query_report, queries, database_emb, database,
                                    database_name=s["database"], mode=s["mode"], k=s["k"], lexical=s["lexical"],
                                    baselines=s["baselines"], green_model=self.green_model(),
                                    n_boot=s["n_boot"], seed=s["seed"])


def audit_embedding_rows(rq: ReportQuality, data: dict[str, np.ndarray], split: str | None, studies: Sequence[Any],
                         text_field: str = "report") -> dict[str, Any]:
    """The report-quality section of an embeddings file (evaluate.py ``embeddings=``): its rows
    (image_emb, report_emb, study_id, split, and optionally report_id) joined by report id to the
    ``studies`` of the cohort they were computed on, which bring the reports' labels, texts and
    structured findings. ``report_id`` [I] (optional) is each row's report's study id in the
    cohort; without it ``study_id`` is. The audited rows are those with ``split == split`` (every
    row when the file has no ``split``); the database (``database="train"``) is the ``"train"`` rows.
    """
    by_id = {str(s.study_id): s for s in studies}
    rid = np.asarray(data.get("report_id", data["study_id"])).astype(str)
    missing = sorted(set(rid) - set(by_id))
    if missing:
        raise ValueError(f"{len(missing)} report ids of the embeddings file are not study ids of the cohort "
                         f"(e.g. {missing[:3]}): report quality needs the cohort the embeddings were computed on "
                         "(data=...) and its study ids in `report_id` (or `study_id`)")
    sp = np.asarray(data["split"]).astype(str) if "split" in data else None
    ev = np.ones(len(rid), bool) if sp is None else sp == str(split)
    if not ev.any():
        raise ValueError(f"embeddings file has no rows with split == {split!r}")

    def reports(mask: np.ndarray) -> tuple[np.ndarray, ReportSet, np.ndarray]:
        ids, first, inv = np.unique(rid[mask], return_index=True, return_inverse=True)
        emb = np.asarray(data["report_emb"], dtype=np.float32)[mask][first]
        return emb, ReportSet.from_studies([by_id[i] for i in ids], text_field), inv.reshape(-1)

    _, queries, q_report = reports(ev)
    if rq.settings["database"] == "train":
        if sp is None or not (sp == "train").any():
            raise ValueError("report quality from the training split's reports needs `split` with 'train' rows in "
                             "the embeddings file (or report_quality.database=self)")
        db_emb, database, _ = reports(sp == "train")
    else:
        db_emb, database, _ = reports(ev)
    return rq.audit(np.asarray(data["image_emb"], dtype=np.float32)[ev], q_report, queries, db_emb, database)
