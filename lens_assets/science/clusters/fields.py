"""Simulated cluster fields: a massive cluster lensing background galaxies into arcs, and fields that do not.

A *scene* (:func:`draw_cluster_scene`, priors in ``families/cluster.toml``):

* the halo: an elliptical NFW (lenstronomy ``NFW_ELLIPSE_CSE``) whose scale radius and
  normalization come from M200 and c200 at the cluster's redshift
  (``LensCosmo.nfw_physical2angle``, an ``astropy.cosmology`` flat ΛCDM);
* the BCG at the centre: SIE mass of velocity dispersion σ and de Vaucouleurs-like Sérsic
  light; the members: SIS masses from Faber–Jackson (L ∝ σ⁴) and Sérsic light, all on a red
  sequence whose observed colour reddens with the cluster's redshift (the colour model of the
  physical galaxy population, :func:`..population._observed_mag`);
* background sources: Sérsic galaxies at z_s behind the cluster, placed near the caustics
  (a source-plane offset within a fraction of the Einstein radius); for cluster–cluster systems
  a background group whose members share one red-sequence colour at the group's redshift.

The cluster's Einstein radius is the radius within which the mean convergence of the whole
lens (halo, BCG, members) is 1 for the sources' redshift (:func:`einstein_radius_arcsec`).
A scene is kept only if the survey could see its lensing: the Einstein radius lies inside the
field and, in the reference band, the arcs' matched-filter S/N and their total magnification
pass ``[selection]``.

Non-lenses come from the same selected scenes (:func:`build_cluster_system`): the *twin* is the
same field with the deflection switched off, each source at its unlensed position and as bright
as its arcs; the other types keep the sources unlensed at their own brightness and add arc-like
unlensed structure — blue foreground interlopers, edge-on spirals, tidal features about the BCG
or a member, radial streaks. Every field also gets contaminants at the rates of ``[contaminants]``.

Rendering (:func:`render_field`) gives the galaxy track's :func:`..simulation.render_system` images on
the family's field grid (``System.size_px``) with the rays shot once for every band; files are the
inbox contract plus the cluster keys of :data:`CLUSTER_HEADER_KEYS`.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..families import Family
from ..fits_validation import OBJTYPE_CLUSTER  # primary-header OBJTYPE of a cluster field (the inbox contract's marker)
from ..surveys import SurveySpec

__all__ = ["ClusterScene", "draw_cluster_scene", "render_field", "member_sigma_kms", "build_cluster_system",
           "einstein_radius_arcsec", "ClusterConvergence", "field_size_px",
           "cluster_field", "simulate_cluster_fields", "cluster_field_bytes", "CLUSTER_HEADER_KEYS", "OBJTYPE_CLUSTER"]

# primary-header keys a cluster field adds to the inbox contract
CLUSTER_HEADER_KEYS = ("OBJTYPE", "BCGXPIX", "BCGYPIX", "NARCS", "NSRC", "ARCSB", "CLGROUP")
_HALO, _BCG = 0, 1  # indices in the lens model list


@dataclass
class ClusterScene:
    """A cluster, its background sources and the observing conditions of one field."""

    z_cluster: float
    z_source: float
    theta_e_arcsec: float
    lens_model_list: tuple
    kwargs_lens: tuple
    cluster_light: list  # LightComponent, unlensed: the BCG and the members
    bcg: dict  # Sersic truth of the BCG's light (n, r_eff, q, pa)
    bcg_mag: float
    bcg_beta: float
    sources: list  # LightComponent, lensed=True, at their source-plane positions
    magnifications: list  # per source: its lensed flux on the field / its intrinsic flux
    group: bool  # the background is a group (a cluster-cluster system)
    contaminants: list  # LightComponent, unlensed, on every field
    seeing: dict
    psf_profile: str
    moffat_beta: float
    exposure_scale: float
    arc_snr: float
    # render_field's unit-flux images of this scene's components and its traced grid, reused by every render
    render_cache: dict = field(default_factory=dict, repr=False)


def field_size_px(family: Family, survey: SurveySpec) -> int:
    """The side of the family's field on the survey's grid: ``[field] size_arcsec`` / pixel scale, even."""
    n = int(round(family.draw("field", "size_arcsec", None) / survey.pixel_scale_arcsec))
    return n + (n % 2)


def _field_survey(family: Family, survey: SurveySpec) -> SurveySpec:
    """The survey with the family's field as its cutout (PSF kernels and noise as the survey's)."""
    return replace(survey, cutout_size_px=field_size_px(family, survey), min_cutout_arcsec=None)


def render_field(system, survey: SurveySpec, rng: np.random.Generator, *, cache: dict | None = None):
    """:func:`..simulation.render_system` for a system without point sources, with the rays shot once.

    ``render_system`` builds a lenstronomy ``ImageModel`` per band, and each ray-traces the grid through every
    deflector (a cluster has dozens) and evaluates every profile again. Here the supersampled grid is
    ray-traced once, each component's profile is evaluated once at unit flux (its shape does not depend on the
    band) and binned with lenstronomy's own ``Numerics``, and each band is the components' sum weighted by their
    band fluxes, convolved with the band's PSF (``fftconvolve``, same mode: lenstronomy's pixel convolution). The
    images equal ``render_system``'s (``lens_assets_tests/science/clusters/test_fields.py``).

    ``cache`` (a scene's ``render_cache``) keeps the traced grid and each component's unit image between renders
    of one scene on one grid (the selection's probe, then the field): components are keyed by identity, so a
    cache must not outlive the components it was filled with.
    """
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.Numerics.numerics import Numerics
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from scipy.signal import fftconvolve

    from ..simulation import _data_class, _unit_flux, band_flux, band_psf, grid_size_px, observe

    if system.points:
        raise ValueError(f"{system.objid}: render_field draws extended light only; this system has point "
                         f"sources (use simulation.render_system)")
    n = grid_size_px(system, survey)
    cache = {} if cache is None else cache
    grid = (survey.pixel_scale_arcsec, n, system.supersampling)
    if cache.get("grid") != grid:  # another grid: nothing cached applies
        cache.clear()
        cache["grid"] = grid
    numerics = Numerics(pixel_grid=_data_class(survey, n), psf=PSF(psf_type="NONE"),
                        supersampling_factor=system.supersampling)
    x, y = numerics.coordinates_evaluate
    if system.kwargs_lens and any(c.lensed for c in system.components) and "traced" not in cache:
        cache["traced"] = LensModel(list(system.lens_model_list)).ray_shooting(x, y, list(system.kwargs_lens))
    models: dict = {}
    nb = survey.n_bands
    lensed, unlensed = np.zeros((nb, n, n)), np.zeros((nb, n, n))
    for c in system.components:
        key = (id(c), c.lensed and bool(system.kwargs_lens))
        if key not in cache:
            model = models.setdefault(c.profile, LightModel([c.profile]))
            xs, ys = cache["traced"] if key[1] else (x, y)
            cache[key] = numerics.re_size_convolve(
                model.surface_brightness(xs, ys, [dict(c.shape, amp=1.0 / _unit_flux(c))]), unconvolved=True)
        unit = cache[key]
        target = lensed if c.lensed else unlensed
        for i, band in enumerate(survey.band_names):
            target[i] += band_flux(c.mag_ref, c.color_beta, survey, band) * unit
    psfs = [band_psf(system, survey, band) for band in survey.band_names]
    for i, kernel in enumerate(psfs):
        lensed[i] = fftconvolve(lensed[i], kernel, mode="same")
        unlensed[i] = fftconvolve(unlensed[i], kernel, mode="same")
    zps = [survey.band(b).magnitude_zero_point for b in survey.band_names]
    return observe(system, survey, rng, lensed=lensed, unlensed=unlensed, psfs=psfs, zero_points=zps)


class ClusterConvergence:
    """The convergence of a lens model list, with lenstronomy's ``LensModel.kappa`` interface, for
    :func:`einstein_radius_arcsec`: the elliptical NFW halo and the members' SIS from their closed forms, any
    other profile (the BCG's SIE) from lenstronomy.

    lenstronomy takes the convergence as half the trace of the full hessian. For ``NFW_ELLIPSE_CSE``, a sum of
    cored steep ellipsoids (Oguri 2021), that is about 85% of a cluster field's selection; the convergence of each
    ellipsoid is ``a / (2 (s² + q x² + y²/q)^{3/2})`` in the halo's frame (the product-averaged radius,
    lenstronomy's ``CSEProductAvg``), an SIS's ``θE / (2 r)``. Equal to ``LensModel(names).kappa`` to round-off
    (``lens_assets_tests/science/clusters/test_fields.py``); the ellipsoids' amplitudes, core radii and
    normalization are lenstronomy's own, read from its profile.
    """

    _CLOSED = ("NFW_ELLIPSE_CSE", "SIS")

    def __init__(self, lens_model_list):
        from lenstronomy.LensModel.lens_model import LensModel
        from lenstronomy.LensModel.Profiles.nfw_ellipse_cse import NFW_ELLIPSE_CSE

        self.names = tuple(lens_model_list)
        self._others = [i for i, n in enumerate(self.names) if n not in self._CLOSED]
        self._rest = LensModel([self.names[i] for i in self._others]) if self._others else None
        self._nfw = NFW_ELLIPSE_CSE()  # the profile LensModel builds for the name (its default accuracy)
        self._a = np.asarray(self._nfw._a_list, dtype=float)[:, None]
        self._s2 = np.asarray(self._nfw._s_list, dtype=float)[:, None] ** 2

    def _halo(self, x, y, *, Rs, alpha_Rs, e1, e2, center_x=0.0, center_y=0.0):
        from lenstronomy.Util import param_util, util

        phi, q = param_util.ellipticity2phi_q(e1, e2)
        xr, yr = util.rotate(x - center_x, y - center_y, phi)
        d = self._s2 + (q * (xr / Rs) ** 2 + (yr / Rs) ** 2 / q)[None]  # s² + ξ², one row per ellipsoid
        d *= np.sqrt(d)  # (s² + ξ²)^{3/2}: a square root costs a fraction of a power
        return self._nfw._normalization(alpha_Rs, Rs, q) / Rs**2 * np.sum(self._a / (2 * d), axis=0)

    def kappa(self, x, y, kwargs) -> np.ndarray:
        """The convergence at ``x``, ``y`` (scalars or arrays of one shape, broadcast together), in their shape.
        Array inputs give lenstronomy's array path to round-off (its scalar path floors an SIS's r³ at 1e-6)."""
        if len(kwargs) != len(self.names):
            raise ValueError(f"{len(kwargs)} kwargs for {len(self.names)} lens profiles {list(self.names)}")
        x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        shape = x.shape
        x, y = x.ravel(), y.ravel()  # one row per profile below, one column per point
        out = np.zeros(x.shape)
        sis = [kw for n, kw in zip(self.names, kwargs) if n == "SIS"]
        if sis:
            theta = np.array([kw["theta_E"] for kw in sis])[:, None]
            dx = x[None] - np.array([kw.get("center_x", 0.0) for kw in sis])[:, None]
            dy = y[None] - np.array([kw.get("center_y", 0.0) for kw in sis])[:, None]
            r = np.sqrt(dx * dx + dy * dy)
            # 0 on an SIS's centre, as lenstronomy's hessian gives there
            out += np.divide(theta, 2 * r, out=np.zeros(r.shape), where=r > 0).sum(axis=0)
        for n, kw in zip(self.names, kwargs):
            if n == "NFW_ELLIPSE_CSE":
                out += self._halo(x, y, **kw)
        if self._rest is not None:
            out += self._rest.kappa(x, y, [kwargs[i] for i in self._others])
        return out.reshape(shape)


def einstein_radius_arcsec(lens_model, kwargs_lens, *, max_radius_arcsec: float, step_arcsec: float = 0.25,
                           center=(0.0, 0.0), within_arcsec: float | None = None) -> float:
    """The radius within which the mean convergence about ``center`` is 1; 0 for a sub-critical lens.

    ``lens_model``: anything with lenstronomy's ``kappa(x, y, kwargs)`` (a ``LensModel``, or a
    :class:`ClusterConvergence`, which the selection uses).

    Convergence is sampled at the centres of a square grid of ``step_arcsec`` pixels (none on the centre)
    within ``max_radius_arcsec`` (only the pixels inside the circle are evaluated: π/4 of the square); the
    enclosed mean is taken within each distinct pixel radius in turn and the crossing of 1 interpolated.

    ``within_arcsec``: for a caller that only keeps radii up to it (the selection). The convergence is evaluated
    out to the first distinct pixel radius beyond it, not over the whole disc; a radius found there is the one
    the whole disc gives, bit for bit (the same grid, in the same order). Where that prefix stops short of the
    disc and holds no crossing, NaN: the lens is sub-critical or its radius lies beyond ``within_arcsec``, which
    the whole disc would tell apart (where the prefix is the whole disc, 0 as without it).
    """
    rs, dx, dy, last = _circle_grid(float(max_radius_arcsec), float(step_arcsec))
    if not len(rs):
        return 0.0
    cut = False
    if within_arcsec is not None:
        beyond = int(np.searchsorted(rs[last], within_arcsec, side="right"))  # the first radius beyond it
        if beyond + 1 < len(last):
            last, cut = last[:beyond + 1], True
    n = int(last[-1]) + 1
    ks = np.asarray(lens_model.kappa(dx[:n] + center[0], dy[:n] + center[1], list(kwargs_lens)), dtype=float)
    mean = np.cumsum(ks) / np.arange(1, n + 1)  # a running sum: each prefix is the whole disc's
    rs, mean = rs[last], mean[last]
    # the first drop of the enclosed mean through 1 beyond the innermost pixels (they sit on the BCG's cusp)
    crossing = np.nonzero((mean[1:] < 1.0) & (mean[:-1] >= 1.0) & (rs[1:] > 2 * step_arcsec))[0]
    if len(crossing) == 0:
        return math.nan if cut else 0.0
    i = crossing[0] + 1
    m0, m1 = mean[i - 1], mean[i]
    return float(rs[i - 1] + (m0 - 1.0) / (m0 - m1) * (rs[i] - rs[i - 1]))


@functools.lru_cache(maxsize=8)
def _circle_grid(r_max: float, step: float):
    """:func:`einstein_radius_arcsec`'s grid (every call of a selection asks for the same one): the radii and
    offsets of the pixel centres within ``r_max``, by radius, and the index of the last pixel at each distinct
    radius. The pixels at one radius (the grid's symmetry makes 4 or 8) enter the enclosed mean together, so which
    of them comes first changes the figure only in its last bit (the order of the sum)."""
    m = 2 * math.ceil(r_max / step)  # even: pixel centres straddle the centre, never on a singular cusp
    axis = (np.arange(m) - (m - 1) / 2) * step
    dx, dy = (a.ravel() for a in np.meshgrid(axis, axis))
    r = np.hypot(dx, dy)
    inside = r <= r_max
    order = np.argsort(r[inside], kind="stable")  # one order on every CPU (numpy's default sorts differ by CPU)
    rs, dx, dy = r[inside][order], dx[inside][order], dy[inside][order]
    last = np.append(np.nonzero(np.diff(rs) > 0)[0], len(rs) - 1) if len(rs) else np.zeros(0, int)
    for a in (rs, dx, dy, last):
        a.flags.writeable = False  # shared by every call
    return rs, dx, dy, last


def member_sigma_kms(abs_mag: float, fj_mag_at_200: float) -> float:
    """Faber–Jackson velocity dispersion (L ∝ σ⁴) of a galaxy of absolute magnitude ``abs_mag``:
    ``200 km/s × 10^(-(M - M_200) / 10)``."""
    return 200.0 * 10 ** (-(abs_mag - fj_mag_at_200) / 10.0)


def _red_sequence_beta(family: Family, z: float, rng, section: str, scatter_key: str) -> float:
    b = "bcg"
    return (family.draw(b, "color_beta_at_z0", rng) + family.draw(b, "color_beta_per_z", rng) * z
            + rng.normal(0.0, family.draw(section, scatter_key, rng)))


def _cluster(family: Family, survey: SurveySpec, rng, half_field: float):
    """Halo, BCG and members of one cluster: (z, lens list, kwargs, light components, BCG truth, BCG mag, beta)."""
    from lenstronomy.Cosmo.lens_cosmo import LensCosmo

    from ..population import RAD_TO_ARCSEC, _cosmology, _observed_mag, theta_e_sis_arcsec
    from ..simulation import LightComponent, _ellipticity, _sersic

    d = family.draw
    cosmo = _cosmology(d("cosmology", "H0", rng), d("cosmology", "Om0", rng))
    z = d("halo", "redshift", rng)
    ref = survey.band(survey.reference_band)
    rest = d("bcg", "rest_wavelength_nm", rng)
    distmod = float(cosmo.distmod(z).value)
    kpc_per_arcsec = float(cosmo.angular_diameter_distance(z).to("kpc").value) / RAD_TO_ARCSEC
    # the lens model's normalization needs the sources' redshift: _lens_kwargs takes it (all sources share z_s)
    q, pa = d("halo", "axis_ratio", rng), d("halo", "position_angle_deg", rng)
    halo = {"m200": 10 ** d("halo", "log10_m200", rng), "c": d("halo", "concentration", rng)}
    e1, e2 = _ellipticity(q, pa)
    bcg_q = d("bcg", "axis_ratio", rng)
    bcg_pa = pa + d("bcg", "position_angle_scatter_deg", rng)
    be1, be2 = _ellipticity(bcg_q, bcg_pa)
    sigma_bcg = d("bcg", "sigma_kms", rng)
    beta_bcg = _red_sequence_beta(family, z, rng, "bcg", "color_beta_scatter")
    bcg_abs = d("bcg", "abs_mag", rng)
    bcg_mag = _observed_mag(bcg_abs, distmod, z, beta_bcg, ref.wavelength_nm, rest)
    bcg = {"n": d("bcg", "sersic_n", rng), "r_eff": d("bcg", "r_eff_kpc", rng) / kpc_per_arcsec, "q": bcg_q,
           "pa": bcg_pa % 180.0}
    light = [LightComponent("SERSIC_ELLIPSE", _sersic((0.0, 0.0), n=bcg["n"], r_eff=bcg["r_eff"], q=bcg_q,
                                                      pa=bcg_pa), bcg_mag, beta_bcg, lensed=False)]
    members = []
    fj = d("members", "fj_mag_at_200", rng)
    scale = d("members", "radius_scale_arcsec", rng)
    for _ in range(d("members", "n_members", rng)):
        r = min(rng.gamma(2.0, scale), 0.95 * half_field)
        ang = rng.uniform(0, 2 * math.pi)
        x, y = r * math.cos(ang), r * math.sin(ang)
        offset = d("members", "mag_offset", rng)  # same distance and K-correction as the BCG's
        mag = bcg_mag + offset
        sigma = member_sigma_kms(bcg_abs + offset, fj)
        beta = _red_sequence_beta(family, z, rng, "members", "color_beta_scatter")
        light.append(LightComponent("SERSIC_ELLIPSE", _sersic(
            (x, y), n=d("members", "sersic_n", rng), r_eff=d("members", "r_eff_kpc", rng) / kpc_per_arcsec,
            q=d("members", "axis_ratio", rng), pa=rng.uniform(0, 180)), mag, beta, lensed=False))
        members.append((x, y, sigma))
    return {"z": z, "cosmo": cosmo, "halo": halo, "halo_e": (e1, e2), "bcg_e": (be1, be2), "sigma_bcg": sigma_bcg,
            "members": members, "light": light, "bcg": bcg, "bcg_mag": bcg_mag, "bcg_beta": beta_bcg,
            "theta_e_sis": theta_e_sis_arcsec}


def _lens_kwargs(cl: dict, z_source: float):
    """The lens model list and kwargs of cluster ``cl`` for sources at ``z_source``."""
    from lenstronomy.Cosmo.lens_cosmo import LensCosmo

    cosmo, z = cl["cosmo"], cl["z"]
    lc = LensCosmo(z_lens=z, z_source=z_source, cosmo=cosmo)
    rs, alpha_rs = lc.nfw_physical2angle(cl["halo"]["m200"], cl["halo"]["c"])
    dls_ds = float(lc.ds and lc.dds / lc.ds)
    names = ["NFW_ELLIPSE_CSE", "SIE"] + ["SIS"] * len(cl["members"])
    kwargs = [{"Rs": float(rs), "alpha_Rs": float(alpha_rs), "e1": cl["halo_e"][0], "e2": cl["halo_e"][1],
               "center_x": 0.0, "center_y": 0.0},
              {"theta_E": float(cl["theta_e_sis"](cl["sigma_bcg"], dls_ds)), "e1": cl["bcg_e"][0],
               "e2": cl["bcg_e"][1], "center_x": 0.0, "center_y": 0.0}]
    kwargs += [{"theta_E": float(cl["theta_e_sis"](s, dls_ds)), "center_x": x, "center_y": y}
               for x, y, s in cl["members"]]
    return tuple(names), tuple(kwargs)


def _background(family: Family, rng) -> tuple[bool, float]:
    """(the background is a group, its redshift): drawn before the Einstein radius, which depends on it."""
    d = family.draw
    if rng.uniform() < d("group", "probability", rng):
        return True, d("group", "redshift", rng)
    return False, d("sources", "redshift", rng)


def _sources(family: Family, rng, theta_e: float, group: bool) -> list:
    """Background LightComponents at their source-plane positions: offsets from the halo's centre in units of
    ``theta_e`` (near the caustics); a group's members scattered by ``[group] radius_arcsec`` about its centre."""
    from ..simulation import LightComponent, _sersic

    d = family.draw
    out = []
    if group:
        off = d("sources", "offset_over_theta_e", rng) * theta_e
        ang = rng.uniform(0, 2 * math.pi)
        cx, cy = off * math.cos(ang), off * math.sin(ang)
        beta = d("group", "color_beta", rng)
        spread = d("group", "radius_arcsec", rng)
        for _ in range(d("group", "n_members", rng)):
            x, y = cx + rng.normal(0, spread), cy + rng.normal(0, spread)
            out.append(LightComponent("SERSIC_ELLIPSE", _sersic(
                (x, y), n=rng.uniform(2.5, 4.0), r_eff=d("group", "r_eff_arcsec", rng), q=rng.uniform(0.5, 1.0),
                pa=rng.uniform(0, 180)), d("group", "mag", rng),
                beta + rng.normal(0, d("group", "member_color_scatter", rng)), lensed=True))
        return out
    for _ in range(d("sources", "n_sources", rng)):
        off = d("sources", "offset_over_theta_e", rng) * theta_e
        ang = rng.uniform(0, 2 * math.pi)
        out.append(LightComponent("SERSIC_ELLIPSE", _sersic(
            (off * math.cos(ang), off * math.sin(ang)), n=d("sources", "sersic_n", rng),
            r_eff=d("sources", "r_eff_arcsec", rng), q=d("sources", "axis_ratio", rng), pa=rng.uniform(0, 180)),
            d("sources", "mag", rng), d("sources", "color_beta", rng), lensed=True))
    return out


def _mimic(kind: str, family: Family, rng, *, bcg_beta: float, anchors: list) -> list:
    """Arc-like unlensed structure of non-lens type (or contaminant) ``kind``."""
    from ..simulation import LightComponent, _sersic

    d = family.draw
    m = "mimics"

    def elongated(prefix: str, *, radial: bool = False):
        r = d(m, f"{prefix}_distance_arcsec", rng)
        ang = rng.uniform(0, 2 * math.pi)
        x, y = r * math.cos(ang), r * math.sin(ang)
        # streaks point at the centre; interlopers and spirals at any angle (some tangential by chance)
        pa = math.degrees(ang) if radial else rng.uniform(0, 180)
        return LightComponent("SERSIC_ELLIPSE", _sersic(
            (x, y), n=1.0, r_eff=d(m, f"{prefix}_r_eff_arcsec", rng), q=d(m, f"{prefix}_axis_ratio", rng), pa=pa),
            d(m, f"{prefix}_mag", rng), d(m, f"{prefix}_color_beta", rng), lensed=False)

    if kind == "interloper":
        return [elongated("interloper")]
    if kind == "edge_on_spiral":
        return [elongated("edge_on")]
    if kind == "radial_streak":
        return [elongated("streak", radial=True)]
    if kind == "tidal":  # knots along an arc about the BCG or a member, in the host's colour
        hx, hy = anchors[int(rng.integers(len(anchors)))]
        radius = d(m, "tidal_radius_arcsec", rng)
        n = d(m, "tidal_n_knots", rng)
        start, span = rng.uniform(0, 2 * math.pi), math.radians(d(m, "tidal_span_deg", rng))
        mag = d(m, "tidal_mag", rng) + 2.5 * math.log10(n)  # each knot's share of the total
        out = []
        for t in np.linspace(start, start + span, n):
            r = radius * (1.0 + 0.3 * (t - start) / span)  # a spiral-like stream, not a circle about the centre
            out.append(LightComponent("GAUSSIAN", {"sigma": d(m, "tidal_knot_sigma_arcsec", rng),
                                                   "center_x": hx + r * math.cos(t), "center_y": hy + r * math.sin(t)},
                                      mag, bcg_beta, lensed=False))
        return out
    raise ValueError(f"unknown cluster mimic {kind!r}; valid are interloper, edge_on_spiral, tidal, radial_streak")


def _system(scene: ClusterScene, *, objid: str, is_lens: bool, kind: str, components, size_px: int, sky: dict,
            pair_id: str = ""):
    from ..simulation import System

    # a non-lens has no deflection: no Einstein radius and no source redshift, as in the galaxy track
    return System(objid=objid, is_lens=is_lens, kind=kind, theta_e_arcsec=scene.theta_e_arcsec if is_lens else 0.0,
                  kwargs_lens=scene.kwargs_lens if is_lens else (), components=tuple(components), points=(),
                  psf_profile=scene.psf_profile, psf_fwhm_arcsec=scene.seeing, moffat_beta=scene.moffat_beta,
                  exposure_scale=scene.exposure_scale, z_lens=scene.z_cluster,
                  z_source=scene.z_source if is_lens else -1.0,
                  ra_deg=sky["ra_deg"], dec_deg=sky["dec_deg"], galaxy=scene.bcg, pair_id=pair_id,
                  lens_model_list=scene.lens_model_list, size_px=size_px, supersampling=2)


def _candidate(family: Family, survey: SurveySpec, rng: np.random.Generator, half: float):
    """One candidate of the selection before its Einstein radius: ``(cluster, group, z_source, lens names, lens
    kwargs)``, or None when the background is not behind the cluster (the draws made either way)."""
    cl = _cluster(family, survey, rng, half)
    group, z_s = _background(family, rng)
    if z_s <= cl["z"] + 0.1:
        return None
    return (cl, group, z_s, *_lens_kwargs(cl, z_s))


def draw_cluster_scene(family: Family, survey: SurveySpec, rng: np.random.Generator) -> ClusterScene:
    """One selected cluster scene (its lensing visible to ``survey``); raises after ``max_tries`` draws."""
    from ..simulation import _draw_seeing, band_flux

    d = family.draw
    sel = "selection"
    fsurvey = _field_survey(family, survey)
    n = fsurvey.cutout_size_px
    half = n * survey.pixel_scale_arcsec / 2
    max_theta = d(sel, "max_theta_e_over_field", rng) * 2 * half
    for _ in range(int(d(sel, "max_tries", rng))):
        candidate = _candidate(family, survey, rng, half)
        if candidate is None:
            continue
        cl, group, z_s, names, kwargs = candidate
        # NaN, sub-critical or beyond max_theta, fails the test as 0 or a larger radius would (0 failed it because
        # min_theta_e_arcsec > 0: 4" in both cluster families)
        theta_e = einstein_radius_arcsec(ClusterConvergence(names), kwargs, max_radius_arcsec=max_theta * 1.2,
                                         within_arcsec=max_theta)
        if not d(sel, "min_theta_e_arcsec", rng) <= theta_e <= max_theta:
            continue
        sources = _sources(family, rng, theta_e, group)
        contaminants = []
        anchors = [(0.0, 0.0)] + [(c.shape["center_x"], c.shape["center_y"]) for c in cl["light"][1:]]
        for kind, key in (("interloper", "interloper_probability"), ("edge_on_spiral", "edge_on_probability"),
                          ("radial_streak", "streak_probability")):
            if rng.uniform() < d("contaminants", key, rng):
                contaminants += _mimic(kind, family, rng, bcg_beta=cl["bcg_beta"], anchors=anchors)
        scene = ClusterScene(
            z_cluster=cl["z"], z_source=z_s, theta_e_arcsec=theta_e, lens_model_list=names, kwargs_lens=kwargs,
            cluster_light=cl["light"], bcg=cl["bcg"], bcg_mag=cl["bcg_mag"], bcg_beta=cl["bcg_beta"],
            sources=sources, magnifications=[], group=group, contaminants=contaminants,
            seeing=_draw_seeing(family, survey, rng), psf_profile=d("psf", "profile", rng),
            moffat_beta=d("psf", "moffat_beta", rng), exposure_scale=d("noise", "exposure_scale", rng), arc_snr=0.0)
        # the selection renders the field in the reference band alone (the arcs' noise includes the cluster's light)
        probe = _system(scene, objid="probe", is_lens=True, kind="probe", components=[*cl["light"], *sources],
                        size_px=n, sky={"ra_deg": 0.0, "dec_deg": 0.0})
        ref_only = replace(fsurvey, bands=(fsurvey.band(fsurvey.reference_band),))
        cut = render_field(probe, ref_only, rng, cache=scene.render_cache)
        mus = _magnifications(scene.render_cache, sources)
        r = ref_only.band_names[0]
        intrinsic = [band_flux(c.mag_ref, c.color_beta, ref_only, r) for c in sources]
        total_mu = float(np.dot(mus, intrinsic) / np.sum(intrinsic))  # lensed flux of all / intrinsic flux of all
        if total_mu < d(sel, "min_magnification", rng) or cut.arc_snr < d(sel, "min_arc_snr", rng):
            continue
        scene.magnifications, scene.arc_snr = mus, cut.arc_snr
        return scene
    raise RuntimeError(f"family {family.name}: no cluster scene passed the selection in "
                       f"{int(d(sel, 'max_tries', rng))} tries on {survey.name}")


def _magnifications(cache: dict, sources) -> list:
    """Per source, its magnification on the field: the sum of its lensed unit-flux image (:func:`render_field`'s
    cache; the unlensed profile integrates to 1, so light lensed off the field is not counted)."""
    return [float(cache[(id(c), True)].sum()) for c in sources]


def build_cluster_system(scene: ClusterScene, role: str, family: Family, survey: SurveySpec, rng, *, objid: str,
                         pair_id: str = ""):
    """The :class:`..simulation.System` of ``scene`` as a lens (``role="lens"``) or as non-lens type ``role``."""
    from ..families import CLUSTER_NEGATIVE_TYPES
    from ..simulation import _sky_position

    n = field_size_px(family, survey)
    sky = _sky_position(survey, rng)
    base = [*scene.cluster_light, *scene.contaminants]
    if role == "lens":
        return _system(scene, objid=objid, is_lens=True, kind="group" if scene.group else "single",
                       components=[*base, *scene.sources], size_px=n, sky=sky, pair_id=pair_id)
    if role not in CLUSTER_NEGATIVE_TYPES:
        raise ValueError(f"unknown cluster role {role!r}; valid are 'lens' and {list(CLUSTER_NEGATIVE_TYPES)}")
    if role == "twin":  # the sources unlensed, as bright as their arcs
        unlensed = [replace(s, mag_ref=s.mag_ref - 2.5 * math.log10(max(mu, 1e-3)), lensed=False)
                    for s, mu in zip(scene.sources, scene.magnifications)]
        extra: list = []
    else:
        unlensed = [replace(s, lensed=False) for s in scene.sources]
        anchors = [(0.0, 0.0)] + [(c.shape["center_x"], c.shape["center_y"]) for c in scene.cluster_light[1:]]
        extra = _mimic(role, family, rng, bcg_beta=scene.bcg_beta, anchors=anchors)
    return _system(scene, objid=objid, is_lens=False, kind=role, components=[*base, *unlensed, *extra], size_px=n,
                   sky=sky, pair_id=pair_id)


def cluster_field(family: Family, survey: SurveySpec, seed: int, index: int):
    """Field ``index`` of the (survey, family, seed) population, rendered: a lens with the family's lens
    fraction, else a non-lens of a drawn type from its own selected scene. Returns (RenderedCutout, scene)."""
    from ..simulation import object_rng, objid_for

    if family.population != "cluster":
        raise ValueError(f"family {family.name}: population {family.population!r} is not 'cluster'")
    rng = object_rng(survey.name, family.name, seed, index)
    objid = objid_for(survey.name, family.name, seed, index)
    scene = draw_cluster_scene(family, survey, rng)
    role = "lens" if rng.uniform() < family.lens_fraction else family.draw_negative_type(rng)
    system = build_cluster_system(scene, role, family, survey, rng, objid=objid)
    return render_field(system, _field_survey(family, survey), rng, cache=scene.render_cache), scene


def _arc_surface_brightness(cut, survey: SurveySpec) -> float:
    """Mean surface brightness (AB mag/arcsec², reference band) of the lensed light where it exceeds the
    noise; 99 when none does (a non-lens)."""
    r = survey.band_names.index(survey.band(survey.reference_band).name)
    lensed = cut.lensed[r]
    mask = lensed > np.sqrt(cut.variance[r])
    if not mask.any():
        return 99.0
    flux = float(lensed[mask].mean())  # e-/s per pixel
    return float(cut.zero_points[r] - 2.5 * math.log10(flux / survey.pixel_scale_arcsec**2))


def cluster_field_bytes(cut, scene: ClusterScene, *, survey: SurveySpec, family: Family, seed: int,
                        labeled: bool = True, role: str = "train") -> bytes:
    """The inbox-contract file of a rendered cluster field, with the cluster keys (:data:`CLUSTER_HEADER_KEYS`):
    ``OBJTYPE`` marks a cluster field, ``BCGXPIX``/``BCGYPIX`` the BCG (FITS 1-based pixels), and for labeled
    files ``NARCS`` (lensed sources), ``NSRC`` (background sources), ``ARCSB`` (mag/arcsec²), ``CLGROUP``;
    ``role``: ``SIMROLE`` (``"heldout"`` for a held-out family)."""
    from ..fits_writer import simulated_cutout_bytes

    n = cut.image.shape[-1]
    extra = {"OBJTYPE": OBJTYPE_CLUSTER, "BCGXPIX": (n - 1) / 2 + 1, "BCGYPIX": (n - 1) / 2 + 1}
    if labeled:
        lens = cut.system.is_lens
        extra.update({"NARCS": len(scene.sources) if lens else 0, "NSRC": len(scene.sources),
                      "ARCSB": round(_arc_surface_brightness(cut, survey), 4) if lens else 99.0,
                      "CLGROUP": bool(scene.group)})
    return simulated_cutout_bytes(cut, survey=survey, family=family, seed=seed, labeled=labeled, extra=extra,
                                  role=role)


def _simulate_and_write(args) -> dict:
    survey, family, seed, index, out_dir, labeled, role = args
    t0 = time.perf_counter()
    cut, scene = cluster_field(family, survey, seed, index)
    path = Path(out_dir) / f"{cut.system.objid}.fits"
    path.write_bytes(cluster_field_bytes(cut, scene, survey=survey, family=family, seed=seed, labeled=labeled,
                                         role=role))
    s = cut.system
    return {"objid": s.objid, "file": path.name, "label": int(s.is_lens), "kind": s.kind,
            "theta_e": s.theta_e_arcsec, "arc_snr": cut.arc_snr, "n_sources": len(scene.sources),
            "group": bool(scene.group), "z_cluster": scene.z_cluster, "size_px": int(cut.image.shape[-1]),
            "seconds": time.perf_counter() - t0}


def simulate_cluster_fields(survey: SurveySpec, family: Family, *, n_fields: int, seed: int, out_dir: Path,
                            workers: int = 1, labeled: bool = True, progress: bool = False, role: str = "train"):
    """Write ``n_fields`` fields of ``family`` as inbox-contract FITS into ``out_dir`` (``SIMROLE`` = ``role``);
    returns a DataFrame of their truth (one row per file). Deterministic for (survey, family, seed) whatever
    ``workers``."""
    import pandas as pd

    from ..fits_writer import check_sim_role
    from ..parallel import parallel_map

    check_sim_role(role)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(survey, family, seed, i, out_dir, labeled, role) for i in range(n_fields)]
    rows = parallel_map(_simulate_and_write, jobs, workers=workers, progress=progress,
                        desc=f"cluster fields {survey.name}/{family.name}", unit="field")
    return pd.DataFrame(rows)
