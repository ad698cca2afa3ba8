"""Training runs as plain Lightning on tiny shards and resumes from its last checkpoint."""

import json
import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from lens_assets.ml.module import asinh, augment, scale_input
from lens_assets.ml.progress import epoch_line, figure
from lens_assets.ml.train import TrainSettings, train


def test_asinh_is_torch_asinh_to_its_precision():
    """The vectorized asinh against float64's asinh, over 40 decades of both signs, the switches to log(2a) at 2^60
    and to a at 2^-30, the float32 limit and subnormals: relative error below 2^-23 (torch.asinh's own bound), and
    -0.0, ±inf and NaN as torch gives them; a padded channels_last batch unmodified, its layout kept, its zeros 0.
    Half precision and inputs that need a gradient take torch's path."""
    g = torch.Generator().manual_seed(0)
    a = 10.0 ** (torch.rand(200_000, generator=g, dtype=torch.float64) * 40 - 20)
    x = (a * torch.where(torch.rand(a.shape, generator=g) < 0.5, -1.0, 1.0)).float()
    x = torch.cat([x, torch.tensor([2.0**60, 2.0**60 * 1.0000001, 3.0e38, -3.4e38, 2.0**-30, 2.0**-31, 1e-39, -1e-45,
                                    0.5, 1.0])])
    exact = torch.asinh(x.double())
    bound = torch.finfo(torch.float32).eps * exact.abs()  # 2^-23 relative
    assert ((asinh(x).double() - exact).abs() <= bound).all()
    edge = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    torch.testing.assert_close(asinh(edge), torch.asinh(edge), equal_nan=True)
    assert torch.equal(torch.signbit(asinh(edge[:2])), torch.tensor([False, True]))
    image = torch.zeros(2, 5, 8, 8).to(memory_format=torch.channels_last)  # padding: exact zeros
    image[0, :, 2:6, 2:6] = torch.linspace(-50, 50, 80).reshape(5, 4, 4)
    before = image.clone()
    out = asinh(image)
    assert torch.equal(image, before) and out.is_contiguous(memory_format=torch.channels_last)
    assert ((out.double() - torch.asinh(image.double())).abs() <= torch.finfo(torch.float32).eps
            * torch.asinh(image.double()).abs()).all() and (out[1] == 0).all()
    half = x[:1000].bfloat16()
    assert asinh(half).dtype == torch.bfloat16 and torch.equal(asinh(half), torch.asinh(half.float()).bfloat16())
    leaf = x[:10].clone().requires_grad_()
    asinh(leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, 1 / torch.sqrt(1 + x[:10] ** 2))


def test_scale_input_is_asinh_in_noise_units_and_keeps_colours_when_faint():
    image = torch.tensor([[[[0.01]], [[0.02]]]])  # two bands, one pixel, faint
    variance = torch.full_like(image, 1.0)
    x = scale_input(image, variance)
    assert torch.allclose(x, torch.asinh(image))
    assert x[0, 1, 0, 0] / x[0, 0, 0, 0] == pytest.approx(2.0, rel=1e-3)


def test_scale_input_ignores_padding_and_missing_bands_with_zero_variance():
    """A cutout padded to the grid (or with a missing band) has variance 0 outside its footprint: the noise
    scale is the median of the measured pixels, so the scaled image is the same as that of the unpadded one."""
    image = torch.full((1, 2, 4, 4), 0.3)
    variance = torch.full_like(image, 0.04)  # noise 0.2
    padded = variance.clone()
    padded[:, 1] = 0.0  # the second band missing
    padded[:, 0, :, 3] = 0.0  # and a padded column in the first
    x = scale_input(image, padded)
    assert torch.allclose(x, torch.asinh(image / 0.2))
    assert torch.allclose(x, scale_input(image, variance))
    assert torch.isfinite(scale_input(image, torch.zeros_like(image))).all()  # no measured pixel: clamped, finite


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


def test_zoom_magnifies_keeping_surface_brightness_and_restores_the_noise_to_the_variance():
    """A round Gaussian of sigma 3 px magnified by z has sigma 3z and flux z^2 times (surface brightness kept);
    the zooms span [1, zoom_max]; resampled white noise gets back its variance."""
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(64.0) - 31.5, torch.arange(64.0) - 31.5, indexing="ij")
    blob = torch.exp(-(xx**2 + yy**2) / (2 * 3.0**2))
    image = blob.expand(200, 1, 64, 64).clone()
    out, var = augment(image, torch.zeros_like(image), generator=g, max_shift_px=0.0, zoom_max=2.0)
    flux = out.sum(dim=(2, 3))[:, 0] / blob.sum()
    size = (out[:, 0] * (xx**2 + yy**2)).sum(dim=(1, 2)) / out[:, 0].sum(dim=(1, 2))
    zoom = (size / (2 * (3.0**2 + 1 / 6))).sqrt()  # bilinear interpolation adds its kernel's 1/6 px^2 per axis
    assert torch.allclose(flux, zoom**2, rtol=0.02)
    assert torch.allclose(out[:, 0, 31:33, 31:33].mean(dim=(1, 2)), blob[31:33, 31:33].mean(), rtol=0.02)
    assert zoom.min() < 1.05 and zoom.max() > 1.9 and (zoom > 0.99).all() and (zoom < 2.02).all()
    assert (var == 0).all()
    noise = torch.randn(64, 1, 64, 64, generator=g)
    out, var = augment(noise, torch.ones_like(noise), generator=g, max_extra_noise=0.0, zoom_max=2.0)
    assert out[:, :, 2:-2, 2:-2].std() == pytest.approx(1.0, abs=0.03)
    assert torch.allclose(var[:, :, 2:-2, 2:-2], torch.ones(1))
    out, _ = augment(noise, torch.ones_like(noise), generator=g, max_extra_noise=0.0, max_shift_px=0.5)
    assert out[:, :, 2:-2, 2:-2].std() < 0.9  # without a zoom a sub-pixel shift smooths, and nothing is added
    with pytest.raises(ValueError, match="zoom_max"):
        augment(noise, torch.ones_like(noise), zoom_max=0.5)


