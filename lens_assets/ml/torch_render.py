"""Batched, differentiable lens rendering in PyTorch: a whole batch of cutouts in one pass.

The torch twin of :func:`lens_assets.science.simulation.render_system`: SIE + external shear ray tracing
(caustics' functional lens profiles), elliptical Sérsic and Gaussian light, lensed and unlensed point
images, per-band PSF convolution, per-band misregistration and the survey's noise, batched over objects
and bands, on the CPU or a GPU, in float32 or float64, with gradients through every parameter.
:func:`pack_systems` turns the project's :class:`~lens_assets.science.simulation.System` objects (any
family, any renderer's priors) into a :class:`RenderBatch`; :func:`render` draws it.

It follows lenstronomy's conventions so the two agree pixel for pixel on the same parameters
(``lens_assets_tests/ml/test_torch_render.py`` checks each one against lenstronomy):

* **grid** — lenstronomy's ``data_configure_simple(n, scale, inverse=True)``: RA grows to the left
  (column 0 has the largest RA), Dec upwards (row 0 the smallest), the stamp's centre at (0, 0). Extended
  light is evaluated at the centres of ``SUPERSAMPLING`` x ``SUPERSAMPLING`` sub-pixels, averaged to
  pixels and multiplied by the pixel area (surface brightness per arcsec² to flux per pixel);
* **SIE** — lenstronomy's ``theta_E`` is the product-averaged Einstein radius; caustics' ``Rein`` is the
  same quantity (both deflect by ``theta_E sqrt(q) / sqrt(1 - q²) atan(...)``); ``q`` and the angle from
  ``e1, e2`` as lenstronomy's ``ellipticity2phi_q``; a 1e-10" core as lenstronomy's ``SIE``;
* **external shear** — ``(gamma1 x + gamma2 y, gamma2 x - gamma1 y)`` in both, about (0, 0);
* **Sérsic** — lenstronomy's product-average radius from ``e1, e2``, ``b_n = 1.9992 n - 0.3271``, radii
  floored at 1e-4", zero beyond 1000 ``R_sersic``; its analytic total flux sets the amplitude, so each
  band's flux comes from the component's magnitude and colour (:func:`~lens_assets.science.simulation.band_flux`);
* **Gaussian** — circular, its amplitude the total flux;
* **points** — a delta split bilinearly among the four pixels around its position, then the PSF: the
  same as lenstronomy's bilinear sub-pixel shift of the PSF image (``add_layer2image``, order 1);
* **convolution** — linear (zero beyond the stamp), by FFT, the kernel centred as scipy's
  ``fftconvolve(mode="same")``; points just outside the stamp still add their wings;
* **misregistration** — each band's noiseless lensed and unlensed light shifted bilinearly, zero beyond
  the edge (``scipy.ndimage.shift``, order 1, ``mode="constant"``);
* **noise** — variance ``background² + max(flux, 0) x poisson_gain`` per band, the two numbers taken
  from lenstronomy's ``SingleBand`` with the object's exposure, sky and read-noise scales (its
  ``estimate_noise``), then a background plane in units of the band's sky noise.

The image positions of lensed point sources come with the ``System`` (solved by lenstronomy in the
simulation); :func:`solve_images` finds them in torch, for a whole batch, where no ``System`` exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

__all__ = ["RenderBatch", "TorchCutouts", "pack_systems", "render", "ray_trace", "solve_images", "sersic_total_flux",
           "render_systems"]

SMOOTHING_ARCSEC = 1e-4  # lenstronomy's Sersic: radii below this are this
MAX_R_FRAC = 1000.0  # lenstronomy's Sersic: zero beyond this many R_sersic
SIE_CORE_ARCSEC = 1e-10  # lenstronomy's SIE is an NIE with this core
CHUNK = 16  # objects per sub-pixel light evaluation and per FFT batch on a CPU: their temporaries fit a core's cache


def _chunk(device: torch.device, n: int) -> int:
    """Objects per light evaluation or FFT batch: :data:`CHUNK` on a CPU (cache), all ``n`` at once elsewhere (a
    GPU wants few, large kernels)."""
    return CHUNK if device.type == "cpu" else max(n, 1)


@dataclass
class RenderBatch:
    """Parameters of ``B`` cutouts of ``K`` bands on one survey grid, as tensors (padding: zero flux).

    Angles in arcsec on the sky (x = RA offset, y = Dec offset from the stamp's centre), fluxes in e-/s.
    """

    n_px: int
    pixel_scale: float
    supersampling: int
    ref_band: int  # index of the reference band (flux ratio)
    lens: torch.Tensor  # (B, 7): theta_E, e1, e2, center_x, center_y, gamma1, gamma2; theta_E = 0: no lens
    sersic: torch.Tensor  # (B, S, 6): center_x, center_y, e1, e2, n_sersic, R_sersic
    sersic_flux: torch.Tensor  # (B, S, K) total flux per band
    sersic_lensed: torch.Tensor  # (B, S) bool: on the source plane
    gauss: torch.Tensor  # (B, G, 3): center_x, center_y, sigma
    gauss_flux: torch.Tensor  # (B, G, K)
    gauss_lensed: torch.Tensor  # (B, G) bool
    point_xy: torch.Tensor  # (B, P, 2) image positions
    point_flux: torch.Tensor  # (B, P, K) flux of each image (magnification included)
    point_lensed: torch.Tensor  # (B, P) bool: a lensed image (counts as arcs in the truth)
    psf: torch.Tensor  # (B, K, k, k) normalized PSF images, k odd
    shift_px: torch.Tensor  # (B, K, 2) misregistration (dx, dy) in pixels
    background_var: torch.Tensor  # (B, K) background variance per pixel, (e-/s)²
    poisson_gain: torch.Tensor  # (B, K) variance per unit of flux per pixel
    gradient: torch.Tensor  # (B, 2): background plane amplitude (in sky sigma) and angle (rad)

    @property
    def batch_size(self) -> int:
        return int(self.lens.shape[0])

    @property
    def n_bands(self) -> int:
        return int(self.psf.shape[1])

    def to(self, device=None, dtype=None) -> "RenderBatch":
        """A copy on ``device`` with its floating-point tensors in ``dtype``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if v.is_floating_point() and dtype is not None else v.dtype)
            out[f.name] = v
        return replace(self, **out)


