"""Embeddings of one audited split: input validation, the EmbeddingSet, the validation-output
contract between the models and the audit callbacks, and the one report-text hash.

No Lightning here (the whole ``audit`` package runs without it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cxr_relink.audit.labels import NUM_LABELS

# What every embedding module's ``validation_step`` returns (DESIGN.md, "Contracts"): the audit
# callbacks collect these keys without knowing the model.
VALIDATION_KEYS = ("image_emb", "report_emb", "labels", "study_idx", "patient_idx", "index")


def _named(idx: np.ndarray | Sequence[int], rows: np.ndarray | None) -> list[int]:
    """Row positions as the caller's row numbers (an embeddings file's own rows when ``rows`` maps
    them; an audited split is a subset of the file, and its 5th row is not the file's)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    return (idx if rows is None else np.asarray(rows).reshape(-1)[idx]).tolist()


def as_embeddings(x: Any, name: str, rows: np.ndarray | None = None) -> torch.Tensor:
    """A finite, non-empty float32 [n, d] tensor, or a ValueError naming ``name`` (and the rows,
    numbered by ``rows`` when given)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()  # an audit reads values: a tensor that requires grad is audited as its values
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":  # strings, objects, booleans: a raw numpy error would name nothing
            raise ValueError(f"{name} has dtype {arr.dtype}; expected numbers (float embeddings)")
        t = torch.as_tensor(arr)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows): nothing to audit; is the split empty?")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has embedding dimension 0")
    if not t.is_floating_point():
        t = t.double()
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        first = _named(bad.nonzero().flatten()[:5].numpy(), rows)
        raise ValueError(f"{name} has NaN/inf values in {int(bad.sum())} rows (first rows: {first})")
    if t.dtype == torch.float32:
        return t
    f = t.float()
    big = ~torch.isfinite(f).all(dim=1)  # finite in float64, beyond float32's range (|x| > 3.4e38)
    if big.any():
        first = _named(big.nonzero().flatten()[:5].numpy(), rows)
        raise ValueError(f"{name} has values beyond float32's range in {int(big.sum())} rows (first rows: {first}); "
                         "rescale them")
    return f


def reject_zero_rows(x: torch.Tensor, name: str) -> None:
    """Raise naming the all-zero rows of ``x`` (the probe rejects what re-linkage rejects)."""
    zero = (x == 0).all(dim=1)
    if zero.any():
        rows = zero.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has {int(zero.sum())} all-zero rows (cannot be normalised): first rows {rows}")


# Below this float32 norm a row's smaller components square to subnormals or zero, so its plain
# float32 norm loses digits (at 1e-10 the components it loses are < 1e-9 of the row: nothing visible).
_SMALL_NORM = 1e-10


def l2_normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit L2 norm: exactly the plain ``x / x.norm()`` wherever that is accurate, so
    exact ties between rows survive (prescaling every row by its largest |value| rounds them away:
    749 -> 740 ties on a lattice). Only rows whose norm overflows (|x| ~ 1e20: the square is inf) or
    underflows (|x| ~ 1e-25: the square is 0) are first scaled by a power of two (exact) to a largest
    |value| in [0.5, 1): such a row normalises bit for bit as the same row at an ordinary scale would.
    An all-zero row raises (it has no direction)."""
    norm = x.norm(dim=1, keepdim=True)
    risky = (~torch.isfinite(norm) | (norm < _SMALL_NORM)).flatten()
    out = x / norm
    if risky.any():
        idx = risky.nonzero().flatten()
        peak = x[idx].abs().amax(dim=1, keepdim=True)
        zero = (peak == 0).flatten()
        if zero.any():
            rows = idx[zero][:5].tolist()
            raise ValueError(f"{name} has {int(zero.sum())} all-zero rows (cannot be normalised): first rows {rows}")
        y = torch.ldexp(x[idx], -torch.frexp(peak).exponent)
        out[idx] = y / y.norm(dim=1, keepdim=True)
    return out


# float32 holds every integer exactly only up to 2**24: MIMIC-CXR's patient ids (~10-20 million) and
# study ids (~50-60 million) round onto each other there (177 patients become 96).
_FLOAT_ID = ("ids must be integers or strings: float ids collide once past the float's exact-integer range "
             "(float32: 2**24 = 16,777,216; MIMIC-CXR's ids are beyond it) and NaN ids merge; write them from "
             "the source as int64 or strings (converting the float array back cannot undo a collision)")


