"""materialize() smoke tests of the simulation and ingestion assets on a tiny survey in a temp dir."""

import re

import pandas as pd
import pytest
import dagster as dg

from lens_assets.assets.catalog import cutout_catalog
from lens_assets.assets.simulation import simulated_cutouts
from lens_assets.science.schemas import catalog_schema, quarantine_schema
from lens_assets.science.surveys import get_survey


def _materialize(storage, *, survey="sdss", n=8, seed=1, family="baseline", assets=None, instance=None,
                 n_heldout=0, **sim_config):
    """``n_heldout=None`` leaves the asset's default (n // 5); most tests here want the training drop alone."""
    sim = {"n_cutouts": n, "seed": seed, "family": family, "workers": 1, **sim_config}
    if n_heldout is not None:
        sim["n_heldout"] = n_heldout
    run_config = {"ops": {"simulated_cutouts": {"config": sim},
                          "cutout_catalog": {"config": {"workers": 1}}}}
    assets = assets or [simulated_cutouts, cutout_catalog]
    if len(assets) == 1 and assets[0] is cutout_catalog:
        run_config["ops"].pop("simulated_cutouts")
        assets = [cutout_catalog, simulated_cutouts.to_source_asset()]
    return dg.materialize(assets, partition_key=survey, resources={"storage": storage}, run_config=run_config,
                          instance=instance or dg.DagsterInstance.ephemeral(), raise_on_error=True)


def _metadata(result, key):
    mats = [m for m in result.asset_materializations_for_node(key)]
    assert len(mats) == 1
    return {k: v.value for k, v in mats[0].metadata.items()}


