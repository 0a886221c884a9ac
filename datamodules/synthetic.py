"""The embedded synthetic chest X-ray cohort: patients, studies, images, reports and labels.

`SyntheticReader(num_patients, seed, ...)` generates a cohort deterministically from its
parameters (same parameters -> byte-identical files) and caches it on disk under
``cache_dir/<cohort>-<hash of parameters and GENERATOR_VERSION>/``:

- ``images.npy``   uint8 [num_images, H, W], memory-mapped on load (Study.images are lazy views);
- ``studies.jsonl`` one study per line (ids, image indices, views, report sections, labels with
  null for blank, split, source, extras);
- ``meta.json``    parameters, counts, version.

What the cohort carries, and why (the papers' findings rest on it):
- patients with 1-6 studies and a stable anatomy (thorax width, cardiothoracic ratio, rib
  spacing, rotation tendency, build) visible in every study, plus persistent incidentals
  (granuloma, clips, old rib fracture, sternotomy wires, nodules, pacemaker);
- the 14 CheXpert observations from a small latent-state model (ICU stay, heart failure,
  infection) so prevalence and co-occurrence are realistic rather than independent;
- instance-level detail (side, zone, size, device type and tip position, nodule count and
  location) drawn in the image *and* stated in the report, so image->report re-linkage is
  possible from instance detail, and pathology-matched hard negatives stay separable;
- one to `max_views_per_study` images per study: PA or portable AP frontals, and laterals
  (a separate lateral rendering of the same anatomy and findings), each with its own
  acquisition (rotation, zoom, shift, exposure, noise);
- reports in three institutional styles with clinically equivalent variants and one-error
  variants; hedged mentions give -1, negated mentions 0, unmentioned blank (NaN);
- splits by patient; `test_patients` extra patients (own random stream, ids after the others)
  enlarge the test split without changing a byte of the train and val studies.

Study.extras: "style", "attributes" (the structured findings the report states, negations,
projection, ICU state, cardiothoracic ratio, drawn-but-unmentioned incidentals),
"acquisition" (per view), "patient_traits", "variants" [{"style", "kind", "text"}] and
"error_variants" [{"error", "text", "labels", "changed"}].

Layout: the parameters (CohortParams, GENERATOR_VERSION) in synthetic_params.py, sampling in
synthetic_sampling.py, report writing in synthetic_reports.py, rendering
in synthetic_render.py. Readers never print report text or images.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cxr_relink.datamodules.records import CHEXPERT_LABELS, SPLITS, Study
from cxr_relink.datamodules import synthetic_reports as rep
from cxr_relink.datamodules.synthetic_params import GENERATOR_VERSION, CohortParams
from cxr_relink.datamodules.synthetic_sampling import (
    LABEL_PROFILES,
    labels_json,
    make_error_variants,
    make_variants,
    public_items,
    sample_patient,
)
from cxr_relink.datamodules.synthetic_render import (
    Geometry,
    draw_study,
    draw_study_lateral,
    render_bases,
    render_lateral_bases,
    render_views,
)

DEFAULT_STYLE_MIX = {"structured": 0.6, "impression_only": 0.25, "abbreviated": 0.15}


def _check_mix(name: str, mix: Mapping[str, float] | None) -> tuple[tuple[str, float], ...]:
    if not isinstance(mix, Mapping) or not mix:
        raise ValueError(f"{name} must be a non-empty mapping {{style: weight}} over {rep.STYLES}, got {mix!r}")
    unknown = sorted(set(mix) - set(rep.STYLES))
    if unknown:
        raise ValueError(f"{name} has unknown styles {unknown}; expected keys from {rep.STYLES}")
    w = {k: float(v) for k, v in mix.items()}
    if any(not math.isfinite(v) or v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"{name} weights must be finite, >= 0 and not all zero, got {dict(mix)}")
    tot = sum(w.values())
    return tuple((s, round(w.get(s, 0.0) / tot, 6)) for s in rep.STYLES)


def _check_num(name: str, v: Any, lo: float, hi: float, integer: bool = False) -> Any:
    ok_type = (
        isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        if integer
        else isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
    )
    if not ok_type or not (lo <= v <= hi) or (not integer and not math.isfinite(float(v))):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} in [{lo}, {hi}], got {v!r}")
    return int(v) if integer else float(v)


class SyntheticReader:
    """Reader for the synthetic cohort (Hydra: ``_target_: cxr_relink.datamodules.synthetic.SyntheticReader``).

    Args:
        num_patients: patients to generate (each has 1-6 studies, ~2.6 on average: 1,200 -> 3,086).
        seed: generation seed; the same parameters give byte-identical files.
        image_size: side of the square images in pixels (default 128).
        cohort: cohort name; the study source is ``f"{cohort}/{style}"``.
        style_mix: report style weights over structured / impression_only / abbreviated.
        train_style_mix: optional different style weights for training-split patients only.
        exposure_mean, exposure_sd: exposure factor per view (1 nominal; >1 over-exposed).
        noise_sd: image noise sd as a fraction of full scale (AP portable views get 1.4x).
        ap_fraction: probability of an AP (portable) projection for non-ICU studies; ICU
            studies are always AP.
        icu_fraction: mean per-patient propensity of a study being an ICU study (drives
            devices, atelectasis, edema, effusion, pneumothorax).
        rotation_sd_deg: per-view rotation sd around the patient's own rotation tendency.
        multi_view_fraction: probability that a study has more than one view.
        lateral_fraction: probability that an extra view of a PA study is a lateral (the
            others, and every extra view of an AP study, are repeat frontal acquisitions).
        max_views_per_study: cap on views (images) per study.
        num_variants: clinically equivalent report variants per study (extras["variants"]).
        split_fractions: (train, val, test) fractions of *patients* (of ``num_patients``).
        test_patients: extra patients generated for the test split only (None or 0: none), on
            top of the ``split_fractions`` share of ``num_patients``. They come from their own
            random stream and take the patient ids after ``num_patients``, so the train and val
            studies are byte-identical with or without them; sizes the test split (and so the
            retrieval pools) independently of training.
        label_profile: how the 14 labels are generated. ``legacy`` (default): findings drawn
            from a latent clinical-state model and labels read off them (Lung Opacity a
            deterministic parent, No Finding excludes devices). ``chexpert`` / ``mimic``: label
            vectors sampled from a model fitted to real CheXpert labeler statistics (MIMIC-CXR
            prevalences for ``mimic``), then written into the report and image; see
            docs/cohorts.md, "Label profiles".
        cache_dir: where to cache the generated cohort; None generates in memory every time.
        workers: generation processes (output is identical for any value; not part of the
            cache key).
    """

    def __init__(
        self,
        num_patients: int = 2000,
        seed: int = 0,
        image_size: int = 128,
        cohort: str = "synthcxr",
        style_mix: Mapping[str, float] | None = None,
        train_style_mix: Mapping[str, float] | None = None,
        exposure_mean: float = 1.0,
        exposure_sd: float = 0.08,
        noise_sd: float = 0.02,
        ap_fraction: float = 0.2,
        icu_fraction: float = 0.25,
        rotation_sd_deg: float = 2.0,
        multi_view_fraction: float = 0.5,
        lateral_fraction: float = 0.7,
        max_views_per_study: int = 2,
        num_variants: int = 4,
        split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
        label_profile: str = "legacy",
        test_patients: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        workers: int = 1,
    ) -> None:
        if not isinstance(cohort, str) or not cohort or not all(c.isalnum() or c in "_-." for c in cohort):
            raise ValueError(f"cohort must be a non-empty name of letters, digits, '_', '-' or '.', got {cohort!r}")
        try:
            fr = tuple(float(f) for f in split_fractions)
        except (TypeError, ValueError):
            raise ValueError(
                f"split_fractions must be three numbers (train, val, test), got {split_fractions!r}"
            ) from None
        if len(fr) != 3 or any(not math.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(
                f"split_fractions must be three fractions >= 0 summing to 1 (train, val, test), got {split_fractions!r}"
            )
        if label_profile not in LABEL_PROFILES:
            raise ValueError(f"label_profile must be one of {LABEL_PROFILES}, got {label_profile!r}")
        n_test = 0 if test_patients is None else _check_num("test_patients", test_patients, 0, 10_000_000, integer=True)
        self.params = CohortParams(
            num_patients=_check_num("num_patients", num_patients, 1, 10_000_000, integer=True),
            seed=_check_num("seed", seed, 0, 2**63 - 1, integer=True),
            image_size=_check_num("image_size", image_size, 32, 1024, integer=True),
            cohort=cohort,
            style_mix=_check_mix("style_mix", DEFAULT_STYLE_MIX if style_mix is None else style_mix),
            train_style_mix=None if train_style_mix is None else _check_mix("train_style_mix", train_style_mix),
            exposure_mean=_check_num("exposure_mean", exposure_mean, 0.5, 2.0),
            exposure_sd=_check_num("exposure_sd", exposure_sd, 0.0, 0.5),
            noise_sd=_check_num("noise_sd", noise_sd, 0.0, 0.2),
            ap_fraction=_check_num("ap_fraction", ap_fraction, 0.0, 1.0),
            icu_fraction=_check_num("icu_fraction", icu_fraction, 0.0, 0.9),
            rotation_sd_deg=_check_num("rotation_sd_deg", rotation_sd_deg, 0.0, 20.0),
            multi_view_fraction=_check_num("multi_view_fraction", multi_view_fraction, 0.0, 1.0),
            lateral_fraction=_check_num("lateral_fraction", lateral_fraction, 0.0, 1.0),
            max_views_per_study=_check_num("max_views_per_study", max_views_per_study, 1, 4, integer=True),
            num_variants=_check_num("num_variants", num_variants, 0, 16, integer=True),
            split_fractions=fr,
            label_profile=label_profile,
            test_patients=n_test,
        )
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.workers = _check_num("workers", workers, 1, 64, integer=True)

    # ------------------------------------------------------------------ public
    @property
    def cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self.params.cohort}-{self.params.key()}"

    def load(self) -> list[Study]:
        """All studies (every split); generates and caches the cohort on first use."""
        path = self.cache_path
        if path is None:
            with tempfile.TemporaryDirectory(prefix="synthcxr-") as tmp:
                _generate(self.params, Path(tmp), self.workers)
                images = np.load(Path(tmp) / "images.npy")  # in memory: the temp dir goes away
                return _read_studies(Path(tmp) / "studies.jsonl", images)
        if not (path / "meta.json").is_file():
            if path.exists():
                raise ValueError(
                    f"cache folder {path} exists but holds no meta.json (not a complete synthetic cohort); "
                    "remove it or choose another cache_dir"
                )
            self._generate_atomically(path)
        meta = json.loads((path / "meta.json").read_text())
        if (
            meta.get("params") != json.loads(json.dumps(self.params.public()))
            or meta.get("version") != GENERATOR_VERSION
        ):
            raise ValueError(
                f"cache folder {path} holds a different cohort (parameters or version differ); refusing to reuse or overwrite it"
            )
        images = np.load(path / "images.npy", mmap_mode="r")
        return _read_studies(path / "studies.jsonl", images)

    # ------------------------------------------------------------------ cache
    def _generate_atomically(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            _generate(self.params, tmp, self.workers)
            try:
                os.rename(tmp, path)
            except OSError:
                # Another process finished the same cohort first: keep theirs (load() checks it).
                if not (path / "meta.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


# ============================================================================ generation


def _split_of(P: CohortParams) -> list[str]:
    """Split per patient index: the first num_patients by split_fractions, the extra
    test_patients after them all "test"."""
    n = P.num_patients
    perm = np.random.default_rng([P.seed, 0x5B117]).permutation(n)
    n_tr = int(round(P.split_fractions[0] * n))
    n_va = int(round(P.split_fractions[1] * n))
    split = np.empty(n, dtype=object)
    split[perm[:n_tr]] = "train"
    split[perm[n_tr : n_tr + n_va]] = "val"
    split[perm[n_tr + n_va :]] = "test"
    return list(split) + ["test"] * P.test_patients


def _patient_rng(P: CohortParams, pidx: int) -> np.random.Generator:
    """The patient's own generator: stream 1 for the num_patients split by fraction, stream 2
    (indexed from 0) for the extra test patients, so adding them changes no other patient."""
    if pidx < P.num_patients:
        return np.random.default_rng([P.seed, 1, pidx])
    return np.random.default_rng([P.seed, 2, pidx - P.num_patients])


PUBLIC_TRAITS = (
    "sex",
    "age",
    "habitus",
    "thorax_half_width",
    "ap_half_depth",
    "soft_tissue_margin",
    "ctr_baseline",
    "rib_spacing",
    "rotation_tendency_deg",
    "apex_y",
    "diaphragm_y",
)


CHUNK_PATIENTS = 128
_NPY_HEADER_BYTES = 128  # fixed-size .npy header, rewritten with the final shape at the end


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A version-1.0 .npy header for a C-ordered uint8 array, padded to a fixed size."""
    d = "{'descr': '|u1', 'fortran_order': False, 'shape': (%s), }" % "".join(f"{n}, " for n in shape).rstrip(" ")
    pad = _NPY_HEADER_BYTES - 10 - len(d) - 1
    if pad < 0:
        raise ValueError(f"image array shape {shape} too large for the .npy header")
    body = (d + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


_GEO: dict[tuple[int, int], Geometry] = {}


def _geometry(P: CohortParams) -> Geometry:
    key = (P.image_size, P.seed)
    if key not in _GEO:
        _GEO.clear()
        _GEO[key] = Geometry(P.image_size, P.seed)
    return _GEO[key]


def _generate_chunk(
    args: tuple[CohortParams, list[str], int, int],
) -> tuple[np.ndarray, list[tuple[int, str, str, str]]]:
    """Patients [p0, p1): images uint8 [V,H,W] and per study (n_views, split, style, JSON line
    without its "images" key). Depends only on (params, patient index): chunking and worker
    count never change the output."""
    P, splits, p0, p1 = args
    geo = _geometry(P)
    patients, per_patient, rngs = [], [], []
    for pidx in range(p0, p1):
        rng = _patient_rng(P, pidx)
        pt, studies = sample_patient(rng, pidx, splits[pidx - p0], P, geo)
        for st in studies:
            for v in st["views"]:  # noise bank offsets
                v["_noise"] = (
                    int(rng.integers(geo.white.shape[0])),
                    int(rng.integers(geo.n - geo.size + 1)),
                    int(rng.integers(geo.n - geo.size + 1)),
                    float(rng.choice((-1.0, 1.0))),
                )
        patients.append(pt)
        per_patient.append(studies)
        rngs.append(rng)  # report variants continue the patient's stream
    # Anatomy in small sub-chunks so the [P,H,W] temporaries stay in cache.
    n = len(patients)
    parts = [render_bases(patients[k : k + 8], geo) for k in range(0, n, 8)]
    bases, lungs, texs = (np.concatenate([p[m] for p in parts]) for m in range(3))
    lat_idx = [j for j in range(n) if any(v["view"] == "LATERAL" for st in per_patient[j] for v in st["views"])]
    lat = {}
    for k in range(0, len(lat_idx), 8):
        sub = lat_idx[k : k + 8]
        lb = render_lateral_bases([patients[j] for j in sub], geo)
        lat.update({j: (lb[0][q], lb[1][q], lb[2][q]) for q, j in enumerate(sub)})
    canvases, views = [], []
    for j in range(n):
        for st in per_patient[j]:
            frontal = lateral = None
            for v in st["views"]:
                if v["view"] == "LATERAL":
                    if lateral is None:
                        canvases.append(draw_study_lateral(*lat[j], patients[j], st, geo))
                        lateral = len(canvases) - 1
                    v["_canvas"] = lateral
                else:
                    if frontal is None:
                        canvases.append(draw_study(bases[j], lungs[j], texs[j], patients[j], st, geo))
                        frontal = len(canvases) - 1
                    v["_canvas"] = frontal
                views.append(v)
    imgs = render_views(np.stack(canvases), views, geo)
    lines = []
    for j in range(n):
        split = splits[j]
        for st in per_patient[j]:
            line = _study_line(st, patients[j], split, P, rngs[j])
            lines.append((len(st["views"]), split, st["style"], json.dumps(line, separators=(",", ":"))))
    return imgs, lines


def _generate(P: CohortParams, out: Path, workers: int = 1) -> dict:
    """Write images.npy, studies.jsonl and meta.json for cohort P into the folder `out`.

    Streams chunk by chunk (memory does not grow with num_patients); images go to a raw file
    behind a fixed-size .npy header that is rewritten with the final count at the end.
    """
    t0 = time.perf_counter()
    splits = _split_of(P)
    S = P.image_size
    jobs = [
        (P, splits[c0 : c0 + CHUNK_PATIENTS], c0, min(P.total_patients, c0 + CHUNK_PATIENTS))
        for c0 in range(0, P.total_patients, CHUNK_PATIENTS)
    ]
    n_img = n_studies = 0
    counts = {s: {"patients": 0, "studies": 0, "images": 0} for s in SPLITS}
    style_counts = {s: 0 for s in rep.STYLES}
    for s in splits:
        counts[s]["patients"] += 1
    pool = None
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(min(workers, len(jobs)))
    try:
        results = pool.imap(_generate_chunk, jobs) if pool is not None else map(_generate_chunk, jobs)
        with open(out / "images.npy", "wb") as fi, open(out / "studies.jsonl", "w", encoding="utf-8") as fh:
            fi.write(_npy_header((0, S, S)))
            for imgs, lines in results:
                fi.write(np.ascontiguousarray(imgs, dtype=np.uint8).tobytes())
                for nv, split, style, body in lines:
                    fh.write(
                        '{"images":[' + ",".join(str(i) for i in range(n_img, n_img + nv)) + "]," + body[1:] + "\n"
                    )
                    n_img += nv
                    n_studies += 1
                    counts[split]["studies"] += 1
                    counts[split]["images"] += nv
                    style_counts[style] += 1
            fi.seek(0)
            fi.write(_npy_header((n_img, S, S)))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    meta = {
        "version": GENERATOR_VERSION,
        "params": P.public(),
        "counts": {
            "patients": P.total_patients,
            "studies": n_studies,
            "images": n_img,
            "by_split": counts,
            "by_style": style_counts,
        },
        "labels": list(CHEXPERT_LABELS),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    # meta.json is written last: its presence marks a complete cohort.
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return meta


def _study_line(st: dict, pt: dict, split: str, P: CohortParams, rng: np.random.Generator) -> dict:
    report, findings, impression = rep.render(
        st["items"], st["negated"], st["normal"], st["style"], st["offset"], technique=st["technique"]
    )
    labels = rep.labels_for(st["items"], st["negated"], st["normal"], hierarchy=st.get("hierarchy", True))
    extras = {
        "style": st["style"],
        "attributes": {
            "findings": public_items(st["items"]),
            "negated": list(st["negated"]),
            "normal": st["normal"],
            "icu": st["icu"],
            "projection": st["projection"],
            "cardiothoracic_ratio": st["ctr"],
            "unmentioned": public_items(st["unmentioned"]),
        },
        "acquisition": [{k: v for k, v in view.items() if not k.startswith("_")} for view in st["views"]],
        "patient_traits": {k: pt[k] for k in PUBLIC_TRAITS},
        "variants": make_variants(rng, st, P.num_variants, report),
        "error_variants": make_error_variants(rng, st),
    }
    return {
        "study_id": st["study_id"],
        "patient_id": pt["patient_id"],
        "views": [v["view"] for v in st["views"]],
        "report": report,
        "findings": findings,
        "impression": impression,
        "labels": labels_json(labels),
        "split": split,
        "source": f"{P.cohort}/{st['style']}",
        "extras": extras,
    }


def _read_studies(path: Path, images: np.ndarray) -> list[Study]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            out.append(
                Study(
                    study_id=d["study_id"],
                    patient_id=d["patient_id"],
                    images=[images[i] for i in d["images"]],
                    report=d["report"],
                    findings=d["findings"],
                    impression=d["impression"],
                    labels=np.array([np.nan if v is None else v for v in d["labels"]], dtype=np.float32),
                    split=d["split"],
                    source=d["source"],
                    views=d["views"],
                    extras=d["extras"],
                )
            )
    return out
