"""Blocking data checks: a failed catalog, shard or split check stops the assets downstream of it in the run.

One tiny SDSS survey (4 cutouts: raw files, catalog, shards) is built once per module; each test copies it,
tampers with one thing (a function's output or the catalog on disk) and materializes one asset with a stub
asset downstream of it, which must not materialize when a blocking check fails.
"""

import dataclasses
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

import lens_assets.assets.catalog as catalog_assets
import lens_assets.assets.shards as shard_assets
from lens_assets.assets._common import survey_asset
from lens_assets.assets.catalog import cutout_catalog
from lens_assets.assets.shards import dataset_splits, fwhm_check, psf_matched_shards
from lens_assets.assets.simulation import simulated_cutouts
from lens_assets.resources.storage import LocalStorage

SURVEY = "sdss"
ARCSEC = 1.0 / 3600.0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(root, catalog path relative to root) of a survey with raw files, a catalog and shards."""
    root = tmp_path_factory.mktemp("checks") / "data"
    run_config = {"ops": {"simulated_cutouts": {"config": {"n_cutouts": 4, "n_heldout": 0, "seed": 7, "workers": 1}},
                          "cutout_catalog": {"config": {"workers": 1}},
                          "psf_matched_shards": {"config": {"workers": 1}}}}
    result = dg.materialize([simulated_cutouts, cutout_catalog, psf_matched_shards], partition_key=SURVEY,
                            resources={"storage": LocalStorage(root=str(root))}, run_config=run_config,
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    (mat,) = result.asset_materializations_for_node("cutout_catalog")
    return root, Path(mat.metadata["path"].value).relative_to(root)


@pytest.fixture
def survey_copy(built, tmp_path):
    """A private copy of the built survey: (storage, path of its catalog parquet)."""
    root, cat_rel = built
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    return LocalStorage(root=str(copy)), copy / cat_rel


def _run(storage, asset, upstream, ops=None):
    """Materialize ``asset`` and a stub asset that depends on it (``upstream`` as source assets)."""

    @survey_asset(name="downstream", deps=[asset])
    def downstream() -> dg.MaterializeResult:
        return dg.MaterializeResult()

    config = {"ops": {asset.key.path[-1]: {"config": {"workers": 1}}}} if ops is None else {"ops": ops}
    return dg.materialize([asset, downstream, *(a.to_source_asset() for a in upstream)], partition_key=SURVEY,
                          resources={"storage": storage}, run_config=config,
                          instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)


def _evaluations(result):
    """check name -> the AssetCheckEvaluation of the run."""
    return {e.event_specific_data.check_name: e.event_specific_data
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def _materialized(result):
    return {e.asset_key.path[-1] for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}


def _assert_blocked(result, asset, failed):
    """``asset`` materialized (its data is there to inspect), ``failed`` checks failed, and the run stopped."""
    evaluations = _evaluations(result)
    assert {name for name, e in evaluations.items() if not e.passed and e.blocking} == set(failed)
    assert all(evaluations[name].severity == dg.AssetCheckSeverity.ERROR for name in failed)
    assert not result.success
    assert _materialized(result) == {asset}
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == asset and "blocking asset check" in failure.event_specific_data.error.message
    return evaluations


# --------------------------------------------------------------------------- cutout_catalog


def _out_of_range_dec(result):
    catalog = result.catalog.copy()
    catalog.loc[catalog.index[0], "dec"] = 95.0
    return dataclasses.replace(result, catalog=catalog)


def _unaccounted_file(result):
    return dataclasses.replace(result, n_files=result.n_files + 1)


@pytest.mark.parametrize("tamper, failed", [(_out_of_range_dec, "catalog_matches_schema"),
                                            (_unaccounted_file, "every_file_accounted_for")])
def test_a_failed_catalog_check_stops_the_assets_downstream(survey_copy, monkeypatch, tamper, failed):
    storage, _ = survey_copy
    ingest = catalog_assets.ingest_files
    monkeypatch.setattr(catalog_assets, "ingest_files", lambda *a, **k: tamper(ingest(*a, **k)))
    _assert_blocked(_run(storage, cutout_catalog, [simulated_cutouts]), "cutout_catalog", [failed])


# --------------------------------------------------------------------------- psf_matched_shards


def _off_target(table):
    return table.assign(fwhm_matched=table["fwhm_matched"] * 1.05, rel_error=(1 + table["rel_error"]) * 1.05 - 1)


@pytest.mark.parametrize("tamper", [_off_target, lambda table: table.iloc[:0]], ids=["5pct_broad", "nothing_measured"])
def test_a_failed_fwhm_check_stops_the_assets_downstream(survey_copy, monkeypatch, tamper):
    storage, _ = survey_copy
    measure = shard_assets.matched_psf_fwhm
    monkeypatch.setattr(shard_assets, "matched_psf_fwhm", lambda *a, **k: tamper(measure(*a, **k)))
    evaluations = _assert_blocked(_run(storage, psf_matched_shards, [cutout_catalog]), "psf_matched_shards",
                                  ["matched_fwhm_within_3pct"])
    assert evaluations["matched_fwhm_within_3pct"].metadata["n_cutouts_with_psf_image"].value == 4


def test_fwhm_check_warns_without_blocking_when_no_cutout_has_a_psf_image(survey_copy):
    storage, cat_path = survey_copy
    catalog = pd.read_parquet(cat_path)
    assert catalog["psf_image_available"].all()  # the simulation writes PSF images; this catalog says it did not
    catalog.assign(psf_image_available=False).to_parquet(cat_path)
    result = _run(storage, psf_matched_shards, [cutout_catalog])
    check = _evaluations(result)["matched_fwhm_within_3pct"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["n_measured"].value == 0
    assert "no cutout has PSF images" in check.metadata["reason"].value
    assert result.success and _materialized(result) == {"psf_matched_shards", "downstream"}


def _fwhm_table(rel_errors, target=1.5):
    rel = np.asarray(rel_errors, float)
    return pd.DataFrame({"objid": [f"o{i}" for i in range(len(rel))], "band": "r", "fwhm_before": 1.0,
                         "fwhm_matched": target * (1 + rel), "target": target, "rel_error": rel})


@pytest.mark.parametrize("rel_errors, n_with_psf, passed, severity, reason", [
    ([0.01, -0.029], 2, True, dg.AssetCheckSeverity.ERROR, None),
    ([0.01, -0.031], 2, False, dg.AssetCheckSeverity.ERROR, None),
    ([], 5, False, dg.AssetCheckSeverity.ERROR, "5 cutouts have PSF images"),
    ([], 0, False, dg.AssetCheckSeverity.WARN, "no cutout has PSF images"),
])
def test_fwhm_check_cases(rel_errors, n_with_psf, passed, severity, reason):
    check = fwhm_check(_fwhm_table(rel_errors), n_with_psf_image=n_with_psf, target_fwhm_arcsec=1.5)
    assert check.passed is passed and check.severity == severity
    assert check.metadata["n_measured"].value == len(rel_errors)
    if reason:
        assert reason in check.metadata["reason"].value
    else:
        assert check.metadata["max_abs_rel_error"].value == pytest.approx(max(abs(r) for r in rel_errors))


# --------------------------------------------------------------------------- dataset_splits


def _leak(*, relabel_group: bool, duplicate_row: bool):
    """A make_splits whose output puts the catalog's first two objects (2" apart) in different splits."""
    make = shard_assets.make_splits

    def tampered(catalog, **kwargs):
        result = make(catalog, **kwargs)
        table = result.table.copy()
        a, b = sorted(catalog["objid"])[:2]
        ia, ib = table.index[table["objid"] == a][0], table.index[table["objid"] == b][0]
        assert table.at[ia, "sky_group"] == table.at[ib, "sky_group"]  # the real splitter linked them
        other = next(s for s in ("train", "val", "test") if s != table.at[ia, "split"])
        role = "stop" if other == "val" else ""  # a val row belongs to one of the val split's halves
        if duplicate_row:  # a second row of a, in another split
            table = pd.concat([table, table.loc[[ia]].assign(split=other, val_role=role)], ignore_index=True)
        else:
            table.loc[ib, ["split", "val_role"]] = [other, role]
            if relabel_group:  # and the sky_group column made to agree with the leak
                table.at[ib, "sky_group"] = table["sky_group"].max() + 1
        return dataclasses.replace(result, table=table)

    return tampered


