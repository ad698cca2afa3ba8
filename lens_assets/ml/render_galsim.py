"""A held-out simulation family rendered by other code than lenstronomy: GalSim and caustics.

It is here in the ML layer, not in ``science/``, because the ray tracing uses caustics,
which runs on PyTorch, and docs/design.md keeps torch out of the science layer
(``lens_assets_tests/test_layers.py`` checks every import, also those inside functions).
It reads the family file (``science/families/galsim.toml``), the survey registry and
the FITS contract from the science layer and writes the same inbox-contract files
as :func:`lens_assets.science.simulation.simulate_to_directory`.

Rendering one cutout (all angles in arcsec on the sky, x along image columns):

* **Ray tracing.** A supersampled image-plane grid (``SUPERSAMPLE_TARGET_ARCSEC``:
  sub-pixels of at most ~0.09", at least 2 per pixel) is traced once to the source
  plane, beta = theta - alpha(theta), with a caustics ``SinglePlane`` of ``SIE``
  (``Rein`` = theta_E, the same convention as lenstronomy's SIE ``theta_E``; axis
  ratio ``q`` and angle ``phi`` in radians, as lenstronomy's ``phi_q2_ellipticity``)
  and ``ExternalShear`` (``gamma_1``, ``gamma_2`` as lenstronomy's ``gamma1``,
  ``gamma2``). Lensing is achromatic: one trace serves every band.
* **Source light.** Each lensed component (a GalSim ``Sersic``, GalSim
  ``RandomKnots`` knots convolved with a small Gaussian) is drawn once at unit
  flux with ``method='no_pixel'`` on a fine source-plane grid around it and
  interpolated bilinearly at the traced positions: surface brightness is
  conserved, so the lensed sub-pixel flux is SB(beta) x sub-pixel area. GalSim
  draws the whole grid in C++ in about a millisecond; evaluating ``xValue`` (or an
  ``InterpolatedImage``) per traced point is a Python call per point, ~40,000 per
  cutout. The fine grid's step is at most a fifth of the component's size, so
  bilinear interpolation is accurate to well under a percent of the flux.
* **PSF.** Per band a GalSim ``Kolmogorov`` (or ``Moffat``, or a Kolmogorov core
  plus Moffat wings), with the object's seeing and a small PSF shear. The lensed
  sub-pixel image is convolved with the PSF sampled at the sub-pixel scale
  (FFT, all bands in one call) and summed into pixels.
* **Unlensed light** (lens galaxy, neighbours, companions, stars, and a twin's
  source) is drawn by GalSim convolved with the band's PSF and the pixel
  (``method='auto'``) straight onto the survey grid: GalSim's k-space drawing
  integrates the Sersic cusp over pixels, which point sampling would not.
* **Quasars.** Image positions solve the lens equation by a fine-grid root search
  on caustics' ray tracing (local minima of |beta(theta) - beta_s| on a 0.02"
  grid, refined by Newton steps with a finite-difference Jacobian); caustics'
  own ``forward_raytrace`` fails on singular Jacobians at the SIE core. The
  magnifications are ``1 / det`` of the ray-tracing Jacobian by central differences
  (caustics' ``magnification`` compiles torch.func code for ~15 s per process).
* **Noise** in e-/s as lenstronomy's ``SingleBand`` estimates it, with the
  survey's ``kwargs_single_band`` scaled by the object's exposure:
  ``var = (N rn^2 + T sky pix^2) / T^2 + max(flux, 0) / T`` with ``T`` the total
  exposure, ``N`` the number of exposures, ``sky`` in e-/s/arcsec^2 from the sky
  brightness and the zero point.

Non-lenses: ``twin`` is the lens scene with deflection off, each source component
unlensed at its source-plane position with its flux multiplied by the
magnification it had in the lensed cutout (a quasar: the sum over its images), so
only the distortion differs; ``spiral_knots``, ``companion`` and ``superposed`` are
the family's own mimics. Lenses and non-lenses share the environment priors.
"""

from __future__ import annotations

import hashlib
import math
import time
import tomllib
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lens_assets.science.families import FAMILY_DIR, Prior, PriorDraws
from lens_assets.science.surveys import SurveySpec

__all__ = [
    "GalsimFamily",
    "GalsimScene",
    "GalsimCutout",
    "Light",
    "load_galsim_family",
    "draw_galsim_scene",
    "render_galsim_scene",
    "simulate_galsim_one",
    "simulate_galsim_to_directory",
    "write_galsim_cutout",
    "galsim_objid",
    "caustics_lens",
    "trace_to_source",
    "solve_lens_equation",
    "noise_variance",
    "RENDERER",
    "LABEL_SOURCE",
    "NEGATIVE_KINDS",
]

RENDERER = "galsim"
LABEL_SOURCE = "sim:galsim"
NEGATIVE_KINDS = ("twin", "spiral_knots", "companion", "superposed")
PSF_PROFILES = ("kolmogorov", "moffat", "core_wings")
SOURCE_KINDS = ("extended", "quasar")
SUPERSAMPLE_TARGET_ARCSEC = 0.09  # largest sub-pixel of the lensed light
SOURCE_GRID_MAX_PX = 301  # side of the fine source-plane grid a component is drawn on
WING_MOFFAT_BETA = 2.5
# GalSim tabulates a Sersic's Hankel transform per index n (and truncation ratio) and caches 100 of them:
# indices drawn on a 0.1 grid keep every profile in that cache (a new n costs ~20 ms to tabulate)
SERSIC_N_STEP = 0.1
SECTIONS: Mapping[str, tuple[str, ...]] = {
    "cosmology": ("h0", "omega_m"),
    "deflector": ("ln_theta_e_arcsec", "axis_ratio", "position_angle_deg", "shear", "shear_angle_deg", "redshift"),
    "lens_light": ("mag", "sersic_n", "r_eff_arcsec", "axis_ratio_offset", "position_angle_offset_deg",
                   "truncation_r_eff", "color_beta"),
    "source": ("kind", "redshift", "max_offset", "mag", "sersic_n", "r_eff_arcsec", "axis_ratio", "color_beta",
               "knots_probability", "n_knots", "knot_flux_fraction", "knot_sigma_arcsec", "knot_spread",
               "knot_color_beta_offset"),
    "quasar": ("mag", "host_mag_offset", "color_beta"),
    "psf": ("profile", "moffat_beta", "wing_flux_fraction", "wing_fwhm_scale", "ellipticity",
            "seeing_scatter_scale", "band_jitter"),
    "noise": ("exposure_scale",),
    "environment": ("n_neighbours", "neighbour_distance_arcsec", "neighbour_mag", "neighbour_r_eff_arcsec",
                    "neighbour_sersic_n", "neighbour_color_beta", "star_probability", "star_distance_arcsec",
                    "star_mag", "star_color_beta"),
    "mimics": ("spiral_n_segments", "spiral_knots_per_segment", "spiral_pitch_deg", "spiral_flux_fraction",
               "spiral_max_radius_arcsec", "spiral_color_beta", "companion_distance_arcsec",
               "companion_mag_offset", "companion_r_eff_arcsec", "companion_color_beta",
               "superposed_distance_arcsec", "superposed_mag"),
}
_CHOICES = {("source", "kind"): SOURCE_KINDS, ("psf", "profile"): PSF_PROFILES}


