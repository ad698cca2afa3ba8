"""lenstronomy simulations of galaxy-galaxy lenses and of hard non-lenses.

Two steps, both plain functions:

* :func:`draw_system` draws one system's parameters from a :class:`~.families.Family`
  for a survey: the lens (SIE + external shear), its light (elliptical Sersic),
  the source (Sersic with optional star-forming clumps, or a quasar with host),
  or, for a non-lens, the same galaxy with a hard-negative decoration
  (companions, a merger, a knotty ring, spiral arms, a chance alignment).
* :func:`render_system` draws it in every band of the survey with lenstronomy's
  ``ImageModel`` (per-band pixel PSF, Gaussian or Moffat with per-object seeing),
  adds sky + Poisson + read noise with lenstronomy's ``SingleBand`` noise model,
  and returns images in e-/s, their variance and the truth.

Colors: each component has f_nu ~ lambda^beta, so its magnitude in band b is
``m_ref - 2.5 beta log10(lambda_b / lambda_ref)``.

:func:`simulate_to_directory` writes a whole population as inbox-contract FITS,
deterministically for (survey, family, seed) and in parallel over processes.
"""

from __future__ import annotations

import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .families import Family
from .fits_writer import LENSTRONOMY_LABEL_SOURCE
from .psf import psf_kernel  # noqa: F401  (re-exported: simulation draws PSFs)
from .surveys import SurveySpec

__all__ = [
    "LightComponent",
    "PointComponent",
    "System",
    "RenderedCutout",
    "draw_system",
    "render_system",
    "observe",
    "lenstronomy_band_setup",
    "psf_kernel",
    "object_rng",
    "objid_for",
    "simulate_one",
    "simulate_to_directory",
    "simulate_pairs_to_directory",
    "LENSING_ONLY",
    "SUPERSAMPLING",
]

SUPERSAMPLING = 2  # lenstronomy supersampling factor for extended profiles


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class LightComponent:
    """An extended light profile (lenstronomy name and shape kwargs without ``amp``)."""

    profile: str  # 'SERSIC_ELLIPSE' or 'GAUSSIAN'
    shape: dict
    mag_ref: float  # AB in the survey's reference band
    color_beta: float
    lensed: bool


@dataclass(frozen=True)
class PointComponent:
    """Point images (lensed quasar images or a star), with |magnification| per image."""

    ra: tuple[float, ...]
    dec: tuple[float, ...]
    magnification: tuple[float, ...]
    mag_ref: float
    color_beta: float
    lensed: bool
    source_xy: tuple[float, float] | None = None  # unlensed position of a lensed point source


@dataclass(frozen=True)
class System:
    """Everything needed to render one cutout, and its truth."""

    objid: str
    is_lens: bool
    kind: str  # 'extended' | 'quasar' for lenses, a negative type otherwise
    theta_e_arcsec: float
    kwargs_lens: tuple[dict, ...]
    components: tuple[LightComponent, ...]
    points: tuple[PointComponent, ...]
    psf_profile: str
    psf_fwhm_arcsec: dict  # band -> FWHM
    moffat_beta: float
    exposure_scale: float
    z_lens: float
    z_source: float
    ra_deg: float
    dec_deg: float
    galaxy: dict = field(default_factory=dict)  # the lens/main galaxy's Sersic truth
    # how the survey's data differ from the nominal (physical families): per-band zero-point error and
    # misregistration, background gradient, sky and read-noise scales, variance map withheld, smaller cutout
    observation: dict = field(default_factory=dict)
    pair_id: str = ""  # a lens and its twin (the same scene without deflection) share one
    # cluster fields (science.clusters.fields) draw other mass models on a larger grid without supersampling
    lens_model_list: tuple[str, ...] = ("SIE", "SHEAR")
    size_px: int = 0  # the grid's side; 0: the survey's cutout size
    supersampling: int = SUPERSAMPLING
    # the Einstein radius of the scene the object was made from, lens or not (a twin or mimic keeps its lens's;
    # NaN where no scene has one): training can balance both classes over it alike (``theta_e_balance``)
    scene_theta_e_arcsec: float = float("nan")


def object_rng(survey: str, family: str, seed: int, index: int) -> np.random.Generator:
    """Generator for object ``index``: the same for a (survey, family, seed) on any machine."""
    key = [int(seed), int(index), zlib.crc32(survey.encode()), zlib.crc32(family.encode())]
    return np.random.default_rng(np.random.SeedSequence(key))


def objid_for(survey: str, family: str, seed: int, index: int) -> str:
    return f"sim-{survey}-{family}-s{seed}-{index:06d}"


