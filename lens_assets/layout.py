"""The storage layout: where every asset's files live under the storage root (``LENS_DATA_ROOT``).

This module only names things. Each function returns the *parts* of a path
relative to the root, a tuple of strings, which is what the storage resource
takes (``resources/storage.py``, ``resources/s3_storage.py``: local or S3,
pull/push, atomic publish)::

    from lens_assets import layout
    storage.pull(*layout.catalog_table("des"))          # make the local copy current (S3: download)
    path = storage.path(*layout.catalog_table("des"))   # the local file: <root>/catalog/des/cutout_catalog.parquet
    storage.url(*layout.inbox_drop("des", "night-1"))   # for people and lineage: a path, or s3://...

Assets, sensors, the model registry, the producer API (``inbox.py``), the demo
and the benchmarks ask here instead of spelling paths, so the layout is changed
in one place; ``docs/data_layout.md`` lists every path with its writer and
readers (``lens_assets_tests/test_layout.py`` keeps the two in step).

The names inside a shard folder (``manifest.json``, ``rows.parquet``, the
``shard-NNNNN.h5`` files) belong to the shard format in
:mod:`lens_assets.science.shards`, which the training and scoring code read
without Dagster; this module uses its constants.
"""

from __future__ import annotations

import inspect

from lens_assets.science.shards import MANIFEST_FILE, ROWS_FILE

__all__ = ["Parts", "COMPLETE_MARKER", "CLUSTER_MARKER", "PROMOTION_FILE", "relative", "simulation_drop", "templates",
           "PLACES"]

Parts = tuple[str, ...]

COMPLETE_MARKER = "_COMPLETE"  # an empty file a producer writes last in a drop folder
CLUSTER_MARKER = "_CLUSTER_FIELDS"  # an empty file a producer writes (before _COMPLETE) in a drop of cluster fields
PROMOTION_FILE = "promotion.json"


def relative(parts: Parts) -> str:
    """``parts`` as a path relative to the root with ``/`` separators (how tables and manifests store paths)."""
    return "/".join(parts)


def simulation_drop(family: str, seed: int) -> str:
    """The drop folder under ``raw/<survey>/`` of a simulation: ``sim-<seed>`` for the ``baseline`` family,
    ``sim-<family>-<seed>`` otherwise."""
    return f"sim-{seed}" if family == "baseline" else f"sim-{family}-{seed}"


# --------------------------------------------------------------------------- the inbox (producers, the sensor)

def inbox_root() -> Parts:
    return ("inbox",)


def inbox_survey(survey: str) -> Parts:
    return ("inbox", survey)


def inbox_drop(survey: str, drop: str) -> Parts:
    return ("inbox", survey, drop)


def complete_marker(survey: str, drop: str) -> Parts:
    return (*inbox_drop(survey, drop), COMPLETE_MARKER)


def cluster_marker(survey: str, drop: str) -> Parts:
    """Marks a drop of cluster fields (scored by ``cluster_candidates``, not ``candidate_scores``)."""
    return (*inbox_drop(survey, drop), CLUSTER_MARKER)


# --------------------------------------------------------------------------- raw cutouts and the catalog

def raw_survey(survey: str) -> Parts:
    """Every FITS file below it is ingested by ``cutout_catalog``."""
    return ("raw", survey)


def raw_drop(survey: str, drop: str) -> Parts:
    """A folder of cutouts under ``raw/<survey>/`` (a simulation writes :func:`simulation_drop`)."""
    return ("raw", survey, drop)


def catalog_dir(survey: str) -> Parts:
    return ("catalog", survey)


def catalog_table(survey: str) -> Parts:
    return (*catalog_dir(survey), "cutout_catalog.parquet")


def quarantine_table(survey: str) -> Parts:
    return (*catalog_dir(survey), "quarantine.parquet")


# --------------------------------------------------------------------------- datasets

def shards_dir(survey: str) -> Parts:
    return ("shards", survey)


