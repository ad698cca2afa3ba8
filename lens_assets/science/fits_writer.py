"""Writing survey cutout FITS files in the inbox contract (:mod:`.fits_contract` describes the contract).

:func:`write_cutout` assembles standard FITS bytes directly (astropy reads and
verifies them); :func:`write_simulated_cutout` writes a rendered cutout with its
truth in the headers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .fits_validation import FITS_BLOCK
from .surveys import SurveySpec

__all__ = ["BandHDUs", "write_cutout", "cutout_bytes", "write_simulated_cutout", "TRUTH_KEYS", "SIM_ROLES",
           "check_sim_role", "simulated_primary", "without_truth"]


@dataclass
class BandHDUs:
    """What a band contributes to a file: image, optional variance and PSF, extra header cards."""

    image: np.ndarray
    header: dict
    variance: np.ndarray | None = None
    psf: np.ndarray | None = None


LENSTRONOMY_LABEL_SOURCE = "sim:lenstronomy"  # LABELSRC of files whose light lenstronomy drew (the default)
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
    """Write one inbox-contract file (float32 images, big-endian) to ``path``: :func:`cutout_bytes`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists and overwrite is False")
    path.write_bytes(cutout_bytes(primary, bands))


def cutout_bytes(primary: dict, bands: Mapping[str, BandHDUs]) -> bytes:
    """The bytes of one inbox-contract file.

    The file is standard FITS (astropy reads and verifies it); it is assembled
    directly because astropy's per-card validation costs more than drawing the
    cutout with lenstronomy.
    """
    parts = [_header_block([("SIMPLE", True), ("BITPIX", 8), ("NAXIS", 0), ("EXTEND", True),
                            *primary.items()])]
    for band, b in bands.items():
        parts.append(_image_hdu(f"IMAGE_{band}", b.image, [("BAND", band), *b.header.items()]))
        if b.variance is not None:
            parts.append(_image_hdu(f"VAR_{band}", b.variance, [("BAND", band), ("BUNIT", _var_unit(b.header))]))
        if b.psf is not None:
            parts.append(_image_hdu(f"PSF_{band}", b.psf, [("BAND", band)]))
    return b"".join(parts)


def _var_unit(header: dict) -> str:
    unit = header.get("BUNIT", "")
    return f"({unit})**2" if unit else ""


TRUTH_KEYS = ("Z_SRC", "LENS", "LABELSRC", "LABELCNF", "FLUXRAT", "THETA_E", "ARCSNR", "SIMFAM", "SIMFAMH",
              "SIMSEED", "SIMKIND", "SERSICN", "RHALF", "AXRATIO", "PA_DEG", "PSFPROF", "EXPSCALE", "MOFFATB",
              "PAIRID", "SCENE_TE", "SIMROLE")


# SIMROLE: what a simulated file is for. "train": a training population; "heldout": a held-out family, scored and
# never trained on; "pairs": lens/twin pairs of the lensing-only AUROC. dataset_splits keeps the last two out.
SIM_ROLES = ("train", "heldout", "pairs")


def check_sim_role(role: str) -> str:
    if role not in SIM_ROLES:
        raise ValueError(f"simulation role {role!r} is not one of {list(SIM_ROLES)}")
    return role


def simulated_primary(s, *, survey: SurveySpec, family, seed: int, role: str, label_source: str,
                      flux_ratio: float, arc_snr: float) -> dict:
    """The primary-header cards every simulator writes, in the contract's order: the object, its truth and its
    simulation (family, seed, kind, ``SIMROLE``), the deflector's light and the observation. ``s`` is the
    simulated object (lenstronomy's ``System`` or GalSim's ``GalsimScene``: the same attribute names); each
    writer adds its own keys after these (``MOFFATB``, ``PAIRID``, ``SCENE_TE``) and drops the truth keys of an
    unlabeled file with :func:`without_truth`."""
    return {
        "OBJID": s.objid, "RA": round(s.ra_deg, 7), "DEC": round(s.dec_deg, 7), "SURVEY": survey.name,
        "INSTRUME": survey.instrument,
        "Z_SPEC": round(s.z_lens, 5), "Z_SRC": round(s.z_source, 5),
        "LENS": bool(s.is_lens), "LABELSRC": label_source, "LABELCNF": 1.0,
        "FLUXRAT": round(flux_ratio, 6), "THETA_E": round(s.theta_e_arcsec, 5),
        "ARCSNR": round(arc_snr, 4),
        "REFBAND": survey.band(survey.reference_band).name,
        "SIMFAM": family.name, "SIMFAMH": family.sha256[:16], "SIMSEED": int(seed), "SIMKIND": s.kind,
        "SIMROLE": check_sim_role(role),
        "SERSICN": round(s.galaxy["n"], 4), "RHALF": round(s.galaxy["r_eff"], 5),
        "AXRATIO": round(s.galaxy["q"], 4), "PA_DEG": round(s.galaxy["pa"], 3),
        "PSFPROF": s.psf_profile, "EXPSCALE": round(s.exposure_scale, 4),
    }