def _ellipticity(q: float, phi_deg: float) -> tuple[float, float]:
    from lenstronomy.Util.param_util import phi_q2_ellipticity

    e1, e2 = phi_q2_ellipticity(math.radians(phi_deg), q)
    return float(e1), float(e2)


def _sersic(center: tuple[float, float], *, n: float, r_eff: float, q: float, pa: float) -> dict:
    e1, e2 = _ellipticity(q, pa)
    return {"R_sersic": r_eff, "n_sersic": n, "e1": e1, "e2": e2, "center_x": center[0], "center_y": center[1]}


def _polar(r: float, angle: float) -> tuple[float, float]:
    return r * math.cos(angle), r * math.sin(angle)


def draw_system(family: Family, survey: SurveySpec, rng: np.random.Generator, *, objid: str,
                force_lens: bool | None = None) -> System:
    """Draw one system of ``family`` as observed by ``survey``."""
    d = family.draw
    is_lens = bool(rng.uniform() < family.lens_fraction) if force_lens is None else force_lens
    if family.population == "physical":
        from .population import build_system, draw_scene

        role = "lens" if is_lens else family.draw_negative_type(rng)
        scene = draw_scene(family, survey, rng)
        return build_system(scene, role, family, survey, rng, objid=objid, **_sky_position(survey, rng))

    # the main galaxy: the same population for lenses and non-lenses
    q_mass = d("lens", "axis_ratio", rng)
    pa = d("lens", "position_angle_deg", rng)
    q_light = float(np.clip(q_mass + d("lens_light", "axis_ratio_scatter", rng), 0.2, 1.0))
    galaxy = {"n": d("lens_light", "sersic_n", rng), "r_eff": d("lens_light", "r_eff_arcsec", rng),
              "q": q_light, "pa": pa % 180.0}
    gal_mag = d("lens_light", "mag", rng)
    gal_beta = d("lens_light", "color_beta", rng)
    components = [LightComponent("SERSIC_ELLIPSE", _sersic((0.0, 0.0), n=galaxy["n"], r_eff=galaxy["r_eff"],
                                                           q=galaxy["q"], pa=galaxy["pa"]),
                                 gal_mag, gal_beta, lensed=False)]
    points: list[PointComponent] = []
    z_lens = d("lens", "redshift", rng)
    theta_e = d("lens", "theta_e_arcsec", rng)
    z_source = -1.0
    kwargs_lens: tuple[dict, ...] = ()

    if is_lens:
        from lenstronomy.Util.param_util import shear_polar2cartesian

        e1, e2 = _ellipticity(q_mass, pa)
        g1, g2 = shear_polar2cartesian(math.radians(d("lens", "shear_angle_deg", rng)), d("lens", "shear", rng))
        kwargs_lens = ({"theta_E": theta_e, "e1": e1, "e2": e2, "center_x": 0.0, "center_y": 0.0},
                       {"gamma1": float(g1), "gamma2": float(g2), "ra_0": 0.0, "dec_0": 0.0})
        z_source = max(d("source", "redshift", rng), z_lens + 0.1)
        beta = d("source", "max_offset", rng) * theta_e * math.sqrt(rng.uniform())
        src = _polar(beta, rng.uniform(0, 2 * math.pi))
        kind = d("source", "kind", rng)
        src_beta = d("source", "color_beta", rng)
        if kind == "quasar":
            qso_mag = d("quasar", "mag", rng)
            host_mag = qso_mag + d("quasar", "host_mag_offset", rng)
            components.append(LightComponent("SERSIC_ELLIPSE", _sersic(
                src, n=d("source", "sersic_n", rng), r_eff=d("source", "r_eff_arcsec", rng),
                q=d("source", "axis_ratio", rng), pa=rng.uniform(0, 180)), host_mag, src_beta, lensed=True))
            points.append(_lensed_points(kwargs_lens, src, qso_mag, d("quasar", "color_beta", rng), survey))
        else:
            src_mag = d("source", "mag", rng)
            clumpy = rng.uniform() < d("source", "clumpy_fraction", rng)
            r_eff = d("source", "r_eff_arcsec", rng)
            f_clumps = d("source", "clump_flux_fraction", rng) if clumpy else 0.0
            components.append(LightComponent("SERSIC_ELLIPSE", _sersic(
                src, n=d("source", "sersic_n", rng), r_eff=r_eff, q=d("source", "axis_ratio", rng),
                pa=rng.uniform(0, 180)), src_mag - 2.5 * math.log10(1.0 - f_clumps), src_beta, lensed=True))
            if clumpy:
                n_clumps = d("source", "n_clumps", rng)
                shares = rng.dirichlet(np.ones(n_clumps)) * f_clumps
                for share in shares:
                    offset = rng.normal(0.0, r_eff, size=2)
                    components.append(LightComponent(
                        "GAUSSIAN", {"sigma": d("source", "clump_sigma_arcsec", rng),
                                     "center_x": src[0] + offset[0], "center_y": src[1] + offset[1]},
                        src_mag - 2.5 * math.log10(share),
                        src_beta + d("source", "clump_color_beta_offset", rng), lensed=True))
    else:
        kind = family.draw_negative_type(rng)
        theta_e = 0.0
        _decorate_negative(kind, family, rng, components, points, gal_mag, galaxy)

    fwhm = _draw_seeing(family, survey, rng)
    profile = d("psf", "profile", rng)
    moffat_beta = d("psf", "moffat_beta", rng)
    pos = _sky_position(survey, rng)
    ra, dec = pos["ra_deg"], pos["dec_deg"]
    return System(objid=objid, is_lens=is_lens, kind=kind, theta_e_arcsec=theta_e, kwargs_lens=kwargs_lens,
                  components=tuple(components), points=tuple(points), psf_profile=profile,
                  psf_fwhm_arcsec=fwhm, moffat_beta=moffat_beta,
                  exposure_scale=d("noise", "exposure_scale", rng), z_lens=z_lens, z_source=z_source,
                  ra_deg=ra, dec_deg=dec, galaxy=galaxy, scene_theta_e_arcsec=theta_e if is_lens else float("nan"))


