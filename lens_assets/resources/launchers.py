"""Training launchers: where a model-training job runs. Local subprocess by default, AWS ECS in deployment.

Both run a training module under Dagster Pipes and return the job's custom
messages (its training summary). A job on this machine reads and writes the
storage cache directly (``lens_assets.ml.train``); a job elsewhere (ECS) runs
``lens_assets.resources.train_remote``, which pulls its inputs from the S3 store
and pushes its checkpoints back (``shares_filesystem`` is False).

Two Dagster issues are guarded here for the ECS path (``GuardedEcsClient`` wraps
the boto ECS client of the Pipes client): a tag value that ECS refuses (the
``dagster/partition`` tag of a multi-partition key such as ``drop|survey``,
dagster#28066) is sanitised before RunTask, and a RunTask that answers with
``failures`` and no task (no GPU capacity, a bad task definition) raises
``EcsRunTaskFailed`` naming each failure's reason and arn, where dagster-aws would
fail on an empty task list (dagster#32936).
"""

import sys
import unicodedata
from typing import Any

import dagster as dg
from pydantic import Field

TRAIN_MODULE = "lens_assets.ml.train"
TRAIN_REMOTE_MODULE = "lens_assets.resources.train_remote"


class TrainingLauncher(dg.ConfigurableResource):
    """Interface: ``launch(context, extras)`` runs one training job and returns its custom messages.

    ``shares_filesystem``: whether the job sees this process's storage cache. When
    not, the job syncs with the S3 store itself and the asset pulls its results.
    """

    shares_filesystem: bool = True

    def launch(self, context: dg.AssetExecutionContext, *, extras: dict[str, Any], module: str = TRAIN_MODULE) -> list:
        """Run ``python -m module`` (default the galaxy training job) under Pipes with ``extras``; its messages."""
        raise NotImplementedError(f"{type(self).__name__} does not launch jobs; use LocalSubprocessLauncher or "
                                  "EcsLauncher")


class LocalSubprocessLauncher(TrainingLauncher):
    """A child process on this machine (GPU if it has one).

    With ``shares_filesystem=False`` it runs the remote entry point as an ECS task
    would (its own cache in ``env["LENS_CACHE_DIR"]``): a way to try the
    deployment's data path on one machine.
    """

    python: str = Field(default=sys.executable, description="interpreter that runs the training module")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the job")

    def launch(self, context: dg.AssetExecutionContext, *, extras: dict[str, Any], module: str = TRAIN_MODULE) -> list:
        client = dg.PipesSubprocessClient(env=self.env)
        if not self.shares_filesystem:
            refuse_remote_module(self, module)
            module = TRAIN_REMOTE_MODULE
        invocation = client.run(context=context, command=[self.python, "-m", module], extras=extras)
        return invocation.get_custom_messages()


class EcsLauncher(TrainingLauncher):
    """An ECS task on a GPU capacity provider (dagster-aws ``PipesECSClient``); it syncs with the S3 store."""

    shares_filesystem: bool = False
    cluster: str
    task_definition: str
    container_name: str = "train"
    subnets: list[str] = Field(default_factory=list)
    security_groups: list[str] = Field(default_factory=list)
    gpu_count: int = 1
    capacity_provider: str | None = None
    log_poll_interval_s: float = Field(default=1.0, ge=0.0, description="pause before each CloudWatch GetLogEvents "
                                       "of the Pipes readers (dagster-aws polls without one)")

    def run_task_params(self) -> dict:
        """The ECS RunTask request: the training module as the container command, with GPUs reserved."""
        params: dict[str, Any] = {
            "cluster": self.cluster,
            "taskDefinition": self.task_definition,
            "count": 1,
            "overrides": {"containerOverrides": [{
                "name": self.container_name,
                "command": ["python", "-m", TRAIN_REMOTE_MODULE if not self.shares_filesystem else TRAIN_MODULE],
                "resourceRequirements": [{"type": "GPU", "value": str(self.gpu_count)}] if self.gpu_count else [],
            }]},
        }
        if self.subnets:
            params["networkConfiguration"] = {"awsvpcConfiguration": {
                "subnets": self.subnets, "securityGroups": self.security_groups, "assignPublicIp": "DISABLED"}}
        if self.capacity_provider:
            params["capacityProviderStrategy"] = [{"capacityProvider": self.capacity_provider, "weight": 1}]
        # else neither launchType nor a strategy: ECS uses the cluster's default capacity provider strategy (the GPU
        # Auto Scaling group of deploy/ecs/stack.yaml, which scales out for a task waiting in PROVISIONING); an
        # explicit launchType "EC2" would bypass the capacity provider and fail while the group has no instance
        return params

    def pipes_client(self):
        """The dagster-aws Pipes client of a launch: its boto ECS client is wrapped by ``GuardedEcsClient``, and its
        CloudWatch Logs client (the message reader's, which the container log readers share) by
        ``PacedLogsClient``."""
        import boto3
        from dagster_aws.pipes import PipesCloudWatchMessageReader, PipesECSClient

        logs = PacedLogsClient(boto3.client("logs"), interval_s=self.log_poll_interval_s)
        return PipesECSClient(client=GuardedEcsClient(boto3.client("ecs")),
                              message_reader=PipesCloudWatchMessageReader(client=logs))

    def launch(self, context: dg.AssetExecutionContext, *, extras: dict[str, Any], module: str = TRAIN_MODULE) -> list:
        refuse_remote_module(self, module)
        invocation = self.pipes_client().run(context=context, run_task_params=self.run_task_params(), extras=extras,
                                             pipes_container_name=self.container_name)
        return invocation.get_custom_messages()


