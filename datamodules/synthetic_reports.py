"""Report writing for the synthetic cohort (private helper of datamodules/synthetic.py).

A study's structured findings (a list of *items*, plus explicitly negated labels) are written
out in one of three institutional styles:

- ``structured``: ``FINDINGS: ... IMPRESSION: ...`` prose;
- ``impression_only``: a numbered ``IMPRESSION:`` list (findings section empty);
- ``abbreviated``: terse hospital shorthand ("sm L eff; ETT 4cm abv carina; no PTX").

Each item is one clause; clauses never contain the separators ``. ; ,`` so a clause-level
diff between two renderings of the same study isolates exactly what changed. Phrasing
choices depend on (variant offset, item index) only, so a one-error variant rendered with
the original's offset differs from the original in the changed item's clause(s) alone.
"""

from __future__ import annotations

import numpy as np

from cxr_relink.datamodules.records import LABEL_INDEX, NUM_LABELS

STYLES = ("structured", "impression_only", "abbreviated")
ERROR_TYPES = ("severity", "side", "zone", "false_finding", "false_negation")

# Which CheXpert observation each item kind states. Lung Opacity is additionally the parent of
# consolidation / edema / atelectasis / pneumonia (CheXpert's hierarchy).
KIND_LABEL = {
    "effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "opacity": "Lung Opacity",
    "atelectasis": "Atelectasis",
    "edema": "Edema",
    "cardiomegaly": "Cardiomegaly",
    "mediastinal_widening": "Enlarged Cardiomediastinum",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "pleural_thickening": "Pleural Other",
    "fracture": "Fracture",
    "ett": "Support Devices",
    "ng": "Support Devices",
    "cvc": "Support Devices",
    "picc": "Support Devices",
    "pacemaker": "Support Devices",
    "chest_tube": "Support Devices",
    "sternotomy": "Support Devices",
    "granuloma": None,  # incidental, not a CheXpert observation
    "clips": None,
}
OPACITY_CHILDREN = ("consolidation", "edema", "atelectasis", "pneumonia")
DEVICE_KINDS = ("ett", "ng", "cvc", "picc", "pacemaker", "chest_tube", "sternotomy")
INCIDENTAL_KINDS = ("granuloma", "clips")
# Canonical clause order: devices, heart and mediastinum, lungs, pleura, bones, incidentals.
KIND_ORDER = {
    k: i
    for i, k in enumerate(
        (
            "ett",
            "ng",
            "cvc",
            "picc",
            "pacemaker",
            "chest_tube",
            "sternotomy",
            "cardiomegaly",
            "mediastinal_widening",
            "edema",
            "consolidation",
            "pneumonia",
            "opacity",
            "atelectasis",
            "nodule",
            "mass",
            "effusion",
            "pneumothorax",
            "pleural_thickening",
            "fracture",
            "granuloma",
            "clips",
        )
    )
}
SEVERITY_LEVELS = {
    "effusion": ("small", "moderate", "large"),
    "pneumothorax": ("small", "moderate", "large"),
    "consolidation": ("small", "moderate", "large"),
    "edema": ("mild", "moderate", "severe"),
    "cardiomegaly": ("mild", "moderate", "marked"),
}
ZONES = ("upper", "mid", "lower")
# Labels a report may explicitly negate, in the order negations are written.
NEGATABLE = (
    "Cardiomegaly",
    "Enlarged Cardiomediastinum",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Lung Opacity",
    "Lung Lesion",
    "Pleural Effusion",
    "Pneumothorax",
    "Fracture",
)

