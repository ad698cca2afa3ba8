"""Ingest inbox-contract FITS files into the cutout catalog (metadata schema v2) and a quarantine table.

Every file is either a catalog row or a quarantine row with a reason code and a
message: ``n_files == n_ingested + n_quarantined`` always.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from . import fits_validation
from .fileio import read_within
from .fits_contract import LABEL_SOURCE_PREFIXES, Cutout, QuarantineError, read_cutout
from .fits_validation import median_of_few
from .parallel import parallel_map
from .surveys import SurveySpec, get_survey

__all__ = ["IngestResult", "ingest_files", "read_one", "FirstObjid", "relative_names", "find_fits", "scan_folder",
           "catalog_row", "catalog_frame", "quarantine_frame", "QUARANTINE_COLUMNS", "SCHEMA_VERSION",
           "WEAK_CONFIDENCE_MAX"]

SCHEMA_VERSION = "2.0"
WEAK_CONFIDENCE_MAX = 0.49
MISSING = -1.0
QUARANTINE_COLUMNS = ["objid", "source_file", "source_sha256", "reason", "message", "survey"]


@dataclass
class IngestResult:
    catalog: pd.DataFrame
    quarantine: pd.DataFrame
    n_files: int
    seconds: float

    @property
    def files_per_s(self) -> float:
        return self.n_files / self.seconds if self.seconds > 0 else float("nan")


# any case; gzip-compressed files are read decompressed, fpack's (.fz: tile-compressed HDUs) through astropy
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz", ".fits.fz", ".fit.fz")


def find_fits(root: Path) -> list[Path]:
    """Every FITS file below ``root`` (:data:`FITS_SUFFIXES`, any case), sorted: the order ingest sees them in.
    A link of such a name whose target is missing is listed too, so that it is quarantined as ``unreadable``
    instead of passing unseen."""
    return scan_folder(root)[0]


def scan_folder(root: Path, *, ignore: Iterable[str] = ()) -> tuple[list[Path], list[Path]]:
    """One walk of ``root``: (:func:`find_fits`' list, what else is there and is not read), each sorted. The second
    holds files, and links to no file, whose names are not FITS cutout names, and links to folders, which the walk
    does not follow (``rglob`` does not), whatever their names; folders are walked, not listed. ``ignore``: names
    left out of it in ``root`` itself (a drop's markers). What a folder holds that is not read is to be reported
    rather than passed over in silence."""
    root, ignore = Path(root), set(ignore)
    if not root.exists():
        return [], []
    fits, unread = [], []
    for p in root.rglob("*"):
        if p.name.lower().endswith(FITS_SUFFIXES) and (p.is_file() or (p.is_symlink() and not p.exists())):
            fits.append(p)
        elif (p.is_symlink() or not p.is_dir()) and not (p.parent == root and p.name in ignore):
            unread.append(p)
    return sorted(fits), sorted(unread)


def _header_float(primary: dict, key: str, name: str, *, low=-math.inf, high=math.inf) -> float:
    if key not in primary or primary[key] is None:
        return MISSING
    try:
        v = float(primary[key])
    except (TypeError, ValueError):
        raise QuarantineError("bad_header_value", f"{name}: {key} = {primary[key]!r} is not a number") from None
    if not (low <= v <= high):
        raise QuarantineError("bad_header_value", f"{name}: {key} = {v} is outside [{low}, {high}]")
    return v


def _sim_role(primary: dict, name: str) -> str:
    """``SIMROLE`` of a simulated file ("" where absent); any other value than :data:`SIM_ROLES` is quarantined,
    since a held-out file read as training data would leak into the splits."""
    from .fits_contract import SIM_ROLES

    role = str(primary.get("SIMROLE", "") or "").strip()
    if role and role not in SIM_ROLES:
        raise QuarantineError("bad_header_value", f"{name}: SIMROLE = {role!r} is not one of {list(SIM_ROLES)}")
    return role


def _labels(c: Cutout) -> dict:
    p, name = c.primary, c.name
    notes = []
    if "LENS" not in p:
        return {"label": -1, "label_source": "none", "label_confidence": 0.0, "usable_for_training": False,
                "notes": notes}
    lens = p["LENS"]
    if isinstance(lens, (bool, np.bool_)) or lens in (0, 1):
        label = int(bool(lens))
    else:
        raise QuarantineError("bad_header_value", f"{name}: LENS = {lens!r} is not a boolean")
    src = str(p.get("LABELSRC", "")).strip()
    if not src.startswith(LABEL_SOURCE_PREFIXES):
        raise QuarantineError("bad_header_value", f"{name}: LABELSRC = {src!r} does not start with one of "
                                                  f"{list(LABEL_SOURCE_PREFIXES)}")
    conf = _header_float(p, "LABELCNF", name, low=0.0, high=1.0)
    if conf == MISSING:
        conf = 1.0 if src.startswith(("sim:", "obs:")) else 0.25
        notes.append(f"LABELCNF absent: {conf} assumed for {src.split(':')[0]} labels")
    if src.startswith("weak:") and conf > WEAK_CONFIDENCE_MAX:
        notes.append(f"weak label confidence {conf} capped at {WEAK_CONFIDENCE_MAX}")
        conf = WEAK_CONFIDENCE_MAX
    return {"label": label, "label_source": src, "label_confidence": conf,
            "usable_for_training": not src.startswith("pretrain:"), "notes": notes}


def catalog_row(c: Cutout, *, sha256: str, survey: SurveySpec) -> dict:
    """One catalog row (schema v2) from a validated cutout."""
    p, name = c.primary, c.name
    labels = _labels(c)
    ref = c.bands.index(survey.band(survey.reference_band).name)
    present = c.present
    row = {
        "objid": c.objid,
        "survey": survey.name,
        "instrument": str(p.get("INSTRUME", survey.instrument)),
        "ra": c.ra,
        "dec": c.dec,
        "label": labels["label"],
        "label_source": labels["label_source"],
        "label_confidence": labels["label_confidence"],
        "usable_for_training": labels["usable_for_training"],
        "flux_ratio": _header_float(p, "FLUXRAT", name, low=0.0, high=1.0),
        "theta_e": _header_float(p, "THETA_E", name, low=0.0, high=100.0),
        "scene_theta_e": _header_float(p, "SCENE_TE", name, low=0.0, high=100.0),
        "arc_snr": _header_float(p, "ARCSNR", name, low=0.0, high=1e9),
        "z_phot": _header_float(p, "Z_PHOT", name, low=0.0, high=20.0),
        "z_spec": _header_float(p, "Z_SPEC", name, low=0.0, high=20.0),
        "z_err": _header_float(p, "Z_ERR", name, low=0.0, high=20.0),
        "sim_family": str(p.get("SIMFAM", "")),
        "sim_kind": str(p.get("SIMKIND", "")),
        "sim_role": _sim_role(p, name),
        "pair_id": str(p.get("PAIRID", "")).strip(),
        "bands": ",".join(c.bands),
        "n_bands_present": int(present.sum()),
        "band_flags": ";".join(f"{b}:{'|'.join(f)}" for b, f in c.band_flags.items()),
        "ignored_bands": ",".join(c.ignored_bands),
        "pixel_scale": c.pixel_scale_arcsec,
        "cutout_px": int(c.image.shape[-1]),  # the side as read: a non-square file's padded square's (padded_square)
        "file_height_px": int(c.file_shape[0]),
        "file_width_px": int(c.file_shape[1]),
        "seeing": float(c.psf_fwhm_arcsec[ref]),
        "psf_fwhm": median_of_few(c.psf_fwhm_arcsec[present].tolist()) if present.any() else float("nan"),
        "n_nan_pixels": int(np.count_nonzero(c.nan_mask)),
        "variance_map_available": not any("var_derived" in f or "missing" in f for f in c.band_flags.values()),
        "psf_image_available": all(c.psf[i] is not None for i in range(len(c.bands)) if present[i]),
        "psf_matched": False,
        "sersic_n": _header_float(p, "SERSICN", name, low=0.1, high=20.0),
        "r_half_arcsec": _header_float(p, "RHALF", name, low=0.0, high=1000.0),
        "axis_ratio": _header_float(p, "AXRATIO", name, low=0.0, high=1.0),
        "position_angle_deg": _header_float(p, "PA_DEG", name, low=-360.0, high=360.0),
        "schema_version": SCHEMA_VERSION,
        "source_file": name,
        "source_sha256": sha256,
    }
    flux = c.image.sum(axis=(1, 2), dtype=np.float64) * c.nmgy_per_unit
    var = c.variance.sum(axis=(1, 2), dtype=np.float64) * c.nmgy_per_unit**2
    for i, b in enumerate(c.bands):
        row[f"flux_{b}"] = float(flux[i]) if present[i] else float("nan")
        row[f"mag_{b}"] = 22.5 - 2.5 * math.log10(flux[i]) if present[i] and flux[i] > 0 else float("nan")
        row[f"psf_fwhm_{b}"] = float(c.psf_fwhm_arcsec[i])
    row["snr"] = float(flux[ref] / math.sqrt(var[ref])) if present[ref] and var[ref] > 0 else float("nan")
    row["notes"] = "; ".join(labels["notes"] + ([f"ignored bands {list(c.ignored_bands)}"] if c.ignored_bands
                                                else []))
    return row


def read_one(path: str | Path, name: str, survey: SurveySpec, *,
             cluster: bool = False) -> tuple[dict | None, dict | None, Cutout | None]:
    """Read and validate one file: ``(catalog row, None, cutout)`` or ``(None, quarantine row, None)``.

    A galaxy cutout by default (the catalog and ``candidate_scores``): a file with
    ``OBJTYPE = 'cluster_field'`` is quarantined as ``objtype_mismatch``. ``cluster``:
    the file is read as a cluster field (``arc_segments``, ``cluster_candidates``).
    """
    def refused(reason, message, sha=""):
        return None, {"objid": "", "source_file": name, "source_sha256": sha, "reason": reason, "message": message,
                      "survey": survey.name}, None

    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a file name of bytes that are not UTF-8: no table could hold it as it is
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return refused("bad_file_name", f"{name}: the file name is not UTF-8 text; rename the file")
    try:
        data, size = read_within(path, fits_validation.MAX_FILE_BYTES)
        if data is None:  # refused before a byte is read: no sha256 either
            return refused("too_large", f"{name}: {size:,} bytes, more than {fits_validation.MAX_FILE_BYTES:,} "
                                        f"(MAX_FILE_BYTES)")
    except OSError as err:
        return refused("unreadable", f"{name}: cannot be read ({err.strerror or err})")
    sha = hashlib.sha256(data).hexdigest()  # of the file as stored; the bytes are parsed next: no second read
    try:
        cutout = read_cutout(data, name=name, survey=survey, galaxy_only=not cluster)
        return catalog_row(cutout, sha256=sha, survey=survey), None, cutout
    except QuarantineError as err:
        return None, {"objid": err.objid, "source_file": name, "source_sha256": sha, "reason": err.reason,
                      "message": err.message, "survey": survey.name}, None


def _ingest_one(args) -> tuple[dict | None, dict | None]:
    path, name, survey_name = args
    row, q, _ = read_one(path, name, get_survey(survey_name))
    return row, q


class FirstObjid:
    """The duplicate rule: the first file (in sorted order) with an OBJID wins; a later one is quarantined
    as ``duplicate_objid`` naming the first."""

    def __init__(self, survey: str):
        self.survey, self.first_file = survey, {}

    def duplicate(self, row: dict) -> dict | None:
        """The quarantine row when ``row`` repeats an OBJID already seen; otherwise registers it."""
        first = self.first_file.setdefault(row["objid"], row["source_file"])
        if first == row["source_file"]:
            return None
        return {"objid": row["objid"], "source_file": row["source_file"], "source_sha256": row["source_sha256"],
                "reason": "duplicate_objid", "message": f"{row['source_file']}: OBJID {row['objid']!r} was already "
                                                        f"ingested from {first}", "survey": self.survey}


def relative_names(paths: Sequence[Path], root: Path) -> tuple[list[Path], list[str]]:
    """``paths`` sorted, and how the tables name them: relative to ``root`` when below it."""
    root = Path(root)
    paths = sorted(Path(p) for p in paths)
    return paths, [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths]


def ingest_files(paths: Sequence[Path], survey: SurveySpec, *, root: Path, workers: int = 1,
                 progress: bool = True) -> IngestResult:
    """Ingest ``paths`` (named relative to ``root`` in the tables) for ``survey``.

    Files are read in parallel; a later file repeating an OBJID is quarantined as
    ``duplicate_objid`` naming the first (files are taken in sorted order).
    """
    paths, names = relative_names(paths, root)
    import astropy.io.fits  # noqa: F401  (imported once here for the one-worker path)

    t0 = time.perf_counter()
    results = parallel_map(_ingest_one, [(str(p), n, survey.name) for p, n in zip(paths, names)],
                           workers=workers, progress=progress, desc=f"ingest {survey.name}", unit="file")
    rows, quarantined = [], []
    seen = FirstObjid(survey.name)
    for row, q in results:
        q = q if q is not None else seen.duplicate(row)
        if q is not None:
            quarantined.append(q)
        else:
            rows.append(row)
    seconds = time.perf_counter() - t0
    return IngestResult(catalog=catalog_frame(rows, survey), quarantine=quarantine_frame(quarantined),
                        n_files=len(paths), seconds=seconds)


def catalog_frame(rows: list[dict], survey: SurveySpec) -> pd.DataFrame:
    from .schemas import catalog_columns

    return pd.DataFrame(rows, columns=catalog_columns(survey))


def quarantine_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)

