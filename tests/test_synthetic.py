"""The synthetic cohort: determinism, cache, labels vs. report text, error variants, splits,
patient anatomy, prevalence, external cohort.

Report text is checked with the small regex parser below, written independently of the
generator's templates (never by re-calling the generator's own writers).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from cxr_relink.datamodules.synthetic import cohort as synthetic
from cxr_relink.datamodules.records import CHEXPERT_LABELS, LABEL_INDEX
from cxr_relink.datamodules.synthetic.cohort import SyntheticReader

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"
SMALL = dict(num_patients=40, seed=7, image_size=64)


class Cohort(list):
    """A list of studies whose repr never shows report text (pytest prints fixture values)."""

    def __repr__(self) -> str:
        return f"<{len(self)} synthetic studies>"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth_cache")


@pytest.fixture(scope="module")
def studies(cache):
    return Cohort(SyntheticReader(**SMALL, cache_dir=cache).load())


@pytest.fixture(scope="module")
def big():
    """A larger low-resolution cohort for rates and anatomy statistics (in memory)."""
    return Cohort(SyntheticReader(num_patients=400, seed=11, image_size=64).load())


# ------------------------------------------------------------------------------ text parser
HEDGE = re.compile(
    r"\bpossible\b|\bpossibly\b|cannot be excluded|cannot exclude|\bquestionable\b|\bborderline\b|\?|may represent|\bsuspected\b"
)
NEGATION = re.compile(r"^\s*(no|without)\b|\bno\b|\bnormal\b|\bnl\b|\bclear\b|\bnegative for\b")
MENTION = {
    "Pleural Effusion": r"\beffusions?\b|\beff\b",
    "Pneumothorax": r"pneumothorax|\bptx\b",
    "Consolidation": r"consolidation|\bconsol\b",
    "Pneumonia": r"pneumonia|\bpna\b",
    "Edema": r"\bedema\b",
    "Atelectasis": r"atelectasis|\batx\b",
    "Cardiomegaly": r"cardiomeg|heart is \w+ly enlarged|heart size is \w+ enlarged",
    "Enlarged Cardiomediastinum": r"widened mediastinum|mediastinum is widened|widening of the mediastinum|mediastinal widening|wide mediast",
    "Lung Lesion": r"\bnodules?\b|\bnod\b|\bmass\b",
    "Lung Opacity": r"opacit|\bopac\b|consolidation|\bconsol\b|\bedema\b|atelectasis|\batx\b|pneumonia|\bpna\b",
    "Pleural Other": r"pleural thickening|pl thickening",
    "Fracture": r"fracture|\bfx\b",
    "Support Devices": r"\btube\b|\bett\b|\bngt\b|catheter|central line|\bcvc\b|\bpicc\b|pacemaker|\bppm\b|sternotomy|\bdrain\b",
}
MENTION = {k: re.compile(v) for k, v in MENTION.items()}
NORMAL = re.compile(r"no acute cardiopulmonary|\bnacpp\b|no acute cp process|normal chest radiograph|\bnl cxr\b")
# What a negation of each label may look like (beyond negating the mention itself).
NEG_MENTION = {
    "Cardiomegaly": re.compile(r"heart size"),
    "Enlarged Cardiomediastinum": re.compile(r"mediast"),
    "Lung Opacity": re.compile(r"lungs (are )?clear"),
    "Lung Lesion": re.compile(r"nodule"),
}


def clauses(text: str) -> list[str]:
    text = re.sub(r"\b(TECHNIQUE|FINDINGS|IMPRESSION):", ".", text)
    parts = re.split(r"[.;:\n]", text.lower())
    return [p.strip() for p in parts if re.search(r"[a-z?]", p)]


def polarity(cl: str) -> str:
    if HEDGE.search(cl):
        return "unc"
    if NEGATION.search(cl):
        return "neg"
    return "pos"


def label_evidence(text: str) -> dict[str, set[str]]:
    """Per label, the polarities of the clauses that mention it."""
    ev: dict[str, set[str]] = defaultdict(set)
    for cl in clauses(text):
        pol = polarity(cl)
        for name, rx in MENTION.items():
            if rx.search(cl):
                ev[name].add(pol)
        for name, rx in NEG_MENTION.items():
            if rx.search(cl) and pol == "neg":
                ev[name].add("neg")
        if NORMAL.search(cl):
            ev["No Finding"].add("pos")
    return ev


def all_texts(st) -> list[str]:
    return [st.report] + [v["text"] for v in st.extras["variants"]]


# ------------------------------------------------------------------------------ determinism / cache
def test_determinism_same_params_identical_bytes(tmp_path, cache, studies):
    SyntheticReader(**SMALL, cache_dir=tmp_path / "b").load()
    a = next(cache.glob("synthcxr-*"))
    b = next((tmp_path / "b").glob("synthcxr-*"))
    assert a.name == b.name
    for f in ("images.npy", "studies.jsonl"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    other = SyntheticReader(**{**SMALL, "seed": 8}, cache_dir=tmp_path / "c")
    other.load()
    c = other.cache_path
    assert c.name != a.name
    assert (c / "images.npy").read_bytes() != (a / "images.npy").read_bytes()
    assert (c / "studies.jsonl").read_bytes() != (a / "studies.jsonl").read_bytes()


def test_output_independent_of_chunking_and_workers(tmp_path, cache, studies, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_PATIENTS", 16)  # 3 chunks, generated by 2 processes
    r = SyntheticReader(**SMALL, cache_dir=tmp_path, workers=2)
    r.load()
    a = next(cache.glob("synthcxr-*"))
    for f in ("images.npy", "studies.jsonl"):
        assert (r.cache_path / f).read_bytes() == (a / f).read_bytes(), f


def test_cache_reused_not_regenerated(cache, studies, monkeypatch):
    path = SyntheticReader(**SMALL, cache_dir=cache).cache_path
    mtimes = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}

    def boom(*a, **k):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(synthetic, "_generate", boom)
    again = SyntheticReader(**SMALL, cache_dir=cache).load()
    assert [s.study_id for s in again] == [s.study_id for s in studies]
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == mtimes
    # images are lazy views of the memory-mapped file, not copies
    img = again[0].images[0]
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == (64, 64)
    assert isinstance(img, np.memmap) or isinstance(img.base, np.memmap)
    # no temporary folders left behind; meta records the parameters and counts
    assert not [p for p in cache.iterdir() if "tmp" in p.name]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["params"]["num_patients"] == 40 and meta["counts"]["studies"] == len(studies)
    assert meta["version"] == synthetic.GENERATOR_VERSION


def test_cache_never_overwrites_foreign_folder(tmp_path):
    r = SyntheticReader(**SMALL, cache_dir=tmp_path)
    r.cache_path.mkdir(parents=True)
    (r.cache_path / "something.txt").write_text("x")
    with pytest.raises(ValueError, match="meta.json"):
        r.load()
    assert (r.cache_path / "something.txt").read_text() == "x"
    # a folder whose meta.json describes other parameters is refused, not overwritten
    (r.cache_path / "meta.json").write_text(json.dumps({"params": {"seed": 123}, "version": "0"}))
    with pytest.raises(ValueError, match="different cohort"):
        r.load()
    assert (r.cache_path / "something.txt").read_text() == "x"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_patients=0), "num_patients"),
        (dict(seed=-1), "seed"),
        (dict(image_size=16), "image_size"),
        (dict(style_mix={"verbose": 1.0}), "style_mix"),
        (dict(style_mix={"structured": -1.0}), "style_mix"),
        (dict(train_style_mix={"structured": 0.0}), "train_style_mix"),
        (dict(split_fractions=(0.5, 0.5, 0.5)), "split_fractions"),
        (dict(noise_sd=-0.1), "noise_sd"),
        (dict(ap_fraction=1.5), "ap_fraction"),
        (dict(max_views_per_study=0), "max_views_per_study"),
        (dict(lateral_fraction=2), "lateral_fraction"),
        (dict(cohort="a/b"), "cohort"),
    ],
)
def test_bad_parameters_raise_clear_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticReader(**{**SMALL, **kwargs})


# ------------------------------------------------------------------------------ schema
def test_study_schema(studies):
    # Assertions below only ever show ids and booleans: never report text on failure.
    assert len(studies) >= 40
    for st in studies:
        sid, style, views = st.study_id, st.extras["style"], list(st.views)
        assert st.source == f"synthcxr/{style}", sid
        assert len(st.images) == len(views) >= 1, sid
        assert set(views) <= {"PA", "AP", "LATERAL"} and views[0] in ("PA", "AP"), sid
        if style == "structured":
            ok = bool(st.findings) and bool(st.impression) and "FINDINGS:" in st.report
        else:
            ok = st.findings == "" and bool(st.impression)
        assert ok, sid
        low = st.report.lower()
        says_lateral = re.search(r"\blateral views\b|\bpa/lat\b", low) is not None
        says_portable = re.search(r"\bportable ap\b|\bport ap\b", low) is not None
        assert not says_lateral or "LATERAL" in views, sid  # a stated technique matches the views
        assert not says_portable or views[0] == "AP", sid
        assert len(st.extras["variants"]) == 4, sid
        errors = {v["error"] for v in st.extras["error_variants"]}
        assert errors <= {"severity", "side", "zone", "false_finding", "false_negation"}, sid
        json.dumps(st.extras)
        assert st.labels.dtype == np.float32


# ------------------------------------------------------------------------------ labels vs text
def check_labels_against_text(labels: np.ndarray, text: str) -> list[str]:
    ev = label_evidence(text)
    problems = []
    for i, name in enumerate(CHEXPERT_LABELS):
        v, pols = labels[i], ev.get(name, set())
        if v == 1 and "pos" not in pols:
            problems.append(f"{name}=1 not affirmed")
        elif v == -1 and ("unc" not in pols or "pos" in pols):
            problems.append(f"{name}=-1 without hedge (or affirmed)")
        elif v == 0 and "pos" in pols:
            problems.append(f"{name}=0 asserted present")
        elif math.isnan(v) and name != "No Finding" and pols & {"pos", "unc"}:
            problems.append(f"{name} blank but mentioned")
    return problems


def test_every_label_matches_every_style_and_variant(studies):
    n_checked = Counter()
    for st in studies:
        for text in all_texts(st):
            problems = check_labels_against_text(st.labels, text)
            assert not problems, (st.study_id, problems)  # ids and label names only, never text
        for v in st.extras["variants"]:
            n_checked[v["style"]] += 1
        # negative labels come from an explicit negation in the report
        ev = label_evidence(st.report)
        for i, name in enumerate(CHEXPERT_LABELS):
            if st.labels[i] == 0:
                assert "neg" in ev.get(name, set()), (st.study_id, name)
    assert set(n_checked) == {"structured", "impression_only", "abbreviated"}


@pytest.mark.slow
def test_uncertain_and_negative_labels_occur(big):
    lab = np.stack([s.labels for s in big])
    assert (lab == -1).any(axis=0).sum() >= 8  # hedged mentions across many observations
    assert (lab == 0).any(axis=0).sum() >= 8
    assert np.isnan(lab).mean() > 0.4  # unmentioned stays blank, as in CheXpert


# ------------------------------------------------------------------------------ error variants
SIDE_RX = re.compile(r"\b(left|right|bilateral|bibasilar|l|r|bilat)\b")
ZONE_CODE = re.compile(r"\b([rl])([uml])z\b")
ZONE_RX = re.compile(r"\b(upper|mid|lower)\b")
SEV_RX = re.compile(r"\b(small|moderate|large|mild|severe|marked|sm|mod|lg|sev|mildly|moderately|markedly)\b")
SEV_CANON = {
    "sm": "small",
    "mod": "moderate",
    "lg": "large",
    "sev": "severe",
    "mildly": "mild",
    "moderately": "moderate",
    "markedly": "marked",
}
FINDING_ORDER = [
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Edema",
    "Cardiomegaly",
    "Enlarged Cardiomediastinum",
    "Lung Lesion",
    "Fracture",
    "Support Devices",
    "Lung Opacity",
]


def parse_clause(cl: str) -> tuple:
    finding = next((n for n in FINDING_ORDER if MENTION[n].search(cl)), None)
    if finding is None and NORMAL.search(cl):
        finding = "No Finding"
    if finding is None and re.search(r"granuloma", cl):
        finding = "granuloma"
    side = zone = None
    m = ZONE_CODE.search(cl)
    if m:
        side, zone = {"r": "right", "l": "left"}[m.group(1)], {"u": "upper", "m": "mid", "l": "lower"}[m.group(2)]
    m = SIDE_RX.search(cl)
    if m and side is None:
        side = {"l": "left", "r": "right", "bilat": "bilateral", "bibasilar": "bilateral"}.get(m.group(1), m.group(1))
        if m.group(1) == "bibasilar":
            zone = "lower"
    m = ZONE_RX.search(cl)
    if m and zone is None:
        zone = m.group(1)
    m = SEV_RX.search(cl)
    sev = SEV_CANON.get(m.group(1), m.group(1)) if m else None
    return finding, side, zone, sev, polarity(cl)


def diff(a: str, b: str) -> tuple[list[tuple], list[tuple]]:
    ca, cb = Counter(clauses(a)), Counter(clauses(b))
    removed = [parse_clause(c) for c in (ca - cb).elements()]
    added = [parse_clause(c) for c in (cb - ca).elements()]
    return removed, added


def _only_attr_changed(removed, added, attr: int) -> bool:
    if not removed or len(removed) != len(added):
        return False
    key = lambda t: t[:attr] + t[attr + 1 :]  # noqa: E731
    if sorted(map(key, removed), key=str) != sorted(map(key, added), key=str):
        return False
    return {t[attr] for t in removed}.isdisjoint({t[attr] for t in added}) and len({t[0] for t in removed}) == 1


def test_error_variants_change_exactly_one_attribute(studies):
    seen = Counter()
    for st in studies:
        for ev in st.extras["error_variants"]:
            err = ev["error"]
            seen[err] += 1
            removed, added = diff(st.report, ev["text"])
            where = (st.study_id, err)
            if err == "severity":
                assert _only_attr_changed(removed, added, 3), where
            elif err == "side":
                assert _only_attr_changed(removed, added, 1), where
            elif err == "zone":
                assert _only_attr_changed(removed, added, 2), where
            elif err == "false_finding":
                assert added and len({t[0] for t in added}) == 1 and all(t[4] == "pos" for t in added), where
                finding = added[0][0]
                assert st.labels[LABEL_INDEX[finding]] not in (1.0, -1.0), where
                # only a negation, the normal statement or a finding-free filler may have been displaced
                assert all(t[4] == "neg" or t[0] in ("No Finding", None) for t in removed), where
            elif err == "false_negation":
                assert removed and len({t[0] for t in removed}) == 1 and all(t[4] == "pos" for t in removed), where
                assert added and all(t[4] == "neg" for t in added), where
                assert st.labels[LABEL_INDEX[removed[0][0]]] == 1.0, where
            # the error variant is in the study's own style, so it is a hard negative
            labels = np.array([np.nan if v is None else v for v in ev["labels"]], dtype=np.float32)
            same = np.array_equal(labels, st.labels, equal_nan=True)
            assert same == (err in ("severity", "side", "zone")), where
    assert set(seen) == {"severity", "side", "zone", "false_finding", "false_negation"}


# ------------------------------------------------------------------------------ splits / patients
def test_splits_are_by_patient(studies, big):
    for cohort in (studies, big):
        by_split = defaultdict(set)
        for st in cohort:
            by_split[st.split].add(st.patient_id)
        assert set(by_split) == {"train", "val", "test"}
        assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
        assert not (by_split["val"] & by_split["test"])
    n = {k: len(v) for k, v in by_split.items()}  # big cohort: 400 patients, 0.7 / 0.1 / 0.2
    assert n == {"train": 280, "val": 40, "test": 80}


def test_patients_have_one_to_six_studies(big):
    per = Counter(st.patient_id for st in big)
    assert min(per.values()) >= 1 and max(per.values()) <= 6
    assert sum(v > 1 for v in per.values()) > 0.4 * len(per)


def thorax_width_px(img: np.ndarray) -> float:
    """Outer lung-edge to lung-edge width measured on the image: in a band of rows through
    the upper-mid lungs, the span of dark (aerated) columns inside the body outline."""
    h = img.shape[0]
    prof = img[int(0.30 * h) : int(0.40 * h)].astype(np.float32).mean(0)
    body = np.flatnonzero(prof > 0.5 * np.percentile(prof, 75))  # robust to bright devices
    lo, hi = body[0], body[-1]
    inside = prof[lo : hi + 1]
    wall = np.median(np.concatenate([inside[2:5], inside[-5:-2]]))  # lateral chest-wall soft tissue
    thr = 0.5 * (wall + np.percentile(inside, 10))
    wall_px = np.flatnonzero(inside >= thr)  # skip the body outline's ramp on either side
    dark = np.flatnonzero(inside[wall_px[0] : wall_px[-1] + 1] < thr)
    return float(dark[-1] - dark[0] + 1)


def test_patient_traits_stable_and_visible(big):
    traits = defaultdict(list)
    widths = defaultdict(list)
    for st in big:
        traits[st.patient_id].append(json.dumps(st.extras["patient_traits"], sort_keys=True))
        for img, view in zip(st.images, st.views):
            if view in ("PA", "AP"):  # frontal views
                widths[st.patient_id].append(thorax_width_px(np.asarray(img)))
    assert all(len(set(v)) == 1 for v in traits.values())  # recorded traits identical across studies
    tw = {p: json.loads(v[0])["thorax_half_width"] for p, v in traits.items()}
    pids = sorted(widths)
    meas = np.array([np.median(widths[p]) for p in pids])
    true = np.array([tw[p] for p in pids])
    assert np.corrcoef(meas, true)[0, 1] > 0.8  # the measured thorax tracks the patient trait
    # within-patient spread of the measurement (acquisition: zoom, shift, rotation) is small
    # next to the spread between patients (robust statistics: a rare mis-measurement is fine)
    within = np.median([np.std(widths[p]) for p in pids if len(widths[p]) > 1])
    assert within < 0.4 * np.std(meas)


def test_findings_are_drawn_on_their_side(big):
    """Unilateral moderate/large effusions: the stated side's lung base is denser."""
    diffs = []
    for st in big:
        f = st.extras["attributes"]["findings"]
        eff = [x for x in f if x["kind"] == "effusion" and x["size"] != "small" and x["certainty"] == "present"]
        if len(eff) != 1 or eff[0]["side"] == "bilateral":
            continue
        img = np.asarray(st.images[0]).astype(np.float32)
        h, w = img.shape
        band = img[int(0.50 * h) : int(0.62 * h)]
        right_patient, left_patient = (
            band[:, int(0.15 * w) : int(0.35 * w)].mean(),
            band[:, int(0.65 * w) : int(0.85 * w)].mean(),
        )
        d = (right_patient - left_patient) * (1 if eff[0]["side"] == "right" else -1)
        diffs.append(d)
    assert len(diffs) >= 5
    assert np.mean(np.array(diffs) > 0) >= 0.8


