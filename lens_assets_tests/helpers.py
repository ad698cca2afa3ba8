"""Test data builders and local servers shared across test modules."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lens_assets.science.families import load_family
from lens_assets.science.ingest import find_fits, ingest_files
from lens_assets.science.shards import build_shards, shard_settings
from lens_assets.science.simulation import simulate_to_directory
from lens_assets.science.surveys import get_survey


def make_sdss_shards(root: Path, *, n: int, seed: int, rows_per_shard: int = 4096):
    """Simulate ``n`` SDSS cutouts under ``root``, ingest them and write shards to ``root/shards``; the catalog."""
    survey = get_survey("sdss")
    simulate_to_directory(survey, load_family("baseline"), n_cutouts=n, seed=seed,
                          out_dir=root / f"raw/sdss/sim-{seed}", workers=1, progress=False)
    catalog = ingest_files(find_fits(root / "raw/sdss"), survey, root=root, workers=1, progress=False).catalog
    build_shards(catalog, survey, root=root, out_dir=root / "shards",
                 settings=shard_settings(survey, rows_per_shard=rows_per_shard), workers=1, progress=False)
    return catalog


def write_promotion(storage, survey: str, version: str) -> None:
    """A ``promoted/<survey>/promotion.json`` naming ``version``, as promoted_model writes it (no checkpoints:
    for tests of what reads only the version, such as the inbox sensor)."""
    import json

    path = storage.path("promoted", survey, "promotion.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"survey": survey, "version": version}))


# ---------------------------------------------------------------- one trained survey shared by the tests that read it

TRAINED_SURVEY = "sdss"
TRAINED_MEMBER = "resnet10t"
TRAINED_N_HELDOUT = 60
TRAINED_HEAD_DROPOUT = 0.2
# every gate the report has, set so that the tiny survey passes them and is promoted (None: not gated, as the tiny
# test split's FNR bin may hold no lens)
PERMISSIVE_GATES = {"min_auroc": 0.0, "min_tpr10": 0.0, "max_ece": 1.0, "min_heldout_auroc": 0.0,
                    "min_lensing_only_auroc": 0.0, "max_fnr_flux_ratio_lt_0_1": None}


def trained_survey_run_config() -> dict:
    """The run config of the whole graph on 200 simulated SDSS cutouts (and 60 of the held-out family): one
    resnet10t member trained for one epoch with head dropout, calibrated, reported on with PERMISSIVE_GATES and
    promoted."""
    return {"ops": {
        "simulated_cutouts": {"config": {"n_cutouts": 200, "n_heldout": TRAINED_N_HELDOUT, "seed": 5, "workers": 1}},
        "cutout_catalog": {"config": {"workers": 1}},
        "psf_matched_shards": {"config": {"workers": 1}},
        "dataset_splits": {"config": {"min_groups_per_stratum": 3}},
        # head dropout: the scored tables carry MC-dropout uncertainties for the tests to check
        "lens_classifier": {"config": {"members": [TRAINED_MEMBER], "epochs": 1, "batch_size": 32, "patience": 2,
                                       "head_dropout": TRAINED_HEAD_DROPOUT}},
        "score_calibrator": {"config": {"batch_size": 48}},
        "bologna_report": {"config": PERMISSIVE_GATES},
    }}


class RunRecord:
    """What a finished ``dg.materialize`` reported, kept after its process is gone: each node's materializations
    and the asset check evaluations, read with the same two methods as dagster's ``ExecuteInProcessResult``."""

    def __init__(self, materializations: dict, check_evaluations: list):
        self._materializations, self._check_evaluations = materializations, check_evaluations

    @classmethod
    def of(cls, result, nodes) -> "RunRecord":
        return cls({n: result.asset_materializations_for_node(n) for n in nodes}, result.get_asset_check_evaluations())

    def asset_materializations_for_node(self, node_name: str) -> list:
        return list(self._materializations[node_name])

    def get_asset_check_evaluations(self) -> list:
        return list(self._check_evaluations)

    def write(self, path: Path) -> None:
        import dagster as dg

        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(dg.serialize_value({"materializations": self._materializations,
                                           "check_evaluations": self._check_evaluations}))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> "RunRecord":
        import dagster as dg

        doc = dg.deserialize_value(path.read_text())
        return cls({k: list(v) for k, v in doc["materializations"].items()}, list(doc["check_evaluations"]))


def build_trained_survey(root: Path) -> RunRecord:
    """Materialize the whole graph (``trained_survey_run_config``) into a LocalStorage at ``root``."""
    import dagster as dg

    from lens_assets.definitions import ASSETS
    from lens_assets.resources.launchers import LocalSubprocessLauncher
    from lens_assets.resources.storage import LocalStorage

    storage = LocalStorage(root=str(root))
    result = dg.materialize(ASSETS, partition_key=TRAINED_SURVEY, run_config=trained_survey_run_config(),
                            resources={"storage": storage, "launcher": LocalSubprocessLauncher()},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    return RunRecord.of(result, [a.op.name for a in ASSETS])


# a local S3 (and ECS, CloudWatch Logs) mock: moto's server, installed with the dev extra's moto[server]
MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (another process can still take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log_path: Path) -> tuple[subprocess.Popen, str]:
    """A moto server process on a free port, its output in ``log_path``; (process, endpoint URL) once it answers."""
    for _ in range(3):  # the port could be taken between choosing and binding it
        port = free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=log, stderr=subprocess.STDOUT)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                return proc, endpoint
            except OSError:
                time.sleep(0.1)
        stop_moto(proc)
    raise RuntimeError(f"moto_server did not start: {Path(log_path).read_text(errors='replace')[-2000:]}")


def stop_moto(proc: subprocess.Popen) -> None:
    """Terminate a moto server process; kill it if it has not exited 10 s later."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


CLUSTER_FIELD_ARCSEC = 32.0  # a small cluster field: the cluster tests' fields simulate and segment fast


def small_cluster_family(tmp_path, name: str = "cluster") -> str:
    """A packaged cluster family on a 32-arcsec field (fast), written under ``tmp_path`` as a TOML path."""
    import re

    from lens_assets.science.families import FAMILY_DIR

    text = (FAMILY_DIR / f"{name}.toml").read_text()
    text = re.sub(r"(?m)^size_arcsec = .*$", f"size_arcsec = {CLUSTER_FIELD_ARCSEC}", text)
    text = re.sub(r"(?m)^min_theta_e_arcsec = .*$", "min_theta_e_arcsec = 3.0", text)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)
