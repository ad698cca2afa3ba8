"""pandera schemas of the cutout catalog (metadata schema v2) and the quarantine table."""

from __future__ import annotations

from functools import lru_cache

import pandera.pandas as pa

from .fits_contract import QUARANTINE_REASONS, SIM_ROLES
from .surveys import SURVEY_NAMES, SurveySpec

__all__ = ["catalog_schema", "catalog_columns", "quarantine_schema", "candidate_schema", "cluster_candidate_schema",
           "COLOUR_GATES", "COLOUR_COLUMNS"]

# candidate_scores' optional colour columns (science/galaxy_colour.py) and why a row's colour figures are NaN
COLOUR_GATES = ("ok", "fewer_than_two_segments", "point_images", "fewer_than_two_bands")
COLOUR_COLUMNS = ("colour_consistency", "colour_dispersion", "n_colour_segments", "colour_gate")

_HEX64 = r"^[0-9a-f]{64}$"


def _missing_or(low: float, high: float) -> pa.Check:
    """-1 marks a missing value; anything else must lie in [low, high]."""
    return pa.Check(lambda s: (s == -1.0) | s.between(low, high), element_wise=False,
                    error=f"-1 (missing) or within [{low}, {high}]")


def _base_columns() -> dict[str, pa.Column]:
    f, i, s, b = float, int, str, bool
    return {
        "objid": pa.Column(s, unique=True, checks=pa.Check.str_length(min_value=1)),
        "survey": pa.Column(s, pa.Check.isin(SURVEY_NAMES)),
        "instrument": pa.Column(s),
        "ra": pa.Column(f, pa.Check.in_range(0.0, 360.0, include_max=False), description="deg, ICRS"),
        "dec": pa.Column(f, pa.Check.in_range(-90.0, 90.0), description="deg, ICRS"),
        "label": pa.Column(i, pa.Check.isin([-1, 0, 1]), description="1 lens, 0 non-lens, -1 unlabeled"),
        "label_source": pa.Column(s, pa.Check.str_matches(r"^(none|sim:|obs:|weak:|pretrain:)")),
        "label_confidence": pa.Column(f, pa.Check.in_range(0.0, 1.0)),
        "usable_for_training": pa.Column(b),
        "flux_ratio": pa.Column(f, _missing_or(0.0, 1.0), description="lensed-source flux / total flux"),
        "theta_e": pa.Column(f, _missing_or(0.0, 100.0), description="Einstein radius, arcsec"),
        "scene_theta_e": pa.Column(f, _missing_or(0.0, 100.0), required=False,
                                   description="Einstein radius of the scene the object was made from, lens or not "
                                               "(header SCENE_TE; -1 where none)"),
        "arc_snr": pa.Column(f, _missing_or(0.0, 1e9), description="matched-filter S/N of the lensed light "
                                                                   "(simulations; -1 unknown)"),
        "z_phot": pa.Column(f, _missing_or(0.0, 20.0)),
        "z_spec": pa.Column(f, _missing_or(0.0, 20.0)),
        "z_err": pa.Column(f, _missing_or(0.0, 20.0)),
        "sim_family": pa.Column(s),
        "sim_kind": pa.Column(s),
        "sim_role": pa.Column(s, pa.Check.isin(["", *SIM_ROLES]), required=False,
                              description="SIMROLE of a simulated file: train, heldout (a held-out family) or pairs "
                                          "(lens/twin pairs); empty for real data and older files"),
        "pair_id": pa.Column(s, description="PAIRID: shared by a lens and its twin rendered without deflection "
                                            "(simulated lensing_only pairs); empty otherwise"),
        "bands": pa.Column(s),
        "n_bands_present": pa.Column(i, pa.Check.ge(1)),
        "band_flags": pa.Column(s, description="band:flag|flag;... for flagged bands"),
        "ignored_bands": pa.Column(s),
        "pixel_scale": pa.Column(f, pa.Check.gt(0.0), description="arcsec/px"),
        "cutout_px": pa.Column(i, pa.Check.gt(0), description="side of the images as read, px (a non-square file: "
                                                              "the square it was padded to, flag padded_square)"),
        "file_height_px": pa.Column(i, pa.Check.gt(0), required=False, description="rows of the file's images"),
        "file_width_px": pa.Column(i, pa.Check.gt(0), required=False, description="columns of the file's images"),
        "seeing": pa.Column(f, pa.Check.gt(0.0), description="PSF FWHM in the reference band, arcsec"),
        "psf_fwhm": pa.Column(f, pa.Check.gt(0.0), description="median PSF FWHM over present bands, arcsec"),
        "n_nan_pixels": pa.Column(i, pa.Check.ge(0)),
        "variance_map_available": pa.Column(b),
        "psf_image_available": pa.Column(b),
        "psf_matched": pa.Column(b),
        "sersic_n": pa.Column(f, _missing_or(0.1, 20.0)),
        "r_half_arcsec": pa.Column(f, _missing_or(0.0, 1000.0)),
        "axis_ratio": pa.Column(f, _missing_or(0.0, 1.0)),
        "position_angle_deg": pa.Column(f, _missing_or(-360.0, 360.0)),
        "schema_version": pa.Column(s, pa.Check.eq("2.0")),
        "source_file": pa.Column(s, pa.Check.str_length(min_value=1)),
        "source_sha256": pa.Column(s, pa.Check.str_matches(_HEX64)),
    }


