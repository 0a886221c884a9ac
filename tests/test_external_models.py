"""Existing vision-language models (models/external.py): the audit's embeddings are the library's own.

For a tiny random-initialised model of each family, built and saved here (Hugging Face CLIPModel and
SiglipModel with their processor and tokenizer; open_clip as a local folder with open_clip_config.json
and as a named architecture + checkpoint file), the embeddings the audit uses equal the library's own
get_image_features / get_text_features / encode_image / encode_text on the same raw images and texts,
through the same datamodule path evaluate.py takes. Then: evaluate.py audits such a model, the
exported .npz audits to the same numbers, and the ladder compares three families.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

TEXTS = ["small left effusion", "clear lungs normal heart",
         "right pleural tube tip in good position no pneumothorax small left effusion clear lungs normal heart size"]
COHORT = ["data.reader.num_patients=60", "data.reader.image_size=48", "trainer.enable_progress_bar=false"]
AUDIT = ["audit=all", "audit.relinkage.n_boot=100", "audit.probe.n_boot=50"]  # every audit, fewer resamples


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)  # grey-scale, non-square, different sizes: resize/crop matter
    return [rng.integers(0, 256, size=s, dtype=np.uint8) for s in ((50, 60), (64, 40), (33, 33))]


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    from cxr_relink.datamodules.text import train_wordpiece

    root = tmp_path_factory.mktemp("hf")
    tok = train_wordpiece(TEXTS * 10, vocab_size=120, min_frequency=1)
    # 64 tokens: at 16, this 107-token vocabulary reads only a report's first few words, and 54% of the
    # cohort's queries tie with another report: refused as degenerate (audit/relinkage.py), rightly so.
    tok.model_max_length = 64
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config={**text, "eos_token_id": tok.sep_token_id, "bos_token_id": tok.cls_token_id,
                                             "pad_token_id": tok.pad_token_id},
                                vision_config=vision, projection_dim=16))
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    # CLIP's processor resizes the shortest edge then centre-crops; its own mean/std.
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3]).save_pretrained(root / "clip")
    siglip = SiglipModel(SiglipConfig(text_config={**text, "projection_size": 32}, vision_config=vision))
    siglip.save_pretrained(root / "siglip")
    tok.save_pretrained(root / "siglip")
    # SigLIP's tokenizer makes no attention mask: its model is fed max_length rows without one.
    cfg_path = root / "siglip" / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_input_names": ["input_ids"]}))
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    return {"clip": root / "clip", "siglip": root / "siglip"}


@pytest.fixture(scope="session")
def oc_models(tmp_path_factory) -> dict[str, dict]:
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    model_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                                 "patch_size": 8},
                 "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(1)
    model = open_clip.CLIP(**model_cfg).eval()
    # BiomedCLIP's layout: open_clip_config.json (model + preprocess config) + weights.
    folder = root / "TinyBiomed"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    # CheXzero's layout: an OpenAI-CLIP state dict + a named architecture (here a model-config .json).
    (root / "TinyCheXzero.json").write_text(json.dumps(model_cfg))
    torch.save(model.state_dict(), root / "tiny_chexzero.pt")
    # BiomedCLIP proper: a Hugging Face BERT text tower named by hub id in open_clip_config.json, its
    # config.json and tokenizer in the folder (nothing may be fetched from the hub).
    from transformers import BertConfig

    from cxr_relink.datamodules.text import train_wordpiece

    biomed = root / "TinyBiomedBERT"
    biomed.mkdir()
    train_wordpiece(TEXTS * 10, vocab_size=100, min_frequency=1).save_pretrained(biomed)
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(biomed)
    hub = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    text_cfg = {"hf_model_name": hub, "hf_tokenizer_name": hub, "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 24}
    bcfg = {**model_cfg, "text_cfg": text_cfg}
    (biomed / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": bcfg, "preprocess_cfg": {"mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]}}))
    bmodel = open_clip.CustomTextCLIP(**{**bcfg, "text_cfg": {**text_cfg, "hf_model_name": str(biomed),
                                                               "hf_model_pretrained": False}}).eval()
    save_file({k: v.contiguous() for k, v in bmodel.state_dict().items()}, biomed / "open_clip_model.safetensors")
    return {"dir": {"path": str(folder)},
            "arch": {"path": str(root / "tiny_chexzero.pt"), "arch": str(root / "TinyCheXzero.json")},
            "biomed": {"path": str(biomed), "_model": bmodel}}


@pytest.fixture(scope="session")
def project_ckpt(tmp_path_factory) -> Path:
    """A tiny untrained cxr-relink dual tower, saved as Lightning + models.checkpoint save one."""
    from cxr_relink.datamodules.text import build_tokenizer
    from cxr_relink.models.checkpoint import plain, save_extras
    from cxr_relink.models.dual_tower import DualTowerModule

    torch.manual_seed(2)
    m = DualTowerModule(
        image_tower={"_target_": "cxr_relink.models.image_towers.SmallCNN", "in_channels": 1, "widths": [8, 16]},
        text_tower={"_target_": "cxr_relink.models.text_towers.BertTextEncoder", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                    "intermediate_size": 32, "max_position_embeddings": 256},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True}, embed_dim=8,
        tokenizer=build_tokenizer(TEXTS * 20, vocab_size=120),
    )
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": plain(dict(m.hparams))}
    save_extras(m, ckpt)
    path = tmp_path_factory.mktemp("project") / "last.ckpt"
    torch.save(ckpt, path)
    return path


def _hf_reference(path: Path, images: list, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's own calls (as its documentation shows them), normalised."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path).eval()
    proc, tok = AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        px = proc(images=[Image.fromarray(a).convert("RGB") for a in images], return_tensors="pt")
        img = model.get_image_features(**px).pooler_output
        enc = tok(texts, padding="max_length", truncation=True, return_tensors="pt")
        txt = model.get_text_features(**{k: enc[k] for k in tok.model_input_names}).pooler_output
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _oc_reference(spec: dict, images: list, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    import open_clip

    if "_model" in spec:  # the model object the test saved, open_clip's eval transform and HF tokenizer
        model = spec["_model"]
        preprocess = open_clip.image_transform(32, is_train=False, mean=[0.4, 0.45, 0.5], std=[0.2, 0.25, 0.3])
        tokenizer = open_clip.tokenizer.HFTokenizer(spec["path"], context_length=24)
    elif "arch" in spec:
        open_clip.add_model_config(spec["arch"])
        name, kw = Path(spec["arch"]).stem, {"pretrained": spec["path"]}
    else:
        name, kw = f"local-dir:{spec['path']}", {}
    if "_model" not in spec:
        model, _, preprocess = open_clip.create_model_and_transforms(name, **kw)
        tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    with torch.no_grad():  # open_clip converts a grey PIL image to RGB in its own transform
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in images]), normalize=True)
        txt = model.encode_text(tokenizer(texts), normalize=True)
    return img, txt


def _external(family: str, **kw):
    from cxr_relink.models.external import ExternalDualEncoder

    return ExternalDualEncoder(family, **{k: str(v) for k, v in kw.items()})


# ------------------------------------------------------------------------- embeddings == library's
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_hf_embeddings_equal_library(hf_models, name):
    images = _images()
    module = _external("hf", path=hf_models[name])
    ref_img, ref_txt = _hf_reference(hf_models[name], images, TEXTS)
    assert module.backend.context_length == 64
    assert module.backend.use_mask == (name == "clip")
    torch.testing.assert_close(module.embed_images(images), ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(module.embed_reports(TEXTS), ref_txt, atol=1e-5, rtol=0)
    # RGB PIL input (what a user holding a colour image passes) goes the same way.
    torch.testing.assert_close(module.embed_images([Image.fromarray(a).convert("RGB") for a in images]), ref_img,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["dir", "arch", "biomed"])
def test_open_clip_embeddings_equal_library(oc_models, layout):
    images = _images(1)
    spec = oc_models[layout]
    module = _external("open_clip", **{k: v for k, v in spec.items() if not k.startswith("_")})
    ref_img, ref_txt = _oc_reference(spec, images, TEXTS)
    assert module.backend.context_length == (24 if layout == "biomed" else 20)
    torch.testing.assert_close(module.embed_images(images), ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(module.embed_reports(TEXTS), ref_txt, atol=1e-5, rtol=0)


def test_open_clip_layout_errors(oc_models, tmp_path):
    with pytest.raises(ValueError, match="model.arch"):
        _external("open_clip", path=oc_models["arch"]["path"])
    # A Hugging Face text tower named by hub id is never downloaded: its config must be local.
    folder = tmp_path / "hf_text"
    folder.mkdir()
    cfg = json.loads((Path(oc_models["dir"]["path"]) / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"] = {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                    "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        _external("open_clip", path=folder)
    with pytest.raises(ValueError, match="family"):
        _external("onnx", path=folder)


# ------------------------------------------------- evaluate.py, export, and the file's audit agree
def _flat(x, prefix=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def _model_overrides(family: str, spec) -> list[str]:
    if family == "ckpt":
        return [f"ckpt_path={spec}"]
    if family == "hf":
        return ["model=hf_clip", f"model.path={spec}"]
    return ["model=open_clip", *(f"model.{k}={v}" for k, v in spec.items())]


@pytest.mark.parametrize("family,name", [("hf", "clip"), ("open_clip", "dir"), ("ckpt", None)])
@pytest.mark.slow
def test_evaluate_and_export_agree_with_library(hf_models, oc_models, project_ckpt, cache_dir, tmp_path, family, name):
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate
    from experiments.export_embeddings import export_embeddings

    spec = {"hf": lambda: hf_models[name], "open_clip": lambda: oc_models[name], "ckpt": lambda: project_ckpt}[family]()
    model = _model_overrides(family, spec)
    _, direct = evaluate(compose("evaluate.yaml", [*model, *COHORT, *AUDIT, f"paths.output_dir={tmp_path / 'd'}"]))
    res = direct["result"]
    if family != "ckpt":
        assert res["meta"]["source"] == "model" and res["meta"]["model"].startswith(f"{family}:")
    assert {"i2t", "t2i", "hardneg/i2t", "dedup/i2t"} <= set(res["relinkage"]) and res["probe"]["macro_auroc"] > 0
    assert (tmp_path / "d" / "audit.json").exists() and (tmp_path / "d" / "recall_vs_n.png").exists()

    npz = tmp_path / "emb.npz"
    ecfg = compose("export_embeddings.yaml", [*model, *COHORT, f"out={npz}", f"paths.output_dir={tmp_path / 'x'}"])
    export_embeddings(ecfg)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export_embeddings(ecfg)
    _, from_file = evaluate(compose("evaluate.yaml", [f"embeddings={npz}", *AUDIT,
                                                      f"paths.output_dir={tmp_path / 'f'}"]))
    # The file audits to the numbers the model gave directly (point estimates and CIs).
    assert dict(_flat(from_file["result"]["relinkage"])) == dict(_flat(res["relinkage"]))
    assert from_file["result"]["probe"]["macro_auroc"] == pytest.approx(res["probe"]["macro_auroc"], abs=1e-6)
    if family == "ckpt":  # a project checkpoint: no outside library to compare with
        return

    # The exported rows are the library's embeddings of the cohort's raw images and report texts.
    from cxr_relink.datamodules.datamodule import load_image, study_text
    from hydra.utils import instantiate

    z = np.load(npz)
    test = z["split"] == "test"
    dm = instantiate(compose("evaluate.yaml", COHORT).data)
    studies = {s.study_id: s for s in dm.studies("test")}
    first_view = {}
    for i in np.flatnonzero(test):
        first_view.setdefault(str(z["study_id"][i]), i)  # rows follow the dataset: a study's views in order
    ids = sorted(first_view)[:6]
    raw = [load_image(studies[s].images[0], s) for s in ids]
    texts = [study_text(studies[s], dm.text_field) for s in ids]
    ref_img, ref_txt = (_hf_reference(spec, raw, texts) if family == "hf" else _oc_reference(spec, raw, texts))
    rows = [first_view[s] for s in ids]
    np.testing.assert_allclose(z["image_emb"][rows], ref_img.numpy(), atol=1e-5)
    np.testing.assert_allclose(z["report_emb"][rows], ref_txt.numpy(), atol=1e-5)


def test_evaluate_refuses_ambiguous_or_missing_model(tmp_path):
    from cxr_relink.configs import compose
    from cxr_relink.evaluation import evaluate

    with pytest.raises(ValueError, match="exactly one"):
        evaluate(compose("evaluate.yaml", ["model=hf_clip", "model.path=/x", "embeddings=/y.npz",
                                           f"paths.output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="exactly one"):  # model.path left ??? (missing)
        evaluate(compose("evaluate.yaml", ["model=hf_clip", f"paths.output_dir={tmp_path}"]))


# ------------------------------------------------------------------------------------- the ladder
@pytest.mark.slow
def test_ladder_three_families_and_a_checkpoint(hf_models, oc_models, project_ckpt, cache_dir, tmp_path):
    from experiments.ladder import main

    oc = oc_models["arch"]
    res = main(["--out", str(tmp_path / "ladder"),
                "--model", f"CLIP: model=hf_clip model.path={hf_models['clip']}",
                "--model", f"SigLIP: model=hf_clip model.path={hf_models['siglip']}",
                "--model", f"CheXzero-like: model=open_clip model.arch={oc['arch']} model.path={oc['path']}",
                "--model", f"ours: ckpt_path={project_ckpt}",
                *COHORT, *AUDIT])
    rows = res["rows"]
    assert [r["model"] for r in rows] == ["CLIP", "SigLIP", "CheXzero-like", "ours"]
    for r in rows:
        # The tiny cohort's pool is below 100: every N is clipped to the full database.
        assert r["clipped_n"] == [100, 1000, 10000] and r["i2t R@1 N=full"]["x_chance_ci"]
        assert r["hardneg R@1 N=full"] is not None and r["probe macro AUROC"]["value"] > 0
        # The table's numbers are each model's own audit.json.
        own = json.loads((tmp_path / "ladder" / r["model"] / "audit.json").read_text())
        full = next(x for x in own["relinkage"]["i2t"]["recall"] if x["k"] == 5 and x["n"] == "full")
        assert r["i2t R@5 N=full"]["value"] == full["value"]
    md = Path(res["paths"]["markdown"]).read_text()
    assert md.count("| CheXzero-like |") == 4 and "probe macro AUROC" in md
    assert Path(res["paths"]["plot"]).stat().st_size > 10_000
    with pytest.raises(ValueError, match="distinct"):
        main(["--out", str(tmp_path / "l2"), "--model", "a: embeddings=x.npz", "--model", "a: embeddings=y.npz"])


# ------------------------------------------------------------- trust guards (issue 23): refuse, say why
# Each folder below loads and runs in transformers / open_clip, with embeddings that are not the model's.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    import shutil

    dst.mkdir()
    for f in Path(src).iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_missing_model_path_says_so(tmp_path):
    for family in ("hf", "open_clip"):  # before (hf): "Repo id must be in the form 'repo_name'..."
        with pytest.raises(FileNotFoundError, match=r"model.path \S*nowhere does not exist"):
            _external(family, path=tmp_path / "nowhere")


def test_hf_folder_without_tokenizer_files_is_refused(hf_models, tmp_path):
    from transformers import AutoTokenizer

    folder = _copy(hf_models["clip"], tmp_path / "clip", skip=HF_TOKENIZER_FILES)
    # What the library does with such a folder, silently: a tokenizer of a couple of special tokens.
    assert len(AutoTokenizer.from_pretrained(folder)) < 5
    with pytest.raises(FileNotFoundError, match="no tokenizer files .*every report would embed the same"):
        _external("hf", path=folder)


def test_hf_tokenizer_of_another_model_is_refused(hf_models, tmp_path):
    from cxr_relink.datamodules.text import train_wordpiece

    n_model = json.loads((hf_models["clip"] / "config.json").read_text())["text_config"]["vocab_size"]
    folder = _copy(hf_models["clip"], tmp_path / "clip", skip=HF_TOKENIZER_FILES)
    other = train_wordpiece(["an entirely different corpus of hospital words"] * 10, vocab_size=90, min_frequency=1)
    assert len(other) != n_model
    other.save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"tokenizer has {len(other)} tokens but .* embedding table has {n_model} rows"):
        _external("hf", path=folder)
    # Same size, but the text tower pools at another end-of-text id than the tokenizer writes: before,
    # every report was read from position 0.
    folder2 = _copy(hf_models["clip"], tmp_path / "clip_eos")
    cfg = json.loads((folder2 / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = 4  # [MASK], never at the end of a row
    (folder2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"pools at its end-of-text id 4"):
        _external("hf", path=folder2)


def test_hf_image_processor_of_another_model_is_refused(hf_models, tmp_path):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    folder = _copy(hf_models["clip"], tmp_path / "clip", skip=("preprocessor_config.json",))
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)  # right size, wrong normalisation
    with pytest.raises(ValueError, match=r"preprocessor_config.json is a SiglipImageProcessor.*clip"):
        _external("hf", path=folder)
    folder2 = _copy(hf_models["clip"], tmp_path / "clip24", skip=("preprocessor_config.json",))
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(folder2)
    with pytest.raises(ValueError, match=r"pixel tensors \[3, 24, 24\] but the vision tower takes \[3, 32, 32\]"):
        _external("hf", path=folder2)


def test_torchscript_release_is_refused_with_a_conversion_that_works(oc_models, tmp_path):
    import open_clip

    spec = oc_models["arch"]
    open_clip.add_model_config(spec["arch"])
    model, _, _ = open_clip.create_model_and_transforms(Path(spec["arch"]).stem, pretrained=spec["path"])
    ts = tmp_path / "ViT-tiny.pt"  # OpenAI's releases are TorchScript archives like this one
    torch.jit.save(torch.jit.script(model.eval()), ts)
    with pytest.raises(ValueError, match="TorchScript archive") as err:  # before: torch's weights_only RuntimeError
        _external("open_clip", path=ts, arch=spec["arch"])
    command = next(line.strip() for line in str(err.value).splitlines() if line.strip().startswith("python -c"))
    exec(command[len('python -c "'):-1], {})  # the printed one-liner, run as the user would
    converted = tmp_path / "ViT-tiny_state_dict.pt"
    module = _external("open_clip", path=converted, arch=spec["arch"])
    ref_img, ref_txt = _oc_reference(spec, _images(2), TEXTS)
    torch.testing.assert_close(module.embed_images(_images(2)), ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(module.embed_reports(TEXTS), ref_txt, atol=1e-5, rtol=0)
