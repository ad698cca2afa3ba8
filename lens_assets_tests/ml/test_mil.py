"""Track B's MIL pieces: bags cut from a hand-built field, the zero-segment field, the cache, attention masks,
permutation invariance and the augmentation's geometry."""

import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from lens_assets.ml import mil

STAMP = 32
HALF = STAMP // 2


def _segments(rows):
    return pd.DataFrame(rows, columns=list(mil.SEGMENT_BAG_COLUMNS))


def _field(h=80, w=100, bands=2):
    """A blank field with unit variance, so the normalization is asinh(image) exactly (noise scale 1)."""
    return np.zeros((bands, h, w), dtype=np.float32), np.ones((bands, h, w), dtype=np.float32)


def test_stamps_are_centred_on_the_segment_centroid_and_zero_padded_at_the_edge():
    image, variance = _field()
    image[0, 25, 40] = 100.0  # (x=40, y=25): row 25, column 40
    image[1, 3, 2] = 7.0  # near the corner (x=2, y=3)
    image[1, 0:20, 0:20] += 1.0
    before = image.copy()
    segs = _segments([(0, 2.2, 2.6, 9.0, 200.0, 5.0),  # low S/N: second
                      (1, 40.3, 24.8, 3.0, 30.0, 50.0)])  # brightest: first
    bag = mil.segment_bags(image, variance, segs, bcg_xy=(50.0, 40.0), pixel_scale_arcsec=0.25, stamp_px=STAMP,
                           max_instances=4)
    np.testing.assert_array_equal(image, before)  # the caller's array is not modified
    assert bag.stamps.shape == (4, 2, STAMP, STAMP) and bag.mask.tolist() == [True, True, False, False]
    assert bag.segment_id.tolist() == [1, 0, -1, -1]
    # the centroid (40.3, 24.8) rounds to pixel (40, 25), which lands at the stamp's centre index
    assert bag.stamps[0, 0, HALF, HALF] == pytest.approx(math.asinh(100.0), rel=1e-6)
    assert np.count_nonzero(bag.stamps[0, 0]) == 1
    # the corner segment: rounds to (2, 3); the stamp starts at x = 2 - 16 = -14, y = 3 - 16 = -13
    corner = bag.stamps[1, 1]
    assert np.all(corner[:13] == 0) and np.all(corner[:, :14] == 0)  # beyond the edge: zeros
    assert corner[HALF, HALF] == pytest.approx(math.asinh(8.0), rel=1e-6)  # the field's (2, 3) pixel
    np.testing.assert_allclose(corner[13:, 14:], np.arcsinh(image[1, 0:STAMP - 13, 0:STAMP - 14]), rtol=1e-6)
    # positions: r over half the field's side (100 px * 0.25"/2 = 12.5"), cos and sin of phi
    np.testing.assert_allclose(bag.positions[0], [3.0 / 12.5, math.cos(math.radians(30)), math.sin(math.radians(30))],
                               rtol=1e-6)
    np.testing.assert_allclose(bag.positions[1], [9.0 / 12.5, math.cos(math.radians(200)),
                                                  math.sin(math.radians(200))], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bag.xy_px[:2], [[40.3, 24.8], [2.2, 2.6]], rtol=1e-6)
    assert not bag.stamps[2:].any() and not bag.positions[2:].any()  # padding is zeros


def test_the_brightest_segments_are_kept_up_to_max_instances():
    image, variance = _field()
    segs = _segments([(i, 10.0 + 5 * i, 40.0, 1.0, 0.0, snr) for i, snr in enumerate([3.0, 9.0, 1.0, 9.0, 4.0])])
    bag = mil.segment_bags(image, variance, segs, bcg_xy=(50.0, 40.0), pixel_scale_arcsec=0.25, max_instances=3)
    assert bag.segment_id.tolist() == [1, 3, 4]  # snr 9, 9 (ties by id), 4
    assert bag.mask.all()


