"""Existing vision-language models from local folders, behind the project's embedding contract.

`python evaluate.py model=hf_clip model.path=/models/x` (or `model=open_clip`) audits a model that
was not trained here: a Hugging Face `CLIPModel` / `SiglipModel` (or any model with
`get_image_features` / `get_text_features`), or an open_clip model (a folder with
`open_clip_config.json` + weights, as BiomedCLIP is published, or a named architecture + a
checkpoint file, as CheXzero-style OpenAI-CLIP state dicts are). Nothing is downloaded and no remote
code runs: every file is read from the given path (`local_files_only=True`, `weights_only=True`).

Embeddings are the library's own: the image goes through the model's own processor / transform
(resize, crop, RGB, per-channel mean/std read from its config) and the report through its own
tokenizer and context length. A grey-scale radiograph becomes RGB (`PIL.Image.convert("RGB")`, the
channel repeated), as these models were fed. The datamodule still reads the cohort: evaluate.py
hands it this module's `tokenizer` and `data_preprocessing` (its `image_transform`), as it hands it
a checkpoint's. tests/test_external_models.py checks the embeddings against the libraries' own calls.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cxr_relink.audit.embeddings import validation_outputs
from cxr_relink.models.contract import LoadedState
from cxr_relink.models.load_guard import LoadProblems, compare_state_dict, enforce

log = logging.getLogger(__name__)

FAMILIES = ("hf", "open_clip")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# ---- trust guards: a model that loads is not yet a model that is audited correctly ------------------
# Each check below refuses a folder that transformers / open_clip would load and run silently, giving
# embeddings that are not the model's (an empty tokenizer: every report the same, "0.00x chance").

# The files one of which holds a Hugging Face tokenizer's vocabulary. Without any, AutoTokenizer
# builds an empty tokenizer from the model's config (a CLIPTokenizer of 2 tokens).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
# A text embedding table may be padded past the tokenizer to a multiple of 64 (by fewer than 128 rows).
_VOCAB_PAD = 64
_PROBE_TEXT = "No acute cardiopulmonary process."


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (torch.jit.save): a zip whose record holds constants.pkl and code/."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1] == "constants.pkl" or n.split("/", 1)[-1].startswith("code/")
                   for n in z.namelist())


def torchscript_conversion(path: Path) -> str:
    """The one-line command that turns a TorchScript CLIP release into a plain state dict."""
    out = path.with_name(path.stem + "_state_dict.pt")
    # OpenAI's archives carry three int "weights" open_clip does not take; an archive that open_clip
    # scripted itself carries its (recomputed, non-persistent) attention mask.
    return (f"python -c \"import torch; m = torch.jit.load('{path}', map_location='cpu'); torch.save({{k: v for k, v "
            f"in m.state_dict().items() if k not in ('input_resolution', 'context_length', 'vocab_size', "
            f"'attn_mask')}}, '{out}')\"")


def local_model_path(path: str, family: str) -> Path:
    """``model.path`` as an existing local path, or an error that says what is wrong with it."""
    p = Path(path)
    if not p.exists():
        what = "folder" if family == "hf" else "folder or checkpoint file"
        raise FileNotFoundError(f"model.path {p} does not exist (the model's local {what}; nothing is downloaded)")
    if p.is_file() and _is_torchscript(p):
        # Loading TorchScript runs the archive's code; weights_only loading refuses it. Converting is the
        # user's informed step, once, for a file they trust (the official OpenAI CLIP releases are such).
        raise ValueError(
            f"model.path {p} is a TorchScript archive (as OpenAI's CLIP releases are): loading one runs its code, "
            f"which the audit does not do. If you trust the file, convert it once to a plain state dict:\n  "
            f"{torchscript_conversion(p)}\nthen audit that file with model=open_clip model.arch=<its open_clip "
            "architecture, e.g. ViT-B-32-quickgelu for ViT-B-32.pt> (docs/audit.md, existing models)")
    return p


def _base_class_name(name: str) -> str:
    for suffix in ("Fast", "Pil"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def check_image_processor(path: Path, config: Any, processor: Any) -> None:
    """The processor saved beside the model is one its model type uses, and makes the pixel size
    and channels the vision tower was built for (a SigLIP processor in a CLIP folder runs, with
    SigLIP's normalisation: images off by 0.12)."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if names:
        allowed = {_base_class_name(n) for n in (names.values() if isinstance(names, dict) else
                                                 names if isinstance(names, (tuple, list)) else [names]) if n}
        got = type(processor).__name__
        if _base_class_name(got) not in allowed:
            raise ValueError(f"{path}/preprocessor_config.json is a {got}, but a {config.model_type} model's processor "
                             f"is {sorted(allowed)}: it is another model's (its resize and normalisation are not this "
                             "model's); copy the model's own preprocessor_config.json")
    vision = getattr(config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    if size is None:
        return
    want = (int(getattr(vision, "num_channels", 3)), *((size, size) if isinstance(size, int) else tuple(size)))
    got_shape = tuple(processor(images=Image.new("RGB", (50, 40)), return_tensors="pt")["pixel_values"].shape[1:])
    if got_shape != want:
        raise ValueError(f"{path}: the image processor makes pixel tensors {list(got_shape)} but the vision tower takes "
                         f"{list(want)} (vision_config.image_size {size}): preprocessor_config.json does not match the model")


def check_tokenizer(path: Path, config: Any, tokenizer: Any, context_length: int) -> None:
    """The tokenizer saved beside the model is the model's: as many tokens as its text embedding
    table (up to padding to a multiple of 64), and for CLIP the special tokens its text tower pools
    at (the end-of-text id, which it finds in the input ids) and starts from."""
    text = getattr(config, "text_config", config)
    vocab = getattr(text, "vocab_size", None)
    n_tok = len(tokenizer)
    if vocab is not None and not (n_tok == vocab or (n_tok < vocab and vocab % _VOCAB_PAD == 0
                                                      and vocab - n_tok < 2 * _VOCAB_PAD)):
        raise ValueError(f"{path}: the tokenizer has {n_tok} tokens but the model's text embedding table has {vocab} "
                         "rows: the tokenizer files are not this model's; copy the model's own")
    if config.model_type != "clip":
        return
    enc = tokenizer([_PROBE_TEXT], padding="max_length", truncation=True, max_length=context_length,
                    return_attention_mask=True)
    ids = [i for i, m in zip(enc["input_ids"][0], enc["attention_mask"][0]) if m]
    eos, bos = getattr(text, "eos_token_id", None), getattr(text, "bos_token_id", None)
    if eos == 2:  # configs before transformers PR #24773: CLIP pools at the largest id (its end-of-text)
        ok, expect = ids.index(max(ids)) == len(ids) - 1, "its largest id last"
    else:
        ok, expect = ids[-1] == eos and ids.index(eos) == len(ids) - 1, f"end-of-text id {eos}"
    if not ok:
        raise ValueError(f"{path}: the tokenizer's rows end {ids[-3:]}, but this CLIP text tower pools at its "
                         f"{expect} (text_config): the tokenizer is not this model's, and every report would be "
                         "read from the wrong token")
    if bos is not None and ids[0] != bos:
        raise ValueError(f"{path}: the tokenizer's rows start with id {ids[0]}, but the model's text_config.bos_token_id "
                         f"is {bos}: the tokenizer is not this model's")


def _file_digests(folder: Path, names: Sequence[str]) -> str:
    import hashlib

    return ", ".join(f"{n} (sha256 {hashlib.sha256((folder / n).read_bytes()).hexdigest()[:12]})"
                     for n in names if (folder / n).is_file())


def preprocessing_unproven(family: str, path: str, arch: str | None = None, image_mean: Sequence[float] | None = None,
                           image_std: Sequence[float] | None = None, text_config_dir: str | None = None,
                           **_: Any) -> list[str]:
    """What an existing model's files cannot prove about its preprocessing, one line per part (the
    result's meta.preprocessing_unproven; report.md states it). Read from the model config and the
    folder's small files only, so an audit from cached embeddings states it too.

    check_tokenizer / check_image_processor refuse a tokenizer or processor that does not fit the
    towers (size, special ids, class, pixel shape), but nothing ties a vocabulary or a mean/std to
    the weights: a tokenizer of the same size and special ids with another vocabulary, or another
    model's mean/std in the same processor class, loads and runs. The lines name the files (with
    their sha256, to compare with the model's published release) and values the audit used. The
    open_clip tokenizer built into the library for an architecture is the library's, not a file's:
    no line."""
    p = Path(path)
    notes = []
    tokenizer_dir = None
    if family == "hf":
        tokenizer_dir = p
        pre = json.loads((p / "preprocessor_config.json").read_text())
        norm = (f"mean {pre.get('image_mean')}, std {pre.get('image_std')} from {p}/preprocessor_config.json "
                f"({pre.get('image_processor_type', 'its processor class')})")
    else:
        cfg = json.loads((p / "open_clip_config.json").read_text()) if p.is_dir() else {}
        if cfg.get("model_cfg", {}).get("text_cfg", {}).get("hf_tokenizer_name"):
            tokenizer_dir = Path(text_config_dir) if text_config_dir else p
        from open_clip.transform import PreprocessCfg

        pre = cfg.get("preprocess_cfg") or {}
        default = PreprocessCfg()
        if image_mean is not None or image_std is not None:
            source = "model.image_mean / model.image_std"
        elif p.is_dir():
            source = f"{p}/open_clip_config.json" if "mean" in pre else "open_clip's default (OpenAI's; open_clip_config.json names none)"
        else:
            source = f"open_clip's default (OpenAI's): the checkpoint file {p.name} records no preprocessing"
        mean = list(image_mean) if image_mean is not None else pre.get("mean", list(default.mean))
        std = list(image_std) if image_std is not None else pre.get("std", list(default.std))
        norm = f"mean {mean}, std {std} from {source}"
    if tokenizer_dir is not None:
        notes.append(f"tokenizer: {_file_digests(tokenizer_dir, TOKENIZER_FILES)} in {tokenizer_dir}; its size and "
                     "special tokens fit the text tower, but no file proves its vocabulary is the one the model was "
                     "trained with (compare the sha256 with the model's release)")
    notes.append(f"image normalisation: {norm}; nothing in the weights proves these are the values the model was "
                 "trained with")
    return notes


def to_rgb(image: Any) -> Image.Image:
    """A radiograph (PIL image, HxW uint8 array, or the datamodule's uint8 [1,H,W] tensor) as an RGB
    PIL image: grey channel repeated three times, as CLIP-family models are fed."""
    if isinstance(image, torch.Tensor):
        image = image.squeeze(0).numpy() if image.ndim == 3 and image.shape[0] == 1 else image.numpy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image.convert("RGB")


class ImageTransform:
    """The datamodule's image transform for an external model: its uint8 [1,H,W] tensor -> RGB ->
    the library's own preprocessing -> float [3,h,w]. Picklable (dataloader workers)."""

    def __init__(self, preprocess: Any, name: str) -> None:
        self.preprocess = preprocess  # the library's own (no model weights: cheap to send to workers)
        self.name = name

    def __call__(self, x: Any) -> torch.Tensor:
        return self.preprocess(to_rgb(x))

    def __repr__(self) -> str:
        return f"ImageTransform({self.name})"


class HFImageProcessor:
    """A transformers image processor as a one-image callable -> pixel_values [C, h, w]."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class ReportTokenizer:
    """What the datamodule needs of a tokenizer (`__call__` -> input_ids, `pad_token_id`,
    `padding_side`), answered by the library's own tokenizer at the model's context length.

    Rows are returned without their padding (the library's attention mask says which tokens are
    real), the datamodule pads them to the batch, and `ExternalDualEncoder.encode_reports` pads them
    on to the context length: the tensors the model sees are the ones its library would build."""

    def __init__(self, backend: "_Backend") -> None:
        self.backend = backend
        self.pad_token_id = backend.pad_token_id
        self.padding_side = backend.padding_side

    def __call__(self, texts: Sequence[str], truncation: bool = True, max_length: int | None = None,
                 add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        # The model's own context length and special tokens, whatever the caller asks for.
        ids, mask = self.backend.tokenize(list(texts))
        return {"input_ids": [row[m.bool()].tolist() for row, m in zip(ids, mask)]}


def pad_to(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [B, l] token ids (and their mask) to [B, length] on `side`, as a tokenizer's
    padding="max_length" does."""
    extra = length - ids.shape[1]
    if extra < 0:
        raise ValueError(f"token rows of length {ids.shape[1]} exceed the model's context length {length}")
    if extra == 0:
        return ids, mask
    pad_ids = ids.new_full((ids.shape[0], extra), pad_id)
    pad_mask = mask.new_zeros((mask.shape[0], extra))
    if side == "left":
        return torch.cat([pad_ids, ids], 1), torch.cat([pad_mask, mask], 1)
    return torch.cat([ids, pad_ids], 1), torch.cat([mask, pad_mask], 1)


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected feature; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _Backend:
    """One library's model + preprocessing. `tokenize` -> (ids [B, L], mask [B, L]) at the context length."""

    model: torch.nn.Module
    context_length: int
    pad_token_id: int
    load_notes: list[str]  # what did not load (models/load_guard.py), [] when everything did
    padding_side: str = "right"

    preprocess: Any  # RGB PIL image -> pixel tensor [C, h, w], the library's own

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> str: ...


class HFBackend(_Backend):
    """A transformers model with get_image_features / get_text_features, with the image processor
    and tokenizer saved beside it (AutoImageProcessor, AutoTokenizer)."""

    def __init__(self, path: str, context_length: int | None = None, dtype: torch.dtype | None = None,
                 allow_partial_load: bool = False) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        p = local_model_path(path, "hf")
        if not p.is_dir():
            raise ValueError(f"model.path {p} is a file: model=hf_clip takes a Hugging Face model folder (config.json, "
                             "weights, tokenizer files, preprocessor_config.json); for a checkpoint file use "
                             "model=open_clip model.arch=...")
        missing = [f for f in ("config.json", "preprocessor_config.json") if not (p / f).is_file()]
        if missing:
            raise FileNotFoundError(f"model.path {p} lacks {missing}: a Hugging Face model folder holds them beside the "
                                    "weights (for an open_clip folder use model=open_clip)")
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"model.path {p} has no tokenizer files (one of {list(TOKENIZER_FILES)}): "
                                    "transformers would build an empty tokenizer and every report would embed the "
                                    "same; copy the model's own tokenizer files into the folder")
        kw = dict(local_files_only=True, trust_remote_code=False)
        # transformers initialises at random, with a warning, every tensor the weights do not provide
        # (a prefixed checkpoint: all of them); its loading info lists them and load_guard refuses.
        # ignore_mismatched_sizes: other-shaped tensors are listed there too (instead of transformers'
        # own RuntimeError), so every problem is refused, or flagged, the same way.
        self.model, info = AutoModel.from_pretrained(path, dtype=dtype or "auto", output_loading_info=True,
                                                     ignore_mismatched_sizes=True, **kw)  # "auto": as saved
        self.model.eval()
        problems = LoadProblems(sorted(info["missing_keys"]), sorted(info["unexpected_keys"]),
                                sorted((k, tuple(a), tuple(b)) for k, a, b in info["mismatched_keys"]),
                                [str(e) for e in info.get("error_msgs") or []])
        self.load_notes = enforce(problems, f"model.path {p}", allow_partial_load)
        for fn in ("get_image_features", "get_text_features"):
            if not hasattr(self.model, fn):
                raise ValueError(f"{path}: {type(self.model).__name__} has no {fn}; model=hf_clip needs a dual "
                                 "encoder (CLIPModel, SiglipModel, ...)")
        processor = AutoImageProcessor.from_pretrained(path, **kw)
        check_image_processor(p, self.model.config, processor)
        self.preprocess = HFImageProcessor(processor)
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        self.context_length = int(context_length or self._context_length())
        check_tokenizer(p, self.model.config, self.tokenizer, self.context_length)
        self.pad_token_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.padding_side = self.tokenizer.padding_side
        # SigLIP's tokenizer returns no attention mask and its model is fed none (it was trained on
        # max_length padding without one); pass the mask only where the tokenizer makes it.
        self.use_mask = "attention_mask" in self.tokenizer.model_input_names
        self.name = f"{type(self.model).__name__} from {path}"

    def _context_length(self) -> int:
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        max_pos = getattr(text_cfg, "max_position_embeddings", None)
        tok_max = self.tokenizer.model_max_length
        tok_max = tok_max if tok_max and tok_max < 100_000 else None  # "unset" is a huge sentinel
        known = [v for v in (tok_max, max_pos) if v]
        if not known:
            raise ValueError("cannot tell the model's context length: set model.context_length")
        return min(known)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                             return_attention_mask=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kw = {"attention_mask": mask} if self.use_mask else {}
        return _features(self.model.get_text_features(input_ids=ids, **kw))

    def describe(self) -> str:
        return self.name


class _NoRandomInitWarning(logging.Filter):
    """open_clip warns "Model initialized randomly" when it builds a model without weights, as
    OpenCLIPBackend asks it to before load_open_clip_weights fills every tensor: not true here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def load_open_clip_weights(model: torch.nn.Module, path: Path, allow_partial_load: bool = False) -> list[str]:
    """Load an open_clip checkpoint into ``model`` (built from its config) as open_clip's
    `load_checkpoint` (3.x) does, less its resizing: a state dict whose positional embeddings do not
    fit the config (text context 20 -> 16, image grid 4x4 -> 3x3) is refused, as is any missing,
    unexpected or differently shaped tensor (models/load_guard.py). Returns the notes of what did
    not load when ``allow_partial_load``.

    The attention head count is in no tensor's shape (a width-512 layer has the same in_proj weight
    for 8 heads or 16): it is the config's, unchecked (docs/audit.md)."""
    from open_clip.convert import convert_state_dict
    from open_clip.factory import load_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    if path.suffix in (".npz", ".npy"):
        raise ValueError(f"model.path {path}: big_vision .npz weights are converted by open_clip without a record of "
                         "what loaded; convert them to a state dict first")
    sd = load_state_dict(str(path), device="cpu", weights_only=True)  # also drops a DDP 'module.' prefix
    sd = convert_state_dict(model, sd)  # third-party layouts (MobileCLIP) -> open_clip's names
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)  # the pre-2.0 text tower names
    own = model.state_dict()
    for key in ("logit_scale", "logit_bias"):  # a scalar saved 0-d or 1-d: the same number
        if key in sd and key in own and sd[key].numel() == own[key].numel() == 1:
            sd[key] = sd[key].reshape(own[key].shape)
    if "logit_bias" in own and "logit_bias" not in sd and "logit_scale" in sd:
        # As open_clip: a CLIP checkpoint in a SigLIP-configured model; the bias enters the loss only,
        # never the embeddings the audit reads.
        sd["logit_bias"] = torch.zeros_like(own["logit_bias"])
    if "text.transformer.embeddings.position_ids" not in own:  # as open_clip: a buffer transformers>=4.31 dropped
        sd.pop("text.transformer.embeddings.position_ids", None)
    problems = compare_state_dict(own, sd)
    notes = enforce(problems, f"model.path {path}", allow_partial_load)
    bad = {k for k, _, _ in problems.mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in bad}, strict=False)
    return notes