@dataclass
class TorchCutouts:
    """Rendered cutouts, (B, K, H, W) tensors in e-/s, and the truth figures of ``RenderedCutout``."""

    image: torch.Tensor
    variance: torch.Tensor
    lensed: torch.Tensor | None  # None when rendered with truth=False
    unlensed: torch.Tensor | None
    flux_ratio: torch.Tensor | None  # (B,) lensed / total in the reference band, noiseless
    arc_snr: torch.Tensor | None  # (B,) matched-filter S/N of the lensed light

    @property
    def noiseless(self) -> torch.Tensor:
        if self.lensed is None:
            raise ValueError("rendered with truth=False: only image and variance were kept")
        return self.lensed + self.unlensed


# --------------------------------------------------------------------------- packing


def pack_systems(systems: Sequence, survey, *, dtype: torch.dtype = torch.float64, device=None,
                 psfs: Sequence | None = None) -> RenderBatch:
    """The :class:`RenderBatch` of ``systems`` (``science.simulation.System``) on ``survey``'s grid.

    Fluxes, PSF images and noise levels are the ones ``render_system`` uses, from the same helpers. ``psfs``: each
    system's ``band_psf`` images in the survey's band order, where the caller has drawn them already.
    """
    from lenstronomy.SimulationAPI.observation_api import SingleBand

    from lens_assets.science.simulation import SUPERSAMPLING, _noise_kwargs, band_flux, band_psf

    if not systems:
        raise ValueError("pack_systems needs at least one system")
    bands = survey.band_names
    nb = len(bands)
    if psfs is not None and len(psfs) != len(systems):
        raise ValueError(f"pack_systems: {len(psfs)} rows of PSF images for {len(systems)} systems")
    drawn, psfs = psfs, []
    lens, sersic, gauss, points, shifts, noise, grads = [], [], [], [], [], [], []
    for i, s in enumerate(systems):
        row = [0.0] * 7
        if s.kwargs_lens:
            sie, shear = s.kwargs_lens
            if shear.get("ra_0", 0.0) or shear.get("dec_0", 0.0):
                raise ValueError(f"{s.objid}: the torch renderer's shear is about (0, 0), got ra_0, dec_0 = "
                                 f"{shear.get('ra_0')}, {shear.get('dec_0')}")
            row = [sie["theta_E"], sie["e1"], sie["e2"], sie["center_x"], sie["center_y"], shear["gamma1"],
                   shear["gamma2"]]
        lens.append(row)
        ser, gau = [], []
        for c in s.components:
            flux = [band_flux(c.mag_ref, c.color_beta, survey, b) for b in bands]
            sh = c.shape
            if c.profile == "SERSIC_ELLIPSE":
                ser.append(([sh["center_x"], sh["center_y"], sh["e1"], sh["e2"], sh["n_sersic"], sh["R_sersic"]],
                            flux, c.lensed))
            elif c.profile == "GAUSSIAN":
                gau.append(([sh["center_x"], sh["center_y"], sh["sigma"]], flux, c.lensed))
            else:
                raise ValueError(f"{s.objid}: the torch renderer draws SERSIC_ELLIPSE and GAUSSIAN light, "
                                 f"not {c.profile!r}")
        sersic.append(ser)
        gauss.append(gau)
        pts = []
        for p in s.points:
            flux = [band_flux(p.mag_ref, p.color_beta, survey, b) for b in bands]
            for x, y, mu in zip(p.ra, p.dec, p.magnification):
                pts.append(([x, y], [f * mu for f in flux], p.lensed))
        points.append(pts)
        if drawn is not None and len(drawn[i]) != nb:
            raise ValueError(f"{s.objid}: {len(drawn[i])} PSF images for the survey's {nb} bands {list(bands)}")
        psfs.append([band_psf(s, survey, b) for b in bands] if drawn is None else list(drawn[i]))
        shift = s.observation.get("shift_px") or {}
        shifts.append([list(shift.get(b, (0.0, 0.0))) for b in bands])
        row_noise = []
        for b in bands:
            sb = SingleBand(**_noise_kwargs(survey, b, s))
            row_noise.append((sb.background_noise**2, float(sb.flux_noise(1.0)) ** 2))
        noise.append(row_noise)
        grads.append([s.observation.get("gradient_sigma") or 0.0, s.observation.get("gradient_angle") or 0.0])

    def padded(rows, width):
        n = max((len(r) for r in rows), default=0)
        par = torch.zeros(len(rows), n, width, dtype=dtype)
        flux = torch.zeros(len(rows), n, nb, dtype=dtype)
        lensed = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, r in enumerate(rows):
            for j, (p, f, l) in enumerate(r):
                par[i, j] = torch.tensor(p, dtype=dtype)
                flux[i, j] = torch.tensor(f, dtype=dtype)
                lensed[i, j] = bool(l)
        return par, flux, lensed

    s_par, s_flux, s_lensed = padded(sersic, 6)
    g_par, g_flux, g_lensed = padded(gauss, 3)
    p_par, p_flux, p_lensed = padded(points, 2)
    k = max(max(p.shape[0] for p in row) for row in psfs)
    psf = torch.zeros(len(systems), nb, k, k, dtype=dtype)
    for i, row in enumerate(psfs):
        for j, kern in enumerate(row):
            o = (k - kern.shape[0]) // 2
            psf[i, j, o:o + kern.shape[0], o:o + kern.shape[1]] = torch.from_numpy(np.asarray(kern, dtype=np.float64))
    noise_t = torch.tensor(noise, dtype=dtype)
    batch = RenderBatch(
        n_px=survey.cutout_size_px, pixel_scale=survey.pixel_scale_arcsec, supersampling=SUPERSAMPLING,
        ref_band=bands.index(survey.band(survey.reference_band).name),
        lens=torch.tensor(lens, dtype=dtype), sersic=s_par, sersic_flux=s_flux, sersic_lensed=s_lensed,
        gauss=g_par, gauss_flux=g_flux, gauss_lensed=g_lensed, point_xy=p_par, point_flux=p_flux,
        point_lensed=p_lensed, psf=psf, shift_px=torch.tensor(shifts, dtype=dtype),
        background_var=noise_t[..., 0], poisson_gain=noise_t[..., 1], gradient=torch.tensor(grads, dtype=dtype))
    return batch.to(device=device) if device is not None else batch


