"""bench/gpu_check.py on a CPU at tiny sizes: the table has every row, and the analytic FLOP count
behind MFU/HFU equals torch's own count (torch.utils.flop_counter) of one forward + backward."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import gpu_check

# The formula models every matmul autograd runs (LoRA and frozen weights, layer 0's input grads,
# checkpointing's recompute and its early stop), so the two counts agree to float rounding.
REL_TOL = 1e-6


@pytest.mark.slow
def test_tiny_run_prints_every_row(capsys):
    res = gpu_check.main(["--tiny", "--device", "cpu", "--threads", "2"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("machine: ")
    for part, measure in gpu_check.ROWS:
        line = next((ln for ln in out.splitlines() if ln.startswith(f"| {part} | {measure} | ")), None)
        assert line is not None, f"row {part} / {measure} missing"
        assert "not run" not in line
    v = res["values"]
    assert v[("dual tower", "MFU (bf16 peak)")] == "n/a" and v[("dual tower", "HFU (with recompute)")] == "n/a"
    d = res["dual"]
    f = d["flops"]
    assert f["forward"] > 0 and f["backward"] > 0 and f["recompute"] > 0  # checkpointing is on
    model_tflop = (f["forward"] + f["backward"] + d["other_flops"]) / 1e12
    assert v[("dual tower", "model TFLOP per step (fwd+bwd / +recompute)")].startswith(f"{model_tflop:.4g} / ")
    assert d["step_s"] > 0
    assert res["audit"]["t_gemm"] > 0 and res["audit"]["t_audit"] > 0
    assert res["dp"]["times"][True] > 0 and res["dp"]["times"][False] > 0


def _counted(tower, batch: int, seq_len: int) -> float:
    ids = torch.randint(5, 500, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    # The math SDPA backend decomposes attention into bmm, which FlopCounterMode counts on a CPU (it has
    # no rule for the CPU flash kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        tower(ids, torch.ones_like(ids)).sum().backward()
    return float(fc.get_total_flops())


@pytest.mark.parametrize("checkpointing", [True, False])
def test_flops_of_the_checked_tower_match_flop_counter(checkpointing):
    """The tower exactly as the check builds it (compose -> instantiate; LoRA, latent-attention pooler)."""
    from hydra.utils import instantiate

    s = gpu_check.parse_args(["--tiny", "--device", "cpu"] + ([] if checkpointing else ["--no-grad-checkpointing"]))
    torch.manual_seed(0)
    module = instantiate(gpu_check.compose_dual_tower(s, cuda=False).model, tokenizer=gpu_check.synthetic_tokenizer(s.vocab))
    tower = module.text_tower
    assert tower.use_lora and tower.pooling == "latent_attention"
    batch, seq_len = 3, 16
    f = gpu_check.text_tower_flops(tower, batch, seq_len)
    assert (f["recompute"] > 0) is checkpointing
    assert sum(f.values()) == pytest.approx(_counted(tower, batch, seq_len), rel=REL_TOL)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_flops_of_a_full_finetune_match_flop_counter(checkpointing):
    """Trainable base weights (no LoRA), mean pooling, GQA: the other branches of the formula."""
    from cxr_relink.models.llm_encoder import BidirectionalLLMEncoder

    torch.manual_seed(0)
    tower = BidirectionalLLMEncoder(gpu_check.synthetic_tokenizer(512), hidden_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, intermediate_size=96, pooling="mean", use_lora=False,
                                    gradient_checkpointing=checkpointing)
    f = gpu_check.text_tower_flops(tower, 2, 12)
    assert sum(f.values()) == pytest.approx(_counted(tower, 2, 12), rel=REL_TOL)


def test_peak_lookup():
    assert gpu_check.peak_bf16_tflops("NVIDIA H200") == 989
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe") == 756
    assert gpu_check.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu_check.peak_bf16_tflops("NVIDIA L40S") == 362
    assert gpu_check.peak_bf16_tflops("Some Future GPU") is None