def test_resampling_noise_restores_each_pixels_variance_at_a_fixed_zoom():
    """At one zoom (1.37) and shift, white noise of variance 4 resampled bilinearly keeps 4 sum(w^2) at each
    pixel, with sum(w^2) from the pixel's own fractional offsets; the added noise brings every pixel back to 4."""
    import torch.nn.functional as F

    from lens_assets.ml.module import _resampling_noise

    g = torch.Generator().manual_seed(3)
    n, h, w = 4000, 12, 15  # not square: x and y mixed up would fail
    theta = torch.tensor([[[1 / 1.37, 0.0, 0.11], [0.0, 1 / 1.37, -0.07]]]).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    noise = 2.0 * torch.randn(n, 1, h, w, generator=g)
    resampled = F.grid_sample(noise, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = ((grid[0, ..., 0] + 1) * w - 1) / 2  # the pixel coordinates each output pixel reads, by hand
    y = ((grid[0, ..., 1] + 1) * h - 1) / 2
    fx, fy = x - x.floor(), y - y.floor()
    kept = ((1 - fx) ** 2 + fx**2) * ((1 - fy) ** 2 + fy**2)
    inner = (slice(2, -2), slice(2, -2))  # every neighbour inside the stamp
    assert kept[inner].min() < 0.5 and kept[inner].max() > 0.8  # the offsets vary over the stamp
    assert torch.allclose(resampled[:, 0].var(dim=0)[inner], 4 * kept[inner], rtol=0.1)
    restored = resampled + _resampling_noise(grid, torch.full_like(noise, 4.0), g)
    assert torch.allclose(restored[:, 0].var(dim=0)[inner], torch.full((h - 4, w - 4), 4.0), rtol=0.1)


@pytest.mark.parametrize("other", [{"film": True}, {"physics_weight": 0.1}])
def test_zoom_is_refused_with_film_or_the_physics_term_before_training(data, tmp_path, other):
    """Both take the matched PSF as the cutout's own, which a zoom widens; nothing is trained or written."""
    settings = TrainSettings(backbone="resnet10t", epochs=1, batch_size=8, progress=False, zoom_max=1.5, **other)
    with pytest.raises(ValueError, match="widens each cutout's PSF"):
        train(data / "shards", data / "splits.parquet", tmp_path / "run", settings)
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_training_writes_checkpoints_logs_and_resumes_after_an_interruption(data, tmp_path):
    out = tmp_path / "run"
    settings = TrainSettings(backbone="resnet10t", epochs=1, batch_size=8, progress=False, patience=10)
    first = train(data / "shards", data / "splits.parquet", out, settings)
    assert (out / "last.ckpt").exists() and (out / "best.ckpt").exists()
    assert first["resumed_after_epochs"] is None and 0.0 <= first["best_val_auroc"] <= 1.0
    metrics = pd.read_csv(out / "logs" / "version_0" / "metrics.csv")
    assert {"train_loss", "val_loss", "val_auroc"} <= set(metrics.columns)
    # a later run with more epochs (as a retry after a kill would be) continues from last.ckpt, without Lightning's
    # warning that the checkpoint directory is not empty (it holds the run by design)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = train(data / "shards", data / "splits.parquet", out,
                       TrainSettings(**{**settings.__dict__, "epochs": 2}))
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
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


def test_the_epoch_line_gives_the_figures_and_the_time_left_at_the_median_epoch():
    line = epoch_line(2, 5, {"train_loss": 0.41234, "val_auroc": 0.9}, 0.95, [100.0, 40.0], 8000)
    # the last epoch took 40 s (8000 / 40 = 200 img/s); of two epochs the upper median (100 s) is taken, so the
    # 3 epochs left take at most 300 s
    assert line == ("epoch 2/5: train loss 0.412, val AUROC 0.900 (best 0.950), 40 s at 200 img/s, "
                    "about 5.0 min left")
    assert figure(0.8380194306373596) == "0.838" and figure(1) == "1.000" and figure(None) == "n/a"
    assert figure(float("nan")) == "n/a"  # an AUROC of a set without both classes
    assert epoch_line(1, 1, {}, None, [30.0], 300, unit="fields") == (
        "epoch 1/1: train loss n/a, val AUROC n/a (best n/a), 30 s at 10 fields/s, about 0.0 min left")


def test_the_epoch_report_times_from_report_to_report_and_counts_the_rows_trained(monkeypatch):
    from types import SimpleNamespace

    from lens_assets.ml import progress

    clock = iter([100.0, 100.0, 112.0, 130.0])  # made, training starts, epoch 1 ends, epoch 2 (cut short) ends
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines = []
    best = SimpleNamespace(best_model_score=None)
    report = progress.EpochReport(lines.append, 40, best, label="m: ")
    report.on_train_start(None, None)
    batch = {"label": torch.zeros(8)}
    for _ in range(5):  # 40 rows in 12 s
        report.on_train_batch_end(None, None, None, batch, 0)
    trainer = SimpleNamespace(callback_metrics={"train_loss": torch.tensor(0.5), "val_auroc": torch.tensor(0.7)},
                              current_epoch=0, max_epochs=3)
    report.on_train_epoch_end(trainer, None)
    best.best_model_score = torch.tensor(0.7)
    for _ in range(2):  # a time limit stops the next epoch after 16 rows, 18 s later
        report.on_train_batch_end(None, None, None, batch, 0)
    trainer.current_epoch, trainer.callback_metrics["val_auroc"] = 1, torch.tensor(0.6)
    report.on_train_epoch_end(trainer, None)
    assert lines == ["m: epoch 1/3: train loss 0.500, val AUROC 0.700 (best 0.700), 12 s at 3 img/s, "
                     "about 0.4 min left",
                     "m: epoch 2/3: train loss 0.500, val AUROC 0.600 (best 0.700), 18 s at 1 img/s, "
                     "about 0.3 min left"]


def test_training_reports_its_set_up_and_every_epoch_with_the_logged_figures(data, tmp_path):
    lines = []
    settings = TrainSettings(backbone="resnet10t", epochs=2, batch_size=8, progress=False, patience=10)
    summary = train(data / "shards", data / "splits.parquet", tmp_path / "run", settings, report=lines.append)
    assert len(lines) == 3
    assert lines[0].startswith(f"training resnet10t for 2 epochs into {tmp_path / 'run'} on cpu: "
                               f"{summary['precision']}, {summary['threads']} threads")
    assert f"{summary['n_train']} training rows in batches of 8; epochs 1 to 2" in lines[0]
    metrics = pd.read_csv(tmp_path / "run" / "logs" / "version_0" / "metrics.csv")
    val = [e["val_auroc"] for e in summary["val_auroc_by_epoch"]]
    for epoch, line in enumerate(lines[1:]):
        found = re.fullmatch(r"epoch (\d)/2: train loss (\S+), val AUROC (\S+) \(best (\S+)\), \d+ s at \d+ img/s, "
                             r"about ([\d.]+) min left", line)
        assert found, line
        assert int(found[1]) == epoch + 1
        train_loss = metrics.loc[metrics["epoch"] == epoch, "train_loss"].dropna()
        assert float(found[2]) == pytest.approx(float(train_loss.iloc[0]), abs=5e-4)
        assert float(found[3]) == pytest.approx(val[epoch], abs=5e-4)
        assert float(found[4]) == pytest.approx(max(val[: epoch + 1]), abs=5e-4)  # this epoch's counts
    assert float(found[4]) == pytest.approx(summary["best_val_auroc"], abs=5e-4)
    assert float(found[5]) == 0.0
    # a resumed start says where it resumes; a start with nothing left to train says so
    more = []
    longer = TrainSettings(**{**settings.__dict__, "epochs": 3})
    train(data / "shards", data / "splits.parquet", tmp_path / "run", longer, report=more.append)
    assert len(more) == 2 and "epochs 3 to 3 (resumed after 2)" in more[0] and more[1].startswith("epoch 3/3: ")
    none = []
    train(data / "shards", data / "splits.parquet", tmp_path / "run", settings, report=none.append)
    assert none == [f"training resnet10t for 2 epochs into {tmp_path / 'run'}: 3 epochs already trained, "
                    "nothing to fit"]


