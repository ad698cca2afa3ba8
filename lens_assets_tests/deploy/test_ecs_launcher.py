"""EcsLauncher's ECS traffic, offline: the RunTask request that dagster-aws's PipesECSClient sends for it, validated
against botocore's own ECS service model; the two guards of lens_assets.resources.launchers (tags ECS accepts,
dagster#28066; a RunTask answered with `failures`, dagster#32936); and the log stream Pipes reads, as the stack's
task definition names it.

The ECS client is a real botocore client answered by botocore's Stubber (which also checks every request and
answer against the model); CloudWatch Logs is a small fake, since the Pipes reader threads call it an unknown
number of times.
"""

import copy
import json
import time
import unicodedata
from types import SimpleNamespace

import boto3
import botocore.session
import dagster as dg
import pytest
from botocore.stub import Stubber
from botocore.validate import ParamValidator

from lens_assets.resources.launchers import (ECS_TAG_VALUE_MAX, EcsLauncher, EcsRunTaskFailed, GuardedEcsClient,
                                             PacedLogsClient, TrainingLauncher, ecs_tag_safe)
from lens_assets_tests.deploy.conftest import container, load_stack, resolve

# the launcher's own method, taken before any fixture here replaces it with one that returns a stubbed client
REAL_PIPES_CLIENT = EcsLauncher.pipes_client

REGION = "us-east-1"
CLUSTER_ARN = f"arn:aws:ecs:{REGION}:123456789012:cluster/lens"
TRAIN_TD_ARN = f"arn:aws:ecs:{REGION}:123456789012:task-definition/lens-train:7"
TASK_ID = "0123456789abcdef0123456789abcdef"
TASK_ARN = f"arn:aws:ecs:{REGION}:123456789012:task/lens/{TASK_ID}"
# a scoring key: "<drop>|<survey>" (lens_assets.partitions); "|" is not a character ECS takes in a tag
MULTI_KEY = "2026-11-21|des"
PARTITIONS = dg.MultiPartitionsDefinition({"drop": dg.StaticPartitionsDefinition(["2026-11-21"]),
                                           "survey": dg.StaticPartitionsDefinition(["des"])})

ECS_MODEL = botocore.session.get_session().get_service_model("ecs")
LOGS_MODEL = botocore.session.get_session().get_service_model("logs")


