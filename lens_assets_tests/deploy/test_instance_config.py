"""deploy/dagster.yaml (production) and deploy/dagster.local.yaml (compose) through Dagster's own instance loading."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster._config import process_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes.config_class import class_from_code_pointer

from lens_assets_tests.deploy.conftest import (DEPLOY, EMBEDDED_INSTANCE, INSTANCE_FILES, LOCAL_INSTANCE,
                                               PROD_INSTANCE, env_example, load_yaml, local_pg_env)


def _home_with(tmp_path: Path, config: dict) -> str:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return str(home)


@pytest.mark.parametrize("path", INSTANCE_FILES, ids=lambda p: p.name)
def test_instance_config_passes_dagsters_schema_and_each_class_schema(path, tmp_path, monkeypatch):
    """The file as Dagster loads it (instance schema, the checks beside it), then each pluggable part's config
    against its own class's schema with the variables of .env.example: the run launcher and the compute log
    manager are Permissive in the instance schema, so a wrong key there only fails at this step."""
    for name, value in env_example().items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(path, home / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(home))
    assert custom_class is None
    assert config["telemetry"] == {"enabled": False}
    assert set(config["storage"]) == {"postgres"}
    assert config["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    for key in ("run_launcher", "compute_logs"):
        part = config[key]
        cls = class_from_code_pointer(part["module"], part["class"])
        result = process_config(cls.config_type(), part.get("config") or {})
        assert result.success, f"{path.name} {key}: {[e.message for e in result.errors]}"
    logs = process_config(class_from_code_pointer(config["compute_logs"]["module"],
                                                  config["compute_logs"]["class"]).config_type(),
                          config["compute_logs"]["config"]).value
    assert logs["bucket"] == env_example()["DAGSTER_COMPUTE_LOGS_BUCKET"]  # {env: X} resolved from the environment


def test_a_wrong_key_in_the_run_launcher_config_is_caught(tmp_path):
    """The per-class check above can fail: EcsRunLauncher refuses a key it does not know."""
    from dagster_aws.ecs import EcsRunLauncher

    config = load_yaml(PROD_INSTANCE)["run_launcher"]["config"]
    assert process_config(EcsRunLauncher.config_type(), config).success
    assert not process_config(EcsRunLauncher.config_type(), {**config, "max_concurrent_runs": 4}).success


def test_production_launches_runs_on_ecs_and_local_runs_in_the_code_server():
    prod, local = load_yaml(PROD_INSTANCE), load_yaml(LOCAL_INSTANCE)
    assert (prod["run_launcher"]["module"], prod["run_launcher"]["class"]) == ("dagster_aws.ecs", "EcsRunLauncher")
    assert prod["run_launcher"]["config"]["task_definition"] == {"env": "DAGSTER_RUN_TASK_DEFINITION"}
    assert "propagate_tags" not in prod["run_launcher"]["config"]  # dagster/partition may be `drop|survey`
    assert local["run_launcher"]["class"] == "DefaultRunLauncher"
    for config in (prod, local):
        assert config["compute_logs"]["class"] == "S3ComputeLogManager"


def test_concurrency_mixed_with_run_coordinator_max_concurrent_runs_is_refused(tmp_path):
    """The deploy files use `concurrency:` only; Dagster refuses a file that also sets the run coordinator's
    max_concurrent_runs (what an older guide would add), so that mix must never be written."""
    for path in INSTANCE_FILES:
        config = load_yaml(path)
        assert "concurrency" in config and "runs" in config["concurrency"]
        assert "run_coordinator" not in config and "run_queue" not in config, path.name
    mixed = {**load_yaml(LOCAL_INSTANCE), "run_coordinator": {
        "module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
        "config": {"max_concurrent_runs": 4}}}
    with pytest.raises(DagsterInvalidConfigError, match=r"max_concurrent_runs.*incompatible with the "
                                                         r"`concurrency > runs` config"):
        dagster_instance_config(_home_with(tmp_path, mixed))


def test_production_keeps_the_embedded_defaults_scheduling_choices():
    """Retries and monitoring as chosen in /dagster.yaml (the embedded default): a crashed worker is retried, a
    failed step is not; runs past 12 h are cancelled."""
    embedded = load_yaml(EMBEDDED_INSTANCE)
    for path in INSTANCE_FILES:
        config = load_yaml(path)
        assert config["run_retries"] == embedded["run_retries"], path.name
        assert config["run_retries"]["retry_on_asset_or_op_failure"] is False
        for key in ("enabled", "max_runtime_seconds", "poll_interval_seconds"):
            assert config["run_monitoring"][key] == embedded["run_monitoring"][key], (path.name, key)
        assert config["concurrency"]["pools"] == embedded["concurrency"]["pools"]
        assert config["telemetry"] == embedded["telemetry"] == {"enabled": False}


def test_local_variant_differs_from_production_only_where_it_must():
    """What the local file may change: the run launcher, the database's TLS (compose's PostgreSQL has none), the S3
    endpoint (MinIO) and the number of runs at once; everything else is the production file."""
    prod, local = load_yaml(PROD_INSTANCE), load_yaml(LOCAL_INSTANCE)
    for config in (prod, local):
        config.pop("run_launcher")
        config["storage"]["postgres"]["postgres_db"].pop("params", None)
        config["compute_logs"]["config"].pop("endpoint_url", None)
        config["concurrency"]["runs"].pop("max_concurrent_runs")
    assert local == prod


def _instance_on(home: str, env: dict, monkeypatch):
    from dagster import DagsterInstance

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return DagsterInstance.from_config(home)


def test_local_instance_runs_on_postgres(throwaway_pg_db, tmp_path, monkeypatch):
    """deploy/dagster.local.yaml builds a working instance on a real PostgreSQL database: storage (schema created
    by Dagster), queued runs with the configured limits, monitoring, retries, S3 compute logs, the default
    launcher; a pool limit set in it reads back."""
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
    from dagster_postgres import PostgresRunStorage

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(LOCAL_INSTANCE, home / "dagster.yaml")
    instance = _instance_on(str(home), local_pg_env(throwaway_pg_db), monkeypatch)
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert isinstance(instance.compute_log_manager, S3ComputeLogManager)
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs == 2
        assert concurrency.pool_config.default_pool_limit == 1
        assert instance.run_monitoring_enabled and instance.run_monitoring_max_runtime_seconds == 43200
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert instance.get_runs() == []  # the tables exist and answer
    finally:
        instance.dispose()


def test_production_instance_runs_on_postgres(throwaway_pg_db, tmp_path, monkeypatch):
    """deploy/dagster.yaml builds the same instance, with one change for this test only: the local server has no
    TLS, so `sslmode: require` (what RDS gets) becomes `disable`. The EcsRunLauncher is not built (it asks ECS for
    its task definition when built); its config was checked against its schema above."""
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
    from dagster_postgres import PostgresEventLogStorage

    config = load_yaml(PROD_INSTANCE)
    assert config["storage"]["postgres"]["postgres_db"]["params"] == {"sslmode": "require"}
    config["storage"]["postgres"]["postgres_db"]["params"] = {"sslmode": "disable"}
    instance = _instance_on(_home_with(tmp_path, config), local_pg_env(throwaway_pg_db), monkeypatch)
    try:
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert isinstance(instance.compute_log_manager, S3ComputeLogManager)
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 8
        assert instance.run_monitoring_max_runtime_seconds == 43200
        assert instance.run_retries_max_retries == 2 and not instance.run_retries_retry_on_asset_or_op_failure
        assert instance.get_runs() == []
    finally:
        instance.dispose()


def test_a_bare_postgresql_scheme_fails_here(tmp_path, monkeypatch, throwaway_pg_db):
    """Why the files name the driver: with SQLAlchemy 2.1, `postgresql://` means psycopg 3, which dagster-postgres
    does not install (it brings psycopg2). Skips if psycopg 3 is installed after all."""
    try:
        import psycopg  # noqa: F401
        pytest.skip("psycopg 3 is installed: a bare postgresql:// would work here")
    except ImportError:
        pass
    config = load_yaml(LOCAL_INSTANCE)
    config["storage"]["postgres"]["postgres_db"].pop("scheme")
    with pytest.raises(ModuleNotFoundError, match="psycopg"):
        _instance_on(_home_with(tmp_path, config), local_pg_env(throwaway_pg_db), monkeypatch)


def test_start_daemon_sets_the_gpu_pool_limit_then_runs_the_daemon(throwaway_pg_db, tmp_path, monkeypatch):
    """deploy/images/start-daemon.sh (the daemon's command in compose and on ECS) sets the `gpu` pool to
    DAGSTER_GPU_POOL_LIMIT with the real `dagster` CLI, then execs `dagster-daemon run` (a stand-in here); without
    the variable it stops before starting the daemon."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(LOCAL_INSTANCE, home / "dagster.yaml")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    daemon = fake_bin / "dagster-daemon"
    daemon.write_text('#!/bin/sh\necho "daemon started: $*"\n')
    daemon.chmod(0o755)
    venv_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{fake_bin}:{venv_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "DAGSTER_HOME": str(home),
           **local_pg_env(throwaway_pg_db), "DAGSTER_GPU_POOL_LIMIT": "3"}
    script = str(DEPLOY / "images" / "start-daemon.sh")

    done = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "daemon started: run" in done.stdout
    instance = _instance_on(str(home), local_pg_env(throwaway_pg_db), monkeypatch)
    try:
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 3
    finally:
        instance.dispose()

    env.pop("DAGSTER_GPU_POOL_LIMIT")
    refused = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "DAGSTER_GPU_POOL_LIMIT is not set" in refused.stderr
    assert "daemon started" not in refused.stdout
