"""The audit in one call: ``audit.relink(image_emb, report_emb, patient_id=..., labels=...)``.

A thin layer over ``audit.relinkage.relinkage_audit`` (which computes everything): paired arrays in,
a typed result out whose Recall@K rows are keyed by ``(variant, K, N)`` with an *integer* N (the
full database is N = its size, also reachable as ``n="full"``). ``result.sections`` is the same
JSON-able dict that ``audit.json`` stores under "relinkage" (where N is the string "100" or "full",
schema unchanged), so a result from here and one from ``evaluate.py`` are the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from cxr_relink.audit.embeddings import EmbeddingSet
from cxr_relink.audit.relinkage import relinkage_audit
from cxr_relink.audit.settings import defaults

VARIANTS = ("i2t", "t2i", "hardneg/i2t", "dedup/i2t")


@dataclass(frozen=True)
class RecallAtN:
    """Expected Recall@K in a random pool of N candidates (the true one + N-1 drawn negatives).

    ``value`` and ``chance`` are fractions (0.13 = 13%); ``x_chance`` = value / chance; the CIs are
    95% percentile bootstrap intervals over patients (None when ``n_boot=0``). ``full``: N is the
    whole database. ``effective_pool``: the mean pool actually drawn (hard negatives: smaller than N
    where a label group is smaller)."""

    variant: str
    k: int
    n: int
    full: bool
    value: float
    ci: tuple[float, float] | None
    chance: float
    x_chance: float | None
    x_chance_ci: tuple[float, float] | None
    effective_pool: float


def _pair(x: Any) -> tuple[float, float] | None:
    return None if x is None else (float(x[0]), float(x[1]))


@dataclass
class RelinkageResult:
    """What ``relink`` returns. ``recall[(variant, k, n)]`` -> RecallAtN with an int ``n``;
    ``sections``: the audit.json "relinkage" sections, unchanged."""

    sections: dict[str, dict[str, Any]]
    recall: dict[tuple[str, int, int], RecallAtN] = field(init=False)

    def __post_init__(self) -> None:
        self.recall = {}
        for variant, sec in self.sections.items():
            for row in sec["recall"]:
                r = RecallAtN(
                    variant=variant, k=int(row["k"]), n=int(row["n_value"]), full=row["n"] == "full",
                    value=float(row["value"]), ci=_pair(row.get("ci")), chance=float(row["chance"]),
                    x_chance=None if row["x_chance"] is None else float(row["x_chance"]),
                    x_chance_ci=_pair(row.get("x_chance_ci")), effective_pool=float(row["effective_pool_mean"]),
                )
                self.recall[(variant, r.k, r.n)] = r

    @property
    def variants(self) -> list[str]:
        """The variants computed: "i2t", "t2i", "hardneg/i2t", "dedup/i2t"."""
        return list(self.sections)

    def ns(self, variant: str = "i2t") -> list[int]:
        """The pool sizes N of ``variant``, ascending (the last is the full database)."""
        return sorted({n for (v, _, n) in self.recall if v == variant})

    def at(self, k: int = 1, n: int | str = 100, variant: str = "i2t") -> RecallAtN:
        """The row for Recall@k at pool size n (an int, or "full") of ``variant``."""
        if variant not in self.sections:
            raise KeyError(f"variant {variant!r} was not computed; computed: {self.variants}")
        if n == "full":
            n = int(self.sections[variant]["n_candidates"])
        key = (variant, int(k), int(n))
        if key not in self.recall:
            have = sorted({(kk, nn) for (v, kk, nn) in self.recall if v == variant})
            raise KeyError(f"no Recall@{k} at N = {n} for {variant}; (K, N) computed: {have}"
                           + (f" (N >= the {self.sections[variant]['n_candidates']} candidates is the full database)"
                              if int(n) > int(self.sections[variant]["n_candidates"]) else ""))
        return self.recall[key]

    def __iter__(self) -> Iterator[RecallAtN]:
        return iter(self.recall.values())

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per (variant, K, N): for a DataFrame or a CSV."""
        return [r.__dict__.copy() for r in self]

    def table(self) -> str:
        """The Markdown table evaluate.py prints (percentages, CIs, × chance)."""
        from cxr_relink.audit.result import build_result, markdown_table

        return markdown_table(build_result(relinkage=self.sections), with_headline=False)

    def __repr__(self) -> str:
        parts = []
        for variant in self.variants:
            r = self.at(1, self.ns(variant)[0], variant) if (variant, 1, self.ns(variant)[0]) in self.recall else None
            if r is not None:
                parts.append(f"{variant} R@1 at N={r.n}: {100 * r.value:.2f}% = {r.x_chance:.2f}x chance")
        return f"RelinkageResult({'; '.join(parts)})"