def shards_manifest(survey: str) -> Parts:
    return (*shards_dir(survey), MANIFEST_FILE)


def shards_rows(survey: str) -> Parts:
    return (*shards_dir(survey), ROWS_FILE)


def splits_dir(survey: str) -> Parts:
    return ("splits", survey)


def splits_table(survey: str) -> Parts:
    return (*splits_dir(survey), "dataset_splits.parquet")


# --------------------------------------------------------------------------- models, scores, calibrators

def models_dir(survey: str) -> Parts:
    return ("models", survey)


def member_dir(survey: str, member: str) -> Parts:
    """One ensemble member's training folder (checkpoints, run.json, summary.json, logs)."""
    return (*models_dir(survey), member)


def ensemble_manifest(survey: str) -> Parts:
    return (*models_dir(survey), "ensemble.json")


def scores_dir(survey: str) -> Parts:
    return ("scores", survey)


def ensemble_scores(survey: str) -> Parts:
    return (*scores_dir(survey), "ensemble_logits.parquet")


def calibrators_dir(survey: str) -> Parts:
    return ("calibrators", survey)


def calibrator_doc(survey: str) -> Parts:
    return (*calibrators_dir(survey), "calibrator.json")


# --------------------------------------------------------------------------- reports

def simulated_gallery(survey: str, drop: str) -> Parts:
    return ("reports", survey, f"simulated_{drop}_gallery.png")


def calibration_reliability(survey: str) -> Parts:
    return ("reports", survey, "calibration_reliability_val.png")


def shortcut_dir(survey: str) -> Parts:
    return ("reports", survey, "shortcut")


def shortcut_doc(survey: str) -> Parts:
    return (*shortcut_dir(survey), "shortcut.json")


def shortcut_features(survey: str) -> Parts:
    return (*shortcut_dir(survey), "features.parquet")


def shortcut_importance(survey: str) -> Parts:
    return (*shortcut_dir(survey), "importance.png")


def report_dir(survey: str) -> Parts:
    return ("reports", survey, "bologna")


def report_json(survey: str) -> Parts:
    return (*report_dir(survey), "report.json")


def report_md(survey: str) -> Parts:
    return (*report_dir(survey), "report.md")


def report_roc(survey: str) -> Parts:
    return (*report_dir(survey), "roc.png")


def report_score_histograms(survey: str) -> Parts:
    return (*report_dir(survey), "score_histograms.png")


def report_reliability(survey: str) -> Parts:
    return (*report_dir(survey), "reliability.png")


# --------------------------------------------------------------------------- the promoted model

def promoted_dir(survey: str) -> Parts:
    """Replaced as one folder by ``promoted_model``."""
    return ("promoted", survey)


def promoted_ensemble(survey: str) -> Parts:
    return (*promoted_dir(survey), "ensemble.json")


def promoted_calibrator(survey: str) -> Parts:
    return (*promoted_dir(survey), "calibrator.json")


def promoted_checkpoint(survey: str, member: str) -> Parts:
    return (*promoted_dir(survey), f"{member}.ckpt")


def promotion_doc(survey: str) -> Parts:
    return (*promoted_dir(survey), PROMOTION_FILE)


# --------------------------------------------------------------------------- candidates of a drop

def candidates_dir(survey: str, drop: str) -> Parts:
    return ("candidates", survey, drop)


def candidate_table(survey: str, drop: str) -> Parts:
    return (*candidates_dir(survey, drop), "candidate_scores.parquet")


def candidate_quarantine(survey: str, drop: str) -> Parts:
    return (*candidates_dir(survey, drop), "quarantine.parquet")


def candidate_histogram(survey: str, drop: str) -> Parts:
    return (*candidates_dir(survey, drop), "score_histogram.png")


def candidate_gallery(survey: str, drop: str) -> Parts:
    return (*candidates_dir(survey, drop), "top_candidates.png")