@lru_cache(maxsize=None)
def catalog_schema(survey: SurveySpec) -> pa.DataFrameSchema:
    """The catalog schema for ``survey``: the v2 columns plus flux/mag/PSF FWHM per band."""
    cols = _base_columns()
    for band in survey.band_names:
        cols[f"flux_{band}"] = pa.Column(float, nullable=True, description=f"{band} total flux, nanomaggies")
        cols[f"mag_{band}"] = pa.Column(float, nullable=True, description=f"{band} AB magnitude")
        cols[f"psf_fwhm_{band}"] = pa.Column(float, pa.Check.gt(0.0), description=f"{band} PSF FWHM, arcsec")
    cols["snr"] = pa.Column(float, nullable=True, description="reference-band flux / its noise")
    cols["notes"] = pa.Column(str)
    checks = [
        pa.Check(lambda df: ~(df["label_source"].str.startswith("pretrain:") & df["usable_for_training"]),
                 error="pretrain:* rows must not be usable for supervised training"),
        pa.Check(lambda df: ~df["label_source"].str.startswith("weak:") | (df["label_confidence"] < 0.5),
                 error="weak:* labels carry confidence < 0.5"),
    ]
    return pa.DataFrameSchema(cols, checks=checks, strict=True, ordered=True, coerce=False,
                              name=f"cutout_catalog_{survey.name}")


def catalog_columns(survey: SurveySpec) -> list[str]:
    return list(catalog_schema(survey).columns)


@lru_cache(maxsize=None)
def quarantine_schema() -> pa.DataFrameSchema:
    s = str
    return pa.DataFrameSchema({
        "objid": pa.Column(s),
        "source_file": pa.Column(s, pa.Check.str_length(min_value=1)),
        "source_sha256": pa.Column(s, pa.Check.str_matches(r"^([0-9a-f]{64})?$")),
        "reason": pa.Column(s, pa.Check.isin(list(QUARANTINE_REASONS))),
        "message": pa.Column(s, pa.Check.str_length(min_value=1)),
        "survey": pa.Column(s, pa.Check.isin(SURVEY_NAMES)),
    }, strict=True, ordered=True, name="cutout_quarantine")


