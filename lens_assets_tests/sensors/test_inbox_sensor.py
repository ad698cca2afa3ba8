"""survey_inbox_sensor and rescore_nightly on a LocalStorage in tmp_path and an ephemeral instance.

Drops are empty folders published with the producer API (``publish_drop`` writes
``_COMPLETE`` last): the sensor looks at folders and markers, never at the files.
Dynamic-partition requests are applied to the instance between ticks as the
sensor daemon does (``build_sensor_context`` evaluates, it does not apply).
Every survey has a promoted model unless a test says otherwise (the sensor
requests nothing for a survey without one).
"""

import json
import re

import dagster as dg
import pytest

from lens_assets.assets.scoring import candidate_scores
from lens_assets.inbox import COMPLETE_MARKER
from lens_assets.inbox import publish_drop
from lens_assets_tests.helpers import write_promotion
from lens_assets.partitions import drop_partitions, scoring_partitions
from lens_assets.resources.storage import LocalStorage
from lens_assets.sensors.inbox import (
    SENSOR_NAME,
    max_drops_per_tick,
    rescore_nightly,
    score_drops_job,
    survey_inbox_sensor,
)

ENV = "LENS_INBOX_MAX_DROPS_PER_TICK"


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


@pytest.fixture(autouse=True)
def _default_limit(monkeypatch):
    for name in (ENV, "LENS_INBOX_MAX_RETRIES", "LENS_INBOX_RETRY_BACKOFF_S"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _promoted(storage):
    from lens_assets.science.surveys import SURVEY_NAMES

    for survey in SURVEY_NAMES:
        write_promotion(storage, survey, "v1")


def tick(storage: LocalStorage, instance, cursor=None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as context:
        return survey_inbox_sensor(context)


def apply(instance, result: dg.SensorResult) -> None:
    """What the daemon does with a tick's dynamic-partition requests."""
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))


def run_keys(result: dg.SensorResult) -> list[str]:
    return [r.run_key for r in result.run_requests]


def added(result: dg.SensorResult) -> list[str]:
    assert all(r.partitions_def_name == drop_partitions.name for r in result.dynamic_partitions_requests)
    return [k for r in result.dynamic_partitions_requests for k in r.partition_keys]


def assert_partitions_of_candidate_scores(instance, result: dg.SensorResult):
    """Each requested key reads back as its (drop, survey) and is a partition once the add requests are applied
    (what the daemon checks before it launches a run)."""
    apply(instance, result)
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        for req in result.run_requests:
            survey, drop = req.run_key.split("|", 1)
            parsed = scoring_partitions.get_partition_key_from_str(str(req.partition_key))
            assert parsed.keys_by_dimension == {"drop": drop, "survey": survey}
            assert scoring_partitions.has_partition_key(str(req.partition_key))


def incomplete_drop(storage: LocalStorage, survey: str, drop: str):
    d = storage.path("inbox", survey, drop)
    d.mkdir(parents=True)
    (d / "a.fits").write_bytes(b"partial")  # a producer still copying
    return d


def test_a_new_complete_drop_gives_one_run_request_and_registers_its_partition(storage, instance):
    publish_drop(storage, "des", "2026-11-21", [])
    result = tick(storage, instance)
    (req,) = result.run_requests
    assert req.run_key == "des|2026-11-21"
    assert str(req.partition_key) == "2026-11-21|des"
    assert req.partition_key.keys_by_dimension == {"drop": "2026-11-21", "survey": "des"}
    assert req.asset_selection == [candidate_scores.key]
    assert req.tags["lens/survey"] == "des" and req.tags["lens/drop"] == "2026-11-21"
    (add,) = result.dynamic_partitions_requests
    assert isinstance(add, dg.AddDynamicPartitionsRequest)
    assert (add.partitions_def_name, list(add.partition_keys)) == ("drops", ["2026-11-21"])
    assert json.loads(result.cursor) == {"handled": ["des|2026-11-21"]}
    assert_partitions_of_candidate_scores(instance, result)


def test_a_tick_with_the_returned_cursor_requests_nothing_again(storage, instance):
    publish_drop(storage, "des", "d1", [])
    first = tick(storage, instance)
    apply(instance, first)
    second = tick(storage, instance, first.cursor)
    assert second.run_requests == [] and second.dynamic_partitions_requests == []
    # a later drop is still picked up with that cursor, and only it
    publish_drop(storage, "des", "d2", [])
    third = tick(storage, instance, second.cursor)
    assert run_keys(third) == ["des|d2"] and added(third) == ["d2"]


