"""DP on an existing model's own projection heads: its feature functions split into trunk + projection.

`python train.py experiment=dp_alignment model.external.path=/models/x` freezes both encoders of an
existing model (models/external.py: Hugging Face CLIP-style, open_clip) and trains, with DP-SGD,
copies of *its own* projection layers; the result is written back in the model's own format.

The split reads the modules the library defines, one small rule per family (no per-checkpoint map):

  family     tower  projection (first that exists)                          removed as
  hf         image  model.visual_projection  (nn.Module: Linear, with or     nn.Identity
             text   model.text_projection     without bias, or an MLP)       nn.Identity
  open_clip  image  visual.proj  (Parameter, `pooled @ proj`)               None
                    visual.head  (timm towers: Sequential drop/proj or Mlp)  nn.Identity
             text   text_projection  (CLIP: Parameter or Linear)            None
                    text.text_projection  (CustomTextCLIP, TextTransformer)  None
                    text.proj  (CustomTextCLIP, HF text tower: Linear | MLP) nn.Identity

"removed as": what the projection is replaced with in the frozen trunk. open_clip applies
`visual.proj` / `text_projection` only `if ... is not None`, and calls `visual.head` / `text.proj`
unconditionally; Hugging Face calls its projections unconditionally. With the projection removed the
library's own `get_image_features` / `encode_image` (and text) return the trunk output, so the features
are the library's, not a re-implementation. The trainable head is a float32 copy of the projection
module, or, for a Parameter P [in, out] used as `x @ P`, an nn.Linear(in, out, bias=False) with
weight P^T (a layer Opacus has a per-sample rule for); the export writes W^T back into P.

tests/test_dp_external.py checks that trunk + head reproduce the library's features, that a DP run
changes only the projection tensors of the saved model, and that the saved folder loads with the library.
Models without a projection per tower (SigLIP: its image tower ends in attention pooling; open_clip's
ModifiedResNet) are refused with the reason.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cxr_relink.models.external import FAMILIES, ExternalDualEncoder, HFBackend, OpenCLIPBackend, pad_to
from cxr_relink.models.hashing import file_sha256

SPLIT_RULE_VERSION = 1  # part of the feature-cache key: a changed rule never reuses stale trunk features
SPEC_KEYS = ("family", "path", "arch", "context_length", "dtype", "image_mean", "image_std", "text_config_dir")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
RECORD_NAME = "dp_record.json"
# The logit scale of CLIP-family models is clamped to log(100) in their forward passes.
MAX_LOGIT_SCALE = math.log(100.0)


# --------------------------------------------------------------------------- the model spec
def resolve_spec(external: dict | None) -> dict | None:
    """`model.external` -> the ExternalDualEncoder arguments (family told from the folder when null),
    or None when no path is set (the stage-2 checkpoint path is used instead)."""
    if not external or not external.get("path"):
        return None
    unknown = set(external) - set(SPEC_KEYS)
    if unknown:
        raise ValueError(f"model.external has unknown keys {sorted(unknown)}; expected {SPEC_KEYS}")
    spec = {k: external.get(k) for k in SPEC_KEYS}
    spec["dtype"] = spec["dtype"] if "dtype" in external else "float32"
    p = Path(spec["path"]).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model.external.path {p} does not exist")
    spec["path"] = str(p.resolve())
    if spec["family"] is None:
        if p.is_file() or (p / "open_clip_config.json").is_file():
            spec["family"] = "open_clip"
        elif (p / "config.json").is_file():
            spec["family"] = "hf"
        else:
            raise ValueError(f"cannot tell the family of {p} (no config.json or open_clip_config.json): set "
                             f"model.external.family to one of {FAMILIES}")
    for key in ("image_mean", "image_std"):
        if spec[key] is not None:
            spec[key] = [float(v) for v in spec[key]]
    return spec


def model_fingerprint(spec: dict) -> str:
    """sha256 over the spec, the split rule and every file the model is read from (names + contents):
    the feature-cache key of an existing model (two models never share cached trunk features)."""
    h = hashlib.sha256(json.dumps({**spec, "path": None, "rule": SPLIT_RULE_VERSION}, sort_keys=True).encode())
    roots = [Path(spec["path"])] + [Path(x) for x in (spec.get("text_config_dir"), spec.get("arch")) if x and Path(x).exists()]
    for root in roots:
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
            h.update(f"\x00{rel}\x01{file_sha256(f)}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- the per-family rule
@dataclass
class Site:
    """Where a tower's projection lives: ``getattr(owner, attr)``; ``name`` is its state-dict prefix."""

    owner: nn.Module
    attr: str
    name: str
    removed_as: str  # "identity" | "none"

    @property
    def value(self) -> nn.Module | nn.Parameter:
        return getattr(self.owner, self.attr)

    @property
    def is_parameter(self) -> bool:
        return isinstance(self.value, nn.Parameter)


