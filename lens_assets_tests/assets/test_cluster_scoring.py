"""cluster_candidates: materialize() on a few tiny simulated DES cluster fields dropped in the inbox.

The model is a small track-A booster trained on synthetic feature rows (the real
feature names, labels from colour consistency and tangential alignment) and
written where ``cluster_classifier`` writes it, with the manifest
(``cluster_registry.write_cluster_manifest``); the drops are real simulated
fields (the 32-arcsec family of test_clusters.py), read, segmented, featured and
scored by the asset.
"""

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from lens_assets import layout
from lens_assets.assets.cluster_scoring import CLUSTER_SCORING_ASSETS, cluster_candidates
from lens_assets.cluster_registry import load_cluster_manifest, load_cluster_model, write_cluster_manifest
from lens_assets.inbox import cluster_candidate_table, publish_drop, simulate_cluster_drop
from lens_assets.partitions import scoring_key
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.fileio import sha256_file
from lens_assets_tests.helpers import CLUSTER_FIELD_ARCSEC, small_cluster_family

SURVEY = "des"
FIELD_ARCSEC = CLUSTER_FIELD_ARCSEC  # the family helper's field
FIELD_PX = 122  # arc_segments' grid of a 32-arcsec field at 0.263"/px (rounded up to even)
N_FIELDS = 4


small_family = small_cluster_family  # lens_assets_tests.helpers


def write_model(storage: LocalStorage, survey: str = SURVEY, *, seed: int = 0) -> dict:
    """A track-A model, its calibrator, a training features table and the manifest, as cluster_classifier leaves
    them (trained in a second on synthetic rows with the real feature names)."""
    from lens_assets.science.clusters.features import FEATURE_MONOTONE, cluster_feature_names
    from lens_assets.science.clusters.track_a import TrackAConfig, calibrate_track_a, fit_track_a
    from lens_assets.science.surveys import get_survey

    rng = np.random.default_rng(seed)
    names = cluster_feature_names(get_survey(survey).band_names)
    X = pd.DataFrame(rng.normal(size=(80, len(names))), columns=names)
    X["n_segments"] = rng.integers(0, 20, 80).astype(float)
    X["colour_consistency"] = rng.uniform(0, 1, 80)
    X["tangential_alignment"] = rng.uniform(-1, 1, 80)
    y = (X["colour_consistency"] + 0.5 * X["tangential_alignment"] + rng.normal(0, 0.3, 80) > 0.5).astype(int)
    model = fit_track_a(X, y, None, None, config=TrackAConfig(n_estimators=20, n_jobs=1), monotone=FEATURE_MONOTONE)
    calibrator = calibrate_track_a(model, X, y, method="platt")  # continuous: ranks by score are strict
    model.save(storage.path(*layout.cluster_model_file(survey, "track_a")))
    storage.write_text(json.dumps(calibrator.to_dict()), *layout.cluster_calibrator_file(survey, "track_a"))
    storage.write_parquet(X.assign(label=y), *layout.cluster_features_table(survey))
    return write_cluster_manifest(storage, survey, field_size_px=FIELD_PX, light="median", nsigma=2.0,
                                  code_version="cluster-1")


def galaxy_cutout(path):
    """A valid DES galaxy cutout (no OBJTYPE): 64 px of noise and a blob in every band."""
    from lens_assets.science.fits_contract import BandHDUs
    from lens_assets.science.fits_writer import write_cutout

    rng = np.random.default_rng(1)
    y, x = np.mgrid[:64, :64] - 31.5
    bands = {b: BandHDUs(image=(50 * np.exp(-(x**2 + y**2) / 18) + rng.normal(0, 1, (64, 64))).astype(np.float32),
                         header={"BUNIT": "nanomaggy", "PIXSCALE": 0.263, "PSFFWHM": 1.0},
                         variance=np.ones((64, 64), np.float32), psf=None)
             for b in ("g", "r", "i", "z", "Y")}
    write_cutout(path, {"OBJID": "gal-1", "RA": 10.0, "DEC": -20.0, "SURVEY": "des"}, bands)
    return path


