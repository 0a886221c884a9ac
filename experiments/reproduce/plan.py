"""The reproduction's plan: the protocol version, the scales and their sizing overrides, and the runs each
claim needs (towers, DP arms, the external and adaptive audits). runner.py executes it; render.py reads it."""

from __future__ import annotations

from typing import Any

# The plan's version, recorded in every kept seed's runs.json. 1: before issue #22 (DP fine-tuned the
# stage-2 heads only; no fresh-head DP, no non-private fresh-head control, no adaptive adversary; audit
# JSONs with two-sided 95% bootstrap intervals only). 2: issue #22's plan (this package).
PROTOCOL = 2
PROTOCOL_NOTE = {
    1: "before issue #22: DP fine-tuned the stage-2 heads only, no fresh-head DP, no non-private fresh-head "
       "control, no adaptive adversary; the audit JSONs carry two-sided 95% bootstrap intervals only",
}

# --------------------------------------------------------------------------- scales

# Keys: patients (internal cohort), ext_patients (synthcxr_external: DP public bank + transfer test),
# image (px), epochs (stage 2), train_batches (per epoch, None = all), stage1_epochs, dp_epochs,
# dp_batch, n_boot (re-linkage), probe_boot. None = the config's own default.
SCALES: dict[str, dict[str, Any]] = {
    "tiny": dict(patients=260, ext_patients=120, image=32, epochs=1, train_batches=3, stage1_epochs=1, dp_epochs=2,
                 dp_batch=32, batch=32, n_boot=30, probe_boot=10, probe_train=256, directions="[i2t]"),
    "small": dict(patients=600, ext_patients=300, image=64, epochs=3, train_batches=None, stage1_epochs=2, dp_epochs=5,
                  dp_batch=64, batch=64, n_boot=200, probe_boot=100, probe_train=2000, directions=None),
    "full": dict(patients=None, ext_patients=None, image=None, epochs=None, train_batches=None, stage1_epochs=None,
                 dp_epochs=None, dp_batch=None, batch=None, n_boot=None, probe_boot=None, probe_train=None, directions=None),
    "paper": dict(patients=None, ext_patients=None, image=None, epochs=None, train_batches=None, stage1_epochs=None,
                  dp_epochs=None, dp_batch=None, batch=None, n_boot=None, probe_boot=None, probe_train=None, directions=None,
                  test_patients=4500, ext_test_patients=1000, label_profile="mimic"),
}
# What a scale's verdicts can and cannot say (RESULTS.md's header).
SCALE_CAVEAT = {
    "tiny": "Tiny and small scales are far below the papers' data and training budgets: read their verdicts as a "
            "smoke test of the pipeline, not as evidence about the papers.",
    "paper": "Scale `paper` reaches the papers' pool sizes (test split of ~12,400 studies: N = 100, 1,000, 10,000 and "
             "the full database are real pools) with a label structure fitted to real labeler output, but trains "
             "0.9 M-parameter towers on ~2,200 synthetic studies for a few CPU epochs: its verdicts are about this "
             "pipeline on this cohort, not a replication of the papers' models or data.",
}
# Keep-state across sessions: scales whose finished seeds are kept by default (experiments/results/<scale>).
KEEP_BY_DEFAULT = ("paper",)
# Wall time on 2 CPU cores shared with other jobs, per seed. tiny: measured (docs/results.md). small: one
# bert_encoder stage-2 run measured at 4.5 min; ~11 runs per seed (LLM runs heavier). full: the default
# `python train.py` is sized at ~10 min; ~9 stage-1/2 runs per seed plus DP and evaluations.
RUNTIME_NOTE = {"tiny": "7.7 min wall, 431 CPU-s per seed (measured 2026-12-07 beside another job, docs/results.md)", "small": "~1 h per seed (estimate)",
                "full": "~2.5 h per seed (estimate)", "paper": "32–43 min per seed under protocol 2 (measured 2026-12-05 on 2 Intel Xeon cores); issue #28's completion of a kept seed re-trains stages 1–2 and adds three short runs"}


