"""Whole-model DP-SGD (models/dp/whole.py, issue #31 item 2): the accountant, per-patient clipping, what is
trained, and a train.py run. References are independent of the module: a fresh Opacus accountant and the
reference RDP formula on the recorded (sigma, q, steps), the patient count read from the cohort's studies, and
per-unit gradients by a plain backward on a copy of the model."""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from opacus.accountants import PRVAccountant, RDPAccountant

from cxr_relink.models.dp.accounting import epsilon_from_rdp

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["experiment=dp_whole", "public_cohort.reader.num_patients=40", "data.batch_size=8",
         "data.max_pairs_per_unit=2", "model.loss.bank_size=16", "trainer.limit_train_batches=null",
         "callbacks=none", "logger=none", "final_audit=false"]


def build(compose_train, *extra: str):
    """(cfg, datamodule, module) exactly as train.py builds them."""
    cfg = compose_train(*SMALL, *extra)
    L.seed_everything(cfg.seed)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return cfg, dm, instantiate(cfg.model, tokenizer=dm.tokenizer)


def fit(cfg, dm, model, epochs: int = 1):
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=None)
    trainer.fit(model, datamodule=dm)
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_epsilon_equals_opacus_for_the_recorded_sigma_q_steps(compose_train) -> None:
    cfg, dm, model = build(compose_train, "model.dp.target_epsilon=2")
    fit(cfg, dm, model, epochs=2)
    st = model.dp_state()
    sigma, q, delta = st["noise_multiplier"], st["sample_rate"], st["delta"]
    steps = sum(n for _, _, n in st["accountant"]["history"]) if st["accountant"].get("history") else None
    # Patient units, counted from the cohort itself: q = 1/ceil(#train patients / B), steps = epochs / q.
    patients = {s.patient_id for s in dm.studies("train") if s.images}
    per_epoch = math.ceil(len(patients) / 8)
    assert q == pytest.approx(1 / per_epoch) and steps == 2 * per_epoch == st["steps_planned"]
    assert st["privacy_unit"] == "patient" and st["guarantee_valid"] and st["sensitivity"] == 1.0
    fresh = RDPAccountant()
    fresh.history = [(sigma, q, steps)]
    eps_opacus = fresh.get_epsilon(delta=delta)
    assert st["epsilon_spent"] == pytest.approx(eps_opacus, rel=1e-9)
    # The independent RDP formula (Mironov et al. 2019) agrees to the order grid's resolution.
    assert epsilon_from_rdp([(sigma, q, steps)], delta)[0] == pytest.approx(eps_opacus, rel=0.05)
    # The planned sigma spends the target budget, within the search tolerance.
    assert 2 - 1e-3 - 1e-9 <= eps_opacus <= 2 + 1e-9
    # Fewer noise or more steps would exceed it: the accountant reads the recorded numbers, not a constant.
    more = RDPAccountant()
    more.history = [(sigma, q, steps + per_epoch)]
    assert more.get_epsilon(delta=delta) > 2.05


@pytest.mark.slow
def test_prv_accountant_run_matches_a_fresh_prv_accountant(compose_train) -> None:
    cfg, dm, model = build(compose_train, "model.dp.accountant=prv", "model.dp.target_epsilon=3")
    fit(cfg, dm, model, epochs=1)
    st = model.dp_state()
    steps = sum(n for _, _, n in st["accountant"]["history"])
    fresh = PRVAccountant()
    fresh.history = [(st["noise_multiplier"], st["sample_rate"], steps)]
    assert st["epsilon_spent"] == pytest.approx(fresh.get_epsilon(delta=st["delta"], eps_error=3e-3), abs=4e-3)
    assert st["epsilon_spent"] <= 3 + 3e-3


