"""The lens_assets code location: assets, checks, jobs and resources, wired together."""

import dagster as dg

from lens_assets.assets.catalog import cutout_catalog
from lens_assets.assets.shards import dataset_splits, psf_matched_shards
from lens_assets.assets.simulation import simulated_cutouts
from lens_assets.assets.training import lens_classifier
from lens_assets.resources.launchers import EcsLauncher, LocalSubprocessLauncher
from lens_assets.resources.storage import LocalStorage, default_data_root

survey_pipeline = dg.define_asset_job(
    "survey_pipeline",
    selection=dg.AssetSelection.assets(simulated_cutouts, cutout_catalog, psf_matched_shards, dataset_splits),
    description="Simulate a survey's training cutouts, build its validated catalog, PSF-matched shards and splits.",
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
    assets=[simulated_cutouts, cutout_catalog, psf_matched_shards, dataset_splits, lens_classifier],
    jobs=[survey_pipeline],
    resources={"storage": LocalStorage(root=default_data_root()), "launcher": training_launcher()},
)
