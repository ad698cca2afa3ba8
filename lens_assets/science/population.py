"""A physical lens population: scenes drawn from the sky's relations, lenses and non-lenses alike.

A *scene* is a deflector galaxy, a background source behind it and the
environment around them, drawn so that the joint distribution of Einstein
radius, deflector brightness, source brightness and flux ratio follows the
sky's (for ``population = "physical"`` families, ``families/physical.toml``):

* Velocity dispersion σ from the early-type velocity-dispersion function of
  Choi, Park & Vogeley (2007, ApJ 658, 884), ``φ(σ) ∝ (σ/σ*)^α exp(-(σ/σ*)^β) / σ``,
  weighted by the lensing cross-section (∝ θE² ∝ σ⁴).
* Redshifts jointly: the source's from ``p(z) ∝ z² exp(-(z/z0)^1.5)`` (faint
  galaxy counts), the deflector's from the comoving volume ``dV/dz`` (no
  evolution in the number density) times the cross-section's ``(D_ls/D_s)²``;
  the source redshift is weighted by the optical depth that this gives
  (Turner, Ostriker & Gott 1984). Distances from ``astropy.cosmology``.
* θE of the singular isothermal sphere, ``4π (σ/c)² D_ls / D_s``.
* Deflector light: Faber–Jackson (``L ∝ σ⁴``) for M_r with scatter, the
  early-type size–luminosity relation of Shen et al. (2003, MNRAS 343, 978)
  for its half-light radius, and a red sequence whose observed-frame slope
  reddens with redshift (the 4000 Å break moving through the bands).
  Apparent magnitudes carry the power-law K-correction of the family's
  colour model (``f_ν ∝ λ^β``).
* Sources from number counts ``dN/dm ∝ 10^(0.3 m)``, with sizes from the
  size–luminosity–redshift relation of star-forming galaxies of Shibuya et al.
  (2015, ApJS 219, 15).
* Selection as in Collett (2015, ApJ 811, 20): a scene is kept only when the
  survey could see its lensing (arc S/N against the sky and the deflector's
  photon noise, total magnification, and images
  resolved: θE² > r_s² + (s/2)² for source half-light radius r_s and seeing
  FWHM s). Non-lenses are drawn from the same selected scenes, so the galaxy,
  source and environment populations are the same for both classes.

Non-lenses (``build_system``): a *twin* is the same scene with the deflection
switched off, the source at its unlensed position with its flux matched to the
lensed flux (so the total light and colour agree with the lens; only the
distortion differs); the other types put lens-like unlensed structure (compact
blobs, a blue core, a star, a ring or spiral of knots) with the lensed
source's flux and colour beside the deflector, or give it a second nucleus.
Every scene gets the same environment (neighbours, satellites, stars).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from .families import Family
from .surveys import SurveySpec

__all__ = ["Scene", "draw_scene", "build_system", "population_system", "pair_layout", "theta_e_sis_arcsec",
           "lensed_source_check", "lensed_image", "arc_snr", "render_exposure_factor",
           "foreground_image", "redshift_tables", "C_KMS"]

C_KMS = 299_792.458
RAD_TO_ARCSEC = 180.0 / math.pi * 3600.0


def theta_e_sis_arcsec(sigma_kms, dls_over_ds):
    """Einstein radius of a singular isothermal sphere: ``4π (σ/c)² D_ls/D_s``, in arcsec."""
    return 4.0 * math.pi * (np.asarray(sigma_kms) / C_KMS) ** 2 * np.asarray(dls_over_ds) * RAD_TO_ARCSEC


@lru_cache(maxsize=8)
def _cosmology(h0: float, om0: float):
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=h0, Om0=om0)


@dataclass(frozen=True)
class RedshiftTables:
    """Grids for the joint (z_l, z_s) draw and the distances each scene needs."""

    zl: np.ndarray
    zs: np.ndarray
    weight: np.ndarray  # (nl, ns): dV/dz_l (D_ls/D_s)^2, 0 where z_l >= z_s
    p_zs: np.ndarray  # (ns,) normalized
    dls_over_ds: np.ndarray  # (nl, ns)
    da_l_kpc: np.ndarray  # (nl,) angular diameter distance
    da_s_kpc: np.ndarray  # (ns,)
    dm_l: np.ndarray  # (nl,) distance modulus
    dm_s: np.ndarray  # (ns,)


@lru_cache(maxsize=8)
def redshift_tables(h0: float, om0: float, zl_min: float, zl_max: float, zs_min: float, zs_max: float,
                    z0: float) -> RedshiftTables:
    """The (z_l, z_s) weights of the lensing optical depth on a grid (computed once per cosmology)."""
    cosmo = _cosmology(h0, om0)
    zl = np.linspace(zl_min, zl_max, 221)
    zs = np.linspace(zs_min, zs_max, 171)
    da_l = cosmo.angular_diameter_distance(zl).to("kpc").value
    da_s = cosmo.angular_diameter_distance(zs).to("kpc").value
    behind = zl[:, None] < zs[None, :] - 0.05
    # D_ls = (D_M(z_s) - D_M(z_l)) / (1 + z_s) in a flat universe (Hogg 1999, eq. 19)
    dm_l, dm_s = cosmo.comoving_transverse_distance(zl).to("kpc").value, cosmo.comoving_transverse_distance(zs).to(
        "kpc").value
    dls = (dm_s[None, :] - dm_l[:, None]) / (1.0 + zs[None, :])
    ratio = np.where(behind, dls / da_s[None, :], 0.0)
    dvdz = cosmo.differential_comoving_volume(zl).value
    weight = dvdz[:, None] * ratio**2
    p_zs = zs**2 * np.exp(-((zs / z0) ** 1.5)) * weight.sum(axis=0)
    return RedshiftTables(zl=zl, zs=zs, weight=weight, p_zs=p_zs / p_zs.sum(), dls_over_ds=ratio,
                          da_l_kpc=da_l, da_s_kpc=da_s, dm_l=cosmo.distmod(zl).value, dm_s=cosmo.distmod(zs).value)


@lru_cache(maxsize=8)
def _sigma_cdf(sigma_star: float, alpha: float, beta: float, lo: float, hi: float):
    s = np.linspace(lo, hi, 2001)
    x = s / sigma_star
    pdf = x**alpha * np.exp(-(x**beta)) / s * s**4  # VDF times the cross-section
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(s))])
    return s, cdf / cdf[-1]


def _power_law_mag(rng, slope: float, lo: float, hi: float) -> float:
    """A magnitude from dN/dm ∝ 10^(slope m) on [lo, hi] (inverse CDF)."""
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return float(math.log10(a + rng.uniform() * (b - a)) / slope)


def _observed_mag(abs_mag: float, distmod: float, z: float, beta: float, wavelength_nm: float,
                  rest_wavelength_nm: float) -> float:
    """Apparent AB magnitude at ``wavelength_nm`` of an object with ``f_ν ∝ λ^β`` whose absolute magnitude is
    ``abs_mag`` at ``rest_wavelength_nm``: ``M + DM − 2.5 log10(1+z) − 2.5 β log10(λ_obs / ((1+z) λ_rest))``."""
    return (abs_mag + distmod - 2.5 * math.log10(1.0 + z)
            - 2.5 * beta * math.log10(wavelength_nm / ((1.0 + z) * rest_wavelength_nm)))


@dataclass
class Scene:
    """A deflector, its lensing, a source, the environment and the observing conditions of one object."""

    sigma_kms: float  # the deflector galaxy's (its light follows it)
    group_sigma_kms: float  # the group halo's it sits in (0: none); the lens's theta_E is the sum of both SIS's
    z_lens: float
    z_source: float
    theta_e_arcsec: float
    kwargs_lens: tuple
    galaxy: dict  # Sersic truth of the deflector's light (n, r_eff, q, pa)
    galaxy_mag: float
    galaxy_beta: float
    source_kind: str  # 'extended' | 'quasar'
    source_xy: tuple
    source_components: list  # LightComponent, lensed=True
    quasar: dict | None  # mag, beta (lensed point source), None for an extended source
    magnification: float  # total of the extended source (or the quasar host)
    arc_snr_ref: float  # quick reference-band S/N of the lensed source light (selection)
    environment: list  # LightComponent / PointComponent, unlensed
    psf_profile: str
    psf_fwhm_arcsec: dict
    moffat_beta: float
    exposure_scale: float
    observation: dict = field(default_factory=dict)
    tries: int = 1

    @property
    def arc_mag(self) -> float:
        """Reference-band magnitude of the lensed source light (its unlensed magnitude brightened by μ)."""
        if self.quasar is not None:
            return self.quasar["mag"] - 2.5 * math.log10(self.magnification)
        flux = sum(10 ** (-0.4 * c.mag_ref) for c in self.source_components)
        return -2.5 * math.log10(flux * self.magnification)

    @property
    def source_beta(self) -> float:
        return self.quasar["beta"] if self.quasar is not None else self.source_components[0].color_beta


def _environment(family: Family, rng, galaxy_mag: float) -> list:
    from .simulation import LightComponent, PointComponent, _polar, _sersic

    d = family.draw
    e = "environment"
    out: list = []
    for _ in range(d(e, "n_neighbours", rng)):
        c = _polar(d(e, "neighbour_distance_arcsec", rng), rng.uniform(0, 2 * math.pi))
        out.append(LightComponent("SERSIC_ELLIPSE", _sersic(c, n=rng.uniform(0.8, 4.0),
                                                            r_eff=d(e, "neighbour_r_eff_arcsec", rng),
                                                            q=rng.uniform(0.3, 1.0), pa=rng.uniform(0, 180)),
                                  d(e, "neighbour_mag", rng), d(e, "neighbour_color_beta", rng), lensed=False))
    if rng.uniform() < d(e, "satellite_fraction", rng):
        c = _polar(d(e, "satellite_distance_arcsec", rng), rng.uniform(0, 2 * math.pi))
        out.append(LightComponent("SERSIC_ELLIPSE", _sersic(c, n=rng.uniform(1.0, 4.0),
                                                            r_eff=d(e, "satellite_r_eff_arcsec", rng),
                                                            q=rng.uniform(0.4, 1.0), pa=rng.uniform(0, 180)),
                                  galaxy_mag + d(e, "satellite_mag_offset", rng), d(e, "satellite_color_beta", rng),
                                  lensed=False))
    if rng.uniform() < d(e, "star_fraction", rng):
        c = _polar(d(e, "star_distance_arcsec", rng), rng.uniform(0, 2 * math.pi))
        out.append(PointComponent((c[0],), (c[1],), (1.0,), d(e, "star_mag", rng), d(e, "star_color_beta", rng),
                                  lensed=False))
    return out


def _observation(family: Family, survey: SurveySpec, rng) -> dict:
    d = family.draw
    o = "observation"
    shift = d(o, "misregistration_px", rng)
    out = {
        "zero_point_error_mag": {b: float(d(o, "zero_point_error_mag", rng)) for b in survey.band_names},
        "shift_px": {b: (float(rng.uniform(-shift, shift)), float(rng.uniform(-shift, shift)))
                     for b in survey.band_names},
        "gradient_sigma": float(d(o, "background_gradient_sigma", rng)),
        "gradient_angle": float(rng.uniform(0, 2 * math.pi)),
        "write_variance": bool(rng.uniform() >= d(o, "variance_withheld_fraction", rng)),
        "sky_scale": float(d("noise", "sky_scale", rng)),
        "read_noise_scale": float(d("noise", "read_noise_scale", rng)),
        "crop_px": 0,
    }
    if rng.uniform() < d(o, "small_cutout_fraction", rng):
        # never below the area the finder needs (ingest refuses those as too_small)
        floor = math.ceil((survey.min_cutout_arcsec or survey.cutout_size_arcsec) / survey.pixel_scale_arcsec)
        side = max(floor, int(round(survey.cutout_size_px * d(o, "small_cutout_scale", rng))))
        out["crop_px"] = side
        non_square = d(o, "small_cutout_non_square_fraction", rng)
        if non_square > 0 and rng.uniform() < non_square:  # one axis only: (rows, columns); at 0 no draw is made
            n = survey.cutout_size_px
            out["crop_px"] = (side, n) if rng.uniform() < 0.5 else (n, side)
    return out


MAX_MAGNIFICATION = 40.0  # the cheap bound's magnification: twice the largest of 150 selected DES scenes (20)


@lru_cache(maxsize=64)
def _background_sigma(survey: SurveySpec) -> float:
    """Per-pixel background noise (e-/s) of the reference band at the nominal exposure."""
    from lenstronomy.SimulationAPI.observation_api import SingleBand

    ref = survey.band(survey.reference_band)
    return float(SingleBand(**survey.kwargs_single_band(ref.name)).estimate_noise(np.zeros(1))[0])


def _point_snr_bound(survey: SurveySpec, mag: float, fwhm_arcsec: float, exposure_scale: float) -> float:
    """Upper bound on the reference-band S/N of an unmagnified source of ``mag``: a point source with the
    optimal (PSF-weighted) filter against the background alone, ``F / (σ_bg sqrt(4π σ_psf² / pix²))``, with
    σ_bg scaled as 1/sqrt(exposure) (which ignores read noise, so the bound stays above the truth)."""
    ref = survey.band(survey.reference_band)
    flux = 10 ** (-0.4 * (mag - ref.magnitude_zero_point))
    sigma_px = fwhm_arcsec / survey.pixel_scale_arcsec / 2.3548
    n_eff = 4.0 * math.pi * max(sigma_px, 0.5) ** 2
    return flux / (_background_sigma(survey) / math.sqrt(exposure_scale) * math.sqrt(n_eff))


def foreground_image(components, *, n: int, pixel_scale: float, zero_point: float, supersample: int = 1,
                     core_px: int = 2, core_supersample: int = 16) -> np.ndarray:
    """Unlensed light (e-/s per pixel) of ``components`` centred on the stamp, for its photon noise.

    Sampled ``supersample`` times per pixel, and the central ``2 core_px`` pixels square
    ``core_supersample`` times: a compact deflector's cusp holds much of its light in those
    pixels, and coarse sampling there loses it (an n = 4, 0.1" Sersic on DES pixels: 54% of
    its flux sampled at pixel centres, 97.2% with the defaults, 99.7% sampled 16 / 64 times;
    the noise it sets is then within about 1.5%).
    """
    from .closed_form import surface_brightness
    from .simulation import _unit_flux

    def light(xs, ys):
        out = np.zeros(xs.size)
        for c in components:
            amp = 10 ** (-0.4 * (c.mag_ref - zero_point)) / _unit_flux(c)
            out += surface_brightness(xs.ravel(), ys.ravel(), c.profile, dict(c.shape, amp=amp))
        return out

    def binned(first_px: int, size_px: int, sub: int) -> np.ndarray:
        coords = (np.arange(size_px * sub) + 0.5) / sub * pixel_scale + (first_px - n / 2) * pixel_scale
        xs, ys = np.meshgrid(coords, coords)
        return light(xs, ys).reshape(size_px, sub, size_px, sub).sum(axis=(1, 3)) * (pixel_scale / sub) ** 2

    image = np.zeros((n, n))
    if not components:
        return image
    image[...] = binned(0, n, supersample)
    lo = n // 2 - core_px
    if lo >= 0:
        image[lo:lo + 2 * core_px, lo:lo + 2 * core_px] = binned(lo, 2 * core_px, core_supersample)
    return image


def lensed_source_check(kwargs_lens, components, *, survey: SurveySpec, fwhm_arcsec: float,
                        exposure_scale: float = 1.0, supersample: int = 2,
                        foreground=()) -> tuple[float, float]:
    """(total magnification, reference-band S/N) of lensed extended light, quickly, for the selection.

    Ray-shoots a supersampled grid through the lens, sums the source's surface
    brightness (magnification = lensed flux on the stamp / unlensed flux),
    smooths the binned image with a Gaussian of the seeing and computes the
    matched-filter S/N against the survey's sky, read and source noise, and the
    photon noise of the unlensed ``foreground`` light components (the deflector:
    the arcs are seen after its light is subtracted, which leaves its photon noise,
    as in Collett 2015's Poisson-limited lens subtraction). The two steps are
    :func:`lensed_image` and :func:`arc_snr`; the selection calls them apart so that a scene the magnification
    rejects never pays for its S/N.
    """
    image, mu = lensed_image(kwargs_lens, components, survey=survey, supersample=supersample)
    return mu, arc_snr(image, survey=survey, fwhm_arcsec=fwhm_arcsec, exposure_scale=exposure_scale,
                       foreground=foreground)


def lensed_image(kwargs_lens, components, *, survey: SurveySpec, supersample: int = 2,
                 backend: str = "closed_form") -> tuple[np.ndarray, float]:
    """The lensed light of ``components`` (e-/s per pixel, reference band, before the seeing) on the survey's stamp,
    from a ``supersample``d grid ray-shot through the SIE + shear, and its total magnification (lensed flux on the
    stamp / unlensed flux; 0 without flux).

    ``backend``: ``"closed_form"`` (:mod:`lens_assets.science.closed_form`, lenstronomy's profiles written out) or
    ``"lenstronomy"`` (``LensModel`` and ``LightModel``); the two agree to round-off, and the closed forms take
    under half the time (``benchmarks/bench_population.py``)."""
    from .simulation import _unit_flux

    n, pix = survey.cutout_size_px, survey.pixel_scale_arcsec
    coords = (np.arange(n * supersample) + 0.5) / supersample * pix - n * pix / 2
    if backend == "closed_form":
        from .closed_form import ray_shoot_sie_shear, surface_brightness

        bx, by = ray_shoot_sie_shear(coords, coords, kwargs_lens)

        def light(c, amp):
            return surface_brightness(bx, by, c.profile, dict(c.shape, amp=amp))
    elif backend == "lenstronomy":
        from lenstronomy.LensModel.lens_model import LensModel
        from lenstronomy.LightModel.light_model import LightModel

        x, y = np.meshgrid(coords, coords)
        bx, by = LensModel(["SIE", "SHEAR"]).ray_shooting(x.ravel(), y.ravel(), list(kwargs_lens))

        def light(c, amp):
            return LightModel([c.profile]).surface_brightness(bx, by, [dict(c.shape, amp=amp)]).reshape(x.shape)
    else:
        raise ValueError(f"lensed_image: backend {backend!r}; the backends are 'closed_form' and 'lenstronomy'")
    zp = survey.band(survey.reference_band).magnitude_zero_point
    total = np.zeros((n * supersample, n * supersample))
    unlensed = 0.0
    for c in components:
        flux = 10 ** (-0.4 * (c.mag_ref - zp))  # e-/s
        total += light(c, flux / _unit_flux(c))
        unlensed += flux
    img = total.reshape(n, supersample, n, supersample).sum(axis=(1, 3)) * (pix / supersample) ** 2
    return img, (float(img.sum() / unlensed) if unlensed > 0 else 0.0)


def arc_snr(image: np.ndarray, *, survey: SurveySpec, fwhm_arcsec: float, exposure_scale: float = 1.0,
            foreground=(), below: float | None = None) -> float:
    """Reference-band matched-filter S/N of the lensed light ``image`` (:func:`lensed_image`) seen through a
    Gaussian seeing of ``fwhm_arcsec``, against the sky, read and source noise and the photon noise of the
    ``foreground`` components (:func:`lensed_source_check`).

    ``below``: when the S/N without the foreground's photon noise is already under it, that S/N is returned without
    drawing the foreground. The foreground only adds variance, so the full S/N is lower still and a test
    ``snr < below`` decides alike; most scenes the selection rejects for their S/N are rejected so (819 of 824 in
    200 physical DES scenes), and the foreground image is what the S/N costs most."""
    from lenstronomy.SimulationAPI.observation_api import SingleBand
    from scipy.ndimage import gaussian_filter

    pix = survey.pixel_scale_arcsec
    ref = survey.band(survey.reference_band)
    sigma_px = fwhm_arcsec / pix / 2.3548
    img = gaussian_filter(image, sigma_px, mode="constant")
    noise = SingleBand(**survey.kwargs_single_band(ref.name, exposure_scale=exposure_scale))
    if below is not None and len(foreground):
        bound = float(np.sqrt(np.sum(img**2 / noise.estimate_noise(img) ** 2)))
        if bound < below:
            return bound
    if len(foreground):
        front = foreground_image(foreground, n=survey.cutout_size_px, pixel_scale=pix,
                                 zero_point=ref.magnitude_zero_point)
        light = img + gaussian_filter(front, sigma_px, mode="constant")
    else:
        light = img
    var = noise.estimate_noise(light) ** 2
    return float(np.sqrt(np.sum(img**2 / var)))


def _deflector_light(galaxy: dict, mag: float, beta: float):
    """The deflector's Sersic light (``galaxy``: n, r_eff, q, pa) at the stamp's centre, unlensed."""
    from .simulation import LightComponent, _sersic

    return LightComponent("SERSIC_ELLIPSE", _sersic((0.0, 0.0), n=galaxy["n"], r_eff=galaxy["r_eff"], q=galaxy["q"],
                                                    pa=galaxy["pa"]), mag, beta, lensed=False)


def draw_scene(family: Family, survey: SurveySpec, rng: np.random.Generator) -> Scene:
    """Draw a scene the survey could see as a lens (redrawn until the selection keeps it)."""
    from .simulation import LightComponent, _draw_seeing, _polar, _sersic

    d = family.draw
    cos = family.sections["cosmology"]
    dfl = "deflector"
    tables = redshift_tables(float(cos["H0"].sample(rng)), float(cos["Om0"].sample(rng)),
                             d(dfl, "z_min", rng), d(dfl, "z_max", rng), d("source", "z_min", rng),
                             d("source", "z_max", rng), d("source", "z0", rng))
    s_grid, s_cdf = _sigma_cdf(d(dfl, "vdf_sigma_star_kms", rng), d(dfl, "vdf_alpha", rng), d(dfl, "vdf_beta", rng),
                               d(dfl, "sigma_min_kms", rng), d(dfl, "sigma_max_kms", rng))
    sel = "selection"
    ref = survey.band(survey.reference_band)
    max_tries = int(d(sel, "max_tries", rng))
    for tries in range(1, max_tries + 1):
        fwhm = _draw_seeing(family, survey, rng)
        sigma = float(np.interp(rng.uniform(), s_cdf, s_grid))
        j = int(rng.choice(len(tables.zs), p=tables.p_zs))
        w = tables.weight[:, j]
        i = int(rng.choice(len(tables.zl), p=w / w.sum()))
        z_l, z_s = float(tables.zl[i]), float(tables.zs[j])
        group_sigma = 0.0
        group_fraction = d(dfl, "group_fraction", rng)
        if group_fraction > 0 and rng.uniform() < group_fraction:  # no draw at 0: galaxy-only scenes stay as they were
            group_sigma = d(dfl, "group_sigma_kms", rng)
            # the group's central galaxy is a massive early type: its sigma from the same VDF above the floor
            lo = float(np.interp(d(dfl, "group_central_sigma_min_kms", rng), s_grid, s_cdf))
            sigma = float(np.interp(lo + rng.uniform() * (1.0 - lo), s_cdf, s_grid))
        theta_e = float(theta_e_sis_arcsec(sigma, tables.dls_over_ds[i, j])
                        + theta_e_sis_arcsec(group_sigma, tables.dls_over_ds[i, j]))  # 0 without a group
        if not (d(sel, "min_theta_e_over_fwhm", rng) * fwhm[ref.name] <= theta_e <= d(sel, "max_theta_e_arcsec", rng)):
            continue
        # deflector light
        ll = "lens_light"
        m_abs = d(ll, "fj_mag_at_200", rng) - 10.0 * math.log10(sigma / 200.0) + rng.normal(
            0, d(ll, "fj_scatter_mag", rng))
        beta_l = d(ll, "color_beta_at_z0", rng) + d(ll, "color_beta_per_z", rng) * z_l + rng.normal(
            0, d(ll, "color_beta_scatter", rng))
        gal_mag = _observed_mag(m_abs, tables.dm_l[i], z_l, beta_l, ref.wavelength_nm, d(ll, "rest_wavelength_nm", rng))
        r_kpc = 10 ** (-0.4 * d(ll, "size_a", rng) * m_abs + d(ll, "size_b", rng)) * math.exp(
            rng.normal(0, d(ll, "size_ln_scatter", rng)))
        r_eff = float(np.clip(r_kpc / tables.da_l_kpc[i] * RAD_TO_ARCSEC, 0.1, 6.0))
        q_mass = d(dfl, "axis_ratio", rng)
        pa = d(dfl, "position_angle_deg", rng)
        galaxy = {"n": d(ll, "sersic_n", rng), "r_eff": r_eff,
                  "q": float(np.clip(q_mass + d(ll, "axis_ratio_scatter", rng), 0.2, 1.0)),
                  "pa": (pa + d(ll, "position_angle_scatter_deg", rng)) % 180.0}
        from lenstronomy.Util.param_util import shear_polar2cartesian

        from .simulation import _ellipticity

        e1, e2 = _ellipticity(q_mass, pa)
        g1, g2 = shear_polar2cartesian(math.radians(d(dfl, "shear_angle_deg", rng)), d(dfl, "shear", rng))
        kwargs_lens = ({"theta_E": theta_e, "e1": e1, "e2": e2, "center_x": 0.0, "center_y": 0.0},
                       {"gamma1": float(g1), "gamma2": float(g2), "ra_0": 0.0, "dec_0": 0.0})
        # source
        src = "source"
        b = d(src, "max_offset", rng) * theta_e * math.sqrt(rng.uniform())
        xy = _polar(b, rng.uniform(0, 2 * math.pi))
        beta_s = d(src, "color_beta", rng)
        src_mag = _power_law_mag(rng, d(src, "count_slope", rng), d(src, "mag_min", rng), d(src, "mag_max", rng))
        # size from the size-luminosity-redshift relation (flat f_nu: M_UV ~ m - DM + 2.5 log10(1+z))
        m_uv = src_mag - tables.dm_s[j] + 2.5 * math.log10(1.0 + z_s)
        lum = 10 ** (-0.4 * (m_uv - d(src, "m_uv_star", rng)))
        re_kpc = (d(src, "r_l_star_kpc", rng) * (1.0 + z_s) ** (-d(src, "size_z_slope", rng))
                  * lum ** d(src, "size_l_slope", rng) * math.exp(rng.normal(0, d(src, "size_ln_scatter", rng))))
        re_src = float(np.clip(re_kpc / tables.da_s_kpc[j] * RAD_TO_ARCSEC, 0.03, 1.5))
        # Collett (2015): the images are resolved when theta_E^2 > r_s^2 + (s/2)^2 (source half-light radius r_s,
        # seeing FWHM s); the cheap theta_E >= s/2 test above is this with r_s = 0
        if theta_e**2 < (d(sel, "min_theta_e_over_fwhm", rng) * fwhm[ref.name]) ** 2 + (
                d(sel, "source_size_in_resolution", rng) * re_src) ** 2:
            continue
        clumpy = rng.uniform() < d(src, "clumpy_fraction", rng)
        f_clumps = d(src, "clump_flux_fraction", rng) if clumpy else 0.0
        comps = [LightComponent("SERSIC_ELLIPSE", _sersic(xy, n=d(src, "sersic_n", rng), r_eff=re_src,
                                                          q=d(src, "axis_ratio", rng), pa=rng.uniform(0, 180)),
                                src_mag - 2.5 * math.log10(1.0 - f_clumps), beta_s, lensed=True)]
        if clumpy:
            shares = rng.dirichlet(np.ones(d(src, "n_clumps", rng))) * f_clumps
            for share in shares:
                off = rng.normal(0.0, re_src, size=2)
                comps.append(LightComponent("GAUSSIAN", {"sigma": d(src, "clump_sigma_arcsec", rng),
                                                         "center_x": xy[0] + off[0], "center_y": xy[1] + off[1]},
                                            src_mag - 2.5 * math.log10(share),
                                            beta_s + d(src, "clump_color_beta_offset", rng), lensed=True))
        exposure = d("noise", "exposure_scale", rng)
        # no magnification a source could plausibly get brings it to min_arc_snr: skip the ray tracing
        if _point_snr_bound(survey, src_mag, fwhm[ref.name], exposure) * MAX_MAGNIFICATION < d(sel, "min_arc_snr", rng):
            continue
        deflector = [_deflector_light(galaxy, gal_mag, beta_l)] if d(sel, "deflector_photon_noise", rng) else []
        # lensed_source_check in its two steps, the S/N only for what the magnification keeps (the same draws)
        image, mu = lensed_image(kwargs_lens, comps, survey=survey)
        if mu < d(sel, "min_magnification", rng):
            continue
        min_snr = d(sel, "min_arc_snr", rng)
        snr = arc_snr(image, survey=survey, fwhm_arcsec=fwhm[ref.name], exposure_scale=exposure,
                      foreground=deflector, below=min_snr)
        if snr < min_snr:
            continue
        # a share of the selected sources host a quasar (drawn after the selection, so the share is the prior's)
        kind, quasar = d(src, "kind", rng), None
        if kind == "quasar":
            q_mag = d("quasar", "mag", rng)
            quasar = {"mag": q_mag, "beta": d("quasar", "color_beta", rng)}
            host = q_mag + d("quasar", "host_mag_offset", rng)
            comps = [replace(c, mag_ref=c.mag_ref + host - src_mag) for c in comps[:1]]
        profile = d("psf", "profile", rng)
        return Scene(sigma_kms=sigma, group_sigma_kms=group_sigma, z_lens=z_l, z_source=z_s, theta_e_arcsec=theta_e,
                     kwargs_lens=kwargs_lens,
                     galaxy=galaxy, galaxy_mag=gal_mag, galaxy_beta=beta_l, source_kind=kind, source_xy=xy,
                     source_components=comps, quasar=quasar, magnification=mu, arc_snr_ref=snr,
                     environment=_environment(family, rng, gal_mag), psf_profile=profile, psf_fwhm_arcsec=fwhm,
                     moffat_beta=d("psf", "moffat_beta", rng), exposure_scale=exposure,
                     observation=_observation(family, survey, rng), tries=tries)
    raise RuntimeError(f"family {family.name}: no scene passed the selection in {max_tries} tries on {survey.name} "
                       f"(check [selection] against the survey's depth and seeing)")


def build_system(scene: Scene, role: str, family: Family, survey: SurveySpec, rng: np.random.Generator, *,
                 objid: str, ra_deg: float, dec_deg: float):
    """The :class:`~.simulation.System` of ``scene`` as a lens (``role='lens'``) or as a non-lens type."""
    from .simulation import (LightComponent, PointComponent, System, _add_knots, _lensed_points, _polar, _sersic,
                             spiral_knot_positions)

    g = scene.galaxy
    comps: list = [_deflector_light(g, scene.galaxy_mag, scene.galaxy_beta)]
    points: list = []
    env_c = [c for c in scene.environment if isinstance(c, LightComponent)]
    env_p = [p for p in scene.environment if isinstance(p, PointComponent)]
    theta_e, kwargs_lens, z_source = scene.theta_e_arcsec, scene.kwargs_lens, scene.z_source
    mu = scene.magnification
    d = family.draw
    m = "mimics"
    if role == "lens":
        kind = scene.source_kind
        comps += scene.source_components
        if scene.quasar is not None:
            points.append(_lensed_points(kwargs_lens, scene.source_xy, scene.quasar["mag"], scene.quasar["beta"],
                                         survey))
    else:
        kind = role
        arc_mag, arc_beta = scene.arc_mag, scene.source_beta
        if role == "twin":  # the source unlensed at its own position, as bright as its images together
            comps += [replace(c, mag_ref=c.mag_ref - 2.5 * math.log10(mu), lensed=False)
                      for c in scene.source_components]
            if scene.quasar is not None:
                points.append(PointComponent((scene.source_xy[0],), (scene.source_xy[1],), (1.0,), arc_mag,
                                             arc_beta, lensed=False))
        elif role == "companion_blob":
            n_blobs = d(m, "blob_split", rng)
            for share in rng.dirichlet(np.ones(n_blobs)):
                c = _polar(d(m, "blob_distance_over_theta_e", rng) * theta_e, rng.uniform(0, 2 * math.pi))
                comps.append(LightComponent("SERSIC_ELLIPSE", _sersic(
                    c, n=rng.uniform(0.5, 2.0), r_eff=float(np.clip(scene.source_components[0].shape["R_sersic"]
                                                                    * rng.uniform(1.0, 2.5), 0.04, 0.6)),
                    q=rng.uniform(0.3, 1.0), pa=rng.uniform(0, 180)), arc_mag - 2.5 * math.log10(share), arc_beta,
                    lensed=False))
        elif role == "blue_core":
            off = rng.normal(0.0, 0.05, size=2)
            comps.append(LightComponent("SERSIC_ELLIPSE", _sersic(
                (float(off[0]), float(off[1])), n=rng.uniform(0.5, 1.5),
                r_eff=float(np.clip(0.3 * g["r_eff"] * rng.uniform(0.3, 1.0), 0.05, 1.0)), q=rng.uniform(0.5, 1.0),
                pa=rng.uniform(0, 180)), arc_mag, arc_beta, lensed=False))
        elif role == "binary_nucleus":
            c = _polar(d(m, "binary_separation_arcsec", rng), rng.uniform(0, 2 * math.pi))
            comps.append(LightComponent("SERSIC_ELLIPSE", _sersic(
                c, n=rng.uniform(2.0, 4.0), r_eff=float(np.clip(g["r_eff"] * rng.uniform(0.15, 0.4), 0.05, 2.0)),
                q=rng.uniform(0.6, 1.0), pa=rng.uniform(0, 180)),
                scene.galaxy_mag - 2.5 * math.log10(d(m, "binary_flux_ratio", rng)),
                scene.galaxy_beta + rng.normal(0, 0.2), lensed=False))
        elif role == "star_beside":
            c = _polar(d(m, "star_distance_over_theta_e", rng) * theta_e, rng.uniform(0, 2 * math.pi))
            points.append(PointComponent((c[0],), (c[1],), (1.0,), arc_mag, float(rng.normal(0.5, 0.8)),
                                         lensed=False))
        elif role == "ring":
            radius = d(m, "ring_radius_over_theta_e", rng) * theta_e
            n = d(m, "ring_n_knots", rng)
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            _add_knots(comps, family, rng, radius * np.cos(angles), radius * d(m, "ring_axis_ratio", rng)
                       * np.sin(angles), rng.uniform(0, math.pi), arc_mag, 1.0, arc_beta, section=m)
        elif role == "spiral":
            n = d(m, "spiral_n_knots", rng)
            pitch = math.radians(d(m, "spiral_pitch_deg", rng))
            x, y = spiral_knot_positions(rng, n, pitch_rad=pitch, r0_arcsec=max(0.3, 0.5 * g["r_eff"]),
                                         r_max_arcsec=1.8 * theta_e + 0.5)
            _add_knots(comps, family, rng, x, y, rng.uniform(0, math.pi), arc_mag, 1.0, arc_beta, section=m)
        else:
            raise ValueError(f"unknown non-lens type {role!r}")
        theta_e, kwargs_lens, z_source = 0.0, (), -1.0
    return System(objid=objid, is_lens=role == "lens", kind=kind, theta_e_arcsec=theta_e, kwargs_lens=kwargs_lens,
                  components=tuple(comps + env_c), points=tuple(points + env_p), psf_profile=scene.psf_profile,
                  psf_fwhm_arcsec=scene.psf_fwhm_arcsec, moffat_beta=scene.moffat_beta,
                  exposure_scale=scene.exposure_scale * render_exposure_factor(family), z_lens=scene.z_lens,
                  z_source=z_source, ra_deg=ra_deg,
                  dec_deg=dec_deg, galaxy=g, observation=scene.observation, scene_theta_e_arcsec=scene.theta_e_arcsec)


def render_exposure_factor(family: Family) -> float:
    """``[noise] render_exposure_factor``: the rendered cutout's exposure over the one the selection saw (1 in
    ``physical.toml``). Above 1 the same selected scenes are rendered with less noise: a ceiling experiment that
    separates what noise hides from what the finder does not learn (``bench_ablation.py`` lever ``deep=<f>``)."""
    prior = family.prior("noise", "render_exposure_factor")
    value = prior.params.get("value") if prior.dist == "constant" else None
    if value is None or not float(value) > 0:
        raise ValueError(f"family {family.name}: [noise] render_exposure_factor must be a positive number, got "
                         f"{prior.dist} {dict(prior.params)}")
    return float(value)


def pair_layout(family: Family) -> tuple[float, float, dict]:
    """How a physical population is laid out in blocks of two objects so that its twins are paired.

    A twin is the non-lens made of a lens's own scene, so twins come with their lenses: a block is a
    *pair* (object ``2b`` the lens, ``2b + 1`` its twin) with probability ``q = 2 (1 - L) t``, where ``L`` is
    the lens fraction and ``t`` the twins' share of the non-lens weights; otherwise its two objects are
    drawn independently, a lens with probability ``(L - (1 - L) t) / (1 - q)`` or one of the other
    non-lens types. Overall, lenses are ``L`` of the objects and twins ``(1 - L) t``, as the family says.
    Returns ``(q, lens probability in independent blocks, the other non-lens weights)``.
    """
    lens_fraction = family.lens_fraction
    weights = dict(family.negative_weights)
    twin = weights.pop("twin", 0.0)
    total = twin + sum(weights.values())
    t = twin / total if total > 0 else 0.0
    q = 2.0 * (1.0 - lens_fraction) * t
    if q > 1.0 or lens_fraction < (1.0 - lens_fraction) * t:
        raise ValueError(f"family {family.name}: twins are {t:.2f} of the non-lenses and lenses {lens_fraction:.2f} "
                         "of the objects; every twin needs its lens, so (1 - lens_fraction) * twin share must be "
                         "at most lens_fraction")
    p_lens = (lens_fraction - (1.0 - lens_fraction) * t) / (1.0 - q) if q < 1.0 else 1.0
    if not weights and p_lens < 1.0:
        raise ValueError(f"family {family.name}: non-lenses other than twins are needed for the unpaired objects")
    return q, p_lens, weights


def _block_rng(survey: str, family: str, seed: int, block: int) -> np.random.Generator:
    import zlib

    key = [int(seed), int(block), zlib.crc32(survey.encode()), zlib.crc32(family.encode()), 2]
    return np.random.default_rng(np.random.SeedSequence(key))


def population_system(family: Family, survey: SurveySpec, seed: int, index: int, *, objid: str, rng):
    """Object ``index`` of a physical population: a lens, its paired twin, or an unpaired object.

    ``rng`` is the object's own generator (its noise and decorations); the block's generator draws what the
    two objects of a pair share (the scene and the sky position). See :func:`pair_layout`.
    """
    from .simulation import _sky_position, objid_for

    q, p_lens, weights = pair_layout(family)
    block = index // 2
    brng = _block_rng(survey.name, family.name, seed, block)
    if brng.uniform() < q:  # a lens and its twin: one scene, one position
        scene = draw_scene(family, survey, brng)
        pos = _sky_position(survey, brng)
        role = "lens" if index % 2 == 0 else "twin"
        system = build_system(scene, role, family, survey, rng, objid=objid, **pos)
        return replace(system, pair_id=f"{objid_for(survey.name, family.name, seed, 2 * block)}-pair")
    if rng.uniform() < p_lens:
        role = "lens"
    else:
        names = list(weights)
        w = np.array([weights[n] for n in names])
        role = names[int(rng.choice(len(names), p=w / w.sum()))]
    scene = draw_scene(family, survey, rng)
    return build_system(scene, role, family, survey, rng, objid=objid, **_sky_position(survey, rng))
