"""Radiograph-like rendering for the synthetic cohort (private helper of datamodules/synthetic/cohort.py).

Coordinates are normalised: x, y in [-1, 1], x to the image right (= the patient's left,
radiological convention), y downwards. Densities are in [0, 1] (1 = bone/metal white).

Cost model (the generator must reach >= 1,000 studies/s on 2 CPU cores at 128^2):
- the patient's anatomy (body, lungs, lung markings, mediastinum, spine, ribs, clavicles,
  diaphragm) is rendered once per patient, vectorised over a chunk of patients;
- a study draws its heart and findings on a copy, each in its own bounding box;
- each view is a nearest-neighbour affine warp (rotation, shift, zoom) of the study canvas,
  followed by an exposure look-up table and additive noise from a pre-drawn bank.
No per-pixel Python anywhere.
"""

from __future__ import annotations

import math

import numpy as np

CM = 0.045  # normalised units per centimetre (a 0.72 half-width thorax is ~32 cm wide)
CARINA_DROP = 0.40  # carina sits this fraction of the apex-to-diaphragm height below the apex


class Geometry:
    """Per-size precomputed grids and noise banks (built once per image size and seed)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
        self.xs = c  # column coordinates
        self.ys = c.copy()  # row coordinates
        self.X = np.broadcast_to(c[None, :], (size, size))
        self.Y = np.broadcast_to(c[:, None], (size, size))
        rng = np.random.default_rng([seed, 0xC0FFEE])
        pad = size // 4
        # Smooth noise (lung markings, consolidation texture): white noise low-passed in Fourier space.
        n = size + 2 * pad
        f = np.fft.fftfreq(n)
        rad = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
        filt = np.exp(-((rad * n / 10.0) ** 2))  # correlation length ~ size/10 px
        fine = np.exp(-((rad * n / 28.0) ** 2)) - filt * 0.5
        self.smooth = []
        for _ in range(4):
            w = rng.standard_normal((n, n))
            a = np.real(np.fft.ifft2(np.fft.fft2(w) * filt))
            b = np.real(np.fft.ifft2(np.fft.fft2(w) * fine))
            a = (a - a.mean()) / a.std()
            b = (b - b.mean()) / b.std()
            self.smooth.append((0.5 * a + 0.5 * b).astype(np.float32))
        self.smooth = np.stack(self.smooth)
        self.white = rng.standard_normal((8, n, n)).astype(np.float32)
        self.pad = pad
        self.n = n
        # Flat row/col index grids for the view warp.
        self.flat_r = np.repeat(np.arange(size), size).reshape(size, size)
        self.levels = np.linspace(0.0, 1.0, 256, dtype=np.float32)

    def px(self, v: float) -> int:
        """Normalised coordinate -> pixel index (clipped)."""
        return int(min(self.size - 1, max(0, round((v + 1.0) * 0.5 * self.size - 0.5))))

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        s = self.size
        c0 = max(0, int(math.floor((x0 + 1.0) * 0.5 * s)))
        c1 = min(s, int(math.ceil((x1 + 1.0) * 0.5 * s)) + 1)
        r0 = max(0, int(math.floor((y0 + 1.0) * 0.5 * s)))
        r1 = min(s, int(math.ceil((y1 + 1.0) * 0.5 * s)) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _clip(a: np.ndarray, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
    """np.clip without its Python-level dispatch overhead (called thousands of times)."""
    out = np.maximum(a, lo, out=out)
    return np.minimum(out, hi, out=out)


def _soft(d: np.ndarray, k: float) -> np.ndarray:
    """Soft step: 0 for d <= 0, 1 for d >= 1/k."""
    d = d * np.float32(k)
    return _clip(d, 0.0, 1.0, out=d)


def lung_geometry(pt: dict) -> dict:
    """Derived per-patient landmarks shared by base rendering, findings and devices."""
    hw, mw = pt["thorax_half_width"], pt["mediastinum_half_width"]
    ya, yd = pt["apex_y"], pt["diaphragm_y"]
    return {
        "hw": hw,
        "mw": mw,
        "ya": ya,
        "yd": yd,
        "cx": 0.5 * (hw + mw),
        "a": 0.5 * (hw - mw),
        "ydr": yd - 0.045,
        "ydl": yd,  # the right hemidiaphragm sits higher
        "ycar": ya + CARINA_DROP * (yd - ya),
        "xtr": 0.0,
    }


def render_bases(patients: list[dict], geo: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anatomy of each patient, vectorised over the chunk.

    Returns (base [P,H,W], lung mask [P,H,W], lung texture [P,H,W]) as float32.
    """
    P, S = len(patients), geo.size

    def col(key: str) -> np.ndarray:
        return np.asarray([p[key] for p in patients], dtype=np.float32)[:, None, None]

    hw, mw, ya, yd = col("thorax_half_width"), col("mediastinum_half_width"), col("apex_y"), col("diaphragm_y")
    margin, rs, rph = col("soft_tissue_margin"), col("rib_spacing"), col("rib_phase")
    female = col("female")
    X = geo.xs[None, None, :]
    Y = geo.ys[None, :, None]
    ax = np.abs(X)
    # Body soft tissue: shoulders at the top, flanks narrowing slightly below; wider with more
    # soft tissue (habitus), which also adds density.
    bw = hw + margin + 0.06
    body = _soft(1.0 - (X / (bw * (1.0 - 0.06 * np.maximum(Y - 0.3, 0.0)))) ** 2 - ((Y - 0.1) / 1.25) ** 6, 5.0)
    base = 0.03 + (0.30 + 0.35 * margin) * body
    # Lungs: an ellipse cap above yc, widening below, cut by the diaphragm domes (highest at the
    # middle of each hemithorax, deep lateral costophrenic angles).
    cx, a = 0.5 * (hw + mw), 0.5 * (hw - mw)
    yc = ya + 0.45 * (yd - ya)
    rx = (ax - cx) / a
    ry = np.minimum(Y - yc, 0.0) / (yc - ya)
    ydome = np.where(X < 0, yd - 0.045, yd) - 0.07 + 0.10 * (rx + 0.15) ** 2 + 0.05 * np.maximum(rx, 0.0) ** 3
    lung = _soft(1.0 - rx * rx - ry * ry, 5.0) * _soft(ydome - Y, 18.0)
    # Lung markings: vessels fan out from the hila and fade to the periphery.
    tex = np.empty((P, S, S), dtype=np.float32)
    for i, p in enumerate(patients):
        k, oy, ox = p["texture"]
        tex[i] = geo.smooth[k, oy : oy + S, ox : ox + S]
    hil = _clip(1.1 - (ax - mw) / (hw - mw), 0.1, 1.0)
    tex = (0.03 * tex + 0.06 * hil * hil) * lung
    base = base - 0.27 * lung + tex
    # Abdomen below the domes, with a gastric air bubble under the left dome.
    base += 0.12 * _soft(Y - ydome, 10.0) * body
    bub = _soft(1.0 - ((X - 0.5 * hw) / 0.08) ** 2 - ((Y - yd - 0.08) / 0.045) ** 2, 3.0)
    base -= 0.10 * bub
    ycar = ya + CARINA_DROP * (yd - ya)
    # Mediastinum (tapering upwards) + spine, trachea (air column ending at the carina).
    base += 0.16 * _soft(1.0 - ax / (mw * (1.0 - 0.2 * _clip(yc - Y, 0.0, 1.0))), 6.0) * _soft(yd + 0.02 - Y, 10.0)
    # Aortic knob: a rounded bulge at the upper left mediastinal border.
    base += 0.08 * _soft(1.0 - ((X - mw + 0.015) / 0.065) ** 2 - ((Y - ycar + 0.06) / 0.06) ** 2, 3.0)
    base += 0.05 * _soft(1.0 - ax / 0.075, 5.0)
    base -= 0.08 * _soft(1.0 - np.abs(X - 0.01 * (Y - ycar)) / 0.03, 3.0) * _soft(ycar - Y, 20.0)
    # Posterior ribs: arcs rising from the spine then dropping laterally, over the hemithoraces.
    phase = (Y - ya + 0.12 * (ax / hw) - 0.30 * (ax / hw) ** 2 - rph) / rs
    frac = phase - np.floor(phase)
    rib = _clip(1.0 - np.abs(frac - 0.55) * 4.5, 0.0, 1.0)
    chest = _soft(1.0 - ax / (hw + 0.03), 12.0) * _soft(ydome + 0.02 - Y, 10.0) * _soft(Y - ya + 0.10, 10.0)
    base += 0.09 * rib * chest * _soft(ax - 0.07, 12.0)
    # Clavicles: oblique bars from the sternal notch to the shoulders.
    cyc = ya - 0.02 - 0.18 * (ax - 0.08)
    clav = _soft(1.0 - np.abs(Y - cyc) / 0.03, 1.6) * _soft(ax - 0.06, 20.0) * (ax < hw + 0.08)
    base += 0.14 * clav
    # Breast soft tissue over the lower lateral lung fields (female build).
    br = _soft(1.0 - ((ax - 0.55 * hw) / (0.42 * hw)) ** 2 - ((Y - yd + 0.10) / 0.22) ** 2, 2.0)
    base += 0.06 * female * br
    return base.astype(np.float32), lung.astype(np.float32), tex.astype(np.float32)


