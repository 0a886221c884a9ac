"""DP on an existing model's own projection heads (models/external_heads.py + experiment=dp_alignment).

Tiny random models of each family (the builders of tests/test_external_models.py):
1. the trunk + projection split reproduces the library's own feature functions before training;
2. after a DP run (train.py experiment=dp_alignment model.external.path=...) only the projection tensors
   of the saved model differ from the original (every other tensor bit for bit), the folder loads with
   the library, its features equal our trained heads applied to the trunk features, and evaluate.py
   audits it;
3. the DP record's epsilon equals Opacus' accountant recomputed from the record's (sigma, q, steps)
   and the independent RDP formula, and the run spent its target.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.test_external_models import TEXTS, _images, hf_models, oc_models  # noqa: F401 (fixtures)

warnings.filterwarnings("ignore", message=".*Secure RNG.*")
COHORT = ["data.reader.num_patients=30", "public_cohort.reader.num_patients=20", "data.reader.image_size=48",
          "trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false", "logger=csv"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_inputs(path: Path):
    from transformers import AutoImageProcessor, AutoTokenizer

    proc, tok = AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    px = proc(images=[Image.fromarray(a).convert("RGB") for a in _images()], return_tensors="pt")["pixel_values"]
    enc = tok(TEXTS, padding="max_length", truncation=True, return_tensors="pt")
    return px, enc["input_ids"], enc["attention_mask"]


# ---------------------------------------------------------------- 1. the split reproduces the library
def test_hf_split_reproduces_library(hf_models):  # noqa: F811
    from transformers import CLIPModel

    from cxr_relink.models.external_heads import ExternalSplit

    split = ExternalSplit.load({"path": str(hf_models["clip"])})
    assert split.spec["family"] == "hf" and split.trunk.site_names == {"image": "visual_projection",
                                                                        "text": "text_projection"}
    ref = CLIPModel.from_pretrained(hf_models["clip"]).eval()
    px, ids, mask = _hf_inputs(hf_models["clip"])
    with torch.no_grad():
        ours_img = split.image_head(split.trunk.image_features(px))
        ours_txt = split.text_head(split.trunk.text_features(ids, mask))
        lib_img = ref.get_image_features(pixel_values=px).pooler_output
        lib_txt = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    assert torch.equal(ours_img, lib_img) and torch.equal(ours_txt, lib_txt)
    assert split.logit_scale.item() == pytest.approx(ref.logit_scale.item())
    # The trunk holds no projection weights; the trainable heads are the projections' copies.
    assert not any("projection" in k for k in split.trunk.net.state_dict())
    # SigLIP has no image projection layer (attention pooling): refused with the reason.
    with pytest.raises(ValueError, match="attention pooling"):
        ExternalSplit.load({"path": str(hf_models["siglip"])})


@pytest.mark.parametrize("layout", ["dir", "biomed"])
def test_open_clip_split_reproduces_library(oc_models, layout):  # noqa: F811
    import open_clip

    from cxr_relink.models.external_heads import ExternalSplit

    spec = oc_models[layout]
    split = ExternalSplit.load({k: v for k, v in spec.items() if not k.startswith("_")})
    assert split.spec["family"] == "open_clip"
    if layout == "dir":  # Parameters used as x @ P on both towers
        assert split.trunk.site_names == {"image": "visual.proj", "text": "text_projection"}
        ref, _, _ = open_clip.create_model_and_transforms(f"local-dir:{spec['path']}")
        tok = open_clip.get_tokenizer(f"local-dir:{spec['path']}")
    else:  # BiomedCLIP-like: the HF text tower's MLP head (Linear, GELU, Linear)
        assert split.trunk.site_names == {"image": "visual.proj", "text": "text.proj"}
        assert isinstance(split.text_head, torch.nn.Sequential)
        ref = spec["_model"]
        tok = open_clip.tokenizer.HFTokenizer(spec["path"], context_length=24)
    ref.eval()
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = tok(TEXTS)
    with torch.no_grad():
        ours_img = split.image_head(split.trunk.image_features(px))
        ours_txt = split.text_head(split.trunk.text_features(ids, torch.ones_like(ids)))
        lib_img, lib_txt = ref.encode_image(px), ref.encode_text(ids)
    # x @ P versus a Linear with weight P^T: the same product, summed in a possibly different order.
    torch.testing.assert_close(ours_img, lib_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_txt, lib_txt, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 2. + 3. a DP run on the model's own heads
def _compose(out: Path, *overrides: str):
    from omegaconf import open_dict

    from cxr_relink.configs import compose

    cfg = compose("train.yaml", ["experiment=dp_alignment", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


@pytest.fixture(scope="module")
def hf_dp_run(hf_models, tmp_path_factory):  # noqa: F811
    from train import train

    tmp = tmp_path_factory.mktemp("dp_hf")
    cfg = _compose(tmp / "run", f"model.external.path={hf_models['clip']}", f"paths.cache_dir={tmp / 'cache'}", *COHORT,
                   "data.batch_size=16", "trainer.max_epochs=2", "model.loss.bank_size=32", "model.dp.target_epsilon=2",
                   "trainer.check_val_every_n_epoch=2", "callbacks.relinkage_audit.n_boot=10",
                   "callbacks.linear_probe.n_boot=10", "callbacks.relinkage_audit.hardneg=false")
    metrics, objects = train(cfg)
    return {"cfg": cfg, "metrics": metrics, "module": objects["model"], "dm": objects["datamodule"],
            "out": Path(cfg.paths.output_dir) / "dp_model", "src": hf_models["clip"], "cache": tmp / "cache"}


@pytest.mark.slow
def test_hf_dp_run_changes_only_the_projections_and_saves_in_library_format(hf_dp_run):
    from safetensors.torch import load_file
    from transformers import CLIPModel

    run, out = hf_dp_run, hf_dp_run["out"]
    assert run["metrics"]["dp/guarantee_valid"] == 1.0
    orig = load_file(str(run["src"] / "model.safetensors"))
    saved = CLIPModel.from_pretrained(out).eval()  # the library loads the release
    new = saved.state_dict()
    trained = {"visual_projection.weight", "text_projection.weight"}
    assert set(json.loads((out / "dp_record.json").read_text())["trained_tensors"]) == trained
    assert set(new) == set(orig)
    for k, v in orig.items():
        if k in trained:
            assert v.shape == new[k].shape and not torch.equal(v, new[k]), k  # DP-SGD moved it
        else:
            assert v.dtype == new[k].dtype and torch.equal(v, new[k]), k  # bit for bit
    # Its features are our trained heads applied to the (cached) trunk features.
    module = run["module"]
    px, ids, mask = _hf_inputs(run["src"])
    with torch.no_grad():
        trunk_img = module.backbone_module.image_features(px)
        trunk_txt = module.backbone_module.text_features(ids, mask)
        torch.testing.assert_close(saved.get_image_features(pixel_values=px).pooler_output,
                                   module.image_head(trunk_img), rtol=0, atol=1e-6)
        torch.testing.assert_close(saved.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
                                   module.text_head(trunk_txt), rtol=0, atol=1e-6)
    # The cache is keyed by the model's fingerprint: the run's cached train features are its trunk's.
    files = sorted((run["cache"] / "dp_features").rglob("train.safetensors"))
    assert files and all(f.parent.name.startswith(module.hparams.backbone["checkpoint_sha256"][:16]) for f in files)


def test_hf_dp_record_epsilon_is_opacus_accountant_and_meets_target(hf_dp_run):
    from opacus.accountants import RDPAccountant

    from cxr_relink.models.dp.accounting import INTEGER_ORDERS, epsilon_from_rdp

    rec = json.loads((hf_dp_run["out"] / "dp_record.json").read_text())
    assert rec["guarantee_valid"] and rec["invalid_reasons"] == [] and rec["loss_mode"] == "public_negatives"
    assert rec["n_train_units"] is None and rec["delta"] == pytest.approx(1 / (10 * rec["n_train_units_upper"]))  # N withheld
    assert rec["source_model"]["family"] == "hf" and rec["head_init"]["mode"] == "fresh"
    sigma, q = rec["noise_multiplier"], rec["sample_rate"]
    steps = sum(int(n) for _, _, n in rec["accountant"]["history"])
    assert steps == rec["steps_planned"] == 2 * round(1 / q)
    assert all(s == sigma and r == q for s, r, _ in rec["accountant"]["history"])
    acc = RDPAccountant()  # a fresh accountant: the record's (sigma, q, steps) alone
    acc.history = [(sigma, q, steps)]
    assert rec["epsilon_spent"] == pytest.approx(acc.get_epsilon(delta=rec["delta"]), rel=1e-9)
    # The formula, not Opacus' code: the same integer orders give the same number; Opacus also searches
    # fractional orders, so its epsilon is never looser.
    indep, _ = epsilon_from_rdp([(sigma, q, steps)], rec["delta"])
    assert acc.get_epsilon(delta=rec["delta"], alphas=list(INTEGER_ORDERS)) == pytest.approx(indep, rel=1e-9)
    assert rec["epsilon_spent"] <= indep + 1e-12 and indep <= rec["epsilon_spent"] * 1.05
    assert rec["target_epsilon"] - 1e-3 <= rec["epsilon_spent"] <= rec["target_epsilon"]
    assert any("existing model" in x for x in rec["outside_guarantee"])


def test_fresh_head_init_reinitialises_the_models_own_projections(hf_models):  # noqa: F811
    """head_init=fresh on an existing CLIP: its projection layers are redrawn with CLIP's projection init
    N(0, 1/in_features) from torch.manual_seed(head_init_seed), image first; stage2 keeps the model's own."""
    from transformers import CLIPModel

    from cxr_relink.models.dp.module import DPAlignmentModule

    ref = CLIPModel.from_pretrained(hf_models["clip"])
    w_img, w_txt = ref.visual_projection.weight.detach(), ref.text_projection.weight.detach()
    kept = DPAlignmentModule(external={"path": str(hf_models["clip"])}, dp={"head_init": "stage2"})
    assert torch.equal(kept.image_head.weight, w_img) and torch.equal(kept.text_head.weight, w_txt)
    fresh = DPAlignmentModule(external={"path": str(hf_models["clip"])}, dp={"head_init": "fresh", "head_init_seed": 5})
    torch.manual_seed(5)
    want_img = torch.empty_like(w_img).normal_(0.0, w_img.shape[1] ** -0.5)
    want_txt = torch.empty_like(w_txt).normal_(0.0, w_txt.shape[1] ** -0.5)
    assert torch.equal(fresh.image_head.weight, want_img) and torch.equal(fresh.text_head.weight, want_txt)
    rec = fresh.dp_record()["head_init"]
    assert rec["mode"] == "fresh" and rec["seed"] == 5 and "N(0, 1/in_features)" in rec["rule"]