# --------------------------------------------------------------------------- physics


def subpixel_grid(n_px: int, pixel_scale: float, supersampling: int, *, dtype=torch.float64, device=None):
    """(x, y) in arcsec of the sub-pixel centres, each (n_px * s, n_px * s): lenstronomy's grid."""
    c = (n_px - 1) / 2.0
    sub = (torch.arange(n_px * supersampling, dtype=dtype, device=device) + 0.5) / supersampling - 0.5
    y, x = torch.meshgrid((sub - c) * pixel_scale, (c - sub) * pixel_scale, indexing="ij")
    return x, y


def _q_phi(e1, e2):
    """lenstronomy's ``ellipticity2phi_q``, with finite gradients at e1 = e2 = 0 (a round lens: there |e| and
    its angle have none, so a round lens is evaluated at |e| = 1e-8 along e1, which moves q by 2e-8)."""
    round_ = (e1 * e1 + e2 * e2) < 1e-16
    e1 = torch.where(round_, torch.full_like(e1, 1e-8), e1)
    e2 = torch.where(round_, torch.zeros_like(e2), e2)
    c = torch.sqrt(e1**2 + e2**2).clamp(max=0.999999)
    return (1.0 - c) / (1.0 + c), 0.5 * torch.atan2(e2, e1)


def ray_trace(lens: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, per_object: bool = False):
    """Source-plane positions ``beta = theta - alpha(theta)`` of image-plane ``(x, y)`` for each object's
    SIE + external shear (``lens`` (B, 7) as in :class:`RenderBatch`).

    ``x, y``: one grid shared by every object (any shape; the result is (B, *shape)), or with
    ``per_object=True`` their own points per object, (B, ...)."""
    from caustics.lenses.func import reduced_deflection_angle_external_shear, reduced_deflection_angle_sie

    shape = (-1,) + (1,) * (x.dim() - 1 if per_object else max(x.dim(), 1))
    te, e1, e2, cx, cy, g1, g2 = (lens[:, i].reshape(shape) for i in range(7))
    q, phi = _q_phi(e1, e2)
    ax, ay = reduced_deflection_angle_sie(cx, cy, q, phi, te, x, y, s=SIE_CORE_ARCSEC)
    sx, sy = reduced_deflection_angle_external_shear(0.0, 0.0, g1, g2, x, y)
    return x - ax - sx, y - ay - sy