def _first(candidates: list[tuple[Any, str, str, str]], tower: str, model: nn.Module) -> Site:
    for owner, attr, name, removed_as in candidates:
        value = getattr(owner, attr, None) if owner is not None else None
        if isinstance(value, (nn.Module, nn.Parameter)):
            site = Site(owner, attr, name, removed_as)
            if site.is_parameter or any(True for _ in value.parameters()):
                return site
    looked = ", ".join(n for _, _, n, _ in candidates)
    raise ValueError(
        f"{type(model).__name__}: no {tower} projection with weights at {looked}. DP on the model's own heads "
        "trains one projection per tower (a model whose image tower ends in attention pooling, e.g. SigLIP, or "
        "open_clip's ModifiedResNet, has none to train)")


def projection_sites(model: nn.Module, family: str) -> dict[str, Site]:
    """{"image": Site, "text": Site} by the table in the module docstring."""
    if family == "hf":
        return {"image": _first([(model, "visual_projection", "visual_projection", "identity")], "image", model),
                "text": _first([(model, "text_projection", "text_projection", "identity")], "text", model)}
    visual, text = getattr(model, "visual", None), getattr(model, "text", None)
    return {
        "image": _first([(visual, "proj", "visual.proj", "none"), (visual, "head", "visual.head", "identity")], "image", model),
        "text": _first([(model, "text_projection", "text_projection", "none"),
                        (text, "text_projection", "text.text_projection", "none"),
                        (text, "proj", "text.proj", "identity")], "text", model),
    }


def head_from_site(site: Site) -> nn.Module:
    """A trainable float32 copy of the projection (a Parameter P used as x @ P -> Linear with weight P^T)."""
    v = site.value
    if isinstance(v, nn.Parameter):
        if v.ndim != 2:
            raise ValueError(f"{site.name}: a projection Parameter must be 2-D [in, out], got {tuple(v.shape)}")
        lin = nn.Linear(v.shape[0], v.shape[1], bias=False)
        with torch.no_grad():
            lin.weight.copy_(v.detach().float().t())
        return lin
    return copy.deepcopy(v).float()


def remove_site(site: Site) -> None:
    """Replace the projection in the model (the trunk) by what the library skips or passes through."""
    setattr(site.owner, site.attr, nn.Identity() if site.removed_as == "identity" else None)


def write_site(site: Site, head: nn.Module) -> None:
    """Write a trained head's weights into the model's own projection (its dtype kept)."""
    v = site.value
    with torch.no_grad():
        if isinstance(v, nn.Parameter):
            v.copy_(head.weight.detach().t())
        else:
            v.load_state_dict({k: t.detach() for k, t in head.state_dict().items()})