def refuse_remote_module(launcher: TrainingLauncher, module: str) -> None:
    """A job that does not share the disk runs ``train_remote`` (the galaxy training's S3 sync); any other module
    has no remote entry point yet."""
    if module != TRAIN_MODULE:
        raise ValueError(f"{type(launcher).__name__} (shares_filesystem=False) runs {TRAIN_REMOTE_MODULE}, the remote "
                         f"entry point of {TRAIN_MODULE}; {module} has none: run it with a launcher that shares the "
                         "filesystem (LocalSubprocessLauncher)")


# ECS tags (RunTask ``tags``): a key of 1-128 and a value of 0-256 characters, each a letter, a number, a space or
# one of these (the pattern of the ECS API reference, Tag)
ECS_TAG_PUNCTUATION = frozenset("_.:/=+-@")
ECS_TAG_KEY_MAX, ECS_TAG_VALUE_MAX = 128, 256


def ecs_tag_safe(text: str, max_len: int) -> str:
    """``text`` with each character that ECS refuses in a tag replaced by ``_``, cut to ``max_len`` characters
    (``2026-11-21|des`` -> ``2026-11-21_des``)."""
    # \p{L}, \p{Z}, \p{N} of the pattern: Unicode letters, separators (not tabs or newlines), numbers
    return "".join(c if unicodedata.category(c)[0] in "LZN" or c in ECS_TAG_PUNCTUATION else "_"
                   for c in str(text))[:max_len]


class EcsRunTaskFailed(RuntimeError):
    """ECS RunTask started no task; the message names each failure's reason, arn and detail."""


class GuardedEcsClient:
    """A boto ECS client whose ``run_task`` sends only tags that ECS accepts and raises ``EcsRunTaskFailed`` when
    the answer has no task; every other attribute is the wrapped client's."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def run_task(self, **params):
        if params.get("tags"):
            params["tags"] = [{"key": ecs_tag_safe(t["key"], ECS_TAG_KEY_MAX) or "_",
                               "value": ecs_tag_safe(t.get("value", ""), ECS_TAG_VALUE_MAX)} for t in params["tags"]]
        response = self._client.run_task(**params)
        if not response.get("tasks"):
            failures = response.get("failures") or []
            said = "; ".join(f"reason {f.get('reason')!r} for {f.get('arn')}"
                             + (f" ({f['detail']})" if f.get("detail") else "") for f in failures)
            raise EcsRunTaskFailed(f"ECS RunTask of {params.get('taskDefinition')} on cluster "
                                   f"{params.get('cluster')} started no task: " + (said or "no failure reported"))
        return response


class PacedLogsClient:
    """A boto CloudWatch Logs client whose ``get_log_events`` waits ``interval_s`` before each call.

    dagster-aws's CloudWatch readers (0.29) call GetLogEvents in a loop without a pause
    until the task's log stream ends, which a real account answers with throttling
    (dagster#30032, #31226); one call a second per reader is far inside the API's rate.
    Every other attribute is the wrapped client's.
    """

    def __init__(self, client, *, interval_s: float = 1.0, sleep=None):
        import time

        self._client, self.interval_s, self._sleep = client, interval_s, sleep or time.sleep

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def get_log_events(self, **params):
        if self.interval_s > 0:
            self._sleep(self.interval_s)
        return self._client.get_log_events(**params)
