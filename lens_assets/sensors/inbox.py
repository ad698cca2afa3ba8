"""`survey_inbox_sensor`: new complete drops in the inbox become `drops` partitions and scoring runs.

A drop is ``inbox/<survey>/<drop>/``; its producer writes ``_COMPLETE`` last.
Each tick lists the drops, skips those already handled (the cursor), registers
the complete new ones as ``drops`` partitions and requests one
``candidate_scores`` run per (survey, drop) with ``run_key = "<survey>|<drop>"``,
all in one ``SensorResult``. At most ``LENS_INBOX_MAX_DROPS_PER_TICK`` (default
100) drops are taken per tick; the rest wait for the next.

Only a survey with a promoted model (``promoted_model``: its report passed
every gate) has its drops requested; until then they wait, so a drop that
arrives before the first promotion is scored after it.

A drop whose run failed (a killed worker, a store that timed out) and that has
no candidate table is requested again as ``<survey>|<drop>|retry-<n>``, either
once a different model has been promoted since the failed run or after a
backoff (``LENS_INBOX_RETRY_BACKOFF_S``, default 600 s, doubling per attempt),
at most ``LENS_INBOX_MAX_RETRIES`` (default 3) times; then it is logged as given
up. The attempt number is the number of failed runs of the drop, so a retry
requested twice is one run key, launched once. A drop with a run of its
partition in progress, whoever launched it, waits for that run instead (below).

A drop whose producer wrote ``_CLUSTER_FIELDS`` beside ``_COMPLETE`` holds cluster
fields: it is requested as a ``cluster_candidates`` run instead (same run key,
tags ``lens/track: cluster`` and ``lens/cluster_model_version``), waits while the
survey has no cluster manifest (``clusters/models/<survey>/manifest.json``, not the
galaxy promotion), and is retried in the same way, against ``cluster_candidates``'
materializations and the manifest's version.

A drop whose partition someone registered and scored by hand before the sensor
saw it (a ``candidate_scores`` or ``cluster_candidates`` materialization of it
exists) is handled without a run, and logged; one whose hand-launched run is
still queued or running, or failed and about to be re-executed by Dagster's run
retries, waits for that run, and is requested only if it fails for good. A run
that failed more than a day ago no longer counts as about to be retried (the
daemon re-executes within its tick while it runs; it leaves the mark on runs it
gives up on). A backfill's partitions not launched yet are not runs, and are
not waited for.

Idempotent: the cursor holds the handled (survey, drop) pairs still in the
inbox (so it is bounded by what the inbox holds); when it is
lost (reset, new deployment) it is rebuilt from the run keys of this sensor's
runs, and Dagster never launches a run key twice, so a drop is neither run
twice nor missed. Incomplete drops wait; folders for an unknown survey are
logged once per tick and skipped, and so are drop folders whose name cannot be
a partition key (``drop_name_problem``: a ``|`` would make ``<drop>|<survey>``
unparseable and fail every tick, holding back every other drop).
"""

from __future__ import annotations

import datetime
import json
import os
import time

import dagster as dg

from lens_assets import layout
from lens_assets.assets.cluster_scoring import cluster_candidates
from lens_assets.assets.scoring import candidate_scores
from lens_assets.cluster_registry import cluster_manifest_version
from lens_assets.model_registry import promoted_version
from lens_assets.partitions import drop_name_problem, drop_partitions, scoring_key
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.surveys import SURVEY_NAMES

SENSOR_NAME = "survey_inbox_sensor"
DEFAULT_MAX_DROPS_PER_TICK = 100
DEFAULT_MAX_RETRIES = 3
DEFAULT_RETRY_BACKOFF_S = 600
MODEL_TAG = "lens/promoted_version"  # on each requested run: the promoted pair it was meant to use
CLUSTER_MODEL_TAG = "lens/cluster_model_version"  # on each cluster run: the cluster manifest's version
TRACK_TAG = "lens/track"  # "cluster" on the runs of drops of cluster fields (galaxy runs carry no track tag)
CLUSTER = "cluster"
FAILED = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
IN_PROGRESS = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
RETRY_NUMBER_TAG = "dagster/retry_number"  # on the runs the run-retry daemon re-executes (run_retries)
WILL_RETRY_TAG = "dagster/will_retry"  # "true" on a failed run the run-retry daemon is going to re-execute
AUTO_RETRY_RUN_TAG = "dagster/auto_retry_run_id"  # on a failed run the daemon has re-executed: the new run's id