def _sky_position(survey: SurveySpec, rng: np.random.Generator) -> dict:
    """Uniform on the sphere within the survey's declination range."""
    ra = rng.uniform(0.0, 360.0)
    lo, hi = (math.sin(math.radians(x)) for x in survey.dec_range_deg)
    return {"ra_deg": float(ra), "dec_deg": math.degrees(math.asin(rng.uniform(lo, hi)))}


def _draw_seeing(family: Family, survey: SurveySpec, rng: np.random.Generator) -> dict:
    common = rng.normal(0.0, survey.seeing_scatter * family.draw("psf", "seeing_scatter_scale", rng))
    jitter = family.draw("psf", "band_jitter", rng)
    return {b.name: b.seeing_fwhm_arcsec * math.exp(common + rng.normal(0.0, jitter)) for b in survey.bands}


def _solver_seed(src, kwargs_lens) -> int:
    """A seed made from the lens equation's inputs (source position, every lens parameter by name)."""
    values = [float(src[0]), float(src[1])] + [float(kw[k]) for kw in kwargs_lens for k in sorted(kw)]
    return zlib.crc32(np.asarray(values, dtype=np.float64).tobytes())


@contextmanager
def _global_numpy_seed(seed: int):
    """numpy's global random state seeded with ``seed`` inside, restored after.

    lenstronomy's image-position solver redraws a failed Newton step's direction from ``np.random`` (the global
    state), so the same lens and source gave image positions that differed in the last digits from one call to the
    next, and so a population was not reproducible for lensed quasars. Seeding from the inputs makes each solution
    a function of them; restoring the state leaves any caller's own use of ``np.random`` as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _lensed_points(kwargs_lens, src, mag, beta, survey: SurveySpec) -> PointComponent:
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LensModel.Solver.lens_equation_solver import LensEquationSolver

    lens_model = LensModel(["SIE", "SHEAR"])
    solver = LensEquationSolver(lens_model)
    with _global_numpy_seed(_solver_seed(src, kwargs_lens)):
        x, y = solver.image_position_from_source(
            src[0], src[1], list(kwargs_lens), min_distance=survey.pixel_scale_arcsec / 4,
            search_window=survey.cutout_size_arcsec, precision_limit=1e-10, num_iter_max=100)
    mu = np.abs(lens_model.magnification(x, y, list(kwargs_lens)))
    # no image at the SIE's singular core
    keep = np.hypot(x - kwargs_lens[0]["center_x"], y - kwargs_lens[0]["center_y"]) > 1e-6
    return PointComponent(tuple(map(float, x[keep])), tuple(map(float, y[keep])), tuple(map(float, mu[keep])), mag,
                          beta, lensed=True, source_xy=(float(src[0]), float(src[1])))


def _decorate_negative(kind: str, family: Family, rng, components: list, points: list, gal_mag: float,
                       galaxy: dict) -> None:
    """Add the unlensed structure that makes a non-lens look lens-like."""
    d = family.draw
    h = "hard_negatives"
    if kind == "plain":
        return
    if kind == "companions":
        for _ in range(d(h, "companion_count", rng)):
            c = _polar(d(h, "companion_distance_arcsec", rng), rng.uniform(0, 2 * math.pi))
            components.append(LightComponent("SERSIC_ELLIPSE", _sersic(
                c, n=1.0, r_eff=d(h, "companion_r_eff_arcsec", rng), q=rng.uniform(0.4, 1.0),
                pa=rng.uniform(0, 180)), gal_mag + d(h, "companion_mag_offset", rng),
                d(h, "companion_color_beta", rng), lensed=False))
    elif kind == "merger":
        angle = rng.uniform(0, 2 * math.pi)
        c = _polar(d(h, "merger_distance_arcsec", rng), angle)
        tangential = math.degrees(angle) + 90.0 + rng.normal(0, 20)
        components.append(LightComponent("SERSIC_ELLIPSE", _sersic(
            c, n=rng.uniform(1.0, 4.0), r_eff=galaxy["r_eff"] * rng.uniform(0.5, 1.2),
            q=d(h, "merger_axis_ratio", rng), pa=tangential % 180.0), gal_mag + d(h, "merger_mag_offset", rng),
            d(h, "merger_color_beta", rng), lensed=False))
    elif kind == "ring":
        radius, q = d(h, "ring_radius_arcsec", rng), d(h, "ring_axis_ratio", rng)
        n_knots = d(h, "ring_n_knots", rng)
        phi = rng.uniform(0, math.pi)
        angles = np.sort(rng.uniform(0, 2 * math.pi, n_knots))
        _add_knots(components, family, rng, radius * np.cos(angles), radius * q * np.sin(angles), phi,
                   gal_mag, d(h, "ring_flux_fraction", rng), d(h, "ring_color_beta", rng))
    elif kind == "spiral":
        n_knots = d(h, "spiral_n_knots", rng)
        pitch = math.radians(d(h, "spiral_pitch_deg", rng))
        x, y = spiral_knot_positions(rng, n_knots, pitch_rad=pitch, r0_arcsec=max(0.3, 0.5 * galaxy["r_eff"]),
                                     r_max_arcsec=3.5)
        _add_knots(components, family, rng, x, y, rng.uniform(0, math.pi),
                   gal_mag, d(h, "spiral_flux_fraction", rng), d(h, "spiral_color_beta", rng))
    elif kind == "chance_alignment":
        c = _polar(d(h, "chance_distance_arcsec", rng), rng.uniform(0, 2 * math.pi))
        mag = d(h, "chance_mag", rng)
        if rng.uniform() < d(h, "chance_star_fraction", rng):
            points.append(PointComponent((c[0],), (c[1],), (1.0,), mag, float(rng.normal(1.0, 0.8)), lensed=False))
        else:
            components.append(LightComponent("SERSIC_ELLIPSE", _sersic(
                c, n=1.0, r_eff=d(h, "companion_r_eff_arcsec", rng), q=rng.uniform(0.2, 0.7),
                pa=rng.uniform(0, 180)), mag, d(h, "companion_color_beta", rng), lensed=False))
    else:  # pragma: no cover - families.load_family validates the type names
        raise ValueError(f"unknown negative type {kind!r}")


def spiral_knot_positions(rng, n_knots: int, *, pitch_rad: float, r0_arcsec: float, r_max_arcsec: float):
    """(x, y) in arcsec of ``n_knots`` knots along two logarithmic arms ``r = r0 exp(t tan(pitch))``."""
    t = rng.uniform(0, 1.5 * math.pi, n_knots)
    arm = rng.integers(0, 2, n_knots) * math.pi
    r = np.minimum(r0_arcsec * np.exp(t * math.tan(pitch_rad)), r_max_arcsec)
    return r * np.cos(t + arm), r * np.sin(t + arm)


def _add_knots(components, family, rng, x, y, rot, gal_mag, flux_fraction, color_beta, *,
               section: str = "hard_negatives") -> None:
    """Gaussian knots at (x, y) rotated by ``rot``, sharing ``flux_fraction`` of a ``gal_mag`` object's flux."""
    c, s = math.cos(rot), math.sin(rot)
    shares = rng.dirichlet(np.ones(len(x))) * flux_fraction
    for xi, yi, share in zip(x, y, shares):
        components.append(LightComponent(
            "GAUSSIAN", {"sigma": family.draw(section, "knot_sigma_arcsec", rng),
                         "center_x": float(c * xi - s * yi), "center_y": float(s * xi + c * yi)},
            gal_mag - 2.5 * math.log10(share), color_beta, lensed=False))


