"""The lens_assets code location: assets, checks, jobs and resources, wired together."""

import dagster as dg

from lens_assets.assets.catalog import cutout_catalog
from lens_assets.assets.simulation import simulated_cutouts
from lens_assets.resources.storage import LocalStorage, default_data_root

survey_pipeline = dg.define_asset_job(
    "survey_pipeline",
    selection=dg.AssetSelection.assets(simulated_cutouts, cutout_catalog),
    description="Simulate a survey's training cutouts and build its validated catalog.",
)

defs = dg.Definitions(
    assets=[simulated_cutouts, cutout_catalog],
    jobs=[survey_pipeline],
    resources={"storage": LocalStorage(root=default_data_root())},
)
