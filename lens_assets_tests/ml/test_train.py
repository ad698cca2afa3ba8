"""Training runs as plain Lightning on tiny shards and resumes from its last checkpoint."""

import json

import pandas as pd
import pytest
import torch

from lens_assets.ml.module import augment, scale_input
from lens_assets.ml.train import TrainSettings, train
from lens_assets.science.splits import make_splits
from lens_assets_tests.helpers import make_sdss_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    catalog = make_sdss_shards(root, n=32, seed=4)
    make_splits(catalog, reference_band="r", seed=0, min_groups_per_stratum=3).table.to_parquet(
        root / "splits.parquet")
    return root


def test_scale_input_is_asinh_in_noise_units_and_keeps_colours_when_faint():
    image = torch.tensor([[[[0.01]], [[0.02]]]])  # two bands, one pixel, faint
    variance = torch.full_like(image, 1.0)
    x = scale_input(image, variance)
    assert torch.allclose(x, torch.asinh(image))
    assert x[0, 1, 0, 0] / x[0, 0, 0, 0] == pytest.approx(2.0, rel=1e-3)


def test_augmentation_preserves_flux_and_colours_and_adds_noise_from_the_variance():
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(4, 3, 32, 32)
    image[:, :, 12:20, 12:20] = torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    variance = torch.zeros_like(image)  # no noise: only geometry acts
    out, _ = augment(image, variance, generator=g)
    flux = out.sum(dim=(2, 3))
    assert torch.allclose(flux, image.sum(dim=(2, 3)), rtol=1e-4)  # bilinear sub-pixel shift keeps flux
    assert torch.allclose(flux / flux[:, :1], torch.tensor([1.0, 2.0, 3.0]).expand(4, 3), rtol=1e-4)
    noisy, var_out = augment(torch.zeros(256, 1, 16, 16), torch.ones(256, 1, 16, 16), generator=g,
                             max_shift_px=0.0)
    assert 0.0 < noisy.std() < 0.5 and (var_out >= 1).all()


def test_training_writes_checkpoints_logs_and_resumes_after_an_interruption(data):
    out = data / "run"
    settings = TrainSettings(backbone="resnet10t", epochs=1, batch_size=8, progress=False, patience=10)
    first = train(data / "shards", data / "splits.parquet", out, settings)
    assert (out / "last.ckpt").exists() and (out / "best.ckpt").exists()
    assert first["resumed_after_epochs"] is None and 0.0 <= first["best_val_auroc"] <= 1.0
    metrics = pd.read_csv(out / "logs" / "version_0" / "metrics.csv")
    assert {"train_loss", "val_loss", "val_auroc"} <= set(metrics.columns)
    # a later run with more epochs (as a retry after a kill would be) continues from last.ckpt
    second = train(data / "shards", data / "splits.parquet", out, TrainSettings(**{**settings.__dict__, "epochs": 2}))
    assert second["resumed_after_epochs"] == 1
    assert (out / "logs" / "version_1" / "metrics.csv").exists() and metrics.equals(
        pd.read_csv(out / "logs" / "version_0" / "metrics.csv"))  # the first run's log is kept
    assert second["global_step"] > first["global_step"]
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2
    assert [e["epoch"] for e in second["val_auroc_by_epoch"]] == [0, 1]  # both starts' logs
    # asking for fewer epochs than are done trains nothing and reports the run as it stands
    checkpoint_bytes = (out / "last.ckpt").read_bytes()
    third = train(data / "shards", data / "splits.parquet", out, TrainSettings(**{**settings.__dict__, "epochs": 1}))
    assert third["resumed_after_epochs"] == 2 and third["epochs_run"] == 2
    assert third["global_step"] == second["global_step"] and third["train_img_per_s"] == 0.0
    assert third["best_checkpoint"] == second["best_checkpoint"]
    assert third["best_val_auroc"] == pytest.approx(second["best_val_auroc"])
    assert (out / "last.ckpt").read_bytes() == checkpoint_bytes
    assert third["val_auroc_by_epoch"] == second["val_auroc_by_epoch"]