# --------------------------------------------------------------------------- rendering


@dataclass
class RenderedCutout:
    """One simulated cutout: per-band arrays (bands, H, W) in e-/s and the truth."""

    system: System
    bands: tuple[str, ...]
    image: np.ndarray  # noisy
    variance: np.ndarray
    lensed: np.ndarray  # noiseless lensed light (source + quasar images)
    unlensed: np.ndarray  # noiseless unlensed light (galaxy + decorations)
    psf: tuple[np.ndarray, ...]
    zero_points: tuple[float, ...]
    flux_ratio: float  # lensed / total in the reference band, on the noiseless image

    @property
    def noiseless(self) -> np.ndarray:
        return self.lensed + self.unlensed

    @property
    def arc_snr(self) -> float:
        """Matched-filter S/N of the lensed light: ``sqrt(sum(lensed**2 / variance))`` over bands and pixels.

        The S/N with which an observer who knew the noiseless arcs (or quasar
        images) exactly could tell this cutout from the same one without them; no
        classifier does better. 0 for a non-lens.
        """
        good = self.variance > 0
        return float(np.sqrt(np.sum(self.lensed[good] ** 2 / self.variance[good])))


def _band_mag(mag_ref: float, beta: float, wavelength: float, ref_wavelength: float) -> float:
    return mag_ref - 2.5 * beta * math.log10(wavelength / ref_wavelength)


