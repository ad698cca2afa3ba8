"""Survey registry: frozen per-survey observing presets.

DES, LSST, Euclid and HST (WFC3 F160W) band values are read from lenstronomy's
``SimulationAPI.ObservationConfig`` so the simulator and lenstronomy agree by
construction. HST ACS/WFC F814W, HSC, KiDS and SDSS are written out here with
their sources; their AB zero points (for e-/s) are derived from the published
5-sigma point-source depths with the same noise model lenstronomy uses
(:func:`zero_point_from_depth`), so depth, sky and seeing are the cited numbers.

Every band of a survey is drawn on the survey's common pixel grid
(``pixel_scale_arcsec``); a band whose native pixel differs (Euclid NISP, HST
F160W) keeps its native value in ``native_pixel_scale_arcsec`` for reference.

Cutout sizes: the model sees ``cutout_size_px`` at ``pixel_scale_arcsec`` (the
grid). Real cutouts come in their own sizes; ``min_cutout_arcsec`` is the side the
finder needs, ``2 x (max theta_E + 2 x FWHM)`` with the reference band's nominal
FWHM, rounded up to 0.5": a lens's counter-image or arc lies at up to ``theta_E``
from the centre (plus the impact parameter, which is below ``theta_E`` for a
multiply imaged source), and two FWHM beyond it the PSF-smeared arc has faded to
~1/16 of its peak in every direction. ``max theta_E`` is 3.0" for ground-based
and Euclid surveys (the simulation families' upper bound, and the largest
galaxy-scale Einstein radii found in DES/HSC/KiDS searches) and 1.5" for HST
(SLACS, BELLS and COSMOS galaxy-scale lenses lie at 0.5-1.8", Bolton et al. 2008,
ApJ 682, 964; Faure et al. 2008, ApJS 176, 19). A cutout covering at least that
is padded to the grid (flagged ``padded``); a smaller one is refused:

====== ====== ===== ======== ====== ========================
survey grid px  "/px  grid "   min "  = 2 x (thetaE + 2 FWHM)
====== ====== ===== ======== ====== ========================
des    64     0.263 16.83    10.0   2 x (3.0 + 2 x 0.88)
lsst   64     0.2   12.8     9.0    2 x (3.0 + 2 x 0.71)
euclid 100    0.101 10.1     7.0    2 x (3.0 + 2 x 0.16)
hst    160    0.05  8.0      3.5    2 x (1.5 + 2 x 0.10)
hsc    64     0.168 10.75    8.5    2 x (3.0 + 2 x 0.58)
kids   64     0.2   12.8     9.0    2 x (3.0 + 2 x 0.68)
sdss   48     0.396 19.01    11.5   2 x (3.0 + 2 x 1.32)
====== ====== ===== ======== ====== ========================

Units are in the names: ``*_arcsec``, ``*_nm``, ``*_s``, ``*_e`` (electrons),
magnitudes are AB, sky brightness is AB mag per square arcsecond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from scipy.optimize import brentq

__all__ = [
    "BandSpec",
    "SurveySpec",
    "SURVEYS",
    "SURVEY_NAMES",
    "get_survey",
    "min_cutout_arcsec_for",
    "limiting_magnitude",
    "zero_point_from_depth",
]


@dataclass(frozen=True)
class BandSpec:
    """One band of a survey, with what a noise model and a PSF need."""

    name: str
    wavelength_nm: float
    seeing_fwhm_arcsec: float
    magnitude_zero_point: float  # AB magnitude of 1 e-/s
    sky_brightness: float  # AB mag / arcsec^2
    exposure_time_s: float  # per exposure
    num_exposures: int
    read_noise_e: float
    ccd_gain: float  # e- / ADU
    native_pixel_scale_arcsec: float

    @property
    def total_exposure_s(self) -> float:
        return self.exposure_time_s * self.num_exposures


@dataclass(frozen=True)
class SurveySpec:
    """A survey preset: its bands, pixel grid, cutout size, seeing scatter and sky footprint.

    ``min_cutout_arcsec``: the smallest cutout side the finder accepts (module
    docstring: ``2 x (max theta_E + 2 x FWHM)``); ``None`` means the full grid
    (``cutout_size_arcsec``). Cutouts between it and the grid are padded.
    """

    name: str
    instrument: str
    bands: tuple[BandSpec, ...]
    pixel_scale_arcsec: float
    cutout_size_px: int
    reference_band: str
    seeing_scatter: float  # 1-sigma of ln(FWHM / nominal FWHM) between objects
    dec_range_deg: tuple[float, float]
    source: str
    min_cutout_arcsec: float | None = None
    _by_lower: Mapping[str, BandSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_lower = {b.name.lower(): b for b in self.bands}
        if self.reference_band.lower() not in by_lower:
            raise ValueError(f"survey {self.name}: reference band {self.reference_band!r} not in its bands")
        object.__setattr__(self, "_by_lower", by_lower)
        if self.min_cutout_arcsec is None:
            object.__setattr__(self, "min_cutout_arcsec", self.cutout_size_arcsec)
        if not 0.0 < self.min_cutout_arcsec <= self.cutout_size_arcsec + 1e-9:
            raise ValueError(f"survey {self.name}: min_cutout_arcsec {self.min_cutout_arcsec} must be in "
                             f"(0, cutout_size_arcsec = {self.cutout_size_arcsec:.3f}]")

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    @property
    def cutout_size_arcsec(self) -> float:
        return self.cutout_size_px * self.pixel_scale_arcsec

    def band(self, name: str) -> BandSpec:
        """The band called ``name`` (case-insensitive); the error lists the valid ones."""
        try:
            return self._by_lower[name.lower()]
        except KeyError:
            raise KeyError(
                f"survey {self.name} has no band {name!r}; its bands are {list(self.band_names)}"
            ) from None

    def has_band(self, name: str) -> bool:
        return name.lower() in self._by_lower

    def canonical_band(self, name: str) -> str:
        return self.band(name).name

    def kwargs_single_band(self, band: str, *, exposure_scale: float = 1.0) -> dict:
        """Keyword arguments for lenstronomy's ``SingleBand`` on the survey's common grid."""
        b = self.band(band)
        return {
            "pixel_scale": self.pixel_scale_arcsec,
            "exposure_time": b.exposure_time_s * exposure_scale,
            "num_exposures": b.num_exposures,
            "magnitude_zero_point": b.magnitude_zero_point,
            "read_noise": b.read_noise_e,
            "ccd_gain": b.ccd_gain,
            "sky_brightness": b.sky_brightness,
            "seeing": b.seeing_fwhm_arcsec,
            "psf_type": "GAUSSIAN",
        }


def min_cutout_arcsec_for(max_theta_e_arcsec: float, fwhm_arcsec: float, *, n_fwhm: float = 2.0) -> float:
    """``2 x (max_theta_e + n_fwhm x FWHM)`` rounded up to 0.5": the cutout side a finder needs."""
    side = 2.0 * (max_theta_e_arcsec + n_fwhm * fwhm_arcsec)
    return math.ceil(side * 2.0 - 1e-9) / 2.0