def assert_valid_request(model, operation: str, params: dict) -> None:
    report = ParamValidator().validate(params, model.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()


def ecs_accepts_tag_text(text: str) -> bool:
    """The ECS API reference's pattern for tag keys and values: ^([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)$ (botocore's
    validator checks types and required members, not patterns)."""
    return all(unicodedata.category(c)[0] in "LZN" or c in "_.:/=+-@" for c in text)


@pytest.fixture(autouse=True)
def _offline_aws(monkeypatch):
    """Dummy credentials and a region: clients are built, nothing is sent (Stubber answers before signing)."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", REGION), ("AWS_REGION", REGION)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # after a failed launch the Pipes message reader waits 10 s for late logs; nothing will come here
    monkeypatch.setattr("dagster._core.pipes.utils.WAIT_FOR_LOGS_AFTER_EXECUTION_INTERVAL", 0)


def stack_train_task_definition() -> dict:
    """DescribeTaskDefinition's answer for deploy/ecs/stack.yaml's training task definition (stack `lens`)."""
    template = load_stack()
    train = container(template, "TrainTaskDefinition")
    log = resolve(train["LogConfiguration"], template)
    return {"taskDefinitionArn": TRAIN_TD_ARN, "family": "lens-train", "revision": 7,
            "containerDefinitions": [{"name": train["Name"], "image": "lens-train:1",
                                      "logConfiguration": {"logDriver": log["LogDriver"],
                                                           "options": log["Options"]}}]}


class FakeLogs:
    """CloudWatch Logs as PipesCloudWatchMessageReader uses it: the stream exists and holds the job's Pipes
    messages (opened, one custom message, closed). Records every request."""

    exceptions = SimpleNamespace(ResourceNotFoundException=type("ResourceNotFound", (Exception,), {}),
                                 ThrottlingException=type("Throttling", (Exception,), {}))

    def __init__(self, lines: list[str]):
        self.lines, self.requests = lines, []

    def describe_log_streams(self, **params):
        assert_valid_request(LOGS_MODEL, "DescribeLogStreams", params)
        self.requests.append(("DescribeLogStreams", params))
        return {"logStreams": [{"logStreamName": params["logStreamNamePrefix"]}]}

    def get_log_events(self, **params):
        assert_valid_request(LOGS_MODEL, "GetLogEvents", params)
        self.requests.append(("GetLogEvents", params))
        time.sleep(0.05)
        return {"events": [{"timestamp": 0, "message": line} for line in self.lines], "nextForwardToken": "f/1"}


def pipes_lines(payload) -> list[str]:
    return [json.dumps({"__dagster_pipes_version": "0.1", "method": m, "params": p})
            for m, p in (("opened", {"extras": {}}), ("report_custom_message", {"payload": payload}),
                         ("closed", {}))]


class Launch:
    """One materialization of a multi-partitioned asset that trains through ``launcher.launch``, the launcher
    being lens_assets.definitions' own (LENS_LAUNCHER=ecs) with its Pipes client on a stubbed ECS client."""

    def __init__(self, monkeypatch, run_task_response: dict, task_stops: bool = True):
        from lens_assets.definitions import training_launcher

        for name, value in (("LENS_LAUNCHER", "ecs"), ("LENS_ECS_CLUSTER", "lens"),
                            ("LENS_ECS_TASK_DEFINITION", TRAIN_TD_ARN)):
            monkeypatch.setenv(name, value)
        self.launcher = training_launcher()
        assert isinstance(self.launcher, EcsLauncher)
        self.ecs = boto3.client("ecs", region_name=REGION)
        self.run_task_requests: list[dict] = []
        self.ecs.meta.events.register("before-parameter-build.ecs.RunTask",
                                      lambda params, **_: self.run_task_requests.append(copy.deepcopy(params)))
        self.stub = Stubber(self.ecs)
        self.stub.add_response("describe_task_definition", {"taskDefinition": stack_train_task_definition()},
                               {"taskDefinition": TRAIN_TD_ARN})
        self.stub.add_response("run_task", run_task_response)
        if task_stops:
            stopped = {"tasks": [{"taskArn": TASK_ARN, "clusterArn": CLUSTER_ARN, "lastStatus": "STOPPED",
                                  "containers": [{"name": "train", "exitCode": 0, "runtimeId": "r1"}]}]}
            for _ in range(2):  # the tasks_stopped waiter, then PipesECSClient's own DescribeTasks
                self.stub.add_response("describe_tasks", stopped, {"cluster": "lens", "tasks": [TASK_ARN]})
        self.logs = FakeLogs(pipes_lines({"summary": "trained 3 epochs"}))
        self.returned: list = []

        from dagster_aws.pipes import PipesCloudWatchMessageReader, PipesECSClient

        def pipes_client(launcher_self):
            return PipesECSClient(client=GuardedEcsClient(self.ecs),
                                  message_reader=PipesCloudWatchMessageReader(client=self.logs))

        monkeypatch.setattr(EcsLauncher, "pipes_client", pipes_client)

    def run(self):
        returned = self.returned

        @dg.asset(partitions_def=PARTITIONS)
        def trains_on_ecs(context: dg.AssetExecutionContext, launcher: TrainingLauncher) -> dg.MaterializeResult:
            returned.extend(launcher.launch(context, extras={"keys": {"out": ["models", "des"]}}))
            return dg.MaterializeResult()

        with self.stub:
            result = dg.materialize([trains_on_ecs], resources={"launcher": self.launcher}, partition_key=MULTI_KEY,
                                    raise_on_error=False)
        return result


def _error_text(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "the step did not fail"
    error = failures[0].step_failure_data.error
    texts = []
    while error is not None:
        texts.append(error.message)
        error = error.cause
    return "\n".join(texts)


RUNNING = {"tasks": [{"taskArn": TASK_ARN, "clusterArn": CLUSTER_ARN, "lastStatus": "PROVISIONING",
                      "containers": [{"name": "train"}]}], "failures": []}


@pytest.fixture(scope="module")
def successful_launch():
    """The happy path once for the tests that read it: the task starts, stops with 0, its log stream holds the
    job's Pipes messages."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", REGION), ("AWS_REGION", REGION)):
            monkeypatch.setenv(name, value)
        monkeypatch.setattr("dagster._core.pipes.utils.WAIT_FOR_LOGS_AFTER_EXECUTION_INTERVAL", 0)
        launch = Launch(monkeypatch, RUNNING)
        result = launch.run()
        launch.stub.assert_no_pending_responses()
        yield launch, result


def test_launch_sends_a_run_task_request_that_ecs_accepts(successful_launch):
    """The request as it reached boto (after PipesECSClient added its overrides and tags, and the guard its
    sanitising) is valid for ECS's RunTask per botocore's model; it overrides only the stack's training container,
    with the training module, a GPU and the Pipes bootstrap variables; no launch type (the cluster's GPU capacity
    provider is the default)."""
    launch, result = successful_launch
    assert result.success
    (request,) = launch.run_task_requests
    assert_valid_request(ECS_MODEL, "RunTask", request)
    assert request["cluster"] == "lens" and request["taskDefinition"] == TRAIN_TD_ARN and request["count"] == 1
    assert "launchType" not in request and "capacityProviderStrategy" not in request
    stack_names = {c["name"] for c in stack_train_task_definition()["containerDefinitions"]}
    (override,) = request["overrides"]["containerOverrides"]
    assert override["name"] in stack_names
    assert override["command"] == ["python", "-m", "lens_assets.resources.train_remote"]
    assert override["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"} <= {e["name"] for e in override["environment"]}


def test_a_multi_partition_key_reaches_ecs_as_a_valid_tag(successful_launch):
    """dagster#28066: PipesECSClient tags the task with the run's partition; `2026-11-21|des` is refused by ECS,
    so the guard sends `2026-11-21_des`. Every tag sent is within ECS's characters and lengths."""
    launch, _ = successful_launch
    (request,) = launch.run_task_requests
    tags = {t["key"]: t["value"] for t in request["tags"]}
    assert tags["dagster/partition"] == "2026-11-21_des"
    assert not ecs_accepts_tag_text(MULTI_KEY)  # the check below is one the raw key fails
    for key, value in tags.items():
        assert ecs_accepts_tag_text(key) and 1 <= len(key) <= 128, key
        assert ecs_accepts_tag_text(value) and len(value) <= 256, (key, value)


def test_pipes_reads_the_stream_that_the_stacks_log_options_name(successful_launch):
    """PipesECSClient reads the job's messages from <awslogs-group> and <awslogs-stream-prefix>/<container>/<task>,
    built from the stack's task definition; the custom message the job wrote there is what launch returns."""
    launch, _ = successful_launch
    reads = {(p["logGroupName"], p["logStreamName"]) for op, p in launch.logs.requests if op == "GetLogEvents"}
    assert ("/lens/train", f"train/train/{TASK_ID}") in reads
    assert launch.returned == [{"summary": "trained 3 epochs"}]


def test_run_task_failures_raise_an_error_naming_the_reason_and_the_arn(monkeypatch):
    """dagster#32936: a RunTask answered with `failures` and no task (no GPU instance could take it, say) fails the
    step with ECS's reason and arn, where dagster-aws alone fails with an IndexError on the empty task list."""
    failure = {"tasks": [], "failures": [{"arn": "arn:aws:ecs:us-east-1:123456789012:container-instance/lens/abc",
                                          "reason": "RESOURCE:GPU", "detail": "no instance with a free GPU"}]}
    launch = Launch(monkeypatch, failure, task_stops=False)
    result = launch.run()
    assert not result.success
    text = _error_text(result)
    assert "EcsRunTaskFailed" in text or "started no task" in text
    assert "RESOURCE:GPU" in text and "container-instance/lens/abc" in text and "no instance with a free GPU" in text
    launch.stub.assert_no_pending_responses()


def test_guard_raises_on_failures_and_passes_a_started_task_through():
    """GuardedEcsClient alone, on a stubbed client: a started task comes back unchanged; failures without a task
    raise EcsRunTaskFailed naming each failure; an answer with neither says so."""
    ecs = boto3.client("ecs", region_name=REGION)
    guarded = GuardedEcsClient(ecs)
    params = EcsLauncher(cluster="lens", task_definition="lens-train:7").run_task_params()
    params["tags"] = [{"key": "dagster/partition", "value": MULTI_KEY}]
    sent = {**copy.deepcopy(params), "tags": [{"key": "dagster/partition", "value": "2026-11-21_des"}]}
    with Stubber(ecs) as stub:
        stub.add_response("run_task", RUNNING, sent)
        assert guarded.run_task(**copy.deepcopy(params)) == RUNNING
        stub.add_response("run_task", {"tasks": [], "failures": [
            {"arn": "arn:aws:ecs:us-east-1:123456789012:task-definition/lens-train:7", "reason": "MISSING"},
            {"arn": "arn:aws:ecs:us-east-1:123456789012:container-instance/lens/x", "reason": "RESOURCE:MEMORY"}]})
        with pytest.raises(EcsRunTaskFailed, match=r"reason 'MISSING' for arn:aws:ecs:.*task-definition/lens-train:7;"
                                                   r" reason 'RESOURCE:MEMORY' for .*container-instance/lens/x"):
            guarded.run_task(**copy.deepcopy(params))
        stub.add_response("run_task", {"tasks": [], "failures": []})
        with pytest.raises(EcsRunTaskFailed, match="no failure reported"):
            guarded.run_task(**copy.deepcopy(params))
        stub.assert_no_pending_responses()
    assert guarded.meta.region_name == REGION  # everything else is the wrapped client's


def test_ecs_tag_safe_keeps_valid_text_and_cuts_to_the_limit():
    assert ecs_tag_safe("dagster/run-id", 128) == "dagster/run-id"
    assert ecs_tag_safe("a b+c=d.e_f:g/h@i-j", 256) == "a b+c=d.e_f:g/h@i-j"
    assert ecs_tag_safe("drop[1],x|y", 256) == "drop_1__x_y"
    assert ecs_tag_safe("tab\tnew\nline é 5", 256) == "tab_new_line é 5"  # a space and letters stay
    assert len(ecs_tag_safe("x" * 300, ECS_TAG_VALUE_MAX)) == 256


def test_the_launcher_wraps_its_ecs_client_in_the_guard_and_paces_its_log_readers():
    client = REAL_PIPES_CLIENT(EcsLauncher(cluster="lens", task_definition="lens-train", log_poll_interval_s=2.5))
    assert isinstance(client._client, GuardedEcsClient)
    assert client._client.meta.service_model.service_name == "ecs"
    logs = client._message_reader.client  # the container log readers are given this client too
    assert isinstance(logs, PacedLogsClient) and logs.interval_s == 2.5
    assert logs.meta.service_model.service_name == "logs"


def test_paced_logs_client_waits_before_each_get_log_events_and_passes_everything_else_through():
    calls = []
    inner = SimpleNamespace(get_log_events=lambda **p: calls.append(("get", p)) or {"events": [], **p},
                            describe_log_streams=lambda **p: ("described", p))
    paced = PacedLogsClient(inner, interval_s=1.0, sleep=lambda s: calls.append(("sleep", s)))
    assert paced.get_log_events(logGroupName="/lens/train", logStreamName="s") == {
        "events": [], "logGroupName": "/lens/train", "logStreamName": "s"}
    paced.get_log_events(logGroupName="/lens/train", logStreamName="s")
    assert calls == [("sleep", 1.0), ("get", {"logGroupName": "/lens/train", "logStreamName": "s"})] * 2
    assert paced.describe_log_streams(logGroupName="g") == ("described", {"logGroupName": "g"})  # not paced
    assert len(calls) == 4
    unpaced = PacedLogsClient(inner, interval_s=0.0, sleep=lambda s: calls.append(("sleep", s)))
    unpaced.get_log_events(logGroupName="g", logStreamName="s")
    assert calls[-1][0] == "get" and len(calls) == 5


def test_multi_partitioned_assets_do_not_train_through_the_launcher():
    """The other half of dagster#28066's guard: candidate_scores (and any multi-partitioned asset) runs in the run
    worker, never as an ECS Pipes task; only the training assets lens_classifier and cluster_track_b (one survey per
    partition) use the launcher."""
    from lens_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    users = set()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if "launcher" in node.assets_def.required_resource_keys:
            users.add(key.to_user_string())
            assert not isinstance(node.partitions_def, dg.MultiPartitionsDefinition), key
    assert users == {"lens_classifier", "cluster_track_b"}
    for key in ("candidate_scores", "cluster_candidates"):
        assert "launcher" not in graph.get(dg.AssetKey(key)).assets_def.required_resource_keys
