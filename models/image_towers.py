"""Image towers. All map [B, C, H, W] -> [B, output_dim] pre-projection features.

The CPU default is a small GroupNorm CNN; torchvision ResNets and ViT-B/16 are selectable and take
optional *local* weights (safetensors or a plain state_dict loaded with weights_only=True).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely: safetensors, or torch.load with weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


class SmallCNN(nn.Module):
    """Conv-GroupNorm-GELU stages with stride 2, then global average pooling.

    GroupNorm, not BatchNorm: contrastive batches are small on a CPU and BatchNorm leaks
    information across the examples of a batch.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128, 256), groups: int = 8) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(min(groups, c_out), c_out), nn.GELU()]

        # A stride-2 stem: full-resolution convolutions dominate CPU cost and add little here.
        layers: list[nn.Module] = block(in_channels, widths[0], 2)
        c = widths[0]
        for w in widths:
            layers += block(c, w, 2) + block(w, w, 1)
            c = w
        self.features = nn.Sequential(*layers)
        self.output_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class TorchvisionTower(nn.Module):
    """resnet18 | resnet50 | vit_b_16 from torchvision, classification head removed."""

    ARCHS = ("resnet18", "resnet50", "vit_b_16")

    def __init__(self, arch: str = "resnet18", weights_path: str | None = None, image_size: int = 224) -> None:
        super().__init__()
        if arch not in self.ARCHS:
            raise ValueError(f"image tower arch must be one of {self.ARCHS}, got {arch!r}")
        if arch == "vit_b_16":
            net = torchvision.models.vit_b_16(weights=None, image_size=image_size)
        else:
            net = getattr(torchvision.models, arch)(weights=None)
        if weights_path:
            missing, unexpected = net.load_state_dict(load_state_dict_file(weights_path), strict=False)
            # A classification head from another task is expected to be missing/unexpected; a
            # backbone key is not.
            bad = [k for k in missing if not k.startswith(("fc.", "heads."))]
            if bad:
                raise ValueError(f"{weights_path}: weights do not match {arch}; missing e.g. {bad[:5]}")
        if arch == "vit_b_16":
            self.output_dim = net.heads.head.in_features
            net.heads = nn.Identity()
        else:
            self.output_dim = net.fc.in_features
            net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