def test_the_cursor_forgets_drops_removed_from_the_inbox_and_keeps_the_rest(storage, instance):
    """The cursor is bounded by what the inbox holds, not by every drop ever seen."""
    import shutil

    for d in ("d1", "d2", "d3"):
        publish_drop(storage, "des", d, [])
    first = tick(storage, instance)
    apply(instance, first)
    assert json.loads(first.cursor) == {"handled": ["des|d1", "des|d2", "des|d3"]}
    shutil.rmtree(storage.path("inbox", "des", "d2"))  # archived by the operator
    incomplete_drop(storage, "des", "d4")
    second = tick(storage, instance, first.cursor)
    assert second.run_requests == []  # d1 and d3 are still handled, d4 waits
    assert json.loads(second.cursor) == {"handled": ["des|d1", "des|d3"]}


def _run_as_the_sensor_daemon_would(storage, instance, req: dg.RunRequest):
    """Launch the requested run with the tags the daemon puts on sensor runs (as lens_assets.demo does).

    No model files exist in this storage (only the promotion record), so the run fails in candidate_scores; it is
    recorded with its run key
    all the same, and Dagster does not launch a run key twice whatever became of the run.
    """
    job = dg.Definitions(assets=[candidate_scores], jobs=[score_drops_job],
                         resources={"storage": storage}).resolve_job_def(score_drops_job.name)
    return job.execute_in_process(partition_key=str(req.partition_key), instance=instance, raise_on_error=False,
                                  tags={**req.tags, "dagster/sensor_name": SENSOR_NAME,
                                        "dagster/run_key": req.run_key})


def test_a_lost_cursor_is_rebuilt_from_the_sensors_runs(storage, instance):
    publish_drop(storage, "des", "d1", [])
    first = tick(storage, instance)
    apply(instance, first)
    (req,) = first.run_requests
    run = _run_as_the_sensor_daemon_would(storage, instance, req)
    assert instance.get_run_by_id(run.run_id).tags["dagster/run_key"] == "des|d1"

    reset = tick(storage, instance, cursor=None)
    assert reset.run_requests == [] and reset.dynamic_partitions_requests == []
    assert json.loads(reset.cursor) == {"handled": ["des|d1"]}

    # a drop that arrived meanwhile is requested; only runs of this sensor count as handled
    publish_drop(storage, "des", "d2", [])
    publish_drop(storage, "sdss", "d3", [])
    other = dg.Definitions(assets=[candidate_scores], jobs=[score_drops_job], resources={"storage": storage})
    instance.add_dynamic_partitions("drops", ["d3"])
    other.resolve_job_def(score_drops_job.name).execute_in_process(
        partition_key="d3|sdss", instance=instance, raise_on_error=False,
        tags={"dagster/sensor_name": "some_other_sensor", "dagster/run_key": "sdss|d3"})
    again = tick(storage, instance, cursor=None)
    assert run_keys(again) == ["des|d2", "sdss|d3"]
    assert added(again) == ["d2"]  # d3 is registered already


def test_an_incomplete_drop_waits_for_its_marker(storage, instance):
    d = incomplete_drop(storage, "hsc", "d1")
    first = tick(storage, instance)
    assert first.run_requests == [] and first.dynamic_partitions_requests == []
    second = tick(storage, instance, first.cursor)
    assert second.run_requests == []
    (d / COMPLETE_MARKER).touch()
    third = tick(storage, instance, second.cursor)
    assert run_keys(third) == ["hsc|d1"] and added(third) == ["d1"]
    apply(instance, third)
    assert tick(storage, instance, third.cursor).run_requests == []


def test_an_unknown_survey_folder_is_skipped_and_logged_while_known_ones_are_requested(storage, instance, capfd):
    publish_drop(storage, "nosuchsurvey", "d1", [])
    publish_drop(storage, "kids", "d1", [])
    result = tick(storage, instance)
    assert run_keys(result) == ["kids|d1"]
    assert added(result) == ["d1"]
    assert "nosuchsurvey|d1" not in json.loads(result.cursor)["handled"]
    err = capfd.readouterr().err
    assert re.search(r"WARNING - .*inbox/nosuchsurvey: 'nosuchsurvey' is not a known survey .*its drops are "
                     r"skipped", err), err
    assert err.count("is not a known survey") == 1
    # skipped again next tick (logged again), never requested
    again = tick(storage, instance, result.cursor)
    assert again.run_requests == []
    assert "'nosuchsurvey' is not a known survey" in capfd.readouterr().err


