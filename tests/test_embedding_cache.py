"""An existing model's embeddings cache (models/embedding_cache.py): a second audit encodes nothing; a
changed model file (also one replaced with the same size and mtime), model config, cohort (a report, an
image file replaced in place), row selection, code or package version encodes again; speed-only
settings do not; a damaged or edited cache file is encoded again, never trusted or a crash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np
import pytest

from cxr_relink.models import embedding_cache as EC
from cxr_relink.models.embedding_cache import cached_rows, files_hash

DATA = {"image_size": 32, "num_workers": 0, "reader": {"num_patients": 40, "seed": 1, "cache_dir": "/a", "workers": 1}}
N = 5


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Cohort:
    """The cohort's rows of each selection (what ``cohort_rows`` gives evaluate.py): study ids, report
    hashes, image signatures; ``reports`` may be edited between audits."""

    def __init__(self):
        self.reports = [f"report {i}" for i in range(N)]
        self.images = [f"array:{i}" for i in range(N)]

    def __call__(self, sel):
        return {"study_id": np.array([f"s{i}" for i in range(N)]), "patient_id": np.array([f"p{i}" for i in range(N)]),
                "report_text_hash": np.array([_hash(r) for r in self.reports]), "image": np.array(self.images)}


class Encoder:
    def __init__(self, cohort: Cohort):
        self.cohort = cohort
        self.calls: list[list[tuple[str, str]]] = []

    def __call__(self, missing):
        self.calls.append(list(missing))
        return {sel: self.rows(*sel) for sel in missing}

    def rows(self, split: str, rows: str) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(len(split) + len(rows))
        c = self.cohort((split, rows))
        return {"image_emb": rng.normal(size=(N, 4)).astype(np.float32), "report_emb": rng.normal(size=(N, 4)).astype(np.float32),
                "study_id": c["study_id"], "patient_id": c["patient_id"], "report_text_hash": c["report_text_hash"],
                "labels": np.zeros((N, 14), np.float32), "split": np.array([split] * N)}


@pytest.fixture
def cohort():
    return Cohort()


@pytest.fixture
def enc(cohort):
    return Encoder(cohort)


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"dim": 4}')
    (folder / "weights.safetensors").write_bytes(b"\x00" * 64)
    return {"_target_": "cxr_relink.models.external.ExternalDualEncoder", "family": "hf", "path": str(folder), "dtype": "float32"}


def test_second_audit_encodes_nothing_and_returns_the_same_rows(tmp_path, model, cohort, enc):
    sel = [("test", "all"), ("train", "subsample 2000 seed 0")]
    first, info = cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    assert enc.calls == [sel] and info["encoded"] == [list(s) for s in sel]
    second, info = cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    assert len(enc.calls) == 1 and info["encoded"] == []
    assert first.keys() == second.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
    # rows in the order asked: the audited split, then the probe's training rows
    assert list(second["split"]) == ["test"] * N + ["train"] * N
    # the stored entries load without pickle
    for path in info["cache"]:
        np.load(path, allow_pickle=False)
    # only the missing selection is encoded: the audited split of a run without the probe is a hit
    cached_rows(tmp_path / "cache", model, DATA, [("test", "all")], enc, cohort)
    assert len(enc.calls) == 1


def test_a_changed_model_file_or_config_or_cohort_encodes_again(tmp_path, model, cohort, enc):
    sel = [("test", "all")]
    cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    weights = os.path.join(model["path"], "weights.safetensors")
    with open(weights, "r+b") as f:  # same size, new content (and so a new mtime)
        f.write(b"\x01")
    cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    assert len(enc.calls) == 2
    cached_rows(tmp_path / "cache", {**model, "dtype": "bfloat16"}, DATA, sel, enc, cohort)  # the preprocessing/model config
    assert len(enc.calls) == 3
    cached_rows(tmp_path / "cache", model, {**DATA, "image_size": 64}, sel, enc, cohort)  # the cohort config
    assert len(enc.calls) == 4
    cached_rows(tmp_path / "cache", model, DATA, [("val", "all")], enc, cohort)  # the split
    assert len(enc.calls) == 5
    # settings that only change speed (workers, cache folder) hit the same entry
    fast = {**DATA, "num_workers": 4, "reader": {**DATA["reader"], "workers": 8, "cache_dir": "/b"}}
    cached_rows(tmp_path / "cache", model, fast, sel, enc, cohort)
    assert len(enc.calls) == 5


def test_weights_replaced_with_the_same_size_and_mtime_encode_again(tmp_path, model, cohort, enc):
    """``cp -p`` / ``rsync -a`` of other weights keep size and mtime: the key is the content."""
    sel = [("test", "all")]
    cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    weights = os.path.join(model["path"], "weights.safetensors")
    st = os.stat(weights)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"\x07" * 64)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.copy2(other, weights)  # cp -p: the new content, the old size and mtime
    assert (os.stat(weights).st_size, os.stat(weights).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    assert len(enc.calls) == 2


def test_a_cohort_edited_under_the_same_config_encodes_again(tmp_path, model, cohort, enc):
    sel = [("test", "all")]
    cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    cohort.reports[1], cohort.reports[2] = cohort.reports[2], cohort.reports[1]  # two reports swapped
    cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    assert len(enc.calls) == 2
    cohort.images[0] = "array:other"  # an image replaced
    cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    assert len(enc.calls) == 3
    cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)  # unchanged: a hit
    assert len(enc.calls) == 3


def test_cohort_rows_see_a_swapped_report_and_an_image_file_replaced_in_place(tmp_path):
    """A real layout (image files): a report edited and an image replaced with the same size and mtime
    (``cp -p``) change the rows' hash; reading the same files again does not."""
    from cxr_relink.datamodules.records import Study

    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(bytes([i]) * 100)
        paths.append(p)

    def studies(reports):
        return [Study(study_id=f"s{i}", patient_id=f"p{i}", images=[str(paths[i])], report=r, findings="", impression="",
                      labels=np.full(14, np.nan), split="test", source="t") for i, r in enumerate(reports)]

    reports = ["FINDINGS: a.", "FINDINGS: b.", "FINDINGS: c."]
    base = EC.rows_hash(EC.cohort_rows(studies(reports), "report"))
    assert EC.rows_hash(EC.cohort_rows(studies(reports), "report")) == base
    swapped = EC.cohort_rows(studies([reports[1], reports[0], reports[2]]), "report")
    assert EC.rows_hash(swapped) != base
    assert list(swapped["study_id"]) == ["s0", "s1", "s2"]
    time.sleep(0.05)  # past the file-time granularity of the kernel's clock
    st = os.stat(paths[1])
    new = tmp_path / "new.png"
    new.write_bytes(b"\xff" * 100)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.copy2(new, paths[1])  # cp -p: in place, same size, same mtime
    assert (os.stat(paths[1]).st_size, os.stat(paths[1]).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert EC.rows_hash(EC.cohort_rows(studies(reports), "report")) != base
    # in-memory images (the synthetic cohort) by their bytes; a subsample picks rows
    arrays = [np.full((4, 4), i, np.uint8) for i in range(3)]
    mem = [Study(study_id=f"s{i}", patient_id="p", images=[arrays[i]], report="r", findings="", impression="",
                 labels=np.full(14, np.nan), split="test", source="t") for i in range(3)]
    a = EC.cohort_rows(mem, "report", indices=[0, 2])
    assert list(a["study_id"]) == ["s0", "s2"]
    arrays[2][0, 0] = 9
    assert EC.rows_hash(EC.cohort_rows(mem, "report", indices=[0, 2])) != EC.rows_hash(a)


def test_the_key_covers_the_readers_the_section_parser_and_package_versions(tmp_path, model, cohort, enc, monkeypatch):
    for f in ("datamodules/readers/common.py", "datamodules/readers/report_sections.py", "datamodules/readers/mimic_cxr.py",
              "models/external.py", "audit/embeddings.py"):
        (tmp_path / "src" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / f).write_text("x = 1\n")
    before = EC.code_hash(root=tmp_path / "src")
    for f in ("datamodules/readers/common.py", "datamodules/readers/report_sections.py"):
        (tmp_path / "src" / f).write_text("x = 2\n")
        assert EC.code_hash(root=tmp_path / "src") != before
        before = EC.code_hash(root=tmp_path / "src")
    sel = [("test", "all")]
    cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    real = EC.package_versions()
    for pkg in ("transformers", "open_clip_torch", "torch"):
        monkeypatch.setattr(EC, "package_versions", lambda p=pkg: {**real, p: "0.0.0-other"})
        cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    assert len(enc.calls) == 4


def _entry(tmp_path):
    (path,) = (tmp_path / "cache" / "embeddings").glob("*.npz")
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "no record"])
def test_a_damaged_cache_file_is_encoded_again_not_a_crash(tmp_path, model, cohort, enc, damage, caplog):
    sel = [("test", "all")]
    first, _ = cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    path = _entry(tmp_path)
    raw = path.read_bytes()
    if damage == "no record":
        path.with_suffix(".json").unlink()
    else:
        path.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2], "garbage": b"not a zip" * 10}[damage])
    with caplog.at_level(logging.WARNING, logger="cxr_relink.models.embedding_cache"):
        again, info = cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    assert len(enc.calls) == 2 and info["encoded"] == [["test", "all"]]
    assert any("not used" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    np.testing.assert_array_equal(again["image_emb"], first["image_emb"])
    cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)  # stored again, whole: a hit
    assert len(enc.calls) == 2