def solve_images(lens: torch.Tensor, source_xy: torch.Tensor, *, max_images: int = 5, n_radii: int = 12,
                 n_angles: int = 24, iterations: int = 40, tol_arcsec: float = 1e-9,
                 min_separation_arcsec: float = 1e-4):
    """Image positions and signed magnifications of a point source behind each object's SIE + shear.

    Solves ``beta(theta) = source`` by Newton's method from a polar grid of starting points around each
    deflector (``n_radii`` radii from 0.05 to 2.5 theta_E, ``n_angles`` angles), with the Jacobian from
    autograd and steps capped at a fifth of theta_E; converged points closer than
    ``min_separation_arcsec`` are one image, and the SIE's singular centre is not an image (as in the
    lenstronomy path, ``simulation._lensed_points``). Returns ``xy`` (B, max_images, 2), ``valid``
    (B, max_images) and ``magnification`` (B, max_images), images ordered by decreasing |magnification|.
    """
    B = lens.shape[0]
    dtype, device = lens.dtype, lens.device
    te = lens[:, 0].clamp(min=1e-3)
    cx, cy = lens[:, 3], lens[:, 4]
    radii = torch.linspace(0.05, 2.5, n_radii, dtype=dtype, device=device)
    ang = torch.arange(n_angles, dtype=dtype, device=device) * (2 * math.pi / n_angles)
    ang = ang[None, :] + (math.pi / n_angles) * (torch.arange(n_radii, device=device)[:, None] % 2)  # staggered
    r = (radii[:, None] * torch.ones_like(ang)).reshape(-1)
    a = ang.reshape(-1)
    tx = cx[:, None] + te[:, None] * r * torch.cos(a)
    ty = cy[:, None] + te[:, None] * r * torch.sin(a)
    sx, sy = source_xy[:, 0, None], source_xy[:, 1, None]
    cap = 0.2 * te[:, None]

    def residual_and_jacobian(px, py):
        px = px.detach().requires_grad_(True)
        py = py.detach().requires_grad_(True)
        with torch.enable_grad():
            bx, by = ray_trace(lens.detach(), px, py, per_object=True)
            gxx, gxy = torch.autograd.grad(bx.sum(), (px, py), retain_graph=True)
            gyx, gyy = torch.autograd.grad(by.sum(), (px, py))
        return (bx - sx).detach(), (by - sy).detach(), gxx, gxy, gyx, gyy

    for _ in range(iterations):
        rx, ry, a11, a12, a21, a22 = residual_and_jacobian(tx, ty)
        det = a11 * a22 - a12 * a21
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        dx = (a22 * rx - a12 * ry) / det
        dy = (-a21 * rx + a11 * ry) / det
        step = torch.sqrt(dx**2 + dy**2)
        scale = torch.where(step > cap, cap / step.clamp(min=1e-30), torch.ones_like(step))
        tx, ty = tx - dx * scale, ty - dy * scale
    rx, ry, a11, a12, a21, a22 = residual_and_jacobian(tx, ty)
    mu = 1.0 / (a11 * a22 - a12 * a21)
    ok = (torch.sqrt(rx**2 + ry**2) < tol_arcsec) & (torch.hypot(tx - cx[:, None], ty - cy[:, None]) > 1e-6) \
        & torch.isfinite(mu)
    dist = torch.hypot(tx[:, :, None] - tx[:, None, :], ty[:, :, None] - ty[:, None, :])  # (B, S, S)
    earlier = torch.ones(dist.shape[1:], dtype=torch.bool, device=device).tril(-1)
    dup = (earlier & ok[:, None, :] & (dist < min_separation_arcsec)).any(dim=-1)
    keep = ok & ~dup
    order = torch.argsort(torch.where(keep, mu.abs(), torch.full_like(mu, -1.0)), dim=1, descending=True)
    take = order[:, :max_images]
    xy = torch.stack([tx.gather(1, take), ty.gather(1, take)], dim=-1)
    return xy, keep.gather(1, take), mu.gather(1, take)


def _b_n(n):
    return (1.9992 * n - 0.3271).clamp(min=1e-5)


def sersic_total_flux(n: torch.Tensor, r_sersic: torch.Tensor) -> torch.Tensor:
    """Total flux of a unit-amplitude Sérsic (lenstronomy's ``total_flux`` at amp = 1, product average)."""
    bn = _b_n(n)
    return torch.exp(math.log(2 * math.pi) + torch.log(n) + 2 * torch.log(r_sersic) + bn - 2 * n * torch.log(bn)
                     + torch.lgamma(2 * n))


def _sersic_unit(par: torch.Tensor, x, y):
    """Surface brightness (per arcsec², total flux 1) of Sérsic ``par`` (B, 6) at ``x, y`` (B, H, W)."""
    cx, cy, e1, e2, n, r = (par[:, i, None, None] for i in range(6))
    dx, dy = x - cx, y - cy
    norm = torch.sqrt(torch.clamp(torch.abs(1 - e1**2 - e2**2), min=1e-6))
    xe = ((1 - e1) * dx - e2 * dy) / norm
    ye = (-e2 * dx + (1 + e1) * dy) / norm
    r_safe = r.clamp(min=SMOOTHING_ARCSEC)
    frac = torch.sqrt(xe**2 + ye**2).clamp(min=SMOOTHING_ARCSEC) / r_safe
    n_safe = n.clamp(min=0.05)
    sb = torch.exp(-_b_n(n_safe) * (frac ** (1.0 / n_safe) - 1.0)) * (frac <= MAX_R_FRAC)
    return sb / sersic_total_flux(n_safe, r_safe)