def _create(open_clip, name: str, **kw):
    """open_clip.create_model_and_transforms without its random-initialisation warning (open_clip logs
    through the root logger)."""
    root, quiet = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(quiet)
    try:
        return open_clip.create_model_and_transforms(name, **kw)
    finally:
        root.removeFilter(quiet)


class OpenCLIPBackend(_Backend):
    """An open_clip model: a folder with open_clip_config.json + weights (`local-dir:`), or `arch`
    (a built-in architecture name or a model-config .json) + a checkpoint file."""

    def __init__(self, path: str, arch: str | None = None, context_length: int | None = None,
                 dtype: torch.dtype | None = None, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, text_config_dir: str | None = None,
                 allow_partial_load: bool = False) -> None:
        try:
            import open_clip
        except ImportError as e:
            raise ImportError("model=open_clip needs open-clip-torch (pip install -r requirements.txt)") from e
        p = local_model_path(path, "open_clip")
        # The model is built from its config alone and the weights loaded here (load_open_clip_weights):
        # open_clip's own loader resizes positional embeddings that do not fit the config, silently.
        kw: dict[str, Any] = dict(image_mean=image_mean, image_std=image_std, weights_only=True, load_weights=False,
                                  pretrained_text=False, pretrained_image=False)
        if p.is_dir():
            if arch is not None:
                raise ValueError(f"model.path {p} is a folder (open_clip_config.json + weights): leave model.arch null")
            name = f"local-dir:{p}"
            if not (p / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"model.path {p} is a folder without open_clip_config.json (an open_clip "
                                        "folder holds it beside the weights); for a Hugging Face folder use model=hf_clip")
            cfg = json.loads((p / "open_clip_config.json").read_text())["model_cfg"]
            text_cfg = cfg.get("text_cfg", {})
            hf_name = text_cfg.get("hf_model_name")
            if hf_name and not Path(hf_name).is_dir():
                # A Hugging Face text tower named by its hub id (BiomedCLIP): its config.json must be local.
                local = Path(text_config_dir) if text_config_dir else p
                if not (local / "config.json").is_file():
                    raise FileNotFoundError(
                        f"{p}/open_clip_config.json names the Hugging Face text model {hf_name!r}, which is never "
                        f"downloaded: put its config.json in {local} or set model.text_config_dir=<folder>")
                # Its weights come with the full checkpoint (loaded strictly): build it from the config alone.
                kw["text_cfg"] = {**text_cfg, "hf_model_name": str(local), "hf_model_pretrained": False}
            model, _, self.preprocess = _create(open_clip, name, **kw)
            from open_clip.factory import _find_checkpoint_in_dir  # open_clip's choice among the folder's files

            weights = _find_checkpoint_in_dir(p)
            if weights is None:  # open_clip would go on with a random model ("initialized randomly")
                raise FileNotFoundError(f"model.path {p} has open_clip_config.json but no weights (*.safetensors, "
                                        "*.bin, *.pth)")
            if "text_cfg" in kw and text_cfg.get("hf_tokenizer_name"):
                # open_clip.get_tokenizer("local-dir:...") would read the tokenizer from `p`; it lives
                # with the text config (the same arguments get_tokenizer passes).
                from open_clip.tokenizer import HFTokenizer

                self.tokenizer = HFTokenizer(kw["text_cfg"]["hf_model_name"],
                                             context_length=context_length or text_cfg.get("context_length", 77),
                                             tokenizer_mode=text_cfg.get("tokenizer_mode"),
                                             **text_cfg.get("tokenizer_kwargs", {}))
            else:
                self.tokenizer = open_clip.get_tokenizer(name, context_length=context_length)
        else:
            if arch is None:
                raise ValueError(f"model.path {p} is a checkpoint file: name its architecture with model.arch "
                                 "(an open_clip model name such as ViT-B-32-quickgelu, or a model-config .json)")
            if arch.endswith(".json"):
                open_clip.add_model_config(arch)  # registers it under the file's stem
                arch = Path(arch).stem
            model, _, self.preprocess = _create(open_clip, arch, pretrained=str(p), **kw)
            self.tokenizer = open_clip.get_tokenizer(arch, context_length=context_length)
            name, weights = f"{arch} + {p}", p
        self.load_notes = load_open_clip_weights(model, Path(weights), allow_partial_load)
        self.model = model.to(dtype).eval() if dtype is not None else model.eval()
        self.context_length = int(self.tokenizer.context_length)
        self.pad_token_id = 0  # rows come at full context length; the datamodule never pads them
        self.name = f"open_clip {name}"

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # open_clip's encode_text takes the full [B, context_length] rows (it masks padding itself).
        ids = self.tokenizer(texts)
        return ids, torch.ones_like(ids)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids)

    def describe(self) -> str:
        return self.name