def test_units_are_whole_patients(compose_train) -> None:
    _, dm, _ = build(compose_train)
    units, ds = dm.units, dm.units.items
    seen = {}
    for u, idx in enumerate(units.groups):
        pats = {ds.patient_idx[ds.items[i][0]] for i in idx}
        assert len(pats) == 1  # one patient per unit
        (p,) = pats
        assert p not in seen  # ... and each patient in one unit
        seen[p] = u
    assert sorted(i for g in units.groups for i in g) == list(range(len(ds)))  # every item of the split
    assert len(units) == len({s.patient_id for s in dm.studies("train") if s.images})
    assert any(len({ds.items[i][0] for i in g}) > 1 for g in units.groups)  # some unit holds several studies


def brute_force_unit_grad(model, unit, bank) -> list[torch.Tensor]:
    """A unit's gradient by a plain backward on a copy of the model (no autograd.grad, no shared graph)."""
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    m.unit_loss(unit, bank).backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for _, p in m.dp_parameters()]


@pytest.mark.slow
def test_per_patient_clipping_bounds_each_patients_contribution(compose_train) -> None:
    c = 0.05  # small enough that every unit is clipped: the bound is then binding, not vacuous
    cfg, dm, model = build(compose_train, f"model.dp.max_grad_norm={c}", "data.max_pairs_per_unit=null")
    model.eval()  # no dropout: the reference and the module see the same function
    units = [dm.units[i] for i in range(6)]
    bank = model.public_embeddings(dm.public_bank(16, torch.Generator().manual_seed(0)))
    summed, norms, _ = model.clipped_sum(units, bank)
    ref = [torch.zeros_like(s) for s in summed]
    for unit in units:
        g = brute_force_unit_grad(model, unit, bank)
        n = math.sqrt(sum(float((x.double() ** 2).sum()) for x in g))
        assert n > c  # clipping is active for this unit
        for r, x in zip(ref, g):
            r.add_(x * min(1.0, c / n))
    for s, r in zip(summed, ref):
        torch.testing.assert_close(s, r, rtol=1e-4, atol=1e-7)
    flat = torch.cat([s.flatten() for s in summed]).double()
    for i in range(len(units)):
        rest, _, _ = model.clipped_sum(units[:i] + units[i + 1:], bank)
        change = (flat - torch.cat([s.flatten() for s in rest]).double()).norm()
        assert change <= c * (1 + 1e-5)  # one patient moves the released sum by at most C
    # Without clipping the same patients move it by more than C (the check above can fail).
    raw, _, _ = model.clipped_sum(units, bank, clip=False)
    raw_rest, _, _ = model.clipped_sum(units[1:], bank, clip=False)
    assert (torch.cat([a.flatten() for a in raw]) - torch.cat([b.flatten() for b in raw_rest])).norm() > c


@pytest.mark.slow
def test_whole_model_dp_changes_the_trunks(compose_train) -> None:
    cfg, dm, model = build(compose_train)
    before = snapshot(model)
    fit(cfg, dm, model)
    after = snapshot(model)
    for tower in ("image_tower.", "text_tower.", "image_head.", "text_head."):
        keys = [k for k in before if k.startswith(tower) and before[k].is_floating_point()]
        assert keys and sum(not torch.equal(before[k], after[k]) for k in keys) >= 0.9 * len(keys), tower
    assert torch.equal(before["logit_scale"], after["logit_scale"])  # the frozen temperature


@pytest.mark.slow
def test_lora_scope_trains_adapters_and_heads_only(compose_train) -> None:
    cfg, dm, model = build(compose_train, "experiment=dp_whole_lora", "model.text_tower.hidden_size=32",
                           "model.text_tower.num_layers=1", "model.text_tower.intermediate_size=64")
    trained = {n for n, _ in model.dp_parameters()}
    assert trained and all("lora_" in n or n.startswith(("image_head.", "text_head.")) for n in trained)
    before = snapshot(model)
    fit(cfg, dm, model)
    after = snapshot(model)
    lora = [k for k in before if "lora_" in k]
    base = [k for k in before if k.startswith("text_tower.") and "lora_" not in k and before[k].is_floating_point()]
    image = [k for k in before if k.startswith("image_tower.") and before[k].is_floating_point()]
    assert lora and base and image
    assert all(torch.equal(before[k], after[k]) for k in base + image)  # LLM base and image tower frozen
    assert sum(not torch.equal(before[k], after[k]) for k in lora) >= len(lora) // 2  # adapters trained
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith(("image_head.", "text_head.")))