def test_a_drop_whose_name_cannot_be_a_partition_key_is_skipped_and_logged(storage, instance, capfd):
    # "a|b|des" would not split back into (drop, survey): the daemon rejected the whole tick, every tick
    for name in ("a|b", "x,y", "ok"):
        d = storage.path("inbox", "des", name)
        d.mkdir(parents=True)
        (d / COMPLETE_MARKER).touch()
    result = tick(storage, instance)
    assert run_keys(result) == ["des|ok"] and added(result) == ["ok"]
    assert json.loads(result.cursor) == {"handled": ["des|ok"]}
    assert_partitions_of_candidate_scores(instance, result)
    err = capfd.readouterr().err
    assert re.search(r"WARNING - .*inbox/des/a\|b: drop name 'a\|b' contains '\|'.*the drop is skipped", err), err
    assert re.search(r"WARNING - .*inbox/des/x,y: drop name 'x,y' contains ','", err), err


def test_publish_drop_refuses_a_name_that_cannot_be_a_partition_key(storage):
    for name, char in (("a|b", r"\|"), ("2026...11", r"\.\.\."), ("tab\there", r"\\t"), ("", None)):
        match = rf"inbox/des: drop name .* contains '{char}'" if char else r"inbox/des: a drop name cannot be empty"
        with pytest.raises(ValueError, match=match):
            publish_drop(storage, "des", name, [])
    assert storage.list_dirs("inbox", "des") == []


def test_publish_drop_refuses_two_files_of_one_name_before_copying_either(storage, tmp_path):
    for night in ("night1", "night2"):
        (tmp_path / night).mkdir()
        (tmp_path / night / "cutout.fits").write_bytes(night.encode())
    with pytest.raises(ValueError, match=r"night1/cutout.fits and .*night2/cutout.fits share the name 'cutout.fits'"):
        publish_drop(storage, "des", "d1", [tmp_path / "night1" / "cutout.fits", tmp_path / "night2" / "cutout.fits"])
    assert not storage.path("inbox", "des", "d1").exists()  # nothing half-published, no marker


def test_many_drops_are_spread_over_ticks_by_the_per_tick_limit(storage, instance, monkeypatch):
    monkeypatch.setenv(ENV, "10")
    expected = set()
    for i in range(25):
        survey = ("des", "lsst")[i % 2]
        publish_drop(storage, survey, f"drop-{i:02d}", [])
        expected.add(f"{survey}|drop-{i:02d}")
    cursor, sizes, seen, registered = None, [], [], []
    for _ in range(4):
        result = tick(storage, instance, cursor)
        apply(instance, result)
        sizes.append(len(result.run_requests))
        seen += run_keys(result)
        registered += added(result)
        cursor = result.cursor
    assert sizes == [10, 10, 5, 0]
    assert len(seen) == len(set(seen)) == 25 and set(seen) == expected
    assert sorted(registered) == sorted(instance.get_dynamic_partitions("drops")) == [f"drop-{i:02d}"
                                                                                       for i in range(25)]


def test_the_same_drop_name_under_two_surveys_gives_two_runs_and_one_partition(storage, instance):
    publish_drop(storage, "des", "2026-11-21", [])
    publish_drop(storage, "euclid", "2026-11-21", [])
    result = tick(storage, instance)
    assert run_keys(result) == ["des|2026-11-21", "euclid|2026-11-21"]
    assert sorted(str(r.partition_key) for r in result.run_requests) == ["2026-11-21|des", "2026-11-21|euclid"]
    assert added(result) == ["2026-11-21"]
    apply(instance, result)
    # the name registered by one survey is not registered again for a third
    publish_drop(storage, "hst", "2026-11-21", [])
    later = tick(storage, instance, result.cursor)
    assert run_keys(later) == ["hst|2026-11-21"] and later.dynamic_partitions_requests == []