# ---------------------------------------------------------------------------------- study layer


def _ellipse(
    canvas: np.ndarray,
    geo: Geometry,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    amp: float,
    k: float = 3.0,
    weight: np.ndarray | None = None,
    texture: np.ndarray | None = None,
    target: float | None = None,
) -> None:
    """Add a soft ellipse of density `amp`; with `target`, airspace-like: the increment fades
    where the canvas is already dense (over the heart), so nothing saturates."""
    rs, cs = geo.box(cx - rx, cx + rx, cy - ry, cy + ry)
    if rs.stop <= rs.start or cs.stop <= cs.start:
        return
    d = 1.0 - ((geo.xs[cs][None, :] - cx) / rx) ** 2 - ((geo.ys[rs][:, None] - cy) / ry) ** 2
    m = _clip(d * k, 0.0, 1.0)
    if texture is not None:
        m = m * texture[rs, cs]
    if weight is not None:
        m = m * weight[rs, cs]
    if target is not None:
        m = m * _saturate(canvas[rs, cs], target)
    canvas[rs, cs] += amp * m


def _saturate(c: np.ndarray, target: float) -> np.ndarray:
    return _clip((target - c) * 4.0, 0.15, 1.0)


def _polyline(canvas: np.ndarray, geo: Geometry, pts, value: float, width: int = 1) -> None:
    """Draw a radiopaque line through points (N,2 normalised), densely resampled."""
    pts = np.asarray(pts, dtype=np.float64)
    seg = np.diff(pts, axis=0)
    t = np.concatenate(([0.0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))))
    S = geo.size
    s = np.linspace(0.0, t[-1], max(2, int(t[-1] * S * 0.9)))
    c = ((np.interp(s, t, pts[:, 0]) + 1.0) * (0.5 * S)).astype(np.int64)
    r = ((np.interp(s, t, pts[:, 1]) + 1.0) * (0.5 * S)).astype(np.int64)
    if width >= 2:  # a tube: two pixels wide
        c = np.concatenate((c, c + 1))
        r = np.concatenate((r, r))
    ok = (c >= 0) & (c < S) & (r >= 0) & (r < S)
    r, c = r[ok], c[ok]
    canvas[r, c] = np.maximum(canvas[r, c], value)


