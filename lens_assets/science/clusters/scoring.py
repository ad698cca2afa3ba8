"""Scoring a drop of cluster fields: the files' kind, the features of each field, and the ranked candidates.

Plain functions on files and tables (no storage, no dagster): ``cluster_candidates``
checks each file's ``OBJTYPE`` (:func:`objtype_quarantine`), segments the cluster
fields with :func:`.catalog.process_fields`, computes one feature row per field as
``cluster_features`` does for training (:func:`field_features`) and ranks the
fields by the calibrated track-A score (:func:`rank_fields`).
"""

from __future__ import annotations

import gzip
import io
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..fileio import sha256_file
from ..fits_validation import FITS_BLOCK
from .features import cluster_feature_names, cluster_features
from .fields import OBJTYPE_CLUSTER

__all__ = ["objtype_quarantine", "field_features", "rank_fields", "KEY_FEATURES", "CANDIDATE_FIELD_COLUMNS"]

# feature columns every cluster candidate row carries (the rest are in the features the model read)
KEY_FEATURES = ("n_segments", "colour_consistency", "tangential_alignment")
# columns taken from the field rows of :func:`.catalog.process_fields`
CANDIDATE_FIELD_COLUMNS = ("bcg_x_px", "bcg_y_px", "ra", "dec", "source_file", "source_sha256")


PRIMARY_HEADER_MAX_BYTES = 36 * FITS_BLOCK  # read for OBJTYPE: a contract file's primary header is a block or two


def objtype_quarantine(path: str | Path, name: str, *, survey: str) -> dict | None:
    """The ``objtype_mismatch`` quarantine row of a file whose primary header is readable and whose ``OBJTYPE`` is
    not ``cluster_field`` (absent in a galaxy cutout); None for a cluster field, and None for a file whose header
    cannot be read, which the FITS contract's reader then quarantines with its own reason.

    Only the file's first :data:`PRIMARY_HEADER_MAX_BYTES` are read (decompressed, for a ``.gz`` file): the
    contract's reader reads every file of the drop next, and a file quarantined here is hashed whole."""
    from astropy.io import fits

    try:
        with (gzip.open if name.lower().endswith(".gz") else open)(path, "rb") as f:
            head = f.read(PRIMARY_HEADER_MAX_BYTES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = fits.Header.fromfile(io.BytesIO(head), padding=False)
        value, objid = header.get("OBJTYPE"), header.get("OBJID", "")
    except Exception:  # noqa: BLE001 - the contract reader gives such a file its reason (unreadable, truncated, ...)
        return None
    if isinstance(value, str) and value.strip().lower() == OBJTYPE_CLUSTER:
        return None
    shown = "absent (a galaxy cutout has none)" if value is None else f"{value!r}"
    return {"objid": str(objid).strip() if isinstance(objid, str) else "", "source_file": name,
            "source_sha256": sha256_file(path), "reason": "objtype_mismatch",
            "message": f"{name}: OBJTYPE is {shown}; every file of a drop of cluster fields must have "
                       f"OBJTYPE = '{OBJTYPE_CLUSTER}'",
            "survey": survey}


def field_features(fields: pd.DataFrame, segments: pd.DataFrame, *, bands: Sequence[str],
                   wavelengths_nm: Sequence[float]) -> pd.DataFrame:
    """One row of :func:`.features.cluster_features` per row of ``fields`` (same order), with its ``objid``:
    what the ``cluster_features`` asset computes for the training fields."""
    by_field = dict(tuple(segments.groupby("objid"))) if len(segments) else {}
    empty = segments.iloc[0:0]
    rows = []
    for f in fields.itertuples(index=False):
        segs = by_field.get(f.objid, empty).drop(columns="objid")
        feats = cluster_features(segs, bands=bands, wavelengths_nm=wavelengths_nm, bcg_xy=(f.bcg_x_px, f.bcg_y_px),
                                 pixel_scale_arcsec=f.pixel_scale_arcsec,
                                 context={"seeing_arcsec": f.seeing_arcsec, "psf_fwhm_arcsec": f.psf_fwhm_arcsec,
                                          "depth_mag": f.depth_mag})
        rows.append({"objid": f.objid, **feats})
    return pd.DataFrame(rows, columns=["objid", *cluster_feature_names(bands)])


def rank_fields(fields: pd.DataFrame, features: pd.DataFrame, *, model, calibrator) -> pd.DataFrame:
    """The fields ranked by calibrated lens probability: ``objid``, ``rank`` (1 = most lens-like), ``score``,
    ``logit`` (the track-A margin), the :data:`KEY_FEATURES` and :data:`CANDIDATE_FIELD_COLUMNS`.

    Ties in ``score`` (an isotonic calibrator is a step function) are ranked by ``logit``, then ``objid``.
    """
    if list(fields["objid"]) != list(features["objid"]):
        raise ValueError("features must hold one row per field, in the fields' order")
    logit = np.asarray(model.logit(features), dtype=float) if len(features) else np.empty(0)
    score = np.asarray(calibrator.predict(logit), dtype=float) if len(logit) else np.empty(0)
    table = pd.DataFrame({"objid": fields["objid"].astype(str).to_numpy(), "score": score, "logit": logit})
    for col in KEY_FEATURES:  # typed also when there is no field at all
        table[col] = features[col].to_numpy(dtype=int if col == "n_segments" else float)
    for col in CANDIDATE_FIELD_COLUMNS:
        table[col] = fields[col].to_numpy(dtype=str if col in ("source_file", "source_sha256") else float)
    table = table.sort_values(["score", "logit", "objid"], ascending=[False, False, True],
                              kind="stable").reset_index(drop=True)
    table.insert(1, "rank", np.arange(1, len(table) + 1, dtype=int))
    return table