def test_lora_scope_needs_adapters(compose_train) -> None:
    with pytest.raises(Exception, match="needs a text tower with LoRA"):
        build(compose_train, "model.scope=lora")


def test_batchnorm_is_replaced(compose_train) -> None:
    from cxr_relink.models.dp.whole import replace_batchnorm

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8))
    fixed = replace_batchnorm(net, "test")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in fixed.modules())


def test_unbounded_loss_modes_are_refused(compose_train) -> None:
    with pytest.raises(Exception, match="public_negatives"):
        build(compose_train, "model.loss.mode=in_batch")


@pytest.mark.slow  # two train.py runs: ~35 s idle, 70 s on loaded shared cores
def test_train_py_dp_whole_smoke(compose_train, tmp_path) -> None:
    from train import train

    cfg = compose_train("experiment=dp_whole", "public_cohort.reader.num_patients=40", "data.batch_size=8",
                        "model.loss.bank_size=16", "trainer.limit_train_batches=null", "trainer.max_epochs=1",
                        "logger=csv")
    metrics, objects = train(cfg)
    audit = json.loads((tmp_path / "final_audit" / "audit.json").read_text())
    priv = audit["privacy"]
    assert priv["guarantee_valid"] and priv["privacy_unit"] == "patient" and priv["dp_scope"] == "whole"
    assert priv["epsilon_spent"] == pytest.approx(3.0, abs=2e-3)
    assert any(k.startswith("test/") for k in metrics)
    # A resume would restart the accountant (earlier steps uncounted): refused with the reason.
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    with pytest.raises(ValueError, match="resuming a whole-model DP run is not supported"):
        train(compose_train("experiment=dp_whole", "public_cohort.reader.num_patients=40", "data.batch_size=8",
                            "model.loss.bank_size=16", "trainer.limit_train_batches=null", "trainer.max_epochs=2",
                            "logger=none", "final_audit=false", f"ckpt_path={ckpt}"))


def test_public_init_checkpoint_and_its_tokenizer_are_loaded(compose_train, tmp_path) -> None:
    from cxr_relink.models.checkpoint import KEY, load_checkpoint_dict, load_module
    from train import train

    # Stage 2 on the public cohort only (the starting point the frontier uses).
    pub = compose_train("data=synthcxr_external", "data.reader.num_patients=40", "trainer.max_epochs=1",
                        "callbacks=none", "logger=none", "final_audit=false",
                        "+callbacks.last._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                        f"+callbacks.last.dirpath={tmp_path / 'pub'}", "+callbacks.last.filename=last")
    train(pub)
    ckpt = tmp_path / "pub" / "last.ckpt"
    _, dm, model = build(compose_train, f"model.init_ckpt={ckpt}")
    ref = load_module(ckpt)
    for k, v in ref.state_dict().items():
        if k.split(".")[0] in ("image_tower", "text_tower", "image_head", "text_head", "logit_scale"):
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert dm.tokenizer.get_vocab() == ref.tokenizer.get_vocab()  # the public tokenizer, not one fitted here
    assert model.dp_state()["head_init"]["mode"] == "public checkpoint"
    assert load_checkpoint_dict(ckpt)[KEY]["tokenizer"]
    # Another architecture is refused with the reason.
    with pytest.raises(Exception, match="does not match this model's config"):
        build(compose_train, f"model.init_ckpt={ckpt}", "model.embed_dim=64")
