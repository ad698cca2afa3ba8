"""Validating a cutout's header values and arrays against the inbox contract (:mod:`.fits_contract`).

The reader (:mod:`.fits_reader`) turns bytes into header values and arrays;
:func:`validate_cutout` checks keywords, ranges, units, shapes and pixels and
builds the :class:`Cutout`, or raises :class:`QuarantineError` with a reason code
from :data:`QUARANTINE_REASONS` and a message naming the file, the field and the value.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from .noise import derived_variance, sky_noise
from .psf import measure_fwhm_px
from .surveys import SurveySpec

__all__ = ["Cutout", "QuarantineError", "QUARANTINE_REASONS", "LABEL_SOURCE_PREFIXES", "BAND_FLAGS",
           "CROP_FLAG_RATIO", "MAX_FILE_BYTES", "OBJTYPE_CLUSTER", "is_cluster_field", "nanomaggies_per_unit",
           "size_on_survey_grid", "validate_cutout", "pad_at"]

FITS_BLOCK = 2880
MAX_NAN_FRACTION = 0.5  # of a band's pixels that may be non-finite (NaN, +inf or -inf)
PIXSCALE_RANGE = (1e-6, 3600.0)  # arcsec/px, from PIXSCALE or a celestial WCS
RESAMPLE_TOLERANCE = 0.01  # pixel scales within 1% of the survey's are used as they are
MAGZP_RANGE = (10.0, 45.0)  # AB zero points of real instruments in count/s or adu lie well inside this
GAIN_RANGE = (1e-6, 1e12)  # electrons per image unit (count/s images: gain x exposure time)
CROP_FLAG_RATIO = 1.25  # on-grid side >= 1.25 x the grid: over a third of the file's area is cropped away
MAX_PIXEL_NMGY = 1e15  # |pixel| in nanomaggies: brighter than -15 mag in one pixel is no flux (and overflows float32
# once PSF matching sums it over the kernel)
SIZE_TOLERANCE_ARCSEC = 1e-6
MAX_FILE_BYTES = 2**30  # a file, or a .gz file decompressed: a 5-band float64 cutout with variance of 4,000 x 4,000
# px is 1.3 GB, two orders beyond any galaxy cutout or cluster field of the contract; larger is read into no worker
OBJTYPE_CLUSTER = "cluster_field"  # primary-header OBJTYPE of a cluster field (science.clusters.fields writes it)

QUARANTINE_REASONS: Mapping[str, str] = {
    "unreadable": "not a FITS file, or astropy cannot parse it",
    "truncated": "the file ends before its headers say it should",
    "missing_header": "a required primary-header keyword is absent",
    "bad_header_value": "a header keyword has a value outside its allowed set or range",
    "survey_mismatch": "SURVEY differs from the survey the file was ingested for",
    "no_image_hdu": "no IMAGE_<band> extension",
    "no_known_band": "IMAGE_<band> extensions exist but none is a band of the survey",
    "not_2d": "an image is not 2-D",
    "not_square": "an image is not square (retired: kept for earlier quarantine tables; a non-square cutout is now "
                  "padded to square and flagged padded_square)",
    "shape_mismatch": "bands, variance or PSF images disagree in shape",
    "too_small": "covers less sky than the survey's min_cutout_arcsec",
    "mostly_nan": "more than half of a band's pixels are non-finite (NaN or +/-inf)",
    "negative_variance": "a VAR_<band> pixel is negative",
    "zero_variance": "a VAR_<band> is zero in every finite pixel",
    "no_data": "every band's image and variance are zero: the file holds no data",
    "missing_magzp": "BUNIT count/s or adu without MAGZP",
    "bad_bunit": "BUNIT is not one of nanomaggy, count/s, adu",
    "missing_pixscale": "neither PIXSCALE nor a celestial WCS",
    "pixscale_mismatch": "bands differ in pixel scale by more than 1%",
    "bad_psf": "PSF_<band> is not an odd, square, finite image with positive sum",
    "duplicate_objid": "OBJID already ingested from another file",
    "bad_file_name": "the file name is not UTF-8 text",
    "bad_pixel_value": "a finite pixel beyond any flux: |image| over 1e15 nanomaggies (or its variance over 1e30)",
    "not_scorable": "read and matched, but the ensemble's score of it is not finite (scoring only)",
    "too_coarse": "pixels coarser than the broadest seeing FWHM of the survey's bands",
    "too_large": "the file, a .gz file decompressed, or a tile-compressed file's declared pixels, is over "
                 "MAX_FILE_BYTES (1 GiB)",
    "no_sky_noise": "a band without VAR_<band> has constant pixels: no noise to derive a variance from",
    "duplicate_extension": "two HDUs share an EXTNAME, or two IMAGE_<band> extensions hold the same band",
    "duplicate_keyword": "a contract keyword is given more than once in one header",
    "non_ascii_header": "a header holds bytes over 0x7f (FITS headers are ASCII text)",
    "no_bcg": "a cluster field without BCGXPIX/BCGYPIX in which no source stands out near the centre",
    "objtype_mismatch": "a file of a drop marked _CLUSTER_FIELDS whose OBJTYPE is not 'cluster_field' (e.g. a "
                        "galaxy cutout), or a galaxy cutout (catalog, galaxy drop) whose OBJTYPE is 'cluster_field'",
}

LABEL_SOURCE_PREFIXES = ("sim:", "obs:", "weak:", "pretrain:")
BAND_FLAGS = ("missing", "nan_masked", "var_derived", "fwhm_from_psf", "fwhm_nominal",
              "var_sky_only", "var_poisson", "var_sky_unmasked", "padded", "cropped", "padded_square")
FLUX_UNITS = ("nanomaggy", "count/s", "adu")
PRIMARY_KEYWORDS = ("OBJID", "RA", "DEC", "SURVEY", "INSTRUME", "Z_PHOT", "Z_SPEC", "Z_ERR", "LENS", "LABELSRC",
                    "LABELCNF", "FLUXRAT", "THETA_E", "ARCSNR", "SIMFAM", "SIMKIND", "SERSICN", "RHALF", "AXRATIO",
                    "PA_DEG", "GAIN", "PAIRID", "SCENE_TE", "SIMROLE",
                    # cluster fields (science.clusters.fields.CLUSTER_HEADER_KEYS)
                    "OBJTYPE", "BCGXPIX", "BCGYPIX", "NARCS", "NSRC", "ARCSB", "CLGROUP")
BAND_KEYWORDS = ("BAND", "BUNIT", "MAGZP", "PIXSCALE", "PSFFWHM", "GAIN")


class QuarantineError(Exception):
    """A file that cannot enter the catalog: ``reason`` is a key of QUARANTINE_REASONS."""

    def __init__(self, reason: str, message: str, *, objid: str = ""):
        if reason not in QUARANTINE_REASONS:  # pragma: no cover - programming error
            raise ValueError(f"unknown quarantine reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.objid = objid


@dataclass
class Cutout:
    """A validated cutout: arrays in the survey's band order, in the file's units."""

    name: str
    objid: str
    ra: float
    dec: float
    survey: str
    primary: dict
    bands: tuple[str, ...]
    image: np.ndarray  # (bands, H, W) float32; NaN pixels set to 0 and masked
    variance: np.ndarray  # (bands, H, W) float32
    nan_mask: np.ndarray  # (bands, H, W) bool
    psf: list  # per band: 2-D array or None
    psf_fwhm_arcsec: np.ndarray  # (bands,)
    nmgy_per_unit: np.ndarray  # (bands,) multiply the image by this for nanomaggies
    pixel_scale_arcsec: float
    band_flags: dict = field(default_factory=dict)  # band -> list of BAND_FLAGS
    ignored_bands: tuple[str, ...] = ()
    notes: list = field(default_factory=list)
    file_shape: tuple[int, int] = (0, 0)  # (H, W) of the file's images (default: image's); image is H x W unless
    # padded_square
    square_offset_px: tuple[int, int] = (0, 0)  # (dy, dx): where the file's pixel (0, 0) lies in image

    def __post_init__(self):
        if self.file_shape == (0, 0):
            self.file_shape = tuple(int(n) for n in self.image.shape[-2:])

    @property
    def present(self) -> np.ndarray:
        return np.array(["missing" not in self.band_flags.get(b, ()) for b in self.bands])


def nanomaggies_per_unit(bunit: str, magzp: float | None, *, where: str) -> float:
    """Factor that converts an image in ``bunit`` to nanomaggies (AB zero point 22.5)."""
    unit = bunit.strip().lower()
    if unit in ("nanomaggy", "nanomaggies", "nmgy"):
        return 1.0
    if unit in ("count/s", "counts/s", "adu"):
        if magzp is None:
            raise QuarantineError("missing_magzp", f"{where}: BUNIT {bunit!r} needs MAGZP, which is absent")
        zp = _number({"MAGZP": magzp}, "MAGZP", where, low=MAGZP_RANGE[0], high=MAGZP_RANGE[1])
        return 10.0 ** (-0.4 * (zp - 22.5))
    raise QuarantineError("bad_bunit", f"{where}: BUNIT {bunit!r} is not one of {list(FLUX_UNITS)}")


def size_on_survey_grid(size_px: int, pixel_scale_arcsec: float, survey: SurveySpec) -> int:
    """Pixels a cutout spans on the survey's grid (resampled only past RESAMPLE_TOLERANCE)."""
    ratio = pixel_scale_arcsec / survey.pixel_scale_arcsec
    return size_px if abs(ratio - 1.0) <= RESAMPLE_TOLERANCE else int(math.floor(size_px * ratio + 1e-9))