_SIDE = {"left": "left", "right": "right", "bilateral": "bilateral"}
_SIDE_AB = {"left": "L", "right": "R", "bilateral": "bilat"}
_SEV_AB = {"small": "sm", "moderate": "mod", "large": "lg", "mild": "mild", "severe": "sev", "marked": "marked"}
_ADV = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}
_NUM = {1: "A", 2: "Two", 3: "Three"}
_TIP = {"svc": "SVC", "cavoatrial junction": "cavoatrial junction", "right atrium": "right atrium"}
_TIP_AB = {"svc": "SVC", "cavoatrial junction": "CAJ", "right atrium": "RA"}
_CLIPS = {
    "right upper quadrant": ("Cholecystectomy clips in the right upper quadrant", "RUQ surg clips"),
    "left axilla": ("Surgical clips in the left axilla", "surg clips L axilla"),
    "right axilla": ("Surgical clips in the right axilla", "surg clips R axilla"),
    "neck": ("Surgical clips at the thoracic inlet", "surg clips thoracic inlet"),
}


def _ord(n: int) -> str:
    return f"{n}{'st' if n == 1 else 'nd' if n == 2 else 'rd' if n == 3 else 'th'}"


def _pick(options: tuple[str, ...] | list[str], choice: int) -> str:
    return options[choice % len(options)]


def _sz(item: dict) -> str:
    return _SEV_AB[item["size"]]


def _loc(item: dict) -> str:
    return f"{_SIDE[item['side']]} {item['zone']} zone"


def _loc_ab(item: dict) -> str:
    return f"{_SIDE_AB[item['side']]}{item['zone'][0].upper()}Z"


