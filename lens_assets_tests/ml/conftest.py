"""Shared data of the ml tests."""

import pytest

from lens_assets.science.splits import make_splits
from lens_assets_tests.helpers import make_sdss_shards


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """32 simulated SDSS cutouts in shards with their splits, built once per test process: read only (a test
    writes its runs under its own tmp_path)."""
    root = tmp_path_factory.mktemp("sdss_training_data")
    catalog = make_sdss_shards(root, n=32, seed=4)
    make_splits(catalog, reference_band="r", seed=0, min_groups_per_stratum=3).table.to_parquet(
        root / "splits.parquet")
    return root
