"""Linear probe: are the frozen image embeddings still clinically useful?

Multi-label logistic regression (one independent logistic model per CheXpert label, fitted
jointly with full-batch L-BFGS on standardised features, L2 on the weights) trained on the
train split and scored on the evaluation split; macro AUROC over the labels (the Mann-Whitney
statistic, ties counted half, as the ROC area does). Labels are always addressed by name (CHEXPERT_LABELS), never by position.

Uncertainty policy (configurable): ``uncertain`` in {"ignore" (default), "zeros", "ones"}
for -1 and ``blank`` in {"ignore", "zeros" (default)} for NaN (blank = not mentioned = negative, as
CheXpert evaluations read it). "ignore" masks the value out
of that label's loss and of its AUROC (the usual CheXpert evaluation). A label that has a
single class among the evaluated test items is skipped and named in the result.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from cxr_relink.audit.embeddings import as_embeddings, reject_zero_rows
from cxr_relink.audit.labels import CHEXPERT_LABELS
from cxr_relink.audit.settings import config_settings
from cxr_relink.audit.settings import resolve as resolve_settings

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
BLANK_POLICIES = ("ignore", "zeros")


def resolve_label_names(names: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Validate label names; ``None`` means all ``available``."""
    if names is None:
        return list(available)
    names = [str(n) for n in names]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown label names {unknown}; known names are {list(available)}")
    if not names:
        raise ValueError("no label names to evaluate")
    return names


