"""The deployment up on this machine, and its UI in a real browser.

Compose's services run as local processes (``local_deployment.py``): the code server, the webserver and the daemon
with their compose commands, ``deploy/dagster.local.yaml`` as the instance file, a throwaway database of the local
PostgreSQL server, and a moto S3 server in place of MinIO for the compute logs and ``LENS_DATA_ROOT`` (buckets made
by compose's own ``make_buckets.py``). A producer publishes a drop to the inbox and a promotion record for its survey
before the daemon starts; then a materialization is launched through the webserver's GraphQL API, as the UI's
launchpad does.

The first tests check what the deployment did: the run's success, its events and its compute logs in the bucket,
the inbox sensor's tick and the run it requested for the drop; then a fresh ``DagsterInstance`` built from the same
DAGSTER_HOME sees the same runs and events. The UI tests open the webserver in headless Chromium (Debian's
``chromium``, driven by playwright) and save screenshots under their temporary folders; they skip where chromium or
playwright is missing.

The whole module shares one deployment (the UI tests are here rather than in a file of their own because
``make test`` hands whole files to pytest-xdist workers: a second file could start a second deployment on the
other worker). About 50 s on 2 idle cores, 65 s on one. Run alone:
``.venv/bin/python -m pytest -q -n 0 lens_assets_tests/deploy/test_deployment.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lens_assets_tests.deploy.conftest import DEPLOY, PG, env_example, load_yaml
from lens_assets_tests.deploy.local_deployment import LocalDeployment, S3Mock
from lens_assets_tests.helpers import MOTO_SERVER

pytestmark = pytest.mark.slow

SURVEY = "sdss"
DROP = "2026-01-15-deploy-e2e"
PROMOTED_VERSION = "deploy-e2e-v1"
N_CUTOUTS = 8
SEED = 3
CHROMIUM = Path("/usr/bin/chromium")
RUN_TIMEOUT_S = 150  # a run of N_CUTOUTS takes ~15 s on 2 idle cores; generous for a loaded CI machine
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def s3_mock(tmp_path_factory):
    if not MOTO_SERVER.exists():
        pytest.skip(f"{MOTO_SERVER} is not installed: moto[server] is in the dev extra (`make setup`)")
    mock = S3Mock.start(tmp_path_factory.mktemp("moto") / "moto_server.log")
    try:
        yield mock
    finally:
        mock.stop()


@pytest.fixture(scope="module")
def local_deployment(throwaway_pg_db, s3_mock, tmp_path_factory):
    """The deployment, up: the code location loaded in the webserver and the daemons' heartbeats healthy. The
    test process gets the deployment's environment for the module (the instance's ``{env: X}``, the S3 mock's
    credentials), so that it can read the same instance and bucket."""
    deployment = LocalDeployment.create(tmp_path_factory.mktemp("deployment"), db_name=throwaway_pg_db,
                                        s3=s3_mock)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in deployment.env.items():
            if name.startswith(("AWS_", "DAGSTER_", "LENS_")) and name != "DAGSTER_HOME":
                mp.setenv(name, value)
        try:
            # compose's s3-init: the buckets of DAGSTER_COMPUTE_LOGS_BUCKET and LENS_DATA_ROOT
            made = subprocess.run([sys.executable, str(DEPLOY / "compose" / "make_buckets.py")], env=deployment.env,
                                  capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stdout + made.stderr
            _publish_drop_and_promotion(deployment)
            deployment.start_code_server()
            deployment.start_webserver()
            deployment.start_daemon()
            deployment.wait_webserver()
            deployment.wait_daemon()
            yield deployment
        finally:
            deployment.stop()


def _producer_storage(deployment: LocalDeployment):
    """LENS_DATA_ROOT (the bucket) as a producer outside the deployment sees it, with a cache of its own."""
    from lens_assets.resources.s3_storage import S3Storage

    return S3Storage(root=str(deployment.root / "producer_cache"), url_root=deployment.env["LENS_DATA_ROOT"],
                     endpoint_url=deployment.s3.endpoint, region_name=deployment.env["AWS_REGION"])


def _publish_drop_and_promotion(deployment: LocalDeployment) -> None:
    """A promotion record for SURVEY (what ``promoted_model`` writes; without one the sensor holds the survey's
    drops back) and a complete simulated drop in ``inbox/SURVEY/DROP/``, both in the bucket."""
    from lens_assets import layout
    from lens_assets.inbox import simulate_drop
    from lens_assets_tests.helpers import write_promotion

    storage = _producer_storage(deployment)
    write_promotion(storage, SURVEY, PROMOTED_VERSION)
    storage.push(*layout.promotion_doc(SURVEY))
    simulate_drop(storage, SURVEY, DROP, n=2, seed=SEED, workers=1)


@pytest.fixture(scope="module")
def materialization(local_deployment) -> dict:
    """``simulated_cutouts`` for SURVEY launched through GraphQL (the launchpad's mutation: the asset job with an
    asset selection, the partition as a tag, a small run config); waits until the run ends. Returns the run."""
    config = {"ops": {"simulated_cutouts": {"config": {"n_cutouts": N_CUTOUTS, "n_heldout": 0, "seed": SEED,
                                                       "workers": 1}}}}
    params = {
        "selector": {"repositoryLocationName": local_deployment.location_name, "repositoryName": "__repository__",
                     "jobName": "__ASSET_JOB", "assetSelection": [{"path": ["simulated_cutouts"]}],
                     "assetCheckSelection": []},
        "runConfigData": config,
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": SURVEY}]},
    }
    launched = local_deployment.graphql(LAUNCH, {"params": params})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    return _wait_run_ends(local_deployment, run_id)


@pytest.fixture(scope="module")
def sensor_tick(local_deployment) -> dict:
    """The first tick of ``survey_inbox_sensor`` that requested a run (bounded wait); its run has ended."""
    selector = {"repositoryLocationName": local_deployment.location_name, "repositoryName": "__repository__",
                "sensorName": "survey_inbox_sensor"}

    def requested():
        sensor = local_deployment.graphql(SENSOR_TICKS, {"selector": selector})["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        ticks = sensor["sensorState"]["ticks"]
        failed = [t for t in ticks if t["status"] == "FAILURE"]
        assert not failed, f"a tick of the sensor failed: {failed[0]['error']}"
        return next((t for t in ticks if t["runIds"]), None)

    tick = local_deployment.wait(requested, timeout=90, what="the inbox sensor to request a run", interval=0.5)
    (run_id,) = tick["runIds"]
    tick["run"] = _wait_run_ends(local_deployment, run_id)
    return tick


def _wait_run_ends(deployment: LocalDeployment, run_id: str) -> dict:
    def ended():
        run = deployment.graphql(RUN, {"runId": run_id})["runOrError"]
        assert run["__typename"] == "Run", run
        return run if run["status"] in TERMINAL else None

    return deployment.wait(ended, timeout=RUN_TIMEOUT_S, what=f"run {run_id} to end", interval=0.5)


def _events(deployment: LocalDeployment, run_id: str) -> list[dict]:
    logs = deployment.graphql(RUN_EVENTS, {"runId": run_id})["logsForRun"]
    assert logs["__typename"] == "EventConnection", logs
    return logs["events"]


def _run_ids(deployment: LocalDeployment) -> set[str]:
    runs = deployment.graphql("query { runsOrError { ... on Runs { results { runId } } } }")["runsOrError"]
    return {r["runId"] for r in runs["results"]}


# ------------------------------------------------------------------------------------------------ the deployment


def test_the_services_run_compose_commands_on_the_local_instance_file(local_deployment):
    """Up: the webserver serves the code location from the gRPC code server of the workspace file, the daemon's
    required daemons (sensors and the run queue among them) beat, the run queue and launcher are the instance
    file's, and start-daemon.sh set the `gpu` pool before starting the daemon."""
    data = local_deployment.graphql(INSTANCE)
    instance = data["instance"]
    assert instance["runLauncher"]["name"] == "DefaultRunLauncher"
    local = load_yaml(DEPLOY / "dagster.local.yaml")
    assert instance["runQueueConfig"]["maxConcurrentRuns"] == local["concurrency"]["runs"]["max_concurrent_runs"]
    assert instance["concurrencyLimit"]["slotCount"] == int(env_example()["DAGSTER_GPU_POOL_LIMIT"])
    statuses = {d["daemonType"]: d["healthy"] for d in instance["daemonHealth"]["allDaemonStatuses"] if d["required"]}
    assert {"SENSOR", "QUEUED_RUN_COORDINATOR", "SCHEDULER"} <= set(statuses) and all(statuses.values()), statuses
    (entry,) = [e for e in data["workspaceOrError"]["locationEntries"] if e["name"] == local_deployment.location_name]
    assert entry["loadStatus"] == "LOADED" and entry["locationOrLoadError"]["__typename"] == "RepositoryLocation"
    shown = {m["key"]: m["value"] for m in entry["displayMetadata"]}
    assert (shown["host"], shown["port"]) == ("127.0.0.1", str(local_deployment.code_port)), shown