def test_the_row_cache_trains_the_same_weights_and_gives_the_stop_half_what_the_train_split_leaves(data, tmp_path):
    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.train import cache_bytes

    base = dict(backbone="resnet10t", epochs=2, batch_size=8, progress=False, patience=10)
    runs = {gb: train(data / "shards", data / "splits.parquet", tmp_path / f"run{gb}",
                      TrainSettings(**base, cache_gb=gb)) for gb in (0.0, 1.0)}
    assert runs[0.0]["cached_rows"] == 0
    assert runs[1.0]["cached_rows"] == runs[1.0]["n_train"] + runs[1.0]["n_val_stop"]
    weights = [torch.load(tmp_path / f"run{gb}" / "last.ckpt", weights_only=True)["state_dict"] for gb in (0.0, 1.0)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    fingerprints = {json.loads((tmp_path / f"run{gb}" / "run.json").read_text())["fingerprint"] for gb in (0.0, 1.0)}
    assert len(fingerprints) == 1  # how the rows are read is not what is trained: either may resume the other
    # a budget of the train split alone leaves nothing to the stop half
    row = ShardDataset(data / "shards").row_bytes()
    n_train = runs[1.0]["n_train"]
    only = train(data / "shards", data / "splits.parquet", tmp_path / "only",
                 TrainSettings(**base, cache_gb=(n_train * row + 1) / 1e9))  # at least n_train rows, not one more
    assert only["cached_rows"] == n_train
    assert cache_bytes(TrainSettings(cache_gb=2.0, num_workers=2)) == 0  # each worker would hold its own
    assert cache_bytes(TrainSettings(cache_gb=2.0)) == 2 * 10**9


def test_the_automatic_row_cache_is_a_share_of_the_available_memory(monkeypatch):
    import lens_assets.ml.data as data_module
    from lens_assets.ml.train import AUTO_CACHE_SHARE, cache_bytes

    monkeypatch.setattr(data_module, "available_memory_bytes", lambda: 10 * 10**9)
    assert cache_bytes(TrainSettings(cache_gb=-1.0)) == int(AUTO_CACHE_SHARE * 10 * 10**9)
    assert cache_bytes(TrainSettings(cache_gb=0.0)) == 0


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


# --- CPU precision, threads and memory format -------------------------------------------------------------


def test_cpu_training_reports_its_precision_threads_and_memory_format(data, tmp_path):
    import os

    from lens_assets.ml.precision import cpu_bf16_supported

    s = train(data / "shards", data / "splits.parquet", tmp_path / "run",
              TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False))
    if not torch.cuda.is_available():
        assert s["precision"] == ("bf16-mixed" if cpu_bf16_supported() else "32-true")
    assert s["threads"] == len(os.sched_getaffinity(0)) == torch.get_num_threads()
    assert s["channels_last"] is True and s["film"] is False
    forced = train(data / "shards", data / "splits.parquet", tmp_path / "fp32",
                   TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False, precision="32-true"))
    assert forced["precision"] == "32-true"


def test_unknown_precision_is_a_clear_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"precision 'fp16' is not one of \['auto', 'bf16-mixed', '32-true'\]"):
        TrainSettings(precision="fp16")


# --- FiLM conditioning on the observing conditions --------------------------------------------------------


def _film_batch(n=6, bands=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, bands, size, size, generator=g) * 0.1
    variance = torch.rand(n, bands, size, size, generator=g) * 0.02 + 0.005
    fwhm = torch.rand(n, bands, generator=g) + 0.8
    flags = torch.zeros(n, bands, dtype=torch.uint8)
    flags[0, 1] = 1  # a missing band
    return image, variance, fwhm, flags


def test_observing_conditions_are_fwhm_log_noise_and_band_presence():
    from lens_assets.ml.module import observing_conditions

    variance = torch.full((1, 2, 4, 4), 1e-4)  # noise 0.01 nanomaggies: log10 = -2
    c = observing_conditions(variance, torch.tensor([[1.2, 0.9]]), torch.tensor([[0, 1]], dtype=torch.uint8))
    assert torch.allclose(c, torch.tensor([[1.2, 0.0, -2.0, 0.0, 1.0, 0.0]]))  # band 2 missing: only its flag
    padded = variance.clone()
    padded[..., :2] = 0.0  # half the cutout outside the footprint: the noise is that of the measured pixels
    high_bits = torch.tensor([[1024, 1 | 2048]], dtype=torch.int32)  # shard format 2 flags above 8 bits
    assert torch.allclose(observing_conditions(padded, torch.tensor([[1.2, 0.9]]), high_bits), c)


def test_film_with_a_zero_final_layer_is_the_unconditioned_model_at_init():
    from lens_assets.ml.module import LensClassifier

    torch.manual_seed(0)
    plain = LensClassifier(backbone="resnet10t", in_chans=3, img_size=32).eval()
    torch.manual_seed(0)
    film = LensClassifier(backbone="resnet10t", in_chans=3, img_size=32, film=True).eval()
    film.net.load_state_dict(plain.net.state_dict())
    image, variance, fwhm, flags = _film_batch()
    with torch.no_grad():
        assert torch.allclose(film(image, variance, fwhm, flags), plain(image, variance), atol=1e-6)
        assert torch.equal(film(image, variance, fwhm, flags), film(image, variance, fwhm * 2, flags))
    with pytest.raises(ValueError, match=r"a FiLM member \(resnet10t\) needs fwhm_before and band_flags"):
        film(image, variance)