def _gauss_unit(par: torch.Tensor, x, y):
    cx, cy, s = (par[:, i, None, None] for i in range(3))
    s = s.clamp(min=1e-6)
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s**2)) / (2 * math.pi * s**2)


def _add_unlensed_gaussians(batch: RenderBatch, out_unlensed) -> None:
    """Add the unlensed Gaussians (knots, blobs) to ``out_unlensed`` (B, K, n, n).

    A circular Gaussian on the regular grid is a product of two 1-d Gaussians, and so is its average over
    a pixel's sub-pixels: each knot costs O(n) and the image is one batched product over knots."""
    par, flux = batch.gauss, batch.gauss_flux
    on = (~batch.gauss_lensed) & (flux != 0).any(dim=-1)  # (B, G)
    if not bool(on.any()):
        return
    n, s = batch.n_px, batch.supersampling
    c = (n - 1) / 2.0
    sub = (torch.arange(n * s, dtype=par.dtype, device=par.device) + 0.5) / s - 0.5
    xs, ys = (c - sub) * batch.pixel_scale, (sub - c) * batch.pixel_scale
    sig = par[..., 2].clamp(min=1e-6)[..., None]
    norm = math.sqrt(2 * math.pi) * sig
    gx = (torch.exp(-((xs - par[..., 0, None]) ** 2) / (2 * sig**2)) / norm).reshape(*on.shape, n, s).mean(-1)
    gy = (torch.exp(-((ys - par[..., 1, None]) ** 2) / (2 * sig**2)) / norm).reshape(*on.shape, n, s).mean(-1)
    w = flux * (on[..., None] * batch.pixel_scale**2)  # (B, G, K)
    B, G, K = w.shape
    rows = (w[..., None] * gy[:, :, None, :]).reshape(B, G, K * n)  # (B, G, K n)
    out_unlensed += torch.bmm(rows.transpose(1, 2), gx).reshape(B, K, n, n)


def _pixel_light(unit, par: torch.Tensor, x, y, supersampling: int, area: float) -> torch.Tensor:
    """``unit`` light of ``par`` at the sub-pixel grid ``x, y``, averaged over each pixel's sub-pixels, times the
    pixel's ``area``: the pixel's flux per unit total flux (B, n, n)."""
    import torch.nn.functional as F

    sb = unit(par, x, y)
    return (F.avg_pool2d(sb[:, None], supersampling)[:, 0] if supersampling > 1 else sb) * area


def _sersic_pixels(par, x, y, supersampling: int, area: float) -> torch.Tensor:
    return _pixel_light(_sersic_unit, par, x, y, supersampling, area)


def _gauss_pixels(par, x, y, supersampling: int, area: float) -> torch.Tensor:
    return _pixel_light(_gauss_unit, par, x, y, supersampling, area)


_COMPILED: dict = {}


def _kernel(fn, compiled: bool):
    """``fn``, or with ``compiled`` its ``torch.compile`` form (made once per process, dynamic in the batch size):
    the chain of element-wise operations fused into one loop, about 7x faster on a CPU core for the sub-pixel
    Sérsic light (``benchmarks/bench_torch_render.py``). The first call compiles (seconds to a minute; inductor
    caches the code on disk for later processes) and needs a C++ compiler on a CPU (Triton's C compiler on a GPU);
    without one it raises inductor's error. Each function compiles a few graphs, not one per call: one per rank of
    the grid (shared or traced), for one-object chunks, per dtype and with gradients."""
    if not compiled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _present(batch: RenderBatch, kind: str) -> torch.Tensor:
    """(B, C) whether each object has a ``kind`` ('sersic' | 'gauss') component in slot c (padding: zero flux)."""
    return (getattr(batch, f"{kind}_flux") != 0).any(dim=-1)