def test_dagster_definitions_validate_passes_against_the_deploy_workspace_with_the_code_server_up(local_deployment):
    """`dagster definitions validate` on deploy/workspace.yaml (the code server's address moved to this machine),
    with the deployment's environment: the location loads from the running gRPC server and validates."""
    exe = Path(sys.executable).parent / "dagster"
    out = subprocess.run([str(exe), "definitions", "validate", "-w", str(local_deployment.app / "workspace.yaml")],
                         cwd=local_deployment.app, env=local_deployment.env, capture_output=True, text=True,
                         timeout=180)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert local_deployment.location_name in text and "Validation successful" in text, text

def test_a_materialization_launched_through_graphql_succeeds(local_deployment, materialization):
    """The run ends in SUCCESS; its events are the full life of a run (enqueued by the webserver, dequeued by the
    daemon, executed by the code server's launcher) with the partition's materialization; the asset's files are in
    the bucket of LENS_DATA_ROOT."""
    events = _events(local_deployment, materialization["runId"])
    failures = [e.get("error") or e["message"] for e in events if "Failure" in e["__typename"]]
    assert materialization["status"] == "SUCCESS", (materialization["status"], failures)
    kinds = [e["__typename"] for e in events]
    for kind in ("RunEnqueuedEvent", "RunStartingEvent", "RunStartEvent", "ExecutionStepStartEvent",
                 "MaterializationEvent", "ExecutionStepSuccessEvent", "RunSuccessEvent"):
        assert kind in kinds, f"no {kind} in {kinds}"
    assert kinds.index("RunEnqueuedEvent") < kinds.index("RunStartEvent") < kinds.index("RunSuccessEvent")
    (mat,) = [e for e in events if e["__typename"] == "MaterializationEvent"]
    assert mat["assetKey"]["path"] == ["simulated_cutouts"] and mat["partition"] == SURVEY
    entries = {m["label"]: m for m in mat["metadataEntries"]}
    assert entries["n_cutouts"]["intValue"] == N_CUTOUTS
    assert "data:image/png;base64," in entries["gallery"]["mdStr"]

    bucket, prefix = local_deployment.env["LENS_DATA_ROOT"][len("s3://"):].split("/", 1)
    keys = _keys(local_deployment, bucket, f"{prefix}/raw/{SURVEY}/")
    assert len([k for k in keys if k.endswith(".fits")]) == N_CUTOUTS, keys
    assert _keys(local_deployment, bucket, f"{prefix}/reports/{SURVEY}/"), "no gallery in the bucket"


