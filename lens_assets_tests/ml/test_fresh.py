"""Fresh simulated objects in training batches: the same pipeline as the fixed shards, deterministic, trained on."""

import numpy as np
import pytest

from lens_assets.ml.data import ShardDataset
from lens_assets.ml.fresh import FRESH_SEED_OFFSET, FreshMix
from lens_assets.ml.train import TrainSettings, train
from lens_assets.science.shards import read_manifest


def _mix(root, fraction=0.5, seed=0, renderer="lenstronomy"):
    return FreshMix(ShardDataset(root / "shards"), family="baseline", fraction=fraction, seed=seed,
                    shard_settings=read_manifest(root / "shards")["settings"], renderer=renderer)


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
    simulate_to_directory(survey, load_family("baseline"), n_cutouts=3, seed=FRESH_SEED_OFFSET,
                          out_dir=tmp_path / "raw",
                          workers=1, progress=False)
    catalog = ingest_files(find_fits(tmp_path / "raw"), survey, root=tmp_path, workers=1, progress=False).catalog
    catalog = catalog.set_index("objid").loc[list(fresh["objid"])].reset_index()
    fixed = process_batch((catalog.to_dict("records"), str(tmp_path), ShardSettings(**mix.settings.__dict__)))
    for key in ("image", "variance", "fwhm_before", "band_flags", "label"):
        np.testing.assert_array_equal(fresh[key], fixed[key])
    assert mix.n_fresh == 3


def test_the_torch_renderer_gives_the_same_fresh_rows_to_its_tolerance(data):
    """The default renderer: the same objects and noise draws, pixels within the renderer's bound of the
    lenstronomy path's (5e-4 of the peak noiseless; here after matching, in units of each pixel's noise)."""
    lt, tr = _mix(data).simulate([3, 4, 5, 6]), _mix(data, renderer="torch").simulate([3, 4, 5, 6])
    np.testing.assert_array_equal(lt["label"], tr["label"])
    np.testing.assert_array_equal(lt["objid"], tr["objid"])
    good = lt["variance"] > 0
    z = np.abs(lt["image"] - tr["image"])[good] / np.sqrt(lt["variance"][good])
    assert z.max() < 0.05  # a twentieth of the noise at most: the same noise realization, not another
    np.testing.assert_allclose(tr["variance"], lt["variance"], rtol=1e-2, atol=1e-12)
    with pytest.raises(ValueError, match="renderer"):
        _mix(data, renderer="galsim")


def test_render_systems_is_render_system_with_the_same_noise_draws():
    from lens_assets.ml.torch_render import render_systems
    from lens_assets.science.families import load_family
    from lens_assets.science.simulation import _member, render_system
    from lens_assets.science.surveys import get_survey

    survey, family = get_survey("des"), load_family("physical")
    drawn = [_member(survey, family, 2, i) for i in range(5)]
    reference = [render_system(s, survey, np.random.default_rng(i)) for i, (s, _) in enumerate(drawn)]
    batch = render_systems([s for s, _ in drawn], [np.random.default_rng(i) for i in range(5)], survey)
    for a, b in zip(reference, batch):
        peak = np.abs(a.noiseless).max()
        assert np.abs(a.image - b.image).max() < 2e-3 * peak
        assert b.flux_ratio == pytest.approx(a.flux_ratio, rel=1e-3, abs=1e-6)
        assert [k.shape for k in b.psf] == [k.shape for k in a.psf] and b.zero_points == a.zero_points


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
    for held_out, match in (("heldout", "held-out family"), ("galsim", "rendered by galsim")):
        with pytest.raises(ValueError, match=match):
            FreshMix(ShardDataset(data / "shards"), family=held_out, fraction=0.5, seed=0,
                     shard_settings=read_manifest(data / "shards")["settings"])
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
    # the start epoch before fitting (a resumed run's loader workers copy the dataset first), then each epoch
    assert s["best_checkpoint"] and epochs == [0, 0, 1]