def test_after_a_training_step_the_conditions_change_the_output():
    from lens_assets.ml.module import LensClassifier

    torch.manual_seed(1)
    model = LensClassifier(backbone="resnet10t", in_chans=3, img_size=32, film=True, augment=False)
    image, variance, fwhm, flags = _film_batch()
    batch = {"image": image, "variance": variance, "fwhm_before": fwhm, "band_flags": flags,
             "label": torch.tensor([1.0, 0, 1, 0, 1, 0]), "label_confidence": torch.ones(6)}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model._loss(batch, model._forward_batch(batch))
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        a = model(image, variance, fwhm, flags)
        b = model(image, variance, fwhm * 2, flags)
    assert not torch.allclose(a, b)


def test_a_film_member_trains_from_shards_and_scores(data, tmp_path):
    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.score import load_member, member_logits

    s = train(data / "shards", data / "splits.parquet", tmp_path / "film",
              TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False, film=True))
    assert s["film"] is True
    member = load_member(s["best_checkpoint"])
    assert member.needs_conditions
    z = member_logits([member], ShardDataset(data / "shards"), device="cpu")
    assert z.shape == (32, 1) and np.isfinite(z).all()


def test_theta_e_balance_draws_train_rows_by_their_scene_weights_and_is_recorded(data, tmp_path):
    from lens_assets.ml.data import balance_weights, row_truth
    from lens_assets.ml.train import _loaders

    plain, _, _ = _loaders(data / "shards", data / "splits.parquet", TrainSettings(backbone="resnet10t"), 8)
    assert isinstance(plain.sampler, torch.utils.data.RandomSampler)
    loader, _, ds = _loaders(data / "shards", data / "splits.parquet",
                             TrainSettings(backbone="resnet10t", theta_e_balance=1.0), 8)
    sampler = loader.sampler
    assert isinstance(sampler, torch.utils.data.WeightedRandomSampler) and sampler.replacement
    assert sampler.num_samples == len(ds)
    want = balance_weights(row_truth(data / "shards", ds.objid, "scene_theta_e"), 1.0)
    assert np.allclose(sampler.weights.numpy(), want)
    assert len(set(np.round(want, 6))) > 1  # the tiny set's lenses span more than one radius bin
    for bad, match in (({"theta_e_balance": 1.5}, r"theta_e_balance must be in \[0, 1\], got 1.5"),
                       ({"theta_e_balance": 0.5, "fresh_fraction": 0.25}, "cannot be combined")):
        with pytest.raises(ValueError, match=match):
            _loaders(data / "shards", data / "splits.parquet", TrainSettings(backbone="resnet10t", **bad), 8)
    s = train(data / "shards", data / "splits.parquet", tmp_path / "balanced",
              TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False, theta_e_balance=1.0))
    assert s["theta_e_balance"] == 1.0 and s["epochs_run"] == 1


# --- two-stage training: initial weights ------------------------------------------------------------------