def test_last_checkpoint_is_written_every_epoch_even_when_validation_does_not_improve(data, tmp_path):
    """lr = 0: only batch-norm statistics move, and validation AUROC stops improving (here it reaches 1.0 at
    epoch 1 and stays). last.ckpt must still be each epoch's (a retry resumes where the kill happened);
    best.ckpt stays at the first epoch with the highest AUROC."""
    out = tmp_path / "flat"
    settings = TrainSettings(backbone="resnet10t", epochs=3, batch_size=8, lr=0.0, progress=False, patience=10)
    s = train(data / "shards", data / "splits.parquet", out, settings)
    aurocs = [e["val_auroc"] for e in s["val_auroc_by_epoch"]]
    assert len(aurocs) == 3 and aurocs[2] <= max(aurocs[:2])  # the premise: the last epoch did not improve
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 2
    assert torch.load(out / "best.ckpt", weights_only=True)["epoch"] == aurocs.index(max(aurocs))
    again = train(data / "shards", data / "splits.parquet", out, TrainSettings(**{**settings.__dict__, "epochs": 4}))
    assert again["resumed_after_epochs"] == 3 and again["epochs_run"] == 4


def test_empty_split_is_a_clear_error(data, tmp_path):
    splits = pd.read_parquet(data / "splits.parquet")
    splits.loc[splits["split"] == "val", "split"] = "test"
    splits.to_parquet(tmp_path / "s.parquet")
    with pytest.raises(ValueError, match=r"s.parquet: the val split is empty"):
        train(data / "shards", tmp_path / "s.parquet", tmp_path / "run", TrainSettings(epochs=1, progress=False))


def test_a_checkpoint_of_another_run_is_not_resumed(data, tmp_path):
    out = tmp_path / "run"
    splits = data / "splits.parquet"
    settings = TrainSettings(backbone="resnet10t", epochs=1, batch_size=8, progress=False, patience=10)
    first = train(data / "shards", splits, out, settings)
    assert first["restarted_stale_run"] is False and first["resumed_after_epochs"] is None
    if not torch.cuda.is_available():
        assert first["batch_size"] == 8 and first["batch_size_probe"] is None
    # another learning rate: the checkpoint is discarded and training starts from scratch
    other_lr = train(data / "shards", splits, out, TrainSettings(**{**settings.__dict__, "lr": 5e-4, "epochs": 2}))
    assert other_lr["restarted_stale_run"] is True and other_lr["resumed_after_epochs"] is None
    assert other_lr["fingerprint"] != first["fingerprint"] and other_lr["epochs_run"] == 2
    # other splits (one training cutout moved to test), same settings: discarded again
    table = pd.read_parquet(splits)
    table.loc[table.index[table["split"] == "train"][0], "split"] = "test"
    table.to_parquet(tmp_path / "other_splits.parquet")
    settings_2 = TrainSettings(**{**settings.__dict__, "lr": 5e-4, "epochs": 2})
    other_splits = train(data / "shards", tmp_path / "other_splits.parquet", out, settings_2)
    assert other_splits["restarted_stale_run"] is True and other_splits["resumed_after_epochs"] is None
    assert other_splits["global_step"] == 2 * -(-other_splits["n_train"] // 8)  # two epochs from scratch
    assert json.loads((out / "run.json").read_text())["fingerprint"] == other_splits["fingerprint"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_batch_size_comes_from_the_memory_probe(data, tmp_path):
    settings = TrainSettings(backbone="resnet10t", epochs=1, batch_size=8, max_batch_size=64, progress=False)
    s = train(data / "shards", data / "splits.parquet", tmp_path / "run", settings)
    assert s["device"] == "cuda" and s["batch_size_probe"] is not None
    assert s["batch_size"] == s["batch_size_probe"]["batch_size"] <= 64
    assert s["global_step"] == -(-s["n_train"] // s["batch_size"])


def test_the_cosine_schedule_follows_the_current_run_length_after_a_resume():
    """CosineAnnealingLR stored its length in the checkpoint, so a run extended from 4 to 8 epochs climbed back
    up the cosine after epoch 4. The schedule's state now holds only the epoch: the new length applies."""
    import math

    from lens_assets.ml.module import LensClassifier

    def lrs(model, steps, state=None):
        cfg = model.configure_optimizers()
        opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
        if state is not None:  # as Lightning resumes: scheduler state restored, then on_train_start
            sched.load_state_dict(state)
            model.apply_schedule(sched)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, sched.state_dict()

    first = LensClassifier(backbone="resnet10t", in_chans=1, img_size=16, lr=1e-3, max_epochs=4)
    got, state = lrs(first, 2)
    assert got == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 4))])
    extended = LensClassifier(backbone="resnet10t", in_chans=1, img_size=16, lr=1e-3, max_epochs=8)
    got, _ = lrs(extended, 6, state)  # epochs 2..7 of an 8-epoch run
    assert got == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * e / 8)) for e in range(2, 8)])
    assert all(a > b for a, b in zip(got, got[1:]))  # decreasing all the way, no climb after epoch 4