# --------------------------------------------------------------------------- the family


@dataclass(frozen=True)
class GalsimFamily(PriorDraws):
    """The priors of the GalSim/caustics family (``renderer = "galsim"``), read by :func:`load_galsim_family`."""

    name: str
    description: str
    lens_fraction: float
    sections: Mapping[str, Mapping[str, Prior]]
    negative_weights: Mapping[str, float]
    sha256: str  # of the file's bytes
    path: str
    renderer: str = RENDERER
    population: str = RENDERER


def load_galsim_family(name_or_path: str | Path) -> GalsimFamily:
    """Read a GalSim family by packaged name (``"galsim"``) or from a ``.toml`` path.

    Errors name the file, the section and the key: an unknown or missing section or
    key, a ``renderer`` other than ``"galsim"``, a malformed prior, a choice outside
    its valid set, a lens fraction outside [0, 1], negative weights.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = FAMILY_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise ValueError(f"{path}: no such GalSim family file (packaged families are in {FAMILY_DIR})")
    raw_bytes = path.read_bytes()
    where = path.name
    try:
        raw = tomllib.loads(raw_bytes.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: not valid TOML: {err}") from None
    if raw.get("renderer") != RENDERER:
        raise ValueError(f"{where}: renderer = {raw.get('renderer')!r}; a GalSim family needs renderer = "
                         f"{RENDERER!r}")
    for key in ("name", "lens_fraction", *SECTIONS, "negatives"):
        if key not in raw:
            raise ValueError(f"{where}: missing {'section [' + key + ']' if key in SECTIONS else repr(key)}")
    unknown_top = set(raw) - {"name", "renderer", "description", "lens_fraction", "negatives", *SECTIONS}
    if unknown_top:
        raise ValueError(f"{where}: unknown top-level keys or sections {sorted(unknown_top)}")
    lf = raw["lens_fraction"]
    if isinstance(lf, bool) or not isinstance(lf, (int, float)) or not 0.0 <= lf <= 1.0:
        raise ValueError(f"{where}: lens_fraction must be a number in [0, 1], got {lf!r}")
    sections: dict[str, dict[str, Prior]] = {}
    for section, keys in SECTIONS.items():
        table = raw[section]
        if not isinstance(table, Mapping):
            raise ValueError(f"{where}: [{section}] must be a table, got {table!r}")
        got, want = set(table), set(keys)
        if got != want:
            raise ValueError(f"{where}: [{section}] has unknown keys {sorted(got - want)} and lacks "
                             f"{sorted(want - got)}")
        sections[section] = {}
        for key in keys:
            prior = Prior.parse(table[key], where=f"{where} [{section}] {key}")
            valid = _CHOICES.get((section, key))
            if valid is not None:
                values = prior.params.get("values", [prior.params.get("value")])
                bad = [v for v in values if v not in valid]
                if bad:
                    raise ValueError(f"{where} [{section}] {key}: values {bad} are not among {list(valid)}")
            sections[section][key] = prior
    neg = raw["negatives"]
    unknown = set(neg) - set(NEGATIVE_KINDS)
    if unknown:
        raise ValueError(f"{where}: [negatives] has unknown kinds {sorted(unknown)}; valid are {list(NEGATIVE_KINDS)}")
    weights = {k: float(neg.get(k, 0.0)) for k in NEGATIVE_KINDS}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"{where}: [negatives] weights must be >= 0 with a positive sum, got {weights}")
    return GalsimFamily(name=str(raw["name"]), description=str(raw.get("description", "")),
                        lens_fraction=float(lf), sections=sections,
                        negative_weights={k: v for k, v in weights.items() if v > 0},
                        sha256=hashlib.sha256(raw_bytes).hexdigest(), path=str(path))


# --------------------------------------------------------------------------- scene parameters


@dataclass(frozen=True)
class Light:
    """One GalSim light component at unit flux: ``kind`` ``sersic`` | ``knots`` | ``point``.

    ``x, y``: centre (arcsec; for a lensed component, on the source plane). Sizes in
    arcsec, ``beta_deg`` the major axis' angle from +x. ``knots``: ``n_knots`` GalSim
    ``RandomKnots`` of a Gaussian distribution of half-light radius ``r_eff``, each
    a Gaussian of ``knot_sigma``, positions from ``seed``.
    """

    kind: str
    x: float
    y: float
    mag_ref: float  # AB in the survey's reference band
    color_beta: float
    lensed: bool
    n: float = 1.0
    r_eff: float = 0.0
    q: float = 1.0
    beta_deg: float = 0.0
    trunc_r_eff: float = 0.0  # Sersic truncation in units of r_eff (0: none; ignored below n = 2)
    n_knots: int = 0
    knot_sigma: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class GalsimScene:
    """Everything :func:`render_galsim_scene` needs for one cutout, and its truth."""

    objid: str
    is_lens: bool
    kind: str  # 'extended' | 'quasar' for lenses; one of NEGATIVE_KINDS otherwise
    theta_e_arcsec: float  # of the deflector (0 in the truth of a non-lens; see `deflector`)
    deflector: Mapping[str, float]  # theta_e, q, phi_rad, gamma1, gamma2: traced when lensing
    lensing: bool  # False: a twin, the same scene with the deflection switched off
    lights: tuple[Light, ...]
    source_xy: tuple[float, float] | None
    psf_profile: str
    psf_fwhm_arcsec: Mapping[str, float]
    moffat_beta: float
    wing_flux_fraction: float
    wing_fwhm_scale: float
    psf_shear: tuple[float, float]
    exposure_scale: float
    z_lens: float
    z_source: float
    ra_deg: float
    dec_deg: float
    galaxy: Mapping[str, float] = field(default_factory=dict)  # the main galaxy's Sersic truth


def galsim_objid(survey: str, family: str, seed: int, index: int) -> str:
    return f"simg-{survey}-{family}-s{seed}-{index:06d}"


def _sersic_n(n: float) -> float:
    return round(round(float(n) / SERSIC_N_STEP) * SERSIC_N_STEP, 4)


def _polar(r: float, angle: float) -> tuple[float, float]:
    return r * math.cos(angle), r * math.sin(angle)


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(1, 2**31 - 1))


def draw_galsim_scene(family: GalsimFamily, survey: SurveySpec, rng: np.random.Generator, *, objid: str,
                      force_kind: str | None = None) -> GalsimScene:
    """Draw one scene of ``family`` as observed by ``survey``.

    ``force_kind``: ``"lens"`` for a lens, or one of :data:`NEGATIVE_KINDS`; ``None`` draws
    lens or not from ``lens_fraction`` and the non-lens kind from ``[negatives]``.
    """
    d = family.draw
    if force_kind is not None and force_kind != "lens" and force_kind not in NEGATIVE_KINDS:
        raise ValueError(f"force_kind {force_kind!r} is not one of {['lens', *NEGATIVE_KINDS]}")
    is_lens = (rng.uniform() < family.lens_fraction) if force_kind is None else force_kind == "lens"
    neg_kind = None if is_lens else (force_kind or family.draw_negative_type(rng))

    # the main galaxy and its mass: the same population for every kind
    theta_e = math.exp(d("deflector", "ln_theta_e_arcsec", rng))
    q_mass = d("deflector", "axis_ratio", rng)
    pa_mass = d("deflector", "position_angle_deg", rng)
    gamma = d("deflector", "shear", rng)
    gamma_angle = math.radians(d("deflector", "shear_angle_deg", rng))
    z_lens = d("deflector", "redshift", rng)
    galaxy = {"n": _sersic_n(d("lens_light", "sersic_n", rng)), "r_eff": d("lens_light", "r_eff_arcsec", rng),
              "q": float(np.clip(q_mass + d("lens_light", "axis_ratio_offset", rng), 0.25, 1.0)),
              "pa": (pa_mass + d("lens_light", "position_angle_offset_deg", rng)) % 180.0}
    gal_mag = d("lens_light", "mag", rng)
    lights = [Light("sersic", 0.0, 0.0, gal_mag, d("lens_light", "color_beta", rng), lensed=False,
                    n=galaxy["n"], r_eff=galaxy["r_eff"], q=galaxy["q"], beta_deg=galaxy["pa"],
                    trunc_r_eff=d("lens_light", "truncation_r_eff", rng))]
    deflector = {"theta_e": theta_e, "q": q_mass, "phi_rad": math.radians(pa_mass),
                 "gamma1": gamma * math.cos(2 * gamma_angle), "gamma2": gamma * math.sin(2 * gamma_angle)}
    source_xy = None
    z_source = -1.0
    kind = "extended"
    if is_lens or neg_kind == "twin":
        z_source = max(d("source", "redshift", rng), z_lens + 0.1)
        source_xy = _polar(d("source", "max_offset", rng) * theta_e * math.sqrt(rng.uniform()),
                           rng.uniform(0, 2 * math.pi))
        kind = d("source", "kind", rng)
        lights += _source_lights(family, rng, source_xy, kind)
    if not is_lens:
        if neg_kind != "twin":
            lights += _mimic_lights(neg_kind, family, rng, gal_mag, galaxy)
        kind = neg_kind
    lights += _environment(family, survey, rng)

    fwhm = _draw_seeing(family, survey, rng)
    profile = d("psf", "profile", rng)
    psf_params = {"moffat_beta": d("psf", "moffat_beta", rng),
                  "wing_flux_fraction": d("psf", "wing_flux_fraction", rng),
                  "wing_fwhm_scale": d("psf", "wing_fwhm_scale", rng)}
    psf_shear = (d("psf", "ellipticity", rng), d("psf", "ellipticity", rng))
    ra = rng.uniform(0.0, 360.0)
    lo, hi = (math.sin(math.radians(x)) for x in survey.dec_range_deg)
    dec = math.degrees(math.asin(rng.uniform(lo, hi)))
    return GalsimScene(objid=objid, is_lens=bool(is_lens), kind=kind, theta_e_arcsec=theta_e if is_lens else 0.0,
                       deflector=deflector, lensing=bool(is_lens), lights=tuple(lights),
                       source_xy=source_xy, psf_profile=profile, psf_fwhm_arcsec=fwhm, psf_shear=psf_shear,
                       exposure_scale=d("noise", "exposure_scale", rng), z_lens=z_lens,
                       z_source=z_source if is_lens else -1.0, ra_deg=float(ra), dec_deg=dec, galaxy=galaxy,
                       **psf_params)


def _source_lights(family: GalsimFamily, rng, src: tuple[float, float], kind: str) -> list[Light]:
    d = family.draw
    beta = d("source", "color_beta", rng)
    shape = {"n": _sersic_n(d("source", "sersic_n", rng)), "r_eff": d("source", "r_eff_arcsec", rng),
             "q": d("source", "axis_ratio", rng), "beta_deg": rng.uniform(0, 180)}
    if kind == "quasar":
        qso = d("quasar", "mag", rng)
        return [Light("sersic", *src, qso + d("quasar", "host_mag_offset", rng), beta, lensed=True, **shape),
                Light("point", *src, qso, d("quasar", "color_beta", rng), lensed=True)]
    mag = d("source", "mag", rng)
    if rng.uniform() >= d("source", "knots_probability", rng):
        return [Light("sersic", *src, mag, beta, lensed=True, **shape)]
    f_knots = d("source", "knot_flux_fraction", rng)
    return [Light("sersic", *src, mag - 2.5 * math.log10(1.0 - f_knots), beta, lensed=True, **shape),
            Light("knots", *src, mag - 2.5 * math.log10(f_knots), beta + d("source", "knot_color_beta_offset", rng),
                  lensed=True, r_eff=shape["r_eff"] * d("source", "knot_spread", rng),
                  n_knots=d("source", "n_knots", rng), knot_sigma=d("source", "knot_sigma_arcsec", rng),
                  seed=_seed(rng))]


def _mimic_lights(kind: str, family: GalsimFamily, rng, gal_mag: float, galaxy: Mapping) -> list[Light]:
    d = family.draw
    m = "mimics"
    if kind == "companion":
        c = _polar(d(m, "companion_distance_arcsec", rng), rng.uniform(0, 2 * math.pi))
        return [Light("sersic", *c, gal_mag + d(m, "companion_mag_offset", rng), d(m, "companion_color_beta", rng),
                      lensed=False, n=_sersic_n(rng.uniform(0.8, 2.5)), r_eff=d(m, "companion_r_eff_arcsec", rng),
                      q=rng.uniform(0.5, 1.0), beta_deg=rng.uniform(0, 180))]
    if kind == "superposed":  # a blue knotty galaxy, a lens's source without the lens
        c = _polar(d(m, "superposed_distance_arcsec", rng), rng.uniform(0, 2 * math.pi))
        lights = _source_lights(family, rng, c, "extended")
        shift = d(m, "superposed_mag", rng) - d("source", "mag", rng)  # re-level to the superposed magnitude
        return [replace(l, mag_ref=l.mag_ref + shift, lensed=False) for l in lights]
    if kind == "spiral_knots":  # RandomKnots clumps along two logarithmic arms
        n_seg = d(m, "spiral_n_segments", rng)
        pitch = math.radians(d(m, "spiral_pitch_deg", rng))
        r0 = max(0.3, 0.5 * galaxy["r_eff"])
        r_max = d(m, "spiral_max_radius_arcsec", rng)
        t_max = math.log(max(r_max / r0, 1.01)) / math.tan(pitch)
        rot = rng.uniform(0, 2 * math.pi)
        shares = rng.dirichlet(np.ones(n_seg)) * d(m, "spiral_flux_fraction", rng)
        beta = d(m, "spiral_color_beta", rng)
        out = []
        for share in shares:
            t = rng.uniform(0, t_max)
            arm = rot + math.pi * int(rng.integers(0, 2))
            x, y = _polar(r0 * math.exp(t * math.tan(pitch)), t + arm)
            out.append(Light("knots", x, y, gal_mag - 2.5 * math.log10(share), beta, lensed=False,
                             r_eff=rng.uniform(0.1, 0.3), n_knots=d(m, "spiral_knots_per_segment", rng),
                             knot_sigma=rng.uniform(0.04, 0.1), seed=_seed(rng)))
        return out
    raise ValueError(f"unknown non-lens kind {kind!r}; valid are {list(NEGATIVE_KINDS)}")  # pragma: no cover


def _environment(family: GalsimFamily, survey: SurveySpec, rng) -> list[Light]:
    d = family.draw
    e = "environment"
    half = survey.cutout_size_arcsec / 2
    out = []
    for _ in range(d(e, "n_neighbours", rng)):
        x, y = _polar(min(d(e, "neighbour_distance_arcsec", rng), 1.2 * half), rng.uniform(0, 2 * math.pi))
        out.append(Light("sersic", x, y, d(e, "neighbour_mag", rng), d(e, "neighbour_color_beta", rng),
                         lensed=False, n=_sersic_n(d(e, "neighbour_sersic_n", rng)),
                         r_eff=d(e, "neighbour_r_eff_arcsec", rng),
                         q=rng.uniform(0.3, 1.0), beta_deg=rng.uniform(0, 180), trunc_r_eff=8.0))
    if rng.uniform() < d(e, "star_probability", rng):
        x, y = _polar(min(d(e, "star_distance_arcsec", rng), 1.2 * half), rng.uniform(0, 2 * math.pi))
        out.append(Light("point", x, y, d(e, "star_mag", rng), d(e, "star_color_beta", rng), lensed=False))
    return out


def _draw_seeing(family: GalsimFamily, survey: SurveySpec, rng) -> dict:
    common = rng.normal(0.0, survey.seeing_scatter * family.draw("psf", "seeing_scatter_scale", rng))
    jitter = family.draw("psf", "band_jitter", rng)
    return {b.name: b.seeing_fwhm_arcsec * math.exp(common + rng.normal(0.0, jitter)) for b in survey.bands}


# --------------------------------------------------------------------------- caustics ray tracing

_LENS = None


def caustics_lens(*, h0: float = 0.7, omega_m: float = 0.3, z_lens: float = 0.5, z_source: float = 1.5):
    """A caustics ``SinglePlane`` of ``SIE`` + ``ExternalShear`` whose dynamic parameters are, in order,
    ``x0, y0, q, phi, Rein, gamma_1, gamma_2`` (arcsec, radians). ``Rein`` is the Einstein radius, so
    the redshifts and the cosmology do not change the deflection; they are set for completeness."""
    import caustics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # caustics warns that the plane's source redshift overrides its members'
        cosmo = caustics.FlatLambdaCDM(h0=h0, Om0=omega_m, name="cosmo")
        sie = caustics.SIE(cosmology=cosmo, name="sie")
        shear = caustics.ExternalShear(cosmology=cosmo, x0=0.0, y0=0.0, name="shear")
        return caustics.SinglePlane(cosmology=cosmo, lenses=[sie, shear], z_l=z_lens, z_s=z_source, name="lens")


def _lens():
    global _LENS
    if _LENS is None:
        _LENS = caustics_lens()
    return _LENS


class _OneThread:
    """torch on one thread while rendering: workers are processes, and the tree's cores are shared."""

    def __enter__(self):
        import torch

        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)
        return torch

    def __exit__(self, *exc):
        import torch

        if self.n != 1:
            torch.set_num_threads(self.n)


