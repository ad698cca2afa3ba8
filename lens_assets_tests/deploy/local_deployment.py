"""The compose deployment (deploy/docker-compose.yml) as local processes: code server, webserver and daemon.

What the containers would run, run here instead: each service's own command from the compose file (ports and hosts
moved to free 127.0.0.1 ports), the daemon through ``deploy/images/start-daemon.sh``, all on one DAGSTER_HOME that
holds ``deploy/dagster.local.yaml`` verbatim, with the compose environment (``deploy/.env.example``) pointing at a
throwaway database of the local PostgreSQL server and at a moto S3 server in place of MinIO (compute logs and
``LENS_DATA_ROOT`` alike). The workspace is ``deploy/workspace.yaml`` with the code server's host and port moved.

Used by ``test_deployment.py``; every wait is bounded, and :meth:`LocalDeployment.diagnostics` gives the tail of
each process's log for failure messages.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from lens_assets_tests.deploy.conftest import (COMPOSE, DEPLOY, LOCAL_INSTANCE, PG, WORKSPACE, env_example,
                                               load_yaml)
from lens_assets_tests.helpers import free_port, start_moto, stop_moto

VENV_BIN = Path(sys.executable).parent
START_DAEMON = DEPLOY / "images" / "start-daemon.sh"
# the env vars the processes must not inherit from whoever runs the tests (a real AWS profile, another instance)
_INHERITED_PREFIXES_DROPPED = ("AWS_", "DAGSTER_", "LENS_", "PYTEST_")


def wait_until(check: Callable[[], object], *, timeout: float, what: str, interval: float = 0.25,
               diagnostics: Callable[[], str] | None = None, alive: Callable[[], str | None] | None = None,
               retry_on: tuple[type[BaseException], ...] = (OSError,)):
    """Poll ``check`` until it returns something truthy (returned); fails after ``timeout`` seconds, or at once
    when ``alive`` names a process that has died. ``check`` raising one of ``retry_on`` (by default OSError:
    connection refused, reset, timed out) means not yet; the last such error is in the failure message."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            result = check()
            if result:
                return result
        except retry_on as e:
            last_error = e
        dead = alive() if alive else None
        if dead or time.monotonic() > deadline:
            why = f"{dead} exited" if dead else f"timed out after {timeout:.0f} s"
            extra = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"waiting for {what}: {why}{extra}\n{diagnostics() if diagnostics else ''}")
        time.sleep(interval)


def _with_options(command: list[str], values: dict[str, str]) -> list[str]:
    """``command`` with the value after each flag in ``values`` replaced (each flag must be there)."""
    out = list(command)
    for flag, value in values.items():
        assert flag in out, f"{flag} is not in the compose command {command}"
        out[out.index(flag) + 1] = value
    return out


def compose_command(service: str) -> list[str]:
    return list(load_yaml(COMPOSE)["services"][service]["command"])


@dataclass
class S3Mock:
    """A moto S3 server in its own process (MinIO's stand-in)."""

    endpoint: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, log: Path) -> S3Mock:
        proc, endpoint = start_moto(log)
        return cls(endpoint, proc, log)

    def stop(self) -> None:
        stop_moto(self.proc)