def item_clause(item: dict, abbr: bool, choice: int) -> str:
    """One clause stating `item` (with its hedge if uncertain); no terminal punctuation."""
    k = item["kind"]
    unc = item.get("certainty") == "uncertain"
    if k == "effusion":
        side, size = item["side"], item["size"]
        noun = "pleural effusions" if side == "bilateral" else "pleural effusion"
        if abbr:
            s = _pick((f"{_sz(item)} {_SIDE_AB[side]} eff", f"{_SIDE_AB[side]} {_sz(item)} pl eff"), choice)
            return "? " + s if unc else s
        if unc:
            return _pick(
                (
                    f"Possible {size} {_SIDE[side]} {noun}",
                    f"{size.capitalize()} {_SIDE[side]} {noun} cannot be excluded",
                ),
                choice,
            )
        return _pick(
            (
                f"{size.capitalize()} {_SIDE[side]} {noun}",
                (
                    f"There is a {size} {_SIDE[side]} {noun}"
                    if side != "bilateral"
                    else f"There are {size} bilateral {noun}"
                ),
            ),
            choice,
        )
    if k == "pneumothorax":
        side, size = item["side"], item["size"]
        if abbr:
            s = _pick((f"{_sz(item)} {_SIDE_AB[side]} PTX", f"{_SIDE_AB[side]} PTX {_sz(item)}"), choice)
            return "? " + s if unc else s
        if unc:
            return _pick(
                (f"Possible {size} {side} pneumothorax", f"A {size} {side} pneumothorax cannot be excluded"), choice
            )
        return _pick((f"{size.capitalize()} {side} pneumothorax", f"There is a {size} {side} pneumothorax"), choice)
    if k == "consolidation":
        size = item["size"]
        if abbr:
            s = _pick((f"{_sz(item)} {_loc_ab(item)} consol", f"{_loc_ab(item)} consol {_sz(item)}"), choice)
            return "? " + s if unc else s
        if unc:
            return _pick(
                (
                    f"Possible {size} consolidation in the {_loc(item)}",
                    f"A {size} {_loc(item)} consolidation cannot be excluded",
                ),
                choice,
            )
        return _pick(
            (
                f"{size.capitalize()} consolidation in the {_loc(item)}",
                f"There is a {size} area of consolidation in the {_loc(item)}",
            ),
            choice,
        )
    if k == "pneumonia":
        if abbr:
            return f"?{_loc_ab(item)} PNA" if unc else _pick((f"{_loc_ab(item)} PNA", f"PNA {_loc_ab(item)}"), choice)
        if unc:
            return _pick(
                (f"Pneumonia in the {_loc(item)} cannot be excluded", f"Possible pneumonia in the {_loc(item)}"), choice
            )
        return _pick(
            (f"Findings consistent with pneumonia in the {_loc(item)}", f"Pneumonia in the {_loc(item)}"), choice
        )
    if k == "opacity":
        if abbr:
            return (
                f"? {_loc_ab(item)} opac"
                if unc
                else _pick((f"{_loc_ab(item)} opac", f"patchy {_loc_ab(item)} opac"), choice)
            )
        if unc:
            return _pick(
                (f"Possible faint opacity in the {_loc(item)}", f"Questionable opacity in the {_loc(item)}"), choice
            )
        return _pick((f"Patchy opacity in the {_loc(item)}", f"Ill-defined opacity in the {_loc(item)}"), choice)
    if k == "atelectasis":
        bibasilar = item["side"] == "bilateral"
        if abbr:
            s = "bibasilar atx" if bibasilar else _pick((f"{_loc_ab(item)} atx", f"atx {_loc_ab(item)}"), choice)
            return "? " + s if unc else s
        where = "bibasilar" if bibasilar else f"{_loc(item)}"
        if unc:
            return _pick((f"Possible {where} atelectasis", f"Questionable {where} atelectasis"), choice)
        if bibasilar:
            return _pick(("Bibasilar atelectasis", "There is bibasilar atelectasis"), choice)
        return _pick((f"Atelectasis in the {_loc(item)}", f"Plate-like atelectasis in the {_loc(item)}"), choice)
    if k == "edema":
        sev = item["size"]
        if abbr:
            s = _pick((f"{_SEV_AB[sev]} pulm edema", f"{_SEV_AB[sev]} edema"), choice)
            return "? " + s if unc else s
        if unc:
            return _pick(
                (f"Possible {sev} pulmonary edema", f"{sev.capitalize()} pulmonary edema cannot be excluded"), choice
            )
        return _pick((f"{sev.capitalize()} pulmonary edema", f"There is {sev} interstitial pulmonary edema"), choice)
    if k == "cardiomegaly":
        if unc:  # borderline heart size
            return (
                "borderline cardiomeg"
                if abbr
                else _pick(("Borderline cardiomegaly", "Heart size is borderline enlarged"), choice)
            )
        sev = item["size"]
        if abbr:
            return _pick((f"{sev} cardiomeg", f"{sev} cardiomegaly"), choice)
        return _pick((f"{sev.capitalize()} cardiomegaly", f"The heart is {_ADV[sev]} enlarged"), choice)
    if k == "mediastinal_widening":
        if abbr:
            return "? wide mediast" if unc else "wide mediast"
        if unc:
            return _pick(("Possible mediastinal widening", "Questionable widening of the mediastinum"), choice)
        return _pick(("Widened mediastinum", "The mediastinum is widened"), choice)
    if k == "nodule":
        n, mm = item["count"], item["size_mm"]
        if unc:  # only the label profiles hedge a nodule (legacy nodules are always stated as present)
            return f"? {_loc_ab(item)} nod {mm}mm" if abbr else f"Possible {mm} mm nodule in the {_loc(item)}"
        if abbr:
            return f"{n}x {_loc_ab(item)} nod {mm}mm"
        if n == 1:
            return _pick(
                (f"A {mm} mm nodule in the {_loc(item)}", f"{mm} mm pulmonary nodule in the {_loc(item)}"), choice
            )
        return _pick(
            (
                f"{_NUM[n]} nodules in the {_loc(item)} up to {mm} mm",
                f"{_NUM[n]} pulmonary nodules up to {mm} mm in the {_loc(item)}",
            ),
            choice,
        )
    if k == "mass":
        cm = item["size_cm"]
        if abbr:
            s = f"{cm}cm {_loc_ab(item)} mass"
            return "? " + s if unc else s
        if unc:
            return f"Possible {cm} cm mass in the {_loc(item)}"
        return _pick((f"{cm} cm mass in the {_loc(item)}", f"A {cm} cm mass in the {_loc(item)}"), choice)
    if k == "pleural_thickening":
        side = item["side"]
        if unc:  # label profiles only
            return (
                f"? {_SIDE_AB[side]} apical pl thickening"
                if abbr
                else f"Possible {side} apical pleural thickening"
            )
        if abbr:
            return f"{_SIDE_AB[side]} apical pl thickening"
        return _pick(
            (f"{side.capitalize()} apical pleural thickening", f"Pleural thickening at the {side} apex"), choice
        )
    if k == "fracture":
        side, rib = item["side"], item["rib"]
        if item["age"] == "old":
            if abbr:
                return f"old healed {_SIDE_AB[side]} {_ord(rib)} rib fx"
            return _pick(
                (f"Old healed {side} {_ord(rib)} rib fracture", f"Healed fracture of the {side} {_ord(rib)} rib"),
                choice,
            )
        if abbr:
            return f"? {_SIDE_AB[side]} {_ord(rib)} rib fx" if unc else f"acute {_SIDE_AB[side]} {_ord(rib)} rib fx"
        if unc:
            return f"Possible nondisplaced fracture of the {side} {_ord(rib)} rib"
        return _pick(
            (f"Acute fracture of the {side} {_ord(rib)} rib", f"Acute {side} {_ord(rib)} rib fracture"), choice
        )
    if k == "ett":
        cm = item["tip_cm"]
        if abbr:
            return _pick((f"ETT {cm}cm abv carina", f"ETT tip {cm}cm above carina"), choice)
        return _pick(
            (
                f"Endotracheal tube tip {cm} cm above the carina",
                f"The endotracheal tube terminates {cm} cm above the carina",
            ),
            choice,
        )
    if k == "ng":
        if item["tip"] == "stomach":
            return (
                _pick(("NGT tip in stomach", "NGT in stomach"), choice)
                if abbr
                else _pick(
                    (
                        "Enteric tube tip in the stomach",
                        "Nasogastric tube courses below the diaphragm with tip in the stomach",
                    ),
                    choice,
                )
            )
        return (
            "NGT tip distal esoph"
            if abbr
            else _pick(
                ("Nasogastric tube tip in the distal esophagus", "Enteric tube terminates in the distal esophagus"),
                choice,
            )
        )
    if k == "cvc":
        side, appr, tip = item["side"], item["approach"], item["tip"]
        if abbr:
            return f"{_SIDE_AB[side]} {'IJ' if appr == 'internal jugular' else 'SC'} CVC tip {_TIP_AB[tip]}"
        return _pick(
            (
                f"{side.capitalize()} {appr} central venous catheter tip in the {_TIP[tip]}",
                f"{side.capitalize()} {appr} central line terminating in the {_TIP[tip]}",
            ),
            choice,
        )
    if k == "picc":
        side, tip = item["side"], item["tip"]
        if unc:  # label profiles only: a line of uncertain nature
            return f"? {_SIDE_AB[side]} PICC" if abbr else f"Possible {side} arm PICC line"
        if abbr:
            return f"{_SIDE_AB[side]} PICC tip {_TIP_AB[tip]}"
        return _pick(
            (
                f"{side.capitalize()} arm PICC line tip in the {_TIP[tip]}",
                f"{side.capitalize()} PICC terminating in the {_TIP[tip]}",
            ),
            choice,
        )
    if k == "pacemaker":
        two = item["leads"] == 2
        if abbr:
            return "L chest PPM leads RA and RV" if two else "L chest PPM lead RV"
        if two:
            return _pick(
                (
                    "Left chest wall pacemaker with leads in the right atrium and right ventricle",
                    "Dual-lead left-sided pacemaker with leads in the right atrium and right ventricle",
                ),
                choice,
            )
        return _pick(
            (
                "Left chest wall pacemaker with a single lead in the right ventricle",
                "Single-lead left-sided pacemaker with lead in the right ventricle",
            ),
            choice,
        )
    if k == "chest_tube":
        side = item["side"]
        return (
            f"{_SIDE_AB[side]} chest tube"
            if abbr
            else _pick(
                (f"{side.capitalize()} chest tube in place", f"{side.capitalize()} pleural drain in place"), choice
            )
        )
    if k == "sternotomy":
        return (
            "sternotomy wires" if abbr else _pick(("Median sternotomy wires", "Intact median sternotomy wires"), choice)
        )
    if k == "granuloma":
        if abbr:
            return f"calc granuloma {_loc_ab(item)}"
        return _pick(
            (f"Calcified granuloma in the {_loc(item)}", f"Small calcified granuloma in the {_loc(item)}"), choice
        )
    if k == "clips":
        prose, ab = _CLIPS[item["location"]]
        return ab if abbr else prose
    raise ValueError(f"unknown finding kind {k!r}")


