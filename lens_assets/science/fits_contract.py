"""The survey cutout FITS contract (docs/fits_inbox_contract.md): writing and validated reading.

One file per object. Primary header: ``OBJID``, ``RA``, ``DEC`` (deg, ICRS),
``SURVEY``; optional ``Z_PHOT``, ``Z_SPEC``, ``Z_ERR``; labeled data adds ``LENS``,
``LABELSRC``, ``LABELCNF``, ``FLUXRAT``, ``THETA_E`` (simulations also write
``ARCSNR``, the lensed light's matched-filter S/N). Per band ``b``: ``IMAGE_<b>``
(2-D float, header ``BAND``, ``BUNIT``, ``MAGZP`` when ``BUNIT`` is ``count/s`` or
``adu``, ``PIXSCALE`` or a celestial WCS, optional ``PSFFWHM``, optional ``GAIN`` in
electrons per image unit, also read from the primary header), optional ``VAR_<b>``
and ``PSF_<b>``.

A band without ``VAR_<b>`` gets a variance from its sky pixels
(:func:`.noise.sky_noise`: sources masked, sigma-clipped), flagged ``var_derived``
and either ``var_poisson`` (``GAIN`` given: sky plus the sources' Poisson term) or
``var_sky_only`` (no gain: sky variance everywhere, which underestimates the noise
on bright sources); ``var_sky_unmasked`` when sources left under 10% of the
pixels as sky and the estimate used them all.

Sizes: a cutout must cover the survey's ``min_cutout_arcsec`` (else ``too_small``).
One smaller than the survey grid (``cutout_size_px`` at ``pixel_scale_arcsec``) is
read as it is and flagged ``padded`` in every band; :func:`.normalize.normalize_cutout`
pads it with zero image and zero variance (the contract's "no data", as for a missing
band) after resampling. One at least :data:`CROP_FLAG_RATIO` times the grid is flagged
``cropped`` (the shard builder keeps its centre).

:func:`read_cutout` turns bytes into a :class:`Cutout` or raises
:class:`QuarantineError` with a reason code from :data:`QUARANTINE_REASONS` and a
message naming the file, the field and the value.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .noise import derived_variance, sky_noise
from .psf import measure_fwhm_px
from .surveys import SurveySpec

__all__ = [
    "BandHDUs",
    "Cutout",
    "QuarantineError",
    "QUARANTINE_REASONS",
    "LABEL_SOURCE_PREFIXES",
    "BAND_FLAGS",
    "CROP_FLAG_RATIO",
    "write_cutout",
    "write_simulated_cutout",
    "read_cutout",
    "nanomaggies_per_unit",
]

FITS_BLOCK = 2880
MAX_NAN_FRACTION = 0.5
RESAMPLE_TOLERANCE = 0.01  # pixel scales within 1% of the survey's are used as they are
MAGZP_RANGE = (10.0, 45.0)  # AB zero points of real instruments in count/s or adu lie well inside this
GAIN_RANGE = (1e-6, 1e12)  # electrons per image unit (count/s images: gain x exposure time)
CROP_FLAG_RATIO = 1.25  # on-grid side >= 1.25 x the grid: over a third of the file's area is cropped away
SIZE_TOLERANCE_ARCSEC = 1e-6

QUARANTINE_REASONS: Mapping[str, str] = {
    "unreadable": "not a FITS file, or astropy cannot parse it",
    "truncated": "the file ends before its headers say it should",
    "missing_header": "a required primary-header keyword is absent",
    "bad_header_value": "a header keyword has a value outside its allowed set or range",
    "survey_mismatch": "SURVEY differs from the survey the file was ingested for",
    "no_image_hdu": "no IMAGE_<band> extension",
    "no_known_band": "IMAGE_<band> extensions exist but none is a band of the survey",
    "not_2d": "an image is not 2-D",
    "not_square": "an image is not square",
    "shape_mismatch": "bands, variance or PSF images disagree in shape",
    "too_small": "covers less sky than the survey's min_cutout_arcsec",
    "mostly_nan": "more than half of a band's pixels are NaN",
    "negative_variance": "a VAR_<band> pixel is negative",
    "missing_magzp": "BUNIT count/s or adu without MAGZP",
    "bad_bunit": "BUNIT is not one of nanomaggy, count/s, adu",
    "missing_pixscale": "neither PIXSCALE nor a celestial WCS",
    "pixscale_mismatch": "bands differ in pixel scale by more than 1%",
    "bad_psf": "PSF_<band> is not an odd, square, finite image with positive sum",
    "duplicate_objid": "OBJID already ingested from another file",
    "no_sky_noise": "a band without VAR_<band> has constant pixels: no noise to derive a variance from",
}

LABEL_SOURCE_PREFIXES = ("sim:", "obs:", "weak:", "pretrain:")
BAND_FLAGS = ("missing", "nan_masked", "var_derived", "fwhm_from_psf", "fwhm_nominal",
              "var_sky_only", "var_poisson", "var_sky_unmasked", "padded", "cropped")
FLUX_UNITS = ("nanomaggy", "count/s", "adu")
PRIMARY_KEYWORDS = ("OBJID", "RA", "DEC", "SURVEY", "INSTRUME", "Z_PHOT", "Z_SPEC", "Z_ERR", "LENS", "LABELSRC",
                    "LABELCNF", "FLUXRAT", "THETA_E", "ARCSNR", "SIMFAM", "SIMKIND", "SERSICN", "RHALF", "AXRATIO",
                    "PA_DEG", "GAIN", "PAIRID")
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


# --------------------------------------------------------------------------- writing


@dataclass
class BandHDUs:
    """What a band contributes to a file: image, optional variance and PSF, extra header cards."""

    image: np.ndarray
    header: dict
    variance: np.ndarray | None = None
    psf: np.ndarray | None = None


_KEYWORD_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _card(key: str, value) -> bytes:
    """One 80-byte fixed-format FITS card (FITS 4.0 section 4.2) for a str, bool, int or float value."""
    if len(key) > 8 or not set(key) <= _KEYWORD_CHARS:
        raise ValueError(f"FITS keyword {key!r} must be at most 8 characters of A-Z 0-9 _ -")
    if isinstance(value, (bool, np.bool_)):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, (int, np.integer)):
        text = f"{int(value):>20d}"
    elif isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"FITS keyword {key}: value {v} is not finite")
        s = repr(v).upper()  # shortest text that round-trips; over 20 characters it is free-format
        text = f"{s:>20}"
    elif isinstance(value, str):
        text = "'" + value.replace("'", "''").ljust(8) + "'"
        if len(text) > 70 or not value.isascii():
            raise ValueError(f"FITS keyword {key}: string {value!r} is longer than 68 ASCII characters")
    else:
        raise TypeError(f"FITS keyword {key}: unsupported value type {type(value).__name__}")
    return f"{key:<8}= {text}".ljust(80).encode("ascii")


def _header_block(cards: list[tuple[str, object]]) -> bytes:
    raw = b"".join(_card(k, v) for k, v in cards) + b"END".ljust(80)
    return raw + b" " * (-len(raw) % FITS_BLOCK)


def _image_hdu(name: str, data: np.ndarray, cards: list[tuple[str, object]]) -> bytes:
    arr = np.ascontiguousarray(data, dtype=">f4")
    if arr.ndim != 2:
        raise ValueError(f"{name}: image must be 2-D, got shape {arr.shape}")
    head = [("XTENSION", "IMAGE"), ("BITPIX", -32), ("NAXIS", 2), ("NAXIS1", arr.shape[1]),
            ("NAXIS2", arr.shape[0]), ("PCOUNT", 0), ("GCOUNT", 1), ("EXTNAME", name)]
    body = arr.tobytes()
    return _header_block(head + cards) + body + b"\0" * (-len(body) % FITS_BLOCK)


def write_cutout(path: Path, primary: dict, bands: Mapping[str, BandHDUs], *, overwrite: bool = True) -> None:
    """Write one inbox-contract file (float32 images, big-endian) to ``path``.

    The file is standard FITS (astropy reads and verifies it); it is assembled
    directly because astropy's per-card validation costs more than drawing the
    cutout with lenstronomy.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists and overwrite is False")
    parts = [_header_block([("SIMPLE", True), ("BITPIX", 8), ("NAXIS", 0), ("EXTEND", True),
                            *primary.items()])]
    for band, b in bands.items():
        parts.append(_image_hdu(f"IMAGE_{band}", b.image, [("BAND", band), *b.header.items()]))
        if b.variance is not None:
            parts.append(_image_hdu(f"VAR_{band}", b.variance, [("BAND", band), ("BUNIT", _var_unit(b.header))]))
        if b.psf is not None:
            parts.append(_image_hdu(f"PSF_{band}", b.psf, [("BAND", band)]))
    path.write_bytes(b"".join(parts))


