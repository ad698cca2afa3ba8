"""Cluster fields from inbox-contract FITS: read, convert to nanomaggies, PSF-match the bands, find arc segments.

A cluster field is read through the galaxy track's FITS contract on the survey's
grid with the field's side as its cutout size (:func:`field_survey`); a file that
cannot be read is a quarantine row with the contract's reason, and so is one whose
BCG keys are not a position inside the image (``bad_header_value``) or whose BCG
cannot be found (``no_bcg``). The bands of one field are matched to one Gaussian
PSF (the field's broadest band, 2% broader) with the galaxy track's
:func:`..psf.homogenize`, so the segments' colours compare like with like. The
segmentation (detection S/N, band weights, flux errors, the BCG estimate) and the
depth use the variance before matching: matching correlates the noise of
neighbouring pixels, and a normalized kernel keeps a region's summed flux, so the
unmatched variance summed over a segment is its flux variance, and detection in
unmatched-variance units is conservative.
:func:`process_field` returns one catalog row (truth and observing context) and the
field's arc segments (:func:`.segments.find_arc_segments`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..surveys import SurveySpec, get_survey

__all__ = ["field_survey", "process_field", "process_fields", "segmented_field", "split_fields", "FIELD_COLUMNS",
           "depth_mag"]

FIELD_COLUMNS = ["objid", "survey", "ra", "dec", "label", "label_source", "sim_family", "sim_kind", "sim_role",
                 "z_cluster",
                 "mag_ref", "theta_e", "arc_snr", "n_arcs", "arc_sb", "group", "bcg_x_px", "bcg_y_px", "size_px",
                 "seeing_arcsec", "psf_fwhm_arcsec", "pixel_scale_arcsec", "depth_mag", "n_segments", "source_file",
                 "source_sha256"]


def field_survey(survey: SurveySpec, size_px: int) -> SurveySpec:
    """``survey`` with ``size_px`` as its cutout size: the grid cluster fields are read on."""
    return replace(survey, cutout_size_px=int(size_px), min_cutout_arcsec=None)


def depth_mag(variance: np.ndarray, *, psf_fwhm_px: float, pixel_scale_arcsec: float) -> float:
    """5σ point-source depth (AB) of one band in nanomaggies: the median pixel noise over a Gaussian PSF's
    noise-equivalent area ``4π σ²`` (σ = FWHM / 2.355)."""
    good = variance > 0
    if not good.any():
        return float("nan")
    sigma_pix = float(np.sqrt(np.median(variance[good])))
    area = 4.0 * math.pi * (psf_fwhm_px / 2.3548) ** 2
    return float(22.5 - 2.5 * math.log10(5.0 * sigma_pix * math.sqrt(area)))


def _header(p: dict, key: str, default=float("nan")):
    v = p.get(key)
    return default if v is None else v


def _matched(path, name: str, survey: SurveySpec, size_px: int, *, own_size: bool = False):
    """Read one field and match its bands to one Gaussian PSF: (catalog row, cutout, image, variance, BCG (x, y)
    or None, matched FWHM in px) in nanomaggies, or the quarantine row.

    ``own_size``: ``size_px`` is the field's own side from its fields row (the side of the image a first read on
    a grid of at most that gave), so any field that read then reads back to the same image: a non-square field,
    whose shorter side is below its padded side, included."""
    from ..ingest import read_one
    from ..normalize import normalize_cutout
    from ..psf import homogenize

    fs = field_survey(survey, size_px)
    if own_size:
        fs = replace(fs, min_cutout_arcsec=survey.pixel_scale_arcsec)
    row, q, cut = read_one(path, name, fs, cluster=True)
    if q is not None:
        return q
    norm = normalize_cutout(cut, fs)
    present = cut.present
    fwhm = np.asarray(cut.psf_fwhm_arcsec, dtype=float)
    target = 1.02 * float(fwhm[present].max())
    kernel = int(math.ceil(4 * target / survey.pixel_scale_arcsec)) | 1
    matched = homogenize(norm.image[None], norm.variance[None], [norm.psf], fwhm[None], present[None],
                         pixel_scale_arcsec=survey.pixel_scale_arcsec, target_fwhm=target, kernel_size=kernel)
    image = matched.image[0]
    variance = np.asarray(norm.variance, dtype=np.float32)  # before matching: see the module docstring
    bcg = _header_bcg(cut, norm, scale_out=survey.pixel_scale_arcsec, name=name)
    if isinstance(bcg, dict):
        bcg["source_sha256"] = row["source_sha256"]
        return bcg
    return row, cut, image, variance, bcg, target / survey.pixel_scale_arcsec


def _quarantine(cut, name: str, reason: str, message: str) -> dict:
    return {"objid": cut.objid, "source_file": name, "source_sha256": "", "reason": reason, "message": message,
            "survey": cut.survey}


def _header_bcg(cut, norm, *, scale_out: float, name: str):
    """The BCG from ``BCGXPIX``/``BCGYPIX`` (FITS 1-based, the file's pixels) on the normalized grid (0-based,
    after ``normalize_cutout``'s resampling and centre padding), None when absent, or a quarantine row when it is
    not a position inside the image."""
    p = cut.primary
    if p.get("BCGXPIX") is None and p.get("BCGYPIX") is None:
        return None
    try:
        x, y = float(p["BCGXPIX"]), float(p["BCGYPIX"])
    except (KeyError, TypeError, ValueError):
        return _quarantine(cut, name, "bad_header_value", f"{name}: BCGXPIX = {p.get('BCGXPIX')!r}, BCGYPIX = "
                                                          f"{p.get('BCGYPIX')!r}: both must be numbers (FITS pixels)")
    n_in = cut.image.shape[-1]
    h, w = cut.file_shape
    if not (0.5 <= x <= w + 0.5 and 0.5 <= y <= h + 0.5):
        return _quarantine(cut, name, "bad_header_value", f"{name}: BCGXPIX, BCGYPIX = ({x}, {y}) lies outside "
                                                          f"the {h}x{w} image")
    # a non-square file is padded to square on reading (padded_square): its pixel (0, 0) moves to the offset
    x, y = x + cut.square_offset_px[1], y + cut.square_offset_px[0]
    # resampling (resample_flux: grids centred on each other) keeps each point's angle from the centre; padding
    # puts the footprint at (n - fp) // 2
    fp, n_out = norm.footprint_px, norm.image.shape[-1]
    scale = cut.pixel_scale_arcsec / scale_out if norm.resampled else 1.0
    pad = (n_out - fp) // 2
    return tuple((v - 1 - (n_in - 1) / 2) * scale + (fp - 1) / 2 + pad for v in (x, y))


def segmented_field(path, name: str, survey: SurveySpec, *, size_px: int, light: str = "median",
                    nsigma: float = 2.0):
    """(PSF-matched image in nanomaggies, segmentation map, segments) of one readable field (for galleries)."""
    from .segments import find_arc_segments

    got = _matched(path, name, survey, size_px)
    if isinstance(got, dict):
        raise ValueError(got["message"])
    _, _, image, variance, bcg, psf_px = got
    segs, segmap = find_arc_segments(image, variance, pixel_scale_arcsec=survey.pixel_scale_arcsec,
                                     psf_fwhm_px=psf_px, bcg_xy=bcg, bands=survey.band_names, light=light,
                                     nsigma=nsigma)
    return image, segmap, segs


def process_field(path: str | Path, name: str, survey: SurveySpec, *, size_px: int, light: str = "median",
                  nsigma: float = 2.0) -> tuple[dict | None, pd.DataFrame | None, dict | None]:
    """``(field row, segments, None)`` for a readable field, ``(None, None, quarantine row)`` otherwise."""
    from .segments import estimate_bcg_xy, find_arc_segments

    got = _matched(path, name, survey, size_px)
    if isinstance(got, dict):
        return None, None, got
    row, cut, image, variance, bcg, psf_px = got
    n = image.shape[-1]
    if bcg is None:
        try:
            bcg = estimate_bcg_xy(image, variance, psf_fwhm_px=psf_px)
        except ValueError as err:  # no source stands out near the centre
            q = _quarantine(cut, name, "no_bcg", f"{name}: {err}")
            q["source_sha256"] = row["source_sha256"]
            return None, None, q
    segs, _ = find_arc_segments(image, variance, pixel_scale_arcsec=survey.pixel_scale_arcsec, psf_fwhm_px=psf_px,
                                bcg_xy=bcg, bands=survey.band_names, light=light, nsigma=nsigma)
    p = cut.primary
    ref = survey.band(survey.reference_band).name
    ref_i = survey.band_names.index(ref)
    present = cut.present
    out = {
        "objid": row["objid"], "survey": survey.name, "ra": row["ra"], "dec": row["dec"], "label": int(row["label"]),
        "label_source": row["label_source"], "sim_family": row["sim_family"], "sim_kind": row["sim_kind"],
        "sim_role": row["sim_role"], "z_cluster": float(row["z_spec"]), "mag_ref": float(row[f"mag_{ref}"]),
        "theta_e": float(row["theta_e"]), "arc_snr": float(row["arc_snr"]), "n_arcs": int(_header(p, "NARCS", -1)),
        "arc_sb": float(_header(p, "ARCSB")), "group": bool(_header(p, "CLGROUP", False)),
        "bcg_x_px": bcg[0], "bcg_y_px": bcg[1], "size_px": int(n),
        "seeing_arcsec": float(np.median(np.asarray(cut.psf_fwhm_arcsec)[present])),
        "psf_fwhm_arcsec": psf_px * survey.pixel_scale_arcsec, "pixel_scale_arcsec": survey.pixel_scale_arcsec,
        "depth_mag": depth_mag(variance[ref_i], psf_fwhm_px=psf_px, pixel_scale_arcsec=survey.pixel_scale_arcsec),
        "n_segments": int(len(segs)), "source_file": row["source_file"], "source_sha256": row["source_sha256"],
    }
    segs = segs.copy()
    segs.insert(0, "objid", out["objid"])
    return out, segs, None


def _process(args):
    path, name, survey_name, size_px, light, nsigma = args
    return process_field(path, name, get_survey(survey_name), size_px=size_px, light=light, nsigma=nsigma)


def process_fields(paths, names, survey: SurveySpec, *, size_px: int, light: str = "median", nsigma: float = 2.0,
                   workers: int = 1, progress: bool = True):
    """:func:`process_field` over files in parallel: (fields table, segments table, quarantine table). Every file
    is a field row or a quarantine row; a repeated OBJID is quarantined as ``duplicate_objid`` (first file wins)."""
    from ..ingest import FirstObjid, quarantine_frame
    from ..parallel import parallel_map

    jobs = [(str(p), n, survey.name, size_px, light, nsigma) for p, n in zip(paths, names)]
    results = parallel_map(_process, jobs, workers=workers, progress=progress, desc=f"arc segments {survey.name}",
                           unit="field")
    rows, segs, quarantined = [], [], []
    seen = FirstObjid(survey.name)
    for row, seg, q in results:
        if q is None:
            q = seen.duplicate({"objid": row["objid"], "source_file": row["source_file"],
                                "source_sha256": row["source_sha256"]})
        if q is not None:
            quarantined.append(q)
            continue
        rows.append(row)
        segs.append(seg)
    fields = pd.DataFrame(rows, columns=FIELD_COLUMNS)
    segments = pd.concat(segs, ignore_index=True) if segs else pd.DataFrame(columns=["objid"])
    return fields, segments, quarantine_frame(quarantined)


def split_fields(fields: pd.DataFrame, survey: SurveySpec, *, fractions=(0.6, 0.2, 0.2), seed: int = 0,
                 heldout_families=("cluster_heldout",)) -> pd.DataFrame:
    """Train/val/test of the labeled fields (objid, split, val_role) with the galaxy track's
    :func:`..splits.make_splits`: stratified, and grouped on the sky with the field's side as the linking
    length, so overlapping fields share a split; held-out families (by name, or by the files' ``SIMROLE``) and
    unlabeled fields are left out."""
    from ..splits import make_splits

    side = float((fields["size_px"] * fields["pixel_scale_arcsec"]).max()) if len(fields) else 0.0
    cat = pd.DataFrame({
        "objid": fields["objid"], "label": fields["label"], "label_source": fields["label_source"],
        "sim_family": fields["sim_family"], "ra": fields["ra"], "dec": fields["dec"],
        "sim_role": fields["sim_role"] if "sim_role" in fields else "",
        "z_spec": fields["z_cluster"], "z_phot": -1.0, f"mag_{survey.reference_band}": fields["mag_ref"],
        "seeing": fields["seeing_arcsec"], "psf_fwhm": fields["psf_fwhm_arcsec"],
        "pixel_scale": fields["pixel_scale_arcsec"], "survey": fields["survey"]})
    result = make_splits(cat, reference_band=survey.reference_band, fractions=tuple(fractions), seed=seed,
                         link_arcsec=side, exclude_families=tuple(heldout_families))
    return result.table[["objid", "split", "val_role"]]