def _traced_grid(batch: RenderBatch, x, y, *, compiled: bool = False):
    """Source-plane positions of the sub-pixel grid for the objects with lensed extended light only (a non-lens,
    a twin, needs none), traced in groups of :func:`_chunk`: ``(row, bx, by)`` with ``row`` (B,) each object's
    index into ``bx, by`` (t, H, W), -1 for the untraced."""
    need = torch.zeros(batch.batch_size, dtype=torch.bool, device=batch.lens.device)
    for kind in ("sersic", "gauss"):
        need |= (_present(batch, kind) & getattr(batch, f"{kind}_lensed")).any(dim=1)
    traced = need.nonzero().squeeze(1)
    row = torch.full((batch.batch_size,), -1, dtype=torch.long, device=need.device)
    row[traced] = torch.arange(traced.numel(), device=need.device)
    if traced.numel() == 0:
        return row, None, None
    step = _chunk(traced.device, traced.numel())
    trace = _kernel(ray_trace, compiled)
    parts = [trace(batch.lens[traced[j:j + step]], x, y) for j in range(0, traced.numel(), step)]
    return row, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _add_extended(batch: RenderBatch, out_lensed, out_unlensed, kind: str, x, y, traced, *,
                  lensed_only: bool = False, compiled: bool = False):
    """Add every component of ``kind`` ('sersic' | 'gauss') to the pixel-resolution light (B, K, n, n).

    Component slot ``c`` is drawn only for the objects that have one there (padding has zero flux), on a CPU in
    chunks of :data:`CHUNK` objects so that the sub-pixel temporaries stay in the cache; ``lensed_only`` skips the
    unlensed ones (drawn elsewhere); ``traced`` is :func:`_traced_grid`'s result. A component's shape is the same
    in every band, so each is evaluated once per object at unit flux and the bands are one batched product with
    the fluxes at the end; ``compiled``: the light by :func:`_kernel`'s compiled form."""
    par, flux, lensed = getattr(batch, kind), getattr(batch, f"{kind}_flux"), getattr(batch, f"{kind}_lensed")
    pixels = _kernel(_sersic_pixels if kind == "sersic" else _gauss_pixels, compiled)
    s, n = batch.supersampling, batch.n_px
    area = batch.pixel_scale**2
    present = _present(batch, kind)
    if lensed_only:
        present = present & lensed
    cols = present.any(dim=0).nonzero().flatten().tolist()  # the slots some object has (one host sync)
    if not cols:
        return
    B, K = flux.shape[0], flux.shape[-1]
    unit_px = par.new_zeros(B, len(cols), n, n)  # objects without the slot keep a zero unit image there
    for k, c in enumerate(cols):
        idx = present[:, c].nonzero().squeeze(1)
        step = _chunk(idx.device, idx.numel())
        for j in range(0, idx.numel(), step):
            i = idx[j:j + step]
            unit_px[i, k] = pixels(par[i, c], *_grid_for(lensed[i, c], i, x, y, traced), s, area)  # per unit flux
    cols = torch.tensor(cols, device=par.device)
    w = flux[:, cols]  # (B, C', K)
    m = lensed[:, cols, None].to(w.dtype)
    light = torch.bmm(torch.cat([w * m, w * (1 - m)], dim=2).transpose(1, 2), unit_px.flatten(2))  # (B, 2K, n n)
    out_lensed += light[:, :K].reshape(B, K, n, n)
    out_unlensed += light[:, K:].reshape(B, K, n, n)


def _grid_for(m, i, x, y, traced):
    """The coordinates objects ``i`` evaluate a component at: the traced grid where ``m`` (it is lensed), else the
    image-plane grid (on a CPU broadcast, not copied, when none of them is lensed; elsewhere no host sync)."""
    row, bx, by = traced
    if bx is None:  # nothing in the batch is traced, so nothing here is lensed
        return x, y
    on_cpu = m.device.type == "cpu"
    if on_cpu and not bool(m.any()):
        return x, y
    tx, ty = bx[row[i].clamp(min=0)], by[row[i].clamp(min=0)]
    if on_cpu and bool(m.all()):
        return tx, ty
    m = m[:, None, None]
    return torch.where(m, tx, x), torch.where(m, ty, y)


def _splat_points(batch: RenderBatch, canvas: torch.Tensor, pad: int) -> None:
    """Add each point's flux bilinearly to ``canvas`` (B, 2, K, n + 2 pad, n + 2 pad): [:, 0] lensed."""
    if batch.point_xy.shape[1] == 0:
        return
    n = batch.n_px
    size = n + 2 * pad
    c = (n - 1) / 2.0
    xp = c - batch.point_xy[..., 0] / batch.pixel_scale + pad  # (B, P) canvas pixel coordinates
    yp = c + batch.point_xy[..., 1] / batch.pixel_scale + pad
    x0, y0 = torch.floor(xp), torch.floor(yp)
    fx, fy = xp - x0, yp - y0
    x0, y0 = x0.long(), y0.long()
    B, P, K = batch.point_flux.shape
    plane = (~batch.point_lensed).long()  # 0 lensed, 1 unlensed
    flat = canvas.reshape(B, 2 * K * size * size)
    band = torch.arange(K, device=canvas.device)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        idx = ((plane[..., None] * K + band) * size + yi.clamp(0, size - 1)[..., None]) * size \
            + xi.clamp(0, size - 1)[..., None]  # (B, P, K)
        val = batch.point_flux * (w * ok)[..., None]
        flat.scatter_add_(1, idx.reshape(B, -1), val.reshape(B, -1))


def _fast_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes FFTs are fast at)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _shift_spectrum(shift: torch.Tensor, size: int, dtype) -> torch.Tensor:
    """The rfft2 (size x size) of the bilinear shift by ``shift`` (B, K, 2) = (dx, dy) pixels: along each axis
    output pixel i reads ``in(i - s)`` = (1 - f) in[i - c] + f in[i - c + 1], c = ceil(s), f = c - s, a two-tap
    kernel; (B, K, size, size // 2 + 1), complex."""
    def axis(s, freq):  # s (B, K), freq (F,) in cycles per sample
        c = torch.ceil(s)
        f = c - s
        w = -2j * math.pi * freq
        return (1 - f)[..., None] * torch.exp(w * c[..., None]) + f[..., None] * torch.exp(w * (c - 1)[..., None])

    fy = torch.fft.fftfreq(size, dtype=dtype, device=shift.device)
    fx = torch.fft.rfftfreq(size, dtype=dtype, device=shift.device)
    return axis(shift[..., 1], fy)[..., :, None] * axis(shift[..., 0], fx)[..., None, :]