def _var_unit(header: dict) -> str:
    unit = header.get("BUNIT", "")
    return f"({unit})**2" if unit else ""


TRUTH_KEYS = ("Z_SRC", "LENS", "LABELSRC", "LABELCNF", "FLUXRAT", "THETA_E", "ARCSNR", "SIMFAM", "SIMFAMH",
              "SIMSEED", "SIMKIND", "SERSICN", "RHALF", "AXRATIO", "PA_DEG", "PSFPROF", "EXPSCALE", "MOFFATB",
              "PAIRID")


def write_simulated_cutout(path: Path, cutout, *, survey: SurveySpec, family, seed: int,
                           labeled: bool = True) -> None:
    """Write a :class:`~.simulation.RenderedCutout` with its truth in the headers
    (``labeled=False``: without, as an unlabeled survey drop would come)."""
    s = cutout.system
    primary = {
        "OBJID": s.objid, "RA": round(s.ra_deg, 7), "DEC": round(s.dec_deg, 7), "SURVEY": survey.name,
        "INSTRUME": survey.instrument,
        "Z_SPEC": round(s.z_lens, 5), "Z_SRC": round(s.z_source, 5),
        "LENS": bool(s.is_lens), "LABELSRC": "sim:lenstronomy", "LABELCNF": 1.0,
        "FLUXRAT": round(cutout.flux_ratio, 6), "THETA_E": round(s.theta_e_arcsec, 5),
        "ARCSNR": round(cutout.arc_snr, 4),
        "REFBAND": survey.band(survey.reference_band).name,
        "SIMFAM": family.name, "SIMFAMH": family.sha256[:16], "SIMSEED": int(seed), "SIMKIND": s.kind,
        "SERSICN": round(s.galaxy["n"], 4), "RHALF": round(s.galaxy["r_eff"], 5),
        "AXRATIO": round(s.galaxy["q"], 4), "PA_DEG": round(s.galaxy["pa"], 3),
        "PSFPROF": s.psf_profile, "EXPSCALE": round(s.exposure_scale, 4),
    }
    if s.psf_profile in ("moffat", "core_wings"):
        primary["MOFFATB"] = round(s.moffat_beta, 4)
    if s.pair_id:
        primary["PAIRID"] = s.pair_id
    if not labeled:
        primary = {k: v for k, v in primary.items() if k not in TRUTH_KEYS}
    obs = getattr(s, "observation", None) or {}
    zp_error = obs.get("zero_point_error_mag", {})
    keep_variance = obs.get("write_variance", True)
    crop = obs.get("crop_px", 0)
    n = cutout.image.shape[-1]
    lo = (n - crop) // 2 if crop else 0
    sl = np.s_[lo:lo + crop, lo:lo + crop] if crop else np.s_[:, :]
    bands = {}
    for i, band in enumerate(cutout.bands):
        # the file states the zero point with the survey's calibration error (the data are in the true one)
        bands[band] = BandHDUs(
            image=cutout.image[i][sl], variance=cutout.variance[i][sl] if keep_variance else None,
            psf=cutout.psf[i],
            header={"BUNIT": "count/s", "MAGZP": round(cutout.zero_points[i] + zp_error.get(band, 0.0), 5),
                    "PIXSCALE": survey.pixel_scale_arcsec, "PSFFWHM": round(s.psf_fwhm_arcsec[band], 5)})
    write_cutout(path, primary, bands)