def _s3(deployment: LocalDeployment):
    import boto3

    return boto3.client("s3", endpoint_url=deployment.s3.endpoint, region_name=deployment.env["AWS_REGION"],
                        aws_access_key_id=deployment.env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=deployment.env["AWS_SECRET_ACCESS_KEY"])


def _keys(deployment: LocalDeployment, bucket: str, prefix: str) -> list[str]:
    pages = _s3(deployment).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _captured(deployment: LocalDeployment, run_id: str) -> tuple[str, list[str]]:
    (captured,) = [e for e in _events(deployment, run_id) if e["__typename"] == "LogsCapturedEvent"]
    return captured["fileKey"], captured["stepKeys"]


def test_its_compute_logs_are_in_the_s3_mock(local_deployment, materialization):
    """The step's stderr was uploaded by S3ComputeLogManager to DAGSTER_COMPUTE_LOGS_BUCKET under
    DAGSTER_COMPUTE_LOGS_PREFIX (read here with a boto3 client of its own), and the webserver reads it back from
    there, as the run page's log viewer does."""
    env = local_deployment.env
    run_id = materialization["runId"]
    file_key, steps = _captured(local_deployment, run_id)
    assert steps == ["simulated_cutouts"]
    base = f"{env['DAGSTER_COMPUTE_LOGS_PREFIX']}/storage/{run_id}/compute_logs/{file_key}"
    keys = _keys(local_deployment, env["DAGSTER_COMPUTE_LOGS_BUCKET"], f"{env['DAGSTER_COMPUTE_LOGS_PREFIX']}/")
    assert {f"{base}.err", f"{base}.out"} <= set(keys), keys
    stderr = _s3(local_deployment).get_object(Bucket=env["DAGSTER_COMPUTE_LOGS_BUCKET"],
                                              Key=f"{base}.err")["Body"].read().decode()
    assert f"simulated {N_CUTOUTS} {SURVEY} cutouts" in stderr, stderr[-2000:]
    assert run_id in stderr and "STEP_SUCCESS" in stderr

    log_key = [run_id, "compute_logs", file_key]
    data = local_deployment.graphql(CAPTURED_LOGS, {"logKey": log_key})
    assert data["capturedLogsMetadata"]["stderrLocation"] == f"s3://{env['DAGSTER_COMPUTE_LOGS_BUCKET']}/{base}.err"
    assert data["capturedLogs"]["stderr"] == stderr


