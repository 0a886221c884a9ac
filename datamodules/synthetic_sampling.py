"""Patient, study and report-variant sampling for the synthetic cohort (private helper of
datamodules/synthetic.py).

A small latent-state model rather than independent coin flips: each patient has a stable
anatomy, persistent chronic/incidental items, a heart-failure propensity and an ICU propensity;
each study draws its ICU state (persistent across consecutive studies), heart-failure episode
and infection, and from those its findings, devices, explicit negations and acquisition.
Every random draw comes from the patient's own generator, so a patient's content depends only
on (seed, patient index, parameters).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from cxr_relink.datamodules import synthetic_reports as rep
from cxr_relink.datamodules.records import CHEXPERT_LABELS, LABEL_INDEX

if TYPE_CHECKING:
    from cxr_relink.datamodules.synthetic_params import CohortParams
    from cxr_relink.datamodules.synthetic_render import Geometry

# Studies per patient 1..6 (a long tail, as in MIMIC-CXR).
STUDY_COUNT_P = np.array([0.34, 0.22, 0.16, 0.12, 0.09, 0.07])

# ============================================================================ study sampling


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else float(x)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _choice(rng: np.random.Generator, options: Sequence[Any], p: Sequence[float] | None = None) -> Any:
    if p is None:
        return options[int(rng.integers(len(options)))]
    u, acc = rng.random(), 0.0
    for o, w in zip(options, p):
        acc += w
        if u < acc:
            return o
    return options[-1]


def _side(rng, p_right: float = 0.5) -> str:
    return "right" if rng.random() < p_right else "left"


def _zone(rng, p=(0.2, 0.3, 0.5)) -> str:
    return _choice(rng, rep.ZONES, p)


def _cert(rng, p_unc: float) -> str:
    return "uncertain" if rng.random() < p_unc else "present"


def sample_patient(
    rng: np.random.Generator, pidx: int, split: str, P: CohortParams, geo: Geometry
) -> tuple[dict, list[dict]]:
    female = rng.random() < 0.5
    age = int(_clamp(rng.normal(62, 16), 18, 95))
    chronic_cm = rng.random() < float(_clamp(0.17 + 0.006 * (age - 60), 0.03, 0.4))
    margin = float(_clamp(0.03 + rng.gamma(2.0, 0.035), 0.03, 0.26))
    pt = {
        "patient_id": f"{P.cohort}-p{pidx:06d}",
        "sex": "F" if female else "M",
        "age": age,
        "female": float(female),
        "thorax_half_width": float(_clamp(rng.normal(0.68 if female else 0.74, 0.04), 0.58, 0.86)),
        "soft_tissue_margin": margin,
        "habitus": "slim" if margin < 0.07 else "average" if margin < 0.13 else "large",
        "ctr_baseline": float(_clamp(rng.normal(0.55, 0.03) if chronic_cm else rng.normal(0.43, 0.03), 0.35, 0.66)),
        "rib_spacing": float(_clamp(rng.normal(0.135, 0.012), 0.105, 0.165)),
        "rib_phase": float(rng.uniform(-0.02, 0.02)),
        "rotation_tendency_deg": float(rng.normal(0.0, 2.5)),
        "apex_y": float(_clamp(rng.normal(-0.72, 0.03), -0.82, -0.62)),
        "diaphragm_y": float(_clamp(rng.normal(0.42, 0.04), 0.30, 0.54)),
        "mediastinum_half_width": float(_clamp(rng.normal(0.11, 0.01), 0.08, 0.14)),
        "ap_half_depth": 0.0,
        "texture": (int(rng.integers(4)), int(rng.integers(geo.pad * 2)), int(rng.integers(geo.pad * 2))),
    }
    # chest depth follows the width (a barrel chest is a little deeper)
    pt["ap_half_depth"] = float(_clamp(pt["thorax_half_width"] * rng.normal(0.68, 0.05), 0.36, 0.66))
    chf_logit = -2.4 + 0.035 * (age - 60) + 1.6 * chronic_cm
    icu_prop = float(_clamp(P.icu_fraction * rng.gamma(1.5, 1 / 1.5), 0.0, 0.95))
    # Persistent (chronic / incidental) items, the same in every study of the patient.
    chronic: list[dict] = []
    if rng.random() < 0.07:
        chronic.append(
            {
                "kind": "granuloma",
                "side": _side(rng),
                "zone": _zone(rng, (0.45, 0.35, 0.2)),
                "_pos": [tuple(rng.random(2))],
            }
        )
    if rng.random() < 0.07:
        chronic.append(
            {
                "kind": "clips",
                "location": _choice(
                    rng, ("right upper quadrant", "left axilla", "right axilla", "neck"), (0.5, 0.2, 0.15, 0.15)
                ),
            }
        )
    if rng.random() < 0.025:
        chronic.append(
            {
                "kind": "fracture",
                "age": "old",
                "side": _side(rng),
                "rib": int(rng.integers(4, 10)),
                "certainty": "present",
            }
        )
    if rng.random() < 0.01:
        chronic.append({"kind": "pleural_thickening", "side": _side(rng), "certainty": "present"})
    if rng.random() < 0.03 + 0.002 * max(0, age - 50):
        chronic.append({"kind": "sternotomy", "certainty": "present"})
    if rng.random() < 0.02 + 0.0015 * max(0, age - 50):
        chronic.append({"kind": "pacemaker", "leads": int(_choice(rng, (1, 2), (0.3, 0.7))), "certainty": "present"})
    if rng.random() < 0.022:
        n = int(_choice(rng, (1, 2, 3), (0.6, 0.28, 0.12)))
        chronic.append(
            {
                "kind": "nodule",
                "count": n,
                "side": _side(rng),
                "zone": _zone(rng, (0.4, 0.35, 0.25)),
                "size_mm": int(rng.integers(5, 19)),
                "certainty": "present",
                "_pos": [tuple(rng.random(2)) for _ in range(n)],
            }
        )

    n_studies = int(_choice(rng, range(1, 7), STUDY_COUNT_P))
    studies = []
    prev_icu = False
    mix = P.train_style_mix if (split == "train" and P.train_style_mix is not None) else P.style_mix
    for si in range(n_studies):
        icu = rng.random() < (0.65 if prev_icu else icu_prop)
        prev_icu = icu
        if P.label_profile == "legacy":
            st = sample_study(rng, pt, chronic, icu, chf_logit, P)
        else:
            st = sample_study_profile(rng, pt, chronic, P)
        st["study_id"] = f"{pt['patient_id']}-s{si:02d}"
        st["style"] = _choice(rng, [s for s, _ in mix], [w for _, w in mix])
        st["offset"] = int(rng.integers(1000))
        studies.append(st)
    return pt, studies


def sample_study(rng, pt: dict, chronic: list[dict], icu: bool, chf_logit: float, P: CohortParams) -> dict:
    items: list[dict] = []
    unmentioned: list[dict] = []  # drawn in the image but not stated in this report
    for c in chronic:
        if c["kind"] in ("granuloma", "clips", "sternotomy") and rng.random() < 0.15:
            unmentioned.append(dict(c))  # incidentals are sometimes not mentioned
        else:
            items.append(dict(c))
    chf = rng.random() < _sigmoid(chf_logit + 1.3 * icu)
    infection = rng.random() < 0.06 + 0.14 * icu
    ctr = float(_clamp(pt["ctr_baseline"] + 0.03 * chf + rng.normal(0, 0.008), 0.33, 0.7))
    if ctr >= 0.52:
        items.append(
            {
                "kind": "cardiomegaly",
                "size": "mild" if ctr < 0.56 else "moderate" if ctr < 0.60 else "marked",
                "certainty": "present",
            }
        )
    elif ctr >= 0.495 and rng.random() < 0.7:
        items.append({"kind": "cardiomegaly", "certainty": "uncertain"})
    if chf and rng.random() < 0.75:
        items.append(
            {
                "kind": "edema",
                "size": _choice(rng, ("mild", "moderate", "severe"), (0.5, 0.35, 0.15)),
                "certainty": _cert(rng, 0.15),
            }
        )
    eff_sides: list[str] = []
    if chf and rng.random() < 0.55:
        eff_sides.append(_choice(rng, ("bilateral", "right", "left"), (0.6, 0.3, 0.1)))
    lung_side = _side(rng, 0.55)
    lung_zone = _zone(rng, (0.15, 0.25, 0.6))
    if infection:
        cert = _cert(rng, 0.15)
        if rng.random() < 0.75:
            items.append(
                {
                    "kind": "consolidation",
                    "side": lung_side,
                    "zone": lung_zone,
                    "size": _choice(rng, ("small", "moderate", "large"), (0.4, 0.4, 0.2)),
                    "certainty": cert,
                    "_jit": tuple(rng.random(2)),
                    "_tex": int(rng.integers(4)),
                }
            )
        else:
            items.append(
                {
                    "kind": "opacity",
                    "side": lung_side,
                    "zone": lung_zone,
                    "certainty": cert,
                    "_jit": tuple(rng.random(2)),
                    "_tex": int(rng.integers(4)),
                }
            )
        if rng.random() < 0.8:
            items.append({"kind": "pneumonia", "side": lung_side, "zone": lung_zone, "certainty": _cert(rng, 0.55)})
        if not eff_sides and rng.random() < 0.3:
            eff_sides.append(lung_side)
    elif rng.random() < 0.04:
        items.append(
            {
                "kind": "opacity",
                "side": _side(rng),
                "zone": _zone(rng),
                "certainty": _cert(rng, 0.3),
                "_jit": tuple(rng.random(2)),
                "_tex": int(rng.integers(4)),
            }
        )
    if not eff_sides and rng.random() < (0.18 if icu else 0.05):
        eff_sides.append(_choice(rng, ("right", "left", "bilateral"), (0.45, 0.35, 0.2)))
    for s in eff_sides:
        items.append(
            {
                "kind": "effusion",
                "side": s,
                "size": _choice(rng, ("small", "moderate", "large"), (0.55, 0.3, 0.15)),
                "certainty": _cert(rng, 0.1),
            }
        )
    if rng.random() < 0.06 + 0.22 * icu + 0.15 * bool(eff_sides):
        if rng.random() < 0.45:
            items.append(
                {
                    "kind": "atelectasis",
                    "side": "bilateral",
                    "zone": "lower",
                    "certainty": _cert(rng, 0.2),
                    "_jit": tuple(rng.random(2)),
                }
            )
        else:
            items.append(
                {
                    "kind": "atelectasis",
                    "side": _side(rng),
                    "zone": _choice(rng, ("mid", "lower"), (0.25, 0.75)),
                    "certainty": _cert(rng, 0.2),
                    "_jit": tuple(rng.random(2)),
                }
            )
    acute_fx = rng.random() < 0.012
    if acute_fx:
        items.append(
            {
                "kind": "fracture",
                "age": "acute",
                "side": _side(rng),
                "rib": int(rng.integers(3, 10)),
                "certainty": _cert(rng, 0.25),
            }
        )
    if rng.random() < 0.012 + 0.05 * icu + 0.3 * acute_fx:
        side = _side(rng)
        size = _choice(rng, ("small", "moderate", "large"), (0.65, 0.25, 0.10))
        items.append({"kind": "pneumothorax", "side": side, "size": size, "certainty": _cert(rng, 0.1)})
        if rng.random() < (0.7 if size != "small" else 0.2):
            items.append({"kind": "chest_tube", "side": side, "certainty": "present"})
    if rng.random() < 0.015 + 0.02 * icu:
        items.append({"kind": "mediastinal_widening", "certainty": _cert(rng, 0.4)})
    if rng.random() < 0.005:
        items.append(
            {
                "kind": "mass",
                "side": _side(rng),
                "zone": _zone(rng, (0.4, 0.4, 0.2)),
                "size_cm": int(rng.integers(3, 7)),
                "certainty": _cert(rng, 0.3),
                "_pos": [tuple(rng.random(2))],
            }
        )
    if icu:
        ett = rng.random() < 0.55
        if ett:
            items.append(
                {"kind": "ett", "tip_cm": int(_clamp(round(rng.normal(4.5, 1.5)), 1, 8)), "certainty": "present"}
            )
        if rng.random() < (0.8 if ett else 0.2):
            items.append(
                {
                    "kind": "ng",
                    "tip": _choice(rng, ("stomach", "distal esophagus"), (0.88, 0.12)),
                    "certainty": "present",
                }
            )
        if rng.random() < 0.55:
            items.append(
                {
                    "kind": "cvc",
                    "side": _side(rng, 0.75),
                    "approach": _choice(rng, ("internal jugular", "subclavian"), (0.8, 0.2)),
                    "tip": _choice(rng, ("svc", "cavoatrial junction", "right atrium"), (0.55, 0.3, 0.15)),
                    "certainty": "present",
                }
            )
    if rng.random() < (0.15 if icu else 0.04):
        items.append(
            {
                "kind": "picc",
                "side": _side(rng, 0.6),
                "tip": _choice(rng, ("svc", "cavoatrial junction", "right atrium"), (0.55, 0.3, 0.15)),
                "certainty": "present",
            }
        )
    items = rep.sort_items(items)
    for i, it in enumerate(items):
        it["_slot"] = i
    # Explicit negations of absent observations (CheXpert: negated -> 0, unmentioned -> blank).
    lab = rep.labels_for(items, [], False)
    kinds = {it["kind"] for it in items}
    neg_p = {
        "Pneumothorax": 0.55,
        "Pleural Effusion": 0.5,
        "Consolidation": 0.35,
        "Edema": 0.25,
        "Cardiomegaly": 0.4,
        "Enlarged Cardiomediastinum": 0.15,
        "Pneumonia": 0.1,
        "Lung Opacity": 0.2,
        "Lung Lesion": 0.08,
        "Fracture": 0.06,
    }
    negated = []
    for name in rep.NEGATABLE:
        if not math.isnan(lab[LABEL_INDEX[name]]) or rng.random() >= neg_p[name]:
            continue
        if name == "Cardiomegaly" and ctr >= 0.49:
            continue
        if name == "Lung Opacity" and kinds & {"nodule", "mass", "granuloma", "opacity"}:
            continue
        if name == "Lung Lesion" and "granuloma" in kinds or name == "Fracture" and "fracture" in kinds:
            continue
        negated.append(name)
    lab = rep.labels_for(items, negated, False)
    normal = not any(v in (1.0, -1.0) for v in lab[1:])
    projection, views, technique = _acquisition(rng, pt, icu, P)
    return {
        "technique": technique,
        "items": items,
        "unmentioned": unmentioned,
        "negated": negated,
        "normal": normal,
        "icu": icu,
        "ctr": round(ctr, 4),
        "projection": projection,
        "views": views,
    }


def _acquisition(rng, pt: dict, icu: bool, P: CohortParams) -> tuple[str, list[dict], str | None]:
    # Acquisition: AP (portable) for ICU, otherwise ap_fraction; views share the projection.
    projection = "AP" if icu or rng.random() < P.ap_fraction else "PA"
    n_views = 1
    while n_views < P.max_views_per_study and rng.random() < (P.multi_view_fraction if n_views == 1 else 0.3):
        n_views += 1
    views = []
    for vi in range(n_views):
        # Extra views of a PA study are usually laterals; portable AP studies repeat the AP.
        lateral = vi > 0 and projection == "PA" and rng.random() < P.lateral_fraction
        views.append(
            {
                "view": "LATERAL" if lateral else projection,
                "rotation_deg": round(float(pt["rotation_tendency_deg"] + rng.normal(0.0, P.rotation_sd_deg)), 2),
                "exposure": round(float(_clamp(rng.normal(P.exposure_mean, P.exposure_sd), 0.5, 2.0)), 3),
                "noise": round(P.noise_sd * (1.4 if projection == "AP" else 1.0) * float(rng.uniform(0.8, 1.2)), 4),
                "_zoom": float(rng.uniform(0.97, 1.03) * (1.03 if projection == "AP" else 1.0)),
                "_shift": (float(rng.normal(0, 0.025)), float(rng.normal(0, 0.025))),
            }
        )
    # Most reports name the views they read (an instance detail the image carries too).
    technique = rep.technique_key([v["view"] for v in views]) if rng.random() < 0.6 else None
    return projection, views, technique


# ============================================================================ label profiles
#
# `legacy` (the default) is the latent-state model above: findings first, labels read off them,
# with Lung Opacity a deterministic parent and No Finding excluding devices. The other profiles
# sample the 14-label vector first, from a model fitted to real labeler output, and then write
# one item per positive / uncertain label and one negation per negative label, so the report,
# the image and the labels agree by construction (see docs/cohorts.md, "Label profiles").
#
# Model (the same for every profile; only the targets differ). The 13 observations other than
# No Finding each have a latent z_j, z ~ N(0, R) (a Gaussian copula). Along z_j the outcome is
# positive (lowest p_j), then the "uncertain band" (width u_j / h), then negative (q_j), then
# blank. A study hedges with probability h (one draw per study): in a hedging study the
# uncertain band reads as -1, otherwise as blank, so every label keeps its uncertain rate u_j
# while uncertain mentions cluster in fewer studies, as real reports do. R is fitted pair by
# pair so that P(z_i, z_j both in the positive band) equals the target joint positive rate
# (from P(B|A)), then projected to the nearest correlation matrix. No Finding is then the
# labeler's rule: 1 when no observation other than Support Devices is positive or uncertain.

LABEL_PROFILES = ("legacy", "chexpert", "mimic")
_OBS = CHEXPERT_LABELS[1:]  # the 13 latent observations (No Finding is derived)
HEDGE_FRACTION = 0.5  # h: fitted once to CheXpert's any-uncertain rate (0.38) by a 1-D sweep

# CheXpert train labels (187,641 studies; /work/shared/data/label_stats/, torchxrayvision 1.5.7):
# per label (positive, uncertain, negative) rates; blank is the rest.
CHEXPERT_RATES = {
    "No Finding": (0.0886, 0.0, 0.0),
    "Enlarged Cardiomediastinum": (0.0481, 0.0541, 0.0801),
    "Cardiomegaly": (0.1226, 0.0352, 0.0411),
    "Lung Opacity": (0.4939, 0.0231, 0.0264),
    "Lung Lesion": (0.0365, 0.0057, 0.004),
    "Edema": (0.2606, 0.0617, 0.0835),
    "Consolidation": (0.0678, 0.1278, 0.1023),
    "Pneumonia": (0.0244, 0.0834, 0.0098),
    "Atelectasis": (0.1563, 0.1566, 0.0054),
    "Pneumothorax": (0.0923, 0.0142, 0.2505),
    "Pleural Effusion": (0.4034, 0.0502, 0.1323),
    "Pleural Other": (0.013, 0.0094, 0.0011),
    "Fracture": (0.0387, 0.0026, 0.0104),
    "Support Devices": (0.564, 0.0048, 0.028),
}
# P(B positive | A positive): rows A, columns B, in CHEXPERT_LABELS order (diagonal 1).
CHEXPERT_COND = np.array(
    [
        [1.000, 0.000, 0.000, 0.000, 0.000, 0.000, 0.000, 0.000, 0.000, 0.000, 0.000, 0.000, 0.000, 0.440],
        [0.000, 1.000, 0.172, 0.493, 0.042, 0.220, 0.056, 0.014, 0.142, 0.076, 0.377, 0.015, 0.061, 0.557],
        [0.000, 0.068, 1.000, 0.499, 0.020, 0.462, 0.053, 0.017, 0.145, 0.030, 0.450, 0.010, 0.027, 0.609],
        [0.000, 0.048, 0.124, 1.000, 0.043, 0.279, 0.052, 0.034, 0.134, 0.089, 0.508, 0.015, 0.033, 0.620],
        [0.000, 0.055, 0.066, 0.587, 1.000, 0.111, 0.083, 0.044, 0.120, 0.109, 0.361, 0.030, 0.034, 0.392],
        [0.000, 0.041, 0.217, 0.529, 0.016, 1.000, 0.061, 0.022, 0.173, 0.029, 0.509, 0.005, 0.019, 0.660],
        [0.000, 0.039, 0.096, 0.377, 0.045, 0.234, 1.000, 0.060, 0.138, 0.052, 0.512, 0.017, 0.026, 0.568],
        [0.000, 0.027, 0.085, 0.689, 0.066, 0.233, 0.168, 1.000, 0.108, 0.027, 0.298, 0.018, 0.023, 0.340],
        [0.000, 0.044, 0.114, 0.424, 0.028, 0.289, 0.060, 0.017, 1.000, 0.096, 0.491, 0.009, 0.036, 0.638],
        [0.000, 0.040, 0.040, 0.479, 0.043, 0.081, 0.038, 0.007, 0.162, 1.000, 0.339, 0.011, 0.054, 0.623],
        [0.000, 0.045, 0.137, 0.621, 0.033, 0.329, 0.086, 0.018, 0.190, 0.078, 1.000, 0.009, 0.028, 0.652],
        [0.000, 0.056, 0.091, 0.552, 0.083, 0.107, 0.088, 0.033, 0.113, 0.081, 0.279, 1.000, 0.084, 0.430],
        [0.000, 0.076, 0.085, 0.419, 0.032, 0.127, 0.046, 0.014, 0.147, 0.129, 0.289, 0.028, 1.000, 0.438],
        [0.069, 0.047, 0.132, 0.543, 0.025, 0.305, 0.068, 0.015, 0.177, 0.102, 0.466, 0.010, 0.030, 1.000],
    ]
)
# Study-level CheXpert targets that the model is not fitted to directly (it is checked against
# them in tests/test_label_profiles.py).
CHEXPERT_STUDY_TARGETS = {
    "any_uncertain": 0.3808,
    # positives per study, No Finding excluded (6 = 6 or more)
    "positives_per_study": (0.09, 0.1993, 0.258, 0.2593, 0.1455, 0.0413, 0.0065),
    # distinct blank-as-negative label vectors among 43,793 random studies
    "distinct_vectors_43793": 4334,
}
# MIMIC-CXR-JPG v2.0.0, CheXpert labeler, 227,827 studies: (positive, uncertain, negative) counts
# per label as recalled from Johnson et al. 2019 (arXiv:1901.07042), label-frequency table.
# NOT VERIFIED: the table could not be retrieved in the session that wrote this; check the
# figures against the paper before relying on the `mimic` profile's absolute prevalences.
MIMIC_N = 227_827
MIMIC_COUNTS = {
    "No Finding": (75_455, 0, 0),
    "Enlarged Cardiomediastinum": (7_004, 9_375, 5_283),
    "Cardiomegaly": (44_845, 6_043, 15_911),
    "Lung Opacity": (51_525, 3_831, 3_069),
    "Lung Lesion": (6_284, 1_141, 862),
    "Edema": (27_018, 13_174, 25_641),
    "Consolidation": (10_778, 4_331, 7_967),
    "Pneumonia": (16_556, 18_291, 2_461),
    "Atelectasis": (45_808, 10_327, 1_531),
    "Pneumothorax": (10_358, 1_134, 42_356),
    "Pleural Effusion": (54_300, 5_814, 27_158),
    "Pleural Other": (1_985, 765, 128),
    "Fracture": (4_390, 590, 870),
    "Support Devices": (66_558, 237, 3_486),
}
MIMIC_RATES = {k: tuple(round(c / MIMIC_N, 4) for c in v) for k, v in MIMIC_COUNTS.items()}


def profile_rates(profile: str) -> dict[str, tuple[float, float, float]]:
    if profile == "chexpert":
        return CHEXPERT_RATES
    if profile == "mimic":
        return MIMIC_RATES
    raise ValueError(f"label_profile must be one of {LABEL_PROFILES[1:]} here, got {profile!r}")


def _fit_correlation(p: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """Latent correlation whose positive bands have the target joint positive rates."""
    from scipy.optimize import brentq
    from scipy.stats import multivariate_normal, norm

    a = norm.ppf(p)
    k = len(p)
    R = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            # P(A, B) from both conditionals (they disagree slightly by rounding)
            joint = 0.5 * (cond[i, j] * p[i] + cond[j, i] * p[j])
            joint = min(max(joint, 1e-6), min(p[i], p[j]) - 1e-6)

            def f(r: float) -> float:
                return float(multivariate_normal.cdf([a[i], a[j]], cov=[[1.0, r], [r, 1.0]])) - joint

            lo, hi = -0.95, 0.95
            flo, fhi = f(lo), f(hi)
            R[i, j] = R[j, i] = brentq(f, lo, hi, xtol=1e-4) if flo < 0 < fhi else (lo if flo >= 0 else hi)
    w, V = np.linalg.eigh(R)  # nearest positive-definite correlation matrix
    R = (V * np.clip(w, 1e-3, None)) @ V.T
    d = np.sqrt(np.diag(R))
    return R / d[:, None] / d[None, :]


@functools.lru_cache(maxsize=None)
def _chexpert_correlation() -> np.ndarray:
    p = np.array([CHEXPERT_RATES[n][0] for n in _OBS])
    return _fit_correlation(p, CHEXPERT_COND[1:, 1:])


@dataclass(frozen=True)
class LabelModel:
    chol: np.ndarray  # Cholesky factor of the latent correlation R
    t_pos: np.ndarray  # thresholds on z: positive below t_pos, uncertain band below t_unc,
    t_unc: np.ndarray  # negative below t_neg, blank above
    t_neg: np.ndarray
    normal_mix: float  # share of studies from the "normal" component (0 for chexpert)
    normal_neg: np.ndarray  # per-observation negation rate in the normal component
    normal_devices: float  # Support Devices positive rate in the normal component


def _thresholds(p: np.ndarray, u: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.stats import norm

    hi = 1.0 - 1e-9
    u = u / HEDGE_FRACTION
    return norm.ppf(p), norm.ppf(np.minimum(p + u, hi)), norm.ppf(np.minimum(p + u + q, hi))


@functools.lru_cache(maxsize=None)
def label_model(profile: str) -> LabelModel:
    """The fitted label model of `profile`.

    Both profiles share CheXpert's latent correlation R (the *structure* of labeler output) and
    hedging fraction. `mimic` has far more normal studies than this copula produces at MIMIC's
    prevalences (~20% vs 33% No Finding), so it mixes in a "normal" component with share pi:
    no positive or uncertain observation, negations at the profile's rates, and devices at
    0.78x the overall device rate (CheXpert's P(devices | No Finding) / P(devices)). The copula
    component's positive and uncertain rates are divided by (1 - pi) so the overall marginals
    stay on target; pi is solved by a fixed-point iteration on the No Finding rate (Monte Carlo
    with a fixed seed, so the model is deterministic).
    """
    rates = profile_rates(profile)
    p = np.array([rates[n][0] for n in _OBS])
    u = np.array([rates[n][1] for n in _OBS])
    q = np.array([rates[n][2] for n in _OBS])
    chol = np.linalg.cholesky(_chexpert_correlation())
    target_nf = rates["No Finding"][0]
    dev = len(_OBS) - 1
    sd_ratio = CHEXPERT_COND[0, -1] / CHEXPERT_RATES["Support Devices"][0]
    pi = 0.0
    if profile != "chexpert":  # chexpert's copula alone gives its No Finding rate (0.084 vs 0.089)
        z = np.random.default_rng(0).standard_normal((100_000, len(_OBS))) @ chol.T
        hedge = np.random.default_rng(1).random((100_000, 1)) < HEDGE_FRACTION
        for _ in range(6):
            pc, uc = p / (1 - pi), u / (1 - pi)
            pc[dev] = (p[dev] - pi * sd_ratio * p[dev]) / (1 - pi)
            uc[dev] = u[dev]
            tp, tu, _ = _thresholds(pc, uc, q)
            hit = (z < tp) | ((z < tu) & hedge)
            nf = 1.0 - hit[:, :dev].any(axis=1).mean()
            pi = max(0.0, (target_nf - nf) / (1.0 - nf))
    pc, uc = p / (1 - pi), u / (1 - pi)
    pc[dev] = (p[dev] - pi * sd_ratio * p[dev]) / (1 - pi)
    uc[dev] = u[dev]
    t_pos, t_unc, t_neg = _thresholds(pc, uc, q)
    return LabelModel(chol, t_pos, t_unc, t_neg, float(pi), q, float(sd_ratio * p[dev]))


def sample_labels(rng: np.random.Generator, profile: str, n: int) -> np.ndarray:
    """n label vectors [n, 14] in {1, 0, -1, NaN} from `profile` (no images, no reports)."""
    m = label_model(profile)
    z = rng.standard_normal((n, len(_OBS))) @ m.chol.T
    hedge = rng.random((n, 1)) < HEDGE_FRACTION
    v = np.where(
        z < m.t_pos, 1.0, np.where(z < m.t_unc, np.where(hedge, -1.0, np.nan), np.where(z < m.t_neg, 0.0, np.nan))
    )
    if m.normal_mix > 0:  # the normal component (see label_model)
        u = rng.random((n, len(_OBS) + 2))  # [component, negation per observation, devices]
        normal = u[:, :1] < m.normal_mix
        vn = np.where(u[:, 1:-1] < m.normal_neg, 0.0, np.nan)
        vn[:, -1] = np.where(u[:, -1] < m.normal_devices, 1.0, vn[:, -1])
        v = np.where(normal, vn, v)
    lab = np.full((n, len(CHEXPERT_LABELS)), np.nan)
    lab[:, 1:] = v
    pathology = np.isin(lab[:, 1:-1], (1.0, -1.0)).any(axis=1)  # devices do not count
    lab[:, 0] = np.where(pathology, np.nan, 1.0)
    return lab


_DEVICES = ("ett", "ng", "cvc", "picc", "pacemaker", "chest_tube", "sternotomy")
_DEVICE_P = np.array([0.2, 0.2, 0.2, 0.14, 0.12, 0.08, 0.06])


def _device(rng, kind: str, cert: str) -> dict:
    if kind == "ett":
        return {"kind": kind, "tip_cm": int(_clamp(round(rng.normal(4.5, 1.5)), 1, 8)), "certainty": cert}
    if kind == "ng":
        return {"kind": kind, "tip": _choice(rng, ("stomach", "distal esophagus"), (0.88, 0.12)), "certainty": cert}
    if kind == "cvc":
        return {
            "kind": kind,
            "side": _side(rng, 0.75),
            "approach": _choice(rng, ("internal jugular", "subclavian"), (0.8, 0.2)),
            "tip": _choice(rng, ("svc", "cavoatrial junction", "right atrium"), (0.55, 0.3, 0.15)),
            "certainty": cert,
        }
    if kind == "picc":
        return {
            "kind": kind,
            "side": _side(rng, 0.6),
            "tip": _choice(rng, ("svc", "cavoatrial junction", "right atrium"), (0.55, 0.3, 0.15)),
            "certainty": cert,
        }
    if kind == "pacemaker":
        return {"kind": kind, "leads": int(_choice(rng, (1, 2), (0.3, 0.7))), "certainty": cert}
    if kind == "chest_tube":
        return {"kind": kind, "side": _side(rng), "certainty": cert}
    return {"kind": "sternotomy", "certainty": cert}


def sample_study_profile(rng, pt: dict, chronic: list[dict], P: CohortParams) -> dict:
    """A study of a non-legacy label profile: labels first, then one item per stated label."""
    lab = sample_labels(rng, P.label_profile, 1)[0]

    def val(name: str) -> float:
        return float(lab[LABEL_INDEX[name]])

    def cert(name: str) -> str:
        return "uncertain" if val(name) == -1.0 else "present"

    def on(name: str) -> bool:
        return val(name) in (1.0, -1.0)

    items: list[dict] = []
    unmentioned: list[dict] = []
    for c in chronic:  # unlabelled incidentals persist per patient; labelled ones follow the labels
        if c["kind"] in rep.INCIDENTAL_KINDS:
            (unmentioned if rng.random() < 0.15 else items).append(dict(c))
    ctr = pt["ctr_baseline"] if pt["ctr_baseline"] < 0.49 else float(rng.uniform(0.44, 0.485))
    if on("Cardiomegaly"):
        if val("Cardiomegaly") == 1.0:
            size = _choice(rng, ("mild", "moderate", "marked"), (0.55, 0.3, 0.15))
            ctr = float(rng.uniform(*{"mild": (0.52, 0.56), "moderate": (0.56, 0.6), "marked": (0.6, 0.66)}[size]))
            items.append({"kind": "cardiomegaly", "size": size, "certainty": "present"})
        else:
            ctr = float(rng.uniform(0.497, 0.515))
            items.append({"kind": "cardiomegaly", "certainty": "uncertain"})
    if on("Enlarged Cardiomediastinum"):
        items.append({"kind": "mediastinal_widening", "certainty": cert("Enlarged Cardiomediastinum")})
    if on("Edema"):
        sev = _choice(rng, ("mild", "moderate", "severe"), (0.5, 0.35, 0.15))
        items.append({"kind": "edema", "size": sev, "certainty": cert("Edema")})
    lung_side, lung_zone = _side(rng, 0.55), _zone(rng, (0.15, 0.25, 0.6))
    if on("Consolidation"):
        items.append(
            {
                "kind": "consolidation",
                "side": lung_side,
                "zone": lung_zone,
                "size": _choice(rng, ("small", "moderate", "large"), (0.4, 0.4, 0.2)),
                "certainty": cert("Consolidation"),
                "_jit": tuple(rng.random(2)),
                "_tex": int(rng.integers(4)),
            }
        )
    if on("Pneumonia"):
        items.append({"kind": "pneumonia", "side": lung_side, "zone": lung_zone, "certainty": cert("Pneumonia")})
    if on("Lung Opacity"):
        items.append(
            {
                "kind": "opacity",
                "side": _side(rng),
                "zone": _zone(rng),
                "certainty": cert("Lung Opacity"),
                "_jit": tuple(rng.random(2)),
                "_tex": int(rng.integers(4)),
            }
        )
    if on("Atelectasis"):
        bibasilar = rng.random() < 0.45
        items.append(
            {
                "kind": "atelectasis",
                "side": "bilateral" if bibasilar else _side(rng),
                "zone": "lower" if bibasilar else _choice(rng, ("mid", "lower"), (0.25, 0.75)),
                "certainty": cert("Atelectasis"),
                "_jit": tuple(rng.random(2)),
            }
        )
    if on("Lung Lesion"):
        side, zone = _side(rng), _zone(rng, (0.4, 0.35, 0.25))
        if rng.random() < 0.2:
            items.append(
                {
                    "kind": "mass",
                    "side": side,
                    "zone": zone,
                    "size_cm": int(rng.integers(3, 7)),
                    "certainty": cert("Lung Lesion"),
                    "_pos": [tuple(rng.random(2))],
                }
            )
        else:
            n = 1 if val("Lung Lesion") == -1.0 else int(_choice(rng, (1, 2, 3), (0.6, 0.28, 0.12)))
            items.append(
                {
                    "kind": "nodule",
                    "count": n,
                    "side": side,
                    "zone": zone,
                    "size_mm": int(rng.integers(5, 19)),
                    "certainty": cert("Lung Lesion"),
                    "_pos": [tuple(rng.random(2)) for _ in range(n)],
                }
            )
    if on("Pleural Effusion"):
        items.append(
            {
                "kind": "effusion",
                "side": _choice(rng, ("bilateral", "right", "left"), (0.45, 0.35, 0.2)),
                "size": _choice(rng, ("small", "moderate", "large"), (0.55, 0.3, 0.15)),
                "certainty": cert("Pleural Effusion"),
            }
        )
    ptx_side = _side(rng)
    if on("Pneumothorax"):
        size = _choice(rng, ("small", "moderate", "large"), (0.65, 0.25, 0.10))
        items.append({"kind": "pneumothorax", "side": ptx_side, "size": size, "certainty": cert("Pneumothorax")})
    if on("Pleural Other"):
        items.append({"kind": "pleural_thickening", "side": _side(rng), "certainty": cert("Pleural Other")})
    if on("Fracture"):
        old = val("Fracture") == 1.0 and rng.random() < 0.5
        items.append(
            {
                "kind": "fracture",
                "age": "old" if old else "acute",
                "side": _side(rng),
                "rib": int(rng.integers(3, 10)),
                "certainty": cert("Fracture"),
            }
        )
    if val("Support Devices") == 1.0:
        k = int(_choice(rng, (1, 2, 3), (0.5, 0.3, 0.2)))
        for kind in rng.choice(len(_DEVICES), size=k, replace=False, p=_DEVICE_P):
            d = _device(rng, _DEVICES[int(kind)], "present")
            if d["kind"] == "chest_tube" and on("Pneumothorax"):
                d["side"] = ptx_side
            items.append(d)
    elif val("Support Devices") == -1.0:
        items.append(_device(rng, "picc", "uncertain"))
    items = rep.sort_items(items)
    for i, it in enumerate(items):
        it["_slot"] = i
    negated = [name for name in _OBS if val(name) == 0.0]
    normal = val("No Finding") == 1.0
    # The stated items and negations must read back as exactly the sampled labels.
    got = rep.labels_for(items, negated, normal, hierarchy=False)
    assert np.array_equal(np.nan_to_num(got, nan=9.0), np.nan_to_num(lab, nan=9.0)), (got, lab)
    icu = any(it["kind"] in ("ett", "ng", "cvc") for it in items)
    projection, views, technique = _acquisition(rng, pt, icu, P)
    return {
        "technique": technique,
        "items": items,
        "unmentioned": unmentioned,
        "negated": negated,
        "normal": normal,
        "icu": icu,
        "ctr": round(ctr, 4),
        "projection": projection,
        "views": views,
        "hierarchy": False,
    }


# ============================================================================ variants


def public_items(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in it.items() if not k.startswith("_")} for it in items]


def labels_json(lab: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in lab]


def make_variants(rng, st: dict, n: int, report: str) -> list[dict]:
    """Clinically equivalent rewrites: paraphrase, the other styles, reordering.

    Each keeps every stated item and negation with its certainty; none equals the report.
    """
    items, neg, normal, style, off = st["items"], st["negated"], st["normal"], st["style"], st["offset"]
    others = [s for s in rep.STYLES if s != style]
    n_clauses = len(items) + len(neg)
    out, seen = [], {report}
    for v in range(n):
        kind = (
            ("paraphrase", "style", "style", "reorder")[v % 4]
            if v < 4
            else _choice(rng, ("paraphrase", "style", "reorder"))
        )
        vs, vo, order = style, off + 1 + v, None
        if kind == "style":
            vs = others[(v - 1) % 2] if v < 4 else _choice(rng, others)
        if kind == "reorder" and n_clauses > 1:
            order = [int(i) for i in rng.permutation(n_clauses)]
            if order == sorted(order):
                order = order[1:] + order[:1]
        text = rep.render(items, neg, normal, vs, vo, order, st["technique"])[0]
        for bump in range(1, 4):  # prefer a text that differs from the report and earlier variants
            if text not in seen:
                break
            text = rep.render(items, neg, normal, vs, vo + bump, order, st["technique"])[0]
        seen.add(text)
        out.append({"style": vs, "kind": kind, "text": text})
    return out


def _random_finding(rng, kind: str) -> dict:
    if kind == "effusion":
        return {
            "kind": "effusion",
            "side": _choice(rng, ("left", "right", "bilateral")),
            "size": _choice(rng, ("small", "moderate", "large")),
            "certainty": "present",
        }
    if kind == "pneumothorax":
        return {
            "kind": "pneumothorax",
            "side": _side(rng),
            "size": _choice(rng, ("small", "moderate", "large")),
            "certainty": "present",
        }
    if kind == "consolidation":
        return {
            "kind": "consolidation",
            "side": _side(rng),
            "zone": _zone(rng),
            "size": _choice(rng, ("small", "moderate", "large")),
            "certainty": "present",
        }
    if kind == "edema":
        return {"kind": "edema", "size": _choice(rng, ("mild", "moderate", "severe")), "certainty": "present"}
    if kind == "cardiomegaly":
        return {"kind": "cardiomegaly", "size": _choice(rng, ("mild", "moderate", "marked")), "certainty": "present"}
    n = int(_choice(rng, (1, 2)))
    return {
        "kind": "nodule",
        "count": n,
        "side": _side(rng),
        "zone": _zone(rng),
        "size_mm": int(rng.integers(5, 19)),
        "certainty": "present",
    }


def make_error_variants(rng, st: dict) -> list[dict]:
    """One-error variants (hard negatives): exactly one attribute changed, same phrasing."""
    items, neg, normal, style, off = st["items"], st["negated"], st["normal"], st["style"], st["offset"]
    hier = st.get("hierarchy", True)
    base_lab = rep.labels_for(items, neg, normal, hierarchy=hier)
    out = []
    stated = [i for i, it in enumerate(items)]

    def emit(err: str, new_items: list[dict], new_neg: list[str], new_normal: bool, changed: dict) -> None:
        text, _, _ = rep.render(new_items, new_neg, new_normal, style, off, technique=st["technique"])
        negs = list(new_neg)
        for it in new_items:
            if it.get("_negated"):
                negs.append(rep.KIND_LABEL[it["kind"]])
        lab = rep.labels_for(new_items, negs, new_normal, hierarchy=hier)
        out.append({"error": err, "text": text, "labels": labels_json(lab), "changed": changed})

    # severity
    cand = [
        i
        for i in stated
        if items[i]["kind"] in rep.SEVERITY_LEVELS and items[i].get("certainty") == "present" and "size" in items[i]
    ]
    if cand:
        i = _choice(rng, cand)
        lv = [x for x in rep.SEVERITY_LEVELS[items[i]["kind"]] if x != items[i]["size"]]
        new = [dict(it) for it in items]
        new[i]["size"] = _choice(rng, lv)
        emit(
            "severity",
            new,
            neg,
            normal,
            {"kind": items[i]["kind"], "attribute": "size", "from": items[i]["size"], "to": new[i]["size"]},
        )
    # side
    cand = [
        i
        for i in stated
        if items[i].get("side") in ("left", "right", "bilateral") and items[i]["kind"] not in rep.DEVICE_KINDS
    ]
    if cand:
        i = _choice(rng, cand)
        old = items[i]["side"]
        to = {"left": "right", "right": "left"}.get(old) or _choice(rng, ("left", "right"))
        new = [dict(it) for it in items]
        new[i]["side"] = to
        emit("side", new, neg, normal, {"kind": items[i]["kind"], "attribute": "side", "from": old, "to": to})
    # zone
    cand = [
        i
        for i in stated
        if "zone" in items[i] and not (items[i]["kind"] == "atelectasis" and items[i]["side"] == "bilateral")
    ]
    if cand:
        i = _choice(rng, cand)
        to = _choice(rng, [z for z in rep.ZONES if z != items[i]["zone"]])
        new = [dict(it) for it in items]
        new[i]["zone"] = to
        emit(
            "zone",
            new,
            neg,
            normal,
            {"kind": items[i]["kind"], "attribute": "zone", "from": items[i]["zone"], "to": to},
        )
    # false finding: an observation the report does not affirm, stated as present
    cand = [
        k
        for k in ("effusion", "pneumothorax", "consolidation", "edema", "cardiomegaly", "nodule")
        if base_lab[LABEL_INDEX[rep.KIND_LABEL[k]]] not in (1.0, -1.0)
    ]
    if cand:
        ff = _random_finding(rng, _choice(rng, cand))
        ff["_slot"] = len(items)
        label = rep.KIND_LABEL[ff["kind"]]
        new_neg = [
            n
            for n in neg
            if n != label
            and not (ff["kind"] == "consolidation" and n == "Lung Opacity")
            and not (ff["kind"] == "nodule" and n == "Lung Opacity")
        ]
        new = rep.sort_items([dict(it) for it in items] + [ff])
        emit(
            "false_finding",
            new,
            new_neg,
            False,
            {"kind": ff["kind"], "attribute": "presence", "from": "absent", "to": "present"},
        )
    # false negation: a present pathology stated as absent
    cand = [
        i
        for i in stated
        if rep.KIND_LABEL[items[i]["kind"]] not in (None, "Support Devices")
        and items[i].get("certainty") == "present"
        and not (items[i]["kind"] == "fracture" and items[i]["age"] == "old")
    ]
    if cand:
        i = _choice(rng, cand)
        new = [dict(it) for it in items]
        new[i]["_negated"] = True
        emit(
            "false_negation",
            new,
            neg,
            normal,
            {"kind": items[i]["kind"], "attribute": "presence", "from": "present", "to": "absent"},
        )
    return out
