"""EcsLauncher end to end, offline: ``lens_classifier`` trains through dagster-aws's real ``PipesECSClient`` against
a local AWS mock (one moto server process: ECS, CloudWatch Logs, S3, and EC2 for the cluster's container instance).

Only the container runtime is faked. ``LocalEcs`` is the boto3 ECS client of the mock (RunTask, DescribeTasks,
DescribeTaskDefinition, StopTask and the ``tasks_stopped`` waiter all reach the mock) that also does what an ECS
agent does with a placed task: it runs the container's command (the override EcsLauncher sends, with the Pipes
bootstrap variables PipesECSClient added) as a local process with a disk of its own, ships its stdout and stderr
lines to the task's CloudWatch stream ``<awslogs-stream-prefix>/<container>/<task id>`` (what the awslogs driver
does), stops the task in the mock when the process exits, and reports the container's exit code (137 for a
SIGKILL, as Docker does) in DescribeTasks.

So everything between the asset and the job is the deployment's own code: ``training_launcher()`` and
``storage_from_env()`` from the environment, ``EcsLauncher.pipes_client`` (``GuardedEcsClient`` included), the
Pipes messages read back from CloudWatch Logs, and ``train_remote`` pulling the shards and splits from S3 and
pushing its checkpoints after every epoch. The test trains once; then a second run's task is killed after its
first checkpoint push: that attempt fails naming the exit code, and lens_classifier's retry policy (its 60 s delay
cut to 0) starts the step again, whose new task resumes from the pushed checkpoint. (``dg.materialize`` always runs
with retries enabled, so the retry is what a deployment's run does too.)

dagster-aws's ``PipesCloudWatchLogReader`` polls GetLogEvents in a loop and only notices that its session closed
when another event arrives (dagster#30032, dagster#31226): ``EcsLauncher`` paces its readers (``PacedLogsClient``,
1 s a call), and after each run one more event is written to each stream so its reader thread ends. The
``tasks_stopped`` waiter polls every
second instead of every 6.
"""

import contextlib
import copy
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from lens_assets import layout
from lens_assets.resources.launchers import TRAIN_REMOTE_MODULE
from lens_assets_tests.deploy.conftest import container, load_stack, resolve

pytestmark = pytest.mark.slow  # three training jobs over S3, each a process importing torch and Lightning

REGION = "us-east-1"
STACK = "lens"
CLUSTER = "lens"
BUCKET = "lens-e2e"
PREFIX = "data"
SURVEY = "sdss"
MEMBER = "resnet10t"
TASK_TIMEOUT_S = 240  # a task still running then is killed (and the test fails): no wait is unbounded
WAITER = {"Delay": 1, "MaxAttempts": TASK_TIMEOUT_S + 60}
DRAIN_EVENT = "[test harness] end of the stream (ends the Pipes log reader thread)"


# ------------------------------------------------------------------------------------------------ the ECS agent

# the training image's command with one change: S3Sync.push_outputs SIGKILLs the process when it has returned
DIE_AFTER_FIRST_PUSH = """
import os, signal
from lens_assets.resources import train_remote

push = train_remote.S3Sync.push_outputs


def push_then_die(self):
    push(self)
    print("pushed the first checkpoint; SIGKILL", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


train_remote.S3Sync.push_outputs = push_then_die
train_remote.main()
"""


