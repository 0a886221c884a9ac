"""An existing model's embeddings, encoded once per (model files, model config, cohort, split, rows, code).

Encoding is the slow part of auditing an existing model (a ViT-B/32 on 844 test rows: ~10 min on 2
shared cores), while the audit of the embeddings takes seconds. evaluate.py (and the ladder, which runs
it per model) therefore reads an existing model's embeddings from ``<paths.cache_dir>/embeddings/``
when the same model was already encoded on the same rows with the same preprocessing, and encodes
(and stores) them otherwise.

The key (``cache_key``) is made of contents, never of file dates alone:
- the model files: SHA-256 of every file under ``model.path`` (and of any other path the model config
  names, e.g. open_clip's ``text_config_dir``), names and contents, read in full on every audit (a few
  hundred MB: about a second; no memo by size and mtime, which ``cp -p`` and ``rsync -a`` preserve);
- the model config (dtype, context_length, arch, normalisation overrides: the preprocessing);
- the cohort config (``data``, less what only changes speed: workers, cache folder);
- the cohort's rows (``cohort_rows``): per row of the selection, in order, its study id, patient id,
  the hash of the report text the model reads, and its image: an in-memory image (the synthetic
  cohort) by its bytes, an image file by (path, size, mtime_ns, ctime_ns, inode). Hashing every image
  file's bytes would read the cohort on every audit (the probe's training split of MIMIC-CXR: hundreds
  of GB); the status-change time and the inode cannot be carried over by ``cp -p``, ``rsync -a`` or
  ``touch`` (the kernel sets ctime on every write; a rename brings a new inode), so an image replaced
  under the same name changes the key; a cohort copied elsewhere only encodes again;
- the split and the row selection (the probe's seeded subsample of the training split);
- the source of the code that shapes the rows (``CODE``: the model wrappers, every module of
  datamodules/ (readers, the section parser, the pixel reader), the report hash and the probe's row
  subsample, this module) and the versions of the packages that do (``PACKAGES``).

A hit is used only when it holds what the key promises: the stored file reads, has the rows'
arrays, its content digest is the one written beside it, and its study ids and report hashes are the
cohort's rows in order; otherwise (a truncated or empty file, rows dropped or shuffled, a file edited)
a WARNING names why and the rows are encoded again.

Stored as .npz without pickle (the layout of an embeddings file: image_emb, report_emb, study_id,
patient_id, labels, report_text_hash, split) next to a .json of the key's parts and the content digest
(no report text; the embeddings are derived from PHI all the same: the cache folder is treated like
the DP feature cache, docs/privacy.md). Written to a temporary name and renamed, so a reader never
sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cxr_relink.models.hashing import update_from_file

log = logging.getLogger(__name__)

FORMAT = 2  # 2: content keys (cohort rows, code, package versions), validated hits
# Data config keys that change how fast the rows are produced, never what they hold.
SPEED_ONLY = {"num_workers", "workers", "cache_dir", "pin_memory", "persistent_workers", "prefetch_factor"}
# The code that turns a model and a cohort into rows: a change to it invalidates every entry
# (a folder: every .py file in it).
CODE = ("models/external.py", "models/embedding_cache.py", "audit/embeddings.py", "audit/probe.py", "datamodules")
# The packages whose versions change what the rows hold (model code, tokenizers, image decoding, resizing).
PACKAGES = ("torch", "torchvision", "transformers", "tokenizers", "open_clip_torch", "Pillow", "numpy")
ROW_KEYS = ("image_emb", "report_emb", "study_id", "patient_id", "report_text_hash", "split")
_ROOT = Path(__file__).resolve().parents[1]


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def files_hash(path: str | os.PathLike) -> str:
    """SHA-256 over the relative names and contents of every file under ``path`` (or of the file),
    read in full: a file replaced with the same size and mtime (``cp -p``) changes it."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model path {root} does not exist")
    base = root if root.is_dir() else root.parent
    h = hashlib.sha256()
    for f in _files(root):
        h.update(f.relative_to(base).as_posix().encode() + b"\0")
        update_from_file(h, f)
        h.update(b"\0")
    return h.hexdigest()


