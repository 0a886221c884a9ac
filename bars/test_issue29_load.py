"""Issue #29 acceptance: a checkpoint whose weights did not load is not audited as a random model.

A tiny Hugging Face CLIP whose safetensors keys are all prefixed (`clip_model.…`, as a training
wrapper saves them) is refused by `python evaluate.py audit=standard model=hf_clip model.path=<dir>`:
exit status != 0 and no "× chance" printed. transformers would initialise the whole CLIP at random
and the audit would print a chance multiple for it. The same command on the unprefixed folder (the
control) exits 0 and prints one, so the refusal is the load guard's, not a broken command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["small left effusion", "clear lungs normal heart",
         "right pleural tube tip in good position no pneumothorax small left effusion clear lungs normal heart size"]


def _tiny_clip(folder: Path) -> Path:
    """A random CLIPModel with its own WordPiece tokenizer and image processor (as tests/test_external_models.py)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from cxr_relink.datamodules.text import train_wordpiece

    tok = train_wordpiece(TEXTS * 10, vocab_size=120, min_frequency=1)
    tok.model_max_length = 64
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _evaluate(folder: Path, tmp: Path, name: str) -> subprocess.CompletedProcess:
    out = tmp / name
    cmd = [sys.executable, "evaluate.py", "audit=standard", "model=hf_clip", f"model.path={folder}",
           "audit.relinkage.n_boot=0", "data.reader.num_patients=60", "data.reader.image_size=48",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={out}", f"paths.log_dir={tmp / 'logs'}"]
    env = {**os.environ, "CXR_RELINK_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_prefixed_hf_clip_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    good = _tiny_clip(tmp_path / "clip")
    prefixed = tmp_path / "clip_prefixed"
    prefixed.mkdir()
    for f in good.iterdir():
        (prefixed / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(good / "model.safetensors"))
    save_file({f"clip_model.{k}": v.contiguous() for k, v in weights.items()}, str(prefixed / "model.safetensors"))

    refused = _evaluate(prefixed, tmp_path, "refused")
    printed = refused.stdout + refused.stderr
    assert refused.returncode != 0, printed[-3000:]
    assert "× chance" not in printed
    assert "did not fully load" in printed and "clip_model." in printed  # the reason, naming the keys

    control = _evaluate(good, tmp_path, "control")
    assert control.returncode == 0, (control.stdout + control.stderr)[-3000:]
    assert "× chance" in control.stdout + control.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
