"""What a DP release may depend on (issue #28): nothing of the private N but the Poisson batches (the
gradient divisor, q and the step count), a per-patient statement only where it means something, the
dp/* record reaching the loggers, and empty Poisson batches under ghost clipping. Seeded, CPU."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from cxr_relink.audit.result import privacy_lines
from cxr_relink.datamodules.features import InMemoryFeatureDataModule
from cxr_relink.models.dp.features import select_studies
from cxr_relink.models.dp.module import DPAlignmentModule
from tests.test_dp import D, synthetic_features

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*Secure RNG.*")]

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 1.0}


def one_step(feats, pub, batch_size: int, dp: dict, mode: str = "public_negatives", steps: int = 1) -> DPAlignmentModule:
    """``steps`` DP-SGD steps (plain SGD, lr 1: the update is the noisy mean gradient itself)."""
    L.seed_everything(0, verbose=False)  # the public bank draw (public randomness) is the same for every run
    m = DPAlignmentModule(heads={"image_dim": D, "text_dim": D, "embed_dim": 4}, optimizer=SGD,
                          loss={"mode": mode, "bank_size": 32, "group_size": 4},
                          dp={"target_epsilon": 4.0, "epochs": 1, "max_grad_norm": 0.5, **dp})
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, limit_train_batches=steps).fit(
        m, datamodule=InMemoryFeatureDataModule(feats, pub, batch_size=batch_size))
    return m


def heads_vector(m: DPAlignmentModule) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m._heads.parameters()])


def first_batch_mask(seed: int, n: int, q: float) -> torch.Tensor:
    """Opacus' UniformWithReplacementSampler's first draw from a generator seeded ``seed`` (an independent
    re-implementation: one uniform per unit, kept below q)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < q


@pytest.mark.parametrize("grad_sample_mode", ["ghost", "hooks"])
@pytest.mark.slow
def test_update_is_the_same_for_neighbours_n_and_n_minus_1(grad_sample_mode) -> None:
    """N = 21 and N - 1 = 20 study units, B = 8: ceil(N/B) = 3 for both (same q, same steps), but Opacus'
    own divisor int(N q) is 7 vs 6. With the same noise and the same sampled units (the removed unit not
    sampled), the released heads must be identical: the update divides by the configured B."""
    feats, pub = synthetic_features(n_train=21)
    without = {**feats, "train": select_studies(feats["train"], torch.arange(21) != 20)}
    # A replayable seed gives both runs the same noise and the same uniforms; pick one whose first Poisson
    # batch leaves out unit 20 and holds some units (else the two releases are noise alone).
    seed = next(s for s in range(100) if not first_batch_mask(s, 21, 1 / 3)[20] and first_batch_mask(s, 21, 1 / 3).sum() >= 3)
    dp = {"INSECURE_replayable_seed": seed, "grad_sample_mode": grad_sample_mode, "target_delta": 1e-3}
    a, b = one_step(feats, pub, 8, dp), one_step(without, pub, 8, dp)
    assert a.sample_rate == b.sample_rate == pytest.approx(1 / 3) and a.steps_planned == b.steps_planned == 3
    start = one_step(feats, pub, 8, dp, steps=0)
    assert not torch.equal(heads_vector(a), heads_vector(start))  # a step was taken
    assert torch.allclose(heads_vector(a), heads_vector(b), atol=1e-7, rtol=0)
    assert a.dp_state()["gradient_divisor"].startswith("B = 8")


@pytest.mark.slow
def test_declared_bound_fixes_q_and_steps_across_a_multiple_of_b() -> None:
    """Without a bound, N = 17 and 16 (B = 8) run different mechanisms (3 vs 2 steps an epoch), and the
    record says which adjacency that leaves; with model.dp.n_units_bound = 40 both run q = 1/5, 5 steps."""
    feats, pub = synthetic_features(n_train=17)
    without = {**feats, "train": select_studies(feats["train"], torch.arange(17) != 16)}
    a, b = one_step(feats, pub, 8, {"target_delta": 1e-3}), one_step(without, pub, 8, {"target_delta": 1e-3})
    assert (a.steps_planned, b.steps_planned) == (3, 2)
    assert "same ceil(N/B)" in a.dp_state()["adjacency"]
    bound = {"target_delta": 1e-3, "n_units_bound": 40}
    a, b = one_step(feats, pub, 8, bound), one_step(without, pub, 8, bound)
    assert a.sample_rate == b.sample_rate == pytest.approx(1 / 5) and a.steps_planned == b.steps_planned == 5
    assert a.noise_multiplier == b.noise_multiplier and a.dp_state()["n_train_units_upper"] == 40
    assert "at most 40 units" in a.dp_state()["adjacency"]
    with pytest.raises(ValueError, match="n_units_bound=10 is below"):
        one_step(feats, pub, 8, {"target_delta": 1e-3, "n_units_bound": 10})


@pytest.mark.slow
def test_ghost_clipping_survives_empty_poisson_batches() -> None:
    """N = 18, B = 2 (q = 1/9): empty Poisson batches are common. The step after one used to fail inside
    Opacus ('Parameter tying is not supported'); now every step runs and each is accounted."""
    feats, pub = synthetic_features(n_train=18)
    sizes = []

    class Sizes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append(int(batch[0].shape[0]))

    L.seed_everything(0, verbose=False)
    m = DPAlignmentModule(heads={"image_dim": D, "text_dim": D, "embed_dim": 4}, loss={"bank_size": 32},
                          dp={"target_epsilon": 4.0, "target_delta": 1e-3, "grad_sample_mode": "ghost",
                              "INSECURE_replayable_seed": 3})
    L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Sizes()]).fit(
        m, datamodule=InMemoryFeatureDataModule(feats, pub, batch_size=2))
    empty_then_more = [i for i in range(len(sizes) - 1) if sizes[i] == 0]
    assert empty_then_more, f"no empty batch followed by a step in {sizes}: the test would prove nothing"
    assert len(sizes) == 36 and sum(int(h[2]) for h in m.accountant.history) == 36


