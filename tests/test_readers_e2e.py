"""End to end on exported trees: the synthetic cohort written in the official layouts, then
`train.py data=mimic_cxr` and `evaluate.py data=chexpert_plus audit=hardneg` (external transfer,
the whole exported CheXpert Plus tree as the test set) run on them through the real configs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONFIG_DIR, ROOT

from cxr_relink.datamodules.readers.exporters import export
from cxr_relink.datamodules.synthetic.cohort import SyntheticReader

MISSING = [name for name in ("train.py", "evaluate.py", "configs/train.yaml", "configs/evaluate.yaml")
           if not (ROOT / name).is_file()]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"entry points missing: {MISSING}")

TINY_DATA = ["data.image_size=32", "data.batch_size=16", "data.eval_batch_size=64", "data.num_workers=0"]
# "++": set whether or not the trainer config names the key
TINY_TRAINER = ["++trainer.max_epochs=1", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1.0",
                "++trainer.log_every_n_steps=1", "++trainer.enable_progress_bar=false",
                "++trainer.enable_model_summary=false"]


def compose_config(name: str, overrides: list[str], output_dir: Path):
    """The real config as the CLI composes it, writing under output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name=name, overrides=[*overrides, f"paths.output_dir={output_dir}"])
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Three 'hospitals': MIMIC layout for training, CheXpert Plus for transfer, Open-I for batches."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt, seed in (("mimic_cxr", 11), ("chexpert_plus", 12), ("openi", 13)):
        studies = SyntheticReader(num_patients=40, seed=seed, image_size=32).load()
        export(studies, fmt, root / fmt)
        out[fmt] = root / fmt
    return out


@pytest.fixture(scope="module")
def mimic_run(exported, tmp_path_factory, cache_dir):
    from train import train

    out = tmp_path_factory.mktemp("train_mimic")
    cfg = compose_config("train.yaml", [
        "data=mimic_cxr", f"data.root={exported['mimic_cxr']}", "logger=csv", *TINY_DATA, *TINY_TRAINER,
        # the audits are exercised by evaluate.py below; here only the data path matters
        "~callbacks.relinkage_audit", "~callbacks.linear_probe", "final_audit=false",
    ], out)
    metrics, objects = train(cfg)
    return cfg, metrics, objects, out


@pytest.mark.slow
def test_train_on_exported_mimic_tree(mimic_run):
    cfg, metrics, objects, out = mimic_run
    assert math.isfinite(metrics["val/loss"])
    assert (out / "checkpoints" / "last.ckpt").is_file()
    dm = objects["datamodule"]
    assert {s.source for s in dm.studies("train")} == {"mimic_cxr"}
    assert all(Path(p).is_file() for s in dm.studies("train") for p in s.images)


def test_evaluate_hardneg_on_exported_chexpert_plus_tree(mimic_run, exported, tmp_path):
    from cxr_relink.evaluation import evaluate

    _, _, _, train_out = mimic_run
    cfg = compose_config("evaluate.yaml", [
        "data=chexpert_plus", f"data.root={exported['chexpert_plus']}", "data.reader.split_policy=test",
        "audit=hardneg", "audit.relinkage.n_boot=20", f"ckpt_path={train_out / 'checkpoints' / 'last.ckpt'}",
        *TINY_DATA,
    ], tmp_path)
    metrics, objects = evaluate(cfg)
    result = json.loads((tmp_path / "audit.json").read_text())
    assert result["relinkage"] and metrics
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float) and not math.isnan(v))


@pytest.mark.parametrize("cohort", ["mimic_cxr", "chexpert_plus", "openi"])
def test_datamodule_batches_from_exported_trees(exported, tmp_path, cohort):
    from hydra.utils import instantiate

    extra = ["data.reader.annotation_json=annotation.json", "data.reader.labels_csv=labels.csv",
             "data.reader.projections_csv=indiana_projections.csv"] if cohort == "openi" else []
    cfg = compose_config("train.yaml", [f"data={cohort}", f"data.root={exported[cohort]}", *extra, *TINY_DATA],
                         tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.eval_dataloader("train")))
    assert batch["image"].shape[1:] == (1, 32, 32) and batch["labels"].shape[1] == 14
    studies = dm.studies("train")
    first = batch["study_idx"][0].item()
    assert torch.equal(batch["labels"][0].nan_to_num(9), torch.from_numpy(studies[first].labels).nan_to_num(9))