def band_flux(mag_ref: float, beta: float, survey: SurveySpec, band: str) -> float:
    """Total flux (e-/s) in ``band`` of a component of magnitude ``mag_ref`` in the reference band and colour
    ``beta`` (f_nu ~ lambda^beta), at the band's nominal zero point."""
    spec, ref = survey.band(band), survey.band(survey.reference_band)
    mag = _band_mag(mag_ref, beta, spec.wavelength_nm, ref.wavelength_nm)
    return 10 ** (-0.4 * (mag - spec.magnitude_zero_point))


def band_psf(system: "System", survey: SurveySpec, band: str) -> np.ndarray:
    """The pixel PSF image ``system`` is drawn with in ``band`` (its profile and seeing there)."""
    fwhm_px = system.psf_fwhm_arcsec[survey.band(band).name] / survey.pixel_scale_arcsec
    return psf_kernel(system.psf_profile, fwhm_px, moffat_beta=system.moffat_beta, max_size=survey.cutout_size_px - 1)


_GRID_CACHE: dict = {}
_UNIT_FLUX_CACHE: dict = {}


def grid_size_px(system: System, survey: SurveySpec) -> int:
    """The side of the grid ``system`` is drawn on: its own ``size_px``, else the survey's cutout size."""
    return system.size_px or survey.cutout_size_px


def _data_class(survey: SurveySpec, size_px: int | None = None):
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Util.simulation_util import data_configure_simple

    n = size_px or survey.cutout_size_px
    key = (survey.name, n, survey.pixel_scale_arcsec)
    if key not in _GRID_CACHE:
        kw = data_configure_simple(n, survey.pixel_scale_arcsec, inverse=True)
        _GRID_CACHE[key] = ImageData(**kw)
    return _GRID_CACHE[key]


_SERSIC_MODEL = None


def _unit_flux(component: LightComponent) -> float:
    """Total flux of the profile at amp = 1 (GAUSSIAN's amp already is its total flux)."""
    global _SERSIC_MODEL
    if component.profile == "GAUSSIAN":
        return 1.0
    if component.profile != "SERSIC_ELLIPSE":  # pragma: no cover - draw_system makes only these two
        raise ValueError(f"no unit flux for profile {component.profile!r}")
    if _SERSIC_MODEL is None:
        from lenstronomy.LightModel.light_model import LightModel

        _SERSIC_MODEL = LightModel(["SERSIC_ELLIPSE"])
    return float(_SERSIC_MODEL.total_flux([dict(component.shape, amp=1.0)])[0])