def _bezier(p0, p1, p2, n: int = 12) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def zone_y(g: dict, side: str, zone: str, u: float = 0.5) -> float:
    """A y inside `zone` of the `side` lung (u in [0,1] within the zone)."""
    yd = g["ydr"] if side == "right" else g["ydl"]
    top, h = g["ya"] + 0.04, (yd - 0.06) - (g["ya"] + 0.04)
    z = {"upper": 0, "mid": 1, "lower": 2}[zone]
    return top + h * (z + 0.2 + 0.6 * u) / 3.0


def side_sign(side: str) -> float:
    return -1.0 if side == "right" else 1.0


def rib_y(pt: dict, g: dict, rib: int, x: float) -> float:
    """Centre of posterior rib `rib` (1-based) at abscissa x (matches render_bases' rib phase)."""
    r = abs(x) / g["hw"]
    return g["ya"] - 0.12 * r + 0.30 * r * r + pt["rib_phase"] + (rib - 1 + 0.55) * pt["rib_spacing"]


def draw_study(base: np.ndarray, lung: np.ndarray, tex: np.ndarray, pt: dict, st: dict, geo: Geometry) -> np.ndarray:
    """Heart, findings, devices and incidentals of one study on a copy of the patient's base."""
    cv = base.copy()
    g = lung_geometry(pt)
    hw, ya, yd, cx, a = g["hw"], g["ya"], g["yd"], g["cx"], g["a"]
    # Heart: width = cardiothoracic ratio x thorax width, two thirds of it to the patient's left;
    # AP projection magnifies it a little.
    wh = st["ctr"] * 2.0 * hw * (1.06 if st["projection"] == "AP" else 1.0)
    hx, hy = 0.17 * wh, yd - 0.10
    hrx, hry = 0.5 * wh, 0.30 + 0.10 * wh
    rs, cs = geo.box(hx - hrx, hx + hrx, hy - hry, yd + 0.05)
    xl, yl = geo.xs[cs][None, :] - hx, geo.ys[rs][:, None] - hy
    # a slightly tilted ellipse (apex down and to the patient's left), flat on the diaphragm
    d = 1.0 - ((xl - 0.25 * yl) / hrx) ** 2 - (np.maximum(yl, 0.0) / (0.6 * hry) + np.minimum(yl, 0.0) / hry) ** 2
    m = _clip(d * 3.0, 0.0, 1.0)
    cv[rs, cs] += m * np.maximum(0.58 - cv[rs, cs], 0.0)
    for it in st["items"] + st.get("unmentioned", []):
        k = it["kind"]
        unc = 0.6 if it.get("certainty") == "uncertain" else 1.0
        j = it.get("_jit", (0.5, 0.5))
        if k == "effusion":
            sides = ("right", "left") if it["side"] == "bilateral" else (it["side"],)
            h = {"small": 0.10, "moderate": 0.22, "large": 0.40}[it["size"]] * (yd - ya)
            for sd in sides:
                sg = side_sign(sd)
                ydd = g["ydr"] if sd == "right" else g["ydl"]
                rs, cs = geo.box(sg * cx - a - 0.05, sg * cx + a + 0.05, ydd - h - 0.2, ydd + 0.08)
                xl = geo.xs[cs][None, :]
                lat = _clip((np.abs(xl) - g["mw"]) / (hw - g["mw"]), 0.0, 1.0)
                top = ydd - h + 0.02 - 0.10 * lat * (h / 0.3 + 0.3)  # meniscus: higher laterally
                fill = _soft(geo.ys[rs][:, None] - top, 12.0) * ((xl * sg) > 0)
                w = np.maximum(
                    lung[rs, cs],
                    _soft(ydd + 0.05 - geo.ys[rs][:, None], 10.0)
                    * _soft(1.0 - np.abs(xl) / hw, 6.0)
                    * ((xl * sg) > 0.15),
                )
                cv[rs, cs] += unc * 0.26 * fill * w * _saturate(cv[rs, cs], 0.5)
        elif k == "pneumothorax":
            sg = side_sign(it["side"])
            dep = {"small": 0.05, "moderate": 0.11, "large": 0.22}[it["size"]]
            rs, cs = geo.box(sg * cx - a, sg * cx + a, ya - 0.05, yd)
            xl, yl = geo.xs[cs][None, :], geo.ys[rs][:, None]
            yc = ya + 0.45 * (yd - ya)
            inner = ((np.abs(xl) - cx + 0.35 * dep) / (a - dep)) ** 2 + (
                np.minimum(yl - yc, 0.0) / (yc - ya - dep)
            ) ** 2
            reg = lung[rs, cs] * (inner > 1.0) * ((xl * sg) > 0) * (yl < yd - 0.15)
            cv[rs, cs] -= unc * reg * (tex[rs, cs] + 0.05)
            line = (np.abs(inner - 1.0) < 0.12) * lung[rs, cs] * ((xl * sg) > 0) * (yl < yd - 0.15)
            cv[rs, cs] += unc * 0.10 * line
        elif k in ("consolidation", "opacity"):
            sg = side_sign(it["side"])
            r = {"small": 0.07, "moderate": 0.11, "large": 0.16}[it.get("size", "moderate")]
            x0 = sg * (cx + (j[0] - 0.5) * a * 0.6)
            y0 = zone_y(g, it["side"], it["zone"], j[1])
            amp = (0.24 if k == "consolidation" else 0.13) * unc
            tx = (
                0.75
                + 0.35 * geo.smooth[(it.get("_tex", 0)) % 4, geo.pad : geo.pad + geo.size, geo.pad : geo.pad + geo.size]
            )
            _ellipse(cv, geo, x0, y0, r * 1.15, r, amp, 2.5, weight=lung, texture=tx, target=0.5)
        elif k == "atelectasis":
            sides = ("right", "left") if it["side"] == "bilateral" else (it["side"],)
            for sd in sides:
                sg = side_sign(sd)
                y0 = zone_y(g, sd, it["zone"], 0.55 + 0.3 * (j[1] - 0.5))
                _ellipse(
                    cv, geo, sg * (cx + 0.1 * (j[0] - 0.5)), y0, 0.15, 0.022, 0.20 * unc, 2.0, weight=lung, target=0.5
                )
        elif k == "edema":
            amp = {"mild": 0.08, "moderate": 0.13, "severe": 0.20}[it["size"]] * unc
            yh = ya + 0.55 * (yd - ya)
            for sg in (-1.0, 1.0):  # perihilar "bat-wing" haze
                _ellipse(
                    cv, geo, sg * (g["mw"] + 0.35 * a), yh, 0.6 * a, 0.40 * (yd - ya), amp, 1.2, weight=lung, target=0.5
                )
            if it["size"] != "mild":  # Kerley B lines at the lateral bases
                for sg in (-1.0, 1.0):
                    ydd = g["ydr"] if sg < 0 else g["ydl"]
                    for q in range(4):
                        yy = ydd - 0.06 - 0.045 * q
                        _polyline(
                            cv,
                            geo,
                            np.array([[sg * (hw - 0.09), yy], [sg * (hw - 0.02), yy]]),
                            0.0 + cv[geo.px(yy), geo.px(sg * (hw - 0.05))] + 0.10,
                        )
        elif k == "mediastinal_widening":
            yc = g["ycar"]
            _ellipse(
                cv,
                geo,
                0.0,
                ya + 0.5 * (yc - ya) + 0.05,
                g["mw"] * 1.9,
                0.5 * (yc - ya) + 0.12,
                0.18 * unc,
                3.0,
                target=0.6,
            )
        elif k in ("nodule", "mass", "granuloma"):
            sg = side_sign(it["side"])
            if k == "nodule":
                n, r, amp = it["count"], 0.014 + 0.0022 * it["size_mm"], 0.26
            elif k == "mass":
                n, r, amp = 1, 0.035 + 0.014 * it["size_cm"], 0.28 * unc
            else:
                n, r, amp = 1, 0.02, 0.45
            pos = it.get("_pos") or [(0.5, 0.5)] * n
            for u, v in pos[:n]:
                x0 = sg * (cx + (u - 0.5) * a * 1.1)
                y0 = zone_y(g, it["side"], it["zone"], v)
                _ellipse(cv, geo, x0, y0, r, r, amp, 2.5 if k != "granuloma" else 6.0)
        elif k == "pleural_thickening":
            sg = side_sign(it["side"])
            _ellipse(cv, geo, sg * cx, ya + 0.02, a * 0.75, 0.06, 0.16, 2.0, weight=lung)
        elif k == "fracture":
            sg = side_sign(it["side"])
            x0 = sg * 0.80 * hw
            y0 = rib_y(pt, g, it["rib"], x0)
            if it["age"] == "old":
                _ellipse(cv, geo, x0, y0, 0.05, 0.035, 0.20, 3.0)
            else:
                _polyline(cv, geo, np.array([[x0 - 0.01, y0 - 0.05], [x0 + 0.01, y0 + 0.05]]), 0.0)
                rs, cs = geo.box(x0 - 0.02, x0 + 0.02, y0 - 0.04, y0 + 0.04)
                cv[rs, cs] -= 0.06 * unc
        elif k == "ett":
            ytip = g["ycar"] - it["tip_cm"] * CM
            pts = np.array([[g["xtr"] - 0.01, -1.05], [g["xtr"], ytip]])
            _polyline(cv, geo, pts, 0.80, width=2)
        elif k == "ng":
            tip = (0.45 * hw, yd + 0.12) if it["tip"] == "stomach" else (0.04, yd - 0.07)
            pts = [(0.03, -1.05), (0.04, g["ycar"]), (0.05, yd - 0.07)]
            if it["tip"] == "stomach":
                pts += [(0.2 * hw, yd + 0.06), tip]
            _polyline(cv, geo, np.array(pts), 0.72)
        elif k in ("cvc", "picc"):
            sg = side_sign(it["side"])
            ytip = g["ycar"] + {"svc": 0.04, "cavoatrial junction": 0.17, "right atrium": 0.28}[it["tip"]]
            xs = -0.06
            if k == "picc":
                pts = np.concatenate(
                    [_bezier((sg * 1.05, ya + 0.18), (sg * 0.45, ya - 0.12), (xs, ya + 0.08), 16), [(xs, ytip)]]
                )
            elif it["approach"] == "internal jugular":
                pts = np.concatenate(
                    [
                        [(sg * 0.14, -1.05)],
                        _bezier((sg * 0.12, ya - 0.05), (xs, ya - 0.02), (xs, ya + 0.10), 8),
                        [(xs, ytip)],
                    ]
                )
            else:
                pts = np.concatenate(
                    [_bezier((sg * 0.55, ya - 0.02), (sg * 0.15, ya), (xs, ya + 0.10), 12), [(xs, ytip)]]
                )
            _polyline(cv, geo, pts, 0.78)
        elif k == "pacemaker":
            gx, gy = 0.62 * hw, ya + 0.06
            rs, cs = geo.box(gx - 0.07, gx + 0.07, gy - 0.045, gy + 0.045)
            cv[rs, cs] = np.maximum(cv[rs, cs], 0.92)
            ra = (-0.02, g["ycar"] + 0.22)
            rv = (0.20 * wh + 0.05, yd - 0.10)
            _polyline(cv, geo, _bezier((gx, gy), (0.0, ya - 0.02), (-0.04, g["ycar"] + 0.1), 12), 0.85)
            _polyline(cv, geo, _bezier((-0.04, g["ycar"] + 0.1), (-0.05, rv[1]), rv, 12), 0.85)
            if it["leads"] == 2:
                _polyline(cv, geo, _bezier((-0.04, g["ycar"] + 0.1), (-0.10, ra[1]), ra, 8), 0.85)
        elif k == "chest_tube":
            sg = side_sign(it["side"])
            pts = _bezier((sg * (hw + 0.10), yd - 0.08), (sg * (hw - 0.05), ya + 0.35), (sg * cx, ya + 0.08), 16)
            _polyline(cv, geo, pts, 0.82, width=2)
        elif k == "sternotomy":
            for q in range(5):
                yy = ya + 0.12 + q * 0.11
                _ellipse(cv, geo, 0.0, yy, 0.022, 0.014, 0.5, 6.0)
        elif k == "clips":
            loc = it["location"]
            cxy = {
                "right upper quadrant": (-0.45 * hw, yd + 0.20),
                "left axilla": (hw + 0.02, ya + 0.18),
                "right axilla": (-hw - 0.02, ya + 0.18),
                "neck": (0.10, -0.92),
            }[loc]
            for q in range(4):
                ox, oy = 0.025 * ((q * 7) % 3 - 1), 0.025 * ((q * 5) % 3 - 1)
                p0 = np.array([[cxy[0] + ox - 0.012, cxy[1] + oy], [cxy[0] + ox + 0.012, cxy[1] + oy + 0.012]])
                _polyline(cv, geo, p0, 0.9)
    return cv


