"""The cluster report's figures, the models' inputs, and the field catalog's reading and splits."""

import math

import numpy as np
import pandas as pd
import pytest

from lens_assets.science.clusters import catalog as cc
from lens_assets.science.clusters.models import colour_features, fit_cluster_models
from lens_assets.science.clusters.report import cluster_figures, report_markdown, threshold_at_fpr
from lens_assets.science.surveys import get_survey


def test_threshold_at_fpr_allows_that_share_of_false_positives():
    # ten non-lenses 0..9: FPR <= 0.1 allows one score above the threshold, so the threshold is the 2nd highest
    labels = [0] * 10 + [1, 1]
    scores = list(range(10)) + [8.5, 9.5]
    assert threshold_at_fpr(labels, scores, 0.1) == 8.0
    assert threshold_at_fpr(labels, scores, 0.0) == 9.0
    assert threshold_at_fpr(labels, scores, 1.0) == -math.inf


def _scores():
    # test: lenses 1, 2 and 3 arcs at logits 3, 2, 0.5; non-lenses at 0, 1, 2.5 -> AUROC (3 + 2 + 1) / 9
    rows = [("m", "test", 1, 3.0, 1, 23.0), ("m", "test", 1, 2.0, 2, 24.5), ("m", "test", 1, 0.5, 3, 25.5),
            ("m", "test", 0, 0.0, 0, 99.0), ("m", "test", 0, 1.0, 0, 99.0), ("m", "test", 0, 2.5, 0, 99.0),
            ("m", "held", 1, 1.0, 1, 23.0)]
    return pd.DataFrame(rows, columns=["model", "set", "label", "logit", "n_arcs", "arc_sb"])


def test_cluster_figures_by_hand():
    f = cluster_figures(_scores(), n_boot=50)
    t = f["m"]["test"]
    assert t["auroc"] == pytest.approx(6 / 9)
    assert (t["n_lenses"], t["n_nonlenses"]) == (3, 3)
    assert t["tpr0"] == pytest.approx(1 / 3)  # only the lens above 2.5
    # FPR <= 0.1 of three non-lenses allows none: threshold 2.5, so the 1-arc lens (3.0) is found, the others not
    assert (t["recall_sources_1"], t["recall_sources_2"], t["recall_sources_3+"]) == (1.0, 0.0, 0.0)
    assert t["recall_arc_sb_lt_24"] == 1.0 and t["n_lenses_arc_sb_ge_25"] == 1
    lo, hi = t["auroc_ci"]
    assert 0.0 <= lo <= hi <= 1.0
    assert f["m"]["held"] == {"n_lenses": 1, "n_nonlenses": 0}  # one class only: counts, no figures
    md = report_markdown(f, survey="des")
    assert "0.667 [" in md and "no objects of one class" in md
    two = cluster_figures(pd.concat([_scores(), _scores().assign(model="track_a", logit=lambda d: d["label"])]),
                          n_boot=20)
    assert "| m | test | 0.667 | 1.000 | -0.333 |" in report_markdown(two, survey="des")
    assert math.isnan(t["ece"])  # no probability column: no calibration figure


def test_cluster_figures_ece_of_the_reported_probability():
    scores = _scores()[lambda d: d["set"] == "test"].copy()
    # one equal-mass bin per row (6 rows < 15 bins): ECE = mean |label - prob|
    scores["prob"] = [0.9, 0.8, 0.6, 0.1, 0.3, 0.5]
    (ece,) = [cluster_figures(scores, n_boot=10)["m"]["test"]["ece"]]
    assert ece == pytest.approx((0.1 + 0.2 + 0.4 + 0.1 + 0.3 + 0.5) / 6)
    scores["prob"] = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # right and sure: no calibration error
    assert cluster_figures(scores, n_boot=10)["m"]["test"]["ece"] == 0.0


