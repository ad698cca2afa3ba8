"""deploy/ecs/stack.yaml: cfn-lint, and what the rest of the deployment expects of it (container names, log
options, variables, Service Connect), least-privilege IAM, a private encrypted database and bucket, and a UI that is
never reachable without a login."""

import subprocess
from pathlib import Path

import pytest

from lens_assets_tests.deploy.conftest import (PROD_INSTANCE, STACK, WORKSPACE, container, env_refs, load_stack,
                                               load_yaml, required_tool, resolve, resources_of_type)


@pytest.fixture(scope="module")
def template() -> dict:
    return load_stack()


def _cfn_lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([required_tool("cfn-lint"), "--format", "parseable", "--", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_cfn_lint_finds_nothing():
    done = _cfn_lint(STACK)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cfn_lint_does_fail_a_broken_stack(tmp_path):
    """The lint is not a no-op: a wrong property type and an unknown resource property are reported."""
    broken = tmp_path / "stack.yaml"
    text = STACK.read_text()
    text = text.replace("      StorageEncrypted: true", "      StorageEncrypted: maybe", 1)
    text = text.replace("      NetworkMode: bridge", "      NetworkMode: bridge\n      GpuCount: 1", 1)
    broken.write_text(text)
    done = _cfn_lint(broken)
    assert done.returncode != 0
    assert "StorageEncrypted" in done.stdout or "maybe" in done.stdout, done.stdout
    assert "GpuCount" in done.stdout, done.stdout


# ------------------------------------------------------------------------------------- what the code expects


def test_training_task_definition_matches_what_the_ecs_launcher_sends(template):
    """EcsLauncher overrides the container `container_name` with the training module and a GPU, and sends no
    awsvpc configuration (lens_assets.definitions gives it none): so the task definition's container has that
    name, the bridge network, a GPU; and awslogs with both awslogs-group and awslogs-stream-prefix, from which
    PipesECSClient makes the stream it reads the Pipes messages from."""
    from lens_assets.resources.launchers import TRAIN_REMOTE_MODULE, EcsLauncher

    props = template["Resources"]["TrainTaskDefinition"]["Properties"]
    train = container(template, "TrainTaskDefinition")
    assert train["Name"] == EcsLauncher.model_fields["container_name"].default
    assert train["Command"] == ["python", "-m", TRAIN_REMOTE_MODULE]
    assert props["RequiresCompatibilities"] == ["EC2"] and props["NetworkMode"] == "bridge"
    assert train["ResourceRequirements"] == [{"Type": "GPU", "Value": str(EcsLauncher.model_fields["gpu_count"]
                                                                           .default)}]
    log = resolve(train["LogConfiguration"], template)
    assert log["LogDriver"] == "awslogs"
    assert {"awslogs-group", "awslogs-stream-prefix", "awslogs-region"} <= set(log["Options"])
    assert log["Options"]["awslogs-group"] == "/lens/train"
    assert props["Family"] == {"Fn::Sub": "${AWS::StackName}-train"}


def test_run_task_definition_is_the_one_the_run_launcher_is_given(template):
    launcher = load_yaml(PROD_INSTANCE)["run_launcher"]["config"]
    run = container(template, "RunTaskDefinition")
    assert run["Name"] == launcher["container_name"]
    assert template["Resources"]["RunTaskDefinition"]["Properties"]["RequiresCompatibilities"] == ["FARGATE"]
    variable = launcher["task_definition"]["env"]
    for task in ("WebserverTaskDefinition", "DaemonTaskDefinition"):
        env = {e["Name"]: e["Value"] for e in container(template, task)["Environment"]}
        assert env[variable] == {"Ref": "RunTaskDefinition"}, task


@pytest.mark.parametrize("task", ["WebserverTaskDefinition", "DaemonTaskDefinition", "CodeTaskDefinition",
                                  "RunTaskDefinition"])
def test_dagster_containers_get_every_variable_the_instance_reads(template, task):
    """Each container that loads deploy/dagster.yaml has every `{env: X}` of it, the password from Secrets
    Manager (never a plain variable); the code server and the run workers also get the launcher's settings that
    lens_assets.definitions reads."""
    spec = container(template, task)
    env = {e["Name"] for e in spec.get("Environment", [])}
    secrets = {s["Name"]: s["ValueFrom"] for s in spec.get("Secrets", [])}
    missing = env_refs(load_yaml(PROD_INSTANCE)) - env - set(secrets)
    assert not missing, f"{task} lacks {sorted(missing)}"
    assert "DAGSTER_POSTGRES_PASSWORD" not in env
    assert secrets["DAGSTER_POSTGRES_PASSWORD"] == {"Fn::Sub": "${Database.MasterUserSecret.SecretArn}:password::"}
    if task in ("CodeTaskDefinition", "RunTaskDefinition"):
        values = {e["Name"]: e["Value"] for e in spec["Environment"]}
        assert values["LENS_LAUNCHER"] == "ecs"
        assert values["LENS_ECS_CLUSTER"] == {"Ref": "Cluster"}
        assert values["LENS_ECS_TASK_DEFINITION"] == {"Ref": "TrainTaskDefinition"}
        assert values["LENS_DATA_ROOT"] == {"Fn::Sub": "s3://${DataBucket}/data"}
    if task == "DaemonTaskDefinition":
        assert spec["Command"] == ["start-daemon"]
        assert {"Name": "DAGSTER_GPU_POOL_LIMIT", "Value": {"Ref": "GpuPoolLimit"}} in spec["Environment"]


def test_code_server_answers_where_the_workspace_looks(template):
    """Service Connect gives the code service the name and port of deploy/workspace.yaml, so one workspace file
    serves compose and ECS; the webserver and the daemon are Service Connect clients."""
    (entry,) = load_yaml(WORKSPACE)["load_from"]
    grpc = entry["grpc_server"]
    code = template["Resources"]["CodeService"]["Properties"]["ServiceConnectConfiguration"]
    (service,) = code["Services"]
    assert service["ClientAliases"] == [{"DnsName": grpc["host"], "Port": grpc["port"]}]
    (mapping,) = container(template, "CodeTaskDefinition")["PortMappings"]
    assert (mapping["Name"], mapping["ContainerPort"]) == (service["PortName"], grpc["port"])
    command = container(template, "CodeTaskDefinition")["Command"]
    assert command[command.index("-p") + 1] == str(grpc["port"])
    for name in ("DaemonService", "WebserverService", "WebserverServiceBehindAlb"):
        assert template["Resources"][name]["Properties"]["ServiceConnectConfiguration"]["Enabled"] is True


def test_training_lands_on_the_gpu_capacity_provider(template):
    """EcsLauncher (no capacity_provider configured) sends neither a launch type nor a strategy, so the cluster's
    default strategy applies: the GPU provider, whose group scales out from zero for a waiting task."""
    from lens_assets.resources.launchers import EcsLauncher

    params = EcsLauncher(cluster="lens", task_definition="lens-train").run_task_params()
    assert "launchType" not in params and "capacityProviderStrategy" not in params
    assoc = template["Resources"]["ClusterCapacityProviders"]["Properties"]
    assert assoc["DefaultCapacityProviderStrategy"] == [{"CapacityProvider": {"Ref": "GpuCapacityProvider"},
                                                          "Weight": 1}]
    provider = template["Resources"]["GpuCapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert provider["ManagedScaling"]["Status"] == "ENABLED"
    group = template["Resources"]["GpuAutoScalingGroup"]["Properties"]
    assert group["MinSize"] == "0" and group["NewInstancesProtectedFromScaleIn"] is True
    assert "gpu" in template["Parameters"]["GpuAmiId"]["Default"]
    user_data = template["Resources"]["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    assert "ECS_ENABLE_GPU_SUPPORT=true" in user_data["Fn::Base64"]["Fn::Sub"]
    # the Dagster services and the run workers are Fargate, never on the GPU instances
    for name, service in resources_of_type(template, "AWS::ECS::Service").items():
        assert service["Properties"]["LaunchType"] == "FARGATE", name
    for task in ("WebserverTaskDefinition", "DaemonTaskDefinition", "CodeTaskDefinition", "RunTaskDefinition"):
        assert template["Resources"][task]["Properties"]["RequiresCompatibilities"] == ["FARGATE"]
        assert "ResourceRequirements" not in container(template, task)


# ------------------------------------------------------------------------------------------------ security


def _statements(template: dict) -> dict[str, list[dict]]:
    """Every IAM statement, by the role or managed policy that holds it."""
    out: dict[str, list[dict]] = {}
    for name, r in template["Resources"].items():
        if r["Type"] == "AWS::IAM::Role":
            for policy in r["Properties"].get("Policies", []):
                out.setdefault(name, []).extend(policy["PolicyDocument"]["Statement"])
        elif r["Type"] == "AWS::IAM::ManagedPolicy":
            out.setdefault(name, []).extend(r["Properties"]["PolicyDocument"]["Statement"])
    return out


def _as_list(x):
    return x if isinstance(x, list) else [x]


# actions that IAM cannot scope to a resource
UNSCOPABLE = {"ecs:DescribeTaskDefinition", "ec2:DescribeNetworkInterfaces", "ssmmessages:CreateControlChannel",
              "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel"}


def test_iam_is_least_privilege(template):
    for holder, statements in _statements(template).items():
        for st in statements:
            assert st["Effect"] == "Allow", holder
            actions = _as_list(st["Action"])
            for action in actions:
                assert "*" not in action, f"{holder}: wildcard action {action}"
            if st["Resource"] == "*":
                assert set(actions) <= UNSCOPABLE, f"{holder}: {actions} on every resource"
            if "ecs:RunTask" in actions:
                assert "task-definition/${AWS::StackName}-" in st["Resource"]["Fn::Sub"], holder
                assert st["Condition"] == {"ArnEquals": {"ecs:cluster": {"Fn::GetAtt": ["Cluster", "Arn"]}}}
            if "iam:PassRole" in actions:
                assert all("Fn::GetAtt" in r for r in _as_list(st["Resource"])), holder
                assert st["Condition"] == {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}}
            if "ecs:TagResource" in actions:
                assert st["Condition"] == {"StringEquals": {"ecs:CreateAction": "RunTask"}}


def _actions_and_resources(statements: list[dict]) -> dict[str, list]:
    out: dict[str, list] = {}
    for st in statements:
        for action in _as_list(st["Action"]):
            out.setdefault(action, []).extend(_as_list(st["Resource"]))
    return out


def test_run_worker_may_do_what_pipes_ecs_needs_and_pass_only_the_training_roles(template):
    """A run worker starts the training task (PipesECSClient: DescribeTaskDefinition, RunTask, DescribeTasks via
    the waiter, StopTask on interruption) and reads its CloudWatch stream; it may pass the training task's roles
    and no other."""
    granted = _actions_and_resources(_statements(template)["RunTaskRole"])
    for action in ("ecs:RunTask", "ecs:DescribeTasks", "ecs:StopTask", "ecs:DescribeTaskDefinition",
                   "ecs:TagResource", "logs:GetLogEvents", "logs:DescribeLogStreams", "iam:PassRole"):
        assert action in granted, action
    assert granted["iam:PassRole"] == [{"Fn::GetAtt": ["TrainTaskRole", "Arn"]},
                                       {"Fn::GetAtt": ["TaskExecutionRole", "Arn"]}]
    assert {"Fn::GetAtt": ["TrainLogGroup", "Arn"]} in granted["logs:GetLogEvents"]
    run_task = granted["ecs:RunTask"]
    assert run_task == [{"Fn::Sub": "arn:${AWS::Partition}:ecs:${AWS::Region}:${AWS::AccountId}:task-definition/"
                                    "${AWS::StackName}-train:*"}]
    orchestrator = _actions_and_resources(_statements(template)["OrchestratorPolicy"])
    assert orchestrator["iam:PassRole"] == [{"Fn::GetAtt": ["RunTaskRole", "Arn"]},
                                            {"Fn::GetAtt": ["TaskExecutionRole", "Arn"]}]
    assert "-run:*" in orchestrator["ecs:RunTask"][0]["Fn::Sub"]
    # the training task itself reaches only the data
    assert set(_actions_and_resources(_statements(template)["TrainTaskRole"])) == {
        "s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}


@pytest.mark.parametrize("role", ["CodeTaskRole", "RunTaskRole"])
def test_the_tasks_that_log_through_dagster_may_write_their_compute_logs(template, role):
    """Runs (run worker) and sensor and schedule ticks (code server: their context.log) upload their logs with the
    instance's S3ComputeLogManager under DAGSTER_COMPUTE_LOGS_PREFIX; without the grant the UI shows none."""
    logs = {"Fn::Sub": "${DataBucket.Arn}/dagster/compute-logs/*"}
    granted = _actions_and_resources(_statements(template)[role])
    assert logs in granted["s3:PutObject"] and logs in granted["s3:GetObject"]
    listing = [st for st in _statements(template)[role] if "s3:ListBucket" in _as_list(st["Action"])]
    assert any("dagster/compute-logs/*" in _as_list(st["Condition"]["StringLike"]["s3:prefix"]) for st in listing)
    prefixes = {e["Value"] for r in template["Resources"].values() if r["Type"] == "AWS::ECS::TaskDefinition"
                for c in r["Properties"]["ContainerDefinitions"] for e in c.get("Environment", [])
                if e["Name"] == "DAGSTER_COMPUTE_LOGS_PREFIX"}
    assert prefixes == {"dagster/compute-logs"}


def test_database_is_private_encrypted_and_its_password_is_in_secrets_manager(template):
    db = template["Resources"]["Database"]
    props = db["Properties"]
    assert props["PubliclyAccessible"] is False and props["StorageEncrypted"] is True
    assert props["ManageMasterUserPassword"] is True and "MasterUserPassword" not in props
    assert props["DeletionProtection"] is True and db["DeletionPolicy"] == "Snapshot"
    ingress = template["Resources"]["DatabaseSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert [(i["FromPort"], i["SourceSecurityGroupId"]) for i in ingress] == [(5432, {"Ref": "TasksSecurityGroup"})]
    assert template["Resources"]["DatabaseSubnetGroup"]["Properties"]["SubnetIds"] == {"Ref": "PrivateSubnetIds"}


def test_bucket_is_private_and_encrypted(template):
    props = template["Resources"]["DataBucket"]["Properties"]
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("aws:kms", "AES256")
    assert props["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    (deny,) = template["Resources"]["DataBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_webserver_is_never_reachable_without_authentication(template):
    """Every task is in the private subnets without a public address; the only listener that forwards to the
    webserver authenticates first (OIDC) and the other only redirects to it; only the ALB's group is open to the
    internet, and the webserver's port only to the ALB."""
    for name, service in resources_of_type(template, "AWS::ECS::Service").items():
        vpc = service["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert vpc["AssignPublicIp"] == "DISABLED" and vpc["Subnets"] == {"Ref": "PrivateSubnetIds"}, name
    assert "LoadBalancers" not in template["Resources"]["WebserverService"]["Properties"]
    behind = template["Resources"]["WebserverServiceBehindAlb"]
    assert behind["Condition"] == "CreateAlb" and template["Resources"]["WebserverService"]["Condition"] == "NoAlb"
    listeners = resources_of_type(template, "AWS::ElasticLoadBalancingV2::Listener")
    assert not resources_of_type(template, "AWS::ElasticLoadBalancingV2::ListenerRule")
    forwarding = 0
    for name, listener in listeners.items():
        actions = sorted(listener["Properties"]["DefaultActions"], key=lambda a: a.get("Order", 50000))
        kinds = [a["Type"] for a in actions]
        if "forward" in kinds:
            forwarding += 1
            assert listener["Properties"]["Protocol"] == "HTTPS", name
            assert kinds[0] in ("authenticate-oidc", "authenticate-cognito") and kinds[-1] == "forward", name
            assert actions[0]["AuthenticateOidcConfig"]["OnUnauthenticatedRequest"] == "authenticate"
        else:
            assert kinds == ["redirect"] and actions[0]["RedirectConfig"]["Protocol"] == "HTTPS", name
    assert forwarding == 1
    for name, group in resources_of_type(template, "AWS::EC2::SecurityGroup").items():
        for rule in group["Properties"].get("SecurityGroupIngress", []):
            if rule.get("CidrIp") == "0.0.0.0/0" or rule.get("CidrIpv6") == "::/0":
                assert name == "AlbSecurityGroup" and rule["FromPort"] in (80, 443), name
            if rule.get("FromPort") == 3000:
                assert rule["SourceSecurityGroupId"] == {"Ref": "AlbSecurityGroup"}, name
    for name, ingress in resources_of_type(template, "AWS::EC2::SecurityGroupIngress").items():
        assert "CidrIp" not in ingress["Properties"] and ingress["Properties"]["FromPort"] != 3000, name


def test_log_groups_exist_for_every_container(template):
    groups = set(resources_of_type(template, "AWS::Logs::LogGroup"))
    for name, task in resources_of_type(template, "AWS::ECS::TaskDefinition").items():
        for spec in task["Properties"]["ContainerDefinitions"]:
            options = spec["LogConfiguration"]["Options"]
            assert spec["LogConfiguration"]["LogDriver"] == "awslogs", name
            assert options["awslogs-group"]["Ref"] in groups, name
            assert options["awslogs-stream-prefix"], name
