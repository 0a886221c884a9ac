"""File hashing, the one home of it: the DP feature cache and privacy record (models/dp/), an existing
model's fingerprint (models/external_heads.py), the embeddings cache (models/embedding_cache.py) and an
LLM base folder's fingerprint (models/llm_encoder.py) all read files through `update_from_file`."""

from __future__ import annotations

import hashlib
import os
from typing import Any

CHUNK = 1 << 22  # 4 MiB reads: memory stays flat on multi-GB weight files


def update_from_file(h: Any, path: str | os.PathLike, chunk: int = CHUNK) -> Any:
    """Feed the bytes of the file at `path` into the hash object `h`, read in chunks; returns `h`."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h


def file_sha256(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """Hex sha256 of the contents of the file at `path`."""
    return update_from_file(hashlib.sha256(), path, chunk).hexdigest()