def test_weights_path_initializes_training_and_stays_out_of_the_checkpoint(data, tmp_path):
    first = train(data / "shards", data / "splits.parquet", tmp_path / "stage1",
                  TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False))
    s = train(data / "shards", data / "splits.parquet", tmp_path / "stage2",
              TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, lr=0.0, progress=False,
                            weights_path=first["best_checkpoint"], augment=False))
    assert s["weights_path"] == first["best_checkpoint"]
    a = torch.load(first["best_checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(s["best_checkpoint"], weights_only=True)
    assert "weights_path" not in b["hyper_parameters"]
    assert torch.equal(a["net.conv1.0.weight"], b["state_dict"]["net.conv1.0.weight"])  # lr 0: the loaded ones


@pytest.mark.parametrize("run_json", ['{"fingerprint": "abc', None], ids=["truncated", "missing"])
def test_a_checkpoint_whose_run_json_is_unreadable_or_missing_is_not_resumed(data, tmp_path, caplog, run_json):
    """A checkpoint of unknown origin (its run.json corrupt or gone) is discarded with a warning naming the file
    and what was wrong, never resumed."""
    out = tmp_path / "run"
    settings = TrainSettings(backbone="resnet10t", epochs=1, batch_size=8, progress=False, patience=10)
    train(data / "shards", data / "splits.parquet", out, settings)
    if run_json is None:
        (out / "run.json").unlink()
    else:
        (out / "run.json").write_text(run_json)
    with caplog.at_level("WARNING", logger="lens_assets.ml.train"):
        again = train(data / "shards", data / "splits.parquet", out, TrainSettings(**{**settings.__dict__,
                                                                                      "epochs": 2}))
    assert again["restarted_stale_run"] is True and again["resumed_after_epochs"] is None
    assert again["global_step"] == 2 * -(-again["n_train"] // 8)  # two epochs from scratch
    expected = (r"run\.json: missing beside best\.ckpt, last\.ckpt, logs" if run_json is None
                else r"run\.json: unreadable \(JSONDecodeError")
    assert any(re.search(str(out) + "/" + expected, r.getMessage()) for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert json.loads((out / "run.json").read_text())["fingerprint"] == again["fingerprint"]


def test_a_stale_restart_starts_a_clean_log_so_old_epochs_do_not_leak_into_the_new_run(data, tmp_path):
    out = tmp_path / "run"
    settings = TrainSettings(backbone="resnet10t", epochs=2, batch_size=8, progress=False, patience=10)
    first = train(data / "shards", data / "splits.parquet", out, settings)
    assert [e["epoch"] for e in first["val_auroc_by_epoch"]] == [0, 1]
    other = train(data / "shards", data / "splits.parquet", out,
                  TrainSettings(**{**settings.__dict__, "lr": 5e-4, "epochs": 1}))
    assert other["restarted_stale_run"] is True
    assert [e["epoch"] for e in other["val_auroc_by_epoch"]] == [0]  # not the old run's epoch 1
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["version_0"]


def test_run_and_summary_json_are_replaced_whole_when_the_writer_dies_mid_write(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    settings = TrainSettings(backbone="resnet10t", epochs=1, batch_size=8, progress=False, patience=10)
    first = train(data / "shards", data / "splits.parquet", out, settings)
    from pathlib import Path

    real = Path.write_text

    def dies_half_way_through_summary(self, text, *args, **kwargs):
        if self.name.endswith(".tmp") and "summary.json" in self.name or self.name == "summary.json":
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(f"{self}: disk full")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", dies_half_way_through_summary)
    with pytest.raises(OSError, match="disk full"):
        train(data / "shards", data / "splits.parquet", out, TrainSettings(**{**settings.__dict__, "epochs": 2}))
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == first["epochs_run"] == 1
    assert json.loads((out / "run.json").read_text())["fingerprint"] == first["fingerprint"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("text, match", [('[1, 2]', r"run\.json: fingerprint is 'a list'; expected"),
                                         ('{"settings": {}}', r"run\.json: fingerprint is 'missing'; expected"),
                                         ('{"fingerprint": 3}', r"run\.json: fingerprint is 3; expected"),
                                         (b"\xff\xfe", r"run\.json: unreadable \(UnicodeDecodeError")])
def test_an_unreadable_run_json_is_an_error_naming_file_field_and_value(tmp_path, text, match):
    from lens_assets.ml.train import _previous_fingerprint

    (tmp_path / "run.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=match):
        _previous_fingerprint(tmp_path)
    assert _previous_fingerprint(tmp_path / "nothing-here") is None


# --- colour residual (RingFinder band difference) ---------------------------------------------------------


def test_colour_residual_cancels_a_uniform_colour_deflector_and_keeps_what_is_bluer():
    from lens_assets.ml.module import colour_residual

    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    deflector = torch.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / (2 * 3.0**2))
    arc = torch.zeros(32, 32)
    arc[6, 8:24] = 0.2  # far from the centre box: it does not change alpha
    image = torch.zeros(2, 3, 32, 32)
    image[:, 0] = 0.4 * deflector  # blue = 0.4 red: the deflector's colour
    image[:, 2] = deflector
    image[1, 0] += arc  # the second cutout has a blue arc
    variance = torch.full_like(image, 0.01**2)
    out = colour_residual(image, variance, blue=0, red=2)
    assert out.shape == (2, 1, 32, 32)
    s = math.sqrt(0.01**2 * (1 + 0.4**2))  # noise of blue - 0.4 red
    torch.testing.assert_close(out[0, 0], torch.zeros(32, 32), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, 0], torch.asinh(arc / s), atol=1e-4, rtol=1e-5)
    # a centre with no red flux: alpha 0, the residual is the blue band itself
    empty = torch.zeros_like(image)
    empty[:, 0] = 1.0
    torch.testing.assert_close(colour_residual(empty, variance, blue=0, red=2)[:, 0],
                               torch.full((2, 32, 32), math.asinh(1.0 / 0.01)))


def test_a_colour_residual_member_trains_with_one_more_channel_and_scores(data, tmp_path):
    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.module import LensClassifier
    from lens_assets.ml.score import load_member, member_logits

    s = train(data / "shards", data / "splits.parquet", tmp_path / "residual",
              TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False, colour_residual=True))
    assert s["residual_bands"] == ["u", "r"]  # sdss: the bluest band and the reference band
    member = load_member(s["best_checkpoint"])
    assert tuple(member.hparams.residual_bands) == (0, 2)
    first = next(p for p in member.net.parameters() if p.dim() == 4)
    assert first.shape[1] == 6  # five bands and the residual
    z = member_logits([member], ShardDataset(data / "shards"), device="cpu")
    assert z.shape == (32, 1) and np.isfinite(z).all()
    with pytest.raises(ValueError, match=r"residual_bands \(2, 2\) must be two different band indices below "
                                         r"in_chans=5"):
        LensClassifier(backbone="resnet10t", in_chans=5, residual_bands=(2, 2))


def test_the_radial_residual_removes_a_round_deflector_and_keeps_an_arc():
    from lens_assets.ml.module import radial_median_model, radial_residual

    h = 64
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) - 31.5, torch.arange(h, dtype=torch.float32) - 31.5,
                            indexing="ij")
    r, theta = torch.sqrt(xx**2 + yy**2), torch.atan2(yy, xx)
    deflector = 100.0 * torch.exp(-(r**2) / (2 * 6.0**2))  # round: its own radial profile
    arc = 5.0 * torch.exp(-((r - 12.0) ** 2) / 2.0) * (theta.abs() < 0.6)  # a fifth of the circle at 12 px
    image = torch.stack([deflector, deflector + arc])[:, None].repeat(1, 2, 1, 1)  # (2 cutouts, 2 bands)
    model = radial_median_model(image)
    # the round light is modelled to the interpolation's error (a percent of its peak), the arc is not modelled
    assert (model[0] - image[0]).abs().max() < 0.01 * 100.0
    on_arc = arc > 4.0
    resid = (image - model)[1, 0]
    assert resid[on_arc].mean() > 0.9 * arc[on_arc].mean()
    assert resid[(arc < 0.01) & (r < 25)].abs().max() < 1.0
    variance = torch.full_like(image, 0.5**2)
    out = radial_residual(image, variance)
    assert out.shape == image.shape
    torch.testing.assert_close(out, torch.asinh((image - model) / 0.5), atol=1e-5, rtol=1e-5)


def test_a_radial_residual_member_trains_with_a_channel_more_per_band_and_scores(data, tmp_path):
    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.module import LensClassifier
    from lens_assets.ml.score import load_member, member_logits

    s = train(data / "shards", data / "splits.parquet", tmp_path / "radial",
              TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False, radial_residual=True))
    assert s["radial_residual"] is True
    member = load_member(s["best_checkpoint"])
    assert member.hparams.radial_residual
    first = next(p for p in member.net.parameters() if p.dim() == 4)
    assert first.shape[1] == 10  # five bands and their residuals
    z = member_logits([member], ShardDataset(data / "shards"), device="cpu")
    assert z.shape == (32, 1) and np.isfinite(z).all()
    # initial weights for the bands: kept, with zero weights on the residual channels
    torch.save(LensClassifier(backbone="resnet10t", in_chans=5, img_size=48).state_dict(), tmp_path / "s1.pt")
    both = LensClassifier(backbone="resnet10t", in_chans=5, img_size=48, residual_bands=(0, 2), radial_residual=True,
                          weights_path=str(tmp_path / "s1.pt"))
    assert both.net.conv1[0].in_channels == 11 and (both.net.conv1[0].weight[:, 5:] == 0).all()


def test_the_elliptical_residual_removes_an_elliptical_deflector_that_circles_leave_and_keeps_an_arc():
    """An elliptical Gaussian deflector (q = 0.5 at 0.6 rad) with an arc at 12 px: adaptive moments find its
    shape; the median on its ellipses reproduces it to 2% of its peak, where the radial median leaves a third of
    the peak as a quadrupole; the arc survives. A round deflector gets the radial model back."""
    import math

    from lens_assets.ml.module import (deflector_shape, elliptical_median_model, elliptical_residual,
                                       radial_median_model)

    h = 64
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) - 31.5, torch.arange(h, dtype=torch.float32) - 31.5,
                            indexing="ij")
    theta, q = 0.6, 0.5
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    deflector = 100.0 * torch.exp(-(u**2 + (v / q) ** 2) / (2 * 5.0**2))
    r, phi = torch.sqrt(xx**2 + yy**2), torch.atan2(yy, xx)
    arc = 5.0 * torch.exp(-((r - 12.0) ** 2) / 2.0) * (phi.abs() < 0.6)
    image = torch.stack([deflector, deflector + arc])[:, None].repeat(1, 3, 1, 1)
    got_q, got_theta = deflector_shape(image)
    assert got_q[0] == pytest.approx(q, abs=0.02)
    assert math.cos(2 * (float(got_theta[0]) - theta)) == pytest.approx(1.0, abs=1e-3)  # an axis: modulo pi
    model = elliptical_median_model(image)
    assert (model[0] - image[0]).abs().max() < 0.02 * 100.0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training's autocast leaves the model in float32
        assert torch.equal(elliptical_median_model(image), model)
    assert (radial_median_model(image)[0] - image[0]).abs().max() > 0.3 * 100.0
    on_arc = arc > 4.0
    assert (image - model)[1, 0][on_arc].mean() > 0.9 * arc[on_arc].mean()
    round_ = (100.0 * torch.exp(-(r**2) / (2 * 6.0**2)))[None, None]
    torch.testing.assert_close(elliptical_median_model(round_), radial_median_model(round_), atol=1e-3, rtol=0)
    empty = torch.zeros(1, 2, h, h)  # no light: round, finite
    assert deflector_shape(empty)[0] == pytest.approx(1.0) and torch.isfinite(elliptical_median_model(empty)).all()
    variance = torch.full_like(image, 0.5**2)
    torch.testing.assert_close(elliptical_residual(image, variance), torch.asinh((image - model) / 0.5),
                               atol=1e-5, rtol=1e-5)


