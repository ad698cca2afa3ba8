"""survey_inbox_sensor with drops of cluster fields (``_CLUSTER_FIELDS``): routing, waiting, retries, nightly.

As in test_inbox_sensor.py: empty drops published with the producer API, an
ephemeral instance, dynamic-partition requests applied between ticks. A cluster
manifest here is the JSON alone (no model files), which is all the sensor reads.
"""

import json

import dagster as dg
import pytest

from lens_assets import layout
from lens_assets.assets.cluster_scoring import cluster_candidates
from lens_assets.assets.scoring import candidate_scores
from lens_assets.cluster_registry import MANIFEST_KEYS
from lens_assets.inbox import CLUSTER_MARKER, publish_drop
from lens_assets.sensors.inbox import SENSOR_NAME, survey_inbox_sensor
from lens_assets_tests.helpers import write_promotion
from lens_assets_tests.sensors.test_inbox_sensor import apply, nightly, run_keys, tick  # one sensor harness


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    for name in ("LENS_INBOX_MAX_DROPS_PER_TICK", "LENS_INBOX_MAX_RETRIES", "LENS_INBOX_RETRY_BACKOFF_S"):
        monkeypatch.delenv(name, raising=False)


def write_manifest(storage, survey: str, version: str) -> None:
    """``clusters/models/<survey>/manifest.json`` naming ``version`` (the other keys placeholders)."""
    doc = {key: "0" * 64 for key in MANIFEST_KEYS} | {"survey": survey, "version": version}
    storage.write_text(json.dumps(doc), *layout.cluster_manifest(survey))


def test_a_cluster_drop_requests_cluster_candidates_with_its_track_tag_and_a_galaxy_drop_is_unchanged(
        storage, instance):
    write_promotion(storage, "des", "v1")
    write_manifest(storage, "des", "c1")
    publish_drop(storage, "des", "fields-1", [], cluster=True)
    publish_drop(storage, "des", "night-1", [])
    assert storage.exists(*layout.cluster_marker("des", "fields-1"))
    assert storage.path(*layout.cluster_marker("des", "fields-1")).name == CLUSTER_MARKER == "_CLUSTER_FIELDS"
    result = tick(storage, instance)
    cluster, galaxy = result.run_requests
    assert (cluster.run_key, str(cluster.partition_key)) == ("des|fields-1", "fields-1|des")
    assert cluster.asset_selection == [cluster_candidates.key]
    assert cluster.tags == {"lens/survey": "des", "lens/drop": "fields-1", "lens/cluster_model_version": "c1",
                            "lens/track": "cluster"}
    assert (galaxy.run_key, galaxy.asset_selection) == ("des|night-1", [candidate_scores.key])
    assert galaxy.tags == {"lens/survey": "des", "lens/drop": "night-1", "lens/promoted_version": "v1"}
    (add,) = result.dynamic_partitions_requests
    assert sorted(add.partition_keys) == ["fields-1", "night-1"]
    assert json.loads(result.cursor) == {"handled": ["des|fields-1", "des|night-1"]}


def test_a_cluster_drop_waits_for_a_cluster_manifest_not_for_a_promoted_galaxy_model(storage, instance, capfd):
    write_promotion(storage, "des", "v1")  # a galaxy model does not score cluster fields
    publish_drop(storage, "des", "fields-1", [], cluster=True)
    publish_drop(storage, "hsc", "fields-2", [], cluster=True)  # hsc: no galaxy model, a cluster manifest below
    write_manifest(storage, "hsc", "h1")
    first = tick(storage, instance)
    assert run_keys(first) == ["hsc|fields-2"]
    assert json.loads(first.cursor) == {"handled": ["hsc|fields-2"]}
    assert "1 of cluster fields waiting for a cluster model manifest" in capfd.readouterr().err
    apply(instance, first)
    assert tick(storage, instance, first.cursor).run_requests == []
    write_manifest(storage, "des", "c1")
    second = tick(storage, instance, first.cursor)
    assert run_keys(second) == ["des|fields-1"] and second.run_requests[0].tags["lens/cluster_model_version"] == "c1"


def test_a_broken_cluster_manifest_holds_back_its_surveys_cluster_drops_only(storage, instance, capfd):
    write_promotion(storage, "des", "v1")
    storage.write_text("{}", *layout.cluster_manifest("des"))
    publish_drop(storage, "des", "fields-1", [], cluster=True)
    publish_drop(storage, "des", "night-1", [])
    assert run_keys(tick(storage, instance)) == ["des|night-1"]
    assert "clusters/models/des/manifest.json lacks ['survey', 'model'" in capfd.readouterr().err


def _fail_as_the_daemon_would(storage, instance, req: dg.RunRequest):
    """Run the requested cluster_candidates partition with the sensor's tags; it fails (the manifest names no
    model files)."""
    result = dg.materialize([cluster_candidates], partition_key=str(req.partition_key), instance=instance,
                            resources={"storage": storage}, raise_on_error=False,
                            tags={**req.tags, "dagster/sensor_name": SENSOR_NAME, "dagster/run_key": req.run_key})
    assert not result.success
    return result