class LocalTask:
    """One placed task: its container's command as a process here, its output shipped to CloudWatch Logs."""

    def __init__(self, ecs: "LocalEcs", task: dict, command: list[str], env: dict[str, str], disk: Path,
                 log_group: str, log_stream: str, dies_after_first_push: bool = False):
        self.ecs, self.arn, self.task_id = ecs, task["taskArn"], task["taskArn"].rsplit("/", 1)[-1]
        self.cluster = task["clusterArn"]
        self.command, self.env, self.disk = command, env, disk
        self.log_group, self.log_stream = log_group, log_stream
        self.runtime_id = f"local-{self.task_id}"
        self.exit_code: int | None = None
        self.dies_after_first_push = dies_after_first_push
        self.killed_after_push = False  # SIGKILLed right after its first checkpoint push, as planned
        self.timed_out = False
        self.lines: list[str] = []
        disk.mkdir(parents=True)
        ecs.logs.create_log_stream(logGroupName=log_group, logStreamName=log_stream)  # as the awslogs driver does
        if dies_after_first_push:  # the image's command, with S3Sync.push_outputs SIGKILLing the process once done
            assert command == ["python", "-m", TRAIN_REMOTE_MODULE], command
            command = ["python", "-c", DIE_AFTER_FIRST_PUSH]
        self.proc = subprocess.Popen(command, env=env, cwd=disk, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self._shippers = [threading.Thread(target=self._ship, args=(stream,), daemon=True)
                          for stream in (self.proc.stdout, self.proc.stderr)]
        for t in self._shippers:
            t.start()
        self._agent = threading.Thread(target=self._supervise, daemon=True)
        self._agent.start()

    def _ship(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                continue
            self.lines.append(line)
            self.ecs.logs.put_log_events(logGroupName=self.log_group, logStreamName=self.log_stream,
                                         logEvents=[{"timestamp": int(time.time() * 1000), "message": line}])
        stream.close()

    def _supervise(self) -> None:
        deadline = time.monotonic() + TASK_TIMEOUT_S
        try:
            while self.proc.poll() is None:
                if time.monotonic() > deadline:
                    self.timed_out = True
                    break
                time.sleep(0.1)
        finally:
            if self.proc.poll() is None:  # the deadline, or this thread failing: the task ends here
                self.proc.send_signal(signal.SIGKILL)
            rc = self.proc.wait()
            self.killed_after_push = self.dies_after_first_push and rc == -signal.SIGKILL and not self.timed_out
            for t in self._shippers:  # every line is in the stream before the task is seen stopped
                t.join(timeout=30)
            self.exit_code = 128 - rc if rc < 0 else rc  # a signal's exit status as Docker reports it (SIGKILL: 137)
            self.ecs.client.stop_task(cluster=self.cluster, task=self.arn, reason="Essential container in task exited")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._agent.join(timeout=30)


class _BoundedWaiter:
    """A botocore waiter of the mock's client, polling every ``WAITER["Delay"]`` seconds at most
    ``WAITER["MaxAttempts"]`` times whatever the caller asked (PipesECSClient: every 6 s for 70 days)."""

    def __init__(self, waiter):
        self._waiter = waiter
        self.requested_configs: list = []

    def wait(self, **params):
        self.requested_configs.append(params.pop("WaiterConfig", None))
        return self._waiter.wait(**params, WaiterConfig=dict(WAITER))


class LocalEcs:
    """The mock's boto3 ECS client, with an ECS agent on this machine: ``run_task`` places the task in the mock and
    starts its container here; ``describe_tasks`` adds the container's state and exit code to the mock's answer.
    Every other call is the mock's."""

    def __init__(self, client, logs, workdir: Path):
        self.client, self.logs, self.workdir = client, logs, workdir
        self.tasks: dict[str, LocalTask] = {}
        self.run_task_requests: list[dict] = []
        self.waiters: list[_BoundedWaiter] = []
        self._die_after_first_push = False

    def __getattr__(self, name):
        return getattr(self.client, name)

    def kill_next_task_after_its_first_push(self) -> None:
        """The next task started SIGKILLs itself as soon as its first checkpoint push has returned (a reclaimed
        instance at the worst moment for a run that did not push: deterministic, whatever the machine's speed)."""
        self._die_after_first_push = True

    def run_task(self, **params):
        self.run_task_requests.append(copy.deepcopy(params))
        response = self.client.run_task(**params)
        definition = self.client.describe_task_definition(taskDefinition=params["taskDefinition"])["taskDefinition"]
        (spec,) = definition["containerDefinitions"]  # the stack's training task definition has one container
        overrides = {o["name"]: o for o in params.get("overrides", {}).get("containerOverrides", [])}
        override = overrides.get(spec["name"], {})
        log = spec["logConfiguration"]
        assert log["logDriver"] == "awslogs", log
        for task in response["tasks"]:
            task_id = task["taskArn"].rsplit("/", 1)[-1]
            disk = self.workdir / task_id
            env = {  # the image's (deploy/images/train.Dockerfile), the task's role, the definition's, the override's
                "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(disk),
                "PYTHONUNBUFFERED": "1", "LENS_CACHE_DIR": str(disk / "cache"),
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": str(disk / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(disk / "none"),
                **{e["name"]: e["value"] for e in spec.get("environment", [])},
                **{e["name"]: e["value"] for e in override.get("environment", [])},
            }
            self.tasks[task["taskArn"]] = LocalTask(
                self, task, override.get("command") or spec["command"], env, disk,
                log_group=log["options"]["awslogs-group"],
                log_stream=f"{log['options']['awslogs-stream-prefix']}/{spec['name']}/{task_id}",
                dies_after_first_push=self._die_after_first_push)
            self._die_after_first_push = False
        return response

    def describe_tasks(self, **params):
        response = self.client.describe_tasks(**params)
        for task in response["tasks"]:
            local = self.tasks.get(task["taskArn"])
            if local is None:
                continue
            stopped = task["lastStatus"] == "STOPPED" and local.exit_code is not None
            if stopped:
                task["stopCode"] = "EssentialContainerExited"
            for c in task["containers"]:
                c["runtimeId"] = local.runtime_id
                c["lastStatus"] = "STOPPED" if stopped else "RUNNING"
                c.pop("exitCode", None)  # the mock says 0 from the start
                if stopped:
                    c["exitCode"] = local.exit_code
        return response

    def stop_task(self, **params):
        for local in self.tasks.values():
            if local.arn == params["task"] or local.task_id == params["task"]:
                with contextlib.suppress(ProcessLookupError):
                    local.proc.terminate()
        return self.client.stop_task(**params)

    def get_waiter(self, name):
        waiter = _BoundedWaiter(self.client.get_waiter(name))
        self.waiters.append(waiter)
        return waiter

    def close(self) -> None:
        for local in self.tasks.values():
            local.kill()


# ------------------------------------------------------------------------------------------------ the mock

def _moto_api(endpoint: str, path: str, body: dict) -> None:
    request = urllib.request.Request(endpoint + path, data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(request, timeout=10).close()


def _train_task_definition() -> dict:
    """RegisterTaskDefinition's request for deploy/ecs/stack.yaml's TrainTaskDefinition (stack ``lens``), with test
    values for its image, CPU and memory parameters (the mock's container instance has 4 vCPU, 7.3 GiB)."""
    template = load_stack()
    props = template["Resources"]["TrainTaskDefinition"]["Properties"]
    train = container(template, "TrainTaskDefinition")
    log = resolve(train["LogConfiguration"], template, stack_name=STACK, region=REGION)
    return {
        "family": resolve(props["Family"], template, stack_name=STACK, region=REGION),
        "requiresCompatibilities": props["RequiresCompatibilities"], "networkMode": props["NetworkMode"],
        "containerDefinitions": [{
            "name": train["Name"], "image": "lens-train:test", "essential": train["Essential"],
            "command": train["Command"], "cpu": 1024, "memory": 4096,
            "resourceRequirements": [{"type": r["Type"], "value": r["Value"]} for r in train["ResourceRequirements"]],
            "environment": [{"name": e["Name"], "value": resolve(e["Value"], template, stack_name=STACK,
                                                                  region=REGION)} for e in train["Environment"]],
            "logConfiguration": {"logDriver": log["LogDriver"], "options": log["Options"]},
        }],
    }


@pytest.fixture
def aws(tmp_path, monkeypatch):
    """The moto server with the stack's cluster (an EC2 container instance), training task definition and log group,
    and an empty bucket; ``boto3.client`` gives ``LocalEcs`` for ECS and the mock's CloudWatch Logs client, both on
    the mock. Yields (endpoint, LocalEcs, task definition); the server and every task process end afterwards."""
    import boto3

    from lens_assets_tests.helpers import MOTO_SERVER, start_moto, stop_moto

    if not MOTO_SERVER.exists():
        pytest.skip(f"{MOTO_SERVER} not installed (pip install 'moto[server]')")
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", REGION), ("AWS_REGION", REGION),
                        ("AWS_CONFIG_FILE", str(tmp_path / "none")),
                        ("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))):
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_ENDPOINT_URL_ECS", "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"):
        monkeypatch.delenv(name, raising=False)
    proc, endpoint = start_moto(tmp_path / "moto.log")
    ecs = None
    try:
        # the mock's tasks advance a state on every DescribeTasks by default; here only StopTask stops one
        _moto_api(endpoint, "/moto-api/state-manager/set-transition",
                  {"model_name": "ecs::task", "transition": {"progression": "manual", "times": 10**9}})
        real_client = boto3.client
        ec2 = real_client("ec2", endpoint_url=endpoint)
        raw_ecs = real_client("ecs", endpoint_url=endpoint)
        raw_ecs.create_cluster(clusterName=CLUSTER)
        image = ec2.describe_images()["Images"][0]["ImageId"]
        instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="g4dn.xlarge")
        raw_ecs.register_container_instance(cluster=CLUSTER, instanceIdentityDocument=json.dumps(
            {"instanceId": instance["Instances"][0]["InstanceId"]}))
        definition = raw_ecs.register_task_definition(**_train_task_definition())["taskDefinition"]
        logs = real_client("logs", endpoint_url=endpoint)
        logs.create_log_group(logGroupName=definition["containerDefinitions"][0]["logConfiguration"]["options"][
            "awslogs-group"])
        real_client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        ecs = LocalEcs(raw_ecs, logs, tmp_path / "ecs-tasks")

        def client(service_name, *args, **kwargs):
            if service_name == "ecs":
                return ecs
            if service_name == "logs":
                return real_client("logs", *args, **{"endpoint_url": endpoint, **kwargs})
            return real_client(service_name, *args, **kwargs)

        monkeypatch.setattr(boto3, "client", client)
        yield endpoint, ecs, definition
    finally:
        if ecs is not None:
            ecs.close()
        stop_moto(proc)


@pytest.fixture
def log_readers(aws, monkeypatch):
    """Every PipesCloudWatchLogReader started, so that each run's reader thread can be ended (``drain``); any still
    running at the end (a test that failed half-way) are ended before the server stops."""
    from dagster_aws.pipes.message_readers import PipesCloudWatchLogReader

    started = []
    start = PipesCloudWatchLogReader.start

    def recording_start(self, params, is_session_closed):
        started.append(self)
        return start(self, params, is_session_closed)

    monkeypatch.setattr(PipesCloudWatchLogReader, "start", recording_start)
    yield started
    with contextlib.suppress(Exception):
        drain(started, aws[1].logs)


def drain(readers: list, logs) -> None:
    """One more event in the stream of each reader still running: it sees its session closed and ends."""
    for reader in readers:
        if reader.thread is not None and reader.thread.is_alive():
            logs.put_log_events(logGroupName=reader.log_group, logStreamName=reader.log_stream,
                                logEvents=[{"timestamp": int(time.time() * 1000), "message": DRAIN_EVENT}])
    for reader in readers:
        if reader.thread is not None:
            reader.thread.join(timeout=30)
            assert not reader.thread.is_alive(), f"the Pipes log reader of {reader.log_stream} did not end"


# ------------------------------------------------------------------------------------------------ the test

@pytest.fixture
def inputs(tmp_path):
    """Shards of 32 simulated SDSS cutouts and their splits (as lens_assets_tests/ml/test_train.py makes them)."""
    from lens_assets.science.splits import make_splits
    from lens_assets_tests.helpers import make_sdss_shards

    root = tmp_path / "inputs"
    catalog = make_sdss_shards(root, n=32, seed=4)
    make_splits(catalog, reference_band="r", seed=0, min_groups_per_stratum=3).table.to_parquet(
        root / "splits.parquet")
    return root


def _error_text(result, event_type: str = "STEP_FAILURE") -> str:
    """The messages of the errors (and their causes) of the run's ``event_type`` events."""
    texts = []
    for event in (e for e in result.all_events if e.event_type_value == event_type):
        error = event.event_specific_data.error
        while error is not None:
            texts.append(error.message)
            error = error.cause
    return "\n".join(texts) or f"no {event_type} event"


def test_lens_classifier_trains_on_ecs_through_pipes_and_resumes_after_a_killed_task(
        aws, log_readers, inputs, tmp_path, monkeypatch):
    import boto3

    from lens_assets.assets.shards import dataset_splits, psf_matched_shards
    from lens_assets.assets.training import lens_classifier
    from lens_assets.definitions import storage_from_env, training_launcher
    from lens_assets.resources.launchers import TRAIN_REMOTE_MODULE, EcsLauncher, GuardedEcsClient
    from lens_assets.resources.s3_storage import S3Storage

    endpoint, ecs, definition = aws
    # a killed task's session has no `closed` message: wait 1 s (not 10) for late messages before failing the step
    monkeypatch.setattr("dagster._core.pipes.utils.WAIT_FOR_LOGS_AFTER_EXECUTION_INTERVAL", 1)
    # lens_classifier's own retry policy (one retry), without its 60 s delay
    assert lens_classifier.op.retry_policy.max_retries == 1
    monkeypatch.setattr(dg.RetryPolicy, "calculate_delay", lambda self, attempt_num: 0)
    for name, value in (("LENS_DATA_ROOT", f"s3://{BUCKET}/{PREFIX}"), ("LENS_S3_ENDPOINT_URL", endpoint),
                        ("LENS_LAUNCHER", "ecs"), ("LENS_ECS_CLUSTER", CLUSTER),
                        ("LENS_ECS_TASK_DEFINITION", definition["family"])):
        monkeypatch.setenv(name, value)

    # the upstream assets' files, published to the bucket by another machine
    producer = S3Storage(root=str(tmp_path / "producer"), url_root=f"s3://{BUCKET}/{PREFIX}", endpoint_url=endpoint)
    with producer.staged_dir("shards") as staged:
        for f in (inputs / "shards").iterdir():
            (staged / f.name).write_bytes(f.read_bytes())
        producer.publish_dir(staged, *layout.shards_dir(SURVEY))
    splits = producer.path(*layout.splits_table(SURVEY))
    splits.parent.mkdir(parents=True)
    splits.write_bytes((inputs / "splits.parquet").read_bytes())
    producer.push(*layout.splits_table(SURVEY))

    s3 = boto3.client("s3", endpoint_url=endpoint)
    member_key = "/".join((PREFIX, *layout.member_dir(SURVEY, MEMBER)))

    def etag(name: str) -> str | None:
        try:
            return s3.head_object(Bucket=BUCKET, Key=f"{member_key}/{name}")["ETag"]
        except s3.exceptions.ClientError:
            return None

    def bucket_member_files() -> set[str]:
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=member_key + "/").get("Contents", [])
        return {o["Key"][len(member_key) + 1:] for o in listed}

    runs = []

    def materialize(epochs: int):
        """lens_classifier once, as the deployment's code location builds its resources (an orchestrator cache of
        its own per run)."""
        monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / f"orchestrator-{len(runs)}"))
        storage, launcher = storage_from_env(), training_launcher()
        assert isinstance(storage, S3Storage) and isinstance(launcher, EcsLauncher)
        assert isinstance(launcher.pipes_client()._client, GuardedEcsClient)  # noqa: SLF001
        instance = dg.DagsterInstance.ephemeral()
        t0 = time.monotonic()
        result = dg.materialize(
            [psf_matched_shards.to_source_asset(), dataset_splits.to_source_asset(), lens_classifier],
            partition_key=SURVEY, resources={"storage": storage, "launcher": launcher}, instance=instance,
            run_config={"ops": {"lens_classifier": {"config": {
                "members": [MEMBER], "epochs": epochs, "batch_size": 8, "patience": 10}}}},
            raise_on_error=False)
        drain(log_readers, ecs.logs)
        runs.append(time.monotonic() - t0)
        task = list(ecs.tasks.values())[-1]
        assert not task.timed_out, f"task {task.task_id} ran over {TASK_TIMEOUT_S} s:\n" + "\n".join(task.lines[-30:])
        logged = [e.user_message for e in instance.all_logs(result.run_id)]
        return result, storage, task, logged

    def metadata(result) -> dict:
        (mat,) = result.asset_materializations_for_node("lens_classifier")
        return {k: v.value for k, v in mat.metadata.items()}

    def custom_messages(task) -> list:
        """The Pipes custom messages the job wrote, as they are in the task's CloudWatch stream on the mock."""
        events = ecs.logs.get_log_events(logGroupName=task.log_group, logStreamName=task.log_stream,
                                         startFromHead=True)["events"]
        messages = []
        for e in events:
            with contextlib.suppress(ValueError):
                messages.append(json.loads(e["message"]))
        return [m["params"]["payload"] for m in messages if isinstance(m, dict)
                and "__dagster_pipes_version" in m and m.get("method") == "report_custom_message"]

    # 1. a fresh member: the ECS task pulls the inputs, trains one epoch, pushes its checkpoints; the asset's
    #    metadata is the job's Pipes summary, read back from CloudWatch Logs
    result, storage, task, logged = materialize(epochs=1)
    assert result.success, _error_text(result)
    assert task.exit_code == 0 and not task.killed_after_push
    (request,) = ecs.run_task_requests
    (override,) = request["overrides"]["containerOverrides"]
    assert override["command"] == ["python", "-m", TRAIN_REMOTE_MODULE] == task.command
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"} <= set(task.env)
    assert task.log_stream == f"train/train/{task.task_id}" and task.log_group == f"/{STACK}/train"
    assert ecs.waiters and ecs.waiters[0].requested_configs == [{"Delay": 6, "MaxAttempts": 1000000}]
    meta = metadata(result)
    (summary,) = custom_messages(task)
    assert meta[f"{MEMBER}/epochs_run"] == summary["epochs_run"] == 1
    assert meta[f"{MEMBER}/resumed_after_epochs"] == 0 and summary["resumed_after_epochs"] is None
    assert meta[f"{MEMBER}/best_val_auroc"] == summary["best_val_auroc"] and 0.0 <= summary["best_val_auroc"] <= 1.0
    assert meta[f"{MEMBER}/batch_size"] == summary["batch_size"] == 8 and meta[f"{MEMBER}/device"] == "cpu"
    assert meta[f"{MEMBER}/val_auroc_by_epoch"] == summary["val_auroc_by_epoch"]
    assert summary["best_checkpoint"].startswith(str(task.disk / "cache"))  # trained on the task's own disk
    assert any(f"training {MEMBER} for 1 epochs into {task.disk / 'cache'}" in m for m in logged)  # its Pipes log
    assert {"best.ckpt", "last.ckpt", "run.json", "summary.json"} <= bucket_member_files()
    best = s3.get_object(Bucket=BUCKET, Key=f"{member_key}/best.ckpt")["Body"].read()
    assert hashlib.sha256(best).hexdigest() == meta[f"{MEMBER}/checkpoint_sha256"]
    assert storage.path(*layout.member_dir(SURVEY, MEMBER), "best.ckpt").read_bytes() == best  # pulled back
    job_shards = task.disk / "cache" / "store" / "shards" / SURVEY
    assert sorted(p.name for p in job_shards.iterdir()) == sorted(p.name for p in (inputs / "shards").iterdir())
    assert [p.name for p in storage.path(*layout.shards_dir(SURVEY)).iterdir()] == ["manifest.json"]

    # 2. a run whose task is SIGKILLed (a reclaimed spot instance, say) once it has pushed its first checkpoint:
    #    ECS reports exit code 137 and the step's attempt fails; lens_classifier's retry policy starts the step again,
    #    and the new task, on a fresh disk, resumes from the checkpoint in the bucket. The killed task had resumed
    #    after run 1's one epoch and pushed once it had trained the second: the checkpoint has 2 epochs done.
    before = {name: etag(name) for name in ("last.ckpt", "run.json")}
    ecs.kill_next_task_after_its_first_push()
    result, storage, resumed, logged = materialize(epochs=3)
    assert result.success, _error_text(result)
    killed = list(ecs.tasks.values())[-2]
    assert killed.killed_after_push and killed.exit_code == 137, killed.lines[-30:]
    assert "pushed the first checkpoint; SIGKILL" in killed.lines
    assert all(etag(name) not in (None, before[name]) for name in before)  # run 1's checkpoint was replaced
    failed = _error_text(result, "STEP_UP_FOR_RETRY")  # dagster-aws names the container's runtime id, not its code
    assert "Some ECS containers finished with non-zero exit code" in failed and killed.runtime_id in failed
    (described,) = ecs.describe_tasks(cluster=CLUSTER, tasks=[killed.arn])["tasks"]
    assert described["lastStatus"] == "STOPPED" and described["containers"][0]["exitCode"] == 137
    assert not custom_messages(killed)  # it never got to report a summary
    assert resumed.exit_code == 0 and resumed.disk != killed.disk and len(ecs.tasks) == 3
    meta = metadata(result)
    (summary,) = custom_messages(resumed)
    assert meta[f"{MEMBER}/resumed_after_epochs"] == summary["resumed_after_epochs"] == 2
    assert meta[f"{MEMBER}/epochs_run"] == summary["epochs_run"] == 3
    assert [e["epoch"] for e in meta[f"{MEMBER}/val_auroc_by_epoch"]] == [0, 1, 2]
    assert any(f"training {MEMBER} for 3 epochs into {resumed.disk / 'cache'}" in m for m in logged)
    last = s3.get_object(Bucket=BUCKET, Key=f"{member_key}/last.ckpt")["Body"].read()
    assert storage.path(*layout.member_dir(SURVEY, MEMBER), "last.ckpt").read_bytes() == last
    print(f"materializations took {', '.join(f'{s:.1f}' for s in runs)} s")