def _kv(key: str, value: Any) -> list[str]:
    return [] if value is None else [f"{key}={value}"]


def scale_overrides(scale: dict[str, Any], kind: str) -> list[str]:
    """Hydra overrides that size a run: kind = stage2 | stage1 | dp | evaluate (external cohort) | audit
    (evaluate.py on the internal cohort)."""
    s = scale
    ov = ["trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]
    if kind not in ("evaluate", "audit"):
        ov += ["logger=csv"]
    if kind == "evaluate":
        ov = ["data=synthcxr_external", *_kv("data.reader.num_patients", s["ext_patients"])]
        ov += _kv("data.reader.test_patients", s.get("ext_test_patients"))
    else:  # stage1 / stage2 / dp, and "audit": evaluate.py on the internal cohort's test split
        ov += _kv("data.reader.num_patients", s["patients"]) + _kv("data.reader.test_patients", s.get("test_patients"))
    ov += _kv("data.reader.label_profile", s.get("label_profile"))
    ov += _kv("data.reader.image_size", s["image"]) + _kv("data.image_size", s["image"])
    if kind == "stage2":
        ov += _kv("trainer.max_epochs", s["epochs"]) + _kv("trainer.limit_train_batches", s["train_batches"])
        ov += _kv("data.batch_size", s["batch"])
    if kind == "stage1":
        ov += _kv("trainer.max_epochs", s["stage1_epochs"]) + _kv("trainer.limit_train_batches", s["train_batches"])
    if kind == "dp":
        ov += _kv("trainer.max_epochs", s["dp_epochs"]) + _kv("data.batch_size", s["dp_batch"])
        ov += _kv("public_cohort.reader.num_patients", s["ext_patients"])
        ov += _kv("public_cohort.reader.label_profile", s.get("label_profile"))
        if s["dp_epochs"] is not None:
            ov += [f"trainer.check_val_every_n_epoch={max(1, s['dp_epochs'])}"]
    if kind in ("stage2", "dp"):
        ov += _kv("callbacks.relinkage_audit.n_boot", s["n_boot"]) + _kv("callbacks.linear_probe.n_boot", s["probe_boot"])
        ov += _kv("callbacks.linear_probe.max_train_samples", s["probe_train"])
        ov += _kv("callbacks.relinkage_audit.directions", s["directions"])
    if kind in ("evaluate", "audit"):
        ov += _kv("audit.relinkage.n_boot", s["n_boot"]) + _kv("audit.relinkage.directions", s["directions"])
    if kind == "evaluate":  # audit=all's probe (the adaptive audit has none)
        ov += _kv("audit.probe.n_boot", s["probe_boot"]) + _kv("audit.probe.max_train_samples", s["probe_train"])
    return ov


# --------------------------------------------------------------------------- the runs each claim needs

TOWERS = (("generic", "generic text tower (frozen at random init)"), ("bert", "bert_encoder"),
          ("llm", "llm_encoder + stage-1 adaptation"))
# Claim 4's arms: (tag, title, head_init, loss mode, private). The stage-2 arms are stage 3 as it was
# (DP fine-tunes the trained stage-2 heads); the fresh arms train new heads under DP (issue #22).
# Issue #28 adds the patient-unit arms (data.privacy_unit=patient: all studies of a patient are one DP unit, the
# hospital's unit) beside the study-unit ones at the same target epsilon, with their own non-private control.
DP_ARMS = (
    ("nonprivate", "non-private, stage-2 heads", "stage2", "public_negatives", False, "study"),
    ("dp_public_negatives", "DP public negatives, stage-2 heads", "stage2", "public_negatives", True, "study"),
    ("dp_group_clipping", "DP group clipping, stage-2 heads", "stage2", "group_clipping", True, "study"),
    ("nonprivate_fresh", "non-private, fresh heads (control)", "fresh", "public_negatives", False, "study"),
    ("dp_fresh_public_negatives", "DP public negatives, fresh heads", "fresh", "public_negatives", True, "study"),
    ("dp_fresh_group_clipping", "DP group clipping, fresh heads", "fresh", "group_clipping", True, "study"),
    ("nonprivate_fresh_patient", "non-private, fresh heads, patient units (control)", "fresh", "public_negatives", False,
     "patient"),
    ("dp_fresh_public_negatives_patient", "DP public negatives, fresh heads, patient units", "fresh", "public_negatives",
     True, "patient"),
)
# The model before DP, re-audited through the DP stage's own pipeline with its heads unchanged (non-private,
# learning rate 0): its linear probe is fitted where every DP arm's is, on the public cohort (issue #28). The
# stage-2 run's own final audit fits its probe on the private train split: not comparable with the DP arms.
BEFORE_DP = ("before_dp", "before DP (stage 2), public-cohort probe")
DP_TITLE = {t: title for t, title, *_ in DP_ARMS} | {"base": "before DP (stage 2)", BEFORE_DP[0]: BEFORE_DP[1]}
# Claim 4's readings: (summary label, title, DP arm, its non-private control, head_init, the run whose R@1 is "before
# DP": the stage-2 model the arm was trained from -- the kept stage-2 run for the arms kept with it; for the arms
# issue #28 added to a kept seed, the re-trained stage-2 model, re-audited as before_dp: stage 2 is not bit-for-bit
# reproducible on a CPU, and the re-trained model's audit against the kept one is stated beside the table).
READINGS = (("4", "stage-2 heads", "dp_public_negatives", "nonprivate", "stage2", "base"),
            ("4f", "fresh heads", "dp_fresh_public_negatives", "nonprivate_fresh", "fresh", "base"),
            ("4p", "fresh heads, patient units", "dp_fresh_public_negatives_patient", "nonprivate_fresh_patient", "fresh",
             BEFORE_DP[0]))
# The one probe protocol of every claim-4 arm (stated in every table that shows an AUROC).
PROBE_PROTOCOL = ("linear probe fitted on the public cohort's train split (synthcxr_external: no DP unit, the same "
                  "images for every arm, at most `max_train_samples` of them), scored on the private test split")
EXTERNAL = ("base", "dp_public_negatives", "dp_group_clipping", "dp_fresh_public_negatives", "dp_fresh_group_clipping")
# 4c: the models attacked, the attacks read (each on its own), and the attacker's auxiliary data: every
# study pair of the training split ("leaked", distribution-matched: the strongest set configs/audit/adaptive
# offers; one set keeps the audit to 4 re-linkage passes per model).
ADAPTIVE = ("base", "dp_public_negatives", "dp_fresh_public_negatives")
ADAPTIVE_ATTACKS = ("cosine", "ridge", "procrustes", "head")
# The attacks fitted on the frozen trunk's features (audit/adaptive.py): head-only DP cannot change them. Cosine
# and Procrustes read the released (head) embeddings.
TRUNK_ATTACKS = ("ridge", "head")
ADAPTIVE_AUX = ("leaked", "all")
ADAPTIVE_OVERRIDES = ("audit.adaptive.aux=[leaked]", "audit.adaptive.n_aux=[all]")


def plan_names(s: int) -> list[str]:
    """Every run name of seed ``s`` in this plan (the kept-seed completion compares against it)."""
    names = [f"stage1/s{s}", f"llm/s{s}", *[f"{t}/s{s}" for t, *_ in DP_ARMS], f"{BEFORE_DP[0]}/s{s}",
             *[f"adaptive/{t}/s{s}" for t in ADAPTIVE], *[f"external/{t}/s{s}" for t in EXTERNAL],
             f"generic/s{s}", f"bert/s{s}"]
    return names + [f"{a}/{t}/s{s}" for t in ("llm", "bert") for a in ("style_structured", "style_mixed_train")]