def code_hash(code: Sequence[str] = CODE, root: Path = _ROOT) -> str:
    """SHA-256 over the names and sources of the ``code`` files (folders: their .py files)."""
    h = hashlib.sha256()
    for c in code:
        p = root / c
        for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else []):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def image_signature(ref: Any) -> str:
    """What identifies an image's content: an array's own bytes; a file's (path, size, mtime_ns,
    ctime_ns, inode), which a file replaced under the same name changes even when ``cp -p`` or
    ``rsync -a`` keep its size and mtime (module docstring). A missing file: its path alone."""
    if isinstance(ref, np.ndarray):
        a = np.ascontiguousarray(ref)
        return "array:" + hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()
    try:
        st = os.stat(ref)
    except OSError:
        return f"file:{ref}:missing"
    return f"file:{os.path.abspath(ref)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def cohort_rows(studies: Sequence[Any], text_field: str, indices: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The rows (one per image, in dataset order; ``indices`` picks some) of a split's ``studies``, as
    the cache keys and checks them: study_id, patient_id, report_text_hash (of the text the model
    reads) and image (``image_signature``)."""
    from cxr_relink.audit.embeddings import report_hash

    hashes = [report_hash(st.text(text_field)) for st in studies]
    items = [(s, v) for s, st in enumerate(studies) for v in range(len(st.images))]
    if indices is not None:
        items = [items[int(i)] for i in indices]
    return {
        "study_id": np.array([str(studies[s].study_id) for s, _ in items], dtype=str),
        "patient_id": np.array([str(studies[s].patient_id) for s, _ in items], dtype=str),
        "report_text_hash": np.array([hashes[s] for s, _ in items], dtype=str),
        "image": np.array([image_signature(studies[s].images[v]) for s, v in items], dtype=str),
    }


def rows_hash(rows: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(rows):
        h.update(k.encode() + b"\0" + "\x1f".join(map(str, rows[k].tolist())).encode() + b"\0")
    return h.hexdigest()


def _without(d: Any, drop: set[str]) -> Any:
    if isinstance(d, dict):
        return {k: _without(v, drop) for k, v in sorted(d.items()) if k not in drop}
    if isinstance(d, list):
        return [_without(v, drop) for v in d]
    return d


def cache_key(model_cfg: dict[str, Any], data_cfg: dict[str, Any], split: str, rows: Any,
              cohort: dict[str, np.ndarray], code: str | None = None) -> tuple[str, dict[str, Any]]:
    """(hex key, its parts) for the rows ``rows`` ("all", or a description of a subsample) of ``split``,
    whose cohort rows (``cohort_rows``) are ``cohort``."""
    model_cfg = {k: v for k, v in model_cfg.items() if k != "tokenizer_spec"}
    paths = {k: files_hash(v) for k, v in sorted(model_cfg.items())
             if isinstance(v, str) and k in ("path", "text_config_dir", "arch") and Path(v).exists()}
    parts = {"format": FORMAT, "model_files": paths, "model": model_cfg, "data": _without(data_cfg, SPEED_ONLY),
             "split": split, "rows": rows, "cohort_rows": rows_hash(cohort), "n_rows": len(cohort["study_id"]),
             "code": code or code_hash(), "packages": package_versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32], parts


def content_digest(data: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(data):
        a = np.ascontiguousarray(data[k])
        h.update(f"{k}\0{a.dtype.str}\0{a.shape}\0".encode() + a.tobytes())
    return h.hexdigest()


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def stored_entry(path: Path, cohort: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(the rows of the cache file ``path``, None) when it is whole and holds ``cohort``'s rows in
    order; (None, why not) otherwise."""
    try:
        data = load(path)
    except Exception as e:  # truncated, empty, not a zip, an array that needs pickle: never trusted
        return None, f"unreadable ({type(e).__name__}: {e})"
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        digest = meta["digest"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its record {path.with_suffix('.json').name} is missing or damaged ({type(e).__name__})"
    missing = [k for k in ROW_KEYS if k not in data]
    if missing:
        return None, f"lacks {missing}"
    n = {k: len(v) if v.ndim else -1 for k, v in data.items()}
    if len(set(n.values())) != 1:
        return None, f"arrays of different lengths {n}"
    if content_digest(data) != digest:
        return None, "its contents differ from what was stored (edited after it was written)"
    want = len(cohort["study_id"])
    if n["study_id"] != want:
        return None, f"holds {n['study_id']} rows, the cohort's selection has {want}"
    for k in ("study_id", "report_text_hash"):
        bad = np.flatnonzero(data[k].astype(str) != cohort[k].astype(str))
        if bad.size:
            return None, f"its {k} differ from the cohort's rows in order ({bad.size} rows, the first at row {bad[0]})"
    return data, None


def store(path: Path, data: dict[str, np.ndarray], parts: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.partial.npz")
    np.savez(tmp, **data)
    record = path.with_suffix(".json")
    tmp_record = record.with_name(record.stem + f".{os.getpid()}.partial.json")
    tmp_record.write_text(json.dumps({**parts, "digest": content_digest(data)}, indent=1, sort_keys=True, default=str))
    os.replace(tmp_record, record)
    os.replace(tmp, path)


def cached_rows(cache_dir: str | os.PathLike, model_cfg: dict[str, Any], data_cfg: dict[str, Any],
                selections: Sequence[tuple[str, Any]],
                encode: Callable[[Sequence[tuple[str, Any]]], dict[tuple[str, Any], dict[str, np.ndarray]]],
                cohort: Callable[[tuple[str, Any]], dict[str, np.ndarray]],
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The rows of every (split, rows) in ``selections``, concatenated in that order: from the cache
    where present and valid, the rest from ``encode(missing selections)`` (then stored). ``cohort(sel)``
    gives the selection's rows in the cohort (``cohort_rows``): part of the key, and what a hit must
    hold. Returns (arrays, info) with info = {"cache": [paths], "encoded": [selections encoded now]}."""
    root = Path(cache_dir) / "embeddings"
    code = code_hash()
    found: dict[tuple[str, Any], dict[str, np.ndarray]] = {}
    files: dict[tuple[str, Any], tuple[Path, dict]] = {}
    expected: dict[tuple[str, Any], dict[str, np.ndarray]] = {}
    for sel in selections:
        expected[sel] = cohort(sel)
        key, parts = cache_key(model_cfg, data_cfg, sel[0], sel[1], expected[sel], code)
        path = root / f"{key}.npz"
        files[sel] = (path, parts)
        if path.exists():
            data, why = stored_entry(path, expected[sel])
            if data is None:
                log.warning("embeddings cache %s not used: %s; encoding the %s rows (%s) again", path, why, sel[0], sel[1])
            else:
                found[sel] = data
                log.info("embeddings of %s rows (%s) read from the cache %s", sel[0], sel[1], path)
    missing = [sel for sel in selections if sel not in found]
    if missing:
        new = encode(missing)
        for sel in missing:
            got = {k: new[sel][k].astype(str) for k in ("study_id", "report_text_hash")}
            if all(len(got[k]) == len(expected[sel][k]) and (got[k] == expected[sel][k].astype(str)).all() for k in got):
                store(files[sel][0], new[sel], files[sel][1])
            else:  # the cohort changed while it was encoded: these rows are used once, never stored
                log.warning("the encoded %s rows (%s) are not the cohort's rows read before: not stored in the cache",
                            sel[0], sel[1])
            found[sel] = new[sel]
    data = {k: np.concatenate([found[sel][k] for sel in selections]) for k in found[selections[0]]}
    return data, {"cache": [str(files[sel][0]) for sel in selections], "encoded": [list(s) for s in missing]}


@torch.inference_mode()
def encode_split(module, dm, split: str, device: torch.device, indices: Sequence[int] | None = None
                 ) -> dict[str, np.ndarray]:
    """The rows of one split (or of its items ``indices``), in dataset order (the order the audit
    callbacks sort by): image_emb, report_emb, study_id, patient_id (the cohort's own ids), labels,
    report_text_hash (of the text the model reads; never the text), split."""
    from cxr_relink.audit.embeddings import report_hash

    studies = dm.studies(split)
    hashes = [report_hash(s.text(dm.text_field)) for s in studies]
    img, rep, lab, st = [], [], [], []
    loader = dm.eval_dataloader(split) if indices is None else dm.eval_dataloader(split, indices=indices)
    for batch in loader:
        img.append(module.encode_images(batch["image"].to(device)).float().cpu())
        rep.append(module.encode_reports(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
        lab.append(torch.as_tensor(batch["labels"]).float())
        st.append(batch["study_idx"])
    if not st:
        raise ValueError(f"split {split!r} has no rows to encode")
    s = torch.cat(st).numpy()
    return {
        "image_emb": torch.cat(img).numpy(),
        "report_emb": torch.cat(rep).numpy(),
        "study_id": np.array([str(studies[i].study_id) for i in s]),
        "patient_id": np.array([str(studies[i].patient_id) for i in s]),
        "labels": torch.cat(lab).numpy(),
        "report_text_hash": np.array([hashes[i] for i in s]),
        "split": np.array([split] * len(s)),
    }