def check_ids(x: Any, name: str, n: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Study/patient ids: integers or strings, one per row, none blank ("") or padded with spaces.
    Float ids are refused whatever their values (a float32 id may already have collided). Rows are
    named by ``rows`` (an embeddings file's row numbers) when given."""
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if arr.dtype.kind == "O":
        arr = _object_ids(arr.reshape(-1), name, rows)
    if arr.dtype.kind == "f":
        raise ValueError(f"{name} has dtype {arr.dtype}: {_FLOAT_ID}")
    if arr.dtype.kind not in "iuUS":
        raise ValueError(f"{name} has dtype {arr.dtype}; expected integers or strings")
    arr = arr.reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but image_emb has {n} rows")
    if arr.dtype.kind in "US":
        stripped = np.char.strip(arr)
        blank = stripped == ("" if arr.dtype.kind == "U" else b"")
        if blank.any():
            idx = np.flatnonzero(blank)
            # np.unique would merge every blank id into one study (or patient): refuse instead.
            raise ValueError(f"{name} is blank (empty) in {idx.size} rows (first rows: {_named(idx[:5], rows)})")
        padded = stripped != arr
        if padded.any():
            # "s1 " and "s1" would be two studies (or patients): more candidates, a lower recall. Stripping
            # would silently change which rows are one study, so the file is refused instead.
            idx = np.flatnonzero(padded)
            raise ValueError(f"{name} has leading/trailing whitespace in {idx.size} rows (first rows: "
                             f"{_named(idx[:5], rows)}, e.g. {arr[idx[0]].item()!r}): an id with and without "
                             "spaces would count as two; write the ids without it")
    return arr


def _object_ids(arr: np.ndarray, name: str, rows: np.ndarray | None) -> np.ndarray:
    """Ids of dtype object (what a pandas column of strings or a Python list of mixed items gives): all
    strings -> a string array, all integers -> int64; anything else (None/NaN for a missing id, floats,
    a mix of strings and integers, which "1" and 1 would make ambiguous) raises naming the first row."""
    items = arr.tolist()
    if all(isinstance(v, str) for v in items):
        return np.asarray(items, dtype=str) if items else np.asarray(items, dtype="U1")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in items):
        return np.asarray(items, dtype=np.int64)
    kind = str if isinstance(items[0], str) else int
    r = next(i for i, v in enumerate(items) if not isinstance(v, kind) or isinstance(v, (bool, np.bool_)))
    v = items[r]
    raise ValueError(f"{name} has dtype object (e.g. a pandas column) holding a {type(v).__name__} at row "
                     f"{_named([r], rows)[0]} ({v!r}) among {kind.__name__} ids: ids must be all integers or all "
                     "strings, none missing")


def check_labels_array(x: Any, name: str, n: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Labels [n, 14] of numbers in {1, 0, -1, NaN}, or a ValueError naming ``name`` and the rows."""
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} has dtype {arr.dtype}; expected numbers 1, 0, -1 or NaN over {NUM_LABELS} labels")
    lab = arr.astype(np.float32)
    if lab.shape != (n, NUM_LABELS):
        raise ValueError(f"{name} must have shape [{n}, {NUM_LABELS}], got {lab.shape}")
    bad = ~(np.isnan(lab) | np.isin(lab, (1.0, 0.0, -1.0))).all(axis=1)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ValueError(f"{name} has values other than 1, 0, -1, NaN in {idx.size} rows "
                         f"(first rows: {_named(idx[:5], rows)})")
    return lab


def close_names(wanted: str, present: Sequence[str]) -> list[str]:
    """The names in ``present`` that ``wanted`` was probably meant to be ('Train' for 'train',
    'tset' for 'test'): case-insensitive matches first, then difflib's close matches."""
    import difflib

    present = sorted(set(map(str, present)))
    same_case = [p for p in present if p.lower() == wanted.lower() and p != wanted]
    lower = {p.lower(): p for p in present}
    close = [lower[c] for c in difflib.get_close_matches(wanted.lower(), list(lower), n=3, cutoff=0.6)]
    return list(dict.fromkeys(same_case + [c for c in close if c != wanted]))


def _as_long(x: Any, name: str, n: int) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.reshape(-1).long().cpu()
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    return t


def validation_outputs(image_emb: torch.Tensor, report_emb: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
    """The ``validation_step`` output the audit callbacks collect: the batch's L2-normalised
    embeddings (detached) with its labels and ids (``VALIDATION_KEYS``)."""
    return {
        "image_emb": image_emb.detach(),
        "report_emb": report_emb.detach(),
        "labels": batch["labels"],
        "study_idx": batch["study_idx"],
        "patient_idx": batch["patient_idx"],
        "index": batch["index"],
    }


def report_hash(text: str) -> str:
    """The one hash of a report text (whitespace-normalised SHA-256): dedup collapses reports by it
    and the DP stage compares cohorts by it, so the text itself is never kept."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


@dataclass
class EmbeddingSet:
    """Embeddings of one split: image items and one report per study.

    image_emb [I, D]; report_emb [S, D]; item_study [I] in 0..S-1; study_patient [S]
    (integer codes); study_labels [S, 14] (optional); study_text_hash [S] (optional, for
    dedup; any hashable strings, never the text itself); item_index [I] optional dataset
    indices.
    """

    image_emb: torch.Tensor
    report_emb: torch.Tensor
    item_study: torch.Tensor
    study_patient: torch.Tensor
    study_labels: np.ndarray | None = None
    study_text_hash: list[str] | None = None

    @property
    def n_items(self) -> int:
        return int(self.image_emb.shape[0])

    @property
    def n_studies(self) -> int:
        return int(self.report_emb.shape[0])

    @classmethod
    def from_items(
        cls,
        image_emb: Any,
        report_emb: Any,
        study_key: Any,
        patient_key: Any,
        labels: Any = None,
        text_hash: Sequence[str] | None = None,
        rows: np.ndarray | None = None,
    ) -> "EmbeddingSet":
        """Build from per-item rows (one row per image; its study's report embedding,
        labels, ids repeated). Rows of one study are collapsed by ``study_key``; they must
        agree (labels and hash exactly, report embeddings up to float noise) or this raises
        naming the row. Blank, float or space-padded ids, object/string dtypes where numbers belong,
        and a row repeated exactly (same study, identical image embedding) raise. ``rows``: the row
        numbers errors name (an embeddings file's own, when these rows are its audited split)."""
        img = as_embeddings(image_emb, "image_emb", rows)
        rep = as_embeddings(report_emb, "report_emb", rows)
        n = img.shape[0]
        if rows is not None and len(rows) != n:
            raise ValueError(f"rows has {len(rows)} entries but image_emb has {n} rows")
        if rep.shape[0] != n:
            raise ValueError(f"report_emb has {rep.shape[0]} rows but image_emb has {n} (one row per image item)")
        if rep.shape[1] != img.shape[1]:
            raise ValueError(f"image_emb dim {img.shape[1]} != report_emb dim {rep.shape[1]}")
        skeys = check_ids(study_key, "study_id", n, rows)
        pkeys = check_ids(patient_key, "patient_id", n, rows)
        uniq, first, inv = np.unique(skeys, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        order = np.argsort(first)  # studies in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        item_study = torch.as_tensor(rank[inv], dtype=torch.long)
        first_rows = first[order]
        first_of_row = first[inv]  # each row's study's first row
        # one patient per study
        _, p_codes_items = np.unique(pkeys, return_inverse=True)
        p_codes_items = p_codes_items.reshape(-1)
        other = np.flatnonzero(p_codes_items != p_codes_items[first_of_row])
        if other.size:
            r = int(other[0])
            f = int(first_of_row[r])
            raise ValueError(f"a study_id appears with more than one patient_id: study_id {skeys[r].item()!r} row "
                             f"{_named([r], rows)[0]} has patient_id {pkeys[r].item()!r}, row {_named([f], rows)[0]} "
                             f"{pkeys[f].item()!r}")
        study_patient = torch.as_tensor(p_codes_items[first_rows], dtype=torch.long)
        _refuse_repeated_rows(img, inv, skeys, rows)
        # Rows of one study repeat its report: a row that disagrees would otherwise be dropped
        # silently (first row wins), so refuse, naming it.
        _same_within_study(skeys, first_of_row, "report_emb", _report_conflicts(rep, first_of_row), rows)
        study_labels = None
        if labels is not None:
            lab = check_labels_array(labels, "labels", n, rows)
            same = ((lab == lab[first_of_row]) | (np.isnan(lab) & np.isnan(lab[first_of_row]))).all(axis=1)
            _same_within_study(skeys, first_of_row, "labels", ~same, rows)
            study_labels = lab[first_rows]
        hashes = None
        if text_hash is not None:
            th_arr = np.asarray(text_hash).reshape(-1)
            if th_arr.dtype.kind == "O":
                raise ValueError("report_text_hash has dtype object; expected fixed-width strings")
            th = np.asarray([str(h) for h in th_arr])
            if len(th) != n:
                raise ValueError(f"report_text_hash has {len(th)} entries but image_emb has {n} rows")
            _same_within_study(skeys, first_of_row, "report_text_hash", th != th[first_of_row], rows)
            hashes = [str(th[i]) for i in first_rows]
        del uniq
        return cls(img, rep[torch.as_tensor(first_rows)], item_study, study_patient, study_labels, hashes)


def _refuse_repeated_rows(img: torch.Tensor, study: np.ndarray, skeys: np.ndarray, rows: np.ndarray | None) -> None:
    """Raise when a row repeats an earlier one exactly: the same study and an identical image
    embedding (rows appended twice: every repeated image would be a second query). Candidates are
    rows of one study with equal random projections (one pass over the embeddings), confirmed equal
    element by element."""
    cand = np.flatnonzero(np.bincount(study)[study] > 1)  # a repeat shares its study: single-row studies cannot
    if cand.size < 2:
        return
    x = img.numpy()
    # One float32 matrix-vector product (no copy of the matrix). Identical rows project to the same value up
    # to the BLAS's summation order, hence the tolerance; candidates are confirmed element by element.
    proj = (x @ np.random.default_rng(0).standard_normal(x.shape[1]).astype(x.dtype))[cand].astype(np.float64)
    st = study[cand]
    order = np.lexsort((proj, st))
    lo, hi = proj[order[:-1]], proj[order[1:]]
    same = (st[order[1:]] == st[order[:-1]]) & (np.abs(hi - lo) <= 1e-4 * (np.abs(lo) + 1))
    pairs = sorted((min(int(cand[i]), int(cand[j])), max(int(cand[i]), int(cand[j])))
                   for i, j in zip(order[:-1][same], order[1:][same]) if np.array_equal(x[cand[i]], x[cand[j]]))
    if not pairs:
        return
    # each repeat named against the first row of its identical group
    first: dict[int, int] = {}
    for a, b in sorted(pairs, key=lambda p: p[1]):
        first[b] = min(first.get(b, b), first.get(a, a))
    later = sorted(first)
    r, f = later[0], first[later[0]]
    raise ValueError(f"{len(later)} rows repeat an earlier row exactly (same study_id, identical image embedding), "
                     f"first row {_named([r], rows)[0]} = row {_named([f], rows)[0]} (study_id {skeys[r].item()!r}): "
                     "were rows appended twice? Each image is one query; a repeat would count it twice")


# Unit report vectors of one study's rows may differ by float noise (batches, bf16 autocast: ~1e-2 at
# most); different reports differ by far more. Above this L2 distance the rows disagree.
REPORT_CONFLICT_DISTANCE = 0.05


def _report_conflicts(rep: torch.Tensor, first_of_row: np.ndarray) -> np.ndarray:
    """Rows whose report embedding is not (up to float noise) their study's first row's."""
    out = np.zeros(len(first_of_row), dtype=bool)
    later = np.flatnonzero(first_of_row != np.arange(len(first_of_row)))  # a study's 2nd, 3rd... rows
    if later.size == 0:
        return out

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x / x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)

    idx, refs = torch.as_tensor(later), torch.as_tensor(first_of_row[later])
    out[later] = ((unit(rep[idx]) - unit(rep[refs])).norm(dim=1) > REPORT_CONFLICT_DISTANCE).numpy()
    return out


def _same_within_study(skeys: np.ndarray, first_of_row: np.ndarray, what: str, differs: np.ndarray,
                       rows: np.ndarray | None = None) -> None:
    if differs.any():
        idx = np.flatnonzero(differs)
        r = int(idx[0])
        raise ValueError(
            f"{idx.size} rows have {what} different from their study's first row: study_id {skeys[r].item()!r} "
            f"row {_named([r], rows)[0]} vs row {_named([int(first_of_row[r])], rows)[0]} (rows of one study must "
            "repeat its report, labels and hash)"
        )


def embedding_set_from_outputs(
    data: dict[str, torch.Tensor], text_hash: Sequence[str] | None = None
) -> EmbeddingSet:
    """Gathered validation outputs (one row per image item) -> EmbeddingSet."""
    th = None
    if text_hash is not None:
        th = [text_hash[int(s)] for s in data["study_idx"].reshape(-1)]
    return EmbeddingSet.from_items(
        data["image_emb"], data["report_emb"], data["study_idx"].reshape(-1).numpy(),
        data["patient_idx"].reshape(-1).numpy(), data["labels"].numpy(), th,
    )
