"""Ensemble scoring: member checkpoints, batched member logits and the fusion of member logits."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from lens_assets.ml.data import ShardDataset, collate
from lens_assets.ml.module import LensClassifier
from lens_assets.ml.precision import cpu_bf16_supported
from lens_assets.ml.score import FUSION_METHODS, Fusion, fit_fusion, load_member, load_members, member_logits
from lens_assets.ml.train import TrainSettings, train
from lens_assets.science.splits import make_splits
from lens_assets_tests.helpers import make_sdss_shards


def _member_data(n=300, seed=0):
    """Logits of three members of different quality and the labels they were drawn from."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.4).astype(int)
    signal = np.where(y == 1, 1.0, -1.0)
    z = np.stack([signal * s + rng.normal(0, 1, n) for s in (2.0, 1.0, 0.3)], axis=1)
    return z, y


# --- fusion -----------------------------------------------------------------------------------------


def test_val_weights_fusion_is_scikit_learns_logistic_regression_on_the_member_logits():
    z, y = _member_data()
    fusion = fit_fusion(z, y, method="val_weights")
    lr = LogisticRegression(C=1.0).fit(z, y)
    assert fusion.method == "val_weights"
    np.testing.assert_allclose(fusion.weights, lr.coef_[0], rtol=1e-6)
    assert fusion.bias == pytest.approx(lr.intercept_[0], rel=1e-6)
    # the fused logit is the regression's decision function, so sigmoid(fused) is its probability
    np.testing.assert_allclose(fusion(z), lr.decision_function(z), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(1 / (1 + np.exp(-fusion(z))), lr.predict_proba(z)[:, 1], rtol=1e-9)
    # the better member (larger separation) gets the larger weight
    assert fusion.weights[0] > fusion.weights[1] > fusion.weights[2]


def test_mean_fusion_is_the_arithmetic_mean_of_member_logits():
    z = np.array([[1.0, 2.0, 6.0], [-3.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    fused = Fusion.mean(3)(z)
    np.testing.assert_allclose(fused, [3.0, -1.0, 0.5])
    np.testing.assert_allclose(fused, z.mean(axis=1))
    fitted = fit_fusion(z, [1, 0, 1], method="mean")  # "mean" ignores the labels
    assert fitted == Fusion.mean(3) and fitted.bias == 0.0


def test_fusion_round_trips_through_a_plain_dict():
    z, y = _member_data(seed=1)
    for fusion in (fit_fusion(z, y, method="val_weights"), Fusion.mean(3)):
        d = fusion.to_dict()
        assert set(d) == {"method", "weights", "bias"}
        back = Fusion.from_dict(d)
        assert back == fusion
        np.testing.assert_array_equal(back(z), fusion(z))


@pytest.mark.parametrize("logits,match", [
    (np.zeros((4, 2)), r"expected logits of shape \(n, 3\), got \(4, 2\)"),
    (np.zeros(3), r"expected logits of shape \(n, 3\), got \(3,\)"),
    (np.zeros((2, 3, 1)), r"expected logits of shape \(n, 3\), got \(2, 3, 1\)"),
])
def test_fusion_of_logits_of_the_wrong_shape_is_a_clear_error(logits, match):
    with pytest.raises(ValueError, match=match):
        Fusion.mean(3)(logits)


def test_unknown_fusion_method_is_a_clear_error_listing_the_methods():
    z, y = _member_data(n=20)
    with pytest.raises(ValueError, match=r"fusion method 'median' is not one of \['mean', 'val_weights'\]"):
        fit_fusion(z, y, method="median")
    assert FUSION_METHODS == ("mean", "val_weights")


def test_val_weights_fusion_needs_both_classes():
    z, _ = _member_data(n=20)
    with pytest.raises(ValueError, match=r"needs both lenses and non-lenses"):
        fit_fusion(z, np.ones(20, int), method="val_weights")


# --- checkpoints and member logits ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """32 SDSS cutouts in shards and one resnet10t member trained for one epoch on them."""
    root = tmp_path_factory.mktemp("score")
    catalog = make_sdss_shards(root, n=32, seed=6, rows_per_shard=12)  # three shards: batches cross shard files
    make_splits(catalog, reference_band="r", seed=0, min_groups_per_stratum=3).table.to_parquet(
        root / "splits.parquet")
    summary = train(root / "shards", root / "splits.parquet", root / "run",
                    TrainSettings(backbone="resnet10t", epochs=1, batch_size=8, progress=False, patience=10))
    return root, summary["best_checkpoint"]


def _direct_logits(model, dataset):
    """The model applied to every row of ``dataset`` in one batch, without member_logits."""
    batch = collate(dataset.__getitems__(list(range(len(dataset)))))
    with torch.inference_mode():
        return model(batch["image"], batch["variance"]).float().numpy()


def test_load_member_restores_the_trained_network_in_eval_mode(trained):
    _, ckpt = trained
    model = load_member(ckpt)
    assert isinstance(model, LensClassifier) and not model.training
    assert model.hparams.backbone == "resnet10t"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    restored = model.state_dict()
    assert set(restored) == set(state)
    for k, v in state.items():
        assert torch.equal(restored[k], v), k


@pytest.mark.parametrize("batch_size", [7, 5, 64])
def test_member_logits_equal_the_model_applied_directly_whatever_the_batch_size(trained, batch_size):
    root, ckpt = trained
    dataset = ShardDataset(root / "shards")
    assert len(dataset) == 32 and (batch_size >= 32 or 32 % batch_size != 0)
    model = load_member(ckpt)
    direct = _direct_logits(model, dataset)
    out = member_logits([model], dataset, batch_size=batch_size, device="cpu", precision="32-true")
    assert out.shape == (32, 1) and out.dtype == np.float32
    assert torch.allclose(torch.from_numpy(out[:, 0]), torch.from_numpy(direct), rtol=1e-5, atol=1e-5)


def test_member_logits_have_one_column_per_member_in_order_and_rows_in_objid_order(trained, tmp_path):
    root, ckpt = trained
    trained_model = load_member(ckpt)
    torch.manual_seed(123)  # a second member: same architecture, other weights, saved as a checkpoint
    other = LensClassifier(**trained_model.hparams)
    other_ckpt = tmp_path / "other.ckpt"
    torch.save({"hyper_parameters": dict(trained_model.hparams), "state_dict": other.state_dict()}, other_ckpt)
    members = load_members([ckpt, other_ckpt])

    objids = pd.read_parquet(root / "shards" / "rows.parquet")["objid"].tolist()[::-1][:23]  # reversed subset
    dataset = ShardDataset(root / "shards", objids=objids)
    assert list(dataset.objid) == objids
    out = member_logits(members, dataset, batch_size=7, device="cpu", precision="32-true")
    assert out.shape == (23, 2)
    expected = np.stack([_direct_logits(m, dataset) for m in members], axis=1)
    assert torch.allclose(torch.from_numpy(out), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[:, 0], out[:, 1])  # the columns really are different members
    swapped = member_logits(members[::-1], dataset, batch_size=7, device="cpu", precision="32-true")
    np.testing.assert_allclose(swapped, out[:, ::-1], rtol=1e-5, atol=1e-5)
    # row i is objid i: scoring one object alone gives its row
    alone = member_logits(members, ShardDataset(root / "shards", objids=[objids[9]]), batch_size=7, device="cpu",
                          precision="32-true")
    np.testing.assert_allclose(alone[0], out[9], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("content", [
    {"a": torch.zeros(1)},
    {"hyper_parameters": {"backbone": "resnet10t"}},  # no state_dict
    torch.zeros(3),
    [1, 2],
])
def test_a_file_that_is_not_a_lightning_checkpoint_is_a_clear_error_naming_it(tmp_path, content):
    path = tmp_path / "weights.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=rf"{path}: not a LensClassifier checkpoint"):
        load_member(path)


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_a_file_torch_cannot_read_is_a_clear_error_naming_it(trained, tmp_path, kind):
    _, ckpt = trained
    path = tmp_path / "member.ckpt"
    data = Path(ckpt).read_bytes()
    path.write_bytes(b"this is a text file, not a checkpoint" if kind == "text" else data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path}: not a LensClassifier checkpoint \(torch cannot read it"):
        load_member(path)


def test_a_missing_checkpoint_is_the_os_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        load_member(tmp_path / "absent.ckpt")


def test_bf16_scoring_is_close_to_float32_and_ranks_alike(trained):
    """bf16 autocast (the CPU default where the CPU has native bf16; forced here, so it runs on any CPU) against
    float32 on the same member and rows: logits within a small absolute bound, returned as float32, ranked alike."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    root, ckpt = trained
    dataset = ShardDataset(root / "shards")
    model = load_member(ckpt)
    assert model.memory_format == torch.channels_last  # a CNN member scores in channels_last
    fp32 = member_logits([model], dataset, batch_size=16, device="cpu", precision="32-true")[:, 0]
    bf16 = member_logits([model], dataset, batch_size=16, device="cpu", precision="bf16-mixed")[:, 0]
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)  # bf16 really ran
    scale = max(1.0, float(np.abs(fp32).max()))
    assert np.abs(bf16 - fp32).max() <= 0.05 * scale
    assert spearmanr(bf16, fp32).statistic > 0.98
    labels = dataset.__getitems__(list(range(len(dataset))))["label"]
    # 32 rows: one swapped lens/non-lens pair moves the AUROC by 1/256
    assert abs(roc_auc_score(labels, bf16) - roc_auc_score(labels, fp32)) <= 2 / 256 + 1e-9
    auto = member_logits([model], dataset, batch_size=16, device="cpu")[:, 0]
    np.testing.assert_array_equal(auto, bf16 if cpu_bf16_supported() else fp32)  # "auto" follows the CPU


def test_unknown_scoring_precision_is_a_clear_error(trained):
    root, ckpt = trained
    with pytest.raises(ValueError, match=r"precision 'fp16' is not one of \['auto', 'bf16-mixed', '32-true'\]"):
        member_logits([load_member(ckpt)], ShardDataset(root / "shards"), device="cpu", precision="fp16")


def test_scoring_leaves_the_cores_of_its_worker_processes_to_them(monkeypatch):
    import torch

    from lens_assets.ml import precision, score

    before = torch.get_num_threads()
    monkeypatch.setattr(precision, "available_cores", lambda: 8)
    try:
        with score._threads_beside_workers("cpu", 3):
            assert torch.get_num_threads() == 5
        assert torch.get_num_threads() == before
        with score._threads_beside_workers("cpu", 8):  # every core has a worker: the model keeps one
            assert torch.get_num_threads() == 1
        with score._threads_beside_workers("cpu", 1):  # one worker reads in this process: nothing to share
            assert torch.get_num_threads() == before
        with score._threads_beside_workers("cuda", 8):  # the model runs on the GPU
            assert torch.get_num_threads() == before
        with pytest.raises(RuntimeError), score._threads_beside_workers("cpu", 3):
            raise RuntimeError("a failed batch")
        assert torch.get_num_threads() == before  # restored on the way out of an error too
    finally:
        torch.set_num_threads(before)


# --- uncertainty ------------------------------------------------------------------------------------


def test_uncertainty_columns_by_hand():
    """Two members: their spread on the fused scale (m w_j z_j), and MC stds combined through the fusion weights."""
    from lens_assets.ml.score import uncertainty_columns

    z = np.array([[1.0, 3.0], [0.0, 0.0]])
    s = np.array([[0.3, 0.4], [np.nan, 0.5]])
    out = uncertainty_columns(z, s, Fusion("val_weights", [2.0, 1.0], 0.1))
    # m w_j z_j = (2*2*1, 2*1*3) = (4, 6) and (0, 0): std 1 and 0
    np.testing.assert_allclose(out["logit_std_ensemble"], [1.0, 0.0])
    np.testing.assert_allclose(out["logit_std_mc"], [np.sqrt(4 * 0.09 + 0.16), 0.5])
    from scipy.special import expit

    fused = np.array([2 * 1 + 3 + 0.1, 0.1])
    spread = np.array([np.sqrt(1.0 + 0.52), 0.5])
    np.testing.assert_allclose(out["uncertainty"], (expit(fused + spread) - expit(fused - spread)) / 2)
    # with a calibrator's probability map, the spread is that of the calibrated probability
    steep = uncertainty_columns(z, s, Fusion("val_weights", [2.0, 1.0], 0.1), lambda x: expit(3 * x))
    np.testing.assert_allclose(steep["uncertainty"], (expit(3 * (fused + spread)) - expit(3 * (fused - spread))) / 2)
    # near the decision boundary the same logit spread moves the probability most
    mid = uncertainty_columns(np.array([[0.0], [6.0]]), np.array([[1.0], [1.0]]), Fusion.mean(1))["uncertainty"]
    assert mid[0] > 5 * mid[1]
    mean = uncertainty_columns(z, s, Fusion.mean(2))  # mean fusion: the logits' own spread
    np.testing.assert_allclose(mean["logit_std_ensemble"], [1.0, 0.0])
    one = uncertainty_columns(z[:, :1], np.full((2, 1), np.nan), Fusion.mean(1))
    assert np.isnan(one["logit_std_ensemble"]).all() and np.isnan(one["logit_std_mc"]).all()
    assert np.isnan(one["uncertainty"]).all()


def test_mc_dropout_draws_average_to_the_deterministic_logit_and_need_head_dropout():
    """With inverted dropout on the features before a linear classifier, the draws' mean is the deterministic
    logit (to sampling error); the deterministic logit is the eval-mode forward's."""
    from lens_assets.ml.score import member_outputs

    torch.manual_seed(0)
    model = LensClassifier(backbone="resnet10t", in_chans=3, img_size=32, head_dropout=0.3).eval()
    image = torch.randn(4, 3, 32, 32)
    variance = torch.ones(4, 3, 32, 32)
    with torch.inference_mode():
        det, draws = model.mc_dropout_logits(image, variance, n_samples=4000,
                                             generator=torch.Generator().manual_seed(0))
        forward = model(image, variance)
    torch.testing.assert_close(det, forward)
    assert draws.shape == (4000, 4) and (draws.std(dim=0) > 0).all()
    torch.testing.assert_close(draws.mean(dim=0), det, atol=float(4 * draws.std(dim=0).max() / 4000**0.5), rtol=0)
    plain = LensClassifier(backbone="resnet10t", in_chans=3, img_size=32).eval()
    with pytest.raises(ValueError, match="without head dropout"):
        plain.mc_dropout_logits(image, variance)
    logits, std = member_outputs([model, plain], image.numpy(), variance.numpy(), device="cpu", mc_samples=8,
                                 precision="32-true")
    assert logits.shape == std.shape == (4, 2)
    assert np.isfinite(std[:, 0]).all() and np.isnan(std[:, 1]).all()
    with pytest.raises(ValueError, match="head_dropout"):
        LensClassifier(backbone="resnet10t", in_chans=3, img_size=32, head_dropout=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        member_outputs([model], image.numpy(), variance.numpy(), device="cpu", mc_samples=1)


def test_a_file_the_members_cannot_score_is_quarantined_and_the_rest_of_the_drop_scored(tmp_path, monkeypatch):
    """A non-finite logit (here forced for the second file) makes that file a not_scorable quarantine row naming
    it and the members' logits; the other files keep their scores and every file is accounted for."""
    from lens_assets.ml import score as score_module
    from lens_assets.ml.score import Fusion, score_files
    from lens_assets.science.calibration import Calibrator
    from lens_assets.science.ingest import find_fits
    from lens_assets.science.shards import shard_settings
    from lens_assets.science.surveys import get_survey
    from lens_assets_tests.fuzz_drop import random_member
    from lens_assets_tests.science.test_ingest import make_file

    for k in range(4):
        make_file(tmp_path / "drop" / f"f{k}.fits", objid=f"obj-{k}", seed=k)
    real = score_module.member_outputs

    def nan_for_the_second(*args, **kwargs):
        z, s = real(*args, **kwargs)
        z = z.copy()
        z[1] = np.nan
        return z, s

    monkeypatch.setattr(score_module, "member_outputs", nan_for_the_second)
    des = get_survey("des")
    res = score_files(find_fits(tmp_path / "drop"), des, root=tmp_path, settings=shard_settings(des),
                      members=[random_member()], fusion=Fusion.mean(1), calibrator=Calibrator("temperature"),
                      batch_size=8, workers=1, device="cpu", progress=False, precision="32-true", mc_samples=2)
    assert res.n_files == 4 == len(res.scores) + len(res.quarantine)
    assert list(res.scores["objid"]) == ["obj-0", "obj-2", "obj-3"] == list(res.catalog["objid"])
    (q,) = res.quarantine.to_dict("records")
    assert q["reason"] == "not_scorable" and q["objid"] == "obj-1" and q["source_file"] == "drop/f1.fits"
    assert q["message"].startswith("drop/f1.fits: the ensemble's logit is nan (members [nan])")
    assert np.isfinite(res.scores[["logit", "logit_0", "score"]].to_numpy()).all()