def _with_minimum(survey: SurveySpec, *, max_theta_e_arcsec: float) -> SurveySpec:
    from dataclasses import replace

    fwhm = survey.band(survey.reference_band).seeing_fwhm_arcsec
    return replace(survey, min_cutout_arcsec=min_cutout_arcsec_for(max_theta_e_arcsec, fwhm))


MAX_THETA_E_ARCSEC = {"des": 3.0, "lsst": 3.0, "euclid": 3.0, "hst": 1.5, "hsc": 3.0, "kids": 3.0, "sdss": 3.0}


# --------------------------------------------------------------------------- depth <-> zero point


def _point_source_snr(mag: float, zp: float, *, sky: float, fwhm: float, pixel: float,
                      exposure_s: float, n_exp: int, read_noise: float) -> float:
    """S/N of a point source measured with the optimal (PSF-weighted) Gaussian aperture.

    The effective number of pixels of a Gaussian PSF is ``4 pi sigma^2 / pixel^2``.
    """
    t = exposure_s * n_exp
    n_eff = 4.0 * math.pi * (fwhm / 2.354820045) ** 2 / pixel**2
    signal = 10 ** (-0.4 * (mag - zp)) * t
    sky_per_px = 10 ** (-0.4 * (sky - zp)) * pixel**2 * t
    noise = math.sqrt(signal + n_eff * (sky_per_px + n_exp * read_noise**2))
    return signal / noise