def test_a_failed_cluster_drop_is_retried_against_cluster_candidates_and_the_manifest(storage, instance,
                                                                                      monkeypatch):
    write_manifest(storage, "des", "c1")
    publish_drop(storage, "des", "fields-1", [], cluster=True)
    first = tick(storage, instance)
    apply(instance, first)
    _fail_as_the_daemon_would(storage, instance, first.run_requests[0])
    assert tick(storage, instance, first.cursor).run_requests == []  # within the backoff, same manifest

    # a galaxy table of the same partition does not count: the drop's own asset has none
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=candidate_scores.key,
                                                                partition="fields-1|des"))
    write_manifest(storage, "des", "c2")  # a new cluster model: retried without waiting for the backoff
    retry = tick(storage, instance, first.cursor)
    (req,) = retry.run_requests
    assert req.run_key == "des|fields-1|retry-1" and req.asset_selection == [cluster_candidates.key]
    assert req.tags == {"lens/survey": "des", "lens/drop": "fields-1", "lens/cluster_model_version": "c2",
                        "lens/track": "cluster", "lens/attempt": "2"}
    _fail_as_the_daemon_would(storage, instance, req)
    monkeypatch.setenv("LENS_INBOX_RETRY_BACKOFF_S", "0")
    assert run_keys(tick(storage, instance, retry.cursor)) == ["des|fields-1|retry-2"]
    # once cluster_candidates has the partition, nothing more is retried
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=cluster_candidates.key,
                                                                partition="fields-1|des"))
    assert tick(storage, instance, retry.cursor).run_requests == []
    # a lost cursor is rebuilt from the cluster runs' keys too
    assert json.loads(tick(storage, instance, None).cursor) == {"handled": ["des|fields-1"]}


def test_rescore_nightly_leaves_drops_of_cluster_fields_to_their_own_asset(storage):
    publish_drop(storage, "des", "night-1", [])
    publish_drop(storage, "des", "fields-1", [], cluster=True)
    write_promotion(storage, "des", "v1")  # the galaxy drops of a survey with a promoted model are re-scored
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("drops", ["night-1", "fields-1"])
        requests = nightly(storage, instance)
    assert [str(r.partition_key) for r in requests] == ["night-1|des"]


def test_the_sensor_targets_both_scoring_assets(storage):
    defs = dg.Definitions(assets=[candidate_scores, cluster_candidates], sensors=[survey_inbox_sensor],
                          resources={"storage": storage})
    graph = defs.resolve_asset_graph()
    assert survey_inbox_sensor.asset_selection.resolve(graph) == {candidate_scores.key, cluster_candidates.key}


@pytest.mark.parametrize("track", ["cluster", "galaxy"])
def test_past_the_retry_limit_a_new_model_does_not_retry_a_drop_of_either_track(storage, instance, monkeypatch,
                                                                                capfd, track):
    """The limit is checked before the new-model condition for both tracks (one code path): a drop that failed
    LENS_INBOX_MAX_RETRIES + 1 times stays given up when a new model (cluster: a new manifest version) appears."""
    cluster = track == "cluster"
    (write_manifest if cluster else write_promotion)(storage, "des", "m1")
    publish_drop(storage, "des", "d1", [], cluster=cluster)
    first = tick(storage, instance)
    apply(instance, first)
    (req,) = first.run_requests
    asset = cluster_candidates if cluster else candidate_scores
    assert req.asset_selection == [asset.key]
    result = dg.materialize([asset], partition_key=str(req.partition_key), instance=instance,
                            resources={"storage": storage}, raise_on_error=False,
                            tags={**req.tags, "dagster/sensor_name": SENSOR_NAME, "dagster/run_key": req.run_key})
    assert not result.success
    monkeypatch.setenv("LENS_INBOX_MAX_RETRIES", "0")
    (write_manifest if cluster else write_promotion)(storage, "des", "m2")  # a new model since the failed run
    capfd.readouterr()
    assert tick(storage, instance, first.cursor).run_requests == []
    assert "des|d1: gave up after 1 failed runs (LENS_INBOX_MAX_RETRIES=0)" in capfd.readouterr().err
    monkeypatch.setenv("LENS_INBOX_MAX_RETRIES", "1")  # under the limit the new model is a reason to retry at once
    (retry,) = tick(storage, instance, first.cursor).run_requests
    assert retry.run_key == "des|d1|retry-1" and retry.asset_selection == [asset.key]


def test_a_cluster_drop_scored_by_hand_is_handled_and_a_galaxy_table_of_it_does_not_count(storage, instance):
    write_promotion(storage, "des", "v1")
    write_manifest(storage, "des", "c1")
    publish_drop(storage, "des", "fields-1", [], cluster=True)
    instance.add_dynamic_partitions("drops", ["fields-1"])
    # a galaxy table of the partition is not the cluster track's: the drop is still requested
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=candidate_scores.key,
                                                                partition="fields-1|des"))
    assert run_keys(tick(storage, instance)) == ["des|fields-1"]
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=cluster_candidates.key,
                                                                partition="fields-1|des"))
    result = tick(storage, instance)
    assert result.run_requests == []
    assert json.loads(result.cursor) == {"handled": ["des|fields-1"]}