def cluster_candidate_table(survey: str, drop: str) -> Parts:
    """The ranked cluster-lens candidates of a drop of cluster fields (its quarantine and gallery are
    :func:`candidate_quarantine` and :func:`candidate_gallery`)."""
    return (*candidates_dir(survey, drop), "cluster_candidates.parquet")


# --------------------------------------------------------------------------- the cluster track

def cluster_raw_survey(survey: str) -> Parts:
    """Cluster fields (FITS in the inbox contract with ``OBJTYPE = 'cluster_field'``): kept apart from
    ``raw/<survey>/``, which ``cutout_catalog`` ingests as galaxy cutouts."""
    return ("clusters", "raw", survey)


def cluster_raw_drop(survey: str, drop: str) -> Parts:
    """A folder of cluster fields; a simulation's is :func:`simulation_drop`."""
    return (*cluster_raw_survey(survey), drop)


def cluster_segments_dir(survey: str) -> Parts:
    return ("clusters", "segments", survey)


def cluster_fields_table(survey: str) -> Parts:
    return (*cluster_segments_dir(survey), "fields.parquet")


def cluster_segments_table(survey: str) -> Parts:
    return (*cluster_segments_dir(survey), "segments.parquet")


def cluster_quarantine_table(survey: str) -> Parts:
    return (*cluster_segments_dir(survey), "quarantine.parquet")


def cluster_segments_gallery(survey: str) -> Parts:
    return (*cluster_segments_dir(survey), "segments_gallery.png")


def cluster_features_settings(survey: str) -> Parts:
    """The ``arc_segments`` settings of the segments ``cluster_features`` turned into its table (a copy made then)."""
    return (*cluster_features_dir(survey), "segment_settings.json")


def cluster_segments_settings(survey: str) -> Parts:
    """The settings ``arc_segments`` read the fields with (field_size_px, light, nsigma, code_version)."""
    return (*cluster_segments_dir(survey), "settings.json")


def cluster_features_dir(survey: str) -> Parts:
    return ("clusters", "features", survey)


def cluster_features_table(survey: str) -> Parts:
    return (*cluster_features_dir(survey), "cluster_features.parquet")


def cluster_models_dir(survey: str) -> Parts:
    return ("clusters", "models", survey)


def cluster_model_file(survey: str, member: str) -> Parts:
    """A Track A model (XGBoost JSON; its sidecar ``<member>.meta.json`` beside it)."""
    return (*cluster_models_dir(survey), f"{member}.json")


def cluster_calibrator_file(survey: str, member: str) -> Parts:
    return (*cluster_models_dir(survey), f"{member}.calibrator.json")


def cluster_training_doc(survey: str) -> Parts:
    """What ``cluster_classifier`` trained on: the ``arc_segments`` settings and the features table's sha256."""
    return (*cluster_models_dir(survey), "training.json")


def cluster_vetted_dir(survey: str, version: str) -> Parts:
    """Copies of a model that passed ``cluster_report``'s gates (booster, sidecar, calibrator), by manifest version:
    a retrain rewrites ``cluster_model_file``, never these."""
    return (*cluster_models_dir(survey), "vetted", version)


def cluster_vetted_model_file(survey: str, version: str, member: str) -> Parts:
    return (*cluster_vetted_dir(survey, version), f"{member}.json")


def cluster_vetted_calibrator_file(survey: str, version: str, member: str) -> Parts:
    return (*cluster_vetted_dir(survey, version), f"{member}.calibrator.json")


def cluster_partial_dependence(survey: str) -> Parts:
    return (*cluster_models_dir(survey), "partial_dependence.png")


def cluster_scores_table(survey: str) -> Parts:
    return (*cluster_models_dir(survey), "scores.parquet")


def cluster_anomaly_file(survey: str) -> Parts:
    """The Deep SVDD anomaly model of the cluster features (its calibrator:
    ``cluster_calibrator_file(s, 'anomaly')``)."""
    return (*cluster_models_dir(survey), "anomaly.json")