@pytest.mark.parametrize("relabel_group, duplicate_row, failed, min_sep", [
    (True, False, ["no_sky_group_across_splits"], 2.0),
    (False, False, ["no_sky_group_across_splits"], 2.0),
    (False, True, ["no_objid_in_two_splits", "no_sky_group_across_splits"], 0.0),
], ids=["sky_group_relabelled", "sky_group_kept", "objid_twice"])
def test_a_leak_across_splits_stops_the_assets_downstream(survey_copy, monkeypatch, relabel_group, duplicate_row,
                                                          failed, min_sep):
    storage, cat_path = survey_copy
    catalog = pd.read_parquet(cat_path).sort_values("objid").reset_index(drop=True)
    catalog.loc[1, ["ra", "dec"]] = [catalog.at[0, "ra"], catalog.at[0, "dec"] + 2 * ARCSEC]  # 2" apart, link 10"
    catalog.to_parquet(cat_path)
    monkeypatch.setattr(shard_assets, "make_splits", _leak(relabel_group=relabel_group, duplicate_row=duplicate_row))
    result = _run(storage, dataset_splits, [cutout_catalog, psf_matched_shards],
                  ops={"dataset_splits": {"config": {"min_groups_per_stratum": 3}}})
    check = _assert_blocked(result, "dataset_splits", failed)["no_sky_group_across_splits"]
    # the pair found from positions, whatever the sky_group column says
    assert check.metadata["n_cross_split_pairs"].value == (2 if duplicate_row else 1)
    assert check.metadata["min_cross_split_separation_arcsec"].value == pytest.approx(min_sep, abs=1e-6)
    assert check.metadata["n_sky_group_labels_across_splits"].value == (0 if relabel_group else 1)
    assert catalog.at[0, "objid"] in check.metadata["examples"].value