def _number(primary: dict, key: str, name: str, *, default=None, low=-math.inf, high=math.inf) -> float:
    value = primary.get(key, default)
    if value is None and key in primary:  # the keyword is there without a value (a card with nothing after "= ")
        raise QuarantineError("bad_header_value", f"{name}: {key} has no value")
    if value is None:
        raise QuarantineError("missing_header", f"{name}: primary header lacks {key}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise QuarantineError("bad_header_value", f"{name}: {key} = {value!r} is not a number") from None
    if not (low <= v <= high) or math.isnan(v):
        raise QuarantineError("bad_header_value", f"{name}: {key} = {value!r} is outside [{low}, {high}]")
    return v


def _check_flux_range(values: np.ndarray, per_unit: float, where: str, *, unit: str, out_unit: str = "nanomaggies",
                      limit: float = MAX_PIXEL_NMGY) -> None:
    """QuarantineError ``bad_pixel_value`` when a finite pixel of ``values`` (non-finite ones are zeroed by now)
    times ``per_unit`` exceeds ``limit`` in magnitude, naming the pixel and its value."""
    if not values.size:
        return
    flat = int(np.argmax(np.abs(values)))
    peak = float(values.flat[flat])
    if abs(peak) * per_unit > limit:
        y, x = np.unravel_index(flat, values.shape)
        raise QuarantineError("bad_pixel_value", f"{where}: pixel (y={y}, x={x}) = {peak:.3g} {unit} is "
                                                 f"{peak * per_unit:.3g} {out_unit}, beyond +/-{limit:.0e}")


def _pixel_scale(header: dict, name: str, band: str) -> float:
    if "PIXSCALE" in header:
        return _number(header, "PIXSCALE", f"{name}: IMAGE_{band}", low=PIXSCALE_RANGE[0], high=PIXSCALE_RANGE[1])
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_scales

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wcs = WCS(header["_hdu"].header)
        except Exception as err:  # astropy.wcs raises several types for malformed keywords
            raise QuarantineError("missing_pixscale", f"{name}: IMAGE_{band} has no PIXSCALE and its WCS cannot be "
                                                      f"read ({type(err).__name__}: {err})") from None
    if not wcs.has_celestial:
        raise QuarantineError("missing_pixscale", f"{name}: IMAGE_{band} has neither PIXSCALE nor a celestial WCS")
    with np.errstate(all="ignore"):
        scales = proj_plane_pixel_scales(wcs.celestial) * 3600.0
        scale = float(np.sqrt(scales[0] * scales[1]))
    return _number({"WCS pixel scale": scale}, "WCS pixel scale", f"{name}: IMAGE_{band}", low=PIXSCALE_RANGE[0],
                   high=PIXSCALE_RANGE[1])


def _non_finite(values: np.ndarray, bad: np.ndarray) -> str:
    """How much of an image is non-finite, and of which kind (``bad`` marks the pixels not used)."""
    n_nan, n_pos, n_neg = int(np.isnan(values).sum()), int(np.isposinf(values).sum()), int(np.isneginf(values).sum())
    return (f"{bad.mean():.0%} non-finite ({n_nan} NaN, {n_pos} +inf, {n_neg} -inf of {bad.size} pixels; "
            f"more than {MAX_NAN_FRACTION:.0%} non-finite)")


def median_of_few(values) -> float:
    """``float(np.median(values))`` of a few numbers: the middle one, or the mean of the two middle ones,
    summed from 0.0 as ``np.mean`` sums (without numpy's per-call overhead)."""
    if any(v != v for v in values):  # NaN: numpy's answer
        return float(np.median(values))
    ordered = sorted(values)
    k = len(ordered) // 2
    return float(0.0 + ordered[k] if len(ordered) % 2 else (0.0 + ordered[k - 1] + ordered[k]) / 2.0)


def _fraction(n_bad: int, bad: np.ndarray) -> float:
    """``bad.mean()`` from its count of True (``n_bad``): the same division numpy makes, without its overhead."""
    return n_bad / bad.size if bad.size else bad.mean()


def pad_at(array: np.ndarray, side: int, offset: tuple[int, int]) -> np.ndarray:
    """``array`` (..., H, W) in a zero ``side`` x ``side`` square with its pixel (0, 0) at ``offset`` (dy, dx)."""
    out = np.zeros((*array.shape[:-2], side, side), dtype=array.dtype)
    dy, dx = offset
    out[..., dy:dy + array.shape[-2], dx:dx + array.shape[-1]] = array
    return out


def _object_pixel(bands: list, ra: float, dec: float, shape: tuple[int, int]) -> tuple[float, float] | None:
    """(y, x), 0-based, of the object (ICRS RA/DEC) through the first of ``bands`` (``(ext, header values, array)``
    in the survey's band order) whose celestial WCS places it on the image (astropy's ``world_to_pixel``: the axis
    order, the frame and SIP distortion included); None where no band's WCS does (the object is then at the centre,
    as the contract has it)."""
    from astropy.coordinates import SkyCoord
    from astropy.wcs import WCS

    target = None
    for _, hdr, _ in bands:
        header = hdr["_hdu"].header
        if "CTYPE1" not in header:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                wcs = WCS(header)
                if not wcs.has_celestial:
                    continue
                if target is None:
                    target = SkyCoord(ra, dec, unit="deg", frame="icrs")
                x, y = (float(v) for v in wcs.celestial.world_to_pixel(target))
            except Exception:  # noqa: BLE001 - a WCS astropy cannot use: the next band's, or the centre
                continue
        if -0.5 <= y <= shape[0] - 0.5 and -0.5 <= x <= shape[1] - 0.5:
            return y, x
    return None


def is_cluster_field(objtype) -> bool:
    """Whether a primary header's ``OBJTYPE`` value marks a cluster field (:data:`OBJTYPE_CLUSTER`, any case)."""
    return isinstance(objtype, str) and objtype.strip().lower() == OBJTYPE_CLUSTER


def validate_cutout(primary: dict, arrays: Mapping[str, tuple], *, name: str, survey: SurveySpec,
                    band_header: Callable[[object], dict], galaxy_only: bool = False) -> Cutout:
    """Check a file's header values and arrays against the contract for ``survey``.

    ``primary`` holds the values of :data:`PRIMARY_KEYWORDS`; ``arrays`` maps each
    extension's upper-cased ``EXTNAME`` to ``(hdu, array)``; ``band_header(hdu)``
    gives the values of :data:`BAND_KEYWORDS` in an image extension's header.
    ``galaxy_only`` (the galaxy track's catalog and scoring): a cluster field
    (``OBJTYPE = 'cluster_field'``) is ``objtype_mismatch``, checked first.
    Raises :class:`QuarantineError`; returns a :class:`Cutout` otherwise.
    """
    objid = primary.get("OBJID")
    if galaxy_only and is_cluster_field(primary.get("OBJTYPE")):  # the kind of file first, as cluster drops do
        raise QuarantineError("objtype_mismatch", f"{name}: OBJTYPE is {primary['OBJTYPE']!r}; a cluster field is "
                                                  "not a galaxy cutout (a drop of cluster fields carries the "
                                                  "_CLUSTER_FIELDS marker and is scored by cluster_candidates)",
                              objid="" if objid is None else str(objid).strip())
    if objid is None or str(objid).strip() == "":
        raise QuarantineError("missing_header", f"{name}: primary header lacks OBJID")
    objid = str(objid).strip()
    try:
        for key in ("RA", "DEC", "SURVEY"):
            if key not in primary:
                raise QuarantineError("missing_header", f"{name}: primary header lacks {key}")
        ra = _number(primary, "RA", name, low=0.0, high=360.0) % 360.0
        dec = _number(primary, "DEC", name, low=-90.0, high=90.0)
        if str(primary["SURVEY"]).strip().lower() != survey.name:
            raise QuarantineError("survey_mismatch",
                                  f"{name}: SURVEY = {primary['SURVEY']!r} but this is the {survey.name} survey")
        return _read_bands(primary, arrays, band_header, name=name, survey=survey, objid=objid, ra=ra, dec=dec)
    except QuarantineError as err:
        err.objid = objid
        raise


def _read_bands(primary, arrays, band_header, *, name, survey: SurveySpec, objid, ra, dec) -> Cutout:
    image_ext = {k[len("IMAGE_"):]: v for k, v in arrays.items() if k.startswith("IMAGE_")}
    if not image_ext:
        raise QuarantineError("no_image_hdu", f"{name}: no IMAGE_<band> extension (extensions: {list(arrays)})")
    found: dict[str, tuple] = {}
    ignored = []
    for ext, (hdu, arr) in image_ext.items():
        hdr = band_header(hdu)
        hdr["_hdu"] = hdu  # its full header is parsed only when a WCS is needed
        band_name = str(hdr.get("BAND", ext))
        if survey.has_band(band_name):
            band = survey.canonical_band(band_name)
            if band in found:
                raise QuarantineError("duplicate_extension", f"{name}: IMAGE_{found[band][0]} and IMAGE_{ext} both "
                                                             f"hold band {band!r}; which one is the data is ambiguous")
            found[band] = (ext, hdr, arr)
        else:
            ignored.append(band_name)
    if not found:
        raise QuarantineError("no_known_band", f"{name}: bands {sorted(ignored)} are not {survey.name} bands "
                                               f"{list(survey.band_names)}")
    shape = None
    for band, (_, _, arr) in found.items():
        if arr is None or arr.ndim != 2:
            raise QuarantineError("not_2d", f"{name}: IMAGE_{band} has shape "
                                            f"{None if arr is None else arr.shape}; cutouts must be 2-D")
        if shape is not None and arr.shape != shape:
            raise QuarantineError("shape_mismatch", f"{name}: IMAGE_{band} has shape {arr.shape}, "
                                                    f"other bands {shape}")
        shape = arr.shape
    nb = survey.n_bands
    image = np.zeros((nb, *shape), dtype=np.float32)
    variance = np.zeros((nb, *shape), dtype=np.float32)
    nan_mask = np.zeros((nb, *shape), dtype=bool)
    psfs: list = [None] * nb
    fwhm = np.zeros(nb)
    scale = np.ones(nb)
    flags: dict[str, list] = {}
    pixel_scales = []
    for i, band in enumerate(survey.band_names):
        spec = survey.band(band)
        if band not in found:
            flags[band] = ["missing"]
            fwhm[i] = spec.seeing_fwhm_arcsec
            continue
        ext, hdr, src = found[band]
        bflags: list[str] = []
        where = f"{name}: IMAGE_{band}"
        arr, bad = image[i], nan_mask[i]  # filled in place: src.astype(np.float32) and ~np.isfinite(arr)
        np.copyto(arr, src, casting="unsafe")
        np.logical_not(np.isfinite(arr, out=bad), out=bad)
        n_bad = np.count_nonzero(bad)
        if _fraction(n_bad, bad) > MAX_NAN_FRACTION:
            raise QuarantineError("mostly_nan", f"{where} is {_non_finite(arr, bad)}")
        if n_bad:
            arr[bad] = 0.0
            bflags.append("nan_masked")
        magzp = hdr.get("MAGZP")
        scale[i] = nanomaggies_per_unit(str(hdr.get("BUNIT", "")), magzp, where=where)
        _check_flux_range(arr, float(scale[i]), where, unit=str(hdr.get("BUNIT", "")))
        pixel_scales.append(_pixel_scale(hdr, name, band))
        var_entry = arrays.get(f"VAR_{ext}")
        if var_entry is not None and var_entry[1] is not None:
            if var_entry[1].shape != shape:
                raise QuarantineError("shape_mismatch", f"{name}: VAR_{band} has shape {var_entry[1].shape}, "
                                                        f"IMAGE_{band} {shape}")
            var = variance[i]  # filled in place: var_entry[1].astype(np.float32)
            np.copyto(var, var_entry[1], casting="unsafe")
            vbad = ~np.isfinite(var)
            n_vbad = np.count_nonzero(vbad)
            if (var[~vbad] < 0).any() if n_vbad else (var < 0).any():
                raise QuarantineError("negative_variance", f"{name}: VAR_{band} has {(var[~vbad] < 0).sum()} "
                                                           f"negative pixels (min {var[~vbad].min():.3g})")
            if n_vbad:
                bad |= vbad
                n_bad = np.count_nonzero(bad)
            if _fraction(n_bad, bad) > MAX_NAN_FRACTION:
                raise QuarantineError("mostly_nan", f"{where} with VAR_{band} is {_non_finite(var, bad)}")
            if n_bad:  # else there is nothing to zero
                arr[bad] = 0.0
                var[bad] = 0.0
            if not var.any():  # zero in every finite pixel (the non-finite ones are zero by now)
                if not arr.any():  # no data at all in this band (e.g. outside its footprint): as if absent
                    flags[band] = ["missing"]
                    fwhm[i] = spec.seeing_fwhm_arcsec
                    continue
                raise QuarantineError("zero_variance", f"{name}: VAR_{band} is zero in every finite pixel while "
                                                       f"IMAGE_{band} is not: no noise model (leave VAR_{band} out "
                                                       f"to have it derived from the sky)")
            _check_flux_range(var, float(scale[i]) ** 2, f"{name}: VAR_{band}", unit=f"({hdr.get('BUNIT', '')})^2",
                              out_unit="nanomaggies^2", limit=MAX_PIXEL_NMGY**2)
            if n_vbad and "nan_masked" not in bflags:
                bflags.append("nan_masked")
        else:
            try:
                sky = sky_noise(arr, mask=bad)
            except ValueError as err:
                raise QuarantineError("no_sky_noise", f"{where} has no VAR_{band} and its sky noise cannot be "
                                                      f"measured: {err}") from None
            gain = hdr.get("GAIN", primary.get("GAIN"))
            if gain is not None:
                gain = _number({"GAIN": gain}, "GAIN", where, low=GAIN_RANGE[0], high=GAIN_RANGE[1])
            var = variance[i]
            var[...] = derived_variance(arr, sky, gain_e_per_unit=gain)
            bflags.append("var_derived")
            bflags.append("var_poisson" if gain is not None else "var_sky_only")
            if not sky.source_masked:
                bflags.append("var_sky_unmasked")
        psf_entry = arrays.get(f"PSF_{ext}")
        psf = None
        if psf_entry is not None and psf_entry[1] is not None:
            psf = psf_entry[1].astype(np.float64)
            total = None
            if not (psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0
                    or not np.isfinite(psf).all()):
                total = psf.sum()
            if total is None or total <= 0:
                raise QuarantineError("bad_psf", f"{name}: PSF_{band} has shape {psf.shape}; it must be an odd "
                                                 f"square finite image with positive sum")
            psf = psf / total
        if "PSFFWHM" in hdr:
            fwhm[i] = _number(hdr, "PSFFWHM", where, low=1e-4, high=60.0)
        elif psf is not None:
            fwhm[i] = measure_fwhm_px(psf) * pixel_scales[-1]
            bflags.append("fwhm_from_psf")
        else:
            fwhm[i] = spec.seeing_fwhm_arcsec
            bflags.append("fwhm_nominal")
        psfs[i] = psf  # image[i], variance[i] and nan_mask[i] were filled in place
        if bflags:
            flags[band] = bflags
    if all("missing" in flags.get(b, ()) for b in survey.band_names):
        raise QuarantineError("no_data", f"{name}: every band's image and variance are zero in every finite pixel "
                                         f"(bands {sorted(found)}): the file holds no data")
    if max(pixel_scales) > 1.01 * min(pixel_scales):
        raise QuarantineError("pixscale_mismatch", f"{name}: band pixel scales {pixel_scales} arcsec differ by "
                                                   f"more than 1%")
    pix = median_of_few(pixel_scales)
    # the coarsest pixels a cutout may have: the broadest seeing of the survey's bands (a file may hold only the
    # bands of its coarser camera, e.g. Euclid's NISP at 0.3"/px beside VIS at 0.1")
    broadest = max(survey.bands, key=lambda b: b.seeing_fwhm_arcsec)
    if pix > broadest.seeing_fwhm_arcsec:
        raise QuarantineError("too_coarse", f"{name}: pixel scale {pix:g}\"/px is coarser than the {survey.name} "
                                            f"{broadest.name} seeing FWHM {broadest.seeing_fwhm_arcsec:g}\", the "
                                            f"broadest of its bands (PIXSCALE is in arcsec per pixel)")
    shift = (0, 0)  # whole pixels (rows, columns) the object lies from the file's centre
    if shape[0] != shape[1]:  # a non-square file: where is the object? RA/DEC through a band's WCS, if one has it
        at = _object_pixel([found[b] for b in survey.band_names if b in found], ra, dec, shape)
        if at is not None:  # whole pixels, towards zero: a sub-pixel offset (any service's centring) is no shift,
            # and the transform's round-off (1e-6 px) cannot tip a whole one
            shift = tuple(int(math.copysign(math.floor(abs(d) + 1e-6), d))
                          for d in (v - (n - 1) / 2 for v, n in zip(at, shape)))
    covered = min(n - 2 * abs(r) for n, r in zip(shape, shift))  # px of data on both sides of the object
    side_arcsec = covered * pix
    if side_arcsec < survey.min_cutout_arcsec - SIZE_TOLERANCE_ARCSEC:
        where = "" if shift == (0, 0) else (f" around the object, which its WCS puts {shift[1]:+d}, {shift[0]:+d} "
                                            f"px (x, y) from the file's centre")
        raise QuarantineError("too_small", f"{name}: images are {shape[0]}x{shape[1]} px at {pix:g}\"/px = "
                                           f"{side_arcsec:.2f}\" across{where}, less than the {survey.name} minimum "
                                           f"min_cutout_arcsec = {survey.min_cutout_arcsec:g}\" (its grid is "
                                           f"{survey.cutout_size_px} px = {survey.cutout_size_arcsec:.2f}\"; "
                                           f"cutouts from the minimum up are padded)")
    side, offset = max(shape), (0, 0)
    if shape[0] != shape[1]:  # every pixel kept: zero-padded to a square, the object where a centred one would be

        def offsets(side: int) -> tuple[int, ...]:
            return tuple((side - n) // 2 - r for n, r in zip(shape, shift))

        while not all(0 <= o <= side - n for o, n in zip(offsets(side), shape)):  # grown until the object fits
            side += 1
        offset = offsets(side)
        image, variance, nan_mask = (pad_at(a, side, offset) for a in (image, variance, nan_mask))
    short, long = (size_on_survey_grid(n, pix, survey) for n in (covered, max(shape)))
    geometry = [g for g, on in (("padded", short < survey.cutout_size_px),  # rows or columns without data
                                ("cropped", long >= CROP_FLAG_RATIO * survey.cutout_size_px),
                                ("padded_square", shape[0] != shape[1])) if on]
    if geometry:
        for band in survey.band_names:
            flags.setdefault(band, []).extend(geometry)
        flags = {b: flags[b] for b in survey.band_names if b in flags}  # band order, as without geometry
    return Cutout(name=name, objid=objid, ra=ra, dec=dec, survey=survey.name, primary=primary,
                  bands=survey.band_names, image=image, variance=variance, nan_mask=nan_mask, psf=psfs,
                  psf_fwhm_arcsec=fwhm, nmgy_per_unit=scale, pixel_scale_arcsec=pix,
                  band_flags=flags, ignored_bands=tuple(sorted(ignored)), file_shape=(int(shape[0]), int(shape[1])),
                  square_offset_px=offset)