def _key(ids: Any, r: int) -> Any:
    """Row r's id as the caller wrote it (numpy scalars as plain Python)."""
    v = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids, dtype=object).reshape(-1)[r]
    return v.item() if hasattr(v, "item") else v


def _refuse_unmarked_studies(es: EmbeddingSet, patient_id: Any) -> None:
    """Without study_id every row is its own study. Rows of one patient with the very same report
    embedding are then most likely the images of one study (multi-view): as separate studies their
    identical reports tie with each other's target, and the pessimistic ties count every one against
    the model (full-database R@1 0.579 -> 0.444 with a fifth of the studies two-view). Refused, asking
    for study_id. Exact equality of the report rows as given (what repeating a study's report row per
    image gives); rows of different patients never count (a templated report text is legitimate)."""
    rep = np.ascontiguousarray(es.report_emb.numpy())
    if rep.shape[0] < 2:
        return
    _, vec = np.unique(rep.view(np.dtype((np.void, rep.dtype.itemsize * rep.shape[1]))).reshape(-1),
                       return_inverse=True)
    key = np.stack([es.study_patient.numpy(), vec.reshape(-1)], 1)
    _, first, inv = np.unique(key, axis=0, return_index=True, return_inverse=True)
    first_of_row = first[inv.reshape(-1)]
    later = np.flatnonzero(first_of_row != np.arange(len(first_of_row)))
    if later.size:
        r = int(later[0])
        raise ValueError(
            f"{later.size} rows repeat the patient_id and the exact report embedding of an earlier row (e.g. row {r} = "
            f"row {int(first_of_row[r])}, patient_id {_key(patient_id, r)!r}): without study_id each row is "
            "its own study, so images of one study would be separate studies whose identical reports tie with each "
            "other and count against the target; pass study_id (rows of one study share it), or "
            "study_id=np.arange(n) if each row really is its own study")


def relink(
    image_emb: Any,
    report_emb: Any,
    patient_id: Sequence[Any] | None = None,
    labels: Any = None,
    *,
    study_id: Sequence[Any] | None = None,
    report_text_hash: Sequence[str] | None = None,
    ks: Sequence[int] | None = None,
    ns: Sequence[int | str] | None = None,
    directions: Sequence[str] | None = None,
    hardneg: bool | None = None,
    dedup: bool | None = None,
    n_boot: int | None = None,
    seed: int | None = None,
    **settings: Any,
) -> RelinkageResult:
    """The re-linkage audit of paired embeddings: row i of ``image_emb`` [n, d] is an image whose
    true report is row i of ``report_emb`` [n, d] (numpy arrays or tensors; L2-normalised here).

    patient_id [n]: the patient of each row (ints or strings); the CIs bootstrap over patients and
        hard negatives leave out the query patient's own studies. Default: every row its own patient.
    labels [n, 14]: CheXpert labels (1, 0, -1, NaN) in ``audit.CHEXPERT_LABELS`` order; given, the
        pathology-matched hard-negative variant runs too (``hardneg=False`` turns it off).
    study_id [n]: rows of one study (several images, one report) share it and their report row.
        Default: every row its own study; then rows of one patient with an identical report embedding
        (images of one study, most likely) are refused, asking for study_id.
    report_text_hash [n]: a hash of each row's report text; enables ``dedup`` (identical texts
        collapsed).
    ks, ns, directions ("i2t" image->report, "t2i" report->image), n_boot, seed and any other
    setting of ``audit.settings.RELINKAGE`` (ties, label_mapping, ...): default from there.
    """
    s = defaults("relinkage")
    unknown = sorted(set(settings) - set(s))
    if unknown:
        raise TypeError(f"relink() got unknown settings {unknown}; known: {sorted(s)}")
    n = len(image_emb)
    pid = np.arange(n) if patient_id is None else patient_id
    sid = np.arange(n) if study_id is None else study_id
    es = EmbeddingSet.from_items(image_emb, report_emb, sid, pid, labels, report_text_hash)
    if study_id is None:
        _refuse_unmarked_studies(es, pid)
    given = {"ks": ks, "ns": ns, "directions": directions, "n_boot": n_boot, "seed": seed,
             "hardneg": labels is not None if hardneg is None else hardneg,
             "dedup": report_text_hash is not None if dedup is None else dedup}
    s.update({k: v for k, v in given.items() if v is not None})
    s.update(settings)
    if s["hardneg"] and labels is None:
        raise ValueError("hardneg=True needs labels [n, 14] (hard negatives are defined by pathology labels)")
    if s["dedup"] and report_text_hash is None:
        raise ValueError("dedup=True needs report_text_hash [n]")
    device = s.pop("device") or (image_emb.device if isinstance(image_emb, torch.Tensor) else None)
    return RelinkageResult(relinkage_audit(es, device=device, **s))
