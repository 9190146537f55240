"""Synthetic chest phantoms: frontal chest radiographs and chest CT volumes.

Not anatomy-grade, but with the parts a chest model must look at: body and shoulders, two
lung fields with vessel markings, mediastinum and spine, heart, diaphragm domes, posterior
ribs and clavicles (X-ray); body wall, lungs growing from apex to base, heart, vertebra, ribs,
vessels (CT). Class patterns follow the radiology of each class:

- ``normal``: clear lungs;
- ``covid``: bilateral, peripheral, lower-zone-predominant ground-glass opacities, several
  patches per lung (CT: subpleural ground glass, -700 to -300 HU);
- ``pneumonia``: focal lobar consolidation in one lobe of one lung, dense and homogeneous,
  sharply limited by a fissure, with air bronchograms (CT: 0 to 40 HU in one lobe).

Each call draws patient size, position, rotation, inspiration depth, heart size, rib layout,
exposure, contrast, blur and noise from ``rng``: acquisition and anatomy vary per image.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage

PhantomKind = Literal["normal", "covid", "pneumonia"]
KINDS: tuple[PhantomKind, ...] = ("normal", "covid", "pneumonia")


def _smoothstep(edge: float, x: np.ndarray) -> np.ndarray:
    """A soft step from 0 to 1 over ``edge`` around 0."""
    return np.asarray(np.clip(0.5 + x / (2 * edge), 0.0, 1.0), dtype=np.float32)


def _blobs(
    rng: np.random.Generator,
    shape: tuple[int, int],
    centres: list[tuple[float, float]],
    radius: tuple[float, float],
) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    yy /= shape[0]
    xx /= shape[1]
    out = np.zeros(shape, dtype=np.float32)
    for cy, cx in centres:
        r = rng.uniform(*radius)
        ry, rx = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
        out += np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


def cxr_phantom(kind: PhantomKind, rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """A frontal (PA) chest radiograph, float32 (size, size) in [0, 1], high = dense (bright).

    Patient right is on the image left, as on a PA film.
    """
    n = size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / np.float32(n)
    # pose: shift, scale, slight rotation
    angle = np.deg2rad(rng.uniform(-4, 4))
    sx, sy = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)
    scale = rng.uniform(0.92, 1.06)
    x0, y0 = xx - 0.5 - sx, yy - 0.5 - sy
    x = (np.cos(angle) * x0 - np.sin(angle) * y0) / scale + 0.5
    y = (np.sin(angle) * x0 + np.cos(angle) * y0) / scale + 0.5

    # body: neck widening into shoulders, then the chest wall
    half_width = np.where(
        y < 0.16, 0.1 + 0.32 * _smoothstep(0.08, y - 0.1), 0.42 + 0.03 * (y - 0.16)
    ).astype(np.float32) * rng.uniform(0.94, 1.04)
    dx = np.abs(x - 0.5)
    body = _smoothstep(0.02, half_width - dx)
    thickness = np.sqrt(np.clip(1 - (dx / np.maximum(half_width, 1e-3)) ** 2, 0, 1))
    att = 0.42 * body * (0.35 + 0.65 * thickness)

    # lungs: two fields, diaphragm domes (the right one higher), costophrenic angles
    inspiration = rng.uniform(-0.03, 0.04)
    lung = np.zeros_like(att)
    lung_masks = []
    for side, cx in (("right", 0.31), ("left", 0.69)):
        cx += rng.uniform(-0.015, 0.015)
        rx = rng.uniform(0.15, 0.17)
        top = rng.uniform(0.13, 0.17)
        base = (0.74 if side == "right" else 0.77) + inspiration
        base += rng.uniform(-0.02, 0.02)
        u = (x - cx) / rx
        dome = base - 0.09 * np.clip(1 - u**2, 0, 1)
        # rounded apex, convex lateral wall, dome below
        v = np.clip((y - top) / (base - top), 0, 1)
        reach = 0.55 + 0.45 * np.sqrt(v)
        apex = _smoothstep(0.015, y - top - 0.22 * (u**2))
        below = _smoothstep(0.012, dome - y)
        lateral = _smoothstep(0.04, reach - np.abs(u))
        mask = apex * below * lateral
        # darker laterally and in the mid zone, as the lung is thicker there
        mask = mask * (0.8 + 0.2 * np.clip(1 - np.abs(u), 0, 1))
        lung_masks.append(mask)
        lung = np.maximum(lung, mask)

    # mediastinum and heart take space from the lungs
    heart_cx = 0.57 + rng.uniform(-0.02, 0.03)
    heart_rx, heart_ry = rng.uniform(0.14, 0.18), rng.uniform(0.13, 0.16)
    heart_cy = 0.69 + inspiration + rng.uniform(-0.02, 0.02)
    heart = _smoothstep(
        0.03, 1 - ((x - heart_cx) / heart_rx) ** 2 - ((y - heart_cy) / heart_ry) ** 2
    )
    mediastinum = _smoothstep(0.02, 0.055 + 0.03 * _smoothstep(0.1, y - 0.35) - np.abs(x - 0.5))
    soft = np.clip(heart + mediastinum, 0, 1)
    lung = lung * (1 - soft)
    lung_masks = [m * (1 - soft) for m in lung_masks]
    markings = _vessels(rng, n, x, y)
    att = att - 0.27 * lung * thickness.clip(0.5, 1) + 0.09 * lung * markings
    att = att + 0.03 * mediastinum

    # spine: vertebral bodies behind the mediastinum
    spine = _smoothstep(0.01, 0.035 - np.abs(x - 0.5)) * _smoothstep(0.02, y - 0.05)
    levels = 0.5 + 0.5 * np.cos(2 * np.pi * (y * 16 + rng.uniform(0, 1)))
    att = att + spine * (0.06 + 0.03 * levels)

    # ribs and clavicles
    att = att + 0.05 * _ribs(rng, x, y, body) * (0.4 + 0.6 * lung) + 0.08 * _clavicles(rng, x, y)

    # pathology, confined to the lungs
    att = att + _cxr_pathology(kind, rng, n, x, y, lung_masks)

    # detector: blur, exposure (gamma, contrast), noise
    att = ndimage.gaussian_filter(att, sigma=rng.uniform(0.6, 1.4) * n / 512)
    att = np.clip(att, 0, None)
    att = att / max(float(att.max()), 1e-3)
    att = att ** rng.uniform(0.8, 1.25)
    att = rng.uniform(0.85, 1.0) * att + rng.uniform(0.0, 0.08)
    att = att + rng.normal(0, rng.uniform(0.005, 0.02), att.shape).astype(np.float32)
    return np.asarray(np.clip(att, 0.0, 1.0), dtype=np.float32)


def _vessels(rng: np.random.Generator, n: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Lung markings: branching lines radiating from each hilum, fading to the periphery."""
    out = np.zeros((n, n), dtype=np.float32)
    for hx in (0.42, 0.58):
        hy = 0.45 + rng.uniform(-0.02, 0.02)
        for _ in range(14):
            angle = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0.12, 0.3)
            steps = 60
            px, py = hx, hy
            for s in range(steps):
                angle += rng.normal(0, 0.08)
                px += np.cos(angle) * length / steps
                py += np.sin(angle) * length / steps
                ix, iy = int(px * n), int(py * n)
                if 0 <= ix < n and 0 <= iy < n:
                    out[iy, ix] += 1.0 - s / steps
    out = ndimage.gaussian_filter(out, sigma=max(1.0, n / 300))
    top = float(out.max())
    return np.asarray(out / top if top > 0 else out, dtype=np.float32)


