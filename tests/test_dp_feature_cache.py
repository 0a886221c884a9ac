"""The DP stage's feature cache (models/dp/features.py cached_split_features): an image file replaced in
place with the same size and mtime (``cp -p``) computes the features again, and so does a changed
package version; a damaged file (empty, truncated) or one whose studies are not the split's is computed
again with a WARNING, never a crash or a stale hit."""

from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np
import pytest
import torch

from cxr_relink.datamodules.records import SPLITS, Study
from cxr_relink.models.dp import features as F


class DM:
    image_size, image_channels, mean, std, text_field, max_length = 32, 1, 0.5, 0.25, "report", 64

    def __init__(self, paths):
        self._studies = {s: [] for s in SPLITS}
        for i, p in enumerate(paths):
            self._studies["train"].append(Study(study_id=f"s{i}", patient_id=f"p{i}", images=[str(p)], report=f"r {i}",
                                                findings="", impression="", labels=np.full(14, np.nan), split="train",
                                                source="t"))

    def studies(self, split):
        return self._studies[split]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(bytes([i]) * 100)
        paths.append(p)
    calls = []

    def extract(backbone, dm, split, device):
        calls.append(split)
        st = dm.studies(split)
        return {"image": torch.randn(len(st), 4), "item_study": torch.arange(len(st)), "item_index": torch.arange(len(st)),
                "text": torch.randn(len(st), 4), "labels": torch.zeros(len(st), 14),
                "study_patient": torch.arange(len(st)),
                "study_key": F.stable_keys([(s.patient_id, s.study_id) for s in st]),
                "patient_key": F.stable_keys([s.patient_id for s in st])}

    monkeypatch.setattr(F, "extract_split_features", extract)
    dm = DM(paths)
    run = lambda: F.cached_split_features(None, dm, "train", tmp_path / "cache", "ab" * 32, torch.device("cpu"))  # noqa: E731
    return run, calls, paths, dm, tmp_path


def test_a_hit_is_served_and_an_image_replaced_with_cp_p_computes_again(setup):
    run, calls, paths, _, tmp_path = setup
    first = run()
    torch.testing.assert_close(run()["image"], first["image"])
    assert calls == ["train"]
    time.sleep(0.05)  # past the file-time granularity of the kernel's clock
    st = os.stat(paths[1])
    new = tmp_path / "new.png"
    new.write_bytes(b"\xff" * 100)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.copy2(new, paths[1])  # cp -p: same path, size and mtime, other pixels
    run()
    assert calls == ["train", "train"]


def test_a_changed_package_version_computes_again(setup, monkeypatch):
    run, calls, *_ = setup
    run()
    real = F.package_versions()
    monkeypatch.setattr(F, "package_versions", lambda: {**real, "transformers": "0.0.0-other"})
    run()
    assert calls == ["train", "train"]


@pytest.mark.parametrize("damage", ["empty", "truncated", "other studies"])
def test_a_damaged_or_foreign_cache_file_is_computed_again(setup, damage, caplog):
    run, calls, paths, dm, tmp_path = setup
    run()
    (path,) = (tmp_path / "cache" / "dp_features").rglob("train.safetensors")
    raw = path.read_bytes()
    if damage == "other studies":  # a whole file of the split's studies in another order
        feats = F.load_file(str(path))
        feats["study_key"] = feats["study_key"].flip(0)
        F.atomic_save(feats, path, {})
    else:
        path.write_bytes(b"" if damage == "empty" else raw[: len(raw) // 2])
    with caplog.at_level(logging.WARNING, logger="cxr_relink.models.dp.features"):
        out = run()
    assert calls == ["train", "train"]
    assert any("not used" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    want = F.stable_keys([(s.patient_id, s.study_id) for s in dm.studies("train")])
    assert torch.equal(out["study_key"], want)
    run()  # stored again, whole: a hit
    assert len(calls) == 2