def cluster_components_table(survey: str) -> Parts:
    """Per val, test and held-out field: the scores a fusion combines (track_a, anomaly, colour_consistency)."""
    return (*cluster_models_dir(survey), "components.parquet")


def cluster_fusion_dir(survey: str) -> Parts:
    return (*cluster_models_dir(survey), "fusion")


def cluster_fusion_file(survey: str) -> Parts:
    """The fusion's weights, standardization, imputation and calibrator (``science.clusters.fusion.Fusion``)."""
    return (*cluster_fusion_dir(survey), "fusion.json")


def cluster_report_scores(survey: str) -> Parts:
    """Every model's scores the cluster report reads: Track A's table, Track B's and the fused rows."""
    return (*cluster_fusion_dir(survey), "scores.parquet")


def cluster_manifest(survey: str) -> Parts:
    """The vetted cluster model that scores drops of cluster fields (``lens_assets.cluster_registry``)."""
    return (*cluster_models_dir(survey), "manifest.json")


def cluster_track_b_dir(survey: str) -> Parts:
    """Track B of the cluster track (the MIL model over arc-segment stamps): bag cache, checkpoint, scores."""
    return (*cluster_models_dir(survey), "track_b")


def cluster_track_b_bags(survey: str) -> Parts:
    """Every field's bag of segment stamps, cut once (``lens_assets.ml.mil.write_bag_cache``)."""
    return (*cluster_track_b_dir(survey), "bags.npz")


def cluster_track_b_checkpoint(survey: str) -> Parts:
    return (*cluster_track_b_dir(survey), "best.ckpt")


def cluster_field_view_checkpoint(survey: str) -> Parts:
    """The field-view model beside Track B (``lens_assets.ml.train_mil.field_view_checkpoint`` of Track B's)."""
    from lens_assets.ml.train_mil import FIELD_VIEW_CHECKPOINT

    return (*cluster_track_b_dir(survey), FIELD_VIEW_CHECKPOINT)


def cluster_track_b_scores(survey: str) -> Parts:
    """Track B's scores of the test split and the held-out families, in Track A's long format."""
    return (*cluster_track_b_dir(survey), "scores.parquet")


def cluster_track_b_val_scores(survey: str) -> Parts:
    """Track B's scores of the val split (``set`` ``val_stop``/``val_calibrate``), for fusing the tracks."""
    return (*cluster_track_b_dir(survey), "val_scores.parquet")


def cluster_track_b_attention(survey: str) -> Parts:
    return (*cluster_track_b_dir(survey), "attention.parquet")


def cluster_track_b_calibrator(survey: str) -> Parts:
    return (*cluster_track_b_dir(survey), "calibrator.json")


def cluster_track_b_gallery(survey: str) -> Parts:
    return (*cluster_track_b_dir(survey), "attention_gallery.png")


def cluster_report_dir(survey: str) -> Parts:
    return ("reports", survey, "cluster")


def cluster_report_json(survey: str) -> Parts:
    return (*cluster_report_dir(survey), "report.json")


def cluster_report_md(survey: str) -> Parts:
    return (*cluster_report_dir(survey), "report.md")


def cluster_simulated_gallery(survey: str, drop: str) -> Parts:
    return (*cluster_report_dir(survey), f"simulated_{drop}_gallery.png")


# every function above that names a place, by name
PLACES = {name: fn for name, fn in list(globals().items())
          if inspect.isfunction(fn) and fn.__module__ == __name__ and fn.__annotations__.get("return") == "Parts"}


def templates() -> dict[str, str]:
    """Each place as a template with its arguments as placeholders: ``catalog_table`` ->
    ``catalog/<survey>/cutout_catalog.parquet``."""
    return {name: relative(fn(*(f"<{p}>" for p in inspect.signature(fn).parameters)))
            for name, fn in PLACES.items()}