def test_an_elliptical_residual_member_trains_with_a_channel_more_per_band_and_scores(data, tmp_path):
    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.module import LensClassifier
    from lens_assets.ml.score import load_member, member_logits

    s = train(data / "shards", data / "splits.parquet", tmp_path / "elliptical",
              TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False, elliptical_residual=True))
    assert s["elliptical_residual"] is True
    member = load_member(s["best_checkpoint"])
    first = next(p for p in member.net.parameters() if p.dim() == 4)
    assert first.shape[1] == 10  # five bands and their residuals
    z = member_logits([member], ShardDataset(data / "shards"), device="cpu")
    assert z.shape == (32, 1) and np.isfinite(z).all()
    with pytest.raises(ValueError, match="choose one"):
        LensClassifier(backbone="resnet10t", in_chans=5, radial_residual=True, elliptical_residual=True)


def test_initial_weights_for_the_bands_are_kept_and_the_residual_channel_starts_at_zero(tmp_path):
    from lens_assets.ml.module import LensClassifier

    torch.manual_seed(3)
    stage1 = LensClassifier(backbone="resnet10t", in_chans=5, img_size=48)
    torch.save(stage1.state_dict(), tmp_path / "stage1.pt")
    member = LensClassifier(backbone="resnet10t", in_chans=5, img_size=48, residual_bands=(0, 2),
                            weights_path=str(tmp_path / "stage1.pt"))
    before, after = stage1.net.conv1[0].weight, member.net.conv1[0].weight
    assert after.shape[1] == 6 and member.net.conv1[0].in_channels == 6
    torch.testing.assert_close(after[:, :5], before)  # per-band filters as trained, not averaged
    assert (after[:, 5] == 0).all()
    # so the widened member answers as the stage-1 model does, whatever the residual channel holds
    image, variance = torch.rand(4, 5, 48, 48), torch.full((4, 5, 48, 48), 0.01)
    torch.testing.assert_close(member.eval()(image, variance), stage1.eval()(image, variance))


def test_the_run_fingerprint_follows_the_shards_data_version_and_the_settings_that_change_training(data, tmp_path):
    import shutil

    from lens_assets.ml.train import run_fingerprint

    base = TrainSettings(backbone="resnet10t")
    fp = run_fingerprint(data / "shards", data / "splits.parquet", base)
    rebuilt = tmp_path / "shards"
    shutil.copytree(data / "shards", rebuilt)
    manifest = json.loads((rebuilt / "manifest.json").read_text())
    manifest["seconds"] += 12.5  # a rebuild of the same data: another build time, the same data version
    (rebuilt / "manifest.json").write_text(json.dumps(manifest, indent=1))
    assert run_fingerprint(rebuilt, data / "splits.parquet", base) == fp
    manifest["sha256"] = "0" * 64  # other data
    (rebuilt / "manifest.json").write_text(json.dumps(manifest))
    assert run_fingerprint(rebuilt, data / "splits.parquet", base) != fp
    assert run_fingerprint(data / "shards", data / "splits.parquet",
                           TrainSettings(backbone="resnet10t", colour_residual=True)) != fp
    assert run_fingerprint(data / "shards", data / "splits.parquet",
                           TrainSettings(backbone="resnet10t", radial_residual=True)) != fp
    for option in ({"elliptical_residual": True}, {"float32_stem": True}, {"ema_epochs": 1.0}):
        assert run_fingerprint(data / "shards", data / "splits.parquet",
                               TrainSettings(backbone="resnet10t", **option)) != fp, option
    assert run_fingerprint(data / "shards", data / "splits.parquet",
                           TrainSettings(backbone="resnet10t", epochs=3)) == fp


def test_an_upsampled_member_sees_its_input_interpolated_and_trains_and_scores(data, tmp_path):
    import torch.nn.functional as F

    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.module import LensClassifier
    from lens_assets.ml.score import load_member, member_logits

    image, variance = torch.rand(2, 5, 16, 16), torch.ones(2, 5, 16, 16)
    plain = LensClassifier(backbone="resnet10t", in_chans=5, img_size=16)
    up = LensClassifier(backbone="resnet10t", in_chans=5, img_size=16, upsample=2)
    x = up.network_input(image, variance)
    assert x.shape == (2, 5, 32, 32)
    torch.testing.assert_close(x, F.interpolate(plain.network_input(image, variance), scale_factor=2,
                                                mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="upsample"):
        LensClassifier(backbone="resnet10t", in_chans=5, img_size=16, upsample=5)
    s = train(data / "shards", data / "splits.parquet", tmp_path / "up",
              TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False, upsample=2))
    assert s["upsample"] == 2
    member = load_member(s["best_checkpoint"])
    assert member.hparams.upsample == 2
    z = member_logits([member], ShardDataset(data / "shards"), device="cpu")
    assert np.isfinite(z).all()