# ------------------------------------------------------------------------------ prevalence
def test_prevalence_and_co_occurrence(big):
    lab = np.stack([s.labels for s in big])
    pos = lambda name: lab[:, LABEL_INDEX[name]] == 1  # noqa: E731
    nf = pos("No Finding")
    assert not ((lab[nf][:, 1:] == 1) | (lab[nf][:, 1:] == -1)).any()  # No Finding is exclusive
    rate = {n: pos(n).mean() for n in CHEXPERT_LABELS}
    bounds = {
        "No Finding": (0.2, 0.55),
        "Support Devices": (0.1, 0.5),
        "Pleural Effusion": (0.06, 0.35),
        "Lung Opacity": (0.12, 0.45),
        "Cardiomegaly": (0.04, 0.25),
        "Edema": (0.04, 0.25),
        "Atelectasis": (0.05, 0.3),
        "Pneumothorax": (0.005, 0.1),
        "Pleural Other": (0.0, 0.05),
        "Fracture": (0.0, 0.1),
        "Lung Lesion": (0.005, 0.1),
        "Enlarged Cardiomediastinum": (0.0, 0.08),
    }
    for n, (lo, hi) in bounds.items():
        assert lo <= rate[n] <= hi, (n, rate[n])
    # Lung Opacity is the parent of consolidation / edema / atelectasis / pneumonia
    for child in ("Consolidation", "Edema", "Atelectasis", "Pneumonia"):
        assert (lab[pos(child), LABEL_INDEX["Lung Opacity"]] == 1).all()
    # effusion goes with edema and cardiomegaly; pneumonia with consolidation
    eff = pos("Pleural Effusion")
    assert eff[pos("Edema")].mean() > 2 * eff[~pos("Edema")].mean()
    assert eff[pos("Cardiomegaly")].mean() > 1.5 * eff[~pos("Cardiomegaly")].mean()
    mentioned_pna = lab[:, LABEL_INDEX["Pneumonia"]] != 0
    mentioned_pna &= ~np.isnan(lab[:, LABEL_INDEX["Pneumonia"]])
    assert mentioned_pna[pos("Consolidation")].mean() > 3 * mentioned_pna[~pos("Consolidation")].mean()
    # support devices are much more common on AP (portable) studies
    ap = np.array([s.views[0] == "AP" for s in big])
    sd = pos("Support Devices")
    assert sd[ap].mean() > 2 * sd[~ap].mean()


