"""lens_classifier launches training through Dagster Pipes (a real subprocess) and resumes on re-materialization."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import torch

from lens_assets.assets.catalog import cutout_catalog
from lens_assets.assets.shards import dataset_splits, psf_matched_shards
from lens_assets.assets.simulation import simulated_cutouts
from lens_assets.assets.training import lens_classifier
from lens_assets.resources.launchers import EcsLauncher, LocalSubprocessLauncher
from lens_assets.resources.storage import LocalStorage


def _meta(result):
    (mat,) = result.asset_materializations_for_node("lens_classifier")
    return {k: v.value for k, v in mat.metadata.items()}


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """A data root with shards and splits of 24 simulated SDSS cutouts, built once for this module."""
    storage = LocalStorage(root=str(tmp_path_factory.mktemp("inputs") / "data"))
    dg.materialize([simulated_cutouts, cutout_catalog, psf_matched_shards, dataset_splits], partition_key="sdss",
                   resources={"storage": storage}, instance=dg.DagsterInstance.ephemeral(),
                   run_config={"ops": {"simulated_cutouts": {"config": {"n_cutouts": 24, "seed": 3, "workers": 1}},
                                       "cutout_catalog": {"config": {"workers": 1}},
                                       "psf_matched_shards": {"config": {"workers": 1}},
                                       "dataset_splits": {"config": {"min_groups_per_stratum": 3}}}})
    return storage.root_path


def _copy_inputs(tiny_inputs, storage):
    """The shards and splits lens_classifier reads (they hold no absolute paths)."""
    for sub in ("shards", "splits"):
        shutil.copytree(tiny_inputs / sub, storage.path(sub))


def _train(resources, cfg, instance=None):
    sources = [a.to_source_asset() for a in (psf_matched_shards, dataset_splits)]
    return dg.materialize([lens_classifier, *sources], partition_key="sdss", resources=resources,
                          instance=instance or dg.DagsterInstance.ephemeral(),
                          run_config={"ops": {"lens_classifier": {"config": cfg}}})


@pytest.mark.slow  # two Pipes training jobs of its own settings (batch size 8, 1 then 2 epochs)
def test_training_job_runs_under_pipes_and_resumes(storage, tiny_inputs):
    resources = {"storage": storage, "launcher": LocalSubprocessLauncher()}
    _copy_inputs(tiny_inputs, storage)

    instance = dg.DagsterInstance.ephemeral()

    def run(epochs):
        return _train(resources, {"members": ["resnet10t"], "epochs": epochs, "batch_size": 8, "patience": 10},
                      instance)

    result = run(1)
    # the job's progress reaches the run's event log, where the UI shows it while the job trains
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    started = [m for m in messages if m.startswith("training resnet10t for 1 epochs into ")]
    assert len(started) == 1 and " on cpu: " in started[0]  # one start line, from train()
    assert [m for m in messages if m.startswith("epoch 1/1: train loss ")]
    assert [m for m in messages if re.fullmatch(r"best val AUROC \d\.\d{3} at \d+ img/s on cpu", m)]  # rounded
    first = _meta(result)
    ckpt = first["resnet10t/checkpoint"]
    assert hashlib.sha256(Path(ckpt).read_bytes()).hexdigest() == first["resnet10t/checkpoint_sha256"]
    assert 0.0 <= first["resnet10t/best_val_auroc"] <= 1.0 and first["resnet10t/device"] == "cpu"
    assert first["resnet10t/train_img_per_s"] > 0 and first["resnet10t/resumed_after_epochs"] == 0
    assert len(first["resnet10t/val_auroc_by_epoch"]) == 1 and first["resnet10t/batch_size"] == 8
    second = _meta(run(2))  # a retry with the same member continues from its last checkpoint
    assert second["resnet10t/resumed_after_epochs"] == 1 and second["resnet10t/epochs_run"] == 2
    again = run(2)  # the same run again (a second make demo): every epoch trained, the job says it fitted none
    messages = [e.user_message for e in instance.all_logs(again.run_id)]
    assert [m for m in messages if m.endswith(": 2 epochs already trained, nothing to fit")]
    assert [m for m in messages if re.fullmatch(r"best val AUROC \d\.\d{3} \(no epoch fitted in this run\) on cpu",
                                                m)]
    meta = _meta(again)
    assert meta["resnet10t/resumed_after_epochs"] == meta["resnet10t/epochs_run"] == 2
    assert meta["resnet10t/epochs_fitted"] == 0 and second["resnet10t/epochs_fitted"] == 1


def test_film_precision_and_initial_weights_reach_the_training_job(trained_survey_copy, tmp_path):
    """The asset's config is the job's: a FiLM member in float32, initialized from another member's checkpoint
    (a copy of the session's trained survey, whose resnet10t member trained first in the same folder)."""
    storage = trained_survey_copy.storage()
    resources = {"storage": storage, "launcher": LocalSubprocessLauncher()}
    first = _meta(trained_survey_copy.run)
    init = tmp_path / "stage1.ckpt"
    shutil.copy(first["resnet10t/checkpoint"], init)
    second = _meta(_train(resources, {"members": ["resnet10t"], "epochs": 1, "batch_size": 8, "film": True,
                                      "colour_residual": True, "radial_residual": True, "precision": "32-true",
                                      "weights_path": str(init)}))
    assert second["resnet10t/precision"] == "32-true" and second["resnet10t/resumed_after_epochs"] == 0
    assert second["resnet10t/residual_bands"] == "u,r"  # sdss: the bluest band and the reference band
    ckpt = torch.load(second["resnet10t/checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["film"] is True and any(k.startswith("film.") for k in ckpt["state_dict"])
    assert tuple(ckpt["hyper_parameters"]["residual_bands"]) == (0, 2)
    assert ckpt["hyper_parameters"]["radial_residual"] is True and second["resnet10t/radial_residual"] is True
    # the 5-band first-stage weights initialize an 11-channel first convolution (bands, colour residual, one
    # radial residual per band)
    assert ckpt["state_dict"]["net.conv1.0.weight"].shape[1] == 11
    summary = json.loads((Path(second["resnet10t/checkpoint"]).parent / "summary.json").read_text())
    assert summary["weights_path"] == str(init) and summary["film"] is True


@pytest.mark.parametrize("cfg, error, message", [
    ({"members": ["resnet10t", "nope"]}, dg.Failure, r"members \['nope'\] not known; backbones are \["),
    ({"precision": "fp16"}, dg.DagsterInvalidConfigError,
     r"precision not in enum type Literal\['auto', 'bf16-mixed', '32-true'\] got fp16"),
    ({"weights_path": "/nonexistent/w.pt"}, dg.Failure, r"weights_path: /nonexistent/w.pt is not a file"),
])
def test_bad_training_config_fails_before_any_job_starts(storage, tiny_inputs, cfg, error, message):
    _copy_inputs(tiny_inputs, storage)
    with pytest.raises(error, match=message):
        _train({"storage": storage, "launcher": LocalSubprocessLauncher()}, cfg)


# materializes lens_classifier in a process of its own (argv: storage root, config as JSON)
_MATERIALIZE = """
import json, sys
import dagster as dg
from lens_assets.assets.shards import dataset_splits, psf_matched_shards
from lens_assets.assets.training import lens_classifier
from lens_assets.resources.launchers import LocalSubprocessLauncher
from lens_assets.resources.storage import LocalStorage
dg.materialize([lens_classifier, psf_matched_shards.to_source_asset(), dataset_splits.to_source_asset()],
               partition_key="sdss", instance=dg.DagsterInstance.ephemeral(),
               resources={"storage": LocalStorage(root=sys.argv[1]), "launcher": LocalSubprocessLauncher()},
               run_config={"ops": {"lens_classifier": {"config": json.loads(sys.argv[2])}}})
"""


@pytest.mark.slow  # a run killed mid-training in a process of its own, then resumed
def test_killed_training_resumes_from_its_checkpoint_on_rematerialization(storage, tiny_inputs, tmp_path):
    resources = {"storage": storage, "launcher": LocalSubprocessLauncher()}
    _copy_inputs(tiny_inputs, storage)
    cfg = {"members": ["resnet10t"], "epochs": 30, "batch_size": 8, "patience": 30}
    member_dir = storage.path("models", "sdss", "resnet10t")
    last = member_dir / "last.ckpt"
    log = tmp_path / "killed_run.log"
    with open(log, "wb") as out:  # a session of its own: its process group is Dagster and the Pipes training job
        proc = subprocess.Popen([sys.executable, "-c", _MATERIALIZE, storage.root, json.dumps(cfg)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert last.exists(), f"no last.ckpt (exit code {proc.poll()}):\n{log.read_text()[-3000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    k = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"]) + 1  # epochs finished before the kill
    assert 1 <= k < 30
    resumed = _meta(_train(resources, {**cfg, "epochs": k + 2}))
    assert resumed["resnet10t/resumed_after_epochs"] == k and resumed["resnet10t/epochs_run"] == k + 2
    # the killed start's epochs and the resumed start's two, each epoch once, gathered over both logs
    assert [e["epoch"] for e in resumed["resnet10t/val_auroc_by_epoch"]] == list(range(k + 2))
    assert sorted(p.name for p in (member_dir / "logs").iterdir()) == ["version_0", "version_1"]


def test_ecs_launcher_requests_a_gpu_task_running_the_training_module():
    launcher = EcsLauncher(cluster="lens", task_definition="train:3", subnets=["subnet-1"], gpu_count=1)
    params = launcher.run_task_params()
    (container,) = params["overrides"]["containerOverrides"]
    assert container["command"] == ["python", "-m", "lens_assets.resources.train_remote"]  # syncs with S3
    assert container["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    assert params["cluster"] == "lens" and params["taskDefinition"] == "train:3"
    assert params["networkConfiguration"]["awsvpcConfiguration"]["subnets"] == ["subnet-1"]


def test_lens_classifier_is_in_the_gpu_pool():
    assert lens_classifier.op.pool == "gpu"


def test_unknown_launcher_kind_is_a_clear_error(monkeypatch):
    from lens_assets.definitions import training_launcher

    monkeypatch.setenv("LENS_LAUNCHER", "slurm")
    with pytest.raises(ValueError, match=r"LENS_LAUNCHER='slurm' is not one of \['local', 'ecs'\]"):
        training_launcher()


def test_weights_path_on_a_launcher_that_does_not_share_the_disk_is_refused(storage, tiny_inputs, tmp_path):
    _copy_inputs(tiny_inputs, storage)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    launcher = LocalSubprocessLauncher(shares_filesystem=False)
    with pytest.raises(dg.Failure, match=r"weights_path: LocalSubprocessLauncher runs the job where .*w.pt cannot be "
                                         r"read"):
        _train({"storage": storage, "launcher": launcher}, {"weights_path": str(weights)})


def test_every_lens_classifier_config_field_reaches_the_training_job_by_name():
    """lens_classifier passes its config to the job as TrainSettings fields of the same names: a config field
    the job does not know would fail every launch, one the config lacks could not be set from the UI."""
    from dataclasses import fields

    from lens_assets.assets.training import TrainConfig
    from lens_assets.ml.train import TrainSettings

    config = set(TrainConfig.model_fields) - {"members"}
    settings = {f.name for f in fields(TrainSettings)}
    assert config <= settings
    # what the job sets for itself or only the CLI sets (device, loader, the GPU probe's cap, progress bars)
    assert settings - config == {"backbone", "weight_decay", "num_workers", "augment", "accelerator", "progress",
                                 "max_batch_size"}