def test_the_arc_attention_branch_is_rotation_invariant_starts_at_zero_and_trains(data, tmp_path):
    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.module import LensClassifier, TangentialAttention
    from lens_assets.ml.score import load_member, member_logits

    torch.manual_seed(0)
    branch = TangentialAttention(5).double()
    torch.nn.init.normal_(branch.head.weight)
    torch.nn.init.normal_(branch.separation_bias)
    x = torch.randn(3, 5, 64, 64, dtype=torch.float64)
    out = branch(x)
    # a 90-degree rotation about the centre rolls the polar grid by a quarter of its angles
    torch.testing.assert_close(branch(torch.rot90(x, 1, dims=(2, 3))), out, rtol=1e-4,
                               atol=1e-4 * float(out.detach().abs().max()))
    assert (out - branch(torch.roll(x, 5, dims=3))).abs().max() > 1e-3  # not blind: a shifted stamp differs
    # the polar grid: a ring of radius 16 px lights the radius index 16 / 32 * 16 = 8 at every angle
    yy, xx = torch.meshgrid(torch.arange(64.0) - 31.5, torch.arange(64.0) - 31.5, indexing="ij")
    ring = torch.exp(-((torch.sqrt(xx**2 + yy**2) - 16.0) ** 2) / 2.0)[None, None]
    polar = TangentialAttention(1).polar(ring)[0, 0]
    assert int(polar.mean(dim=1).argmax()) in (7, 8) and float(polar[7:9].std(dim=1).max()) < 0.05
    # zero-initialized head: the member starts as the plain one with the same backbone weights
    image, variance = torch.rand(4, 5, 32, 32), torch.ones(4, 5, 32, 32)
    arc = LensClassifier(backbone="resnet10t", in_chans=5, img_size=32, arc_attention=True).eval()
    plain = LensClassifier(backbone="resnet10t", in_chans=5, img_size=32).eval()
    plain.load_state_dict({k: v for k, v in arc.state_dict().items() if not k.startswith("arc.")})
    with torch.no_grad():
        torch.testing.assert_close(arc(image, variance), plain(image, variance))
    s = train(data / "shards", data / "splits.parquet", tmp_path / "arc",
              TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False, arc_attention=True))
    assert s["arc_attention"] is True
    member = load_member(s["best_checkpoint"])
    assert member.arc is not None and float(member.arc.head.weight.detach().abs().sum()) > 0  # it learned something
    assert np.isfinite(member_logits([member], ShardDataset(data / "shards"), device="cpu")).all()


def test_the_lensed_template_is_an_einstein_ring_and_the_consistency_prefers_the_true_lens():
    from lens_assets.ml.module import lensed_template, physics_consistency

    # an SIS with the source behind its centre: a ring of radius theta_E
    ring = lensed_template(torch.tensor([[8.0, 0, 0, 0, 0, 0, 0, 0.7]]), 64, 1.0)[0]
    yy, xx = torch.meshgrid(torch.arange(64.0) - 31.5, torch.arange(64.0) - 31.5, indexing="ij")
    r = torch.sqrt(xx**2 + yy**2)
    profile = torch.stack([ring[(r >= k) & (r < k + 1)].mean() for k in range(16)])
    assert int(profile.argmax()) in (7, 8) and float(profile[:4].max()) < 0.01 * float(profile.max())
    # arcs of an off-centre source on a round deflector: the true lens fits better than a wrong one
    truth = torch.tensor([[7.0, 0.1, -0.05, 0.02, 0.0, 2.0, -1.0, 0.8]])
    arcs = lensed_template(truth, 64, 1.5)
    deflector = 50.0 * torch.exp(-(r**2) / (2 * 4.0**2))
    image = torch.stack([deflector + 3.0 * arcs[0], deflector + 5.0 * arcs[0]])[None]  # (1, 2 bands, H, W)
    variance = torch.full_like(image, 0.01)
    wrong = truth.clone()
    wrong[0, 0] = 10.0
    good, bad = physics_consistency(image, variance, truth, 1.5), physics_consistency(image, variance, wrong, 1.5)
    assert float(good) < 0.5 * float(bad)


def test_training_with_the_physics_loss_logs_its_terms_and_counts_failures(data, tmp_path, monkeypatch):
    import lens_assets.ml.module as module

    s = train(data / "shards", data / "splits.parquet", tmp_path / "physics",
              TrainSettings(backbone="resnet10t", epochs=2, batch_size=16, progress=False, physics_weight=0.1,
                            physics_warmup_epochs=1))
    assert s["physics_weight"] == 0.1 and s["physics_failures"] == 0
    logs = pd.concat(pd.read_csv(p) for p in (tmp_path / "physics" / "logs").rglob("metrics.csv"))
    for key in ("physics_consistency", "physics_gate_mean", "physics_weight_now"):
        assert logs[key].notna().any(), key
    assert sorted(logs["physics_weight_now"].dropna().unique()) == pytest.approx([0.0, 0.1])  # curriculum: 0, then full
    assert s["best_checkpoint"]
    # a term that is not finite is counted and that batch trains on BCE alone
    monkeypatch.setattr(module, "physics_consistency", lambda *a, **k: torch.full((a[0].shape[0],), float("nan")))
    s = train(data / "shards", data / "splits.parquet", tmp_path / "nan",
              TrainSettings(backbone="resnet10t", epochs=2, batch_size=16, progress=False, physics_weight=0.1,
                            physics_warmup_epochs=1))
    assert s["physics_failures"] > 0 and s["best_checkpoint"]


def test_a_float32_stem_sees_the_input_unrounded_under_bf16_autocast():
    """Under bf16 autocast a Conv2d rounds its input to 8 significant bits: a pixel difference of 0.01 on a
    value of 6 (the scaled core of a bright deflector) is lost. The float32 stem keeps it, returns float32, keeps
    the state dict's keys, and matches the float32 convolution; the layers after it still run in bf16."""
    from lens_assets.ml.backbones import create_backbone, first_conv
    from lens_assets.ml.module import Float32Conv2d, float32_first_conv

    net = create_backbone("regnetx_002", in_chans=2, img_size=16, num_classes=1).eval()
    keys = list(net.state_dict())
    conv = first_conv(net)
    x = torch.full((1, 2, 16, 16), 6.0)
    x[..., 8, 8] += 0.01  # below bf16's step of 2^-5 at 6
    assert (x.bfloat16().float()[..., 8, 8] == 6.0).all()
    bump = x.clone()
    bump[..., 8, 8] = 6.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded, rounded_bump = conv(x), conv(bump)
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded, rounded_bump)  # the bump is lost in the rounded input
    expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                          conv.groups)
    float32_first_conv(net)
    assert type(conv) is Float32Conv2d and list(net.state_dict()) == keys
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, kept_bump = conv(x), conv(bump)
        logit = net(x)
    assert kept.dtype == torch.float32 and logit.dtype == torch.bfloat16
    torch.testing.assert_close(kept, expected)
    assert (kept - kept_bump).abs().max() > 1e-4  # the bump reaches the stem's output
    with pytest.raises(ValueError, match="not a Conv2d"):
        float32_first_conv(net)  # already converted: refused rather than wrapped twice

    class TwoStems(torch.nn.Module):  # e.g. fastvit: parallel first convolutions
        pretrained_cfg = {"first_conv": ("a", "b")}

    with pytest.raises(ValueError, match=r"2 first convolutions in parallel \(a, b\)"):
        float32_first_conv(TwoStems())