# --------------------------------------------------------------------------- reading


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


class _PlainHDU:
    """One uncompressed, unscaled image HDU located by :func:`_scan_plain_hdus` (the parts of astropy's
    ``ImageHDU`` the reader uses: ``fileinfo()`` and a ``header`` parsed on demand)."""

    __slots__ = ("_raw", "_info")

    def __init__(self, raw: bytes, hdr_loc: int, dat_loc: int):
        self._raw, self._info = raw, {"hdrLoc": hdr_loc, "datLoc": dat_loc}

    def fileinfo(self) -> dict:
        return self._info

    @property
    def header(self):
        from astropy.io import fits

        return fits.Header.fromstring(self._raw[self._info["hdrLoc"]:self._info["datLoc"]].decode("ascii"))


_STRUCTURE_KEYS = ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "GROUPS", "EXTNAME")
_SCALING_KEYS = ("BSCALE", "BZERO", "BLANK", "ZIMAGE", "THEAP")
_BITPIX_DTYPE = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def _scan_plain_hdus(data: bytes) -> tuple[_PlainHDU, dict] | None:
    """``(primary HDU, {EXTNAME: (hdu, array)})`` for a file made only of plain image HDUs, read straight
    from the bytes.

    astropy builds a full ``Header`` and HDU object per extension and that is most
    of the cost of reading a 16-extension cutout. Files of uncompressed images
    without scaling keywords (``BSCALE``, ``BZERO``, ``BLANK``) are laid out
    exactly by the FITS standard: 2880-byte header blocks up to ``END``, then
    ``|BITPIX|/8 * prod(NAXISn)`` big-endian bytes padded to a block. Anything
    else (tables, random groups, compressed or scaled images, a length that is
    not whole blocks) returns ``None`` and the caller uses astropy, which also
    words the error for a broken file. Arrays are read-only views of ``data``.
    """
    if len(data) % FITS_BLOCK:
        return None
    out: dict = {}
    primary = None
    pos, first = 0, True
    while pos < len(data):
        keys: dict[str, str] = {}
        hdr_loc, end = pos, None
        while end is None:
            if pos + FITS_BLOCK > len(data):
                return None
            block = data[pos:pos + FITS_BLOCK].decode("ascii", errors="replace")
            pos += FITS_BLOCK
            for i in range(0, FITS_BLOCK, 80):
                card = block[i:i + 80]
                key = card[:8].rstrip()
                if key == "END":
                    end = pos
                    break
                if card[8:10] == "= " and (key in _STRUCTURE_KEYS or key.startswith("NAXIS") or key in _SCALING_KEYS):
                    if key in keys:
                        return None  # a repeated structural keyword: let astropy decide what it means
                    keys[key] = card
        if any(k in keys for k in _SCALING_KEYS):
            return None
        try:
            if first:
                if _card_value(keys["SIMPLE"]) is not True or "GROUPS" in keys:
                    return None
            elif _card_value(keys["XTENSION"]) != "IMAGE" or _card_value(keys.get("PCOUNT", "PCOUNT  = 0")) != 0 \
                    or _card_value(keys.get("GCOUNT", "GCOUNT  = 1")) != 1:
                return None
            dtype = _BITPIX_DTYPE.get(_card_value(keys["BITPIX"]))
            naxis = _card_value(keys["NAXIS"])
            shape = tuple(_card_value(keys[f"NAXIS{j}"]) for j in range(naxis, 0, -1))
            name = _card_value(keys["EXTNAME"]) if "EXTNAME" in keys else ("PRIMARY" if first else "")
        except (KeyError, TypeError, ValueError):
            return None
        if dtype is None or not all(isinstance(n, int) and n >= 0 for n in shape) or not isinstance(name, str) \
                or name != name.strip():
            return None
        count = int(np.prod(shape)) if shape else 0
        nbytes = count * np.dtype(dtype).itemsize
        if end + nbytes > len(data):
            return None
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape) if count else None
        hdu = _PlainHDU(data, hdr_loc, end)
        primary = primary or hdu
        out[name.upper()] = (hdu, arr)
        pos = end + -(-nbytes // FITS_BLOCK) * FITS_BLOCK
        first = False
    return primary, out


def _open(data: bytes, name: str):
    if not data.startswith(b"SIMPLE  ="):
        raise QuarantineError("unreadable", f"{name}: not a FITS file (first bytes {data[:16]!r})")
    plain = _scan_plain_hdus(data)
    if plain is not None:
        return _cards(plain[0], data, PRIMARY_KEYWORDS), plain[1]
    return _open_with_astropy(data, name)


def _open_with_astropy(data: bytes, name: str):
    """Any FITS file astropy reads (scaled or compressed images, tables beside the images); its
    exceptions and warnings become the quarantine reason of a broken file."""
    from astropy.io import fits

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False)
            arrays = {h.name.upper(): (h, h.data) for h in hdul}  # arrays are copied once, to float32
            primary = _cards(hdul[0], data, PRIMARY_KEYWORDS)
        except Exception as err:  # astropy raises many types for corrupt input; report the message
            if _cut_short(data, caught):
                raise QuarantineError("truncated", f"{name}: file length {len(data)} bytes is shorter than its "
                                                   f"headers say; it was cut short ({type(err).__name__}: "
                                                   f"{err})") from None
            raise QuarantineError("unreadable", f"{name}: astropy cannot read it ({type(err).__name__}: "
                                                f"{err})") from None
    if _cut_short(data, caught):
        raise QuarantineError("truncated", f"{name}: file length {len(data)} bytes is shorter than its headers "
                                           f"say (or not a whole number of {FITS_BLOCK}-byte blocks); it was "
                                           f"cut short")
    return primary, arrays


