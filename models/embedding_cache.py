"""An existing model's embeddings, encoded once per (model files, model config, cohort, split, rows).

Encoding is the slow part of auditing an existing model (a ViT-B/32 on 844 test rows: ~10 min on 2
shared cores), while the audit of the embeddings takes seconds. evaluate.py (and the ladder, which runs
it per model) therefore reads an existing model's embeddings from ``<paths.cache_dir>/embeddings/``
when the same model was already encoded on the same rows with the same preprocessing, and encodes
(and stores) them otherwise.

The key (``cache_key``), every part of which changes what the rows hold:
- the model files: SHA-256 of every file under ``model.path`` (and of any other path the model config
  names, e.g. open_clip's ``text_config_dir``), names and contents. A memo of (name, size, mtime) ->
  content hash spares re-reading unchanged weights; the content hash is the key, so a file replaced in
  place with a new one invalidates the entry even when the memo cannot tell.
- the model config (dtype, context_length, arch, normalisation overrides: the preprocessing);
- the cohort config (``data``, less what only changes speed: workers, cache folder); a real cohort
  edited in place under the same root is not detected (delete the cache, or ``cache_embeddings=false``);
- the split and the row selection (the probe's seeded subsample of the training split);
- the source of the encoding code (models/external.py, datamodules/datamodule.py, this module).

Stored as .npz without pickle (the layout of an embeddings file: image_emb, report_emb, study_id,
patient_id, labels, report_text_hash, split) next to a .json of the key's parts (no report text; the
embeddings are derived from PHI all the same: the cache folder is treated like the DP feature cache,
docs/privacy.md). Written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = 1
# Data config keys that change how fast the rows are produced, never what they hold.
SPEED_ONLY = {"num_workers", "workers", "cache_dir", "pin_memory", "persistent_workers", "prefetch_factor"}
# The code that turns a model and a cohort into rows: a change to it invalidates every entry.
CODE = ("models/external.py", "datamodules/datamodule.py", "models/embedding_cache.py")
_ROOT = Path(__file__).resolve().parents[1]


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def files_hash(path: str | os.PathLike, memo_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 over the relative names and contents of every file under ``path`` (or of the file).
    With ``memo_dir``, a (name, size, mtime_ns) signature maps to the content hash computed before."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model path {root} does not exist")
    files = _files(root)
    base = root if root.is_dir() else root.parent
    stat = hashlib.sha256()
    for f in files:
        st = f.stat()
        stat.update(f"{f.relative_to(base).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    memo = Path(memo_dir) / f"{stat.hexdigest()}.sha256" if memo_dir is not None else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(base).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    digest = h.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(memo.name + f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    return digest


def _without(d: Any, drop: set[str]) -> Any:
    if isinstance(d, dict):
        return {k: _without(v, drop) for k, v in sorted(d.items()) if k not in drop}
    if isinstance(d, list):
        return [_without(v, drop) for v in d]
    return d


def cache_key(model_cfg: dict[str, Any], data_cfg: dict[str, Any], split: str, rows: Any,
              memo_dir: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """(hex key, its parts) for the rows ``rows`` ("all", or a description of a subsample) of ``split``."""
    model_cfg = {k: v for k, v in model_cfg.items() if k != "tokenizer_spec"}
    paths = {k: files_hash(v, memo_dir) for k, v in sorted(model_cfg.items())
             if isinstance(v, str) and k in ("path", "text_config_dir", "arch") and Path(v).exists()}
    code = hashlib.sha256(b"".join((_ROOT / c).read_bytes() for c in CODE if (_ROOT / c).is_file())).hexdigest()
    parts = {"format": FORMAT, "model_files": paths, "model": model_cfg, "data": _without(data_cfg, SPEED_ONLY),
             "split": split, "rows": rows, "code": code}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32], parts


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def store(path: Path, data: dict[str, np.ndarray], parts: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.partial.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(parts, indent=1, sort_keys=True, default=str))


def cached_rows(cache_dir: str | os.PathLike, model_cfg: dict[str, Any], data_cfg: dict[str, Any],
                selections: Sequence[tuple[str, Any]],
                encode: Callable[[Sequence[tuple[str, Any]]], dict[tuple[str, Any], dict[str, np.ndarray]]]
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The rows of every (split, rows) in ``selections``, concatenated in that order: from the cache
    where present, the rest from ``encode(missing selections)`` (then stored). Returns (arrays, info)
    with info = {"cache": [paths], "encoded": [selections encoded now]}."""
    root = Path(cache_dir) / "embeddings"
    memo = root / "model_hashes"
    found: dict[tuple[str, Any], dict[str, np.ndarray]] = {}
    files: dict[tuple[str, Any], tuple[Path, dict]] = {}
    for sel in selections:
        key, parts = cache_key(model_cfg, data_cfg, sel[0], sel[1], memo)
        path = root / f"{key}.npz"
        files[sel] = (path, parts)
        if path.is_file():
            try:
                found[sel] = load(path)
                log.info("embeddings of %s rows (%s) read from the cache %s", sel[0], sel[1], path)
            except (OSError, ValueError) as e:  # a damaged entry is re-encoded, not trusted
                log.warning("embeddings cache %s unreadable (%s): encoding again", path, e)
    missing = [sel for sel in selections if sel not in found]
    if missing:
        new = encode(missing)
        for sel in missing:
            store(files[sel][0], new[sel], files[sel][1])
            found[sel] = new[sel]
    data = {k: np.concatenate([found[sel][k] for sel in selections]) for k in found[selections[0]]}
    return data, {"cache": [str(files[sel][0]) for sel in selections], "encoded": [list(s) for s in missing]}


@torch.inference_mode()
def encode_split(module, dm, split: str, device: torch.device, indices: Sequence[int] | None = None
                 ) -> dict[str, np.ndarray]:
    """The rows of one split (or of its items ``indices``), in dataset order (the order the audit
    callbacks sort by): image_emb, report_emb, study_id, patient_id (the cohort's own ids), labels,
    report_text_hash (of the text the model reads; never the text), split."""
    from audit.embeddings import report_hash

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
