"""`test_patients`: extra test-split patients that leave the train/val studies byte-identical.

The option sizes the held-out test split (and so the retrieval pools N = 100 / 1,000 / 10,000)
independently of training; without it the cohort, its cache key and meta.json are those from
before the option existed.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import numpy as np
import pytest
from omegaconf import OmegaConf

from cxr_relink.datamodules.synthetic import GENERATOR_VERSION, SyntheticReader

TINY = dict(num_patients=20, seed=5, image_size=32, num_variants=1)
EXTRA = 13


class Cohort(list):
    """A list of studies whose repr never shows report text (pytest prints fixture values)."""

    def __repr__(self) -> str:
        return f"<{len(self)} synthetic studies>"


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    cache = tmp_path_factory.mktemp("test_split_cache")
    base = SyntheticReader(**TINY, cache_dir=cache)
    more = SyntheticReader(**TINY, test_patients=EXTRA, cache_dir=cache)
    return base, Cohort(base.load()), more, Cohort(more.load())


def _by_split(studies) -> dict[str, list]:
    out = defaultdict(list)
    for st in studies:
        out[st.split].append(st)
    return out


def _patients(studies) -> set[str]:
    return {st.patient_id for st in studies}


def _same_study(a, b) -> bool:
    return (
        a.study_id == b.study_id
        and a.patient_id == b.patient_id
        and a.report == b.report
        and a.views == b.views
        and json.dumps(a.extras, sort_keys=True) == json.dumps(b.extras, sort_keys=True)
        and np.array_equal(np.nan_to_num(a.labels, nan=9), np.nan_to_num(b.labels, nan=9))
        and len(a.images) == len(b.images)
        and all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    )


def test_requested_number_of_test_patients(cohorts):
    base, a, more, b = cohorts
    sa, sb = _by_split(a), _by_split(b)
    assert len(_patients(sb["test"])) == len(_patients(sa["test"])) + EXTRA
    meta = json.loads((more.cache_path / "meta.json").read_text())
    assert meta["counts"]["patients"] == TINY["num_patients"] + EXTRA
    assert meta["counts"]["by_split"]["test"]["patients"] == len(_patients(sb["test"]))
    assert meta["params"]["test_patients"] == EXTRA
    # the extra patients take the ids after num_patients
    extra = sorted(_patients(sb["test"]) - _patients(sa["test"]))
    assert extra == [f"synthcxr-p{i:06d}" for i in range(TINY["num_patients"], TINY["num_patients"] + EXTRA)]


def test_train_val_identical_and_test_only_grows(cohorts):
    _, a, _, b = cohorts
    sa, sb = _by_split(a), _by_split(b)
    for split in ("train", "val"):
        assert len(sa[split]) == len(sb[split]) > 0
        assert all(_same_study(x, y) for x, y in zip(sa[split], sb[split]))
    # the fraction-split test patients are unchanged too: the extra ones only add to them
    assert all(_same_study(x, y) for x, y in zip(sa["test"], sb["test"]))
    assert len(sb["test"]) > len(sa["test"])


def test_no_patient_in_two_splits(cohorts):
    _, _, _, b = cohorts
    sets = {k: _patients(v) for k, v in _by_split(b).items()}
    assert set(sets) == {"train", "val", "test"}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    ids = [st.study_id for st in b]
    assert len(ids) == len(set(ids))


def test_extra_patients_are_new_patients(cohorts):
    """The extra patients come from their own stream: not copies of existing patients."""
    _, a, _, b = cohorts
    traits_a = {json.dumps(st.extras["patient_traits"], sort_keys=True) for st in a}
    extra = [st for st in b if int(st.patient_id.rsplit("p", 1)[1]) >= TINY["num_patients"]]
    assert extra and not any(json.dumps(st.extras["patient_traits"], sort_keys=True) in traits_a for st in extra)


def test_default_cache_key_unchanged():
    """Unset (None) or 0 hashes exactly the parameters from before the option; a value adds it."""
    p = SyntheticReader(num_patients=50, seed=3).params
    d = json.loads(json.dumps(p.public()))
    assert "test_patients" not in d
    old = json.dumps({"params": d, "version": GENERATOR_VERSION}, sort_keys=True)
    assert p.key() == hashlib.sha256(old.encode()).hexdigest()[:12]
    assert SyntheticReader(num_patients=50, seed=3, test_patients=0).params.key() == p.key()
    assert SyntheticReader(num_patients=50, seed=3, test_patients=1).params.key() != p.key()
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ValueError, match="test_patients"):
            SyntheticReader(test_patients=bad)


def test_configs_leave_it_unset():
    from cxr_relink.configs import compose

    for name in ("synthcxr", "synthcxr_external"):
        cfg = compose("train.yaml", [f"data={name}"])
        assert cfg.data.reader.test_patients is None
        cfg = compose("train.yaml", [f"data={name}", "data.reader.test_patients=7"])
        reader = OmegaConf.to_container(cfg.data.reader, resolve=False)
        assert reader["test_patients"] == 7


def test_all_patients_train_with_zero_test_fraction():
    """split_fractions with no test share: the test split is exactly the extra patients."""
    studies = SyntheticReader(**TINY, split_fractions=(0.8, 0.2, 0.0), test_patients=4).load()
    by = _by_split(studies)
    assert len(_patients(by["train"])) + len(_patients(by["val"])) == TINY["num_patients"]
    assert _patients(by["test"]) == {f"synthcxr-p{i:06d}" for i in range(20, 24)}


def test_extra_patients_independent_of_chunking(tmp_path, cohorts, monkeypatch):
    """Chunk boundaries that straddle the extra patients change no byte (same for workers)."""
    from cxr_relink.datamodules import synthetic

    _, _, more, _ = cohorts
    monkeypatch.setattr(synthetic, "CHUNK_PATIENTS", 7)
    again = SyntheticReader(**TINY, test_patients=EXTRA, cache_dir=tmp_path, workers=2)
    again.load()
    for name in ("images.npy", "studies.jsonl"):
        assert (again.cache_path / name).read_bytes() == (more.cache_path / name).read_bytes()
