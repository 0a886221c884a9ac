"""Confidence intervals: percentile bootstrap over patients (the studies of one patient are
correlated, so patients, not queries, are resampled)."""

from __future__ import annotations

import torch


def bootstrap_patient_means(
    values: torch.Tensor, patient: torch.Tensor, n_boot: int, seed: int = 0
) -> torch.Tensor:
    """Replicates of the per-query mean, resampling patients with replacement.

    values [Q, F] float, patient [Q] integer codes. Returns [n_boot, F] float64.
    """
    vals = values.reshape(values.shape[0], -1).to(torch.float64)
    _, pcode = torch.unique(patient.reshape(-1), return_inverse=True)
    n_p = int(pcode.max()) + 1
    sums = torch.zeros(n_p, vals.shape[1], dtype=torch.float64).index_add_(0, pcode, vals)
    counts = torch.bincount(pcode, minlength=n_p).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    reps = []
    step = max(1, min(n_boot, (1 << 22) // n_p))
    for s in range(0, n_boot, step):
        b = min(step, n_boot - s)
        draw = torch.randint(n_p, (b, n_p), generator=gen)
        w = torch.zeros(b, n_p, dtype=torch.float64).scatter_add_(1, draw, torch.ones(b, n_p, dtype=torch.float64))
        reps.append((w @ sums) / (w @ counts).unsqueeze(1))
    return torch.cat(reps, 0) if reps else torch.zeros(0, vals.shape[1], dtype=torch.float64)


def percentile_ci(reps: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    a = (1 - level) / 2
    q = torch.tensor([a, 1 - a], dtype=torch.float64)
    lo_hi = torch.quantile(reps, q, dim=0)
    return lo_hi[0], lo_hi[1]