@pytest.mark.parametrize(("value", "message"), [
    ("ten", r"LENS_INBOX_MAX_DROPS_PER_TICK='ten' is not an integer"),
    ("2.5", r"LENS_INBOX_MAX_DROPS_PER_TICK='2.5' is not an integer"),
    ("", r"LENS_INBOX_MAX_DROPS_PER_TICK='' is not an integer"),
    ("0", r"LENS_INBOX_MAX_DROPS_PER_TICK must be at least 1, got 0"),
    ("-3", r"LENS_INBOX_MAX_DROPS_PER_TICK must be at least 1, got -3"),
])
def test_a_bad_per_tick_limit_is_a_clear_error(storage, instance, monkeypatch, value, message):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=message):
        max_drops_per_tick()
    publish_drop(storage, "des", "d1", [])
    with pytest.raises(ValueError, match=message):
        tick(storage, instance)


def test_the_per_tick_limit_defaults_to_100_and_reads_the_environment(monkeypatch):
    assert max_drops_per_tick() == 100
    monkeypatch.setenv(ENV, " 7 ")
    assert max_drops_per_tick() == 7


def nightly(storage: LocalStorage, instance, when=None) -> list:
    """The schedule's tick as the daemon evaluates it (``evaluate_tick`` checks what a direct call does not,
    e.g. that several requests each carry a run key)."""
    from datetime import datetime, timezone

    from lens_assets.definitions import defs

    when = when or datetime(2026, 12, 7, 3, tzinfo=timezone.utc)
    with dg.build_schedule_context(instance=instance, resources={"storage": storage},
                                   scheduled_execution_time=when,
                                   repository_def=defs.get_repository_def()) as context:
        return list(rescore_nightly.evaluate_tick(context).run_requests or [])


def test_rescore_nightly_requests_every_registered_complete_drop_of_a_survey_with_a_model(storage):
    import shutil
    from datetime import datetime, timezone

    publish_drop(storage, "des", "d1", [])
    publish_drop(storage, "sdss", "d1", [])
    publish_drop(storage, "des", "d2", [])
    publish_drop(storage, "des", "not-registered", [])  # complete, but the sensor has not registered it yet
    incomplete_drop(storage, "hsc", "d2")  # registered (by des/d2) but incomplete here
    publish_drop(storage, "kids", "d1", [])  # registered (by des/d1), complete, but kids has no promoted model
    shutil.rmtree(storage.path("promoted", "kids"))
    publish_drop(storage, "nosuchsurvey", "d1", [])
    # build_schedule_context needs a persistent instance (an ephemeral one has no instance ref)
    with dg.instance_for_test() as instance:
        assert nightly(storage, instance) == []  # nothing registered: nothing to re-score
        instance.add_dynamic_partitions("drops", ["d1", "d2"])
        requests = nightly(storage, instance)
        next_night = nightly(storage, instance, datetime(2026, 12, 8, 3, tzinfo=timezone.utc))
    assert all(isinstance(r, dg.RunRequest) for r in requests)
    assert sorted(str(r.partition_key) for r in requests) == ["d1|des", "d1|sdss", "d2|des"]
    for r in requests:
        drop, survey = str(r.partition_key).split("|")
        assert {k: v for k, v in r.tags.items() if k.startswith("lens/")} == {
            "lens/survey": survey, "lens/drop": drop, "lens/reason": "nightly", "lens/promoted_version": "v1"}
        assert r.tags["dagster/schedule_name"] == "rescore_nightly"
        assert r.run_key == f"nightly|20261207|{survey}|{drop}"
    # one run key per drop and night: the next night's runs are launched again
    assert sorted(r.run_key for r in next_night) == [
        "nightly|20261208|des|d1", "nightly|20261208|des|d2", "nightly|20261208|sdss|d1"]


def test_drops_of_a_survey_without_a_promoted_model_wait_and_are_requested_after_the_first_promotion(
        storage, instance, capfd):
    import shutil

    shutil.rmtree(storage.path("promoted", "hsc"))
    publish_drop(storage, "hsc", "early", [])
    publish_drop(storage, "des", "d1", [])
    first = tick(storage, instance)
    assert run_keys(first) == ["des|d1"]  # hsc waits; des has a model
    assert json.loads(first.cursor) == {"handled": ["des|d1"]}
    assert "1 waiting for a promoted model" in capfd.readouterr().err
    apply(instance, first)
    write_promotion(storage, "hsc", "h1")
    second = tick(storage, instance, first.cursor)
    assert run_keys(second) == ["hsc|early"] and added(second) == ["early"]
    assert second.run_requests[0].tags["lens/promoted_version"] == "h1"