def _params(torch, deflector: Mapping[str, float]):
    vals = (0.0, 0.0, deflector["q"], deflector["phi_rad"], deflector["theta_e"], deflector["gamma1"],
            deflector["gamma2"])
    return [torch.tensor(float(v), dtype=torch.float64) for v in vals]


def trace_to_source(x_arcsec: np.ndarray, y_arcsec: np.ndarray, deflector: Mapping[str, float]):
    """Source-plane positions ``beta = theta - alpha(theta)`` (arcsec) of image-plane points, by caustics.

    ``deflector``: ``theta_e`` (arcsec), ``q``, ``phi_rad`` (major axis from +x), ``gamma1``, ``gamma2``,
    centred at the origin. Returns new float64 arrays of the inputs' shape.
    """
    x = np.asarray(x_arcsec, dtype=np.float64)
    y = np.asarray(y_arcsec, dtype=np.float64)
    with _OneThread() as torch:
        bx, by = _lens().raytrace(torch.from_numpy(x.ravel().copy()), torch.from_numpy(y.ravel().copy()),
                                  _params(torch, deflector))
        return bx.numpy().reshape(x.shape), by.numpy().reshape(y.shape)


def _magnification(x: np.ndarray, y: np.ndarray, deflector: Mapping[str, float], *, h: float = 1e-5) -> np.ndarray:
    """Signed magnification ``1 / det(d beta / d theta)`` from central differences of caustics' ray tracing
    (caustics' own ``magnification`` goes through torch.func and costs ~15 s of compilation per process)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    px = np.concatenate([x + h, x - h, x, x])
    py = np.concatenate([y, y, y + h, y - h])
    tx, ty = trace_to_source(px, py, deflector)
    k = x.size
    a11, a21 = (tx[:k] - tx[k:2 * k]) / (2 * h), (ty[:k] - ty[k:2 * k]) / (2 * h)
    a12, a22 = (tx[2 * k:3 * k] - tx[3 * k:]) / (2 * h), (ty[2 * k:3 * k] - ty[3 * k:]) / (2 * h)
    return 1.0 / (a11 * a22 - a12 * a21)


def solve_lens_equation(source_xy: tuple[float, float], deflector: Mapping[str, float], *,
                        window_arcsec: float, grid_step_arcsec: float = 0.02, newton_steps: int = 12):
    """Image positions (arcsec) and signed magnifications of a point source, by a fine-grid root search.

    Local minima of ``|beta(theta) - beta_s|`` on a ``grid_step_arcsec`` grid over ``+-window_arcsec``
    are refined by Newton steps with a finite-difference Jacobian of caustics' ray tracing; roots that
    do not converge to 1e-8" and the SIE's singular core are dropped, and duplicates merged.
    Returns ``(x, y, mu)`` as new float64 arrays.
    """
    from scipy.ndimage import minimum_filter

    sx, sy = map(float, source_xy)
    n = 2 * int(math.ceil(window_arcsec / grid_step_arcsec)) + 1
    g = (np.arange(n) - (n - 1) / 2) * grid_step_arcsec
    gx, gy = np.meshgrid(g, g)
    bx, by = trace_to_source(gx, gy, deflector)
    dist = np.hypot(bx - sx, by - sy)
    minima = (dist == minimum_filter(dist, size=3, mode="nearest")) & (dist < 8 * grid_step_arcsec)
    minima[[0, -1], :] = minima[:, [0, -1]] = False
    x, y = gx[minima].copy(), gy[minima].copy()
    h = 1e-7
    for _ in range(newton_steps):
        if x.size == 0:
            break
        px = np.concatenate([x, x + h, x])
        py = np.concatenate([y, y, y + h])
        tx, ty = trace_to_source(px, py, deflector)
        k = x.size
        fx, fy = tx[:k] - sx, ty[:k] - sy
        a11, a21 = (tx[k:2 * k] - tx[:k]) / h, (ty[k:2 * k] - ty[:k]) / h
        a12, a22 = (tx[2 * k:] - tx[:k]) / h, (ty[2 * k:] - ty[:k]) / h
        det = a11 * a22 - a12 * a21
        det = np.where(np.abs(det) < 1e-12, 1e-12, det)
        step_x = (a22 * fx - a12 * fy) / det
        step_y = (-a21 * fx + a11 * fy) / det
        scale = np.minimum(1.0, grid_step_arcsec / np.maximum(np.hypot(step_x, step_y), 1e-300))
        x, y = x - scale * step_x, y - scale * step_y
    if x.size:
        tx, ty = trace_to_source(x, y, deflector)
        ok = (np.hypot(tx - sx, ty - sy) < 1e-8) & (np.hypot(x, y) > 1e-4)
        x, y = x[ok], y[ok]
    keep: list[int] = []
    for i in range(x.size):
        if all(math.hypot(x[i] - x[j], y[i] - y[j]) > 1e-4 for j in keep):
            keep.append(i)
    x, y = x[keep], y[keep]
    mu = _magnification(x, y, deflector) if x.size else np.zeros(0)
    return x, y, mu


# --------------------------------------------------------------------------- GalSim light and PSF


def _gsparams():
    import galsim

    return galsim.GSParams(maximum_fft_size=8192)


def _galsim_object(light: Light, flux: float, *, at_origin: bool = False):
    """The GalSim profile of ``light`` with total ``flux`` (centred at the origin if ``at_origin``)."""
    import galsim

    gsp = _gsparams()
    if light.kind == "sersic":
        # truncation bounds the FFT of cuspy, wide profiles; below n = 2 a profile has no wings worth it (and
        # GalSim cannot bracket the half-light radius of a low-n profile truncated far out)
        trunc = light.trunc_r_eff * light.r_eff if light.n >= 2.0 else 0.0
        obj = galsim.Sersic(n=light.n, half_light_radius=light.r_eff, flux=flux, trunc=trunc, gsparams=gsp)
        if light.q < 1.0:
            obj = obj.shear(q=light.q, beta=light.beta_deg * galsim.degrees)
    elif light.kind == "knots":
        # GalSim RandomKnots places the knots; each is a Gaussian of knot_sigma (RandomKnots' own knots are
        # delta functions). As a sum of Gaussians the profile is analytic in real space: GalSim draws it
        # without an FFT (a delta-function sum convolved with a small Gaussian needs a huge one).
        knots = galsim.RandomKnots(light.n_knots, half_light_radius=light.r_eff, flux=flux,
                                   rng=galsim.BaseDeviate(light.seed), gsparams=gsp)
        share = flux / light.n_knots
        obj = galsim.Add([galsim.Gaussian(sigma=light.knot_sigma, flux=share, gsparams=gsp).shift(float(px), float(py))
                          for px, py in knots.points])
    elif light.kind == "point":
        obj = galsim.DeltaFunction(flux=flux, gsparams=gsp)
    else:  # pragma: no cover - scenes are made by draw_galsim_scene
        raise ValueError(f"unknown light kind {light.kind!r}")
    return obj if at_origin else obj.shift(light.x, light.y)


def _band_flux(light: Light, survey: SurveySpec, band: str) -> float:
    """e-/s of ``light`` in ``band``: its colour moves its reference-band magnitude."""
    spec, ref = survey.band(band), survey.band(survey.reference_band)
    mag = light.mag_ref - 2.5 * light.color_beta * math.log10(spec.wavelength_nm / ref.wavelength_nm)
    return 10.0 ** (-0.4 * (mag - spec.magnitude_zero_point))


def _psf_object(scene: GalsimScene, band: str):
    import galsim

    gsp = _gsparams()
    fwhm = scene.psf_fwhm_arcsec[band]
    if scene.psf_profile == "kolmogorov":
        psf = galsim.Kolmogorov(fwhm=fwhm, gsparams=gsp)
    elif scene.psf_profile == "moffat":
        psf = galsim.Moffat(beta=scene.moffat_beta, fwhm=fwhm, gsparams=gsp)
    elif scene.psf_profile == "core_wings":
        w = scene.wing_flux_fraction
        psf = galsim.Add([galsim.Kolmogorov(fwhm=fwhm, flux=1.0 - w, gsparams=gsp),
                          galsim.Moffat(beta=WING_MOFFAT_BETA, fwhm=fwhm * scene.wing_fwhm_scale, flux=w,
                                        gsparams=gsp)])
    else:
        raise ValueError(f"{scene.objid}: psf_profile {scene.psf_profile!r} is not one of {list(PSF_PROFILES)}")
    g1, g2 = scene.psf_shear
    return psf.shear(g1=g1, g2=g2) if (g1 or g2) else psf


def _psf_radius_arcsec(scene: GalsimScene, band: str) -> float:
    fwhm = scene.psf_fwhm_arcsec[band]
    return 2.5 * fwhm * (scene.wing_fwhm_scale if scene.psf_profile == "core_wings" else 1.0)


def supersampling(survey: SurveySpec) -> int:
    """Sub-pixels per pixel side for the lensed light: at least 2, sub-pixels at most ~0.09"."""
    return max(2, int(math.ceil(survey.pixel_scale_arcsec / SUPERSAMPLE_TARGET_ARCSEC - 1e-9)))


