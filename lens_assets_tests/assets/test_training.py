"""lens_classifier launches training through Dagster Pipes (a real subprocess) and resumes on re-materialization."""

import hashlib

import dagster as dg
import pytest

from lens_assets.assets.catalog import cutout_catalog
from lens_assets.assets.shards import dataset_splits, psf_matched_shards
from lens_assets.assets.simulation import simulated_cutouts
from lens_assets.assets.training import lens_classifier
from lens_assets.resources.launchers import EcsLauncher, LocalSubprocessLauncher


def _meta(result):
    (mat,) = result.asset_materializations_for_node("lens_classifier")
    return {k: v.value for k, v in mat.metadata.items()}


def test_training_job_runs_under_pipes_and_resumes(storage):
    resources = {"storage": storage, "launcher": LocalSubprocessLauncher()}
    dg.materialize([simulated_cutouts, cutout_catalog, psf_matched_shards, dataset_splits], partition_key="sdss",
                   resources=resources, instance=dg.DagsterInstance.ephemeral(),
                   run_config={"ops": {"simulated_cutouts": {"config": {"n_cutouts": 24, "seed": 3, "workers": 1}},
                                       "dataset_splits": {"config": {"min_groups_per_stratum": 3}}}})
    sources = [a.to_source_asset() for a in (psf_matched_shards, dataset_splits)]

    def run(epochs):
        cfg = {"members": ["resnet10t"], "epochs": epochs, "batch_size": 8, "patience": 10}
        return dg.materialize([lens_classifier, *sources], partition_key="sdss", resources=resources,
                              instance=dg.DagsterInstance.ephemeral(),
                              run_config={"ops": {"lens_classifier": {"config": cfg}}})

    first = _meta(run(1))
    ckpt = first["resnet10t/checkpoint"]
    assert hashlib.sha256(open(ckpt, "rb").read()).hexdigest() == first["resnet10t/checkpoint_sha256"]
    assert 0.0 <= first["resnet10t/best_val_auroc"] <= 1.0 and first["resnet10t/device"] == "cpu"
    assert first["resnet10t/train_img_per_s"] > 0 and first["resnet10t/resumed_after_epochs"] == 0
    assert len(first["resnet10t/val_auroc_by_epoch"]) == 1
    second = _meta(run(2))  # a retry with the same member continues from its last checkpoint
    assert second["resnet10t/resumed_after_epochs"] == 1 and second["resnet10t/epochs_run"] == 2


def test_ecs_launcher_requests_a_gpu_task_running_the_training_module():
    launcher = EcsLauncher(cluster="lens", task_definition="train:3", subnets=["subnet-1"], gpu_count=1)
    params = launcher.run_task_params()
    (container,) = params["overrides"]["containerOverrides"]
    assert container["command"] == ["python", "-m", "lens_assets.ml.train"]
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