def _fail_run(storage, instance, req):
    run = _run_as_the_sensor_daemon_would(storage, instance, req)
    assert not run.success
    return run


def test_a_failed_drop_is_retried_after_a_promotion_or_the_backoff_and_given_up_after_the_limit(
        storage, instance, monkeypatch, capfd):
    publish_drop(storage, "des", "d1", [])
    first = tick(storage, instance)
    apply(instance, first)
    (req,) = first.run_requests
    assert req.tags["lens/promoted_version"] == "v1"
    _fail_run(storage, instance, req)

    waiting = tick(storage, instance, first.cursor)
    assert waiting.run_requests == []  # same model, within the 600 s backoff

    monkeypatch.setenv("LENS_INBOX_RETRY_BACKOFF_S", "0")
    retry = tick(storage, instance, waiting.cursor)
    assert run_keys(retry) == ["des|d1|retry-1"]
    assert str(retry.run_requests[0].partition_key) == "d1|des"
    assert run_keys(tick(storage, instance, retry.cursor)) == ["des|d1|retry-1"]  # one run key: launched once
    _fail_run(storage, instance, retry.run_requests[0])

    monkeypatch.setenv("LENS_INBOX_RETRY_BACKOFF_S", "3600")
    assert tick(storage, instance, retry.cursor).run_requests == []
    write_promotion(storage, "des", "v2")  # a new model: retried without waiting for the backoff
    after_promotion = tick(storage, instance, retry.cursor)
    assert run_keys(after_promotion) == ["des|d1|retry-2"]
    assert after_promotion.run_requests[0].tags["lens/promoted_version"] == "v2"
    _fail_run(storage, instance, after_promotion.run_requests[0])

    monkeypatch.setenv("LENS_INBOX_MAX_RETRIES", "2")
    monkeypatch.setenv("LENS_INBOX_RETRY_BACKOFF_S", "0")
    capfd.readouterr()
    given_up = tick(storage, instance, after_promotion.cursor)
    assert given_up.run_requests == []
    assert "des|d1: gave up after 3 failed runs" in capfd.readouterr().err
    # the lost cursor is rebuilt from the retries' run keys too: nothing new is requested
    assert json.loads(tick(storage, instance, None).cursor) == {"handled": ["des|d1"]}


def _added_run(instance, status, tags: dict):
    """A run the instance records in ``status`` with ``tags``, as if launched and left there."""
    import uuid

    from dagster._core.storage.dagster_run import DagsterRun

    return instance.add_run(DagsterRun(job_name=score_drops_job.name, run_id=str(uuid.uuid4()), status=status,
                                       tags=tags))


def _recorded_run(instance, req, status, **tags):
    """A run of ``req`` as the instance records it, in ``status``, with the sensor's tags and ``tags``."""
    return _added_run(instance, status, {**req.tags, "dagster/sensor_name": SENSOR_NAME,
                                         "dagster/run_key": req.run_key, "dagster/partition": str(req.partition_key),
                                         **tags})


def test_a_failed_drop_waits_for_its_run_in_progress_and_for_the_run_retry_daemon(storage, instance, monkeypatch):
    monkeypatch.setenv("LENS_INBOX_RETRY_BACKOFF_S", "0")
    publish_drop(storage, "des", "d1", [])
    first = tick(storage, instance)
    apply(instance, first)
    (req,) = first.run_requests
    failed = _fail_run(storage, instance, req)
    # the run-retry daemon is about to re-execute the failed run: the sensor leaves the drop to it
    instance.add_run_tags(failed.run_id, {"dagster/will_retry": "true"})
    assert tick(storage, instance, first.cursor).run_requests == []
    # its re-execution is running: still no second run of the same partition
    instance.add_run_tags(failed.run_id, {"dagster/will_retry": "false"})
    again = _recorded_run(instance, req, dg.DagsterRunStatus.STARTED, **{"dagster/retry_number": "1"})
    assert tick(storage, instance, first.cursor).run_requests == []
    # the re-execution failed as well: the sensor's retry is its first, not its second
    instance.handle_run_event(again.run_id, dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.RUN_FAILURE.value, job_name=again.job_name, message="failed"))
    assert instance.get_run_by_id(again.run_id).status == dg.DagsterRunStatus.FAILURE
    assert run_keys(tick(storage, instance, first.cursor)) == ["des|d1|retry-1"]


