"""The adaptive attacker: re-linkage by someone who holds the released model *and* paired studies.

arXiv 2606.02276's attacker scores an image against every report by the cosine of the released
embeddings. A realistic attacker also holds the released weights (trunk and heads) and k auxiliary
(image, report) studies of their own, and can fit a new map between the two towers' frozen features.
This module runs such attacks on arrays; the audited split's attacker embeddings then go through the
same exact Recall@K-at-N machinery (audit/relinkage.py) as the released embeddings.

Threat model (docs/audit.md, "Adaptive attacker"):
* the attacker holds the released model: per-image trunk features (pre-projection), per-report trunk
  features, and the released (projected) embeddings of both;
* and ``n_aux`` auxiliary paired studies whose patients are *not* in the audited split (checked:
  ``check_disjoint`` raises otherwise): "leaked" studies of the training cohort, or a "public" cohort;
* every choice the attacker makes (ridge penalty, training length of a head) is made on its own
  auxiliary studies, never on the audited split.

Attacks (each fitted on study-level pairs: the mean of a study's views' features, and its report):
* ``cosine``      the baseline: cosine of the released embeddings (no auxiliary data);
* ``ridge``       ridge regression from image trunk features to report trunk features, penalty chosen
                  by patient-grouped k-fold cross-validated retrieval (MRR) on the auxiliary pairs (the
                  leave-one-study-out squared error's choice, 10-1000x more shrinkage on real features,
                  is recorded beside it); scored by the cosine of the predicted and the actual report
                  features, both centred on aux means;
* ``procrustes``  an orthogonal map (after centring on aux means) from released image embeddings to
                  released report embeddings: what a rotation of the released space recovers;
* ``head``        fresh linear heads on both towers' trunk features trained with symmetric InfoNCE on the
                  auxiliary pairs: several seeded restarts, each stopped by a convergence criterion on a
                  held-out fifth of them (whether the step budget was binding is recorded), ensembled.

Every (aux, n_aux) row is fitted on ``n_draws`` (default 5) seeded auxiliary draws: one draw of 100
studies is one sample of what such an attacker holds (over 8 draws of leaked@100 at paper scale, R@1 of
Procrustes ranged 2.98-5.15%), so a row reports the mean over draws, the min / median / max and an
interval over draws and audited patients (``over_draws``).

The best attack per (aux, n_aux) and per Recall@K-at-N row (by its mean over draws) is reported as
``best``: the number a defender must assume. It is a maximum selected on the audited split, so it (and its CI, which is the
selected attack's own) is optimistic for the attacker; each attack's own row and CI are unselected.

No Lightning, no project imports beyond the audit package: the glue that extracts the features from a
model lives in callbacks/adaptive.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxr_relink.audit.embeddings import EmbeddingSet, as_embeddings
from cxr_relink.audit.relinkage import DegenerateEmbeddingsError

ATTACKS = ("ridge", "procrustes", "head")
BASELINE = "cosine"
AUX_KINDS = ("leaked", "public")
# Penalties tried by ridge: multiples of the largest squared singular value of the centred aux features.
RIDGE_GRID = tuple(10.0 ** e for e in np.linspace(-6, 2, 17))
DEFAULT_HEAD = {"dim": None, "steps": 2000, "batch_size": 256, "lr": 3e-3, "weight_decay": 1e-4,
                "val_fraction": 0.2, "eval_every": 25, "temperature_init": 0.07, "restarts": 3, "patience": 6,
                "min_delta": 1e-3}
DEFAULT_RIDGE = {"cv_folds": 5}


# --------------------------------------------------------------------------- the data an attack sees
@dataclass
class PairedFeatures:
    """Studies seen through a released model.

    image_trunk [I, Di] per image item (pre-projection features), text_trunk [S, Dt] per study,
    image_released [I, D] and text_released [S, D] the released embeddings, item_study [I] in 0..S-1,
    study_patient [S] patient keys comparable across cohorts (e.g. a hash of the patient id; used for
    the disjointness check and the bootstrap), study_labels [S, 14] (optional, hard negatives),
    study_text_hash [S] (optional, dedup).
    """

    image_trunk: torch.Tensor
    text_trunk: torch.Tensor
    image_released: torch.Tensor
    text_released: torch.Tensor
    item_study: torch.Tensor
    study_patient: np.ndarray
    study_labels: np.ndarray | None = None
    study_text_hash: list[str] | None = None
    name: str = "features"

    def __post_init__(self) -> None:
        n = self.name
        self.image_trunk = as_embeddings(self.image_trunk, f"{n}: image_trunk")
        self.text_trunk = as_embeddings(self.text_trunk, f"{n}: text_trunk")
        self.image_released = as_embeddings(self.image_released, f"{n}: image_released")
        self.text_released = as_embeddings(self.text_released, f"{n}: text_released")
        self.item_study = torch.as_tensor(np.asarray(self.item_study)).reshape(-1).long()
        self.study_patient = np.asarray(self.study_patient).reshape(-1)
        n_i, n_s = self.image_trunk.shape[0], self.text_trunk.shape[0]
        for what, rows, want in (("image_released", self.image_released.shape[0], n_i),
                                 ("item_study", self.item_study.numel(), n_i),
                                 ("text_released", self.text_released.shape[0], n_s),
                                 ("study_patient", self.study_patient.shape[0], n_s)):
            if rows != want:
                raise ValueError(f"{n}: {what} has {rows} rows, expected {want}")
        if self.image_released.shape[1] != self.text_released.shape[1]:
            raise ValueError(f"{n}: released image dim {self.image_released.shape[1]} != report dim "
                             f"{self.text_released.shape[1]}")
        if n_i and (int(self.item_study.min()) < 0 or int(self.item_study.max()) >= n_s):
            raise ValueError(f"{n}: item_study must index the {n_s} studies")
        counts = torch.bincount(self.item_study, minlength=n_s)
        if (counts == 0).any():
            raise ValueError(f"{n}: {int((counts == 0).sum())} studies have no image item")
        if self.study_labels is not None and np.asarray(self.study_labels).shape[0] != n_s:
            raise ValueError(f"{n}: study_labels has {np.asarray(self.study_labels).shape[0]} rows, expected {n_s}")
        if self.study_text_hash is not None and len(self.study_text_hash) != n_s:
            raise ValueError(f"{n}: study_text_hash has {len(self.study_text_hash)} entries, expected {n_s}")

    @property
    def n_studies(self) -> int:
        return int(self.text_trunk.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.image_trunk.shape[0])

    def study_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-item rows [I, d] -> the mean over each study's items [S, d]."""
        s = torch.zeros(self.n_studies, x.shape[1], dtype=torch.float64).index_add_(0, self.item_study, x.double())
        return s / torch.bincount(self.item_study, minlength=self.n_studies).unsqueeze(1).double()

    def select(self, studies: np.ndarray) -> "PairedFeatures":
        """The given studies (indices) and their items, renumbered."""
        studies = np.asarray(studies, dtype=np.int64)
        new = torch.full((self.n_studies,), -1, dtype=torch.long)
        new[torch.as_tensor(studies)] = torch.arange(studies.size)
        rows = (new[self.item_study] >= 0).nonzero().flatten()
        st = torch.as_tensor(studies)
        return replace(
            self, image_trunk=self.image_trunk[rows], text_trunk=self.text_trunk[st],
            image_released=self.image_released[rows], text_released=self.text_released[st],
            item_study=new[self.item_study[rows]], study_patient=self.study_patient[studies],
            study_labels=None if self.study_labels is None else np.asarray(self.study_labels)[studies],
            study_text_hash=None if self.study_text_hash is None else [self.study_text_hash[i] for i in studies])

    def embedding_set(self, image_emb: torch.Tensor, report_emb: torch.Tensor) -> EmbeddingSet:
        """An attacker's embeddings of these studies as the re-linkage audit's input."""
        _, codes = np.unique(self.study_patient, return_inverse=True)
        return EmbeddingSet(image_emb.float(), report_emb.float(), self.item_study.clone(),
                            torch.as_tensor(codes.reshape(-1), dtype=torch.long),
                            None if self.study_labels is None else np.asarray(self.study_labels, dtype=np.float32),
                            self.study_text_hash)