def _table(n=240, seed=0):
    from lens_assets.science.clusters.features import cluster_feature_names

    rng = np.random.default_rng(seed)
    bands = get_survey("des").band_names
    feats = cluster_feature_names(bands)
    y = (np.arange(n) % 2).astype(int)
    t = pd.DataFrame(rng.normal(size=(n, len(feats))), columns=feats)
    t["colour_consistency"] = np.clip(0.5 + 0.3 * y + 0.1 * rng.normal(size=n), 0, 1)  # informative
    t["tangential_alignment"] = np.clip(0.2 * y + 0.3 * rng.normal(size=n), -1, 1)
    t["label"], t["objid"] = y, [f"f{i}" for i in range(n)]
    split = np.array(["train"] * 120 + ["val"] * 40 + ["test"] * 40 + ["heldout"] * 40)
    t["split"], t["val_role"] = split, np.where(split == "val", np.where(np.arange(n) % 4 < 2, "stop", "calibrate"), "")
    t["sim_family"] = np.where(split == "heldout", "cluster_heldout", "cluster")
    t["sim_kind"], t["theta_e"], t["n_arcs"], t["arc_sb"] = "single", 5.0 * y, y, np.where(y == 1, 24.0, 99.0)
    return t, bands


def test_models_score_test_and_heldout_for_every_model():
    table, bands = _table()
    m = fit_cluster_models(table, bands=bands, pu_labeled=(10, 500))
    assert set(m.scores["model"]) == {"track_a", "track_a_no_colour", "pu_10", "anomaly"}
    assert m.notes == ["pu_500: skipped, the training split has 60 lenses"]
    assert set(m.scores["set"]) == {"test", "cluster_heldout"}
    assert len(m.scores) == 4 * 80
    # without the colour features the model cannot see colour_consistency, the strongest one
    assert "colour_consistency" in colour_features(bands) and "tangential_alignment" not in colour_features(bands)
    from sklearn.metrics import roc_auc_score

    test = m.scores[m.scores["set"] == "test"]
    auc = {k: roc_auc_score(g["label"], g["logit"]) for k, g in test.groupby("model")}
    assert auc["track_a"] > 0.9 and auc["track_a"] > auc["track_a_no_colour"]


def test_models_need_both_labels_in_each_split():
    table, bands = _table()
    table.loc[(table["split"] == "val") & (table["val_role"] == "stop"), "label"] = 0
    with pytest.raises(ValueError, match="the val stop rows need lenses and non-lenses"):
        fit_cluster_models(table, bands=bands)
    with pytest.raises(ValueError, match="features table lacks columns"):
        fit_cluster_models(table.drop(columns="arc_sb"), bands=bands)


def test_depth_of_a_flat_noise_map_by_hand():
    # sigma 0.1 nmgy per pixel, FWHM 2.3548 px -> sigma_psf 1 px, noise-equivalent area 4 pi px^2:
    # 5 sigma flux = 5 * 0.1 * sqrt(4 pi) nmgy
    got = cc.depth_mag(np.full((10, 10), 0.01), psf_fwhm_px=2.3548, pixel_scale_arcsec=0.2)
    assert got == pytest.approx(22.5 - 2.5 * math.log10(0.5 * math.sqrt(4 * math.pi)), abs=1e-4)
    assert math.isnan(cc.depth_mag(np.zeros((4, 4)), psf_fwhm_px=2.0, pixel_scale_arcsec=0.2))


def test_an_unreadable_field_is_quarantined_with_its_reason(tmp_path):
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"not a fits file")
    fields, segments, quarantine = cc.process_fields([bad], ["clusters/raw/des/x/bad.fits"], get_survey("des"),
                                                     size_px=122, workers=1, progress=False)
    assert len(fields) == 0 and len(segments) == 0
    assert quarantine["source_file"].tolist() == ["clusters/raw/des/x/bad.fits"]
    assert quarantine["reason"].iloc[0] in ("not_fits", "unreadable", "bad_structure")


def test_split_fields_keeps_heldout_families_out_and_overlapping_fields_together():
    n = 120
    rng = np.random.default_rng(1)
    fields = pd.DataFrame({
        "objid": [f"f{i}" for i in range(n)], "survey": "des", "ra": rng.uniform(0, 300, n),
        "dec": rng.uniform(-40, 0, n), "label": np.arange(n) % 2, "label_source": "sim:lenstronomy",
        "sim_family": np.where(np.arange(n) < 100, "cluster", "cluster_heldout"), "z_cluster": 0.4,
        "mag_ref": 18.0, "seeing_arcsec": 0.9, "psf_fwhm_arcsec": 1.0, "pixel_scale_arcsec": 0.263, "size_px": 152})
    fields.loc[1, ["ra", "dec"]] = fields.loc[0, ["ra", "dec"]].to_numpy() + [5 / 3600, 0]  # overlapping fields
    s = cc.split_fields(fields, get_survey("des"), seed=0)
    assert set(s["objid"]) == set(fields.loc[fields["sim_family"] == "cluster", "objid"])
    split = s.set_index("objid")["split"]
    assert split["f0"] == split["f1"]
    assert set(split) == {"train", "val", "test"}