def test_a_drop_with_a_candidate_table_is_not_retried_after_an_earlier_failed_run(storage, instance, monkeypatch):
    monkeypatch.setenv("LENS_INBOX_RETRY_BACKOFF_S", "0")
    publish_drop(storage, "des", "d1", [])
    first = tick(storage, instance)
    apply(instance, first)
    _fail_run(storage, instance, first.run_requests[0])
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=candidate_scores.key, partition="d1|des"))
    assert tick(storage, instance, first.cursor).run_requests == []


@pytest.mark.parametrize("name,value,message", [("LENS_INBOX_MAX_RETRIES", "-1", "at least 0"),
                                                ("LENS_INBOX_RETRY_BACKOFF_S", "soon", "is not an integer")])
def test_bad_retry_settings_are_clear_errors(storage, instance, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    publish_drop(storage, "des", "d1", [])
    first = tick(storage, instance)
    apply(instance, first)
    _fail_run(storage, instance, first.run_requests[0])
    with pytest.raises(ValueError, match=f"{name}.*{message}"):
        tick(storage, instance, first.cursor)


def _hand_run(instance, partition: str, status):
    """A run of ``partition`` launched from the UI, not by the sensor (no sensor or run-key tags)."""
    return _added_run(instance, status, {"dagster/partition": partition})


def test_a_drop_scored_by_hand_before_the_sensor_saw_it_is_handled_without_a_second_run(storage, instance, capfd):
    publish_drop(storage, "des", "d1", [])
    publish_drop(storage, "des", "d2", [])
    instance.add_dynamic_partitions(drop_partitions.name, ["d1"])  # registered and scored from the UI
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=candidate_scores.key, partition="d1|des"))
    capfd.readouterr()
    result = tick(storage, instance)
    assert run_keys(result) == ["des|d2"]
    assert json.loads(result.cursor) == {"handled": ["des|d1", "des|d2"]}
    err = capfd.readouterr().err
    assert "1 already scored without this sensor" in err
    assert "des|d1: already scored (partition d1|des), not requested again" in err
    # the same drop's table under another survey is another partition: that drop is still requested
    publish_drop(storage, "hsc", "d1", [])
    assert run_keys(tick(storage, instance, result.cursor)) == ["hsc|d1"]


def test_a_drop_being_scored_by_a_hand_launched_run_waits_for_it_and_is_requested_if_it_fails(storage, instance):
    publish_drop(storage, "des", "d1", [])
    publish_drop(storage, "des", "d2", [])
    instance.add_dynamic_partitions(drop_partitions.name, ["d1", "d2"])
    run = _hand_run(instance, "d1|des", dg.DagsterRunStatus.STARTED)
    _hand_run(instance, "d9|des", dg.DagsterRunStatus.STARTED)  # another partition's run holds nothing back
    waiting = tick(storage, instance)
    assert run_keys(waiting) == ["des|d2"]
    assert json.loads(waiting.cursor) == {"handled": ["des|d2"]}  # d1 not handled: looked at again next tick
    assert tick(storage, instance, waiting.cursor).run_requests == []
    instance.handle_run_event(run.run_id, dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.RUN_FAILURE.value, job_name=run.job_name, message="failed"))
    # failed, and Dagster's run retries are about to re-execute it: still that run's partition
    instance.add_run_tags(run.run_id, {"dagster/will_retry": "true"})
    assert tick(storage, instance, waiting.cursor).run_requests == []
    # re-executed as the daemon does it: the failed run keeps will_retry "true" and gets the new run's id
    again = _hand_run(instance, "d1|des", dg.DagsterRunStatus.STARTED)
    instance.add_run_tags(again.run_id, {"dagster/retry_number": "1"})
    instance.add_run_tags(run.run_id, {"dagster/auto_retry_run_id": again.run_id})
    assert tick(storage, instance, waiting.cursor).run_requests == []
    instance.handle_run_event(again.run_id, dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.RUN_FAILURE.value, job_name=again.job_name, message="failed"))
    instance.add_run_tags(again.run_id, {"dagster/will_retry": "false"})  # its retries spent: failed for good
    assert run_keys(tick(storage, instance, waiting.cursor)) == ["des|d1"]  # the sensor's turn


