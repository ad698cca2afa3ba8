"""Fresh simulated objects in training batches: the same pipeline as the fixed shards, deterministic, trained on."""

import numpy as np
import pytest

from lens_assets.ml.data import ShardDataset
from lens_assets.ml.fresh import FRESH_SEED_OFFSET, FreshMix
from lens_assets.ml.train import TrainSettings, train
from lens_assets.science.shards import read_manifest
from lens_assets.science.splits import make_splits
from lens_assets_tests.helpers import make_sdss_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    catalog = make_sdss_shards(root, n=32, seed=4)
    make_splits(catalog, reference_band="r", seed=0, min_groups_per_stratum=3).table.to_parquet(
        root / "splits.parquet")
    return root


def _mix(root, fraction=0.5, seed=0):
    return FreshMix(ShardDataset(root / "shards"), family="baseline", fraction=fraction, seed=seed,
                    shard_settings=read_manifest(root / "shards")["settings"])


def test_fresh_rows_are_what_the_fixed_pipeline_makes_of_the_same_objects(data, tmp_path):
    """A fresh object, simulated and matched in memory, equals the same object written to disk, cataloged and
    sharded the way the fixed training set was: the network cannot tell them apart by their processing."""
    from lens_assets.science.families import load_family
    from lens_assets.science.ingest import find_fits, ingest_files
    from lens_assets.science.shards import ShardSettings, process_batch
    from lens_assets.science.simulation import simulate_to_directory
    from lens_assets.science.surveys import get_survey

    mix = _mix(data)
    fresh = mix.simulate([0, 1, 2])
    survey = get_survey("sdss")
    simulate_to_directory(survey, load_family("baseline"), n_cutouts=3, seed=FRESH_SEED_OFFSET, out_dir=tmp_path / "raw",
                          workers=1, progress=False)
    catalog = ingest_files(find_fits(tmp_path / "raw"), survey, root=tmp_path, workers=1, progress=False).catalog
    catalog = catalog.set_index("objid").loc[list(fresh["objid"])].reset_index()
    fixed = process_batch((catalog.to_dict("records"), str(tmp_path), ShardSettings(**mix.settings.__dict__)))
    for key in ("image", "variance", "fwhm_before", "band_flags", "label"):
        np.testing.assert_array_equal(fresh[key], fixed[key])
    assert mix.n_fresh == 3


def test_which_rows_are_fresh_and_what_replaces_them_follow_the_seed_and_the_epoch(data):
    a, b = _mix(data), _mix(data)
    rows = list(range(32))
    share = a.is_fresh(rows)
    assert 0.25 < share.mean() < 0.75  # half, to sampling error over 32 rows
    np.testing.assert_array_equal(share, b.is_fresh(rows))
    a.set_epoch(1)
    assert (a.is_fresh(rows) != share).any()  # another epoch replaces other rows ...
    assert set(a.fresh_objects(rows)).isdisjoint(b.fresh_objects(rows))  # ... with other objects
    assert not _mix(data, seed=1).is_fresh(rows).tolist() == share.tolist()
    assert not _mix(data, fraction=0.0).is_fresh(rows).any() and _mix(data, fraction=1.0).is_fresh(rows).all()
    got, base = a.__getitems__(rows[:8]), ShardDataset(data / "shards").__getitems__(rows[:8])
    fresh = a.is_fresh(rows[:8])
    np.testing.assert_array_equal(got["image"][~fresh], base["image"][~fresh])  # fixed rows untouched
    assert not np.allclose(got["image"][fresh], base["image"][fresh])
    with pytest.raises(ValueError, match="fraction"):
        _mix(data, fraction=1.5)
    with pytest.raises(ValueError, match="unknown simulation family"):
        FreshMix(ShardDataset(data / "shards"), family="no_such_family", fraction=0.5, seed=0,
                 shard_settings=read_manifest(data / "shards")["settings"])


def test_training_with_fresh_objects_draws_them_every_epoch(data, tmp_path, monkeypatch):
    epochs = []
    set_epoch = FreshMix.set_epoch
    monkeypatch.setattr(FreshMix, "set_epoch", lambda self, e: (epochs.append(e), set_epoch(self, e)))
    s = train(data / "shards", data / "splits.parquet", tmp_path / "fresh",
              TrainSettings(backbone="resnet10t", epochs=2, batch_size=16, progress=False, patience=5,
                            fresh_fraction=0.5, fresh_family="baseline"))
    assert s["fresh_fraction"] == 0.5 and s["fresh_family"] == "baseline"
    n_train = s["n_train"]
    assert 0.25 * 2 * n_train < s["n_fresh"] < 0.75 * 2 * n_train  # about half the rows of each of two epochs
    assert s["best_checkpoint"] and epochs == [0, 1]  # the loader's dataset learns each epoch as it starts