def _sampled_unit_image(light: Light, bx: np.ndarray, by: np.ndarray, sub_arcsec: float) -> np.ndarray:
    """Sub-pixel flux (per unit flux of ``light``) at traced positions ``(bx, by)`` (arcsec; the sub-pixel
    centres themselves for unlensed light): GalSim draws the component once on a fine grid, bilinear
    interpolation gives its surface brightness at each position, times the sub-pixel area."""
    from scipy.ndimage import map_coordinates

    size = light.r_eff
    if light.kind == "knots":
        extent = 3.5 * light.r_eff + 4 * light.knot_sigma
        step = min(sub_arcsec / 3, light.knot_sigma / 1.5, light.r_eff / 5)
    else:
        extent = 6.0 * size
        step = min(sub_arcsec / 3, size / 5)
    n = 2 * int(math.ceil(extent / step)) + 1
    if n > SOURCE_GRID_MAX_PX:
        n = SOURCE_GRID_MAX_PX
        step = 2 * extent / (n - 1)
    img = _galsim_object(light, 1.0, at_origin=True).drawImage(nx=n, ny=n, scale=step, method="no_pixel").array
    sb = img.astype(np.float64) / step**2  # unit-flux surface brightness, per arcsec^2
    cols = (bx - light.x) / step + (n - 1) / 2
    rows = (by - light.y) / step + (n - 1) / 2
    return map_coordinates(sb, [rows, cols], order=1, mode="constant", cval=0.0) * sub_arcsec**2