def test_a_field_without_segments_gets_its_central_stamp():
    image, variance = _field()
    image[0, 40, 50] = 20.0  # the BCG at (x=50, y=40)
    bag = mil.segment_bags(image, variance, _segments([]), bcg_xy=(50.2, 39.9), pixel_scale_arcsec=0.25,
                           max_instances=5)
    assert bag.mask.tolist() == [True, False, False, False, False]
    assert bag.segment_id[0] == -1 and bag.positions[0].tolist() == [0.0, 0.0, 0.0]
    assert bag.stamps[0, 0, HALF, HALF] == pytest.approx(math.asinh(20.0), rel=1e-6)
    np.testing.assert_allclose(bag.xy_px[0], [50.2, 39.9], rtol=1e-6)


def test_normalization_is_asinh_over_the_fields_median_noise_of_measured_pixels():
    image, variance = _field(h=40, w=40)
    variance[:] = 4.0
    variance[:, :5] = 0.0  # unmeasured pixels do not count
    image[0, 20, 20] = 6.0
    np.testing.assert_allclose(mil.normalize_field(image, variance)[0, 20, 20], math.asinh(3.0), rtol=1e-6)


def test_bag_errors_name_what_is_wrong():
    image, variance = _field()
    with pytest.raises(ValueError, match=r"lacks columns \['snr'\]"):
        mil.segment_bags(image, variance, pd.DataFrame(columns=["segment_id", "x_px", "y_px", "r_arcsec", "phi_deg"]),
                         bcg_xy=(1, 1), pixel_scale_arcsec=0.25)
    with pytest.raises(ValueError, match="expected \\(bands, height, width\\)"):
        mil.segment_bags(image[0], variance[0], _segments([]), bcg_xy=(1, 1), pixel_scale_arcsec=0.25)
    with pytest.raises(ValueError, match="bcg_xy must be finite"):
        mil.segment_bags(image, variance, _segments([]), bcg_xy=(float("nan"), 1), pixel_scale_arcsec=0.25)


def test_the_cache_keeps_every_instance_and_pads_on_reading(tmp_path):
    image, variance = _field()
    rng = np.random.default_rng(0)
    image += rng.normal(size=image.shape).astype(np.float32)
    bags = [mil.segment_bags(image, variance, _segments([(i, 10.0 + 7 * i, 30.0, 1.0, 0.0, 5.0 - i)
                                                          for i in range(n)]),
                             bcg_xy=(50.0, 40.0), pixel_scale_arcsec=0.25, max_instances=4) for n in (3, 0, 4)]
    path = mil.write_bag_cache(tmp_path / "bags.npz", ["a", "b", "c"], bags, meta={"key": "k1"})
    got = mil.read_bag_cache(path)
    assert got.objid.tolist() == ["a", "b", "c"] and got.counts.tolist() == [3, 1, 4]
    assert got.meta["key"] == "k1" and got.meta["max_instances"] == 4 and got.stamp_px == STAMP
    padded = got.padded([2, 0, 1])
    assert padded["stamps"].shape == (3, 4, 2, STAMP, STAMP)
    for b, src in enumerate([bags[2], bags[0], bags[1]]):
        np.testing.assert_array_equal(padded["mask"][b], src.mask)
        np.testing.assert_array_equal(padded["stamps"][b], src.stamps)
        np.testing.assert_array_equal(padded["positions"][b], src.positions)
    assert got.index_of(["c", "a"]).tolist() == [2, 0]
    with pytest.raises(KeyError, match="have no bag"):
        got.index_of(["zzz"])