def check_disjoint(target: PairedFeatures, aux: PairedFeatures, aux_name: str) -> None:
    """Raise if an auxiliary study belongs to a patient of the audited split: the attacker would be
    fitted on the very patients it is scored on."""
    shared = np.intersect1d(target.study_patient, aux.study_patient)
    if shared.size:
        raise ValueError(f"adaptive attacker: the auxiliary set {aux_name!r} shares {shared.size} patient(s) with the "
                         f"audited split (e.g. {shared[:3].tolist()}); auxiliary studies must come from other patients "
                         "(another split or cohort)")


# --------------------------------------------------------------------------- ridge
@dataclass
class RidgeMap:
    mean_x: torch.Tensor
    mean_y: torch.Tensor
    weight: torch.Tensor          # [Dx, Dy]
    penalty: float
    grid: list[float] = field(default_factory=list)
    loo_mse: list[float] = field(default_factory=list)
    cv_score: list[float] = field(default_factory=list)
    selection: str = "given"      # "given" | "retrieval_cv" | "loo_mse"
    cv_folds: int = 0

    def predict_centred(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean_x) @ self.weight


def ridge_loo_mse(x: torch.Tensor, y: torch.Tensor, penalties: Sequence[float]) -> list[float]:
    """Mean squared leave-one-out residual (summed over outputs, mean over rows) of ridge regression
    with an unpenalised intercept, for each penalty: the closed form e_i / (1 - h_ii) of a linear
    smoother, H = 11^T/n + Xc (Xc^T Xc + lambda I)^-1 Xc^T, from one SVD of the centred X."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    xc, yc = x - x.mean(0), y - y.mean(0)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    uty = u.T @ yc
    out = []
    for lam in penalties:
        f = s**2 / (s**2 + lam)
        resid = yc - u @ (f.unsqueeze(1) * uty)
        h = 1.0 / n + (u**2) @ f
        out.append(float(((resid / (1 - h).clamp_min(1e-12).unsqueeze(1)) ** 2).sum() / n))
    return out


def patient_folds(study_patient: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """A fold id in 0..k'-1 per study, k' = min(k, #patients): patients in a seeded order dealt round-robin,
    so every study of a patient is in one fold (a patient's studies share anatomy and history: splitting
    them would score the penalty on near-duplicates of its training rows)."""
    pats, code = np.unique(np.asarray(study_patient).reshape(-1), return_inverse=True)
    k = min(int(k), pats.size)
    fold_of = np.empty(pats.size, dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(pats.size)] = np.arange(pats.size) % k
    return fold_of[code.reshape(-1)]


def retrieval_mrr(query: torch.Tensor, cand: torch.Tensor) -> float:
    """Mean reciprocal rank of row i of ``cand`` for query row i, by cosine, ties pessimistic."""
    s = F.normalize(query.double(), dim=1) @ F.normalize(cand.double(), dim=1).T
    above = (s >= s.diagonal().unsqueeze(1)).sum(1) - 1
    return float((1.0 / (above + 1).double()).mean())


def ridge_cv_retrieval(x: torch.Tensor, y: torch.Tensor, study_patient: np.ndarray, penalties: Sequence[float],
                       k: int = 5, seed: int = 0) -> tuple[list[float], np.ndarray]:
    """Patient-grouped k-fold cross-validated retrieval score of ridge (intercept unpenalised) for each
    penalty: fitted on the other folds, each held-out study's predicted report features (centred on the
    fitting folds' means) rank its own report among the held-out fold's reports (cosine, the attack's
    score); the mean reciprocal rank, weighted by fold size. Returns the scores and the folds."""
    x, y = x.double(), y.double()
    folds = patient_folds(study_patient, k, seed)
    scores = np.zeros(len(penalties))
    used = 0
    for f in range(int(folds.max()) + 1):
        test = torch.as_tensor(np.flatnonzero(folds == f))
        fit = torch.as_tensor(np.flatnonzero(folds != f))
        if test.numel() < 2 or fit.numel() < 2:
            continue
        mx, my = x[fit].mean(0), y[fit].mean(0)
        u, s, vt = torch.linalg.svd(x[fit] - mx, full_matrices=False)
        uty = u.T @ (y[fit] - my)
        xq, yq = x[test] - mx, y[test] - my
        for j, lam in enumerate(penalties):
            w = vt.T @ ((s / (s**2 + lam)).unsqueeze(1) * uty)
            scores[j] += test.numel() * retrieval_mrr(xq @ w, yq)
        used += test.numel()
    if used == 0:
        raise ValueError("ridge retrieval CV: no fold holds 2 studies out")
    return (scores / used).tolist(), folds


def ridge_fit(x: torch.Tensor, y: torch.Tensor, penalty: float | None = None,
              grid: Sequence[float] = RIDGE_GRID, study_patient: np.ndarray | None = None, cv_folds: int = 5,
              seed: int = 0) -> RidgeMap:
    """Ridge regression y ~ x (intercept unpenalised). ``penalty`` None: chosen from ``grid`` x the largest
    squared singular value of the centred x, by the best patient-grouped ``cv_folds``-fold retrieval score
    (ridge_cv_retrieval: what the attack is used for) when ``study_patient`` is given and has >= 2 patients,
    else by the smallest exact leave-one-out squared error. Both curves are recorded when computed."""
    x, y = x.double(), y.double()
    if x.shape[0] < 3:
        raise ValueError(f"ridge needs at least 3 auxiliary pairs, got {x.shape[0]}")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    u, s, vt = torch.linalg.svd(xc, full_matrices=False)
    lams, loo, cv, how, n_folds = [], [], [], "given", 0
    if penalty is None:
        scale = float(s.max() ** 2) if s.numel() and float(s.max()) > 0 else 1.0
        lams = [g * scale for g in grid]
        loo = ridge_loo_mse(x, y, lams)
        if study_patient is not None and np.unique(study_patient).size >= 2:
            cv, folds = ridge_cv_retrieval(x, y, study_patient, lams, cv_folds, seed)
            penalty, how, n_folds = lams[int(np.argmax(cv))], "retrieval_cv", int(folds.max()) + 1
        else:
            penalty, how = lams[int(np.argmin(loo))], "loo_mse"
    if penalty <= 0:
        raise ValueError(f"ridge penalty must be > 0, got {penalty}")
    w = vt.T @ ((s / (s**2 + penalty)).unsqueeze(1) * (u.T @ yc))
    return RidgeMap(mx, my, w, float(penalty), lams, loo, cv, how, n_folds)


# --------------------------------------------------------------------------- orthogonal Procrustes
def orthogonal_procrustes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The orthogonal R minimising ||a R - b||_F: U V^T of the SVD of a^T b (Schönemann, 1966)."""
    if a.shape != b.shape:
        raise ValueError(f"procrustes needs two arrays of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    u, _, vt = torch.linalg.svd(a.double().T @ b.double())
    return u @ vt


# --------------------------------------------------------------------------- fresh heads (InfoNCE)
def _standardise(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    m, sd = ref.mean(0), ref.std(0).clamp_min(1e-6)
    return ((x - m) / sd).float()


def _val_mrr(zi: torch.Tensor, zt: torch.Tensor) -> float:
    """Mean reciprocal rank of each held-out image's own report among the held-out reports (ties
    pessimistic): the attacker's own validation score."""
    s = F.normalize(zi, dim=1) @ F.normalize(zt, dim=1).T
    own = s.diagonal().unsqueeze(1)
    above = (s >= own).sum(1) - 1
    return float((1.0 / (above + 1).double()).mean())


def _train_loop(xi, xt, wi, wt, scale, opt, order, starts, counts, fit_t, b, steps, eval_every, xi_val, xt_val,
                n_val, gen, patience, min_delta):
    """One restart of train_heads: symmetric InfoNCE steps, the held-out MRR every ``eval_every`` steps, stopped
    once it has not improved by more than ``min_delta`` for ``patience`` evaluations (converged) or at the
    ``steps`` budget (not converged: the budget was binding). Returns (best MRR, its step, its weights),
    the curve, the steps run and whether it converged (None without held-out studies)."""
    curve, best, since = [], (-1.0, 0, wi.detach().clone(), wt.detach().clone()), 0
    converged, step = (False if n_val >= 2 else None), 0
    for step in range(1, steps + 1):
        pick = fit_t[torch.randperm(fit_t.numel(), generator=gen)[:b]]
        view = (torch.rand(b, generator=gen) * counts[pick]).long()
        zi = F.normalize(xi[order[starts[pick] + view]] @ wi, dim=1)
        zt = F.normalize(xt[pick] @ wt, dim=1)
        logits = scale.clamp(max=math.log(100.0)).exp() * zi @ zt.T
        target = torch.arange(b)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if n_val >= 2 and (step % eval_every == 0 or step == steps):
            with torch.no_grad():
                mrr = _val_mrr(xi_val @ wi, xt_val @ wt)
            curve.append([step, mrr])
            if mrr > best[0]:
                since = 0 if mrr > best[0] + min_delta else since + 1
                best = (mrr, step, wi.detach().clone(), wt.detach().clone())
            else:
                since += 1
            if since >= patience:
                converged = True
                break
    if n_val < 2:  # too few patients to hold any out: the last step
        best = (float("nan"), step, wi.detach().clone(), wt.detach().clone())
    return best, curve, step, converged


def _ensemble(maps: list[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The restarts' unit embeddings side by side, over sqrt(#restarts): the cosine of two such embeddings is
    the mean of the restarts' cosines, a smooth function of each restart (no pick among them)."""
    return lambda f: torch.cat([F.normalize(m(f), dim=1) for m in maps], 1) / math.sqrt(len(maps))


def train_heads(aux: PairedFeatures, dim: int, seed: int = 0, steps: int = 2000, batch_size: int = 256,
                lr: float = 3e-3, weight_decay: float = 1e-4, val_fraction: float = 0.2, eval_every: int = 25,
                temperature_init: float = 0.07, restarts: int = 3, patience: int = 6,
                min_delta: float = 1e-3) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                  Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """Fresh linear heads (image and report trunk features -> ``dim``) trained with symmetric InfoNCE on
    the auxiliary studies, one random view of each study per step, ``restarts`` times from independent
    seeded initialisations and batch orders. A held-out ``val_fraction`` of the studies (by patient; the
    same for every restart) stops each restart once its held-out MRR has not improved by ``min_delta`` in
    ``patience`` evaluations (every ``eval_every`` steps; ``steps`` is the budget) and picks its best step.
    The attack's embedding is the restarts' ensemble (``_ensemble``): a single restart's result moved by
    several points between features 5e-7 apart at paper scale. Returns the two maps (trunk features ->
    embeddings) and what was chosen; ``budget_binding`` is true when a restart ran out of steps before it
    converged (None without held-out patients)."""
    if int(restarts) < 1:
        raise ValueError(f"the head attack needs restarts >= 1, got {restarts}")
    gen = torch.Generator().manual_seed(int(seed))
    n = aux.n_studies
    if n < 4:
        raise ValueError(f"the head attack needs at least 4 auxiliary studies, got {n}")
    # Held-out studies by patient: a patient's studies are on one side only.
    pats, pcode = np.unique(aux.study_patient, return_inverse=True)
    perm = torch.randperm(len(pats), generator=gen).numpy()
    n_val_p = int(round(val_fraction * len(pats))) if len(pats) >= 5 else 0
    val_p = set(perm[:n_val_p].tolist())
    is_val = np.array([c in val_p for c in pcode.reshape(-1)])
    fit_s = np.flatnonzero(~is_val)
    val_s = np.flatnonzero(is_val)
    xi_ref, xt_ref = aux.image_trunk, aux.text_trunk
    xi = _standardise(aux.image_trunk, xi_ref)
    xt = _standardise(aux.text_trunk, xt_ref)
    # Items of each study, padded: one random view per study per step.
    order = torch.argsort(aux.item_study, stable=True)
    counts = torch.bincount(aux.item_study, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    xi_val = _standardise(aux.study_mean(aux.image_trunk), xi_ref)[torch.as_tensor(val_s)]
    xt_val = xt[torch.as_tensor(val_s)]
    fit_t = torch.as_tensor(fit_s)
    b = min(batch_size, fit_s.size)
    threads = torch.get_num_threads()
    if b * (xi.shape[1] + xt.shape[1]) * dim < 5e7:
        # Small steps: one intra-op thread. Several threads spend more on synchronising than on the
        # matmuls: on a shared 2-core CPU, 300 steps of 256 x 128 -> 64 took 15 s, and 2 s on one thread.
        torch.set_num_threads(1)
    runs, maps_i, maps_t = [], [], []
    try:
        for r in range(int(restarts)):
            if r:  # restart 0 continues the split's generator (the single-run attack); others their own seed
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), r]).generate_state(1)[0]))
            wi = torch.nn.Parameter(torch.randn(xi.shape[1], dim, generator=gen) / math.sqrt(xi.shape[1]))
            wt = torch.nn.Parameter(torch.randn(xt.shape[1], dim, generator=gen) / math.sqrt(xt.shape[1]))
            scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))
            opt = torch.optim.AdamW([wi, wt, scale], lr=lr, weight_decay=weight_decay)
            best, curve, ran, conv = _train_loop(xi, xt, wi, wt, scale, opt, order, starts, counts, fit_t, b, steps,
                                                 eval_every, xi_val, xt_val, val_s.size, gen, patience, min_delta)
            mrr, step, wi_b, wt_b = best
            maps_i.append(lambda f, w=wi_b: _standardise(f, xi_ref) @ w)
            maps_t.append(lambda f, w=wt_b: _standardise(f, xt_ref) @ w)
            runs.append({"steps_chosen": int(step), "steps_run": int(ran), "converged": conv,
                         "val_mrr": mrr if val_s.size >= 2 else None, "val_curve": curve})
    finally:
        torch.set_num_threads(threads)
    fi, ft = _ensemble(maps_i), _ensemble(maps_t)
    with torch.no_grad():
        ens_mrr = _val_mrr(fi(aux.study_mean(aux.image_trunk)[torch.as_tensor(val_s)]),
                           ft(aux.text_trunk[torch.as_tensor(val_s)])) if val_s.size >= 2 else None
    conv = [x["converged"] for x in runs]
    info = {"dim": int(dim), "restarts": len(runs), "steps_max": int(steps),
            "steps_chosen": int(np.median([x["steps_chosen"] for x in runs])),
            "budget_binding": None if val_s.size < 2 else not all(conv), "val_studies": int(val_s.size),
            "fit_studies": int(fit_s.size), "val_mrr": ens_mrr,
            "val_mrr_restarts": [x["val_mrr"] for x in runs], "runs": runs, "seed": int(seed)}
    return fi, ft, info