def test_evaluate_audits_the_released_folder(hf_dp_run, tmp_path):
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate

    ecfg = compose("evaluate.yaml", ["model=hf_clip", f"model.path={hf_dp_run['out']}", "audit=standard",
                                     "data.reader.num_patients=30", "data.reader.image_size=48",
                                     "audit.relinkage.n_boot=10", f"paths.output_dir={tmp_path}",
                                     "trainer.enable_progress_bar=false"])
    evaluate(ecfg)
    res = json.loads((tmp_path / "audit.json").read_text())
    assert "i2t" in res["relinkage"]
    assert res["privacy"]["guarantee_valid"] and res["privacy"]["epsilon_spent"] > 0


# ---------------------------------------------------------------- open_clip: the same run, its own format
def _oc_library(folder: Path):
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval()


@pytest.mark.slow
def test_open_clip_dp_run_saves_a_local_dir_folder(oc_models, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from train import train

    src = Path(oc_models["dir"]["path"])
    cfg = _compose(tmp_path / "run", f"model.external.path={src}", f"paths.cache_dir={tmp_path / 'cache'}", *COHORT,
                   "data.batch_size=16", "trainer.max_epochs=1", "model.loss.bank_size=32", "final_audit=false",
                   "trainer.check_val_every_n_epoch=5")
    _, objects = train(cfg)
    module, out = objects["model"], Path(cfg.paths.output_dir) / "dp_model"
    rec = json.loads((out / "dp_record.json").read_text())
    assert rec["guarantee_valid"] and rec["trained_tensors"] == ["text_projection", "visual.proj"]
    orig, new = load_file(str(src / "open_clip_model.safetensors")), _oc_library(out).state_dict()
    assert set(new) == set(orig)
    for k, v in orig.items():
        assert torch.equal(v, new[k]) != (k in rec["trained_tensors"]), k
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_oc_library(out).encode_image(px),
                                   module.image_head(module.backbone_module.image_features(px)), rtol=0, atol=1e-6)


