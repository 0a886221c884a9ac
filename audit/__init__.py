"""The audit library: how re-linkable is a model, and what are its embeddings still good for.

Pure functions on embeddings, depending on numpy, torch and scipy only (numba, when installed, speeds
the counting up; matplotlib draws the plots; torchmetrics scores BLEU/ROUGE): no Lightning, no Hydra
and nothing else of this repository, so ``pip install .`` gives a privacy team ``import audit``
anywhere. The callbacks in callbacks/ run it during training, evaluate.py on a checkpoint, an existing
model or a file of embeddings; bench/ and experiments/ call it directly.

    from cxr_relink import audit
    res = audit.relink(image_emb, report_emb, patient_id=patient_id, labels=labels)
    print(res.at(k=1, n=100))          # RecallAtN(value, ci, chance, x_chance, x_chance_ci, ...)
    print(res.table())                 # every variant, K and N as a Markdown table

Modules:

api         relink(): paired arrays in, a RelinkageResult (Recall@K keyed by int N) out
embeddings  EmbeddingSet, input validation, the validation-output contract, the one report hash
counting    per-query counts of beaters and ties: one chunked pass over the similarities
recall      exact expected Recall@K at N (hypergeometric), rank statistics
stats       bootstrap over patients, percentile CIs
labels      the 14 CheXpert label names; pathology label groups (hard negatives)
relinkage   relinkage_audit: every variant (i2t, t2i, hard negatives, dedup) as JSON-able sections
settings    the audits' default settings (the one source; Hydra composes them too)
probe       linear probe, macro AUROC over the CheXpert labels
membership  member vs non-member linkage test (the e^eps bound of a DP model)
one_run     empirical epsilon lower bound from one training run with canaries
result      the versioned audit.json schema, scalars, plot, report, and the one bundle writer
bundle      the final bundle (train.py's final audit, evaluate.py): callbacks' results put together, written once
reference   Monte Carlo and explicit-pool references (tests and cross-checks)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module defining it. Imported on first use (PEP 562), so ``import audit`` (and
# ``datamodules.records``, which takes the label names from audit.labels) stays cheap.
_EXPORTS = {
    "relink": "cxr_relink.audit.api",
    "RelinkageResult": "cxr_relink.audit.api",
    "RecallAtN": "cxr_relink.audit.api",
    "relinkage_audit": "cxr_relink.audit.relinkage",
    "Relinkage": "cxr_relink.audit.relinkage",
    "EmbeddingSet": "cxr_relink.audit.embeddings",
    "linear_probe": "cxr_relink.audit.probe",
    "CHEXPERT_LABELS": "cxr_relink.audit.labels",
    "NUM_LABELS": "cxr_relink.audit.labels",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'audit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