# ---------------------------------------------------------------------------------- lateral view
# Left lateral projection displayed facing left: x < 0 anterior (sternum), x > 0 posterior
# (spine); y as in the frontal view. Side is not discernible on a lateral, as in real films.


def render_lateral_bases(patients: list[dict], geo: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lateral anatomy of each patient (same traits as the frontal base), vectorised."""
    P, S = len(patients), geo.size

    def col(key: str) -> np.ndarray:
        return np.asarray([p[key] for p in patients], dtype=np.float32)[:, None, None]

    dd, ya, yd, margin = col("ap_half_depth"), col("apex_y"), col("diaphragm_y"), col("soft_tissue_margin")
    X = geo.xs[None, None, :]
    Y = geo.ys[None, :, None]
    bd = dd + margin + 0.04
    body = _soft(1.0 - (X / bd) ** 2 - ((Y - 0.1) / 1.25) ** 6, 5.0)
    base = 0.03 + (0.34 + 0.35 * margin) * body
    # One lung field between sternum and spine; the posterior costophrenic sulcus is deepest.
    x0, x1 = -dd + 0.10, dd - 0.16
    cxl, al = 0.5 * (x0 + x1), 0.5 * (x1 - x0)
    yc = ya + 0.35 * (yd - ya)
    rx = (X - cxl) / al
    ry = np.minimum(Y - yc, 0.0) / (yc - ya)
    ydome = yd - 0.10 + 0.10 * (rx + 0.3) ** 2 + 0.06 * np.maximum(rx, 0.0)
    lung = _soft(1.0 - rx * rx - ry * ry, 5.0) * _soft(ydome - Y, 18.0)
    tex = np.empty((P, S, S), dtype=np.float32)
    for i, p in enumerate(patients):
        k, oy, ox = p["texture"]
        tex[i] = geo.smooth[(k + 1) % geo.smooth.shape[0], oy : oy + S, ox : ox + S]
    hil = _clip(1.0 - np.abs(X - 0.1 * dd) / (1.2 * al) - np.abs(Y - yc - 0.1) / 1.2, 0.1, 1.0)
    tex = (0.03 * tex + 0.06 * hil) * lung
    base = base - 0.24 * lung + tex
    base += 0.12 * _soft(Y - ydome, 10.0) * body
    # Spine: vertebral bodies (periodic end plates) behind the lung; sternum in front.
    sp = _soft(1.0 - np.abs(X - (dd - 0.09)) / 0.08, 4.0)
    vb = 0.75 + 0.25 * np.cos((Y - ya) * (2 * math.pi / 0.11))
    base += 0.22 * sp * vb
    base += 0.12 * _soft(1.0 - np.abs(X - (-dd + 0.05)) / 0.025, 3.0) * _soft(1.0 - np.abs(Y - ya - 0.28) / 0.34, 4.0)
    # Trachea: an air column running down and back to the carina.
    ycar = ya + CARINA_DROP * (yd - ya)
    base -= 0.08 * _soft(1.0 - np.abs(X - 0.02 - 0.08 * (Y + 1.0)) / 0.035, 3.0) * _soft(ycar - Y, 20.0)
    return base.astype(np.float32), lung.astype(np.float32), tex.astype(np.float32)


def draw_study_lateral(
    base: np.ndarray, lung: np.ndarray, tex: np.ndarray, pt: dict, st: dict, geo: Geometry
) -> np.ndarray:
    """The same study's heart, findings and devices seen from the side."""
    cv = base.copy()
    dd, ya, yd = pt["ap_half_depth"], pt["apex_y"], pt["diaphragm_y"]
    x0, x1 = -dd + 0.10, dd - 0.16
    ycar = ya + CARINA_DROP * (yd - ya)
    xtr = 0.02 + 0.08 * (ycar + 1.0)
    # Heart: anterior and inferior; its depth scales with the cardiothoracic ratio.
    hd = 1.05 * dd * st["ctr"] / 0.45
    hx, hy, hry = x0 - 0.04 + 0.5 * hd, yd - 0.13, 0.28 + 0.1 * st["ctr"]
    rs, cs = geo.box(hx - 0.5 * hd, hx + 0.5 * hd, hy - hry, yd + 0.04)
    d = 1.0 - ((geo.xs[cs][None, :] - hx) / (0.5 * hd)) ** 2 - ((geo.ys[rs][:, None] - hy) / hry) ** 2
    cv[rs, cs] += _clip(d * 3.0, 0.0, 1.0) * np.maximum(0.56 - cv[rs, cs], 0.0)

    def zy(zone: str, u: float) -> float:
        top, h = ya + 0.04, yd - 0.10 - ya
        return top + h * ({"upper": 0, "mid": 1, "lower": 2}[zone] + 0.2 + 0.6 * u) / 3.0

    for it in st["items"] + st.get("unmentioned", []):
        k = it["kind"]
        unc = 0.6 if it.get("certainty") == "uncertain" else 1.0
        j = it.get("_jit", (0.5, 0.5))
        if k == "effusion":
            h = (
                {"small": 0.10, "moderate": 0.22, "large": 0.40}[it["size"]]
                * (yd - ya)
                * (1.3 if it["side"] == "bilateral" else 1.0)
            )
            rs, cs = geo.box(x0, x1 + 0.06, yd - h - 0.25, yd + 0.1)
            xl = geo.xs[cs][None, :]
            post = _clip((xl - x0) / (x1 - x0), 0.0, 1.0)
            top = yd + 0.04 - h * (0.4 + 0.9 * post)  # meniscus rising posteriorly
            fill = _soft(geo.ys[rs][:, None] - top, 12.0)
            cv[rs, cs] += unc * 0.22 * fill * np.maximum(lung[rs, cs], 0.3 * (xl > x0)) * _saturate(cv[rs, cs], 0.5)
        elif k in ("consolidation", "opacity"):
            r = {"small": 0.07, "moderate": 0.11, "large": 0.16}[it.get("size", "moderate")]
            xc = x0 + (x1 - x0) * (0.25 + 0.5 * j[0])
            tx = (
                0.75
                + 0.35
                * geo.smooth[(it.get("_tex", 0) + 2) % 4, geo.pad : geo.pad + geo.size, geo.pad : geo.pad + geo.size]
            )
            _ellipse(
                cv,
                geo,
                xc,
                zy(it["zone"], j[1]),
                r,
                r * 0.9,
                (0.20 if k == "consolidation" else 0.11) * unc,
                2.5,
                weight=lung,
                texture=tx,
                target=0.5,
            )
        elif k == "atelectasis":
            _ellipse(
                cv,
                geo,
                x0 + (x1 - x0) * (0.3 + 0.4 * j[0]),
                zy(it["zone"], 0.6),
                0.14,
                0.02,
                0.16 * unc,
                2.0,
                weight=lung,
                target=0.5,
            )
        elif k == "edema":
            amp = {"mild": 0.07, "moderate": 0.11, "severe": 0.17}[it["size"]] * unc
            _ellipse(
                cv,
                geo,
                0.5 * (x0 + x1),
                ya + 0.55 * (yd - ya),
                0.8 * (x1 - x0) / 2,
                0.35 * (yd - ya),
                amp,
                1.2,
                weight=lung,
                target=0.5,
            )
        elif k in ("nodule", "mass", "granuloma"):
            if k == "nodule":
                n, r, amp = it["count"], 0.014 + 0.0022 * it["size_mm"], 0.22
            elif k == "mass":
                n, r, amp = 1, 0.035 + 0.014 * it["size_cm"], 0.25 * unc
            else:
                n, r, amp = 1, 0.02, 0.4
            for u, v in (it.get("_pos") or [(0.5, 0.5)] * n)[:n]:
                _ellipse(cv, geo, x0 + (x1 - x0) * (0.2 + 0.6 * v), zy(it["zone"], u), r, r, amp, 2.5)
        elif k == "ett":
            ytip = ycar - it["tip_cm"] * CM
            _polyline(cv, geo, [(0.02, -1.05), (xtr - 0.08 * (ycar - ytip), ytip)], 0.8, width=2)
        elif k == "ng":
            pts = [(0.10, -1.05), (xtr + 0.06, ycar), (xtr + 0.02, yd - 0.06)]
            if it["tip"] == "stomach":
                pts += [(-0.1, yd + 0.10), (-0.25, yd + 0.14)]
            _polyline(cv, geo, pts, 0.72)
        elif k in ("cvc", "picc"):
            ytip = ycar + {"svc": 0.04, "cavoatrial junction": 0.17, "right atrium": 0.28}[it["tip"]]
            _polyline(cv, geo, [(-0.02, -1.05), (-0.05, ya + 0.05), (-0.08, ytip)], 0.75)
        elif k == "pacemaker":
            gx, gy = -dd - 0.02, ya + 0.08
            rs, cs = geo.box(gx - 0.03, gx + 0.03, gy - 0.05, gy + 0.05)
            cv[rs, cs] = np.maximum(cv[rs, cs], 0.92)
            _polyline(cv, geo, _bezier((gx, gy), (-0.1, ya), (hx, yd - 0.1), 16), 0.85)
        elif k == "chest_tube":
            _polyline(
                cv, geo, _bezier((x1, yd - 0.05), (0.5 * (x0 + x1), ya + 0.4), (0.0, ya + 0.08), 16), 0.82, width=2
            )
        elif k == "sternotomy":
            for q in range(5):
                _ellipse(cv, geo, -dd + 0.05, ya + 0.05 + q * 0.1, 0.012, 0.02, 0.5, 6.0)
        elif k == "clips":
            cxy = {
                "right upper quadrant": (-0.1, yd + 0.18),
                "left axilla": (0.0, ya + 0.2),
                "right axilla": (0.02, ya + 0.22),
                "neck": (-0.05, -0.92),
            }[it["location"]]
            for q in range(4):
                ox, oy = 0.025 * ((q * 7) % 3 - 1), 0.025 * ((q * 5) % 3 - 1)
                _polyline(
                    cv, geo, [(cxy[0] + ox - 0.012, cxy[1] + oy), (cxy[0] + ox + 0.012, cxy[1] + oy + 0.012)], 0.9
                )
        # pneumothorax, fractures, pleural thickening and mediastinal widening are frontal-only signs
    return cv


# ---------------------------------------------------------------------------------- views


def render_views(canvases: np.ndarray, views: list[dict], geo: Geometry) -> np.ndarray:
    """Acquire each view of its study canvas. Returns uint8 [V,H,W].

    Per view: nearest-neighbour inverse affine warp (rotation about the centre, zoom, shift),
    an exposure look-up table on 256 density levels, then additive noise from the bank.
    """
    V, S = len(views), geo.size
    out = np.empty((V, S, S), dtype=np.uint8)
    q = np.empty(canvases.shape, dtype=np.uint8)
    np.multiply(canvases, 255.0, out=canvases)
    _clip(canvases, 0.0, 255.0, out=canvases)
    q[...] = canvases  # densities -> 256 levels for the LUT
    q = q.reshape(q.shape[0], -1)
    half = np.float32(0.5 * S)
    xs, ys = geo.xs, geo.ys
    tmp = np.empty((S, S), dtype=np.float32)
    for i, v in enumerate(views):
        th = math.radians(v["rotation_deg"])
        z = v["_zoom"]
        c, s_ = math.cos(th) / z, math.sin(th) / z
        sx, sy = v["_shift"]
        # source column/row (pixels) of each output pixel: u = c x - s y - sx, w = s x + c y - sy
        colf = np.add.outer((-s_ * half) * ys, (c * half) * xs + (1.0 - sx) * half)
        rowf = np.add.outer((c * half) * ys + (1.0 - sy) * half, (s_ * half) * xs)
        _clip(colf, 0, S - 1, out=colf)
        _clip(rowf, 0, S - 1, out=rowf)
        idx = rowf.astype(np.int32)
        idx *= S
        idx += colf.astype(np.int32)
        levels = np.take(q[v["_canvas"]], idx)
        # Exposure: over-exposure (>1) darkens and flattens the mid-tones.
        e = v["exposure"]
        lut = (_clip(1.04 * geo.levels**e / e**0.35, 0.0, 1.0) * 255.0).astype(np.float32)
        img = np.take(lut, levels)
        k, oy, ox, sign = v["_noise"]
        np.multiply(geo.white[k, oy : oy + S, ox : ox + S], np.float32(sign * 255.0 * v["noise"]), out=tmp)
        img += tmp
        _clip(img, 0.0, 255.0, out=img)
        out[i] = img
    return out