class ExternalDualEncoder(LoadedState, L.LightningModule):
    """An existing dual encoder (configs/model/hf_clip.yaml, open_clip.yaml) as an embedding model
    (models/contract.py): `encode_images` / `encode_reports` return L2-normalised embeddings, `test_step` /
    `validation_step` the outputs the audit callbacks collect. Frozen, eval mode, never trained here.

    family: "hf" | "open_clip"; path: the model folder (or, for open_clip with `arch`, the
    checkpoint file); context_length: null = the model's own; dtype: weights are cast to it
    (float32 by default: bf16/fp16 releases run on a CPU, and the audit compares float32 cosines;
    null = the library's default: as saved for Hugging Face, float32 for open_clip);
    allow_partial_load: audit a model whose weights did not fully load (models/load_guard.py),
    flagged; refused otherwise.
    """

    def __init__(self, family: str, path: str, arch: str | None = None, context_length: int | None = None,
                 dtype: str | None = "float32", image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, text_config_dir: str | None = None,
                 allow_partial_load: bool = False) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"model.family must be one of {FAMILIES}, got {family!r}")
        if not path:
            raise ValueError("model.path is required: the local folder (or checkpoint file) of the model")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {list(DTYPES)} or null, got {dtype!r}")
        torch_dtype = DTYPES[dtype] if dtype else None
        if family == "hf":
            if arch or image_mean or image_std or text_config_dir:
                raise ValueError("model.arch/image_mean/image_std/text_config_dir are open_clip options; a Hugging "
                                 "Face model reads its preprocessing from its own folder")
            self.backend: _Backend = HFBackend(path, context_length, torch_dtype, bool(allow_partial_load))
        else:
            self.backend = OpenCLIPBackend(path, arch, context_length, torch_dtype, image_mean, image_std, text_config_dir,
                                           bool(allow_partial_load))
        # What did not load (only with allow_partial_load; otherwise the backend raised): evaluate.py
        # flags the result with it (meta.weights_not_loaded).
        self.load_notes: list[str] = list(self.backend.load_notes)
        self.preprocessing_notes = preprocessing_unproven(family, path, arch, image_mean, image_std, text_config_dir)
        self.net = self.backend.model.requires_grad_(False)
        self.family, self.path = family, str(path)
        self.tokenizer = ReportTokenizer(self.backend)
        self.image_transform = ImageTransform(self.backend.preprocess, self.backend.describe())
        # What evaluate.py sets on the datamodule (as for a checkpoint's preprocessing).
        self.data_preprocessing = {"image_transform": self.image_transform, "max_length": self.backend.context_length,
                                   "image_channels": 1}
        # A model released by the DP stage (models/external_heads.py) carries its privacy record beside
        # its weights: evaluate.py puts it next to the audit's numbers, as for a DP checkpoint.
        record = Path(path) / "dp_record.json"
        self.saved_dp_state = json.loads(record.read_text()) if Path(path).is_dir() and record.is_file() else None
        self.saved_epoch = None
        self.eval()

    def train(self, mode: bool = True):  # frozen: dropout stays off across Lightning's mode switches
        return super().train(False)

    @property
    def _weights_dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    # ---- the embedding contract -----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, image: torch.Tensor) -> torch.Tensor:
        """Images already prepared by `image_transform` [B, 3, h, w] -> unit embeddings (float32)."""
        return F.normalize(self.backend.image_features(image.to(self.device, self._weights_dtype)).float(), dim=-1)

    @torch.no_grad()
    def encode_reports(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token rows from `tokenizer` (padded to the batch) -> unit embeddings, padded on to the
        context length as the library's padding="max_length" would."""
        ids, mask = pad_to(input_ids, attention_mask, self.backend.context_length, self.backend.pad_token_id,
                           self.backend.padding_side)
        return F.normalize(self.backend.text_features(ids.to(self.device), mask.to(self.device)).float(), dim=-1)

    # ---- conveniences: raw inputs -> embeddings, through the same path as the datamodule's ----------
    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images or HxW uint8 arrays -> unit embeddings."""
        return self.encode_images(torch.stack([self.image_transform(im) for im in images]))

    def embed_reports(self, texts: Sequence[str]) -> torch.Tensor:
        rows = self.tokenizer(list(texts))["input_ids"]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.backend.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if self.backend.padding_side == "right" else slice(width - len(r), width)
            ids[i, sl] = torch.as_tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return self.encode_reports(ids, mask)

    # ---- the audit callbacks' contract --------------------------------------------------------------
    def _outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return validation_outputs(self.encode_images(batch["image"]),
                                  self.encode_reports(batch["input_ids"], batch["attention_mask"]), batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._outputs(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._outputs(batch)

    def describe(self) -> str:
        return self.backend.describe()
