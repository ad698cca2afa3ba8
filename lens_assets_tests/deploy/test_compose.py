"""deploy/docker-compose.yml, deploy/workspace.yaml and deploy/.env.example: validated without a Docker daemon by
podman-compose (`--dry-run config`: parse, merge, interpolate, normalise; it never calls podman then), and
cross-checked name by name."""

import re
import runpy
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from lens_assets_tests.deploy.conftest import (COMPOSE, DEPLOY, DOCKERFILES, ENV_EXAMPLE, INSTANCE_FILES,
                                               LOCAL_INSTANCE, REPO, WORKSPACE, env_example, env_refs, load_yaml,
                                               required_tool)

DAGSTER_SERVICES = ("code", "webserver", "daemon")


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    """`podman-compose config` in a bare environment: only ``env_file`` feeds the interpolation (a variable of the
    caller's shell would override it, as with docker compose)."""
    cmd = [required_tool("podman-compose"), "--dry-run", "-f", str(COMPOSE), "--env-file", str(env_file), "config"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(DEPLOY),
                          env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})


@pytest.fixture(scope="module")
def resolved() -> dict:
    done = compose_config(ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_file_is_valid_with_the_example_environment(resolved):
    assert set(resolved["services"]) == {"postgres", "s3", "s3-init", "code", "webserver", "daemon"}
    for name, service in resolved["services"].items():
        assert "image" in service, f"{name}: no image"
        assert not service["image"].endswith(":latest") and ":" in service["image"], f"{name}: unpinned image"


def test_compose_file_and_its_resolved_form_pass_the_compose_specification_schema(resolved, tmp_path):
    """The Compose Specification's JSON schema (vendored by check-jsonschema) on the file as written and as
    podman-compose resolved it: unknown keys and wrong types fail here, which podman-compose lets through; and
    every `depends_on` names a service."""
    resolved_file = tmp_path / "resolved.yml"
    resolved_file.write_text(yaml.safe_dump(resolved))
    for path in (COMPOSE, resolved_file):
        done = subprocess.run([required_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(COMPOSE.read_text().replace("    restart: unless-stopped", "    restartt: unless-stopped"))
    done = subprocess.run([required_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "restartt" in done.stdout
    services = resolved["services"]
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name


def test_compose_refuses_to_start_without_the_passwords(tmp_path):
    """The passwords have no default: a missing one stops `config` (and so `up`) with the variable's name."""
    env = {k: v for k, v in env_example().items() if k != "DAGSTER_POSTGRES_PASSWORD"}
    partial = tmp_path / "partial.env"
    partial.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    done = compose_config(partial)
    assert done.returncode != 0
    assert "DAGSTER_POSTGRES_PASSWORD" in done.stderr


def test_postgres_is_health_checked_and_the_dagster_services_wait_for_it(resolved):
    services = resolved["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in DAGSTER_SERVICES:
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"]["code"]["condition"] == "service_healthy", name
    assert services["code"]["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"


def test_every_published_port_is_on_loopback_and_the_webserver_on_127_0_0_1_by_default(resolved):
    """The UI has no login: with .env.example's settings nothing is published beyond 127.0.0.1."""
    published = {name: s.get("ports", []) for name, s in resolved["services"].items()}
    assert set(n for n, p in published.items() if p) == {"webserver", "s3"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"
    assert published["webserver"] == ["127.0.0.1:3000:3000"]
    assert env_example()["DAGSTER_WEBSERVER_BIND"] == "127.0.0.1"
    # and the default when .env leaves it out
    assert "${DAGSTER_WEBSERVER_BIND:-127.0.0.1}:" in COMPOSE.read_text()


def test_workspace_points_at_the_code_server_service():
    """deploy/workspace.yaml passes Dagster's workspace schema and names the compose service that runs
    `dagster code-server start -m lens_assets.definitions`, on the port it listens on, as the location that
    pyproject.toml names; the code image's own command is the same."""
    from dagster._core.workspace.config_schema import ensure_workspace_config

    workspace = ensure_workspace_config(load_yaml(WORKSPACE), str(WORKSPACE))
    (entry,) = workspace["load_from"]
    grpc = entry["grpc_server"]
    raw = load_yaml(COMPOSE)["services"]
    service = raw[grpc["host"]]
    command = service["command"]
    assert command[:3] == ["dagster", "code-server", "start"]
    assert command[command.index("-m") + 1] == "lens_assets.definitions"
    assert int(command[command.index("-p") + 1]) == grpc["port"]
    assert command[command.index("-h") + 1] == "0.0.0.0"
    location = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]["code_location_name"]
    assert grpc["location_name"] == command[command.index("--location-name") + 1] == location
    assert _dockerfile_cmd(DOCKERFILES["code"]) == command
    # the health check asks the same port
    assert str(grpc["port"]) in service["healthcheck"]["test"]


def _dockerfile_cmd(path: Path) -> list[str]:
    import json

    text = path.read_text().replace("\\\n", " ")
    (cmd,) = [line for line in text.splitlines() if line.startswith("CMD ")]
    return json.loads(cmd[len("CMD "):])


def test_every_variable_the_instance_files_read_is_in_env_example():
    listed = set(env_example())
    for path in INSTANCE_FILES:
        missing = env_refs(load_yaml(path)) - listed
        assert not missing, f"{path.name} reads {sorted(missing)}, not in .env.example"


def test_every_variable_compose_interpolates_is_in_env_example():
    text = COMPOSE.read_text().replace("$$", "")  # $$ is a literal dollar (the container's shell expands it)
    interpolated = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)) | set(
        re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text))
    assert interpolated, "the pattern found nothing: the check below would pass vacuously"
    missing = interpolated - set(env_example())
    assert not missing, f"docker-compose.yml interpolates {sorted(missing)}, not in .env.example"


def test_the_dagster_services_get_every_variable_the_local_instance_reads(resolved):
    """The webserver, the daemon and the code server (runs execute in it) load deploy/dagster.local.yaml, mounted
    where the images' DAGSTER_HOME is; each must have every `{env: X}` of it in its environment."""
    needed = env_refs(load_yaml(LOCAL_INSTANCE))
    homes = {name: re.search(r"DAGSTER_HOME=(\S+)", DOCKERFILES[name].read_text()).group(1)
             for name in ("dagster", "code")}
    assert len(set(homes.values())) == 1
    home = homes["code"]
    for name in DAGSTER_SERVICES:
        service = resolved["services"][name]
        missing = needed - set(service["environment"])
        assert not missing, f"{name} lacks {sorted(missing)}"
        assert f"./dagster.local.yaml:{home}/dagster.yaml:ro" in service["volumes"], name
    assert "DAGSTER_GPU_POOL_LIMIT" in resolved["services"]["daemon"]["environment"]
    assert resolved["services"]["daemon"]["command"] == ["start-daemon"]


def test_env_example_holds_placeholders_not_secrets():
    env = env_example()
    for name in ("DAGSTER_POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert env[name].startswith("change-me"), name
    assert (DEPLOY / ".gitignore").read_text().splitlines().count(".env") == 1


def test_make_buckets_creates_the_compute_log_and_data_buckets(monkeypatch):
    """deploy/compose/make_buckets.py (service s3-init) against moto's S3: both buckets, and a second run leaves
    them be."""
    import boto3
    from moto import mock_aws

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    env = {"DAGSTER_COMPUTE_LOGS_BUCKET": "logs-bucket", "LENS_DATA_ROOT": "s3://data-bucket/data",
           "AWS_REGION": "us-east-1"}
    make_buckets = runpy.run_path(str(DEPLOY / "compose" / "make_buckets.py"))
    with mock_aws():
        make_buckets["main"](env)
        make_buckets["main"](env)
        names = sorted(b["Name"] for b in boto3.client("s3", region_name="us-east-1").list_buckets()["Buckets"])
    assert names == ["data-bucket", "logs-bucket"]


def test_compose_service_commands_parse_as_the_images_expect():
    """The webserver's command names the workspace file the compose file mounts."""
    raw = load_yaml(COMPOSE)["services"]
    web = raw["webserver"]
    workspace_in_container = web["command"][web["command"].index("-w") + 1]
    assert f"./workspace.yaml:{workspace_in_container}:ro" in web["volumes"]
    assert shlex.join(_dockerfile_cmd(DOCKERFILES["dagster"])) == shlex.join(web["command"])