_NEG = {
    "Cardiomegaly": (("Heart size is normal", "Normal heart size"), ("nl heart size",)),
    "Enlarged Cardiomediastinum": (("Mediastinal contours are normal", "Normal mediastinal contours"), ("nl mediast",)),
    "Edema": (("No pulmonary edema", "No evidence of pulmonary edema"), ("no edema",)),
    "Consolidation": (("No focal consolidation", "No consolidation"), ("no consol",)),
    "Pneumonia": (("No evidence of pneumonia", "No pneumonia"), ("no PNA",)),
    "Lung Opacity": (("The lungs are clear", "Lungs are clear"), ("lungs clear",)),
    "Lung Lesion": (("No pulmonary nodules", "No suspicious pulmonary nodule"), ("no nodules",)),
    "Pleural Effusion": (("No pleural effusion", "No pleural effusions"), ("no eff",)),
    "Pneumothorax": (("No pneumothorax", "There is no pneumothorax"), ("no PTX",)),
    "Fracture": (("No displaced rib fracture", "No acute rib fracture"), ("no rib fx",)),
    # Written only by the label profiles (legacy never negates these three).
    "Atelectasis": (("No atelectasis", "No evidence of atelectasis"), ("no atx",)),
    "Pleural Other": (("No pleural thickening", "No pleural abnormality"), ("no pl thickening",)),
    "Support Devices": (("No lines or tubes", "No support devices"), ("no lines/tubes",)),
}
# Words that mark a hedged (uncertain) clause; every uncertain item clause contains one.
HEDGES = ("Possible", "cannot be excluded", "Questionable", "Borderline", "borderline", "?")
_NORMAL = (
    ("No acute cardiopulmonary process", "No acute cardiopulmonary abnormality", "Normal chest radiograph"),
    ("NACPP", "no acute CP process", "nl CXR"),
)