def _inside_after_shift(shift: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K, n, n): 1 where the pixel's shifted source coordinate ``i - s`` lies in the stamp on both axes, else 0
    (``scipy.ndimage.shift``'s ``mode="constant"`` at order 1)."""
    i = torch.arange(n, dtype=shift.dtype, device=shift.device)
    cx, cy = i - shift[..., 0, None], i - shift[..., 1, None]  # (B, K, n)
    ok_x, ok_y = (cx >= 0) & (cx <= n - 1), (cy >= 0) & (cy <= n - 1)
    return (ok_y[..., :, None] & ok_x[..., None, :]).to(shift.dtype)


def _circular_size(n: int, pad: int, half: int) -> int:
    """The circular FFT size :func:`_convolve` needs for a kernel of half-width ``half`` (see there)."""
    return _fast_size(n + pad + half)


def _convolve(canvas: torch.Tensor, psf: torch.Tensor, n: int, pad: int, shift: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Linear convolution of ``canvas`` (B, P, K, m, m), m = n + 2 pad, with ``psf`` (B, K, k, k), cropped
    to the stamp (scipy's ``fftconvolve(mode="same")`` on the stamp when ``pad`` is 0); with ``shift`` (B, K, 2)
    each band's result is then shifted bilinearly by (dx, dy) pixels, zero where that reads from beyond the stamp
    (``scipy.ndimage.shift``, order 1, ``mode="constant"``), the shift applied as a factor of the PSF's spectrum.

    The FFTs are circular, of the smallest fast size that keeps the stamp free of wrap-around rather than of the
    full linear result (m + k - 1): output pixel j = o..o+n-1 (o = pad + k // 2) sums canvas pixels j - k + 1..j, so
    a circular size S >= n + pad + k // 2 folds nothing onto it (64 px stamps, 63 px PSFs: 96 instead of 128).
    Where S is below m or k, ``rfft2(s=)`` drops the canvas's or the kernel's last rows: they reach only pixels
    beyond the stamp. A shifted pixel that ``_inside_after_shift`` keeps reads stamp pixels only (the second
    tap one beyond, at weight 0, when the shift is a whole pixel), so the shift needs no margin."""
    k = psf.shape[-1]
    size = _circular_size(n, pad, k // 2)
    kernel = torch.fft.rfft2(psf, s=(size, size))
    if shift is not None:
        kernel = kernel * _shift_spectrum(shift, size, psf.dtype)
    full = torch.fft.irfft2(torch.fft.rfft2(canvas, s=(size, size)) * kernel[:, None], s=(size, size))
    o = pad + k // 2
    out = full[..., o:o + n, o:o + n]
    return out if shift is None else out * _inside_after_shift(shift, n)[:, None]


def _convolve_grouped(canvas: torch.Tensor, psf: torch.Tensor, n: int, pad: int,
                      shift: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_convolve` with each object's PSF cropped to its own support (zero-padded kernels of a batch
    share the largest size), objects grouped by the FFT size that support needs: the same result in less
    time when seeing varies across the batch. On a CPU each group is transformed :data:`CHUNK` objects at a
    time (1.07-1.13x the render's rate against whole groups, 256 physical DES cutouts, one core)."""
    k = psf.shape[-1]
    rows = psf.abs().sum(dim=(1, 3)) > 0  # (B, k): kernel rows with light in any band
    first = torch.where(rows.any(dim=1), rows.float().argmax(dim=1), torch.full_like(rows[:, 0], k // 2,
                                                                                       dtype=torch.long))
    half = (k // 2 - first).clamp(min=0)  # (B,)
    size = torch.tensor([_circular_size(n, pad, int(h)) for h in half.tolist()])
    out = canvas.new_empty(canvas.shape[:3] + (n, n))
    for sz in size.unique().tolist():
        group = (size == sz).nonzero().squeeze(1).to(canvas.device)
        h = int(half[group].max())
        step = _chunk(canvas.device, group.numel())  # on a CPU the transforms of a few objects stay in cache
        for j in range(0, group.numel(), step):
            idx = group[j:j + step]
            ker = psf[idx][..., k // 2 - h:k // 2 + h + 1, k // 2 - h:k // 2 + h + 1]
            out[idx] = _convolve(canvas[idx], ker, n, pad, None if shift is None else shift[idx])
    return out


def _point_pad(batch: RenderBatch, k: int) -> int:
    """Canvas margin (px) that holds every point whose PSF reaches the stamp: 0 when all lie inside."""
    if batch.point_xy.shape[1] == 0:
        return 0
    n = batch.n_px
    c = (n - 1) / 2.0
    on = batch.point_flux.abs().sum(-1) > 0
    if not bool(on.any()):
        return 0
    xp = (c - batch.point_xy[..., 0] / batch.pixel_scale)[on]
    yp = (c + batch.point_xy[..., 1] / batch.pixel_scale)[on]
    over = float(torch.cat([-xp, xp - (n - 1), -yp, yp - (n - 1)]).max())
    return int(min(k // 2, max(0, math.ceil(over) + 1)))


def render(batch: RenderBatch, *, noise: bool = True, truth: bool = True,
           generator: torch.Generator | None = None, compiled: bool = False) -> TorchCutouts:
    """Draw every cutout of ``batch`` in every band: noiseless light, variance and (``noise=True``) a noisy
    image from ``generator``. ``truth=False`` convolves the total light only (half the FFTs; for training
    data): ``lensed`` and ``unlensed`` are then ``None``, and so are the flux ratio and arc S/N. ``compiled``:
    the sub-pixel light and the ray tracing by ``torch.compile``d kernels (:func:`_kernel`)."""
    dtype, device = batch.lens.dtype, batch.lens.device
    n, B, K = batch.n_px, batch.batch_size, batch.n_bands
    x, y = subpixel_grid(n, batch.pixel_scale, batch.supersampling, dtype=dtype, device=device)
    traced = _traced_grid(batch, x, y, compiled=compiled)
    k = batch.psf.shape[-1]
    pad = _point_pad(batch, k)
    planes = 2 if truth else 1
    canvas = torch.zeros(B, 2, K, n + 2 * pad, n + 2 * pad, dtype=dtype, device=device)
    lensed_px = torch.zeros(B, K, n, n, dtype=dtype, device=device)
    unlensed_px = torch.zeros_like(lensed_px)
    _add_extended(batch, lensed_px, unlensed_px, "sersic", x, y, traced, compiled=compiled)
    _add_extended(batch, lensed_px, unlensed_px, "gauss", x, y, traced, lensed_only=True, compiled=compiled)
    _add_unlensed_gaussians(batch, unlensed_px)
    canvas[..., pad:pad + n, pad:pad + n] = torch.stack([lensed_px, unlensed_px], dim=1)
    _splat_points(batch, canvas, pad)
    if not truth:
        canvas = canvas.sum(dim=1, keepdim=True)
    conv = _convolve_grouped(canvas, batch.psf, n, pad, batch.shift_px if bool((batch.shift_px != 0).any()) else None)
    planes_out = [conv[:, i] for i in range(planes)]
    total = planes_out[0] + planes_out[1] if truth else planes_out[0]
    variance = batch.background_var[..., None, None] + total.clamp(min=0) * batch.poisson_gain[..., None, None]
    image = total
    if noise:
        image = total + torch.randn(total.shape, generator=generator, dtype=dtype, device=device) * variance.sqrt()
    if bool((batch.gradient[:, 0] != 0).any()):
        ramp = (torch.arange(n, dtype=dtype, device=device) - (n - 1) / 2) / n
        a = batch.gradient[:, 1, None, None]
        plane = torch.cos(a) * ramp[None, None, :] + torch.sin(a) * ramp[None, :, None]  # (B, n, n)
        sky_sigma = variance.amin(dim=(-2, -1)).sqrt()  # (B, K)
        image = image + batch.gradient[:, 0, None, None, None] * sky_sigma[..., None, None] * plane[:, None]
    if not truth:
        return TorchCutouts(image=image, variance=variance, lensed=None, unlensed=None, flux_ratio=None,
                            arc_snr=None)
    lensed, unlensed = planes_out
    r = batch.ref_band
    tot_r = total[:, r].sum(dim=(-2, -1))
    flux_ratio = torch.where(tot_r > 0, lensed[:, r].sum(dim=(-2, -1)) / tot_r.clamp(min=1e-30),
                             torch.zeros_like(tot_r))
    good = variance > 0
    arc_snr = torch.sqrt(torch.where(good, lensed**2 / variance.clamp(min=1e-30), torch.zeros_like(lensed))
                         .sum(dim=(1, 2, 3)))
    return TorchCutouts(image=image, variance=variance, lensed=lensed, unlensed=unlensed, flux_ratio=flux_ratio,
                        arc_snr=arc_snr)


def render_systems(systems: Sequence, rngs: Sequence, survey, *, dtype: torch.dtype = torch.float64,
                   device=None) -> list:
    """``science.simulation.render_system`` for a batch: the noiseless light by :func:`render`, then each
    object's noise from its own generator exactly as ``render_system`` draws it (one standard normal per
    pixel and band, times the square root of the variance, then the background plane), so a cutout does not
    depend on the batch it was drawn in. Returns ``RenderedCutout`` objects."""
    from lens_assets.science.simulation import RenderedCutout, band_psf

    psfs = [tuple(band_psf(system, survey, b) for b in survey.band_names) for system in systems]
    out = render(pack_systems(systems, survey, dtype=dtype, device=device, psfs=psfs), noise=False)
    lensed, unlensed = out.lensed.double().cpu().numpy(), out.unlensed.double().cpu().numpy()
    variance, plane_image = out.variance.double().cpu().numpy(), out.image.double().cpu().numpy()
    cutouts = []
    for j, (system, rng) in enumerate(zip(systems, rngs)):
        noise = rng.standard_normal(lensed[j].shape) * np.sqrt(variance[j])
        image = plane_image[j] + noise  # the background plane is in out.image already (noise=False)
        cutouts.append(RenderedCutout(
            system=system, bands=survey.band_names, image=image, variance=variance[j], lensed=lensed[j],
            unlensed=unlensed[j], psf=psfs[j],
            zero_points=tuple(survey.band(b).magnitude_zero_point for b in survey.band_names),
            flux_ratio=float(out.flux_ratio[j].cpu())))
    return cutouts