# --------------------------------------------------------------------------- attacks
Embed = Callable[["PairedFeatures"], tuple[torch.Tensor, torch.Tensor]]


def fit_attack(attack: str, aux: PairedFeatures | None, dim: int, seed: int = 0,
               head: dict[str, Any] | None = None, ridge: dict[str, Any] | None = None) -> tuple[Embed, dict[str, Any]]:
    """Fit ``attack`` on the auxiliary studies (study-level pairs). Returns the attacker's embedding of any
    studies seen through the same model (image items [I, d], reports [S, d]) and what the fit chose.
    ``dim``: the released embedding dimension (the head attack's default output size)."""
    if attack == BASELINE:
        return (lambda t: (t.image_released, t.text_released)), {"space": "released"}
    if aux is None:
        raise ValueError(f"attack {attack!r} needs auxiliary studies")
    if attack == "ridge":
        r = {**DEFAULT_RIDGE, **(ridge or {})}
        m = ridge_fit(aux.study_mean(aux.image_trunk), aux.text_trunk, study_patient=aux.study_patient,
                      cv_folds=int(r["cv_folds"]), seed=seed)
        edge = bool(m.grid) and m.penalty in (m.grid[0], m.grid[-1])
        loo_pick = m.grid[int(np.argmin(m.loo_mse))] if m.loo_mse else None
        return ((lambda t: (m.predict_centred(t.image_trunk), t.text_trunk.double() - m.mean_y)),
                {"space": "trunk", "penalty": m.penalty, "penalty_selection": m.selection, "cv_folds": m.cv_folds,
                 "cv_mrr_max": max(m.cv_score) if m.cv_score else None, "penalty_at_grid_edge": edge,
                 "loo_mse_penalty": loo_pick, "loo_mse_min": min(m.loo_mse) if m.loo_mse else None})
    if attack == "procrustes":
        a = F.normalize(aux.study_mean(aux.image_released), dim=1)
        b = F.normalize(aux.text_released.double(), dim=1)
        ma, mb = a.mean(0), b.mean(0)
        r = orthogonal_procrustes(a - ma, b - mb)
        return ((lambda t: ((F.normalize(t.image_released.double(), dim=1) - ma) @ r,
                            F.normalize(t.text_released.double(), dim=1) - mb)),
                {"space": "released", "centred": True})
    if attack == "head":
        h = {**DEFAULT_HEAD, **(head or {})}
        out_dim = int(h.pop("dim") or dim)
        fi, ft, info = train_heads(aux, out_dim, seed=seed, **h)

        def embed(t: PairedFeatures) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                return fi(t.image_trunk), ft(t.text_trunk)

        return embed, {"space": "trunk", **info}
    raise ValueError(f"unknown attack {attack!r}; expected {BASELINE!r} or one of {ATTACKS}")