def _stop(proc: subprocess.Popen, *, grace: float = 10) -> None:
    """SIGTERM to the process group this helper started (the process and its children: the code server's gRPC
    server and run workers), SIGKILL after ``grace`` seconds."""
    def signal_group_and_wait(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass

    if proc.poll() is None:
        signal_group_and_wait(signal.SIGTERM)
    signal_group_and_wait(signal.SIGKILL)  # children left in the group (a run worker) go too


def deployment_env(*, home: Path, db_name: str, s3_endpoint: str, cache: Path) -> dict[str, str]:
    """The compose environment (``x-dagster-env`` with ``.env.example``'s values), pointed at this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES_DROPPED)}
    env.update(env_example())
    nowhere = str(home.parent / "no-aws-config")
    env.update({
        "DAGSTER_HOME": str(home),
        "DAGSTER_POSTGRES_HOST": PG["host"], "DAGSTER_POSTGRES_PORT": str(PG["port"]),
        "DAGSTER_POSTGRES_USER": PG["user"], "DAGSTER_POSTGRES_PASSWORD": "", "DAGSTER_POSTGRES_DB": db_name,
        "DAGSTER_S3_ENDPOINT_URL": s3_endpoint, "LENS_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": env["AWS_REGION"],
        "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere,
        "LENS_CACHE_DIR": str(cache), "LENS_LAUNCHER": "local",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@dataclass
class LocalDeployment:
    root: Path
    env: dict[str, str]
    s3: S3Mock
    code_port: int = 0
    web_port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return Path(self.env["DAGSTER_HOME"])

    @property
    def app(self) -> Path:
        """The working directory of the services (the images' /opt/dagster/app): holds workspace.yaml."""
        return self.root / "app"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def location_name(self) -> str:
        (entry,) = load_yaml(WORKSPACE)["load_from"]
        return entry["grpc_server"]["location_name"]

    # ------------------------------------------------------------------------------------------------ processes

    @classmethod
    def create(cls, root: Path, *, db_name: str, s3: S3Mock) -> LocalDeployment:
        home = root / "dagster_home"
        home.mkdir(parents=True)
        (root / "app").mkdir()
        # the instance file as compose mounts it: unchanged, every setting from the environment
        (home / "dagster.yaml").write_text(LOCAL_INSTANCE.read_text())
        env = deployment_env(home=home, db_name=db_name, s3_endpoint=s3.endpoint, cache=root / "lens_cache")
        return cls(root=root, env=env, s3=s3)

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            out.write(f"$ {shlex.join(command)}\n".encode())
            out.flush()
            proc = subprocess.Popen(command, cwd=self.app, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs[name], self.logs[name] = proc, log
        return proc

    def dead(self) -> str | None:
        """The name of a started service that has exited, if any."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return f"{name} (exit code {proc.returncode})"
        return None

    def diagnostics(self, lines: int = 60) -> str:
        """The last ``lines`` of each service's log (fewer of moto's, one line per request)."""
        out = []
        for name, log, n in [*((name, log, lines) for name, log in self.logs.items()),
                             ("moto_server", self.s3.log, lines // 4)]:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            state = self.procs[name].poll() if name in self.procs else self.s3.proc.poll()
            out.append(f"----- {name} ({'running' if state is None else f'exit code {state}'}; {log}), "
                       f"last {min(n, len(text))} of {len(text)} lines -----")
            out.extend(text[-n:])
        return "\n".join(out)

    def wait(self, check, *, timeout: float, what: str, interval: float = 0.25, retry_on=(OSError,)):
        return wait_until(check, timeout=timeout, what=what, interval=interval, diagnostics=self.diagnostics,
                          alive=self.dead, retry_on=retry_on)

    def start_code_server(self, *, timeout: float = 120) -> None:
        """compose's `code` command on a free port; waits until the code location has loaded."""
        from dagster._grpc.client import DagsterGrpcClient
        from dagster._utils.error import SerializableErrorInfo

        self.code_port = free_port()
        command = _with_options(compose_command("code"), {"-h": "127.0.0.1", "-p": str(self.code_port)})
        assert command[0] == "dagster"
        self._spawn("code", [str(VENV_BIN / "dagster"), *command[1:]])
        client = DagsterGrpcClient(port=self.code_port, host="127.0.0.1")
        # the proxy answers with a gRPC error until the code has loaded, then with the repositories or the load
        # error (a SerializableErrorInfo)
        response = self.wait(client.list_repositories, timeout=timeout, retry_on=(Exception,), interval=0.5,
                             what="the code server to load lens_assets.definitions")
        if isinstance(response, SerializableErrorInfo):
            raise AssertionError(f"the code location failed to load: {response.to_string()}\n{self.diagnostics()}")
        # deploy/workspace.yaml with the code server's address on this machine
        workspace = load_yaml(WORKSPACE)
        workspace["load_from"][0]["grpc_server"].update(host="127.0.0.1", port=self.code_port)
        (self.app / "workspace.yaml").write_text(yaml.safe_dump(workspace))

    def start_webserver(self) -> None:
        self.web_port = free_port()
        command = _with_options(compose_command("webserver"), {"-h": "127.0.0.1", "-p": str(self.web_port),
                                                               "-w": str(self.app / "workspace.yaml")})
        assert command[0] == "dagster-webserver"
        self._spawn("webserver", [str(VENV_BIN / "dagster-webserver"), *command[1:]])

    def start_daemon(self) -> None:
        """compose's `daemon` command, start-daemon (sets the gpu pool, then `dagster-daemon run` in app/, where
        workspace.yaml is)."""
        assert compose_command("daemon") == ["start-daemon"]
        self.env.setdefault("DAGSTER_GPU_POOL_LIMIT", env_example()["DAGSTER_GPU_POOL_LIMIT"])
        self._spawn("daemon", ["sh", str(START_DAEMON)])

    def wait_webserver(self, *, timeout: float = 90) -> dict:
        """Until /server_info answers and the workspace shows the code location loaded; returns the location."""
        def server_info():
            with urllib.request.urlopen(self.url + "/server_info", timeout=5) as r:
                return json.loads(r.read())

        self.wait(server_info, timeout=timeout, what=f"the webserver at {self.url}/server_info")

        def location():
            data = self.graphql(WORKSPACE_QUERY)["workspaceOrError"]
            assert data["__typename"] == "Workspace", data
            for entry in data["locationEntries"]:
                if entry["name"] == self.location_name and entry["loadStatus"] == "LOADED":
                    loc = entry["locationOrLoadError"]
                    assert loc["__typename"] == "RepositoryLocation", f"location failed to load: {loc}"
                    return loc
            return None

        return self.wait(location, timeout=timeout, what=f"the webserver to load location {self.location_name}")

    def wait_daemon(self, *, timeout: float = 90) -> None:
        """Until the daemons (the sensor daemon among them) report healthy heartbeats through the webserver."""
        def healthy():
            status = self.graphql(DAEMON_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
            required = {d["daemonType"]: d["healthy"] for d in status if d["required"]}
            return required and all(required.values()) and "SENSOR" in required

        self.wait(healthy, timeout=timeout, what="the daemon's heartbeats (dagster-daemon run)", interval=0.5)

    def stop(self) -> None:
        for name in ("daemon", "webserver", "code"):  # the reverse of the start order
            if name in self.procs:
                _stop(self.procs[name])

    # ------------------------------------------------------------------------------------------------ GraphQL

    def graphql(self, query: str, variables: dict | None = None, *, timeout: float = 30) -> dict:
        """POST /graphql; the ``data``, failing on ``errors``."""
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(self.url + "/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"GraphQL HTTP {e.code}: {e.read()[:2000]!r}") from None
        if answer.get("errors"):
            raise AssertionError(f"GraphQL errors: {json.dumps(answer['errors'])[:3000]}")
        return answer["data"]


WORKSPACE_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { name repositories { name } }
          ... on PythonError { message stack }
        }
      }
    }
  }
}
"""

DAEMON_QUERY = """
query { instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }
"""