def _deposit(image: np.ndarray, x_arcsec: float, y_arcsec: float, flux, scale_arcsec: float) -> None:
    """Add a point of ``flux`` (per band: shape (bands, 1, 1)) to ``image`` (the renderer's own work array,
    (bands, M, M)) by cloud-in-cell weights."""
    m = image.shape[-1]
    c = x_arcsec / scale_arcsec + (m - 1) / 2
    r = y_arcsec / scale_arcsec + (m - 1) / 2
    c0, r0 = int(math.floor(c)), int(math.floor(r))
    fc, fr = c - c0, r - r0
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            rr, cc = r0 + dr, c0 + dc
            if 0 <= rr < m and 0 <= cc < m:
                image[..., rr:rr + 1, cc:cc + 1] += flux * (wr * wc)


# --------------------------------------------------------------------------- rendering


@dataclass
class GalsimCutout:
    """One rendered cutout: per-band arrays (bands, H, W) in e-/s and the truth."""

    scene: GalsimScene
    bands: tuple[str, ...]
    image: np.ndarray  # noisy (the noiseless image when rendered without a generator)
    variance: np.ndarray
    lensed: np.ndarray  # noiseless lensed light (0 for a non-lens)
    unlensed: np.ndarray  # noiseless unlensed light
    psf: tuple[np.ndarray, ...]  # per band, odd square, sum 1, at the survey's pixel scale
    zero_points: tuple[float, ...]
    flux_ratio: float  # lensed / total in the reference band, on the noiseless image
    magnifications: Mapping[int, float] = field(default_factory=dict)  # light index -> lensed flux / intrinsic

    @property
    def noiseless(self) -> np.ndarray:
        return self.lensed + self.unlensed

    @property
    def arc_snr(self) -> float:
        """Matched-filter S/N of the lensed light, ``sqrt(sum(lensed**2 / variance))`` (0 for a non-lens)."""
        good = self.variance > 0
        return float(np.sqrt(np.sum(self.lensed[good] ** 2 / self.variance[good])))