def lenstronomy_band_setup(system: System, survey: SurveySpec, band: str, *,
                           unit_fluxes: Sequence[float] | None = None) -> dict:
    """The lenstronomy classes and kwargs that draw ``system`` in ``band``.

    Returns ``image_model`` and ``kwargs_lens``, ``kwargs_source``,
    ``kwargs_lens_light``, ``kwargs_ps`` (what ``ImageModel.image`` takes), the PSF
    kernel, the band's zero point, and the lenstronomy model lists (``*_list``)
    so the same image can be drawn with lenstronomy alone.
    """
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.PointSource.point_source import PointSource
    from lenstronomy.Data.psf import PSF

    spec = survey.band(band)
    zp = spec.magnitude_zero_point
    kernel = band_psf(system, survey, band)

    if unit_fluxes is None:
        unit_fluxes = [_unit_flux(c) for c in system.components]
    unit = dict(zip(map(id, system.components), unit_fluxes))

    def amp_kwargs(components):
        return [dict(c.shape, amp=band_flux(c.mag_ref, c.color_beta, survey, band) / unit[id(c)])
                for c in components]

    source = [c for c in system.components if c.lensed]
    light = [c for c in system.components if not c.lensed]
    lens_model = LensModel(list(system.lens_model_list)) if system.kwargs_lens else None
    kwargs_ps, ps_types = [], []
    for p in system.points:
        flux = band_flux(p.mag_ref, p.color_beta, survey, band)
        ps_types.append("LENSED_POSITION" if p.lensed else "UNLENSED")
        kwargs_ps.append({"ra_image": np.array(p.ra), "dec_image": np.array(p.dec),
                          "point_amp": flux * np.array(p.magnification)})
    image_model = ImageModel(
        _data_class(survey, grid_size_px(system, survey)),
        PSF(psf_type="PIXEL", kernel_point_source=kernel),
        lens_model_class=lens_model,
        source_model_class=LightModel([c.profile for c in source]) if source else None,
        lens_light_model_class=LightModel([c.profile for c in light]) if light else None,
        point_source_class=PointSource(ps_types, lens_model=lens_model) if ps_types else None,
        kwargs_numerics={"supersampling_factor": system.supersampling},
    )
    return {"image_model": image_model, "kwargs_lens": list(system.kwargs_lens) or None,
            "kwargs_source": amp_kwargs(source) or None, "kwargs_lens_light": amp_kwargs(light) or None,
            "kwargs_ps": kwargs_ps or None, "psf": kernel, "zero_point": zp,
            "lens_model_list": list(system.lens_model_list) if lens_model else None,
            "source_light_model_list": [c.profile for c in source] or None,
            "lens_light_model_list": [c.profile for c in light] or None,
            "point_source_type_list": ps_types or None}


def _noise_kwargs(survey: SurveySpec, band: str, system: System) -> dict:
    """lenstronomy ``SingleBand`` kwargs of ``band`` with the object's exposure, sky and read-noise scales."""
    kw = survey.kwargs_single_band(band, exposure_scale=system.exposure_scale)
    obs = system.observation
    if obs.get("sky_scale"):
        kw["sky_brightness"] = kw["sky_brightness"] - 2.5 * math.log10(obs["sky_scale"])
    if obs.get("read_noise_scale"):
        kw["read_noise"] = kw["read_noise"] * obs["read_noise_scale"]
    return kw


def render_system(system: System, survey: SurveySpec, rng: np.random.Generator) -> RenderedCutout:
    """Draw ``system`` in every band, noiseless and with survey noise."""
    n = grid_size_px(system, survey)
    nb = survey.n_bands
    lensed = np.zeros((nb, n, n))
    unlensed = np.zeros((nb, n, n))
    psfs, zps = [], []
    unit_fluxes = [_unit_flux(c) for c in system.components]  # band-independent
    for i, band in enumerate(survey.band_names):
        s = lenstronomy_band_setup(system, survey, band, unit_fluxes=unit_fluxes)
        im = s["image_model"]
        if s["kwargs_source"]:
            lensed[i] += im.source_surface_brightness(s["kwargs_source"], s["kwargs_lens"])
        if s["kwargs_lens_light"]:
            unlensed[i] += im.lens_surface_brightness(s["kwargs_lens_light"])
        for k, p in enumerate(system.points):  # lensed images to the lensed light; stars and twins' points not
            (lensed if p.lensed else unlensed)[i] += im.point_source(s["kwargs_ps"], s["kwargs_lens"], k=k)
        psfs.append(s["psf"])
        zps.append(s["zero_point"])
    return observe(system, survey, rng, lensed=lensed, unlensed=unlensed, psfs=psfs, zero_points=zps)