_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([ED][+-]?\d+)?$")


def _card_value(card: str):
    """Value of one 80-character card image: FITS fixed/free format for str, bool, int and float.

    Anything else (complex values, odd layouts) is handed to astropy's parser.
    """
    text = card[10:]
    stripped = text.lstrip()
    if stripped.startswith("'"):
        out, i = [], 1
        while i < len(stripped):
            ch = stripped[i]
            if ch == "'":
                if stripped[i + 1:i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                return "".join(out).rstrip()
            out.append(ch)
            i += 1
    else:
        token = stripped.split("/", 1)[0].strip()
        if token in ("T", "F"):
            return token == "T"
        if _INT.match(token):
            return int(token)
        if _FLOAT.match(token.upper()):
            return float(token.upper().replace("D", "E"))
    from astropy.io import fits

    return fits.Card.fromstring(card).value


def _cards(hdu, raw: bytes, keywords: tuple[str, ...]) -> dict:
    """The values of ``keywords`` in ``hdu``'s header, parsed from the file's own card images.

    astropy re-parses a card's value on every access, and that dominates reading
    a cutout; the contract's keywords are plain values, read straight from the
    header block (``fileinfo`` gives its byte range).
    """
    info = hdu.fileinfo()
    block = raw[info["hdrLoc"]:info["datLoc"]].decode("ascii", errors="replace")
    wanted, out = set(keywords), {}
    for i in range(0, len(block) - 79, 80):
        card = block[i:i + 80]
        key = card[:8].rstrip()
        if key == "END":
            break
        if key in wanted and card[8:10] == "= " and key not in out:
            out[key] = _card_value(card)
    return out


def _cut_short(data: bytes, caught) -> bool:
    return len(data) % FITS_BLOCK != 0 or any("truncated" in str(w.message) for w in caught)


def size_on_survey_grid(size_px: int, pixel_scale_arcsec: float, survey: SurveySpec) -> int:
    """Pixels a cutout spans on the survey's grid (resampled only past RESAMPLE_TOLERANCE)."""
    ratio = pixel_scale_arcsec / survey.pixel_scale_arcsec
    return size_px if abs(ratio - 1.0) <= RESAMPLE_TOLERANCE else int(math.floor(size_px * ratio + 1e-9))


def _number(primary: dict, key: str, name: str, *, default=None, low=-math.inf, high=math.inf) -> float:
    value = primary.get(key, default)
    if value is None:
        raise QuarantineError("missing_header", f"{name}: primary header lacks {key}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise QuarantineError("bad_header_value", f"{name}: {key} = {value!r} is not a number") from None
    if not (low <= v <= high) or math.isnan(v):
        raise QuarantineError("bad_header_value", f"{name}: {key} = {value!r} is outside [{low}, {high}]")
    return v


def _pixel_scale(header: dict, name: str, band: str) -> float:
    if "PIXSCALE" in header:
        return _number(header, "PIXSCALE", f"{name}: IMAGE_{band}", low=1e-6, high=3600.0)
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
    scales = proj_plane_pixel_scales(wcs.celestial) * 3600.0
    return float(np.sqrt(scales[0] * scales[1]))


def read_cutout(data: bytes, *, name: str, survey: SurveySpec) -> Cutout:
    """Validate one file's bytes against the contract for ``survey``.

    ``name`` is how errors name the file (e.g. ``raw/des/sim-0/x.fits``).
    Raises :class:`QuarantineError`; returns a :class:`Cutout` otherwise.
    """
    primary, arrays = _open(data, name)
    objid = primary.get("OBJID")
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
        return _read_bands(primary, arrays, data, name=name, survey=survey, objid=objid, ra=ra, dec=dec)
    except QuarantineError as err:
        err.objid = objid
        raise


def _read_bands(primary, arrays, raw: bytes, *, name, survey: SurveySpec, objid, ra, dec) -> Cutout:
    image_ext = {k[len("IMAGE_"):]: v for k, v in arrays.items() if k.startswith("IMAGE_")}
    if not image_ext:
        raise QuarantineError("no_image_hdu", f"{name}: no IMAGE_<band> extension (extensions: {list(arrays)})")
    found: dict[str, tuple] = {}
    ignored = []
    for ext, (hdu, arr) in image_ext.items():
        hdr = _cards(hdu, raw, BAND_KEYWORDS)
        hdr["_hdu"] = hdu  # its full header is parsed only when a WCS is needed
        band_name = str(hdr.get("BAND", ext))
        if survey.has_band(band_name):
            found[survey.canonical_band(band_name)] = (ext, hdr, arr)
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
        if arr.shape[0] != arr.shape[1]:
            raise QuarantineError("not_square", f"{name}: IMAGE_{band} has shape {arr.shape}; cutouts must be square")
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
        ext, hdr, arr = found[band]
        bflags: list[str] = []
        where = f"{name}: IMAGE_{band}"
        arr = arr.astype(np.float32, copy=True)
        bad = ~np.isfinite(arr)
        if bad.mean() > MAX_NAN_FRACTION:
            raise QuarantineError("mostly_nan", f"{where} is {bad.mean():.0%} NaN (more than "
                                                f"{MAX_NAN_FRACTION:.0%})")
        if bad.any():
            arr[bad] = 0.0
            bflags.append("nan_masked")
        magzp = hdr.get("MAGZP")
        scale[i] = nanomaggies_per_unit(str(hdr.get("BUNIT", "")), magzp, where=where)
        pixel_scales.append(_pixel_scale(hdr, name, band))
        var_entry = arrays.get(f"VAR_{ext}")
        if var_entry is not None and var_entry[1] is not None:
            var = var_entry[1].astype(np.float32, copy=True)
            if var.shape != shape:
                raise QuarantineError("shape_mismatch", f"{name}: VAR_{band} has shape {var.shape}, "
                                                        f"IMAGE_{band} {shape}")
            vbad = ~np.isfinite(var)
            if (var[~vbad] < 0).any():
                raise QuarantineError("negative_variance", f"{name}: VAR_{band} has {(var[~vbad] < 0).sum()} "
                                                           f"negative pixels (min {var[~vbad].min():.3g})")
            bad |= vbad
            if bad.mean() > MAX_NAN_FRACTION:
                raise QuarantineError("mostly_nan", f"{where} with VAR_{band} is {bad.mean():.0%} NaN (more "
                                                    f"than {MAX_NAN_FRACTION:.0%})")
            arr[bad] = 0.0
            var[bad] = 0.0
            if vbad.any() and "nan_masked" not in bflags:
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
            var = derived_variance(arr, sky, gain_e_per_unit=gain)
            bflags.append("var_derived")
            bflags.append("var_poisson" if gain is not None else "var_sky_only")
            if not sky.source_masked:
                bflags.append("var_sky_unmasked")
        psf_entry = arrays.get(f"PSF_{ext}")
        psf = None
        if psf_entry is not None and psf_entry[1] is not None:
            psf = psf_entry[1].astype(np.float64)
            if (psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0
                    or not np.isfinite(psf).all() or psf.sum() <= 0):
                raise QuarantineError("bad_psf", f"{name}: PSF_{band} has shape {psf.shape}; it must be an odd "
                                                 f"square finite image with positive sum")
            psf = psf / psf.sum()
        if "PSFFWHM" in hdr:
            fwhm[i] = _number(hdr, "PSFFWHM", where, low=1e-4, high=60.0)
        elif psf is not None:
            fwhm[i] = measure_fwhm_px(psf) * pixel_scales[-1]
            bflags.append("fwhm_from_psf")
        else:
            fwhm[i] = spec.seeing_fwhm_arcsec
            bflags.append("fwhm_nominal")
        image[i], variance[i], nan_mask[i], psfs[i] = arr, var, bad, psf
        if bflags:
            flags[band] = bflags
    if max(pixel_scales) > 1.01 * min(pixel_scales):
        raise QuarantineError("pixscale_mismatch", f"{name}: band pixel scales {pixel_scales} arcsec differ by "
                                                   f"more than 1%")
    pix = float(np.median(pixel_scales))
    side_arcsec = shape[0] * pix
    if side_arcsec < survey.min_cutout_arcsec - SIZE_TOLERANCE_ARCSEC:
        raise QuarantineError("too_small", f"{name}: images are {shape[0]}x{shape[1]} px at {pix:g}\"/px = "
                                           f"{side_arcsec:.2f}\" across, less than the {survey.name} minimum "
                                           f"min_cutout_arcsec = {survey.min_cutout_arcsec:g}\" (its grid is "
                                           f"{survey.cutout_size_px} px = {survey.cutout_size_arcsec:.2f}\"; "
                                           f"cutouts from the minimum up are padded)")
    on_grid = size_on_survey_grid(shape[0], pix, survey)
    geometry = ("padded" if on_grid < survey.cutout_size_px
                else "cropped" if on_grid >= CROP_FLAG_RATIO * survey.cutout_size_px else None)
    if geometry is not None:
        for band in survey.band_names:
            flags.setdefault(band, []).append(geometry)
        flags = {b: flags[b] for b in survey.band_names if b in flags}  # band order, as without geometry
    return Cutout(name=name, objid=objid, ra=ra, dec=dec, survey=survey.name, primary=primary,
                  bands=survey.band_names, image=image, variance=variance, nan_mask=nan_mask, psf=psfs,
                  psf_fwhm_arcsec=fwhm, nmgy_per_unit=scale, pixel_scale_arcsec=pix,
                  band_flags=flags, ignored_bands=tuple(sorted(ignored)))
