"""Shared pieces of the deployment tests (deploy/): the files, their parsers, and a throwaway PostgreSQL database.

Nothing here needs Docker or the network: the compose file is read by podman-compose (its `config` command in
dry-run mode), the CloudFormation stack by cfn-lint's decoder, the Dockerfiles by hadolint and by their text.
"""

import re
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROD_INSTANCE = DEPLOY / "dagster.yaml"
LOCAL_INSTANCE = DEPLOY / "dagster.local.yaml"
INSTANCE_FILES = (PROD_INSTANCE, LOCAL_INSTANCE)
EMBEDDED_INSTANCE = REPO / "dagster.yaml"
WORKSPACE = DEPLOY / "workspace.yaml"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
STACK = DEPLOY / "ecs" / "stack.yaml"
IMAGES = DEPLOY / "images"
DOCKERFILES = {name: IMAGES / f"{name}.Dockerfile" for name in ("dagster", "code", "train")}
LOCK = DEPLOY / "requirements" / "lock.txt"

# the local PostgreSQL server of the development machines and CI (trust authentication)
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}


def tool(name: str) -> str | None:
    """The console script ``name`` of this virtual environment, else the one on PATH, else None."""
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else shutil.which(name)


def required_tool(name: str) -> str:
    found = tool(name)
    if not found:
        pytest.fail(f"{name} is not installed: it is in the dev extra of pyproject.toml (`make setup`)")
    return found


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def env_refs(node) -> set[str]:
    """Names X of every ``{env: X}`` in a Dagster config tree."""
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            return {node["env"]}
        return set().union(*(env_refs(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(env_refs(v) for v in node)) if node else set()
    return set()


def env_example() -> dict[str, str]:
    """deploy/.env.example as a dict (``NAME=value`` lines; comments and blank lines skipped)."""
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f".env.example: not NAME=value: {line!r}"
        out[name] = value
    return out


def load_stack() -> dict:
    """deploy/ecs/stack.yaml with its short-form intrinsics (!Ref, !Sub ...) as dicts, as cfn-lint reads it."""
    from cfnlint.decode import decode

    template, matches = decode(str(STACK))
    assert not matches, [str(m) for m in matches]
    return template


def resources_of_type(template: dict, kind: str) -> dict[str, dict]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def resolve(value, template: dict, stack_name: str = "lens", region: str = "us-east-1"):
    """A CloudFormation value with Ref/Fn::Sub of pseudo parameters and of log groups resolved (what a stack
    named ``stack_name`` in ``region`` passes to ECS for them)."""
    pseudo = {"AWS::StackName": stack_name, "AWS::Region": region, "AWS::Partition": "aws",
              "AWS::AccountId": "123456789012"}

    def ref(name):
        if name in pseudo:
            return pseudo[name]
        resource = template["Resources"][name]
        if resource["Type"] == "AWS::Logs::LogGroup":
            return resolve(resource["Properties"]["LogGroupName"], template, stack_name, region)
        raise KeyError(f"no test value for Ref {name}")

    if isinstance(value, dict) and set(value) == {"Ref"}:
        return ref(value["Ref"])
    if isinstance(value, dict) and set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
        return re.sub(r"\$\{([^}!]+)\}", lambda m: ref(m.group(1)), value["Fn::Sub"])
    if isinstance(value, dict):
        return {k: resolve(v, template, stack_name, region) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, template, stack_name, region) for v in value]
    return value


def container(template: dict, task_definition: str) -> dict:
    (only,) = template["Resources"][task_definition]["Properties"]["ContainerDefinitions"]
    return only


@pytest.fixture(scope="module")
def throwaway_pg_db():
    """The name of a new empty database on the local PostgreSQL server, dropped afterwards (skips when there is no
    server at 127.0.0.1:5432)."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 comes with dagster-postgres (dev extra)")
    try:
        admin = psycopg2.connect(connect_timeout=3, **PG)
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL server at {PG['host']}:{PG['port']} (user {PG['user']}): {e}")
    admin.autocommit = True
    name = f"lens_deploy_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def local_pg_env(db_name: str) -> dict[str, str]:
    """.env.example with the database settings pointing at the local server's throwaway database."""
    return {**env_example(), "DAGSTER_POSTGRES_HOST": PG["host"], "DAGSTER_POSTGRES_PORT": str(PG["port"]),
            "DAGSTER_POSTGRES_USER": PG["user"], "DAGSTER_POSTGRES_PASSWORD": "", "DAGSTER_POSTGRES_DB": db_name,
            # nothing listens there: the compute log manager is built, never called
            "DAGSTER_S3_ENDPOINT_URL": "http://127.0.0.1:9"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that uses ``local_deployment`` (test_deployment.py) reports the tail of each service's log."""
    outcome = yield
    report = outcome.get_result()
    deployment = getattr(item, "funcargs", {}).get("local_deployment")
    if report.failed and hasattr(deployment, "diagnostics"):
        report.sections.append(("local deployment: service logs", deployment.diagnostics()))