def test_open_clip_mlp_head_export_changes_only_the_head(oc_models, tmp_path):  # noqa: F811
    """BiomedCLIP's layout (HF text tower, MLP `text.proj`): heads written back, nothing else moves."""
    from safetensors.torch import load_file

    from cxr_relink.models.external_heads import ExternalSplit, export_model
    from cxr_relink.models.external import ExternalDualEncoder

    spec = {k: v for k, v in oc_models["biomed"].items() if not k.startswith("_")}
    split = ExternalSplit.load(spec)
    with torch.no_grad():
        for p in [*split.image_head.parameters(), *split.text_head.parameters()]:
            p.add_(0.01)
    out = export_model(split.spec, split.image_head, split.text_head, tmp_path / "out", {"epsilon_spent": 1.0})
    orig = load_file(str(Path(spec["path"]) / "open_clip_model.safetensors"))
    new = load_file(str(out / "open_clip_model.safetensors"))
    changed = {k for k in orig if not torch.equal(orig[k], new[k])}
    assert changed == {"visual.proj", "text.proj.0.weight", "text.proj.2.weight"} and set(new) == set(orig)
    reloaded = ExternalDualEncoder("open_clip", str(out))  # the folder loads as the source did
    assert reloaded.saved_dp_state == {"epsilon_spent": 1.0}
    ids = reloaded.backend.tokenize(TEXTS)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.backend.text_features(ids, torch.ones_like(ids)),
                                   split.text_head(split.trunk.text_features(ids, torch.ones_like(ids))), rtol=0, atol=1e-6)
    with pytest.raises(FileExistsError):
        export_model(split.spec, split.image_head, split.text_head, out, {})