def apply_label_policy(y: torch.Tensor, uncertain: str, blank: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(binary targets, valid mask) under the uncertainty policy."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"unknown uncertain policy {uncertain!r}; expected one of {UNCERTAIN_POLICIES}")
    if blank not in BLANK_POLICIES:
        raise ValueError(f"unknown blank policy {blank!r}; expected one of {BLANK_POLICIES}")
    nan, unc = torch.isnan(y), y == -1
    valid = torch.ones_like(y, dtype=torch.bool)
    t = torch.where(nan, torch.zeros_like(y), y)
    if uncertain == "ignore":
        valid &= ~unc
    else:
        t = torch.where(unc, torch.full_like(y, 1.0 if uncertain == "ones" else 0.0), t)
    if blank == "ignore":
        valid &= ~nan
    return t.clamp(0, 1), valid


def subsample_rows(n: int, cap: int | None, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of the probe's training rows: all ``n`` when ``cap`` is None or not below
    ``n``, else a seeded uniform random subset of ``cap`` rows. The first ``cap`` rows would be a
    biased sample (loader or file order: one site, one period, one patient's studies together)."""
    if cap is None or n <= int(cap):
        return np.arange(n)
    if int(cap) < 1:
        raise ValueError(f"max_train_samples must be at least 1, got {cap}")
    return np.sort(np.random.default_rng(seed).choice(n, size=int(cap), replace=False))


def probe_skip_reason(
    train_y: Any, test_y: Any, label_names: Sequence[str] = CHEXPERT_LABELS, eval_labels: Sequence[str] | None = None,
    uncertain: str = "ignore", blank: str = "zeros",
) -> str | None:
    """Why the probe cannot run on these labels (None when it can): checked before any audit is
    computed, so a run with several audits skips the probe instead of losing the others to it."""
    if train_y is None or test_y is None:
        return "no labels"
    label_names = [str(n) for n in label_names]
    cols = [label_names.index(n) for n in resolve_label_names(eval_labels, label_names)]
    ok = []
    for y in (train_y, test_y):
        t, v = apply_label_policy(torch.as_tensor(np.asarray(y, dtype=np.float32))[:, cols], uncertain, blank)
        pos = ((t == 1) & v).sum(0)
        ok.append((pos > 0) & (pos < v.sum(0)))
    if not bool((ok[0] & ok[1]).any()):
        return (f"no label has both classes in the train and evaluated rows (uncertain={uncertain}, blank={blank}); "
                "are the labels blank?")
    return None


def _check_labels(y: Any, n: int, n_cols: int, name: str) -> torch.Tensor:
    if y is None:
        raise ValueError(f"{name} labels are missing")
    t = torch.as_tensor(np.asarray(y, dtype=np.float32))
    if t.shape != (n, n_cols):
        raise ValueError(f"{name} labels must have shape [{n}, {n_cols}], got {tuple(t.shape)}")
    ok = torch.isnan(t) | (t == 1) | (t == 0) | (t == -1)
    if not ok.all():
        raise ValueError(f"{name} label values must be 1, 0, -1 or NaN")
    return t


def fit_logistic(
    x: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, l2: float = 1e-3, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent masked logistic regressions, one per column, fitted jointly with L-BFGS.

    Loss: sum over labels of the mean BCE over that label's valid rows + l2/2 * ||W||^2.
    Returns (W [D, L], b [L]) in float64.
    """
    # Callers may sit inside Lightning's validation loop (torch.inference_mode): leave it,
    # and clone the inputs so they are ordinary tensors autograd may save.
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_logistic(x.clone(), t.clone(), valid.clone(), l2, max_iter)


def _fit_logistic(x, t, valid, l2, max_iter):
    x = x.to(torch.float64)
    t = t.to(torch.float64)
    m = valid.to(torch.float64)
    per_label = m.sum(0).clamp(min=1)
    w = torch.zeros(x.shape[1], t.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(t.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = x @ w + b
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="none")
        loss = ((bce * m).sum(0) / per_label).sum() + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    label_names: Sequence[str] = CHEXPERT_LABELS,
    eval_labels: Sequence[str] | None = None,
    uncertain: str = "ignore",
    blank: str = "zeros",
    l2: float = 1e-3,
    max_iter: int = 200,
    test_patient: Any = None,
    n_boot: int = 200,
    seed: int = 0,
    return_scores: bool = False,
) -> dict[str, Any]:
    """Fit on (train_x, train_y), score test_x, return the probe section of the audit result.

    ``label_names`` names the columns of train_y/test_y; ``eval_labels`` (default: all of
    them) picks the labels to fit and evaluate. ``test_patient`` (codes per test row)
    enables a bootstrap-over-patients CI of the macro AUROC.
    """
    label_names = [str(n) for n in label_names]
    names = resolve_label_names(eval_labels, label_names)
    cols = [label_names.index(n) for n in names]
    xtr = as_embeddings(train_x, "probe train embeddings")
    xte = as_embeddings(test_x, "probe test embeddings")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"probe train dim {xtr.shape[1]} != test dim {xte.shape[1]}")
    # Re-linkage rejects zero vectors (no direction); the probe would fit on them silently.
    reject_zero_rows(xtr, "probe train embeddings")
    reject_zero_rows(xte, "probe test embeddings")
    ytr = _check_labels(train_y, xtr.shape[0], len(label_names), "probe train")[:, cols]
    yte = _check_labels(test_y, xte.shape[0], len(label_names), "probe test")[:, cols]
    ttr, vtr = apply_label_policy(ytr, uncertain, blank)
    tte, vte = apply_label_policy(yte, uncertain, blank)

    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    w, b = fit_logistic((xtr - mu) / sd, ttr, vtr, l2=l2, max_iter=max_iter)
    scores = (((xte - mu) / sd).to(torch.float64) @ w + b).to(torch.float32)

    per_label: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    used: list[int] = []
    for j, name in enumerate(names):
        tr_pos = int((ttr[:, j][vtr[:, j]] == 1).sum())
        tr_n = int(vtr[:, j].sum())
        if tr_n == 0:
            skipped[name] = "no valid label in train split"
            continue
        if tr_pos == 0 or tr_pos == tr_n:
            skipped[name] = f"single class in train split ({tr_n} valid, {tr_pos} positive)"
            continue
        v = vte[:, j]
        pos = int((tte[v, j] == 1).sum())
        neg = int(v.sum()) - pos
        if pos == 0 or neg == 0:
            skipped[name] = f"single class in test split ({pos} positive, {neg} negative)"
            continue
        auc = auroc(scores[v, j], tte[v, j] == 1)
        per_label[name] = {"auroc": auc, "n_pos": pos, "n_neg": neg}
        used.append(j)
    if not used:
        raise ValueError(f"linear probe: no label has both classes in train and test; skipped {skipped}")
    macro = float(np.mean([per_label[names[j]]["auroc"] for j in used]))
    out: dict[str, Any] = {
        "macro_auroc": macro,
        "n_labels_evaluated": len(used),
        "per_label": per_label,
        "skipped": skipped,
        "uncertainty_policy": {"uncertain": uncertain, "blank": blank},
        "n_train": int(xtr.shape[0]),
        "n_test": int(xte.shape[0]),
        "l2": l2,
    }
    if test_patient is not None and n_boot > 0:
        out["macro_auroc_ci"] = _bootstrap_macro(scores, tte, vte, used, test_patient, n_boot, seed)
    if return_scores:
        out["scores"] = scores
        out["eval_labels"] = names
    return out


def auroc(scores: Any, positive: Any) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive``: the Mann-Whitney
    statistic P(score of a positive > score of a negative), ties counted half (the trapezoidal ROC
    area, as scikit-learn's roc_auc_score and torchmetrics compute it). Both classes must be present."""
    s = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).reshape(-1)
    pos = np.asarray(positive.cpu() if isinstance(positive, torch.Tensor) else positive, dtype=bool).reshape(-1)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes ({n_pos} positive, {n_neg} negative)")
    ranks = rankdata(s)  # average ranks of tied scores: a tie contributes 1/2
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _bootstrap_macro(scores, t, v, used, patient, n_boot, seed, block: int = 64) -> list[float]:
    """95% CI of the macro AUROC by bootstrap over patients. A replicate draws patients with
    replacement; a row then counts as many times as its patient was drawn, so each label's AUROC is
    the Mann-Whitney statistic with those multiplicities as weights (ties count half, as the ROC
    area does). Scores are sorted once per label and ``block`` replicates are weighted at a time,
    instead of re-sorting a resampled copy per replicate and label."""
    pat = np.asarray(patient).reshape(-1)
    if pat.size != scores.shape[0]:
        raise ValueError(f"test_patient has {pat.size} entries but the test split has {scores.shape[0]} rows")
    _, code = np.unique(pat, return_inverse=True)
    code = code.reshape(-1)
    n_pat = int(code.max()) + 1
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, n_pat, n_pat) for _ in range(n_boot)]
    sums = np.zeros(n_boot)
    counts = np.zeros(n_boot)
    s_all, t_all, v_all = scores.double().numpy(), t.numpy(), v.numpy()
    for j in used:
        rows = np.flatnonzero(v_all[:, j])
        order = rows[np.argsort(s_all[rows, j], kind="stable")]
        s_sorted = s_all[order, j]
        pos = t_all[order, j] == 1
        starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups
        for b0 in range(0, n_boot, block):
            mult = np.stack([np.bincount(p, minlength=n_pat) for p in picks[b0:b0 + block]])[:, code[order]]
            pos_w = np.add.reduceat(mult * pos, starts, axis=1).astype(np.float64)
            neg_w = np.add.reduceat(mult * ~pos, starts, axis=1).astype(np.float64)
            below = np.cumsum(neg_w, axis=1) - neg_w
            n_pos, n_neg = pos_w.sum(1), neg_w.sum(1)
            ok = (n_pos > 0) & (n_neg > 0)  # a replicate with one class has no AUROC for this label
            num = (pos_w * (below + 0.5 * neg_w)).sum(1)
            auc = np.divide(num, n_pos * n_neg, out=np.zeros_like(num), where=ok)
            sums[b0:b0 + block] += auc
            counts[b0:b0 + block] += ok
    reps = sums[counts > 0] / counts[counts > 0]
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return [float(lo), float(hi)]


class Probe:
    """``linear_probe`` with the settings of audit/settings.py (PROBE), the keys given overriding them:
    the probe evaluate.py runs on embeddings without Lightning (callbacks.audit.LinearProbe runs it
    during training, encoding the training images itself)."""

    def __init__(self, **given: Any):
        s = resolve_settings("probe", given)
        self.settings = {
            "train_split": str(s["train_split"]),
            "eval_labels": list(s["eval_labels"]) if s["eval_labels"] is not None else None,
            "uncertain": s["uncertain"], "blank": s["blank"], "l2": float(s["l2"]), "max_iter": int(s["max_iter"]),
            "max_train_samples": int(s["max_train_samples"]), "n_boot": int(s["n_boot"]), "seed": int(s["seed"]),
        }

    @classmethod
    def from_config(cls, node: Any) -> "Probe":
        """From an audit config node (configs/audit/probe.yaml's ``probe``): its callback options are not settings."""
        return cls(**config_settings("probe", node))

    def skip_reason(self, train_y: Any, test_y: Any) -> str | None:
        s = self.settings
        return probe_skip_reason(train_y, test_y, eval_labels=s["eval_labels"], uncertain=s["uncertain"], blank=s["blank"])

    def probe(self, train_x: Any, train_y: Any, test_x: Any, test_y: Any, test_patient: Any) -> dict[str, Any]:
        """linear_probe with these settings, on a seeded random subset of at most ``max_train_samples``
        training rows (all of them when fewer)."""
        s = self.settings
        idx = subsample_rows(len(train_x), s["max_train_samples"], s["seed"])
        return linear_probe(train_x[idx], train_y[idx], test_x, test_y, eval_labels=s["eval_labels"],
                            uncertain=s["uncertain"], blank=s["blank"], l2=s["l2"], max_iter=s["max_iter"],
                            test_patient=test_patient, n_boot=s["n_boot"], seed=s["seed"])