@pytest.mark.parametrize("pixel_scale", [0.25, 0.3])  # 100 px -> 25 px (4x4 blocks) and -> 30 px (uneven windows)
def test_the_field_overview_is_torchs_adaptive_average_of_the_normalized_field(pixel_scale):
    import torch.nn.functional as F

    image, variance = _field(h=100, w=100)
    image += np.random.default_rng(3).normal(size=image.shape).astype(np.float32) * 5.0
    got = mil.field_overview(image, variance, pixel_scale_arcsec=pixel_scale, arcsec_per_px=1.0)
    side = round(100 * pixel_scale)
    norm = mil.normalize_field(image, variance)
    want = F.adaptive_avg_pool2d(torch.from_numpy(norm)[None], side)[0].numpy()
    assert got.shape == (2, side, side) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    if side == 25:  # divisible: the plain 4x4 block mean
        np.testing.assert_allclose(got, norm.reshape(2, 25, 4, 25, 4).mean(axis=(2, 4)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        mil.field_overview(image[:, :90], variance[:, :90], pixel_scale_arcsec=pixel_scale)
    with pytest.raises(ValueError, match="finer than the field's pixels"):
        mil.field_overview(image, variance, pixel_scale_arcsec=pixel_scale, arcsec_per_px=0.1)


def test_the_cache_keeps_overviews_and_the_field_view_bags_hold_one_instance_each(tmp_path):
    from dataclasses import replace

    image, variance = _field(h=80, w=80)
    rng = np.random.default_rng(1)
    bags = []
    for n in (2, 0, 3):
        b = mil.segment_bags(image + rng.normal(size=image.shape).astype(np.float32), variance,
                             _segments([(i, 10.0 + 9 * i, 30.0, 1.0, 0.0, 5.0 - i) for i in range(n)]),
                             bcg_xy=(40.0, 40.0), pixel_scale_arcsec=0.25, max_instances=4)
        bags.append(replace(b, overview=rng.normal(size=(2, 20, 20)).astype(np.float32)))
    got = mil.read_bag_cache(mil.write_bag_cache(tmp_path / "bags.npz", ["a", "b", "c"], bags))
    np.testing.assert_array_equal(got.overview, np.stack([b.overview for b in bags]))
    views = got.overview_bags()
    assert views.counts.tolist() == [1, 1, 1] and views.stamp_px == 20 and views.meta["max_instances"] == 1
    np.testing.assert_array_equal(views.padded([2, 0])["stamps"][:, 0], got.overview[[2, 0]])
    assert (views.segment_id == -2).all() and not views.positions.any() and views.objid.tolist() == ["a", "b", "c"]
    with pytest.raises(ValueError, match="1 of 3 bags lack the field overview"):
        mil.write_bag_cache(tmp_path / "mixed.npz", ["a", "b", "c"], [bags[0], replace(bags[1], overview=None),
                                                                      bags[2]])
    with pytest.raises(ValueError, match="no field overviews"):
        mil.read_bag_cache(mil.write_bag_cache(tmp_path / "plain.npz", ["a"], [replace(bags[0], overview=None)])
                           ).overview_bags()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return mil.MILNet(backbone="resnet10t", in_chans=2, stamp_px=16, embed_dim=16, attention_dim=8).eval()


def _batch(b=3, k=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    stamps = torch.randn(b, k, 2, 16, 16, generator=g)
    positions = torch.randn(b, k, 3, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False],
                         [True, True, True, True, True]])[:b, :k]
    return stamps, positions, mask


def test_masked_instances_get_exactly_zero_attention_and_weights_sum_to_one(net):
    stamps, positions, mask = _batch()
    with torch.no_grad():
        logit, attention = net(stamps, positions, mask)
        # what padding holds does not matter
        noisy = stamps.clone()
        noisy[~mask] = 1e3
        logit2, attention2 = net(noisy, positions, mask)
    assert logit.shape == (3,) and attention.shape == (3, 5)
    assert torch.all(attention[~mask] == 0.0)
    assert torch.all(attention[mask] > 0)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    assert attention[1, 0] == 1.0  # a single instance takes all the weight
    torch.testing.assert_close(logit2, logit, atol=0, rtol=0)
    torch.testing.assert_close(attention2, attention, atol=0, rtol=0)


def test_the_field_logit_is_invariant_to_the_order_of_its_instances(net):
    stamps, positions, mask = _batch()
    perm = torch.tensor([4, 2, 0, 3, 1])  # real instances and padding shuffled together
    with torch.no_grad():
        logit, attention = net(stamps, positions, mask)
        logit_p, attention_p = net(stamps[:, perm], positions[:, perm], mask[:, perm])
    torch.testing.assert_close(logit_p, logit, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention_p, attention[:, perm], atol=1e-5, rtol=0)


def test_a_bag_without_instances_is_refused(net):
    stamps, positions, mask = _batch()
    mask[1] = False
    with pytest.raises(ValueError, match="at least one real instance"):
        net(stamps, positions, mask)


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_turns_stamps_and_position_angles_together(seed):
    # a bright pixel 6 px from the stamp's centre at angle phi, and the scalars (r, cos phi, sin phi)
    phi = math.radians(35.0 + 50 * seed)
    stamps = torch.zeros(8, 1, 1, STAMP, STAMP)
    cx = cy = (STAMP - 1) / 2  # rot90 and flip turn about the array's centre
    x, y = round(cx + 6 * math.cos(phi)), round(cy + 6 * math.sin(phi))
    stamps[:, 0, 0, y, x] = 1.0
    positions = torch.tensor([[[0.5, math.cos(phi), math.sin(phi)]]]).repeat(8, 1, 1)
    out_s, out_p = mil.augment_bags(stamps, positions, generator=torch.Generator().manual_seed(seed))
    assert torch.all(stamps[:, 0, 0, y, x] == 1.0)  # inputs untouched
    for b in range(8):
        yy, xx = (int(v) for v in torch.nonzero(out_s[b, 0, 0])[0])
        direction = np.array([xx - cx, yy - cy]) / math.hypot(xx - cx, yy - cy)
        assert float(np.dot(direction, out_p[b, 0, 1:].numpy())) > 0.98
        assert out_p[b, 0, 0] == 0.5


# ---------------------------------------------------------------------------------------------------------------
# PU learning (pu_b_<n>) through train_mil.run, on a tiny synthetic bag cache


def _pu_table_and_bags(tmp_path, overview: bool = False):
    """60 fields (train 24 with 10 lenses, val stop 8 / calibrate 6, test 14, held out 8), 1-3 stamps of 16 px
    each; a lens's first stamp holds a bright blob, so the network has something to learn."""
    rng = np.random.default_rng(0)
    parts = [("train", "", 24, 10), ("val", "stop", 8, 4), ("val", "calibrate", 6, 3), ("test", "", 14, 6),
             ("heldout", "", 8, 4)]
    rows, bags = [], []
    for split, role, n, n_lens in parts:
        for i in range(n):
            label = int(i < n_lens)
            k = int(rng.integers(1, 4))
            stamps = rng.normal(size=(k, 1, 16, 16)).astype(np.float32)
            if label:
                stamps[0, 0, 5:11, 5:11] += 4.0
            bags.append(mil.Bag(stamps=stamps, positions=rng.normal(size=(k, 3)).astype(np.float32),
                                mask=np.ones(k, bool), segment_id=np.arange(k, dtype=np.int64),
                                xy_px=rng.uniform(0, 50, size=(k, 2)).astype(np.float32),
                                overview=stamps[0, :, ::2, ::2].copy() if overview else None))
            rows.append({"objid": f"{split}{role}{i:02d}", "label": label, "split": split, "val_role": role,
                         "sim_family": "fam_h" if split == "heldout" else "fam", "sim_kind": "sie",
                         "theta_e": 5.0 * label, "n_arcs": 2 * label, "arc_sb": 22.0})
    table = pd.DataFrame(rows)
    table.to_parquet(tmp_path / "table.parquet", index=False)
    mil.write_bag_cache(tmp_path / "bags.npz", list(table["objid"]), bags, meta={"max_instances": 3})
    return table


@pytest.fixture(scope="module")
def pu_run(tmp_path_factory):
    from lens_assets.ml.train_mil import default_outputs, run

    tmp = tmp_path_factory.mktemp("pu_mil")
    table = _pu_table_and_bags(tmp)
    settings = mil.MILSettings(backbone="resnet10t", epochs=1, batch_size=16, embed_dim=16, attention_dim=8,
                               augment=False, precision="32-true", accelerator="cpu", threads=1, progress=False,
                               pu_labeled=[3, 500])
    outputs = default_outputs(tmp / "out")
    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(tmp / "bags.npz", tmp / "table.parquet", outputs, settings, report=lines.append)
    # the run's folder holds its other files by design: no warning that the checkpoint folder is not empty
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    return table, outputs, summary, lines


def test_pu_rows_score_the_same_fields_as_track_b_and_val_scores_keep_track_b_only(pu_run):
    table, outputs, summary, lines = pu_run
    scores = pd.read_parquet(outputs["scores"])
    val = pd.read_parquet(outputs["val_scores"])
    assert set(scores["model"]) == {"track_b", "pu_b_3"} and set(val["model"]) == {"track_b"}
    b, pu = scores[scores["model"] == "track_b"], scores[scores["model"] == "pu_b_3"]
    assert pu["objid"].tolist() == b["objid"].tolist() and pu["set"].tolist() == b["set"].tolist()
    assert set(b["set"]) == {"test", "fam_h"} and len(b) == 22
    assert pu["label"].tolist() == b["label"].tolist()
    # the PU network's checkpoint beside track_b's gives the rows' logits
    ckpt = outputs["checkpoint"].with_name("pu_b_3.ckpt")
    assert summary["pu"]["pu_b_3"]["checkpoint"] == str(ckpt)
    bags = mil.read_bag_cache(outputs["checkpoint"].parent.parent / "bags.npz")
    logits, _ = mil.score_mil(ckpt, bags, rows=bags.index_of(list(pu["objid"])), precision="32-true")
    np.testing.assert_allclose(pu["logit"].to_numpy(), logits, rtol=0, atol=1e-5)
    assert summary["test_auroc"] is not None and "test_auroc" in summary["pu"]["pu_b_3"]
    # each model's epochs are reported under its name (pu_b_500 is skipped: more than the training lenses)
    assert [line.split(": epoch ")[0] for line in lines] == ["track_b", "pu_b_3"]


def test_a_cache_with_overviews_adds_the_field_view_model_scored_by_its_own_checkpoint(tmp_path):
    from lens_assets.ml.train_mil import default_outputs, field_view_checkpoint, run

    table = _pu_table_and_bags(tmp_path, overview=True)
    settings = mil.MILSettings(backbone="resnet10t", epochs=1, batch_size=16, embed_dim=16, attention_dim=8,
                               augment=False, precision="32-true", accelerator="cpu", threads=1, progress=False,
                               field_view_epochs=2)
    outputs = default_outputs(tmp_path / "out")
    lines = []
    summary = run(tmp_path / "bags.npz", tmp_path / "table.parquet", outputs, settings, report=lines.append)
    # a line per epoch of each model, named, in fields/s, with the epoch's validation AUROC as the summary has it
    assert [line.split(": ")[0] for line in lines] == ["track_b", "field_view", "field_view"]
    for line, (model, epoch, epochs) in zip(lines, [(summary, 0, 1), (summary["field_view"], 0, 2),
                                                    (summary["field_view"], 1, 2)]):
        found = re.fullmatch(r"\w+: epoch (\d)/(\d): train loss \d\.\d{3}, val AUROC (\S+) \(best (\S+)\), \d+ s at "
                             r"\d+ fields/s, about [\d.]+ min left", line)
        assert found, line
        val = [e["val_auroc"] for e in model["val_auroc_by_epoch"]]
        assert (int(found[1]), int(found[2])) == (epoch + 1, epochs)
        assert float(found[3]) == pytest.approx(val[epoch], abs=5e-4)
        assert float(found[4]) == pytest.approx(max(val[: epoch + 1]), abs=5e-4)
    scores, val = pd.read_parquet(outputs["scores"]), pd.read_parquet(outputs["val_scores"])
    assert set(scores["model"]) == {"track_b", "field_view"} and set(val["model"]) == {"track_b", "field_view"}
    b, view = scores[scores["model"] == "track_b"], scores[scores["model"] == "field_view"]
    assert view["objid"].tolist() == b["objid"].tolist() and view["label"].tolist() == b["label"].tolist()
    ckpt = field_view_checkpoint(outputs["checkpoint"])
    assert summary["field_view"]["checkpoint"] == str(ckpt) and summary["field_view"]["overview_px"] == 8
    assert summary["field_view"]["settings"]["backbone"] == "compact_cnn"
    views = mil.read_bag_cache(tmp_path / "bags.npz").overview_bags()
    logits, _ = mil.score_mil(ckpt, views, rows=views.index_of(list(view["objid"])), precision="32-true")
    np.testing.assert_allclose(view["logit"].to_numpy(), logits, rtol=0, atol=1e-5)
    # turned off, the model is not trained and its old checkpoint goes
    run(tmp_path / "bags.npz", tmp_path / "table.parquet", outputs,
        mil.MILSettings(**{**settings.__dict__, "field_view": False}))
    assert set(pd.read_parquet(outputs["scores"])["model"]) == {"track_b"} and not ckpt.exists()


def test_pu_prob_is_g_over_c_by_pu_py_and_c_is_a_frequency(pu_run):
    _, outputs, summary, _ = pu_run
    s = summary["pu"]["pu_b_3"]
    assert 0.0 < s["c"] <= 1.0 and 0.0 < s["c_fit"] <= 1.0
    assert s["n_labeled"] == 3 and s["n_labeled_holdout"] == 1 and s["n_labeled_fit"] == 2
    assert s["n_unlabeled"] == 21 and s["n_val_stop_labeled"] == 1  # round(3 * 4 / 10)
    pu = pd.read_parquet(outputs["scores"]).query("model == 'pu_b_3'")
    g = 1.0 / (1.0 + np.exp(-pu["logit"].to_numpy()))
    h = s["n_labeled_holdout"] / s["n_labeled"]
    p = np.clip(g / s["c_fit"], 0.0, 1.0)  # pu.py's PUModel.prob: clip(g / c) corrected for the held-out lenses
    want = p / (p + (1.0 - p) * (1.0 - h * s["c"]))
    np.testing.assert_allclose(pu["prob"].to_numpy(), want, rtol=1e-9, atol=1e-12)
    assert pu["prob"].between(0, 1).all()


def test_a_pu_size_above_the_training_lenses_is_skipped_with_a_note(pu_run):
    _, outputs, summary, _ = pu_run
    assert summary["notes"] == ["pu_b_500: skipped, the training split has 10 lenses"]
    assert "pu_b_500" not in summary["pu"]
    assert not outputs["checkpoint"].with_name("pu_b_500.ckpt").exists()


def test_pu_model_prob_from_g_is_prob_and_clip_g_over_c_without_a_holdout():
    from lens_assets.science.clusters.pu import PUModel

    g = np.array([0.0, 0.1, 0.3, 0.6, 1.0])
    model = PUModel(g=lambda X: g[np.asarray(X)], c=0.4, c_fit=0.35, holdout_fraction=0.25, n_labeled_fit=3,
                    n_labeled_holdout=1, n_unlabeled=10, holdout_index=np.array([0]))
    np.testing.assert_array_equal(model.prob_from_g(g), model.prob(np.arange(5)))
    flat = PUModel(g=model.g, c=0.4, c_fit=0.4, holdout_fraction=0.0, n_labeled_fit=4, n_labeled_holdout=0,
                   n_unlabeled=10, holdout_index=np.array([], dtype=int))
    np.testing.assert_allclose(flat.prob_from_g(g), np.clip(g / 0.4, 0, 1), rtol=1e-12)
    with pytest.raises(ValueError, match="probabilities"):
        model.prob_from_g([1.5])


def test_pu_sizes_must_be_distinct_and_at_least_two():
    assert mil.MILSettings().pu_labeled == []
    for bad in ([1], [10, 10], [2.5]):
        with pytest.raises(ValueError, match="pu_labeled must hold distinct integers >= 2"):
            mil.MILSettings(pu_labeled=bad)