def test_the_inbox_sensor_picks_up_the_published_drop(local_deployment, sensor_tick):
    """The daemon evaluated survey_inbox_sensor in the code server against the bucket: the tick registered the drop
    as a `drops` partition and requested one candidate_scores run for (SURVEY, DROP) with the promoted version;
    the run was launched and executed that partition. It fails, as it must: the promotion record names a model
    whose files were never written (no model is trained here), and candidate_scores says so."""
    key = f"{SURVEY}|{DROP}"
    assert sensor_tick["status"] == "SUCCESS" and sensor_tick["runKeys"] == [key]
    assert json.loads(sensor_tick["cursor"]) == {"handled": [key]}
    (added,) = sensor_tick["dynamicPartitionsRequestResults"]
    assert (added["partitionsDefName"], added["partitionKeys"], added["type"]) == ("drops", [DROP], "ADD_PARTITIONS")

    run = sensor_tick["run"]
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert tags["dagster/sensor_name"] == "survey_inbox_sensor" and tags["dagster/run_key"] == key
    assert tags["dagster/partition"] == f"{DROP}|{SURVEY}"
    assert (tags["lens/survey"], tags["lens/drop"], tags["lens/promoted_version"]) == (SURVEY, DROP, PROMOTED_VERSION)
    assert run["assetSelection"] == [{"path": ["candidate_scores"]}]
    assert run["status"] == "FAILURE", run
    events = _events(local_deployment, run["runId"])
    (failure,) = [e for e in events if e["__typename"] == "ExecutionStepFailureEvent"]
    assert failure["stepKey"] == "candidate_scores"
    assert f"promoted/{SURVEY}" in failure["error"]["message"], failure["error"]