def without_truth(primary: dict) -> dict:
    """``primary`` less the truth keys (:data:`TRUTH_KEYS`), as an unlabeled survey drop would come."""
    return {k: v for k, v in primary.items() if k not in TRUTH_KEYS}


def write_simulated_cutout(path: Path, cutout, *, survey: SurveySpec, family, seed: int,
                           labeled: bool = True, role: str = "train",
                           label_source: str = LENSTRONOMY_LABEL_SOURCE) -> None:
    """Write a :class:`~.simulation.RenderedCutout` with its truth in the headers
    (``labeled=False``: without, as an unlabeled survey drop would come); ``role``: its ``SIMROLE``;
    ``label_source``: its ``LABELSRC``, the code that drew it."""
    Path(path).write_bytes(simulated_cutout_bytes(cutout, survey=survey, family=family, seed=seed, labeled=labeled,
                                                  role=role, label_source=label_source))


def simulated_cutout_bytes(cutout, *, survey: SurveySpec, family, seed: int, labeled: bool = True,
                           extra: dict | None = None, role: str = "train",
                           label_source: str = LENSTRONOMY_LABEL_SOURCE) -> bytes:
    """The inbox-contract file of a :class:`~.simulation.RenderedCutout` (:func:`write_simulated_cutout`), in
    memory: the zero-point error, a withheld variance map and the crop of its observation applied. ``extra``:
    more primary-header cards (cluster fields' keys), written after the contract's; ``role``: ``SIMROLE``, one
    of :data:`SIM_ROLES`; ``label_source``: ``LABELSRC`` (``sim:torch`` for the torch renderer's light)."""
    s = cutout.system
    primary = simulated_primary(s, survey=survey, family=family, seed=seed, role=role,
                                label_source=label_source, flux_ratio=cutout.flux_ratio, arc_snr=cutout.arc_snr)
    if s.psf_profile in ("moffat", "core_wings"):
        primary["MOFFATB"] = round(s.moffat_beta, 4)
    if s.pair_id:
        primary["PAIRID"] = s.pair_id
    if math.isfinite(s.scene_theta_e_arcsec):
        primary["SCENE_TE"] = round(s.scene_theta_e_arcsec, 5)
    if not labeled:
        primary = without_truth(primary)
    primary.update(extra or {})
    obs = getattr(s, "observation", None) or {}
    zp_error = obs.get("zero_point_error_mag", {})
    keep_variance = obs.get("write_variance", True)
    crop = obs.get("crop_px", 0)  # a side, or (rows, columns): the centre is kept
    h, w = (crop, crop) if isinstance(crop, int) else crop
    n = cutout.image.shape[-1]
    sl = np.s_[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] if crop else np.s_[:, :]
    bands = {}
    for i, band in enumerate(cutout.bands):
        # the file states the zero point with the survey's calibration error (the data are in the true one)
        bands[band] = BandHDUs(
            image=cutout.image[i][sl], variance=cutout.variance[i][sl] if keep_variance else None,
            psf=cutout.psf[i],
            header={"BUNIT": "count/s", "MAGZP": round(cutout.zero_points[i] + zp_error.get(band, 0.0), 5),
                    "PIXSCALE": survey.pixel_scale_arcsec, "PSFFWHM": round(s.psf_fwhm_arcsec[band], 5)})
    return cutout_bytes(primary, bands)