def _env_int(name: str, default: int, *, minimum: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
    if n < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {n}")
    return n


def max_drops_per_tick() -> int:
    return _env_int("LENS_INBOX_MAX_DROPS_PER_TICK", DEFAULT_MAX_DROPS_PER_TICK, minimum=1)


def max_retries() -> int:
    return _env_int("LENS_INBOX_MAX_RETRIES", DEFAULT_MAX_RETRIES, minimum=0)


def retry_backoff_s() -> int:
    return _env_int("LENS_INBOX_RETRY_BACKOFF_S", DEFAULT_RETRY_BACKOFF_S, minimum=0)


def run_key(survey: str, drop: str) -> str:
    return f"{survey}|{drop}"


def drop_of_run_key(key: str) -> str:
    """``<survey>|<drop>`` of a run key of this sensor (a retry's ends in ``|retry-<n>``)."""
    return "|".join(key.split("|")[:2])


def _handled_from_runs(instance: dg.DagsterInstance) -> set[str]:
    """Drops of every run this sensor requested (used when the cursor is empty)."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/sensor_name": SENSOR_NAME}))
    return {drop_of_run_key(r.tags["dagster/run_key"]) for r in runs if "dagster/run_key" in r.tags}


def _sensor_runs(instance: dg.DagsterInstance, statuses) -> dict[str, list]:
    """drop -> run records of this sensor's runs of it in ``statuses``, newest first. The run-retry daemon's
    re-executions carry the sensor's tags too (run_retries in dagster.yaml)."""
    out: dict[str, list] = {}
    for rec in instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/sensor_name": SENSOR_NAME},
                                                              statuses=statuses)):
        key = rec.dagster_run.tags.get("dagster/run_key")
        if key:
            out.setdefault(drop_of_run_key(key), []).append(rec)
    return out


def _track(run) -> str:
    return CLUSTER if run.tags.get(TRACK_TAG) == CLUSTER else "galaxy"


class _Partitions:
    """What one tick reads of the scoring partitions, each read once and when first needed: the partitions with
    a run of them queued or running, or failed and about to be re-executed by the run-retry daemon, whoever
    launched it (``active``), and each track's materialized partitions (``materialized``). The runs are always
    read before the tables: a run that ends between the two reads is seen as the table it wrote."""

    def __init__(self, instance: dg.DagsterInstance):
        self._instance, self._active, self._materialized = instance, None, {}

    def active(self) -> set:
        if self._active is None:
            # a failed run keeps dagster/will_retry = "true" after the daemon has re-executed it; then it carries
            # the re-execution's id (dagster/auto_retry_run_id), and the re-execution is a run of its own. A day
            # (since the run's last status or tag change) bounds the read: a running daemon re-executes within
            # its tick, the mark stays on every retried run, and on runs the daemon gave up on without a retry.
            since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
            retried = self._instance.get_runs(filters=dg.RunsFilter(
                statuses=FAILED, tags={WILL_RETRY_TAG: "true"}, updated_after=since))
            runs = [*self._instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS)),
                    *(r for r in retried if AUTO_RETRY_RUN_TAG not in r.tags)]
            self._active = {r.tags.get("dagster/partition") for r in runs}
        return self._active

    def materialized(self, track: str) -> set:
        self.active()  # the runs first (see the class)
        if track not in self._materialized:
            asset = cluster_candidates if track == CLUSTER else candidate_scores
            self._materialized[track] = self._instance.get_materialized_partitions(asset.key)
        return self._materialized[track]


def _retries(instance, handled: set[str], model_of, *, limit: int, log=None) -> list:
    """(survey, drop, attempt, reason, track) for the handled drops whose last run failed and that have no table
    yet; ``model_of(survey, track)`` is the model version that scores the track now (None: none).

    A drop with a run of it queued or running, or whose failed run the run-retry daemon is about to re-execute,
    waits for that run, whoever launched it. ``attempt`` counts the sensor's own failed launches (the daemon's
    re-executions of them are not attempts of their own)."""
    failed = _sensor_runs(instance, FAILED) if limit > 0 else {}
    if not failed:
        return []
    partitions = _Partitions(instance)  # read after the failed runs: a run or table since is seen
    now, backoff, most = time.time(), retry_backoff_s(), max_retries()
    out = []
    for key in sorted(handled & set(failed)):
        survey, drop = key.split("|", 1)
        if scoring_key(survey, drop) in partitions.active():  # a run of it in progress or about to be retried
            continue
        latest = failed[key][0]
        runs = [r for r in failed[key] if RETRY_NUMBER_TAG not in r.dagster_run.tags]
        track = _track(latest.dagster_run)
        model = model_of(survey, track)
        if scoring_key(survey, drop) in partitions.materialized(track) or model is None:
            continue
        attempt = len(runs)  # the retry after n failed runs is retry-n: requesting it twice launches it once
        if attempt > most:
            if log:
                log.warning(f"{key}: gave up after {attempt} failed runs (LENS_INBOX_MAX_RETRIES={most}); "
                            f"latest {latest.dagster_run.run_id}")
            continue
        ended = latest.end_time or latest.update_timestamp.timestamp()
        if latest.dagster_run.tags.get(CLUSTER_MODEL_TAG if track == CLUSTER else MODEL_TAG) != model:
            reason = "a new model was promoted since the failed run" if track != CLUSTER else \
                "a new cluster model was written since the failed run"
        elif now - ended >= backoff * 2 ** (attempt - 1):
            reason = f"{backoff * 2 ** (attempt - 1)} s since the failed run"
        else:
            continue
        out.append((survey, drop, attempt, reason, track))
        if len(out) >= limit:
            break
    return out