def noise_variance(noiseless: np.ndarray, kwargs_single_band: Mapping[str, Any]) -> np.ndarray:
    """Per-pixel variance ((e-/s)^2) of an image in e-/s, as lenstronomy's ``SingleBand.estimate_noise``
    squared: sky and read noise over the total exposure plus the sources' Poisson term."""
    kw = kwargs_single_band
    t_total = kw["exposure_time"] * kw["num_exposures"]
    sky_cps = 10.0 ** (-0.4 * (kw["sky_brightness"] - kw["magnitude_zero_point"])) * kw["pixel_scale"] ** 2
    background = (kw["num_exposures"] * kw["read_noise"] ** 2 + t_total * sky_cps) / t_total**2
    return background + np.maximum(np.asarray(noiseless, dtype=np.float64), 0.0) / t_total


def render_galsim_scene(scene: GalsimScene, survey: SurveySpec, rng: np.random.Generator | None, *,
                        lensing: bool | None = None) -> GalsimCutout:
    """Draw ``scene`` in every band of ``survey``; with ``rng``, add survey noise (else the image is noiseless).

    ``lensing`` (default: the scene's) switches the deflection: off, each lensed
    component is drawn unlensed at its source-plane position (the same sampling with
    beta = theta) with its flux scaled to what it has with deflection on (a quasar:
    the sum over its images in the cutout), so the two renderings differ only by
    the distortion.

    Paths: lensed light, knots and a twin's source are sampled on the sub-pixel grid
    and convolved with the band's sub-pixel PSF (all bands in one FFT); Sersics and
    stars are drawn by GalSim convolved with the PSF and the pixel on the survey grid.
    """
    import galsim
    from scipy.signal import fftconvolve

    lensing = scene.lensing if lensing is None else lensing
    n, pix = survey.cutout_size_px, survey.pixel_scale_arcsec
    s = supersampling(survey)
    m, sub = n * s, pix / s
    bands = survey.band_names
    nb = len(bands)
    fluxes = [[_band_flux(l, survey, band) for band in bands] for l in scene.lights]
    lensed_ix = [i for i, l in enumerate(scene.lights) if l.lensed]
    grid_ix = [i for i, l in enumerate(scene.lights) if not l.lensed and l.kind == "knots"]
    galsim_ix = [i for i, l in enumerate(scene.lights) if not l.lensed and l.kind != "knots"]
    g = (np.arange(m) - (m - 1) / 2) * sub
    gx, gy = np.meshgrid(g, g)
    half = n * pix / 2

    # lensed components at unit flux (traced once; a twin needs their magnifications too)
    unit: dict[int, np.ndarray] = {}
    points: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    mags: dict[int, float] = {}
    if lensed_ix:
        bx, by = trace_to_source(gx, gy, scene.deflector)
        for i in lensed_ix:
            light = scene.lights[i]
            if light.kind == "point":
                x, y, mu = solve_lens_equation((light.x, light.y), scene.deflector,
                                               window_arcsec=min(half, 2.5 * scene.deflector["theta_e"] + 1.0))
                inside = (np.abs(x) < half) & (np.abs(y) < half)
                points[i] = (x[inside], y[inside], np.abs(mu[inside]))
                mags[i] = float(np.abs(mu[inside]).sum())
            else:
                unit[i] = _sampled_unit_image(light, bx, by, sub)
                mags[i] = float(unit[i].sum())

    lensed_sup = np.zeros((nb, m, m))
    unlensed_sup = np.zeros((nb, m, m))
    for i in lensed_ix:
        light, f = scene.lights[i], np.asarray(fluxes[i])
        if lensing:
            if light.kind == "point":
                for x, y, mu in zip(*points[i]):
                    _deposit(lensed_sup, x, y, f[:, None, None] * mu, sub)
            else:
                lensed_sup += f[:, None, None] * unit[i]
        elif light.kind == "point":
            _deposit(unlensed_sup, light.x, light.y, f[:, None, None] * mags[i], sub)
        else:  # the twin: unlensed, with the flux its images have
            u = _sampled_unit_image(light, gx, gy, sub)
            total = float(u.sum())
            if total > 0:
                unlensed_sup += f[:, None, None] * (u * (mags[i] / total))
    for i in grid_ix:
        unlensed_sup += np.asarray(fluxes[i])[:, None, None] * _sampled_unit_image(scene.lights[i], gx, gy, sub)

    stacks = [a for a in (lensed_sup, unlensed_sup) if a.any()]
    lensed = np.zeros((nb, n, n))
    unlensed = np.zeros((nb, n, n))
    psf_objs = [_psf_object(scene, band) for band in bands]
    if stacks:
        k = min(2 * int(math.ceil(max(_psf_radius_arcsec(scene, b) for b in bands) / sub)) + 1, 2 * (m // 2) - 1)
        kernels = np.stack([p.drawImage(nx=k, ny=k, scale=sub, method="no_pixel").array for p in psf_objs])
        kernels = kernels.astype(np.float64) / kernels.sum(axis=(1, 2), keepdims=True)
        conv = fftconvolve(np.concatenate(stacks), np.concatenate([kernels] * len(stacks)), mode="same",
                           axes=(1, 2)).reshape(len(stacks), nb, n, s, n, s).sum(axis=(3, 5))
        j = 0
        if lensed_sup.any():
            lensed, j = conv[0], 1
        if unlensed_sup.any():
            unlensed = conv[j].copy()

    variance = np.zeros((nb, n, n))
    psfs, zps = [], []
    for b, band in enumerate(bands):
        psf = psf_objs[b]
        objs = [_galsim_object(scene.lights[i], fluxes[i][b]) for i in galsim_ix]
        if objs:
            drawn = galsim.Convolve(galsim.Add(objs) if len(objs) > 1 else objs[0], psf)
            unlensed[b] += drawn.drawImage(nx=n, ny=n, scale=pix, method="auto").array
        kp = min(2 * int(math.ceil(_psf_radius_arcsec(scene, band) / pix)) + 1, 2 * ((n - 1) // 2) - 1)
        kernel = psf.drawImage(nx=kp, ny=kp, scale=pix, method="auto").array.astype(np.float64)
        psfs.append(kernel / kernel.sum())
        zps.append(survey.band(band).magnitude_zero_point)
        kw = survey.kwargs_single_band(band, exposure_scale=scene.exposure_scale)
        variance[b] = noise_variance(lensed[b] + unlensed[b], kw)
    noiseless = lensed + unlensed
    image = noiseless + rng.standard_normal(noiseless.shape) * np.sqrt(variance) if rng is not None else noiseless
    r = bands.index(survey.band(survey.reference_band).name)
    total = float(noiseless[r].sum())
    flux_ratio = float(lensed[r].sum() / total) if total > 0 else 0.0
    return GalsimCutout(scene=scene, bands=bands, image=image, variance=variance, lensed=lensed,
                        unlensed=unlensed, psf=tuple(psfs), zero_points=tuple(zps), flux_ratio=flux_ratio,
                        magnifications=mags)


# --------------------------------------------------------------------------- files and populations


def write_galsim_cutout(path: Path, cutout: GalsimCutout, *, survey: SurveySpec, family: GalsimFamily, seed: int,
                        labeled: bool = True, role: str = "train") -> None:
    """Write ``cutout`` as an inbox-contract file with the primary keys of ``write_simulated_cutout``
    (``LABELSRC = "sim:galsim"``; ``SIMROLE`` = ``role``); ``labeled=False`` drops the truth keys
    (``fits_contract.TRUTH_KEYS``)."""
    from lens_assets.science.fits_contract import BandHDUs, write_cutout
    from lens_assets.science.fits_writer import simulated_primary, without_truth

    s = cutout.scene
    primary = simulated_primary(s, survey=survey, family=family, seed=seed, role=role, label_source=LABEL_SOURCE,
                                flux_ratio=cutout.flux_ratio, arc_snr=cutout.arc_snr)
    if s.is_lens:  # a lens is its own scene; galsim's non-lenses are drawn without one
        primary["SCENE_TE"] = round(s.theta_e_arcsec, 5)
    if s.psf_profile == "moffat":
        primary["MOFFATB"] = round(s.moffat_beta, 4)
    elif s.psf_profile == "core_wings":
        primary["MOFFATB"] = WING_MOFFAT_BETA
    if not labeled:
        primary = without_truth(primary)
    bands = {band: BandHDUs(image=cutout.image[i], variance=cutout.variance[i], psf=cutout.psf[i],
                            header={"BUNIT": "count/s", "MAGZP": round(cutout.zero_points[i], 5),
                                    "PIXSCALE": survey.pixel_scale_arcsec,
                                    "PSFFWHM": round(s.psf_fwhm_arcsec[band], 5)})
             for i, band in enumerate(cutout.bands)}
    write_cutout(Path(path), primary, bands)


def simulate_galsim_one(survey: SurveySpec, family: GalsimFamily, seed: int, index: int) -> GalsimCutout:
    """Object ``index`` of the (survey, family, seed) population, with noise."""
    from lens_assets.science.simulation import object_rng

    rng = object_rng(survey.name, family.name, seed, index)
    scene = draw_galsim_scene(family, survey, rng, objid=galsim_objid(survey.name, family.name, seed, index))
    return render_galsim_scene(scene, survey, rng)


def _simulate_and_write(args) -> dict:
    survey, family, seed, index, out_dir, labeled, role = args
    cutout = simulate_galsim_one(survey, family, seed, index)
    s = cutout.scene
    path = Path(out_dir) / f"{s.objid}.fits"
    write_galsim_cutout(path, cutout, survey=survey, family=family, seed=seed, labeled=labeled, role=role)
    return {"objid": s.objid, "file": path.name, "label": int(s.is_lens), "kind": s.kind,
            "flux_ratio": cutout.flux_ratio, "theta_e": s.theta_e_arcsec, "arc_snr": cutout.arc_snr,
            "seeing_ref": s.psf_fwhm_arcsec[survey.band(survey.reference_band).name]}


def simulate_galsim_to_directory(survey: SurveySpec, family: GalsimFamily, *, n_cutouts: int, seed: int,
                                 out_dir: Path, workers: int = 1, progress: bool = True, start_index: int = 0,
                                 labeled: bool = True, role: str = "train"):
    """Render ``n_cutouts`` objects of the GalSim family and write each as ``<objid>.fits`` in ``out_dir``
    (``labeled=False`` leaves the truth out of the files; ``role``: their ``SIMROLE``).

    The signature and the truth columns are those of
    :func:`lens_assets.science.simulation.simulate_to_directory`: returns ``(truth, seconds)``, a DataFrame
    with objid, file, label, kind, flux_ratio, theta_e, arc_snr, seeing_ref, and the wall time. Each object
    depends only on (survey, family, seed, index).
    """
    import pandas as pd

    from lens_assets.science.fits_contract import check_sim_role
    from lens_assets.science.parallel import parallel_map

    if n_cutouts < 1:
        raise ValueError(f"n_cutouts must be >= 1, got {n_cutouts}")
    if getattr(family, "renderer", None) != RENDERER:
        raise ValueError(f"family {getattr(family, 'name', family)!r} has renderer "
                         f"{getattr(family, 'renderer', None)!r}; this renderer needs {RENDERER!r} "
                         f"(load it with load_galsim_family)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _warm_up()  # imports (pool workers, started by a forkserver, import them on their first task)
    check_sim_role(role)  # before any worker starts
    tasks = [(survey, family, seed, i, str(out_dir), labeled, role)
             for i in range(start_index, start_index + n_cutouts)]
    t0 = time.perf_counter()
    rows = parallel_map(_simulate_and_write, tasks, workers=workers, progress=progress,
                        desc=f"simulate {survey.name}/{family.name} (galsim)", unit="cutout")
    return pd.DataFrame(rows), time.perf_counter() - t0


def _warm_up() -> None:
    import galsim  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import scipy.signal  # noqa: F401

    trace_to_source(np.zeros(1), np.ones(1), {"theta_e": 1.0, "q": 0.8, "phi_rad": 0.0, "gamma1": 0.0,
                                              "gamma2": 0.0})