def resolve_n_aux(requested: Sequence[int | str], available: int) -> tuple[list[tuple[int | str, int]], list[int]]:
    """[(requested, studies used)] and the requested sizes not below ``available`` (covered by "all",
    which is added when they were requested without it)."""
    out, clipped = [], []
    for k in requested:
        if isinstance(k, str):
            if k != "all":
                raise ValueError(f"n_aux values are integers or 'all', got {k!r}")
            continue
        if int(k) < 4:
            raise ValueError(f"n_aux values must be >= 4 studies, got {k}")
        if int(k) < available:
            out.append((int(k), int(k)))
        else:
            clipped.append(int(k))
    if "all" in requested or clipped:
        out.append(("all", available))
    seen, uniq = set(), []
    for req, used in out:
        if used not in seen:
            seen.add(used)
            uniq.append((req, used))
    return uniq, clipped


def draw_seed(seed: int, draw: int) -> int:
    """The seed of auxiliary draw ``draw``: ``seed`` itself for draw 0 (the single draw of earlier versions),
    else one derived from (seed, draw) by numpy's SeedSequence."""
    return int(seed) if draw == 0 else int(np.random.SeedSequence([int(seed), int(draw)]).generate_state(1)[0])


def draw_order(n: int, seed: int, draw: int) -> np.ndarray:
    """Draw ``draw``'s seeded order of ``n`` auxiliary studies; its subsets of every size are nested prefixes."""
    return np.random.default_rng(draw_seed(seed, draw)).permutation(n)


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def summarise_draws(relinkages: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per re-linkage section and Recall@K-at-N row, over the auxiliary draws: the values, their min / median /
    max / mean / sd, ``ci_draws`` (Student t 95% interval of the mean over draws: draw-to-draw variation
    only, None for one draw) and ``ci`` (that half-width and the draws' mean patient-bootstrap half-width
    added in quadrature: an approximate 95% interval over draws and audited patients), with chance and x
    chance of the mean."""
    ok = [r for r in relinkages if r]
    out: dict[str, list[dict[str, Any]]] = {}
    if not ok:
        return out
    for key, sec in ok[0].items():
        rows = []
        for row in sec.get("recall", []):
            same = [next((o for o in (r.get(key) or {}).get("recall", []) if o["k"] == row["k"] and o["n"] == row["n"]),
                         None) for r in ok]
            same = [o for o in same if o is not None]
            v = np.array([o["value"] for o in same], dtype=np.float64)
            d = v.size
            mean, sd = float(v.mean()), float(v.std(ddof=1)) if d > 1 else 0.0
            half_d = _t975(d - 1) * sd / math.sqrt(d) if d > 1 else 0.0
            cis = [o["ci"] for o in same if o.get("ci")]
            half_p = float(np.mean([(c[1] - c[0]) / 2 for c in cis])) if cis else None
            half = math.hypot(half_d, half_p) if half_p is not None else (half_d if d > 1 else None)
            chance = row["chance"]
            ci = None if half is None else [max(0.0, mean - half), min(1.0, mean + half)]
            rows.append({"k": row["k"], "n": row["n"], "n_value": row["n_value"], "n_draws": int(d),
                         "values": v.tolist(), "min": float(v.min()), "median": float(np.median(v)),
                         "max": float(v.max()), "mean": mean, "sd": sd,
                         "ci_draws": [mean - half_d, mean + half_d] if d > 1 else None, "ci": ci,
                         "chance": chance, "x_chance": mean / chance if chance else None,
                         "x_chance_ci": [c / chance for c in ci] if ci and chance else None})
        out[key] = rows
    return out


def best_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (aux, n_aux) group and per re-linkage row (section, K, N): the attack with the largest mean Recall
    over its auxiliary draws (the baseline cosine, one "draw", is a candidate in every group), with that
    attack's spread over draws and its interval over draws and patients (``summarise_draws``). Selected on
    the audited split: optimistic."""
    def over(c: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        return c.get("over_draws") or summarise_draws([c.get("relinkage") or {}])

    base = [r for r in rows if r["attack"] == BASELINE]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["attack"] != BASELINE:
            groups.setdefault((r["aux"], r["n_aux_requested"], r["n_aux"]), []).append(r)
    out = []
    for (aux, req, used), members in groups.items():
        cands = base + members
        for key, sec in over(cands[0]).items():
            for row in sec:
                best, who, base_v = None, None, None
                for c in cands:
                    rr = next((o for o in over(c).get(key, []) if o["k"] == row["k"] and o["n"] == row["n"]), None)
                    if rr is None:
                        continue
                    if c["attack"] == BASELINE:
                        base_v = rr["mean"]
                    if best is None or rr["mean"] > best["mean"]:
                        best, who = rr, c["attack"]
                out.append({"aux": aux, "n_aux_requested": req, "n_aux": used, "key": key, "k": row["k"],
                            "n": row["n"], "n_value": best["n_value"], "attack": who, "value": best["mean"],
                            "ci": best["ci"], "n_draws": best["n_draws"], "min": best["min"],
                            "median": best["median"], "max": best["max"], "ci_draws": best["ci_draws"],
                            "chance": best["chance"], "x_chance": best["x_chance"],
                            "x_chance_ci": best["x_chance_ci"], "baseline_value": base_v,
                            "selected_on_audited_split": True})
    return out


def adaptive_audit(target: PairedFeatures, aux: dict[str, PairedFeatures], relink: Callable[[EmbeddingSet], dict],
                   n_aux: Sequence[int | str] = (100, 1000, "all"), attacks: Sequence[str] = ATTACKS, seed: int = 0,
                   head: dict[str, Any] | None = None, aux_info: dict[str, dict] | None = None,
                   ridge: dict[str, Any] | None = None, n_draws: int = 5) -> dict[str, Any]:
    """The adaptive-attacker section of audit.json: the baseline cosine row, one row per (attack, aux,
    n_aux) and the best attack per group (see the module docstring). ``relink`` audits an EmbeddingSet
    (e.g. ``audit.relinkage.Relinkage(...).audit``): every row's ``relinkage`` (its first draw's) has the
    same format as audit.json's ``relinkage``. Each (aux, n_aux) row is fitted on ``n_draws`` seeded
    auxiliary draws (``draw_order``: nested subsets within a draw; one draw when the size is the whole
    source, as every draw would be the same studies), each draw's attack seeded by ``draw_seed``;
    ``over_draws`` summarises them (``summarise_draws``), ``draws`` lists each."""
    for a in attacks:
        if a not in ATTACKS:
            raise ValueError(f"unknown attack {a!r}; expected a subset of {ATTACKS}")
    if int(n_draws) < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    for name, feats in aux.items():
        check_disjoint(target, feats, name)
    base = relink(target.embedding_set(target.image_released, target.text_released))
    rows = [{"attack": BASELINE, "aux": None, "n_aux_requested": 0, "n_aux": 0, "n_draws": 1,
             "fit": {"space": "released"}, "relinkage": base, "over_draws": summarise_draws([base])}]
    clipped_all = {}
    for name, feats in aux.items():
        sizes, clipped = resolve_n_aux(n_aux, feats.n_studies)
        if clipped:
            clipped_all[name] = clipped
        orders = [draw_order(feats.n_studies, seed, d) for d in range(int(n_draws))]
        for req, used in sizes:
            draws_here = 1 if used >= feats.n_studies else int(n_draws)
            per: dict[str, list[dict[str, Any]]] = {a: [] for a in attacks}
            for d in range(draws_here):
                sub = feats.select(np.sort(orders[d][:used]))
                for a in attacks:
                    embed, fit = fit_attack(a, sub, target.image_released.shape[1], seed=draw_seed(seed, d), head=head,
                                            ridge=ridge)
                    qi, qt = embed(target)
                    dr = {"draw": d, "seed": draw_seed(seed, d), "n_aux_patients": int(np.unique(sub.study_patient).size),
                          "fit": fit}
                    try:
                        dr["relinkage"] = relink(target.embedding_set(qi.float(), qt.float()))
                    except DegenerateEmbeddingsError as e:  # the attack failed (e.g. collapsed): no number, the reason
                        dr.update(relinkage={}, failed=str(e))
                    per[a].append(dr)
            for a in attacks:
                ds = per[a]
                row = {"attack": a, "aux": name, "n_aux_requested": req, "n_aux": used, "n_draws": len(ds),
                       "n_aux_patients": ds[0]["n_aux_patients"], "fit": ds[0]["fit"], "relinkage": ds[0]["relinkage"],
                       "over_draws": summarise_draws([x["relinkage"] for x in ds]),
                       "n_failed_draws": sum(1 for x in ds if x.get("failed")),
                       "draws": [{"draw": x["draw"], "seed": x["seed"], "n_aux_patients": x["n_aux_patients"],
                                  "fit": {k: v for k, v in x["fit"].items() if k != "runs"},
                                  **({"failed": x["failed"]} if x.get("failed") else {}),
                                  "recall": {k: [{"k": o["k"], "n": o["n"], "value": o["value"], "ci": o.get("ci")}
                                                 for o in sec.get("recall", [])]
                                             for k, sec in x["relinkage"].items()}} for x in ds]}
                if ds[0].get("failed"):
                    row["failed"] = ds[0]["failed"]
                rows.append(row)
    return {
        "attacks": [BASELINE, *attacks],
        "n_aux_requested": list(n_aux),
        "n_draws": int(n_draws),
        "clipped_n_aux": clipped_all,
        "aux": {name: {"n_studies": f.n_studies, "n_items": f.n_items,
                       "n_patients": int(np.unique(f.study_patient).size), **((aux_info or {}).get(name) or {})}
                for name, f in aux.items()},
        "audited": {"n_studies": target.n_studies, "n_items": target.n_items},
        "seed": int(seed),
        "rows": rows,
        "best": best_rows(rows),
        "note": ("each row: n_draws seeded auxiliary draws (one for the whole source); over_draws: mean, min / "
                 "median / max and a 95% interval over draws and audited patients; relinkage: the first draw's. "
                 "best: the largest mean Recall over the attacks (baseline included) per group and row, selected "
                 "on the audited split, so optimistic for the attacker; its interval is the selected attack's own"),
    }