def negation_clause(label: str, abbr: bool, choice: int) -> str:
    return _pick(_NEG[label][1 if abbr else 0], choice)


def normal_clause(abbr: bool, choice: int) -> str:
    return _pick(_NORMAL[1 if abbr else 0], choice)


def false_negation_clause(item: dict, abbr: bool, choice: int) -> str:
    """The negation that wrongly denies `item`'s observation."""
    k = item["kind"]
    if k in ("nodule", "mass"):
        return negation_clause("Lung Lesion", abbr, choice)
    if k == "opacity":
        return "no focal opac" if abbr else "No focal opacity"
    if k == "atelectasis":
        return "no atx" if abbr else "No atelectasis"
    if k == "mediastinal_widening":
        return negation_clause("Enlarged Cardiomediastinum", abbr, choice)
    if k == "pleural_thickening":
        return "no pl thickening" if abbr else "No pleural thickening"
    return negation_clause(KIND_LABEL[k], abbr, choice)


def _clause(item: dict, abbr: bool, choice: int) -> str:
    # An item flagged "_negated" is a one-error variant's false negation of that item.
    return false_negation_clause(item, abbr, choice) if item.get("_negated") else item_clause(item, abbr, choice)


def sort_items(items: list[dict]) -> list[dict]:
    return sorted(items, key=lambda it: KIND_ORDER[it["kind"]])


_RANK = {1.0: 3, -1.0: 2, 0.0: 1, None: 0}