def _one_galaxy_field(tmp_path, *, bcg_keys: dict | None, noise_only: bool = False):
    """A 60-px DES field with one galaxy at the centre, written with the given BCG keys (None: the simulator's)."""
    from dataclasses import replace

    from lens_assets.science.clusters.fields import render_field
    from lens_assets.science.families import load_family
    from lens_assets.science.fits_writer import simulated_cutout_bytes
    from lens_assets.science.simulation import LightComponent, System

    survey = get_survey("des")
    fs = cc.field_survey(survey, 60)
    system = System(objid="one", is_lens=False, kind="twin", theta_e_arcsec=0.0, kwargs_lens=(),
                    components=(LightComponent("GAUSSIAN", {"sigma": 1.0, "center_x": 0.0, "center_y": 0.0}, 17.0,
                                               2.0, lensed=False),),
                    points=(), psf_profile="gaussian", psf_fwhm_arcsec={b: 1.0 for b in survey.band_names},
                    moffat_beta=3.0, exposure_scale=1.0, z_lens=0.3, z_source=-1.0, ra_deg=10.0, dec_deg=-5.0,
                    galaxy={"n": 1.0, "r_eff": 1.0, "q": 1.0, "pa": 0.0}, size_px=60)
    cut = render_field(system, fs, np.random.default_rng(0))
    if noise_only:
        cut = replace(cut, image=np.random.default_rng(1).normal(size=cut.image.shape) * np.sqrt(cut.variance))
    extra = {"OBJTYPE": "cluster_field", **(bcg_keys or {})}
    path = tmp_path / "one.fits"
    path.write_bytes(simulated_cutout_bytes(cut, survey=survey, family=load_family("cluster"), seed=0, extra=extra))
    return path, survey


@pytest.mark.parametrize("keys, reason, match", [
    ({}, None, None),  # no BCG keys: the galaxy at the centre is found
    ({"BCGXPIX": 30.5, "BCGYPIX": 30.5}, None, None),
    ({"BCGXPIX": 20.0, "BCGYPIX": 45.0}, None, None),  # off the centre: the header, not the image, decides
    ({"BCGXPIX": "left", "BCGYPIX": 30.5}, "bad_header_value", "both must be numbers"),
    ({"BCGXPIX": 500.0, "BCGYPIX": 30.5}, "bad_header_value", "lies outside the 60x60 image"),
])
def test_the_bcg_comes_from_the_header_or_the_image_or_the_file_is_quarantined(tmp_path, keys, reason, match):
    path, survey = _one_galaxy_field(tmp_path, bcg_keys=keys)
    row, segs, q = cc.process_field(path, "x/one.fits", survey, size_px=60)
    if reason is None:
        want = (keys["BCGXPIX"] - 1, keys["BCGYPIX"] - 1) if keys else (29.5, 29.5)  # the estimate: the galaxy
        assert (row["bcg_x_px"], row["bcg_y_px"]) == (pytest.approx(want[0], abs=1e-9 if keys else 0.5),
                                                      pytest.approx(want[1], abs=1e-9 if keys else 0.5))
        assert row["n_segments"] == len(segs)
    else:
        assert row is None and q["reason"] == reason and match in q["message"] and "x/one.fits" in q["message"]
        assert len(q["source_sha256"]) == 64


def test_a_field_without_bcg_keys_or_any_source_is_quarantined_as_no_bcg(tmp_path):
    path, survey = _one_galaxy_field(tmp_path, bcg_keys={}, noise_only=True)
    row, _, q = cc.process_field(path, "x/one.fits", survey, size_px=60)
    assert row is None and q["reason"] == "no_bcg" and q["message"].startswith("x/one.fits: ")