def test_a_fresh_instance_sees_the_same_runs_and_events(local_deployment, materialization, sensor_tick):
    """A new DagsterInstance from the deployment's DAGSTER_HOME (the same dagster.local.yaml and environment), in
    this process, reads from PostgreSQL every run the webserver lists, each with the events the webserver showed;
    the materialization, the drop's partition and the compute logs (from S3) are there too."""
    import psycopg2
    from dagster import AssetKey, DagsterEventType, DagsterInstance
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
    from dagster_postgres import PostgresRunStorage

    webserver_runs = _run_ids(local_deployment)
    assert {materialization["runId"], sensor_tick["run"]["runId"]} <= webserver_runs
    instance = DagsterInstance.from_config(str(local_deployment.home))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.compute_log_manager, S3ComputeLogManager)
        assert {r.run_id for r in instance.get_runs()} == webserver_runs
        for run_id in (materialization["runId"], sensor_tick["run"]["runId"]):
            # the daemon may still add an engine event to a finished run (run retries saying it will not retry a
            # step failure): read both sides until they agree, within a bound
            def agree():
                shown = [e["message"] for e in _events(local_deployment, run_id)]
                stored = [e.message for e in instance.all_logs(run_id)]
                return (shown, stored) if shown == stored else None

            shown, stored = local_deployment.wait(agree, timeout=60, what=f"run {run_id}'s events to settle")
            assert len(stored) == len(shown) > 0
        run = instance.get_run_by_id(materialization["runId"])
        assert run.status.value == "SUCCESS" and run.tags["dagster/partition"] == SURVEY
        latest = instance.get_latest_materialization_event(AssetKey("simulated_cutouts"))
        assert latest.run_id == materialization["runId"]
        assert latest.asset_materialization.partition == SURVEY
        assert instance.get_dynamic_partitions("drops") == [DROP]
        failed = instance.all_logs(sensor_tick["run"]["runId"], of_type=DagsterEventType.STEP_FAILURE)
        assert len(failed) == 1

        file_key, _ = _captured(local_deployment, materialization["runId"])
        logs = instance.compute_log_manager.get_log_data([materialization["runId"], "compute_logs", file_key])
        assert f"simulated {N_CUTOUTS} {SURVEY} cutouts" in logs.stderr.decode()
    finally:
        instance.dispose()

    # and the rows are in the throwaway database itself
    with psycopg2.connect(connect_timeout=5, host=PG["host"], port=PG["port"], user=PG["user"],
                          dbname=local_deployment.env["DAGSTER_POSTGRES_DB"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id FROM runs")
        assert {r for (r,) in cur.fetchall()} == webserver_runs


# ---------------------------------------------------------------------------------------------------- the UI

ENABLE_UI = ("the UI tests need Debian's chromium at /usr/bin/chromium and the playwright package: "
             "`apt-get install chromium` (as root) and `pip install playwright` (in the dev extra); "
             "playwright's own browser download is not used")
# what the UI shows when a query or the page fails (Dagster's error states and toasts)
ERROR_TEXT = re.compile(r"unexpected (graphql )?error|an error occurred|something went wrong|pythonerror|"
                        r"traceback \(most recent call last\)|could not be loaded|failed to load|error loading",
                        re.IGNORECASE)
# waits for the page's finite CSS/Web animations (a dialog fading in); one cancelled or replaced is waited for anew
NO_ANIMATION_LEFT = """async () => {
  for (let i = 0; i < 50; i++) {
    const running = document.getAnimations().filter(a => a.playState === "running" && a.effect
                                                         && a.effect.getComputedTiming().iterations !== Infinity);
    if (!running.length) return;
    await Promise.all(running.map(a => a.finished.catch(() => null)));
  }
}"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: {ENABLE_UI}")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip(f"playwright is not installed: {ENABLE_UI}")
    expect.set_options(timeout=20_000)  # each UI expectation's wait (playwright's default: 5 s)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class PageWatch:
    """A page of the UI that records what went wrong: uncaught script errors, console errors, failed or
    erroring GraphQL answers."""

    def __init__(self, browser, deployment: LocalDeployment, out: Path):
        self.deployment, self.out = deployment, out
        self.context = browser.new_context(viewport={"width": 1600, "height": 1000})
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type == "error" else None)
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}")
                     if "/graphql" in r.url else None)
        self.graphql_responses = []
        self.page.on("response", lambda r: self.graphql_responses.append(r) if "/graphql" in r.url else None)

    def open(self, path: str):
        self.page.goto(self.deployment.url + path, wait_until="networkidle")
        return self.page

    def settle(self):
        self.page.wait_for_load_state("networkidle")
        self.page.evaluate(NO_ANIMATION_LEFT)

    def shot(self, name: str) -> Path:
        self.settle()
        path = self.out / f"{name}.png"
        self.page.screenshot(path=str(path))
        print(f"screenshot: {path}")
        return path

    def assert_no_error(self):
        """No error text on the page, no script error, every GraphQL answer a 200 without `errors`."""
        text = self.page.inner_text("body")
        found = ERROR_TEXT.search(text)
        assert not found, f"error shown on {self.page.url}: ...{text[max(0, found.start() - 200):found.end() + 300]}"
        for response in self.graphql_responses:
            assert response.status == 200, f"GraphQL HTTP {response.status}: {response.text()[:500]}"
            body = response.json()
            assert not body.get("errors"), f"GraphQL errors on {self.page.url}: {json.dumps(body['errors'])[:1000]}"
        self.graphql_responses.clear()
        assert not self.problems, self.problems


@pytest.fixture
def ui(browser, local_deployment, tmp_path):
    # what the community prompt's "Skip" does (it opens on 127.0.0.1 once per instance, over the page)
    assert local_deployment.graphql("mutation { setNuxSeen }")["setNuxSeen"] is True
    watch = PageWatch(browser, local_deployment, tmp_path)
    try:
        yield watch
    finally:
        try:  # the last page as it was, for a failure's post-mortem
            (tmp_path / "last_page.html").write_text(watch.page.content())
            print(f"last page: {watch.page.url} saved in {tmp_path / 'last_page.html'}")
        finally:
            watch.context.close()


@pytest.fixture(scope="module")
def asset_groups():
    """asset key -> group, from the code location's Definitions."""
    from lens_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    return {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}


def test_ui_asset_catalog_lists_every_asset_and_group(ui, asset_groups, materialization):
    from playwright.sync_api import expect

    # the catalog is a virtualized table: a window tall enough that every row is rendered
    ui.page.set_viewport_size({"width": 1600, "height": 300 + 70 * len(asset_groups)})
    page = ui.open("/assets")
    for key, group in asset_groups.items():
        link = page.locator(f'a[href="/assets/{key}"]')
        expect(link).to_be_visible()
        # the asset's row: the innermost element around its link that also holds its group's name as an element of
        # its own (a description may mention the group's name too: arc_segments' says "clusters/raw/...")
        row = page.locator("div", has=link).filter(has=page.get_by_text(group, exact=True)).last
        expect(row.get_by_text(group, exact=True)).to_be_visible()
        expect(row.get_by_text(ui.deployment.location_name, exact=True).first).to_be_visible()
    ui.shot("asset_catalog")
    ui.assert_no_error()


def test_ui_lineage_graph_shows_every_group_and_asset(ui, asset_groups):
    from playwright.sync_api import expect

    page = ui.open("/asset-groups")
    for group in set(asset_groups.values()):
        expect(page.get_by_text(group, exact=True).first).to_be_visible()
    ui.shot("lineage_groups")
    # the graph's settings menu: expand every group into its assets
    page.locator('[aria-label="settings"]').last.click()
    page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
    page.keyboard.press("Escape")
    for key in asset_groups:
        node = page.get_by_text(key, exact=True).first
        expect(node).to_be_visible()
        node.click(trial=True)  # clicks nothing: waits until the node has stopped moving (the layout animates)
    ui.shot("lineage_assets")
    ui.assert_no_error()


def test_ui_asset_page_shows_the_materialization_and_its_metadata_plots(ui, local_deployment, materialization):
    """simulated_cutouts' page: the latest materialization (the run above), the gallery PNG of its metadata
    rendered as an image, and the Plots view with one chart per numeric metadata entry."""
    from playwright.sync_api import expect

    page = ui.open(f"/assets/simulated_cutouts?partition={SURVEY}")
    expect(page.get_by_text("Latest materialization")).to_be_visible()
    row = page.locator("tr", has=page.get_by_text("n_cutouts", exact=True))
    expect(row.get_by_text(str(N_CUTOUTS), exact=True)).to_be_visible()
    ui.shot("asset_page")

    page.locator("tr", has=page.get_by_text("gallery", exact=True)).get_by_text("Show Markdown").click()
    gallery = page.get_by_role("dialog").locator('img[alt="simulated cutouts"]')
    expect(gallery).to_be_visible()
    loaded = gallery.evaluate("img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
    assert min(loaded) > 100, f"the gallery did not render: {loaded}"
    ui.shot("asset_gallery")
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_have_count(0)

    events = _events(local_deployment, materialization["runId"])
    (mat,) = [e for e in events if e["__typename"] == "MaterializationEvent"]
    numeric = sorted(m["label"] for m in mat["metadataEntries"]
                     if m["__typename"] in ("IntMetadataEntry", "FloatMetadataEntry"))
    assert "n_cutouts" in numeric
    page.get_by_role("button", name="Plots").click()
    for label in numeric:
        expect(page.get_by_text(label, exact=True).first).to_be_visible()
    expect(page.locator("canvas")).to_have_count(len(numeric))
    ui.shot("asset_plots")
    ui.assert_no_error()


# ------------------------------------------------------------------------------------------------- GraphQL

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}
"""

RUN = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status tags { key value } assetSelection { path } }
    ... on Error { message }
  }
}
"""

RUN_EVENTS = """
query Events($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message stepKey }
        ... on LogsCapturedEvent { fileKey stepKeys }
        ... on MaterializationEvent {
          assetKey { path }
          partition
          metadataEntries {
            __typename
            label
            ... on IntMetadataEntry { intValue }
            ... on MarkdownMetadataEntry { mdStr }
          }
        }
        ... on ExecutionStepFailureEvent { error { message } }
      }
    }
    ... on Error { message }
  }
}
"""

CAPTURED_LOGS = """
query Logs($logKey: [String!]!) {
  capturedLogsMetadata(logKey: $logKey) { stderrLocation stdoutLocation }
  capturedLogs(logKey: $logKey) { stdout stderr }
}
"""

SENSOR_TICKS = """
query Ticks($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor {
      sensorState {
        status
        ticks(limit: 10) {
          status runIds runKeys cursor skipReason error { message }
          dynamicPartitionsRequestResults { partitionsDefName partitionKeys type }
        }
      }
    }
    ... on Error { message }
  }
}
"""

INSTANCE = """
query {
  instance {
    runLauncher { name }
    runQueueConfig { maxConcurrentRuns }
    concurrencyLimit(concurrencyKey: "gpu") { slotCount }
    daemonHealth { allDaemonStatuses { daemonType required healthy } }
  }
  workspaceOrError {
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        displayMetadata { key value }
        locationOrLoadError { __typename }
      }
    }
  }
}
"""