def labels_for(items: list[dict], negated: list[str], normal: bool, hierarchy: bool = True) -> np.ndarray:
    """CheXpert label vector implied by the stated items and negations.

    1 beats -1 beats 0 beats blank. With `hierarchy` (the legacy cohort) Lung Opacity is the
    parent of consolidation, edema, atelectasis and pneumonia; the label profiles pass False,
    as the real labeler reads Lung Opacity only from opacity mentions. No Finding is 1 exactly
    when `normal` (the caller decides what normal means), otherwise blank, as the CheXpert
    labeler never writes No Finding = 0.
    """
    best: dict[str, float] = {}
    for it in items:
        name = KIND_LABEL[it["kind"]]
        if name is None or it.get("_negated"):
            continue
        v = -1.0 if it.get("certainty") == "uncertain" else 1.0
        if _RANK[v] > _RANK[best.get(name)]:
            best[name] = v
        if hierarchy and it["kind"] in OPACITY_CHILDREN and _RANK[v] > _RANK[best.get("Lung Opacity")]:
            best["Lung Opacity"] = v
    for name in negated:
        best.setdefault(name, 0.0)
    lab = np.full(NUM_LABELS, np.nan, dtype=np.float32)
    for name, v in best.items():
        lab[LABEL_INDEX[name]] = v
    if normal:
        lab[LABEL_INDEX["No Finding"]] = 1.0
    return lab


TECHNIQUES = {  # views of the study -> (prose, shorthand)
    "PA": ("PA view of the chest", "PA CXR"),
    "AP": ("Portable AP view of the chest", "port AP CXR"),
    "PA+LATERAL": ("PA and lateral views of the chest", "PA/lat CXR"),
    "PA+PA": ("Two PA views of the chest", "PA CXR x2"),
    "AP+AP": ("Two portable AP views of the chest", "port AP CXR x2"),
}


def technique_key(views: list[str]) -> str:
    return "+".join(views[:2])


def render(
    items: list[dict],
    negated: list[str],
    normal: bool,
    style: str,
    offset: int,
    order: list[int] | None = None,
    technique: str | None = None,
) -> tuple[str, str, str]:
    """Write a report; returns (report, findings, impression).

    `items` are in canonical order; `order` optionally permutes the item and negation
    clauses together (a reordering variant). Item clauses use phrasing choice offset + slot,
    negations offset + label index, so adding or removing one clause leaves the rest as is.
    `technique` (a TECHNIQUES key) adds the views line (structured) or prefix (abbreviated).
    """
    abbr = style == "abbreviated"
    clauses = [_clause(it, abbr, offset + it.get("_slot", i)) for i, it in enumerate(items)]
    negs = [negation_clause(n, abbr, offset + LABEL_INDEX[n]) for n in negated]
    body = clauses + negs
    if order is not None:
        body = [body[i] for i in order]
    head = [normal_clause(abbr, offset)] if normal else []
    if style == "structured":
        findings = ". ".join(body or ["Lungs are well inflated"]) + "."
        # The impression restates the acute (non-incidental) items in a second phrasing.
        acute = [
            _clause(it, False, offset + it.get("_slot", i) + 1)
            for i, it in enumerate(items)
            if it["kind"] not in INCIDENTAL_KINDS
        ]
        impression = ". ".join(head + acute) + "." if (head or acute) else "Stable chest."
        tech = f"TECHNIQUE: {TECHNIQUES[technique][0]}.\n" if technique else ""
        return f"{tech}FINDINGS: {findings}\nIMPRESSION: {impression}", findings, impression
    if style == "impression_only":
        lines = head + body
        impression = " ".join(f"{i + 1}. {c}." for i, c in enumerate(lines))
        return f"IMPRESSION: {impression}", "", impression
    if style == "abbreviated":
        sep = ("; ", ". ")[offset % 2]
        text = sep.join(head + body)
        if technique:
            text = f"{TECHNIQUES[technique][1]}: {text}"
        return text, "", text
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