def _ribs(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Posterior ribs: arcs from the spine, rising then falling laterally, 9-10 per side."""
    out = np.zeros_like(x)
    spacing = rng.uniform(0.06, 0.07)
    start = rng.uniform(0.12, 0.15)
    d = np.abs(x - 0.5)
    for k in range(10):
        y0 = start + k * spacing
        centre = y0 - 0.15 * d + 1.1 * d**2 + 0.05 * k * d
        band = _smoothstep(0.004, 0.011 - np.abs(y - centre))
        out += band * _smoothstep(0.02, d - 0.04)
    return np.asarray(np.clip(out, 0, 1) * body * _smoothstep(0.05, 0.78 - y), dtype=np.float32)


def _clavicles(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for sign in (-1.0, 1.0):
        d = sign * (x - 0.5)
        y_line = 0.15 + rng.uniform(-0.01, 0.01) - 0.12 * (d - 0.05) + 0.25 * (d - 0.2) ** 2
        band = _smoothstep(0.005, 0.014 - np.abs(y - y_line))
        out += band * _smoothstep(0.01, d - 0.05) * _smoothstep(0.02, 0.36 - d)
    return np.asarray(np.clip(out, 0, 1), dtype=np.float32)


def _cxr_pathology(
    kind: PhantomKind,
    rng: np.random.Generator,
    n: int,
    x: np.ndarray,
    y: np.ndarray,
    lungs: list[np.ndarray],
) -> np.ndarray:
    if kind == "normal":
        return np.zeros_like(x)
    if kind == "covid":
        out = np.zeros_like(x)
        for side, lung in enumerate(lungs):
            outer = 0.18 if side == 0 else 0.82
            centres = [
                (rng.uniform(0.45, 0.72), outer + (1 if side else -1) * rng.uniform(-0.09, 0.01))
                for _ in range(rng.integers(3, 6))
            ]
            ggo = _blobs(rng, (n, n), centres, (0.04, 0.08))
            texture = ndimage.gaussian_filter(rng.normal(0, 1, (n, n)), n / 120).astype(np.float32)
            texture = 0.8 + 0.2 * np.tanh(texture * 3)
            out += rng.uniform(0.1, 0.16) * ggo * texture * lung
        return out
    # pneumonia: one lobe of one lung, limited by a fissure line
    side = int(rng.integers(0, 2))
    lung = lungs[side]
    cx = 0.31 if side == 0 else 0.69
    lobe = rng.choice(["upper", "lower"])
    fissure = 0.4 + rng.uniform(-0.04, 0.06) + 0.1 * (x - cx) * (1 if side == 0 else -1)
    region = _smoothstep(0.01, (y - fissure) if lobe == "lower" else (fissure - y))
    region = region * _smoothstep(0.03, 0.12 - np.abs(x - cx - rng.uniform(-0.04, 0.04)))
    region = ndimage.gaussian_filter(region, sigma=n / 80)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (n, n)), n / 60).astype(np.float32)
    dense = rng.uniform(0.2, 0.3) * region * lung * (0.85 + 0.15 * np.tanh(2 * texture))
    bronchi = _vessels(rng, n, x, y)
    return np.asarray(dense * (1 - 0.35 * bronchi), dtype=np.float32)


def ct_phantom(
    kind: PhantomKind, rng: np.random.Generator, shape: tuple[int, int, int] = (40, 128, 128)
) -> np.ndarray:
    """A chest CT volume in Hounsfield units, float32 (slices, rows, cols), slice 0 inferior.

    The lungs run from near the base (slice ~10%) to the apex (~95%), widest above the
    diaphragm; the heart sits anterior-left in the lower half; air outside the body is
    -1000 HU.
    """
    nz, ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    yy = (yy / ny - 0.5) * 2  # -1 anterior .. 1 posterior
    xx = (xx / nx - 0.5) * 2  # -1 patient right .. 1 patient left
    a, b = rng.uniform(0.78, 0.88), rng.uniform(0.55, 0.65)  # body half-axes
    shift_x, shift_y = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    x, y = xx - shift_x, yy - shift_y
    body_r = (x / a) ** 2 + (y / b) ** 2
    lung_top, lung_base = rng.uniform(0.9, 0.98), rng.uniform(0.06, 0.14)
    heart_r = rng.uniform(0.2, 0.26)
    rib_phase = rng.uniform(0, 1)
    vessel_pts = rng.uniform(-1, 1, (160, 3)).astype(np.float32)
    patho = _ct_pathology_plan(kind, rng)
    vol = np.empty(shape, dtype=np.float32)
    for z in range(nz):
        t = z / max(nz - 1, 1)  # 0 inferior .. 1 superior
        hu = np.full((ny, nx), -1000.0, dtype=np.float32)
        hu[body_r <= 1.0] = -100.0  # fat
        hu[body_r <= 0.86] = 40.0  # muscle and organs
        in_lung_z = lung_base < t < lung_top
        lungs = []
        if in_lung_z:
            u = (t - lung_base) / (lung_top - lung_base)  # 0 base .. 1 apex
            grow = np.sqrt(np.clip(1 - u, 0, 1)) * np.clip(u * 6, 0, 1) ** 0.5
            for side in (-1.0, 1.0):
                cx = side * 0.4 * a
                rx = 0.34 * a * (0.3 + 0.7 * grow)
                ry = 0.72 * b * (0.35 + 0.65 * grow)
                lung = ((x - cx) / rx) ** 2 + ((y + 0.02 * b) / ry) ** 2 <= 1.0
                lung &= ((x / (0.1 * a)) ** 2 + ((y - 0.55 * b) / (0.3 * b)) ** 2) > 1.0
                lungs.append(lung)
                hu[lung] = -850.0
            lung_any = lungs[0] | lungs[1]
            if u < 0.45:  # heart: anterior left of midline
                h = heart_r * np.sqrt(np.clip(1 - ((u - 0.25) / 0.25) ** 2, 0.1, 1))
                heart = ((x - 0.1) / (h * 1.3)) ** 2 + ((y + 0.2 * b) / h) ** 2 <= 1.0
                hu[heart] = 45.0
                lungs = [m & ~heart for m in lungs]
                lung_any = lung_any & ~heart
            for vx, vy, vz in vessel_pts:  # vessels: short bright dots
                if abs(vz - (2 * t - 1)) < 0.08:
                    r2 = (x - vx * 0.6) ** 2 + (y - vy * 0.35) ** 2
                    hu[(r2 < 0.0009) & lung_any] = 30.0
            _ct_pathology_apply(patho, hu, x, y, t, lungs, rng)
        # vertebra and canal, posterior midline
        vert = (x / 0.11) ** 2 + ((y - 0.55 * b) / 0.11) ** 2 <= 1.0
        hu[vert] = 450.0
        canal = (x / 0.045) ** 2 + ((y - 0.78 * b) / 0.045) ** 2 <= 1.0
        hu[canal] = 20.0
        # ribs: bright arcs on the body wall, every few centimetres in z
        if np.cos(2 * np.pi * (t * 12 + rib_phase)) > 0.55:
            ring = (body_r > 0.8) & (body_r < 0.86) & (y > -0.5 * b)
            hu[ring] = 700.0
        vol[z] = hu
    vol = ndimage.gaussian_filter(vol, sigma=(0.0, 0.7, 0.7))
    vol += rng.normal(0, rng.uniform(10, 25), vol.shape).astype(np.float32)
    return np.asarray(np.clip(vol, -1024, 3000), dtype=np.float32)


def _ct_pathology_plan(kind: PhantomKind, rng: np.random.Generator) -> dict[str, object]:
    if kind == "covid":
        patches = []
        for side in (0, 1):
            for _ in range(int(rng.integers(3, 7))):
                patches.append(
                    (
                        side,
                        rng.uniform(0.15, 0.75),  # z (lower-zone predominant)
                        rng.uniform(0.0, 2 * np.pi),  # angle on the pleura
                        rng.uniform(0.1, 0.2),  # radius
                        rng.uniform(-650, -350),  # HU
                    )
                )
        return {"kind": "covid", "patches": patches}
    if kind == "pneumonia":
        return {
            "kind": "pneumonia",
            "side": int(rng.integers(0, 2)),
            "lower": bool(rng.integers(0, 2)),
            "split": rng.uniform(0.4, 0.6),
            "hu": rng.uniform(0, 40),
        }
    return {"kind": "normal"}


def _ct_pathology_apply(
    plan: dict[str, object],
    hu: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    t: float,
    lungs: list[np.ndarray],
    rng: np.random.Generator,
) -> None:
    if plan["kind"] == "covid":
        for side, pz, angle, radius, level in plan["patches"]:  # type: ignore[attr-defined]
            dz = abs(t - pz)
            if dz > 0.12:
                continue
            lung = lungs[side]
            if not lung.any():
                continue
            ys, xs = np.nonzero(lung)
            cy, cx = ys.mean(), xs.mean()
            ry = (ys.max() - ys.min()) / 2
            rx = (xs.max() - xs.min()) / 2
            py, px = cy + np.sin(angle) * ry * 0.85, cx + np.cos(angle) * rx * 0.85
            n = hu.shape[0]
            gy = (y + 1) / 2 * n
            gx = (x + 1) / 2 * hu.shape[1]
            r = radius * n / 2 * np.sqrt(max(0.0, 1 - (dz / 0.12) ** 2))
            patch = ((gy - py) ** 2 + (gx - px) ** 2 <= r**2) & lung
            hu[patch] = np.maximum(hu[patch], level + rng.normal(0, 40, int(patch.sum())))
    elif plan["kind"] == "pneumonia":
        lung = lungs[int(plan["side"])]  # type: ignore[call-overload]
        split = float(plan["split"])  # type: ignore[arg-type]
        in_lobe = t < split if plan["lower"] else t > split
        if in_lobe and lung.any():
            posterior = y > -0.15 + 0.1 * np.sin(t * 7)
            region = lung & posterior
            bronchus = (np.abs(x - np.median(x[region]) if region.any() else x) < 0.012) & region
            hu[region] = float(plan["hu"])  # type: ignore[arg-type]
            hu[bronchus] = -900.0