def _checks(result):
    return {e.event_specific_data.check_name: e.event_specific_data.passed
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def test_simulation_and_catalog_materialize_on_a_tiny_survey(storage):
    result = _materialize(storage, n=8, n_heldout=None)
    assert result.success
    sim = _metadata(result, "simulated_cutouts")
    assert sim["n_cutouts"] == 8 and sim["n_lenses"] + sim["n_nonlenses"] == 8
    files = sorted(storage.path("raw", "sdss", "sim-1").glob("*.fits"))
    assert len(files) == 8
    assert storage.path("reports", "sdss", "simulated_sim-1_gallery.png").stat().st_size > 1000
    # the held-out family is simulated beside it: n_cutouts // 5 objects by default
    heldout = sorted(storage.path("raw", "sdss", "sim-heldout-1").glob("*.fits"))
    assert sim["n_heldout"] == len(heldout) == 1 and sim["heldout_family"] == "heldout"

    cat = _metadata(result, "cutout_catalog")
    assert (cat["n_files"], cat["n_ingested"], cat["n_quarantined"]) == (9, 9, 0)
    catalog = pd.read_parquet(cat["path"])
    catalog_schema(get_survey("sdss")).validate(catalog)
    assert set(catalog["source_file"]) == ({f"raw/sdss/sim-1/{f.name}" for f in files}
                                           | {f"raw/sdss/sim-heldout-1/{f.name}" for f in heldout})
    assert (catalog["label_source"] == "sim:lenstronomy").all()
    assert catalog.loc[catalog["sim_family"] == "baseline", "label"].sum() == sim["n_lenses"]
    assert (catalog["sim_family"] == "heldout").sum() == 1
    # each file says what it is for: the training family's are "train", the held-out family's "heldout"
    assert catalog.groupby("sim_family")["sim_role"].agg(set).to_dict() == {"baseline": {"train"},
                                                                           "heldout": {"heldout"}}
    assert _checks(result) == {"catalog_matches_schema": True, "every_file_accounted_for": True,
                               "label_balance_and_provenance": True}


def test_the_torch_renderer_draws_the_training_family_and_says_so(storage):
    result = _materialize(storage, n=6, n_heldout=2, renderer="torch")
    sim = _metadata(result, "simulated_cutouts")
    assert sim["renderer"] == "torch" and sim["n_cutouts"] == 6
    catalog = pd.read_parquet(_metadata(result, "cutout_catalog")["path"])
    # the training family's light by torch, the held-out family's by lenstronomy (its own renderer)
    assert catalog.groupby("sim_family")["label_source"].agg(set).to_dict() == {"baseline": {"sim:torch"},
                                                                              "heldout": {"sim:lenstronomy"}}
    default = _materialize(storage, n=6, n_heldout=2)
    assert (_metadata(default, "simulated_cutouts")["renderer"] == "lenstronomy"
            and result.asset_materializations_for_node("simulated_cutouts")[0].tags["dagster/data_version"]
            != default.asset_materializations_for_node("simulated_cutouts")[0].tags["dagster/data_version"])
    with pytest.raises(dg.DagsterInvalidConfigError, match=r"renderer not in enum type Literal\['lenstronomy', "
                       r"'torch'\] got galsim"):
        _materialize(storage, n=2, renderer="galsim")
    with pytest.raises(dg.Failure, match=r"family 'galsim' is rendered by galsim: leave renderer at 'lenstronomy'"):
        _materialize(storage, n=2, family="galsim", renderer="torch")  # never GalSim files labelled torch


def test_rematerializing_replaces_the_drop_instead_of_mixing_old_files(storage):
    _materialize(storage, n=8)
    result = _materialize(storage, n=5)
    assert len(list(storage.path("raw", "sdss", "sim-1").glob("*.fits"))) == 5
    assert _metadata(result, "cutout_catalog")["n_ingested"] == 5
    assert not any(storage.path("tmp").iterdir())  # no staging left behind


def test_catalog_quarantines_a_broken_file_and_still_accounts_for_every_file(storage):
    _materialize(storage, n=6)
    manual = storage.path("raw", "sdss", "x-manual")  # sorts after sim-1: the copy is the later file
    manual.mkdir(parents=True)
    good = next(storage.path("raw", "sdss", "sim-1").glob("*.fits"))
    (manual / "truncated.fits").write_bytes(good.read_bytes()[:-4000])
    (manual / "copy.fits").write_bytes(good.read_bytes())  # same OBJID under another name
    result = _materialize(storage, assets=[cutout_catalog])
    cat = _metadata(result, "cutout_catalog")
    assert (cat["n_files"], cat["n_ingested"], cat["n_quarantined"]) == (8, 6, 2)
    quarantine = pd.read_parquet(cat["quarantine_path"])
    quarantine_schema().validate(quarantine)
    assert dict(zip(quarantine["source_file"], quarantine["reason"])) == {
        "raw/sdss/x-manual/truncated.fits": "truncated", "raw/sdss/x-manual/copy.fits": "duplicate_objid"}
    assert _checks(result)["every_file_accounted_for"] is True


def test_catalog_without_any_file_fails_with_a_clear_message(storage, capfd):
    with pytest.raises(dg.Failure, match=r"no FITS files under .*raw/sdss: materialize simulated_cutouts"):
        _materialize(storage, assets=[cutout_catalog])
    # files there whose names are not FITS names: counted in the failure and named in the warning before it
    storage.path("raw", "sdss", "x").mkdir(parents=True)
    storage.path("raw", "sdss", "x", "a.fits.bz2").write_bytes(b"BZh9")
    with pytest.raises(dg.Failure, match=r"no FITS files under .*raw/sdss \(1 other item\(s\) there are not read"):
        _materialize(storage, assets=[cutout_catalog])
    assert re.search(r"1 item\(s\) under \S+raw/sdss are not read as cutouts: .*raw/sdss/x/a\.fits\.bz2",
                     capfd.readouterr().err)


def test_heldout_family_goes_to_its_own_drop_and_is_labeled_in_the_catalog(storage):
    result = _materialize(storage, n=4, family="heldout", seed=2)
    assert len(list(storage.path("raw", "sdss", "sim-heldout-2").glob("*.fits"))) == 4
    catalog = pd.read_parquet(_metadata(result, "cutout_catalog")["path"])
    assert set(catalog["sim_family"]) == {"heldout"}


def test_unknown_family_is_a_clear_error(storage):
    with pytest.raises(Exception, match=r"unknown simulation family 'nope'; valid families are"):
        _materialize(storage, family="nope")


def test_whole_pipeline_to_splits_on_a_tiny_survey(storage):
    from lens_assets.assets.shards import dataset_splits, psf_matched_shards

    run_config = {"ops": {"simulated_cutouts": {"config": {"n_cutouts": 24, "n_heldout": 0, "seed": 3, "workers": 1}},
                          "cutout_catalog": {"config": {"workers": 1}},
                          "psf_matched_shards": {"config": {"workers": 1, "rows_per_shard": 10}},
                          "dataset_splits": {"config": {"min_groups_per_stratum": 3}}}}
    result = dg.materialize([simulated_cutouts, cutout_catalog, psf_matched_shards, dataset_splits],
                            partition_key="sdss", resources={"storage": storage}, run_config=run_config,
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    shards = _metadata(result, "psf_matched_shards")
    # 24 physical cutouts and 24 // 10 = 2 lens/twin pairs (4 cutouts, kept out of the splits for the
    # lensing-only AUROC)
    assert (shards["n_rows"], shards["n_shards"]) == (28, 3)
    splits = _metadata(result, "dataset_splits")
    assert splits["n_train"] + splits["n_val"] + splits["n_test"] == 24
    table = pd.read_parquet(splits["path"])
    assert set(table["split"]) <= {"train", "val", "test"} and table["objid"].is_unique
    checks = _checks(result)
    assert checks["matched_fwhm_within_3pct"] is True
    assert checks["no_objid_in_two_splits"] is True and checks["no_sky_group_across_splits"] is True


def test_a_failed_shard_build_leaves_nothing_half_built(storage):
    from lens_assets.assets.shards import psf_matched_shards

    _materialize(storage, n=6)
    victim = next(storage.path("raw", "sdss", "sim-1").glob("*.fits"))
    victim.write_bytes(victim.read_bytes()[:-2880] + b"\0" * 2880)  # changed after cataloging
    with pytest.raises(Exception, match="changed after cataloging"):
        dg.materialize([psf_matched_shards, cutout_catalog.to_source_asset()], partition_key="sdss",
                       resources={"storage": storage}, instance=dg.DagsterInstance.ephemeral(),
                       run_config={"ops": {"psf_matched_shards": {"config": {"workers": 1}}}})
    assert not storage.path("shards", "sdss").exists()
    assert list(storage.path("tmp").iterdir()) == []


def test_a_heldout_family_named_only_in_the_simulation_config_stays_out_of_the_splits(storage, tmp_path):
    from lens_assets.assets.shards import dataset_splits, psf_matched_shards, simulated_heldout_families
    from lens_assets.science.families import FAMILY_DIR

    # a held-out family of the user's own, outside dataset_splits' default exclude_families
    own = tmp_path / "mine.toml"
    own.write_text((FAMILY_DIR / "heldout.toml").read_text().replace('name = "heldout"', 'name = "mine"', 1))
    instance = dg.DagsterInstance.ephemeral()
    assert simulated_heldout_families(instance, "sdss") == []  # nothing simulated on this instance yet
    run_config = {"ops": {"simulated_cutouts": {"config": {"n_cutouts": 24, "n_heldout": 6, "n_pairs": 0, "seed": 3,
                                                           "workers": 1, "more_heldout_families": [str(own)]}},
                          "cutout_catalog": {"config": {"workers": 1}},
                          "psf_matched_shards": {"config": {"workers": 1, "rows_per_shard": 20}},
                          "dataset_splits": {"config": {"min_groups_per_stratum": 3}}}}
    result = dg.materialize([simulated_cutouts, cutout_catalog, psf_matched_shards, dataset_splits],
                            partition_key="sdss", resources={"storage": storage}, run_config=run_config,
                            instance=instance)
    assert result.success
    assert simulated_heldout_families(instance, "sdss") == ["heldout", "mine"]
    assert simulated_heldout_families(instance, "des") == []  # per survey
    splits = _metadata(result, "dataset_splits")
    assert splits["excluded_families"] == "heldout,lensing_only,galsim,mine"
    catalog = pd.read_parquet(_metadata(result, "cutout_catalog")["path"])
    assert (catalog["sim_family"] == "mine").sum() == 6
    table = pd.read_parquet(splits["path"])
    in_splits = set(catalog.loc[catalog["objid"].isin(table["objid"]), "sim_family"])
    assert in_splits == {"physical"} and len(table) == 24
    # a later simulation without held-out families leaves the earlier drops on disk: they stay excluded
    again = dg.materialize([simulated_cutouts], partition_key="sdss", resources={"storage": storage},
                           instance=instance, run_config={"ops": {"simulated_cutouts": {"config": {
                               "n_cutouts": 4, "n_heldout": 0, "n_pairs": 0, "seed": 4, "workers": 1}}}})
    assert again.success and "heldout_families" not in _metadata(again, "simulated_cutouts")
    assert simulated_heldout_families(instance, "sdss") == ["heldout", "mine"]
    # a family held out before and trained on now is training data
    later = dg.materialize([simulated_cutouts], partition_key="sdss", resources={"storage": storage},
                           instance=instance, run_config={"ops": {"simulated_cutouts": {"config": {
                               "n_cutouts": 4, "n_heldout": 0, "n_pairs": 0, "seed": 5, "workers": 1,
                               "family": str(own)}}}})
    assert later.success and _metadata(later, "simulated_cutouts")["family"] == "mine"
    assert simulated_heldout_families(instance, "sdss") == ["heldout"]
