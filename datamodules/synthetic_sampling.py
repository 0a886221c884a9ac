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

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from datamodules import synthetic_reports as rep
from datamodules.records import LABEL_INDEX

if TYPE_CHECKING:
    from datamodules.synthetic import CohortParams
    from datamodules.synthetic_render import Geometry

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
        st = sample_study(rng, pt, chronic, icu, chf_logit, P)
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
    base_lab = rep.labels_for(items, neg, normal)
    out = []
    stated = [i for i, it in enumerate(items)]

    def emit(err: str, new_items: list[dict], new_neg: list[str], new_normal: bool, changed: dict) -> None:
        text, _, _ = rep.render(new_items, new_neg, new_normal, style, off, technique=st["technique"])
        negs = list(new_neg)
        for it in new_items:
            if it.get("_negated"):
                negs.append(rep.KIND_LABEL[it["kind"]])
        lab = rep.labels_for(new_items, negs, new_normal)
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