@pytest.mark.parametrize("edit", ["dropped", "shuffled", "shuffled, record rewritten"])
def test_a_cache_file_with_rows_dropped_or_shuffled_is_encoded_again(tmp_path, model, cohort, enc, edit, caplog):
    """A valid .npz whose rows are not the cohort's selection in order is never served."""
    sel = [("test", "all")]
    first, _ = cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    path = _entry(tmp_path)
    data = EC.load(path)
    order = np.arange(N)[1:] if edit == "dropped" else np.array([1, 0, 2, 3, 4])
    edited = {k: v[order] for k, v in data.items()}
    np.savez(path, **edited)
    if edit == "shuffled, record rewritten":  # the digest made to match: the study ids still tell
        record = json.loads(path.with_suffix(".json").read_text())
        record["digest"] = EC.content_digest(edited)
        path.with_suffix(".json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="cxr_relink.models.embedding_cache"):
        again, _ = cached_rows(tmp_path / "cache", model, DATA, sel, enc, cohort)
    assert len(enc.calls) == 2
    said = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "not used" in said
    if edit == "shuffled, record rewritten":
        assert "study_id differ from the cohort's rows in order" in said
    np.testing.assert_array_equal(again["study_id"], first["study_id"])
    np.testing.assert_array_equal(again["image_emb"], first["image_emb"])


def test_files_hash_is_the_content_hash(tmp_path, model):
    folder = model["path"]
    ref = hashlib.sha256()
    for name in ("config.json", "weights.safetensors"):  # sorted relative names, then contents
        ref.update(name.encode() + b"\0" + open(os.path.join(folder, name), "rb").read() + b"\0")
    assert files_hash(folder) == ref.hexdigest()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        files_hash(tmp_path / "nope")


# ------------------------------------------------------------------ end to end: evaluate.py model=hf_clip
from tests.test_external_models import COHORT, hf_models  # noqa: E402, F401  (the tiny local models fixture)


@pytest.mark.slow
def test_evaluate_reads_an_existing_models_embeddings_from_the_cache(hf_models, cache_dir, tmp_path, monkeypatch):  # noqa: F811
    """The second audit of the same model loads no model (the encoder is never called) and gives the
    numbers of the first, which are those of the Trainer path (cache_embeddings=false)."""
    from cxr_relink import evaluation as E
    from cxr_relink.configs import compose

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