def observe(system: System, survey: SurveySpec, rng: np.random.Generator, *, lensed: np.ndarray,
            unlensed: np.ndarray, psfs, zero_points) -> RenderedCutout:
    """The survey's view of noiseless light (bands, H, W) in e-/s: the object's misregistration, the
    ``SingleBand`` noise model (its variance from the light), a residual background gradient, and the truth."""
    from lenstronomy.SimulationAPI.observation_api import SingleBand

    obs = system.observation
    lensed, unlensed = np.array(lensed, dtype=float), np.array(unlensed, dtype=float)  # never the caller's arrays
    n = lensed.shape[-1]
    variance = np.zeros_like(lensed)
    for i, band in enumerate(survey.band_names):
        if obs.get("shift_px"):  # the band's sub-pixel misregistration, on the noiseless light
            from scipy.ndimage import shift

            dx, dy = obs["shift_px"][band]
            lensed[i] = shift(lensed[i], (dy, dx), order=1, mode="constant")
            unlensed[i] = shift(unlensed[i], (dy, dx), order=1, mode="constant")
        noise = SingleBand(**_noise_kwargs(survey, band, system))
        variance[i] = noise.estimate_noise(lensed[i] + unlensed[i]) ** 2
    image = lensed + unlensed + rng.standard_normal(lensed.shape) * np.sqrt(variance)
    if obs.get("gradient_sigma"):  # a residual background plane, in units of each band's sky noise
        ramp = (np.arange(n) - (n - 1) / 2) / n
        a = obs["gradient_angle"]
        plane = math.cos(a) * ramp[None, :] + math.sin(a) * ramp[:, None]
        sky_sigma = np.sqrt(variance.min(axis=(1, 2)))
        image = image + obs["gradient_sigma"] * sky_sigma[:, None, None] * plane[None]
    r = survey.band_names.index(survey.band(survey.reference_band).name)
    total = float(lensed[r].sum() + unlensed[r].sum())
    flux_ratio = float(lensed[r].sum() / total) if total > 0 else 0.0
    return RenderedCutout(system=system, bands=survey.band_names, image=image, variance=variance,
                          lensed=lensed, unlensed=unlensed, psf=tuple(psfs), zero_points=tuple(zero_points),
                          flux_ratio=flux_ratio)


# --------------------------------------------------------------------------- populations


def _member(survey: SurveySpec, family: Family, seed: int, index: int) -> tuple[System, np.random.Generator]:
    """Object ``index`` of the (survey, family, seed) population, and its generator (for its noise)."""
    if family.population == "cluster":
        raise ValueError(f"family {family.name} draws cluster fields: simulate them with "
                         f"science.clusters.fields (the cluster_fields asset), not as galaxy cutouts")
    rng = object_rng(survey.name, family.name, seed, index)
    objid = objid_for(survey.name, family.name, seed, index)
    if family.population == "physical":  # twins are paired with their lenses
        from .population import population_system

        return population_system(family, survey, seed, index, objid=objid, rng=rng), rng
    return draw_system(family, survey, rng, objid=objid), rng


def simulate_one(survey: SurveySpec, family: Family, seed: int, index: int) -> RenderedCutout:
    """Object ``index`` of the (survey, family, seed) population."""
    system, rng = _member(survey, family, seed, index)
    return render_system(system, survey, rng)


def write_cutout(cutout: RenderedCutout, out_dir, *, survey: SurveySpec, family: Family, seed: int,
                 labeled: bool = True, role: str = "train", label_source: str = LENSTRONOMY_LABEL_SOURCE) -> dict:
    """Write ``cutout`` as ``<out_dir>/<objid>.fits`` (the inbox contract; ``LABELSRC`` ``label_source``, the code
    that drew its light) and return its truth row (the columns of :func:`simulate_to_directory`'s table)."""
    from .fits_contract import write_simulated_cutout

    path = Path(out_dir) / f"{cutout.system.objid}.fits"
    write_simulated_cutout(path, cutout, survey=survey, family=family, seed=seed, labeled=labeled, role=role,
                           label_source=label_source)
    s = cutout.system
    return {"objid": s.objid, "file": path.name, "label": int(s.is_lens), "kind": s.kind,
            "flux_ratio": cutout.flux_ratio, "theta_e": s.theta_e_arcsec, "arc_snr": cutout.arc_snr,
            "seeing_ref": s.psf_fwhm_arcsec[survey.band(survey.reference_band).name]}


def _simulate_and_write(args) -> dict:
    survey, family, seed, index, out_dir, labeled, role = args
    return write_cutout(simulate_one(survey, family, seed, index), out_dir, survey=survey, family=family, seed=seed,
                        labeled=labeled, role=role)