@pytest.mark.slow
def test_dp_metrics_reach_the_csv_every_epoch(tmp_path) -> None:
    """3 steps an epoch < log_every_n_steps (50): dp/epsilon, dp/delta, ... still reach the logger once
    per epoch, and epsilon grows epoch by epoch."""
    from lightning.pytorch.loggers import CSVLogger

    feats, pub = synthetic_features(n_train=60)
    L.seed_everything(0, verbose=False)
    m = DPAlignmentModule(heads={"image_dim": D, "text_dim": D, "embed_dim": 4}, loss={"bank_size": 32},
                          dp={"target_epsilon": 2.0, "target_delta": 1e-3})
    logger = CSVLogger(tmp_path, name="csv")
    L.Trainer(max_epochs=3, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(
        m, datamodule=InMemoryFeatureDataModule(feats, pub, batch_size=24))
    import csv

    rows = list(csv.DictReader(open(logger.experiment.metrics_file_path)))
    eps = [float(r["dp/epsilon"]) for r in rows if r.get("dp/epsilon")]
    assert len(eps) == 3 and eps == sorted(eps) and eps[-1] == pytest.approx(m.epsilon_spent())
    assert all(r.get("dp/delta") for r in rows if r.get("dp/epsilon"))


def record(per_patient: dict | None, unit: str = "study") -> dict:
    return {"enabled": True, "guarantee_valid": True, "epsilon_spent": 3.0, "target_epsilon": 3.0, "delta": 4.2e-4,
            "accountant": {"mechanism": "rdp", "history": [[1.0, 0.1, 10]]}, "loss_mode": "public_negatives",
            "privacy_unit": unit, "n_train_units_upper": 2304, "adjacency": "add/remove", "per_patient": per_patient,
            "noise_multiplier": 1.0, "sample_rate": 0.1, "steps_planned": 10, "max_grad_norm": 1.0, "sensitivity": 1.0,
            "noise_source": "secret", "outside_guarantee": []}


@pytest.mark.slow
def test_per_patient_group_bound_with_delta_above_one_over_patients_is_not_a_guarantee() -> None:
    """eps 3 per study, k = 6 studies per patient: group privacy gives delta = 6 e^15 delta_study, far above
    1 (the issue saw 847): the record and the report say there is no meaningful per-patient guarantee, and
    the verdict line names the unit it holds for. An independent computation of (k eps, k e^((k-1)eps) delta)."""
    from cxr_relink.models.dp import record as dp_record
    from cxr_relink.models.dp.plan import DataFacts, make_plan, settings

    def plan(cap: int, delta: float):  # 2,300 study units in batches of 256: the public bound is 2,304
        return make_plan(settings("dp", {"target_epsilon": 3.0, "target_delta": delta}), "public_negatives",
                         DataFacts(n_units=2300, batch_size=256, max_studies_cap=cap), epochs=1)

    pp = dp_record.per_patient_guarantee(plan(6, 4.2e-4), 3.0)
    assert plan(6, 4.2e-4).n_units_upper == 2304
    assert pp["epsilon"] == pytest.approx(18.0) and pp["delta"] == pytest.approx(6 * math.exp(15.0) * 4.2e-4)
    assert pp["meaningful"] is False and "no meaningful per-patient guarantee" in pp["why_not"]
    text = "\n".join(privacy_lines(record(pp)))
    assert "no meaningful per-patient guarantee" in text and "VALID per study" in text
    assert "per patient: epsilon" not in text  # no (eps, delta) pair printed as if it were a guarantee

    # eps 0.34, k = 6: delta 1.42e-3 >= 1/2304 -> not meaningful either (the second case)
    assert 6 * math.exp(5 * 0.34) * 4.34e-5 >= 1 / 2304
    assert dp_record.per_patient_guarantee(plan(6, 4.34e-5), 0.34)["meaningful"] is False
    # a small k and delta: meaningful, and printed with its delta
    pp = dp_record.per_patient_guarantee(plan(2, 1e-6), 0.34)
    assert pp["meaningful"] and pp["delta"] == pytest.approx(2 * math.exp(0.34) * 1e-6)
    assert "per patient: epsilon 0.68, delta" in "\n".join(privacy_lines(record(pp)))


def test_public_report_overlap_count_reads_no_train_split(caplog) -> None:
    """The console line counting report texts shared with the public cohort is computed over the private
    val/test splits only: a text shared only with a train (DP unit) study is not counted."""
    from cxr_relink.datamodules.records import Study
    from cxr_relink.datamodules.features import FeatureDataModule

    def study(sid, pid, text, split):
        return Study(study_id=sid, patient_id=pid, images=[], report=text, findings="", impression=text,
                     labels=np.full(14, np.nan, np.float32), split=split, source="x")

    private = {"train": [study("a", "p1", "only in train and public", "train")],
               "val": [study("b", "p2", "val text", "val")], "test": [study("c", "p3", "in test and public", "test")]}
    public = [study("x", "q1", "only in train and public", "train"), study("y", "q2", "in test and public", "train")]
    me = SimpleNamespace(studies=lambda s: private[s], text_field="report", public_split="train")
    with caplog.at_level("WARNING"):
        FeatureDataModule._check_disjoint(me, SimpleNamespace(studies=lambda s: public))
    warned = [r.getMessage() for r in caplog.records if "identical report texts" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("public cohort shares 1 identical")