def _request(survey: str, drop: str, track: str, model: str, *, attempt: int = 0) -> dg.RunRequest:
    """The run of one drop: ``candidate_scores`` (tagged with the promoted version) or, for a drop of cluster
    fields, ``cluster_candidates`` (tagged with the track and the cluster manifest's version)."""
    key = run_key(survey, drop) + (f"|retry-{attempt}" if attempt else "")
    if track == CLUSTER:
        asset, tags = cluster_candidates, {CLUSTER_MODEL_TAG: model, TRACK_TAG: CLUSTER}
    else:
        asset, tags = candidate_scores, {MODEL_TAG: model}
    tags = {"lens/survey": survey, "lens/drop": drop, **tags}
    if attempt:
        tags["lens/attempt"] = str(attempt + 1)
    return dg.RunRequest(run_key=key, partition_key=scoring_key(survey, drop), asset_selection=[asset.key], tags=tags)


def inbox_tick(storage, instance: dg.DagsterInstance, cursor: str | None, *, limit: int, log=None) -> dg.SensorResult:
    """One tick's decisions (the sensor body, callable without a sensor context)."""
    handled = set(json.loads(cursor)["handled"]) if cursor else _handled_from_runs(instance)
    registered = set(instance.get_dynamic_partitions(drop_partitions.name))
    new: list[tuple[str, str, str]] = []
    present: set[str] = set()
    waiting = no_model = no_cluster_model = 0
    scored_by_hand: list[tuple[str, str]] = []  # registered and materialized before this sensor saw the drop
    partitions = _Partitions(instance)

    def done_or_running(survey: str, drop: str, track: str) -> str | None:
        """"scored" or "running" for a drop whose partition someone added and scored (or is scoring) without
        this sensor; None otherwise. Only a registered partition can have been (``_Partitions`` reads the runs
        before the tables)."""
        if drop not in registered:
            return None
        key = scoring_key(survey, drop)
        if key in partitions.materialized(track):
            return "scored"
        return "running" if key in partitions.active() else None
    models: dict[str, str | None] = {}
    cluster_models: dict[str, str | None] = {}  # read when a survey's cluster drop or retry first needs it

    def model_of(survey: str, track: str) -> str | None:
        if track != CLUSTER:
            return models.get(survey)
        if survey not in cluster_models:
            try:
                cluster_models[survey] = cluster_manifest_version(storage, survey)
            except ValueError as err:  # a broken manifest holds back this survey's cluster drops, not every drop
                if log:
                    log.warning(f"{err}; the survey's drops of cluster fields wait")
                cluster_models[survey] = None
        return cluster_models[survey]

    for survey in storage.list_dirs(*layout.inbox_root()):
        if survey not in SURVEY_NAMES:
            if log:
                log.warning(f"{storage.url(*layout.inbox_survey(survey))}: {survey!r} is not a known survey "
                            f"({list(SURVEY_NAMES)}); its drops are skipped")
            continue
        drops = storage.list_dirs(*layout.inbox_survey(survey))
        present.update(run_key(survey, d) for d in drops)
        models[survey] = promoted_version(storage, survey)
        for drop in drops:
            if len(new) >= limit:
                break
            if run_key(survey, drop) in handled:
                continue
            problem = drop_name_problem(drop)
            if problem:
                if log:
                    log.warning(f"{storage.url(*layout.inbox_drop(survey, drop))}: {problem}; "
                                "the drop is skipped (rename it)")
                continue
            if not storage.exists(*layout.complete_marker(survey, drop)):
                waiting += 1
                continue
            track = CLUSTER if storage.exists(*layout.cluster_marker(survey, drop)) else "galaxy"
            state = done_or_running(survey, drop, track)
            if state == "scored":
                scored_by_hand.append((survey, drop))  # handled: its table exists, a second run would redo it
            elif state == "running":
                waiting += 1  # not handled: scored, or requested if that run fails, on a later tick
            elif track == CLUSTER and model_of(survey, CLUSTER) is None:
                no_cluster_model += 1  # not handled: requested on the first tick after the manifest is written
            elif track != CLUSTER and models[survey] is None:
                no_model += 1  # not handled: requested on the first tick after a model is promoted
            else:
                new.append((survey, drop, track))
    retries = _retries(instance, handled & present, model_of, limit=max(0, limit - len(new)), log=log)
    to_register = sorted({d for _, d, _ in new} - registered)
    requests = [_request(s, d, t, model_of(s, t)) for s, d, t in new]
    requests += [_request(s, d, t, model_of(s, t), attempt=n) for s, d, n, _, t in retries]
    # the cursor keeps the drops still in the inbox: it does not grow with every drop ever seen (a removed
    # drop that comes back under the same name is not run again either way: Dagster keeps its run key)
    handled = (handled & present) | {run_key(s, d) for s, d, _ in new} | {run_key(s, d) for s, d in scored_by_hand}
    if log:
        log.info(f"{len(new)} new complete drop(s) (limit {limit} per tick), {len(retries)} retried, {waiting} "
                 f"incomplete or being scored by another run waiting, {no_model} waiting for a promoted model, "
                 f"{no_cluster_model} of cluster fields waiting for a cluster model manifest, "
                 f"{len(scored_by_hand)} already scored without this sensor, {len(to_register)} partition(s) "
                 "registered")
        for s, d in scored_by_hand:
            log.info(f"{run_key(s, d)}: already scored (partition {scoring_key(s, d)}), not requested again")
        for s, d, n, reason, _ in retries:
            log.info(f"{run_key(s, d)}: retry {n} ({reason})")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[drop_partitions.build_add_request(to_register)] if to_register else [],
        cursor=json.dumps({"handled": sorted(handled)}),
    )