def test_correct_splits_pass_the_leak_checks_and_downstream_runs(survey_copy):
    storage, cat_path = survey_copy
    result = _run(storage, dataset_splits, [cutout_catalog, psf_matched_shards],
                  ops={"dataset_splits": {"config": {"min_groups_per_stratum": 3}}})
    evaluations = _evaluations(result)
    assert evaluations["no_sky_group_across_splits"].passed and evaluations["no_objid_in_two_splits"].passed
    assert evaluations["no_sky_group_across_splits"].metadata["n_cross_split_pairs"].value == 0
    assert result.success and _materialized(result) == {"dataset_splits", "downstream"}


def test_unread_files_are_named_with_why_they_are_not_read(tmp_path):
    """What a folder holds that is not read: names that are not FITS names, and links to folders (not followed),
    each said as such; the markers in the folder itself aside."""
    import types

    from lens_assets.assets._common import scan_inbox_folder
    from lens_assets.resources.storage import LocalStorage

    storage = LocalStorage(root=str(tmp_path / "root"))
    drop = storage.path("inbox", "des", "d1")
    drop.mkdir(parents=True)
    for name in ("a.fits", "_COMPLETE", "notes.txt"):
        (drop / name).write_bytes(b"x")
    warnings = []
    context = types.SimpleNamespace(log=types.SimpleNamespace(warning=warnings.append))
    files, meta = scan_inbox_folder(context, storage, drop, what="cutouts")
    assert [f.name for f in files] == ["a.fits"]
    assert meta["n_unread_files"] == 1 and "notes.txt" in meta["unread_files"].value
    assert warnings == [f"1 item(s) under {storage.url('inbox', 'des', 'd1')} are not read as cutouts: their names "
                        f"do not end in .fits, .fit, .fits.gz, .fit.gz, .fits.fz, .fit.fz (any case): "
                        f"{storage.url('inbox', 'des', 'd1', 'notes.txt')}"]
    (tmp_path / "batch").mkdir()
    (drop / "batch").symlink_to(tmp_path / "batch", target_is_directory=True)
    meta = scan_inbox_folder(context, storage, drop, what="cutouts")[1]
    assert meta["n_unread_files"] == 2
    assert "or they are links to folders, which are not followed: " in warnings[-1]
    (drop / "notes.txt").unlink()
    assert scan_inbox_folder(context, storage, drop, what="cutouts")[1]["n_unread_files"] == 1
    assert ": they are links to folders, which are not followed: " in warnings[-1]
    (drop / "batch").unlink()
    assert scan_inbox_folder(context, storage, drop, what="cutouts")[1] == {
        "n_unread_files": 0, "unread_files": "none"}