def limiting_magnitude(band: BandSpec, pixel_scale_arcsec: float, *, snr: float = 5.0) -> float:
    """AB magnitude of a point source detected at ``snr`` in the band's total exposure."""
    kw = dict(sky=band.sky_brightness, fwhm=band.seeing_fwhm_arcsec, pixel=pixel_scale_arcsec,
              exposure_s=band.exposure_time_s, n_exp=band.num_exposures, read_noise=band.read_noise_e)
    return brentq(lambda m: _point_source_snr(m, band.magnitude_zero_point, **kw) - snr, 5.0, 40.0)


def zero_point_from_depth(depth_5sigma: float, *, sky_brightness: float, seeing_fwhm_arcsec: float,
                          pixel_scale_arcsec: float, exposure_time_s: float, num_exposures: int,
                          read_noise_e: float) -> float:
    """AB zero point (1 e-/s) that makes a point source of ``depth_5sigma`` a 5-sigma detection."""
    kw = dict(sky=sky_brightness, fwhm=seeing_fwhm_arcsec, pixel=pixel_scale_arcsec,
              exposure_s=exposure_time_s, n_exp=num_exposures, read_noise=read_noise_e)
    return brentq(lambda zp: _point_source_snr(depth_5sigma, zp, **kw) - 5.0, 10.0, 45.0)


# --------------------------------------------------------------------------- lenstronomy presets


def _from_lenstronomy(config_cls, band: str, name: str, wavelength_nm: float, **init) -> BandSpec:
    kw = dict(config_cls(band=band, **init).kwargs_single_band())  # copy: lenstronomy shares module dicts
    return BandSpec(
        name=name,
        wavelength_nm=wavelength_nm,
        seeing_fwhm_arcsec=float(kw["seeing"]),
        magnitude_zero_point=float(kw["magnitude_zero_point"]),
        sky_brightness=float(kw["sky_brightness"]),
        exposure_time_s=float(kw["exposure_time"]),
        num_exposures=int(kw["num_exposures"]),
        read_noise_e=float(kw["read_noise"]),
        ccd_gain=float(kw["ccd_gain"]),
        native_pixel_scale_arcsec=float(kw["pixel_scale"]),
    )


def _from_depth(name: str, wavelength_nm: float, *, depth: float, sky: float, seeing: float, pixel: float,
                exposure_s: float, n_exp: int, read_noise: float, gain: float) -> BandSpec:
    zp = zero_point_from_depth(depth, sky_brightness=sky, seeing_fwhm_arcsec=seeing, pixel_scale_arcsec=pixel,
                               exposure_time_s=exposure_s, num_exposures=n_exp, read_noise_e=read_noise)
    return BandSpec(name=name, wavelength_nm=wavelength_nm, seeing_fwhm_arcsec=seeing,
                    magnitude_zero_point=round(zp, 3), sky_brightness=sky, exposure_time_s=exposure_s,
                    num_exposures=n_exp, read_noise_e=read_noise, ccd_gain=gain,
                    native_pixel_scale_arcsec=pixel)