@dg.sensor(name=SENSOR_NAME, asset_selection=[candidate_scores, cluster_candidates], minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Scores each new complete drop in inbox/<survey>/<drop>/ (one run per drop): "
                       "candidate_scores, or cluster_candidates for a drop marked _CLUSTER_FIELDS.")
def survey_inbox_sensor(context: dg.SensorEvaluationContext, storage: LocalStorage) -> dg.SensorResult:
    return inbox_tick(storage, context.instance, context.cursor, limit=max_drops_per_tick(), log=context.log)


score_drops_job = dg.define_asset_job("score_drops", selection=[candidate_scores],
                                      description="Score survey drops with the current calibrated ensemble.")


@dg.schedule(name="rescore_nightly", cron_schedule="0 3 * * *", job=score_drops_job,
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Optional: re-score every registered complete drop of galaxy cutouts each night (03:00 "
                         "UTC) with its survey's promoted model; surveys without one are skipped.")
def rescore_nightly(context: dg.ScheduleEvaluationContext, storage: LocalStorage):
    registered = set(context.instance.get_dynamic_partitions(drop_partitions.name))
    night = context.scheduled_execution_time.strftime("%Y%m%d")  # the daemon's tick time (UTC)
    for survey in storage.list_dirs(*layout.inbox_root()):
        if survey not in SURVEY_NAMES:
            continue
        model = promoted_version(storage, survey)
        if model is None:
            context.log.info(f"{survey}: no promoted model, its drops are not re-scored")
            continue
        for drop in storage.list_dirs(*layout.inbox_survey(survey)):
            # drops of cluster fields are not galaxy cutouts: candidate_scores never scores them
            if (drop in registered and storage.exists(*layout.complete_marker(survey, drop))
                    and not storage.exists(*layout.cluster_marker(survey, drop))):
                # a run key per drop and night: a schedule's several requests each need one, and a tick
                # evaluated twice launches each drop's run once
                yield dg.RunRequest(run_key=f"nightly|{night}|{run_key(survey, drop)}",
                                    partition_key=scoring_key(survey, drop),
                                    tags={"lens/survey": survey, "lens/drop": drop, "lens/reason": "nightly",
                                          MODEL_TAG: model})


rescore_on_model_change = dg.AutomationConditionSensorDefinition(
    "rescore_on_model_change", target=[candidate_scores], default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-scores every drop of a survey when its promoted model changes (a newly vetted ensemble and "
                "calibrator); retraining alone, without promotion, re-scores nothing.")
