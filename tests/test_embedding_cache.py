"""An existing model's embeddings cache (models/embedding_cache.py): a second audit encodes nothing; a
changed model file, model config, cohort or row selection encodes again; speed-only settings do not."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from models.embedding_cache import cached_rows, files_hash

DATA = {"image_size": 32, "num_workers": 0, "reader": {"num_patients": 40, "seed": 1, "cache_dir": "/a", "workers": 1}}


def _rows(split: str, rows: str, n: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(split) + len(rows))
    return {"image_emb": rng.normal(size=(n, 4)).astype(np.float32), "report_emb": rng.normal(size=(n, 4)).astype(np.float32),
            "study_id": np.array([f"s{i}" for i in range(n)]), "patient_id": np.array([f"p{i}" for i in range(n)]),
            "split": np.array([split] * n)}


class Encoder:
    def __init__(self):
        self.calls: list[list[tuple[str, str]]] = []

    def __call__(self, missing):
        self.calls.append(list(missing))
        return {sel: _rows(*sel) for sel in missing}


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"dim": 4}')
    (folder / "weights.safetensors").write_bytes(b"\x00" * 64)
    return {"_target_": "models.external.ExternalDualEncoder", "family": "hf", "path": str(folder), "dtype": "float32"}


def test_second_audit_encodes_nothing_and_returns_the_same_rows(tmp_path, model):
    enc = Encoder()
    sel = [("test", "all"), ("train", "subsample 2000 seed 0")]
    first, info = cached_rows(tmp_path / "cache", model, DATA, sel, enc)
    assert enc.calls == [sel] and info["encoded"] == [list(s) for s in sel]
    second, info = cached_rows(tmp_path / "cache", model, DATA, sel, enc)
    assert len(enc.calls) == 1 and info["encoded"] == []
    assert first.keys() == second.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
    # rows in the order asked: the audited split, then the probe's training rows
    assert list(second["split"]) == ["test"] * 5 + ["train"] * 5
    # the stored entries load without pickle
    for path in info["cache"]:
        np.load(path, allow_pickle=False)
    # only the missing selection is encoded: the audited split of a run without the probe is a hit
    cached_rows(tmp_path / "cache", model, DATA, [("test", "all")], enc)
    assert len(enc.calls) == 1


def test_a_changed_model_file_or_config_or_cohort_encodes_again(tmp_path, model):
    enc = Encoder()
    sel = [("test", "all")]
    cached_rows(tmp_path / "cache", model, DATA, sel, enc)
    weights = os.path.join(model["path"], "weights.safetensors")
    with open(weights, "r+b") as f:  # same size, new content (and so a new mtime)
        f.write(b"\x01")
    cached_rows(tmp_path / "cache", model, DATA, sel, enc)
    assert len(enc.calls) == 2
    cached_rows(tmp_path / "cache", {**model, "dtype": "bfloat16"}, DATA, sel, enc)  # the preprocessing/model config
    assert len(enc.calls) == 3
    cached_rows(tmp_path / "cache", model, {**DATA, "image_size": 64}, sel, enc)  # the cohort
    assert len(enc.calls) == 4
    cached_rows(tmp_path / "cache", model, DATA, [("val", "all")], enc)  # the split
    assert len(enc.calls) == 5
    # settings that only change speed (workers, cache folder) hit the same entry
    fast = {**DATA, "num_workers": 4, "reader": {**DATA["reader"], "workers": 8, "cache_dir": "/b"}}
    cached_rows(tmp_path / "cache", model, fast, sel, enc)
    assert len(enc.calls) == 5


def test_files_hash_is_the_content_hash_and_the_memo_returns_it(tmp_path, model):
    folder = model["path"]
    ref = hashlib.sha256()
    for name in ("config.json", "weights.safetensors"):  # sorted relative names, then contents
        ref.update(name.encode() + b"\0" + open(os.path.join(folder, name), "rb").read() + b"\0")
    assert files_hash(folder) == ref.hexdigest()
    memo = tmp_path / "memo"
    assert files_hash(folder, memo) == ref.hexdigest() and len(list(memo.iterdir())) == 1
    assert files_hash(folder, memo) == ref.hexdigest()  # from the memo
    with pytest.raises(FileNotFoundError, match="does not exist"):
        files_hash(tmp_path / "nope")


# ------------------------------------------------------------------ end to end: evaluate.py model=hf_clip
from tests.test_external_models import COHORT, hf_models  # noqa: E402, F401  (the tiny local models fixture)


def test_evaluate_reads_an_existing_models_embeddings_from_the_cache(hf_models, cache_dir, tmp_path, monkeypatch):  # noqa: F811
    """The second audit of the same model loads no model (the encoder is never called) and gives the
    numbers of the first, which are those of the Trainer path (cache_embeddings=false)."""
    import evaluate as E
    from configs import compose

    loads = []
    real = E.load_audited_module
    monkeypatch.setattr(E, "load_audited_module", lambda cfg: loads.append(1) or real(cfg))
    model = ["model=hf_clip", f"model.path={hf_models['siglip']}", *COHORT, "audit=all", "audit.relinkage.n_boot=50",
             "audit.probe.n_boot=20", "audit.relinkage.hardneg=false", "audit.relinkage.dedup=false",
             "++audit.relinkage.allow_degenerate=true"]  # the tiny cohort ties templated reports
    runs = []
    for i, extra in enumerate(([], [], ["cache_embeddings=false"])):
        _, obj = E.evaluate(compose("evaluate.yaml", [*model, *extra, f"paths.output_dir={tmp_path / str(i)}"]))
        runs.append(obj["result"])
    assert len(loads) == 2  # the first run (encoded, stored) and the Trainer run; the second read the cache
    assert runs[0]["meta"]["embeddings_cache"]["encoded"] and not runs[1]["meta"]["embeddings_cache"]["encoded"]
    assert runs[0]["relinkage"] == runs[1]["relinkage"] and runs[0]["probe"] == runs[1]["probe"]
    assert runs[2]["meta"]["source"] == runs[0]["meta"]["source"] == "model"
    for key, sec in runs[2]["relinkage"].items():  # the Trainer path: the same numbers
        for a, b in zip(sec["recall"], runs[0]["relinkage"][key]["recall"]):
            assert a["value"] == pytest.approx(b["value"], abs=1e-9) and a["ci"] == pytest.approx(b["ci"], abs=1e-9)
    assert runs[2]["probe"]["macro_auroc"] == pytest.approx(runs[0]["probe"]["macro_auroc"], abs=1e-6)