def test_open_clip_linear_text_projection_with_bias(tmp_path):
    """open_clip's `text_projection` as an nn.Linear with bias (proj_bias=True): the module is the head,
    bias included, and it round-trips through the export."""
    import open_clip
    from safetensors.torch import save_file

    from cxr_relink.models.external_heads import ExternalSplit, export_model

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "proj_bias": True}}
    torch.manual_seed(3)
    model = open_clip.CLIP(**cfg).eval()
    assert isinstance(model.text_projection, torch.nn.Linear) and model.text_projection.bias is not None
    src = tmp_path / "src"
    src.mkdir()
    (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src / "open_clip_model.safetensors")
    split = ExternalSplit.load({"path": str(src)})
    assert split.trunk.trained_tensors == ["text_projection.bias", "text_projection.weight", "visual.proj"]
    ids = open_clip.get_tokenizer(f"local-dir:{src}")(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(split.text_head(split.trunk.text_features(ids, torch.ones_like(ids))),
                                   model.encode_text(ids), rtol=0, atol=1e-6)
        split.text_head.bias.add_(1.0)
    out = export_model(split.spec, split.image_head, split.text_head, tmp_path / "out", {})
    reloaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    torch.testing.assert_close(reloaded.text_projection.bias, model.text_projection.bias + 1.0)