def simulate_to_directory(survey: SurveySpec, family: Family, *, n_cutouts: int, seed: int, out_dir: Path,
                          workers: int = 1, progress: bool = True, start_index: int = 0, labeled: bool = True,
                          role: str = "train"):
    """Simulate ``n_cutouts`` objects and write each as ``<objid>.fits`` in ``out_dir``
    (``labeled=False`` leaves the truth out of the files, as in an unlabeled survey drop; ``role``: their
    ``SIMROLE``, ``"heldout"`` for a held-out family).

    Returns ``(truth, seconds)``: a DataFrame with one row per object (objid,
    file, label, kind, flux_ratio, theta_e, seeing_ref) and the wall time.
    """
    import pandas as pd

    from .fits_contract import check_sim_role
    from .parallel import parallel_map

    if n_cutouts < 1:
        raise ValueError(f"n_cutouts must be >= 1, got {n_cutouts}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _warm_up(survey)  # imports and the pixel grid (pool workers, started by a forkserver, do it themselves)
    check_sim_role(role)  # before any worker starts
    tasks = [(survey, family, seed, i, str(out_dir), labeled, role)
             for i in range(start_index, start_index + n_cutouts)]
    t0 = time.perf_counter()
    rows = parallel_map(_simulate_and_write, tasks, workers=workers, progress=progress,
                        desc=f"simulate {survey.name}/{family.name}", unit="cutout")
    return pd.DataFrame(rows), time.perf_counter() - t0


LENSING_ONLY = "lensing_only"  # SIMFAM of the lens/twin pairs: the same scene with and without deflection


def _simulate_pair_and_write(args) -> list[dict]:
    from dataclasses import replace

    from .fits_contract import write_simulated_cutout
    from .population import build_system, draw_scene

    survey, family, seed, index, out_dir = args
    rng = object_rng(survey.name, f"{family.name}-{LENSING_ONLY}", seed, index)
    scene = draw_scene(family, survey, rng)
    base = objid_for(survey.name, LENSING_ONLY, seed, index)
    pos = _sky_position(survey, rng)
    pair_family = replace(family, name=LENSING_ONLY)  # files say SIMFAM lensing_only, SIMFAMH the family's hash
    rows = []
    for role in ("lens", "twin"):
        system = replace(build_system(scene, role, family, survey, rng, objid=f"{base}-{role}", **pos), pair_id=base)
        cutout = render_system(system, survey, rng)
        path = Path(out_dir) / f"{system.objid}.fits"
        write_simulated_cutout(path, cutout, survey=survey, family=pair_family, seed=seed, role="pairs")
        rows.append({"objid": system.objid, "file": path.name, "label": int(system.is_lens), "kind": system.kind,
                     "flux_ratio": cutout.flux_ratio, "theta_e": system.theta_e_arcsec, "arc_snr": cutout.arc_snr,
                     "seeing_ref": system.psf_fwhm_arcsec[survey.band(survey.reference_band).name],
                     "pair_id": base})
    return rows


def simulate_pairs_to_directory(survey: SurveySpec, family: Family, *, n_pairs: int, seed: int, out_dir: Path,
                                workers: int = 1, progress: bool = True):
    """``n_pairs`` lens/twin pairs of a physical ``family``: each scene once lensed and once with the deflection
    switched off (its source unlensed, as bright as its images), the two files sharing ``PAIRID``,
    ``SIMFAM = "lensing_only"`` and ``SIMROLE = "pairs"``. What separates a pair is lensing alone: the finder's
    AUROC on them is the lensing-only AUROC. Returns ``(truth, seconds)`` like :func:`simulate_to_directory`, two
    rows a pair.
    """
    import pandas as pd

    from .parallel import parallel_map

    if family.population != "physical":
        raise ValueError(f"family {family.name}: lens/twin pairs need a physical family (population = 'physical'), "
                         f"got population {family.population!r}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _warm_up(survey)
    t0 = time.perf_counter()
    pairs = parallel_map(_simulate_pair_and_write, [(survey, family, seed, i, str(out_dir)) for i in range(n_pairs)],
                         workers=workers, progress=progress, desc=f"simulate {survey.name}/{LENSING_ONLY}",
                         unit="pair")
    return pd.DataFrame([r for pair in pairs for r in pair]), time.perf_counter() - t0


def _warm_up(survey: SurveySpec) -> None:
    import lenstronomy.ImSim.image_model  # noqa: F401
    import lenstronomy.LensModel.Solver.lens_equation_solver  # noqa: F401
    import lenstronomy.PointSource.point_source  # noqa: F401
    import lenstronomy.SimulationAPI.observation_api  # noqa: F401

    _data_class(survey)


def summarize_truth(truth, survey: SurveySpec) -> dict:
    """Counts and the hard share of a simulated population (for asset metadata)."""
    lenses = truth[truth["label"] == 1]
    out = {
        "n_cutouts": int(len(truth)),
        "n_lenses": int(len(lenses)),
        "n_nonlenses": int((truth["label"] == 0).sum()),
        "by_kind": {k: int(v) for k, v in truth["kind"].value_counts().sort_index().items()},
    }
    if len(lenses):
        out["lens_share_flux_ratio_lt_0.1"] = float((lenses["flux_ratio"] < 0.1).mean())
        out["lens_share_theta_e_below_seeing"] = float((lenses["theta_e"] < lenses["seeing_ref"]).mean())
    return out


def systems_for(survey: SurveySpec, family: Family, seed: int, indices: Sequence[int]) -> list[System]:
    """Draw (without rendering) the systems of a population: for benchmarks and inspection."""
    return [_member(survey, family, seed, i)[0] for i in indices]