def _build_registry() -> dict[str, SurveySpec]:
    from lenstronomy.SimulationAPI.ObservationConfig.DES import DES
    from lenstronomy.SimulationAPI.ObservationConfig.Euclid import Euclid
    from lenstronomy.SimulationAPI.ObservationConfig.HST import HST
    from lenstronomy.SimulationAPI.ObservationConfig.LSST import LSST

    surveys = [
        SurveySpec(
            name="des", instrument="DECam",
            bands=tuple(_from_lenstronomy(DES, b, b, w, coadd_years=3)
                        for b, w in zip("grizY", (473.0, 642.0, 784.0, 926.0, 1009.0))),
            pixel_scale_arcsec=0.263, cutout_size_px=64, reference_band="i", seeing_scatter=0.20,
            dec_range_deg=(-65.0, 5.0),
            source="lenstronomy ObservationConfig.DES (3-year coadd); wavelengths: Abbott et al. 2018, ApJS 239, 18",
        ),
        SurveySpec(
            name="lsst", instrument="LSSTCam",
            bands=tuple(_from_lenstronomy(LSST, b, b, w, coadd_years=10)
                        for b, w in zip("ugrizy", (368.0, 480.0, 622.0, 754.0, 869.0, 971.0))),
            pixel_scale_arcsec=0.2, cutout_size_px=64, reference_band="i", seeing_scatter=0.20,
            dec_range_deg=(-70.0, 10.0),
            source="lenstronomy ObservationConfig.LSST (10-year coadd); wavelengths: Ivezic et al. 2019, ApJ 873, 111",
        ),
        SurveySpec(
            name="euclid", instrument="VIS+NISP",
            bands=tuple(_from_lenstronomy(Euclid, b, b, w)
                        for b, w in zip(("VIS", "Y", "J", "H"), (715.0, 1081.0, 1367.0, 1772.0))),
            pixel_scale_arcsec=0.101, cutout_size_px=100, reference_band="VIS", seeing_scatter=0.03,
            dec_range_deg=(-80.0, 80.0),
            source="lenstronomy ObservationConfig.Euclid (6-year wide survey); "
                   "Euclid Collaboration: Mellier et al. 2024",
        ),
        SurveySpec(
            name="hst", instrument="ACS/WFC+WFC3/IR",
            bands=(
                # ACS/WFC F814W: zero point and read noise from the ACS Instrument Handbook (Ryon 2023)
                # and Sirianni et al. 2005, PASP 117, 1049; sky: zodiacal average (ACS IHB table 9.4);
                # one-orbit exposure as in SLACS (Bolton et al. 2008, ApJ 682, 964); drizzled PSF FWHM.
                BandSpec(name="F814W", wavelength_nm=806.0, seeing_fwhm_arcsec=0.10, magnitude_zero_point=25.94,
                         sky_brightness=22.6, exposure_time_s=2200.0, num_exposures=1, read_noise_e=4.0,
                         ccd_gain=2.0, native_pixel_scale_arcsec=0.05),
                _from_lenstronomy(HST, "WFC3_F160W", "F160W", 1537.0, psf_type="GAUSSIAN"),
            ),
            pixel_scale_arcsec=0.05, cutout_size_px=160, reference_band="F814W", seeing_scatter=0.03,
            dec_range_deg=(-90.0, 90.0),
            source="F160W: lenstronomy ObservationConfig.HST (WFC3_F160W); F814W: ACS Instrument Handbook",
        ),
        SurveySpec(
            name="hsc", instrument="Hyper Suprime-Cam",
            # Aihara et al. 2018, PASJ 70, S4 (Wide layer: exposure times and 5-sigma point-source
            # depths, table 1) and Aihara et al. 2019, PASJ 71, 114 (PDR2 median seeing);
            # Maunakea dark-sky brightness; read noise 4.5 e-, gain 3.0 e-/ADU (Miyazaki et al. 2018).
            bands=tuple(
                _from_depth(b, w, depth=d, sky=s, seeing=f, pixel=0.168, exposure_s=t, n_exp=n,
                            read_noise=4.5, gain=3.0)
                for b, w, d, s, f, t, n in (
                    ("g", 477.0, 26.5, 22.0, 0.77, 150.0, 4),
                    ("r", 621.0, 26.1, 21.2, 0.76, 150.0, 4),
                    ("i", 771.0, 25.9, 20.4, 0.58, 200.0, 6),
                    ("z", 891.0, 25.1, 19.5, 0.68, 200.0, 6),
                    ("y", 978.0, 24.4, 18.6, 0.68, 200.0, 6),
                )),
            pixel_scale_arcsec=0.168, cutout_size_px=64, reference_band="i", seeing_scatter=0.15,
            dec_range_deg=(-7.0, 45.0),
            source="Aihara et al. 2018 PASJ 70 S4; Aihara et al. 2019 PASJ 71 114",
        ),
        SurveySpec(
            name="kids", instrument="OmegaCAM",
            # de Jong et al. 2013, Exp. Astron. 35, 25 (exposures); Kuijken et al. 2019, A&A 625, A2
            # (DR4 median seeing and 5-sigma 2" depths); Paranal dark-sky brightness.
            bands=tuple(
                _from_depth(b, w, depth=d, sky=s, seeing=f, pixel=0.2, exposure_s=t, n_exp=n,
                            read_noise=5.0, gain=2.5)
                for b, w, d, s, f, t, n in (
                    ("u", 355.0, 24.2, 22.3, 1.00, 250.0, 4),
                    ("g", 475.0, 25.1, 21.9, 0.86, 180.0, 5),
                    ("r", 622.0, 25.0, 21.0, 0.68, 360.0, 5),
                    ("i", 763.0, 23.7, 20.0, 0.79, 200.0, 6),
                )),
            pixel_scale_arcsec=0.2, cutout_size_px=64, reference_band="r", seeing_scatter=0.15,
            dec_range_deg=(-36.0, 3.0),
            source="de Jong et al. 2013 Exp. Astron. 35 25; Kuijken et al. 2019 A&A 625 A2",
        ),
        SurveySpec(
            name="sdss", instrument="SDSS imaging camera",
            # York et al. 2000, AJ 120, 1579 (53.9 s drift scan, 0.396"/px); Abazajian et al. 2009,
            # ApJS 182, 543 (DR7 median seeing and 95%-completeness point-source depths, used here as
            # 5-sigma depths); SDSS DR7 sky brightness; representative read noise and gain.
            bands=tuple(
                _from_depth(b, w, depth=d, sky=s, seeing=f, pixel=0.396, exposure_s=53.9, n_exp=1,
                            read_noise=5.0, gain=4.7)
                for b, w, d, s, f in (
                    ("u", 355.0, 22.0, 22.1, 1.53),
                    ("g", 469.0, 22.2, 21.8, 1.44),
                    ("r", 617.0, 22.2, 20.8, 1.32),
                    ("i", 748.0, 21.3, 20.2, 1.26),
                    ("z", 893.0, 20.5, 18.9, 1.29),
                )),
            pixel_scale_arcsec=0.396, cutout_size_px=48, reference_band="r", seeing_scatter=0.20,
            dec_range_deg=(-11.0, 70.0),
            source="York et al. 2000 AJ 120 1579; Abazajian et al. 2009 ApJS 182 543",
        ),
    ]
    return {s.name: _with_minimum(s, max_theta_e_arcsec=MAX_THETA_E_ARCSEC[s.name]) for s in surveys}


SURVEYS: Mapping[str, SurveySpec] = MappingProxyType(_build_registry())
SURVEY_NAMES: tuple[str, ...] = ("des", "hsc", "lsst", "euclid", "hst", "kids", "sdss")
assert set(SURVEY_NAMES) == set(SURVEYS)


def get_survey(name: str) -> SurveySpec:
    """The survey preset called ``name`` (case-insensitive); the error lists the valid names."""
    try:
        return SURVEYS[name.lower()]
    except (KeyError, AttributeError):
        raise KeyError(f"unknown survey {name!r}; valid surveys are {list(SURVEY_NAMES)}") from None
