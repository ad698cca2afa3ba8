"""`survey_inbox_sensor`: new complete drops in the inbox become `drops` partitions and scoring runs.

A drop is ``inbox/<survey>/<drop>/``; its producer writes ``_COMPLETE`` last.
Each tick lists the drops, skips those already handled (the cursor), registers
the complete new ones as ``drops`` partitions and requests one
``candidate_scores`` run per (survey, drop) with ``run_key = "<survey>|<drop>"``,
all in one ``SensorResult``. At most ``LENS_INBOX_MAX_DROPS_PER_TICK`` (default
100) drops are taken per tick; the rest wait for the next.

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

import json
import os

import dagster as dg

from lens_assets.assets.scoring import COMPLETE_MARKER, candidate_scores
from lens_assets.partitions import drop_name_problem, drop_partitions, scoring_key
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.surveys import SURVEY_NAMES

SENSOR_NAME = "survey_inbox_sensor"
DEFAULT_MAX_DROPS_PER_TICK = 100


def max_drops_per_tick() -> int:
    value = os.environ.get("LENS_INBOX_MAX_DROPS_PER_TICK", str(DEFAULT_MAX_DROPS_PER_TICK))
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"LENS_INBOX_MAX_DROPS_PER_TICK={value!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"LENS_INBOX_MAX_DROPS_PER_TICK must be at least 1, got {n}")
    return n


def run_key(survey: str, drop: str) -> str:
    return f"{survey}|{drop}"


def _handled_from_runs(instance: dg.DagsterInstance) -> set[str]:
    """Run keys of every run this sensor requested (used when the cursor is empty)."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/sensor_name": SENSOR_NAME}))
    return {r.tags["dagster/run_key"] for r in runs if "dagster/run_key" in r.tags}


def inbox_tick(storage, instance: dg.DagsterInstance, cursor: str | None, *, limit: int, log=None) -> dg.SensorResult:
    """One tick's decisions (the sensor body, callable without a sensor context)."""
    handled = set(json.loads(cursor)["handled"]) if cursor else _handled_from_runs(instance)
    registered = set(instance.get_dynamic_partitions(drop_partitions.name))
    new: list[tuple[str, str]] = []
    present: set[str] = set()
    waiting = 0
    for survey in storage.list_dirs("inbox"):
        if survey not in SURVEY_NAMES:
            if log:
                log.warning(f"{storage.url('inbox', survey)}: {survey!r} is not a known survey "
                            f"({list(SURVEY_NAMES)}); its drops are skipped")
            continue
        drops = storage.list_dirs("inbox", survey)
        present.update(run_key(survey, d) for d in drops)
        for drop in drops:
            if len(new) >= limit:
                break
            if run_key(survey, drop) in handled:
                continue
            problem = drop_name_problem(drop)
            if problem:
                if log:
                    log.warning(f"{storage.url('inbox', survey, drop)}: {problem}; the drop is skipped (rename it)")
                continue
            if storage.exists("inbox", survey, drop, COMPLETE_MARKER):
                new.append((survey, drop))
            else:
                waiting += 1
    to_register = sorted({d for _, d in new} - registered)
    requests = [dg.RunRequest(run_key=run_key(s, d), partition_key=scoring_key(s, d),
                              asset_selection=[candidate_scores.key], tags={"lens/survey": s, "lens/drop": d})
                for s, d in new]
    # the cursor keeps the drops still in the inbox: it does not grow with every drop ever seen (a removed
    # drop that comes back under the same name is not run again either way: Dagster keeps its run key)
    handled = (handled & present) | {run_key(s, d) for s, d in new}
    if log:
        log.info(f"{len(new)} new complete drop(s) (limit {limit} per tick), {waiting} incomplete waiting, "
                 f"{len(to_register)} partition(s) registered")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[drop_partitions.build_add_request(to_register)] if to_register else [],
        cursor=json.dumps({"handled": sorted(handled)}),
    )


@dg.sensor(name=SENSOR_NAME, asset_selection=[candidate_scores], minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Scores each new complete drop in inbox/<survey>/<drop>/ (one run per drop).")
def survey_inbox_sensor(context: dg.SensorEvaluationContext, storage: LocalStorage) -> dg.SensorResult:
    return inbox_tick(storage, context.instance, context.cursor, limit=max_drops_per_tick(), log=context.log)


score_drops_job = dg.define_asset_job("score_drops", selection=[candidate_scores],
                                      description="Score survey drops with the current calibrated ensemble.")


@dg.schedule(name="rescore_nightly", cron_schedule="0 3 * * *", target=[candidate_scores],
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Optional: re-score every registered drop each night (03:00 UTC).")
def rescore_nightly(context: dg.ScheduleEvaluationContext, storage: LocalStorage):
    registered = set(context.instance.get_dynamic_partitions(drop_partitions.name))
    for survey in storage.list_dirs("inbox"):
        if survey not in SURVEY_NAMES:
            continue
        for drop in storage.list_dirs("inbox", survey):
            if drop in registered and storage.exists("inbox", survey, drop, COMPLETE_MARKER):
                yield dg.RunRequest(partition_key=scoring_key(survey, drop),
                                    tags={"lens/survey": survey, "lens/drop": drop, "lens/reason": "nightly"})


rescore_on_model_change = dg.AutomationConditionSensorDefinition(
    "rescore_on_model_change", target=[candidate_scores], default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-scores every drop of a survey when its lens_classifier or score_calibrator changes.")
