"""The audit library's settings' defaults (re-linkage, probe, report quality): the one source of them.

Plain values only. The Hydra configs compose these very dicts (``configs/__init__.py`` registers
each as the config ``audit/settings/<name>`` in Hydra's ConfigStore: the training callbacks'
``configs/callbacks/audits.yaml`` and evaluate.py's ``configs/audit/*.yaml`` name it), so a setting
changed here changes every entry point, and the library (``audit.Relinkage``, ``audit.ReportQuality``,
``audit.relink``) reads them without Hydra or the rest of the project.
"""

from __future__ import annotations

import copy
from typing import Any

# The re-linkage audit (audit.relinkage.relinkage_audit). Pool sizes larger than the split are
# clipped to what it holds (the full database covers them) and recorded in the JSON.
RELINKAGE: dict[str, Any] = {
    "ks": [1, 5, 10],
    "ns": [100, 1000, 10000, "full"],
    "directions": ["i2t", "t2i"],
    # Pathology-matched hard negatives (evaluate.py's audit=standard turns them off).
    "hardneg": True,
    # blank (NaN) -> "not positive" like 0; uncertain (-1) kept as its own value. See audit/labels.py.
    "label_mapping": "blank_negative",
    "dedup": False,  # collapse identical report texts (needs report text hashes)
    "ties": "pessimistic",  # ties with the true report count against the model
    "n_boot": 1000,  # bootstrap over patients for the 95% CIs
    "seed": 0,
    # Collapsed or fully tied embeddings (a broken pipeline: audit/relinkage.py, docs/audit.md) are
    # refused; True audits them anyway and flags the result "degenerate" (headline, report.md, audit.json).
    "allow_degenerate": False,
    # How it runs (results identical either way):
    "chunk_size": None,  # queries per similarity chunk (None: ~128 MiB of scores)
    "device": None,  # None: the module's device (callbacks, checkpoints) / CPU (embeddings)
    "fused": "auto",  # fused counting kernels for large audits (numba on CPU; identical counts)
}

# The linear probe (audit.probe.linear_probe).
PROBE: dict[str, Any] = {
    "eval_labels": None,  # all 14 CheXpert labels, by name
    "uncertain": "ignore",  # -1 masked out per label (or zeros | ones)
    # Blank (not mentioned) reads as negative, as CheXpert evaluations do: labels that are only ever
    # stated positively (No Finding, Support Devices, ...) would otherwise have a single class.
    "blank": "zeros",  # or ignore (NaN masked out per label)
    "l2": 1.0e-3,
    "max_iter": 200,
    # Train-split images the probe is fitted on. During training the probe is refitted at every
    # validation epoch and these images are encoded each time, so the default is sized for the
    # default run: 2,000 keeps `python train.py` on 2 CPU cores within its budget, and it is the value
    # every published number (README, RESULTS.md, the DP results) was measured with. On a real cohort
    # raise it (callbacks.linear_probe.max_train_samples=50000, audit.probe.max_train_samples=50000):
    # rare labels need more positives than 2,000 images hold.
    "max_train_samples": 2000,
    "train_split": "train",  # where the probe is fitted (the DP stage uses its public cohort)
    "n_boot": 200,
    "seed": 0,
}

# The retrieved-report quality audit (audit.report_quality.report_quality_audit, see
# docs/report_quality.md).
REPORT_QUALITY: dict[str, Any] = {
    # Where each image query retrieves its report from: `train` (the training split's reports, as
    # retrieval-based report generation does; the query's own report is then not a candidate) or
    # `self` (the audited split; the query's own study and its patient's other studies are excluded).
    "database": "train",
    "mode": "top1",  # top1 | majority (most frequent label vector among the top k) | concat (top k joined)
    "k": 3,  # used by majority / concat only
    "lexical": True,  # BLEU-4 and ROUGE-L (torchmetrics, an optional dependency), secondary
    "baselines": True,  # GREEN-exact of a random report and of a random same-label report (exact expectations)
    "n_boot": 1000,  # bootstrap over patients for the 95% CIs
    "seed": 0,
    # GREEN's own language model (e.g. GREEN-radllama2-7b) from a local folder, model-judged, beside
    # the exact counts (audit/green_model.py; needs transformers and the green-score package). Never
    # downloaded.
    "green_model": None,
}

SETTINGS: dict[str, dict[str, Any]] = {"relinkage": RELINKAGE, "probe": PROBE, "report_quality": REPORT_QUALITY}


def defaults(name: str) -> dict[str, Any]:
    """A copy of the ``name`` audit's defaults ("relinkage" | "probe" | "report_quality")."""
    if name not in SETTINGS:
        raise KeyError(f"unknown audit {name!r}; expected one of {sorted(SETTINGS)}")
    return copy.deepcopy(SETTINGS[name])


def resolve(name: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``name`` audit's defaults updated with ``given``; a key the defaults do not define is a
    TypeError, as an unknown keyword argument would be."""
    base = defaults(name)
    unknown = sorted(set(given or {}) - set(base))
    if unknown:
        raise TypeError(f"unknown {name} audit settings {unknown}; known: {sorted(base)}")
    return {**base, **(given or {})}


def _plain(value: Any) -> Any:
    """A config value as plain Python: mappings -> dict, sequences -> list (an OmegaConf node resolves
    its interpolations on access, so no OmegaConf import is needed here)."""
    if isinstance(value, (str, bytes)) or value is None:
        return value
    if hasattr(value, "keys"):
        return {k: _plain(value[k]) for k in value.keys()}
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return value


def config_settings(name: str, node: Any) -> dict[str, Any]:
    """The ``name`` audit's settings given in a config node (a dict, or Hydra's DictConfig such as
    evaluate.py's ``audit.relinkage``): the keys its defaults define, as plain values; the node's other
    keys (``_target_``, callback options) are not settings."""
    known = SETTINGS[name] if name in SETTINGS else defaults(name)
    return {k: _plain(node[k]) for k in node.keys() if k in known}