# --------------------------------------------------------------------------- the frozen trunk
class ExternalTrunk(nn.Module):
    """The existing model with its projections removed: ``image_features`` / ``text_features`` are the
    library's own feature functions, stopped before the projection (float32). Frozen, eval mode."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        enc = ExternalDualEncoder(**spec)
        self.backend = enc.backend
        self.tokenizer = enc.tokenizer
        self.data_preprocessing = enc.data_preprocessing
        self.image_transform = enc.image_transform
        sites = projection_sites(self.backend.model, spec["family"])
        self.site_names = {k: s.name for k, s in sites.items()}
        self.heads = {k: head_from_site(s) for k, s in sites.items()}  # plain dict: not part of the trunk
        # The model's own tensor names the heads are written back to (a Parameter site: one tensor).
        self.trained_tensors = sorted(
            s.name if s.is_parameter else f"{s.name}.{k}" for t, s in sites.items() for k in self.heads[t].state_dict())
        scale = getattr(self.backend.model, "logit_scale", None)
        self.logit_scale_value = float(scale.detach().float().reshape(-1)[0]) if scale is not None else math.log(1 / 0.07)
        for s in sites.values():
            remove_site(s)
        self.net = self.backend.model.requires_grad_(False).eval()

    def train(self, mode: bool = True):  # frozen: no dropout, ever
        return super().train(False)

    def trained_tensor_names(self) -> list[str]:
        return list(self.trained_tensors)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backend.image_features(pixels.to(self._dtype)).float()

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids, mask = pad_to(input_ids, attention_mask, self.backend.context_length, self.backend.pad_token_id,
                           self.backend.padding_side)
        return self.backend.text_features(ids, mask).float()


@dataclass
class ExternalSplit:
    spec: dict
    fingerprint: str
    trunk: ExternalTrunk
    image_head: nn.Module
    text_head: nn.Module
    logit_scale: torch.Tensor

    @classmethod
    def load(cls, external: dict) -> "ExternalSplit":
        spec = resolve_spec(external)
        if spec is None:
            raise ValueError("model.external.path is required")
        trunk = ExternalTrunk(spec)
        scale = torch.tensor(min(trunk.logit_scale_value, MAX_LOGIT_SCALE), dtype=torch.float32)
        return cls(spec, model_fingerprint(spec), trunk, trunk.heads["image"], trunk.heads["text"], scale)

    def backbone_record(self) -> dict:
        """What the DP checkpoint and record store about the frozen model."""
        return {"external": dict(self.spec), "checkpoint_sha256": self.fingerprint,
                "projections": dict(self.trunk.site_names), "split_rule": SPLIT_RULE_VERSION}


# --------------------------------------------------------------------------- export in the model's own format
def _fresh_backend(spec: dict):
    """The model as its library loads it, in the dtype it was saved in (so every frozen tensor is
    written back bit for bit)."""
    if spec["family"] == "hf":
        return HFBackend(spec["path"], spec.get("context_length"), None)
    return OpenCLIPBackend(spec["path"], spec.get("arch"), spec.get("context_length"), None, spec.get("image_mean"),
                           spec.get("image_std"), spec.get("text_config_dir"))


def _copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer, processor and config files of a model folder (not its weights, which are rewritten)."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json") \
                and f.name != RECORD_NAME:
            shutil.copy2(f, out / f.name)


def export_model(spec: dict, image_head: nn.Module, text_head: nn.Module, out: str | Path, record: dict) -> Path:
    """Write the model with the trained projections in its own format, plus ``dp_record.json``.

    hf: ``save_pretrained`` + the folder's tokenizer/processor files (``CLIPModel.from_pretrained(out)``,
    ``evaluate.py model=hf_clip model.path=out``). open_clip: a ``local-dir`` folder
    (open_clip_config.json + open_clip_model.safetensors [+ the HF text tower's config/tokenizer]) that
    ``open_clip.create_model_and_transforms("local-dir:out")`` and ``evaluate.py model=open_clip
    model.path=out`` read, whether the source was a folder or an architecture + checkpoint file."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: refusing to overwrite a released model")
    out.mkdir(parents=True, exist_ok=True)
    backend = _fresh_backend(spec)
    model = backend.model
    sites = projection_sites(model, spec["family"])
    write_site(sites["image"], image_head)
    write_site(sites["text"], text_head)
    src = Path(spec["path"])
    if spec["family"] == "hf":
        if src.is_dir():
            _copy_side_files(src, out)
        model.save_pretrained(out)
    else:
        from safetensors.torch import save_file

        if src.is_dir():
            # open_clip_config.json as it was (a HF text tower named by hub id reads its config.json and
            # tokenizer from the folder itself, as models/external.py loads it).
            _copy_side_files(src, out)
            if spec.get("text_config_dir"):
                _copy_side_files(Path(spec["text_config_dir"]), out)
        else:
            import open_clip

            arch = spec["arch"]
            if arch.endswith(".json"):
                open_clip.add_model_config(arch)
                arch = Path(arch).stem
            pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
            cfg = {"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": pre}
            (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    (out / RECORD_NAME).write_text(json.dumps(record, indent=2, default=str))
    return out


def read_record(path: str | Path) -> dict | None:
    """The DP record saved beside an exported model (None if there is none)."""
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / RECORD_NAME
    return json.loads(f.read_text()) if f.is_file() else None


__all__ = ["ExternalSplit", "ExternalTrunk", "export_model", "model_fingerprint", "projection_sites",
           "read_record", "resolve_spec"]