def test_a_hand_run_that_ends_while_the_sensor_reads_is_seen_as_its_table(storage, instance, monkeypatch):
    """The runs are read before the materializations: a run that succeeds between the two reads is found as the
    table it wrote (read the other way round, it would be in neither and requested again)."""
    publish_drop(storage, "des", "d1", [])
    instance.add_dynamic_partitions(drop_partitions.name, ["d1"])
    run = _hand_run(instance, "d1|des", dg.DagsterRunStatus.STARTED)
    ended = []

    def then_the_run_ends(read):
        def wrapped(*args, **kwargs):
            found = read(*args, **kwargs)
            if not ended:  # after the first of the two reads, whichever it is
                instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=candidate_scores.key,
                                                                            partition="d1|des"))
                instance.handle_run_event(run.run_id, dg.DagsterEvent(
                    event_type_value=dg.DagsterEventType.RUN_SUCCESS.value, job_name=run.job_name, message="ok"))
                ended.append(read.__name__)
            return found
        return wrapped

    monkeypatch.setattr(instance, "get_runs", then_the_run_ends(instance.get_runs))
    monkeypatch.setattr(instance, "get_materialized_partitions",
                        then_the_run_ends(instance.get_materialized_partitions))
    # with a cursor: the tick reads no runs of its own before these two (a lost cursor is rebuilt from runs)
    assert tick(storage, instance, json.dumps({"handled": []})).run_requests == []
    assert ended == ["get_runs"]


def test_a_retry_waits_for_a_hand_run_of_its_drop_and_sees_a_table_written_during_the_tick(storage, instance,
                                                                                              monkeypatch):
    monkeypatch.setenv("LENS_INBOX_RETRY_BACKOFF_S", "0")
    publish_drop(storage, "des", "d1", [])
    first = tick(storage, instance)
    apply(instance, first)
    _fail_run(storage, instance, first.run_requests[0])
    hand = _hand_run(instance, "d1|des", dg.DagsterRunStatus.STARTED)  # someone scores it from the UI meanwhile
    assert tick(storage, instance, first.cursor).run_requests == []
    instance.handle_run_event(hand.run_id, dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.RUN_FAILURE.value, job_name=hand.job_name, message="failed"))
    assert run_keys(tick(storage, instance, first.cursor)) == ["des|d1|retry-1"]
    # a drop registered by hand makes the tick read the tables early; d1's table is written after that read, while
    # the sensor reads its failed runs: the retry's own read sees it
    publish_drop(storage, "des", "d2", [])
    instance.add_dynamic_partitions(drop_partitions.name, ["d2"])
    records = instance.get_run_records

    def failed_runs_then_the_table(*args, **kwargs):
        found = records(*args, **kwargs)
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=candidate_scores.key,
                                                                    partition="d1|des"))
        return found

    monkeypatch.setattr(instance, "get_run_records", failed_runs_then_the_table)
    assert run_keys(tick(storage, instance, first.cursor)) == ["des|d2"]


def test_a_failed_run_marked_will_retry_more_than_a_day_ago_no_longer_holds_its_drop(storage, instance):
    """The run-retry daemon leaves dagster/will_retry on runs it gives up on: such a mark counts for a day."""
    import datetime

    from dagster._core.storage.runs.schema import RunsTable

    publish_drop(storage, "des", "d1", [])
    instance.add_dynamic_partitions(drop_partitions.name, ["d1"])
    run = _added_run(instance, dg.DagsterRunStatus.FAILURE, {"dagster/partition": "d1|des",
                                                             "dagster/will_retry": "true"})

    def marked_days_ago(days: float) -> None:
        when = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(days=days)
        with instance.run_storage.connect() as conn:
            conn.execute(RunsTable.update().where(RunsTable.c.run_id == run.run_id).values(update_timestamp=when))

    marked_days_ago(0.9)
    assert tick(storage, instance).run_requests == []
    marked_days_ago(1.1)
    assert run_keys(tick(storage, instance)) == ["des|d1"]
