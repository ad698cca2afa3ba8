"""The lens_assets code location: assets, checks, jobs and resources, wired together."""

import dagster as dg

from lens_assets.assets.catalog import cutout_catalog
from lens_assets.assets.evaluation import bologna_report, score_calibrator
from lens_assets.assets.shards import dataset_splits, psf_matched_shards
from lens_assets.assets.simulation import simulated_cutouts
from lens_assets.assets.training import lens_classifier
from lens_assets.resources.launchers import EcsLauncher, LocalSubprocessLauncher
from lens_assets.resources.storage import LocalStorage, default_data_root

ASSETS = [simulated_cutouts, cutout_catalog, psf_matched_shards, dataset_splits, lens_classifier, score_calibrator,
          bologna_report]

survey_pipeline = dg.define_asset_job(
    "survey_pipeline",
    selection=dg.AssetSelection.assets(*ASSETS),
    description="The whole graph for one survey: simulate, catalog, PSF-matched shards, splits, train the "
                "ensemble (Pipes jobs), calibrate and write the Bologna report. Run configs: lens_assets.profiles.",
)

def training_launcher():
    """``LENS_LAUNCHER=ecs`` (with ``LENS_ECS_CLUSTER``, ``LENS_ECS_TASK_DEFINITION``) in deployment; local otherwise."""
    import os

    kind = os.environ.get("LENS_LAUNCHER", "local")
    if kind == "local":
        return LocalSubprocessLauncher()
    if kind == "ecs":
        return EcsLauncher(cluster=dg.EnvVar("LENS_ECS_CLUSTER"), task_definition=dg.EnvVar("LENS_ECS_TASK_DEFINITION"))
    raise ValueError(f"LENS_LAUNCHER={kind!r} is not one of ['local', 'ecs']")


defs = dg.Definitions(
    assets=ASSETS,
    jobs=[survey_pipeline],
    resources={"storage": LocalStorage(root=default_data_root()), "launcher": training_launcher()},
)