@lru_cache(maxsize=None)
def candidate_schema() -> pa.DataFrameSchema:
    """The ranked candidate table of one drop (docs/assets.md: ``candidate_scores``)."""
    s, f, i = str, float, int
    hex_ = pa.Check.str_matches(r"^[0-9a-f]+$")
    return pa.DataFrameSchema({
        "objid": pa.Column(s, unique=True),
        "score": pa.Column(f, pa.Check.in_range(0.0, 1.0), description="calibrated lens probability"),
        "rank": pa.Column(i, pa.Check.ge(1), unique=True, description="1 = most lens-like (by fused logit)"),
        "logit": pa.Column(f, description="fused ensemble logit"),
        "logit_std_ensemble": pa.Column(f, pa.Check.ge(0.0), nullable=True,
                                        description="members' spread on the fused logit's scale (NaN with one)"),
        "logit_std_mc": pa.Column(f, pa.Check.ge(0.0), nullable=True,
                                  description="MC-dropout std of the fused logit (NaN: no member has head dropout)"),
        "uncertainty": pa.Column(f, pa.Check.ge(0.0), nullable=True,
                                 description="half the calibrated probability's change over +-1 combined spread"),
        "source_file": pa.Column(s, pa.Check.str_length(min_value=1)),
        "source_sha256": pa.Column(s, pa.Check.str_matches(r"^[0-9a-f]{64}$")),
        "survey": pa.Column(s, pa.Check.isin(SURVEY_NAMES)),
        "drop": pa.Column(s, pa.Check.str_length(min_value=1)),
        "model_version": pa.Column(s, hex_, description="ensemble version: hash of the checkpoints' sha256"),
        "calibrator_version": pa.Column(s, hex_, description="sha256 prefix of calibrator.json"),
        "training_manifest_sha256": pa.Column(s, hex_, description="shard manifest the ensemble was trained on"),
        "code_version": pa.Column(s),
        "psf_matched_bands": pa.Column(i, pa.Check.ge(0)),
        "band_flag_bits": pa.Column(i, pa.Check.ge(0), description="OR of the bands' shard flag bits"),
        "band_flags": pa.Column(s),
        "psf_fwhm": pa.Column(f, pa.Check.gt(0.0), description="median PSF FWHM before matching, arcsec"),
        "n_nan_pixels": pa.Column(i, pa.Check.ge(0)),
        "ra": pa.Column(f), "dec": pa.Column(f),
        # with candidate_scores' colour_consistency option (science/galaxy_colour.py)
        "colour_consistency": pa.Column(f, pa.Check.in_range(0.0, 1.0), nullable=True, required=False,
                                        description="consistent share of the residual segments' colours (after the "
                                                    "differential-extinction solve with 3+ segments and 3+ bands; "
                                                    "NaN unless colour_gate is ok)"),
        "colour_dispersion": pa.Column(f, pa.Check.ge(0.0), nullable=True, required=False,
                                       description="segments' colour MAD, averaged over colours, mag"),
        "n_colour_segments": pa.Column(i, pa.Check.ge(0), required=False,
                                       description="residual segments with usable colours"),
        "colour_gate": pa.Column(s, pa.Check.isin(list(COLOUR_GATES)), required=False,
                                 description="why the colour figures are NaN (point_images: lensed quasars)"),
    }, strict=False, name="candidate_scores")


@lru_cache(maxsize=None)
def cluster_candidate_schema() -> pa.DataFrameSchema:
    """The ranked cluster-lens candidates of one drop of cluster fields (docs/assets.md: ``cluster_candidates``),
    with the lineage columns of :func:`candidate_schema`."""
    s, f, i = str, float, int
    hex_ = pa.Check.str_matches(r"^[0-9a-f]+$")
    return pa.DataFrameSchema({
        "objid": pa.Column(s, unique=True, checks=pa.Check.str_length(min_value=1)),
        "rank": pa.Column(i, pa.Check.ge(1), unique=True, description="1 = most lens-like (by score, then logit)"),
        "score": pa.Column(f, pa.Check.in_range(0.0, 1.0), description="calibrated lens probability (track A)"),
        "logit": pa.Column(f, description="track-A margin"),
        "n_segments": pa.Column(i, pa.Check.ge(0), description="arc segments found in the field"),
        "colour_consistency": pa.Column(f, pa.Check.in_range(0.0, 1.0), nullable=True,
                                        description="consistent fraction of the segments' colours after the "
                                                    "differential-extinction solve (NaN with < 2 usable segments)"),
        "tangential_alignment": pa.Column(f, pa.Check.in_range(-1.0, 1.0), nullable=True,
                                          description="flux-weighted mean cos(2 x tangential misalignment)"),
        "bcg_x_px": pa.Column(f, description="BCG x on the field's grid, px (0-based)"),
        "bcg_y_px": pa.Column(f, description="BCG y on the field's grid, px (0-based)"),
        "ra": pa.Column(f), "dec": pa.Column(f),
        "source_file": pa.Column(s, pa.Check.str_length(min_value=1)),
        "source_sha256": pa.Column(s, pa.Check.str_matches(_HEX64)),
        "survey": pa.Column(s, pa.Check.isin(SURVEY_NAMES)),
        "drop": pa.Column(s, pa.Check.str_length(min_value=1)),
        "model_version": pa.Column(s, hex_, description="sha256 prefix of the track-A model file"),
        "calibrator_version": pa.Column(s, hex_, description="sha256 prefix of the model's calibrator file"),
        "training_manifest_sha256": pa.Column(s, hex_, description="sha256 of the cluster features table the model "
                                                                   "was trained on"),
        "code_version": pa.Column(s),
    }, strict=False, name="cluster_candidates")