def test_a_float32_stem_member_trains_records_it_and_scores_with_it(data, tmp_path):
    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.module import Float32Conv2d
    from lens_assets.ml.backbones import first_conv
    from lens_assets.ml.score import load_member, member_logits

    s = train(data / "shards", data / "splits.parquet", tmp_path / "stem",
              TrainSettings(backbone="resnet10t", epochs=1, batch_size=16, progress=False, float32_stem=True,
                            precision="bf16-mixed"))
    assert s["float32_stem"] is True and s["precision"] == "bf16-mixed"
    member = load_member(s["best_checkpoint"])
    assert member.hparams.float32_stem and type(first_conv(member.net)) is Float32Conv2d
    z = member_logits([member], ShardDataset(data / "shards"), device="cpu")
    assert z.shape == (32, 1) and np.isfinite(z).all()


def test_the_weight_average_follows_its_decay_and_is_what_eval_mode_scores():
    """One update moves every averaged weight and batch-norm statistic by (1 - decay) towards the live one, the
    decay being 1 - 1/(epochs x steps) once that many updates are done and the running mean before: the first
    update copies the live weights, the k-th weighs them 1/k. Eval mode classifies with the average, training with
    the live weights; a member without one has no copy."""
    from lens_assets.ml.module import LensClassifier

    torch.manual_seed(0)
    m = LensClassifier(backbone="resnet10t", in_chans=2, img_size=32, ema_epochs=2.0)
    assert LensClassifier(backbone="resnet10t", in_chans=2, img_size=32).ema is None
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in m.ema["net"].state_dict().items()}
    m.ema_updates.fill_(1000)  # past the start: the decay is the memory's
    decay = m.update_weight_average(steps_per_epoch=50)
    assert decay == pytest.approx(1 - 1 / 100)
    after = m.ema["net"].state_dict()
    for k, v in m.net.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(after[k], decay * before[k] + (1 - decay) * v)
    # the average started as the initial weights, which training then moved by +1: it moves by (1 - decay)
    torch.testing.assert_close(after["conv1.0.weight"] - before["conv1.0.weight"],
                               torch.full_like(before["conv1.0.weight"], 1 - decay))
    m.ema_updates.fill_(0)
    assert m.update_weight_average(steps_per_epoch=50) == 0.0  # the first copies
    torch.testing.assert_close(m.ema["net"].state_dict()["conv1.0.weight"], m.net.state_dict()["conv1.0.weight"])
    first = m.net.state_dict()["conv1.0.weight"].clone()
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(3.0)
    assert m.update_weight_average(steps_per_epoch=50) == pytest.approx(0.5)  # the mean of the two
    torch.testing.assert_close(m.ema["net"].state_dict()["conv1.0.weight"], first + 1.5)
    # eval mode scores with the average: here another initialization's weights, the live ones a first one's
    torch.manual_seed(1)
    m.ema["net"].load_state_dict(LensClassifier(backbone="resnet10t", in_chans=2, img_size=32).net.state_dict())
    torch.manual_seed(2)
    m.net.load_state_dict(LensClassifier(backbone="resnet10t", in_chans=2, img_size=32).net.state_dict())
    image, variance = torch.rand(3, 2, 32, 32), torch.ones(3, 2, 32, 32)
    m.eval()
    averaged = m(image, variance)
    torch.testing.assert_close(averaged, m.ema["net"](m.network_input(image, variance)).squeeze(1))
    assert not torch.allclose(averaged, m.net(m.network_input(image, variance)).squeeze(1))
    # training steps the live weights
    m.train()
    torch.testing.assert_close(m(image, variance), m.net(m.network_input(image, variance)).squeeze(1))
    # with head dropout the features and the head are both the average's: deterministic logits and MC samples
    torch.manual_seed(3)
    hd = LensClassifier(backbone="resnet10t", in_chans=2, img_size=32, ema_epochs=1.0, head_dropout=0.5)
    torch.manual_seed(4)
    hd.ema["net"].load_state_dict(LensClassifier(backbone="resnet10t", in_chans=2, img_size=32).net.state_dict())
    hd.eval()
    ema_net = hd.ema["net"]
    features = ema_net.forward_head(ema_net.forward_features(hd.network_input(image, variance)), pre_logits=True)
    torch.testing.assert_close(hd(image, variance), ema_net.get_classifier()(features).squeeze(1))
    det, samples = hd.mc_dropout_logits(image, variance, n_samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(det, ema_net.get_classifier()(features).squeeze(1))
    draws = torch.rand((4, *features.shape), generator=torch.Generator().manual_seed(0)) < 0.5
    torch.testing.assert_close(samples, ema_net.get_classifier()(features[None] * draws / 0.5).squeeze(-1))
    with pytest.raises(ValueError, match="ema_epochs"):
        LensClassifier(backbone="resnet10t", in_chans=2, ema_epochs=-1.0)


def test_a_weight_averaged_member_trains_records_it_and_scores_with_the_average(data, tmp_path):
    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.score import load_member, member_logits

    s = train(data / "shards", data / "splits.parquet", tmp_path / "ema",
              TrainSettings(backbone="resnet10t", epochs=2, batch_size=16, progress=False, ema_epochs=1.0))
    assert s["ema_epochs"] == 1.0
    member = load_member(s["best_checkpoint"])
    assert int(member.ema_updates) > 0
    ds = ShardDataset(data / "shards")
    z = member_logits([member], ds, device="cpu")
    assert z.shape == (32, 1) and np.isfinite(z).all()
    # the scores are the average's: the live weights score otherwise
    member.ema = None
    assert not np.allclose(member_logits([member], ds, device="cpu"), z)