# ------------------------------------------------------------------------------ style mixes / external
def _compose_data(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_external_cohort_config_differs(tmp_path):
    from hydra.utils import instantiate

    out = {}
    for name in ("synthcxr", "synthcxr_external"):
        cfg = _compose_data(name, [f"reader.cache_dir={tmp_path}", "reader.num_patients=150", "image_size=32"])
        reader = instantiate(cfg.reader)
        assert isinstance(reader, SyntheticReader)
        sts = reader.load()
        styles = Counter(s.extras["style"] for s in sts)
        out[name] = dict(
            cohort=reader.params.cohort,
            seed=reader.params.seed,
            terse=(styles["abbreviated"] + styles["impression_only"]) / len(sts),
            ap=np.mean([s.views[0] == "AP" for s in sts]),
            source=sts[0].source.split("/")[0],
        )
    a, b = out["synthcxr"], out["synthcxr_external"]
    assert a["seed"] != b["seed"] and b["cohort"] == b["source"] == "synthcxr_external"
    assert b["terse"] > a["terse"] + 0.2
    assert b["ap"] > a["ap"]


def test_train_style_mix_applies_to_train_only():
    sts = SyntheticReader(
        num_patients=60,
        seed=3,
        image_size=32,
        style_mix={"structured": 1.0},
        train_style_mix={"abbreviated": 1.0},
        num_variants=0,
    ).load()
    for st in sts:
        assert st.extras["style"] == ("abbreviated" if st.split == "train" else "structured")
        assert st.extras["variants"] == []


def test_pathology_matched_studies_differ_in_instance_detail(big):
    """Hard negatives (same 14-label vector) stay separable: most abnormal studies differ from
    every label-matched study in side, zone, size, device or tip position, count or location."""
    groups = defaultdict(Counter)
    keys = []
    for st in big:
        if st.labels[LABEL_INDEX["No Finding"]] == 1:
            continue
        lab = tuple(np.nan_to_num(st.labels, nan=9.0).tolist())
        detail = json.dumps(sorted(json.dumps(f, sort_keys=True) for f in st.extras["attributes"]["findings"]))
        groups[lab][detail] += 1
        keys.append((lab, detail))
    shared = np.mean([groups[lab][detail] > 1 for lab, detail in keys])
    assert len(keys) > 300 and shared < 0.25
