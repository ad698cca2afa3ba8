"""The lens_assets code location: assets, checks, jobs and resources, wired together."""

import dagster as dg

from lens_assets.assets.catalog import cutout_catalog
from lens_assets.assets.cluster_scoring import CLUSTER_SCORING_ASSETS
from lens_assets.assets.clusters import CLUSTER_ASSETS
from lens_assets.assets.evaluation import bologna_report, score_calibrator, shortcut_audit
from lens_assets.assets.promotion import promoted_model
from lens_assets.assets.scoring import candidate_scores
from lens_assets.assets.shards import dataset_splits, psf_matched_shards
from lens_assets.assets.simulation import simulated_cutouts
from lens_assets.assets.training import lens_classifier
from lens_assets.resources.launchers import EcsLauncher, LocalSubprocessLauncher
from lens_assets.resources.storage import LocalStorage, default_data_root
from lens_assets.sensors.inbox import rescore_nightly, rescore_on_model_change, score_drops_job, survey_inbox_sensor

ASSETS = [simulated_cutouts, cutout_catalog, psf_matched_shards, dataset_splits, shortcut_audit, lens_classifier,
          score_calibrator, bologna_report, promoted_model]
# every asset of the code location: the galaxy graph, drop scoring and the cluster track with its scoring
ALL_ASSETS = [*ASSETS, candidate_scores, *CLUSTER_ASSETS, *CLUSTER_SCORING_ASSETS]

MAX_PIPELINE_RUNTIME_S = 12 * 3600  # the full profile takes under 2 h on 2 CPU cores
MAX_TRAINING_RUNTIME_S = 8 * 3600  # one ensemble's Pipes jobs; a hung or runaway training run is cancelled

survey_pipeline = dg.define_asset_job(
    "survey_pipeline",
    selection=dg.AssetSelection.assets(*ASSETS),
    # run monitoring (dagster.yaml) cancels a run past this; override per run in the launchpad's tags
    tags={"dagster/max_runtime": str(MAX_PIPELINE_RUNTIME_S)},
    description="The whole graph for one survey: simulate, catalog, PSF-matched shards, splits, train the "
                "ensemble (Pipes jobs), calibrate, write the Bologna report and, when every gate passes, promote "
                "the ensemble for scoring new drops. Run configs: lens_assets.profiles.",
)

cluster_pipeline = dg.define_asset_job(
    "cluster_pipeline",
    selection=dg.AssetSelection.assets(*CLUSTER_ASSETS),
    tags={"dagster/max_runtime": str(MAX_PIPELINE_RUNTIME_S)},
    description="The cluster-scale track for one survey: simulate cluster fields, segment their arcs, compute the "
                "physics features, train the XGBoost track (full labels, without colours, PU from few labels) and "
                "write the cluster report.",
)

train_ensemble = dg.define_asset_job(
    "train_ensemble",
    selection=dg.AssetSelection.assets(lens_classifier),
    tags={"dagster/max_runtime": str(MAX_TRAINING_RUNTIME_S)},
    description="Retrain a survey's ensemble alone (one Pipes job per member) on the current shards and splits; "
                "calibrate, report and promote with survey_pipeline afterwards.",
)


def training_launcher():
    """``LENS_LAUNCHER=ecs`` (with ``LENS_ECS_CLUSTER``, ``LENS_ECS_TASK_DEFINITION``) in deployment; local
    otherwise."""
    import os

    kind = os.environ.get("LENS_LAUNCHER", "local")
    if kind == "local":
        return LocalSubprocessLauncher()
    if kind == "ecs":
        return EcsLauncher(cluster=dg.EnvVar("LENS_ECS_CLUSTER"), task_definition=dg.EnvVar("LENS_ECS_TASK_DEFINITION"))
    raise ValueError(f"LENS_LAUNCHER={kind!r} is not one of ['local', 'ecs']")


def storage_from_env() -> LocalStorage:
    """``LENS_DATA_ROOT``: a local folder (default ``data/``), or ``s3://bucket/prefix`` with a local cache in
    ``LENS_CACHE_DIR`` (default ``.lens_cache/``) and ``LENS_S3_ENDPOINT_URL`` for S3-compatible servers."""
    import os

    root = default_data_root()
    if root.startswith("s3://"):
        from lens_assets.resources.s3_storage import S3Storage, parse_s3_url

        bucket, prefix = parse_s3_url(root)
        cache = os.path.join(os.environ.get("LENS_CACHE_DIR") or ".lens_cache", bucket, prefix)
        return S3Storage(root=cache, url_root=root, endpoint_url=os.environ.get("LENS_S3_ENDPOINT_URL") or None)
    return LocalStorage(root=root)


defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[survey_pipeline, cluster_pipeline, train_ensemble, score_drops_job],
    sensors=[survey_inbox_sensor, rescore_on_model_change],
    schedules=[rescore_nightly],
    resources={"storage": storage_from_env(), "launcher": training_launcher()},
)