def materialize(storage, instance, drop, survey=SURVEY, **kwargs):
    return dg.materialize(CLUSTER_SCORING_ASSETS, partition_key=str(scoring_key(survey, drop)),
                          resources={"storage": storage}, instance=instance,
                          run_config={"ops": {"cluster_candidates": {"config": {"workers": 1}}}}, **kwargs)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two drops scored: ``night-1`` (simulated fields, by simulate_cluster_drop) and ``mixed`` (one of those
    fields, a galaxy cutout and a broken file)."""
    tmp = tmp_path_factory.mktemp("cluster_scoring")
    storage = LocalStorage(root=str(tmp / "root"))
    manifest = write_model(storage)
    truth = simulate_cluster_drop(storage, SURVEY, "night-1", n=N_FIELDS, seed=5, family=small_family(tmp),
                                  workers=1)
    first = sorted(storage.path(*layout.inbox_drop(SURVEY, "night-1")).glob("*.fits"))[0]
    broken = tmp / "broken.fits"
    broken.write_bytes(b"SIMPLE  = T" + b" " * 100)  # a producer's truncated copy
    publish_drop(storage, SURVEY, "mixed", [first, galaxy_cutout(tmp / "galaxy.fits"), broken], cluster=True)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("drops", ["night-1", "mixed"])
        results = {d: materialize(storage, instance, d) for d in ("night-1", "mixed")}
        yield storage, manifest, truth, results


def _metadata(result):
    (mat,) = result.asset_materializations_for_node("cluster_candidates")
    return {k: v.value for k, v in mat.metadata.items()}


def test_simulated_fields_are_scored_ranked_by_score_with_the_manifests_lineage(scored):
    storage, manifest, truth, results = scored
    table = cluster_candidate_table(storage, SURVEY, "night-1")
    meta = _metadata(results["night-1"])
    assert meta["n_files"] == meta["n_scored"] + meta["n_quarantined"] == N_FIELDS
    assert len(table) == meta["n_scored"] == N_FIELDS and sorted(table["objid"]) == sorted(truth["objid"])
    # ranked by calibrated score (ties by logit): 1..n, the score never rises, and each score is the calibrator's
    assert table["rank"].tolist() == list(range(1, N_FIELDS + 1))
    assert (np.diff(table["score"]) <= 0).all()
    tied = table["score"].diff() == 0
    assert (table["logit"].diff()[tied] <= 0).all()
    _, _, calibrator = load_cluster_model(storage, SURVEY)
    np.testing.assert_allclose(table["score"], calibrator.predict(table["logit"]))
    # lineage: every row names its file and hash, and the manifest's model, calibrator and training features
    for f, sha in zip(table["source_file"], table["source_sha256"]):
        assert f.startswith("inbox/des/night-1/") and sha256_file(storage.path(f)) == sha
    assert set(table["model_version"]) == {manifest["model_sha256"][:16]} == {meta["model_version"]}
    assert set(table["calibrator_version"]) == {manifest["calibrator_sha256"][:16]}
    assert manifest["calibrator_sha256"] == sha256_file(storage.path(*layout.cluster_calibrator_file(SURVEY,
                                                                                                      "track_a")))
    assert set(table["training_manifest_sha256"]) == {manifest["features_sha256"]} == {
        sha256_file(storage.path(*layout.cluster_features_table(SURVEY)))}
    assert set(table["survey"]) == {SURVEY} and set(table["drop"]) == {"night-1"}
    assert set(table["code_version"]) == {"cluster-score-1"}
    assert meta["cluster_model_version"] == manifest["version"] and meta["field_size_px"] == FIELD_PX
    # the key features and the BCG ride along; the BCG keys put it at the centre of the field's grid
    assert (table["n_segments"] >= 0).all() and table["tangential_alignment"].between(-1, 1).all()
    np.testing.assert_allclose(table[["bcg_x_px", "bcg_y_px"]], (FIELD_PX - 1) / 2, atol=1.0)
    assert storage.exists(*layout.candidate_gallery(SURVEY, "night-1")) and "top_candidates_gallery" in meta
    assert pd.read_parquet(storage.path(*layout.candidate_quarantine(SURVEY, "night-1"))).empty


def test_a_galaxy_cutout_and_a_broken_file_in_a_cluster_drop_are_quarantined_and_the_counts_add_up(scored):
    from lens_assets.science.schemas import quarantine_schema

    storage, _, _, results = scored
    meta = _metadata(results["mixed"])
    assert (meta["n_files"], meta["n_scored"], meta["n_quarantined"]) == (3, 1, 2)
    q = quarantine_schema().validate(pd.read_parquet(storage.path(*layout.candidate_quarantine(SURVEY, "mixed"))))
    by_file = q.set_index("source_file")
    gal = by_file.loc["inbox/des/mixed/galaxy.fits"]
    assert gal["reason"] == "objtype_mismatch" and gal["objid"] == "gal-1"
    assert gal["message"].startswith("inbox/des/mixed/galaxy.fits: OBJTYPE is absent")
    assert "OBJTYPE = 'cluster_field'" in gal["message"]
    assert gal["source_sha256"] == sha256_file(storage.path("inbox/des/mixed/galaxy.fits"))
    assert by_file.loc["inbox/des/mixed/broken.fits", "reason"] == "truncated"  # the contract's reason
    (row,) = cluster_candidate_table(storage, SURVEY, "mixed").itertuples()
    assert row.rank == 1 and row.source_file.startswith("inbox/des/mixed/")


def test_a_drop_without_the_cluster_marker_or_incomplete_or_without_a_manifest_is_refused(tmp_path):
    storage = LocalStorage(root=str(tmp_path / "root"))
    write_model(storage)
    publish_drop(storage, SURVEY, "galaxies", [galaxy_cutout(tmp_path / "g.fits")])  # no cluster marker
    publish_drop(storage, "hsc", "fields", [], cluster=True)  # hsc has no cluster model
    storage.path(*layout.inbox_drop(SURVEY, "copying")).mkdir(parents=True)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("drops", ["galaxies", "fields", "copying"])
        with pytest.raises(dg.Failure, match=r"inbox/des/galaxies has no _CLUSTER_FIELDS marker: it is not a drop "
                                             r"of cluster fields \(galaxy drops are scored by candidate_scores\)"):
            materialize(storage, instance, "galaxies")
        with pytest.raises(dg.Failure, match=r"inbox/des/copying has no _COMPLETE marker"):
            materialize(storage, instance, "copying")
        with pytest.raises(dg.Failure, match=r"clusters/models/hsc/manifest.json does not exist: no cluster model "
                                             r"of hsc is scoring-ready"):
            materialize(storage, instance, "fields", survey="hsc")
        # a vetted file changed after its manifest was written is refused, naming the file and both hashes
        version = load_cluster_manifest(storage, SURVEY)["version"]
        storage.path(*layout.cluster_vetted_calibrator_file(SURVEY, version, "track_a")).write_text("{}")
        publish_drop(storage, SURVEY, "later", [], cluster=True)
        instance.add_dynamic_partitions("drops", ["later"])
        with pytest.raises(dg.Failure, match=rf"clusters/models/des/vetted/{version}/track_a.calibrator.json: sha256 "
                                             r"[0-9a-f]{16} differs from calibrator_sha256 [0-9a-f]{16}"):
            materialize(storage, instance, "later")


def test_an_empty_drop_of_cluster_fields_gives_an_empty_typed_table(tmp_path):
    from lens_assets.science.schemas import cluster_candidate_schema

    storage = LocalStorage(root=str(tmp_path / "root"))
    write_model(storage)
    fz = tmp_path / "field-1.fits.bz2"  # a compression the reader does not take: not read, and said so
    fz.write_bytes(b"BZh9")
    publish_drop(storage, SURVEY, "empty", [fz], cluster=True)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("drops", ["empty"])
        meta = _metadata(materialize(storage, instance, "empty"))
    assert (meta["n_files"], meta["n_scored"], meta["n_quarantined"]) == (0, 0, 0)
    assert meta["n_unread_files"] == 1 and "field-1.fits.bz2" in meta["unread_files"]
    table = cluster_candidate_table(storage, SURVEY, "empty")
    assert table.empty and list(table.columns) == [*cluster_candidate_schema().columns]


def test_the_manifest_records_the_model_files_hashes_and_the_segmentation_settings(tmp_path):
    storage = LocalStorage(root=str(tmp_path / "root"))
    assert load_cluster_manifest(storage, SURVEY) is None
    doc = write_model(storage)
    assert load_cluster_manifest(storage, SURVEY) == doc
    # the files are copied to vetted/<version>/, which a retrain never rewrites
    assert doc["model"] == "track_a"
    assert doc["model_file"] == f"clusters/models/des/vetted/{doc['version']}/track_a.json"
    assert doc["model_sha256"] == sha256_file(storage.path(*layout.cluster_model_file(SURVEY, "track_a")))
    assert doc["model_sha256"] == sha256_file(storage.path(*layout.cluster_vetted_model_file(SURVEY, doc["version"],
                                                                                           "track_a")))
    assert doc["model_meta_sha256"] == sha256_file(storage.path("clusters/models/des/track_a.meta.json"))
    assert doc["model_meta_file"] == f"clusters/models/des/vetted/{doc['version']}/track_a.meta.json"
    assert (doc["bands"], doc["field_size_px"], doc["light"], doc["nsigma"]) == (["g", "r", "i", "z", "Y"], FIELD_PX,
                                                                                 "median", 2.0)
    assert len(doc["version"]) == 16 and doc["code_version"] == "cluster-1"
    with pytest.raises(ValueError, match=r"light 'box' is not one of \['median', 'model'\]"):
        write_cluster_manifest(storage, SURVEY, field_size_px=FIELD_PX, light="box", nsigma=2.0, code_version="x")
    with pytest.raises(FileNotFoundError, match=r"clusters/models/hsc/track_a.json does not exist: materialize "
                                                r"cluster_classifier for hsc first"):
        write_cluster_manifest(storage, "hsc", field_size_px=FIELD_PX, light="median", nsigma=2.0, code_version="x")


def test_simulate_cluster_drop_refuses_a_galaxy_family(storage):
    with pytest.raises(ValueError, match=r"family 'physical' has population 'physical'; a drop of cluster fields"):
        simulate_cluster_drop(storage, SURVEY, "d", n=1, seed=0, family="physical")
    size = int(round(FIELD_ARCSEC / 0.263))
    assert size + size % 2 == FIELD_PX  # arc_segments' grid of the field


def test_neither_scoring_asset_takes_the_others_drop_so_neither_deletes_the_others_candidates(tmp_path):
    """A backfill of candidate_scores over a drop of cluster fields (or of cluster_candidates over a galaxy drop)
    would publish the drop's candidates folder and delete the other asset's table: each refuses the other's drops."""
    from lens_assets.assets.scoring import candidate_scores

    storage = LocalStorage(root=str(tmp_path / "root"))
    write_model(storage)
    publish_drop(storage, SURVEY, "fields", [], cluster=True)
    publish_drop(storage, SURVEY, "galaxies", [galaxy_cutout(tmp_path / "g.fits")])
    cluster_table = storage.write_text("cluster", *layout.cluster_candidate_table(SURVEY, "fields"))
    galaxy_table = storage.write_text("galaxy", *layout.candidate_table(SURVEY, "galaxies"))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("drops", ["fields", "galaxies"])
        result = dg.materialize([candidate_scores], partition_key=str(scoring_key(SURVEY, "fields")),
                                resources={"storage": storage}, instance=instance, raise_on_error=False)
        assert not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert (f"{storage.url(*layout.inbox_drop(SURVEY, 'fields'))} has the _CLUSTER_FIELDS marker: it is a drop "
                "of cluster fields, scored by cluster_candidates, not candidate_scores"
                in failure.event_specific_data.error.message)
        # no_retry: the retry policy does not run it again
        assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        result = materialize(storage, instance, "galaxies", raise_on_error=False)
        assert not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "inbox/des/galaxies has no _CLUSTER_FIELDS marker: it is not a drop of cluster fields" in \
            failure.event_specific_data.error.message
        assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert cluster_table.read_text() == "cluster" and galaxy_table.read_text() == "galaxy"
    assert sorted(p.name for p in storage.path(*layout.candidates_dir(SURVEY, "fields")).iterdir()) == [
        "cluster_candidates.parquet"]