@pytest.mark.parametrize("n_in, scale_in, fp, n_out, resampled, x, want", [
    (60, 0.263, 60, 60, False, 20.0, 19.0),  # the file's pixel, 0-based
    (50, 0.263, 50, 60, False, 20.0, 24.0),  # padded: the footprint starts at (60 - 50) // 2 = 5
    (120, 0.1315, 60, 60, True, 60.5, 29.5),  # resampled 2:1: the centre stays the centre
    (120, 0.1315, 60, 60, True, 80.5, 39.5),  # 20 fine pixels right of it are 10 coarse ones
])
def test_header_bcg_follows_resampling_and_padding_by_hand(n_in, scale_in, fp, n_out, resampled, x, want):
    from types import SimpleNamespace

    cut = SimpleNamespace(primary={"BCGXPIX": x, "BCGYPIX": x}, image=np.zeros((1, n_in, n_in)),
                          pixel_scale_arcsec=scale_in, objid="o", survey="des", file_shape=(n_in, n_in),
                          square_offset_px=(0, 0))
    norm = SimpleNamespace(footprint_px=fp, image=np.zeros((1, n_out, n_out)), resampled=resampled)
    assert cc._header_bcg(cut, norm, scale_out=0.263, name="f") == (pytest.approx(want), pytest.approx(want))


def test_header_bcg_of_a_non_square_field_moves_with_its_padding_to_square():
    from types import SimpleNamespace

    # 50 rows x 60 columns, padded to 60 x 60 with the rows at (60 - 50) // 2 = 5: x as in the file, y + 5
    cut = SimpleNamespace(primary={"BCGXPIX": 20.0, "BCGYPIX": 20.0}, image=np.zeros((1, 60, 60)),
                          pixel_scale_arcsec=0.263, objid="o", survey="des", file_shape=(50, 60),
                          square_offset_px=(5, 0))
    norm = SimpleNamespace(footprint_px=60, image=np.zeros((1, 60, 60)), resampled=False)
    assert cc._header_bcg(cut, norm, scale_out=0.263, name="f") == (pytest.approx(19.0), pytest.approx(24.0))
    cut.primary = {"BCGXPIX": 20.0, "BCGYPIX": 55.0}  # inside the padded square, outside the file's 50 rows
    q = cc._header_bcg(cut, norm, scale_out=0.263, name="f")
    assert q["reason"] == "bad_header_value" and "lies outside the 50x60 image" in q["message"]


@pytest.mark.parametrize("with_keys", [True, False])
def test_a_non_square_field_is_read_and_its_bcg_found_where_the_galaxy_is(tmp_path, with_keys):
    from astropy.io import fits

    path, survey = _one_galaxy_field(tmp_path, bcg_keys={})
    with fits.open(path) as hdul:  # cut the first 10 columns: 60 rows x 50 columns, the galaxy at x = 19.5
        for hdu in hdul[1:]:
            if hdu.name.startswith(("IMAGE_", "VAR_")):
                hdu.data = hdu.data[:, 10:]
        if with_keys:
            hdul[0].header["BCGXPIX"], hdul[0].header["BCGYPIX"] = 20.5, 30.5  # FITS 1-based
        hdul.writeto(tmp_path / "cut.fits")
    # read on a 50-px grid (a field must cover its grid: 50 columns do); larger fields are read whole
    row, _, q = cc.process_field(tmp_path / "cut.fits", "x/cut.fits", survey, size_px=50)
    assert q is None
    # padded to 60 x 60 with the columns at (60 - 50) // 2 = 5: the galaxy at x = 24.5, y = 29.5 (0-based)
    tol = 1e-9 if with_keys else 0.5
    assert (row["bcg_x_px"], row["bcg_y_px"]) == (pytest.approx(24.5, abs=tol), pytest.approx(29.5, abs=tol))
    # Track B reads the field again at the fields row's size_px (60, its padded side; its shorter side is 50)
    from lens_assets.ml.mil import field_image

    image, variance = field_image(tmp_path / "cut.fits", "x/cut.fits", "des", row["size_px"])
    _, _, first, first_var, _, _ = cc._matched(tmp_path / "cut.fits", "x/cut.fits", survey, 50)
    assert row["size_px"] == 60 and image.shape[-1] == 60
    np.testing.assert_array_equal(image, first)
    np.testing.assert_array_equal(variance, first_var)
