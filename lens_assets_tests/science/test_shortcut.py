"""Shortcut audit statistics: identities derivable by hand on Gaussian blobs, and the classifier's AUROC."""

import numpy as np
import pandas as pd
import pytest

from lens_assets.science.shortcut import asinh_colour, feature_names, shortcut_auroc, summary_statistics

BANDS = ("g", "r", "i")
PIX = 0.2  # arcsec/px
SIZE = 64


def _gauss(sigma_x, sigma_y, *, x0=(SIZE - 1) / 2, y0=(SIZE - 1) / 2, flux=100.0):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    g = np.exp(-0.5 * (((xx - x0) / sigma_x) ** 2 + ((yy - y0) / sigma_y) ** 2))
    return flux * g / g.sum()


def _batch(*planes, n_bands=len(BANDS), var=1e-10):
    """(N, bands, H, W): each plane repeated in every band (a flat spectrum), tiny constant variance."""
    img = np.stack([np.repeat(p[None], n_bands, axis=0) for p in planes])
    return img, np.full_like(img, var)


def _stats(img, var, **kw):
    return summary_statistics(img, var, pixel_scale_arcsec=PIX, bands=BANDS, **kw)


def test_columns_are_the_feature_names_and_count_16_to_20_for_five_bands():
    img, var = _batch(_gauss(3, 3))
    assert list(_stats(img, var).columns) == feature_names(BANDS)
    assert 16 <= len(feature_names("ugriz")) <= 20


def test_second_moments_of_a_round_gaussian_give_its_sigma_squared_and_no_ellipticity():
    img, var = _batch(_gauss(3.0, 3.0))
    row = _stats(img, var).iloc[0]
    assert row["size_arcsec2"] == pytest.approx(9.0 * PIX**2, rel=1e-3)
    assert row["ellipticity"] == pytest.approx(0.0, abs=1e-6)
    assert row["asymmetry"] == pytest.approx(0.0, abs=1e-9)  # centred: point-symmetric


def test_ellipticity_of_an_elongated_gaussian_is_a2_minus_b2_over_a2_plus_b2():
    a, b = 4.0, 2.0
    img, var = _batch(_gauss(a, b), _gauss(b, a))
    st = _stats(img, var)
    np.testing.assert_allclose(st["ellipticity"], (a**2 - b**2) / (a**2 + b**2), rtol=1e-3)
    np.testing.assert_allclose(st["size_arcsec2"], (a**2 + b**2) / 2 * PIX**2, rtol=1e-3)


def test_ellipticity_of_a_gaussian_turned_by_45_degrees_is_the_same_through_the_cross_moment():
    a, b = 4.0, 2.0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float) - (SIZE - 1) / 2
    u, w = (xx + yy) / np.sqrt(2), (yy - xx) / np.sqrt(2)  # axes at 45 degrees: qxx = qyy, all in qxy
    turned = np.exp(-0.5 * ((u / a) ** 2 + (w / b) ** 2))
    img, var = _batch(100 * turned / turned.sum())
    row = _stats(img, var).iloc[0]
    assert row["ellipticity"] == pytest.approx((a**2 - b**2) / (a**2 + b**2), rel=1e-3)
    assert row["size_arcsec2"] == pytest.approx((a**2 + b**2) / 2 * PIX**2, rel=1e-3)


def test_asymmetry_of_an_off_centre_point_is_one_and_of_a_point_and_its_mirror_image_zero():
    point = np.zeros((SIZE, SIZE))
    point[20, 40] = 10.0  # its image under a half turn about the centre, (43, 23), is empty
    mirrored = point.copy()
    mirrored[SIZE - 1 - 20, SIZE - 1 - 40] = 10.0
    img, var = _batch(point, mirrored)
    assert _stats(img, var)["asymmetry"].tolist() == pytest.approx([1.0, 0.0])


def test_concentration_of_a_broad_gaussian_is_its_enclosed_flux_ratio():
    sigma = 8.0  # px: 1.6 arcsec, so the outer radius (3 arcsec = 15 px) holds only 83% of the flux
    img, var = _batch(_gauss(sigma, sigma))
    r1, r3 = 1.0 / PIX, 3.0 / PIX
    want = (1 - np.exp(-(r1**2) / (2 * sigma**2))) / (1 - np.exp(-(r3**2) / (2 * sigma**2)))
    assert _stats(img, var).iloc[0]["concentration"] == pytest.approx(want, rel=0.03)


def test_central_colour_is_that_of_the_core_not_of_a_ring_around_it():
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float) - (SIZE - 1) / 2
    r = np.hypot(xx, yy) * PIX
    core = np.exp(-0.5 * (r / 0.2) ** 2)  # inside 1 arcsec
    ring = np.exp(-0.5 * ((r - 2.0) / 0.15) ** 2)  # at 2 arcsec, inside the outer radius
    img = np.stack([0.1 * core + ring, core + ring, core + 0.1 * ring])[None] * 100  # g, r, i: red core, blue ring
    row = _stats(img, np.full_like(img, 1e-10)).iloc[0]
    assert row["colour_central_g_i"] == pytest.approx(2.5, abs=1e-3)  # g - i of the core: -2.5 log10(0.1)
    total_g, total_i = img[0, 0].sum(), img[0, 2].sum()
    assert row["colour_central_minus_total_g_i"] == pytest.approx(2.5 + 2.5 * np.log10(total_g / total_i), abs=1e-3)


def test_one_blob_has_one_peak_and_two_blobs_two_peaks_at_their_separation():
    one = _gauss(2, 2, x0=32.0, y0=32.0)  # centred on a pixel: one maximum, not a plateau of four
    two = _gauss(2, 2, x0=20.0, y0=32.0) + _gauss(2, 2, x0=44.0, y0=32.0)
    img, var = _batch(one, two, var=1e-4)
    st = _stats(img, var)
    assert st["n_peaks_5sigma"].tolist() == [1.0, 2.0]
    assert st["max_peak_separation_arcsec"].tolist() == pytest.approx([0.0, 24 * PIX])


def test_flat_spectrum_has_zero_colours_and_a_red_object_a_positive_colour():
    img, var = _batch(_gauss(3, 3))
    row = _stats(img, var).iloc[0]
    for name in ("colour_g_r", "colour_r_i", "colour_central_g_i", "colour_central_minus_total_g_i"):
        assert row[name] == pytest.approx(0.0, abs=1e-12), name
    red = img.copy()
    red[:, 0] *= 0.1  # g is ten times fainter: g - r = 2.5 mag for a bright object
    assert _stats(red, var).iloc[0]["colour_g_r"] == pytest.approx(2.5, rel=1e-6)


def test_colours_stay_finite_for_negative_flux():
    assert np.isfinite(asinh_colour(-5.0, 3.0, 1.0))
    assert asinh_colour(2.0, 2.0, 0.5) == 0.0


def test_concentration_and_peak_fraction_of_a_point_source_are_one():
    point = np.zeros((SIZE, SIZE))
    point[32, 32] = 10.0
    img, var = _batch(point)
    row = _stats(img, var).iloc[0]
    assert row["concentration"] == 1.0 and row["peak_flux_fraction"] == 1.0


def test_caller_arrays_are_not_modified():
    img, var = _batch(_gauss(3, 3), var=1e-3)
    before = img.copy(), var.copy()
    _stats(img, var)
    np.testing.assert_array_equal(img, before[0])
    np.testing.assert_array_equal(var, before[1])


def test_images_that_are_not_four_dimensional_are_refused():
    with pytest.raises(ValueError, match=r"images must be \(N, bands, H, W\), got shape \(3, 64, 64\)"):
        summary_statistics(np.zeros((3, 64, 64)), np.zeros((3, 64, 64)), pixel_scale_arcsec=PIX, bands=BANDS)


def test_variance_of_another_shape_is_refused():
    with pytest.raises(ValueError, match=r"variance has shape \(1, 3, 8, 8\); images have shape \(1, 3, 64, 64\)"):
        summary_statistics(np.zeros((1, 3, 64, 64)), np.zeros((1, 3, 8, 8)), pixel_scale_arcsec=PIX, bands=BANDS)


def test_band_count_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"images have 2 bands but bands lists 3"):
        summary_statistics(np.zeros((1, 2, 8, 8)), np.zeros((1, 2, 8, 8)), pixel_scale_arcsec=PIX, bands=BANDS)


def test_nonpositive_pixel_scale_is_refused():
    with pytest.raises(ValueError, match=r"pixel_scale_arcsec must be positive, got 0"):
        summary_statistics(np.zeros((1, 3, 8, 8)), np.zeros((1, 3, 8, 8)), pixel_scale_arcsec=0, bands=BANDS)


def test_negative_variance_is_refused():
    with pytest.raises(ValueError, match="variance has negative pixels"):
        summary_statistics(np.zeros((1, 3, 8, 8)), -np.ones((1, 3, 8, 8)), pixel_scale_arcsec=PIX, bands=BANDS)


def _table(rng, n, shift=0.0):
    return pd.DataFrame({"a": rng.normal(shift, 1, n), "b": rng.normal(0, 1, n), "c": rng.normal(0, 1, n)})


def test_shortcut_auroc_is_chance_when_both_classes_come_from_one_distribution():
    rng = np.random.default_rng(1)
    X = _table(rng, 2000)
    y = rng.integers(0, 2, 2000)
    ex = _table(rng, 2000)
    out = shortcut_auroc(X, y, {"test": (ex, rng.integers(0, 2, 2000))}, seed=0)
    assert abs(out["auroc"]["test"] - 0.5) < 0.1
    assert set(out["feature_importance"]) == {"a", "b", "c"}
    assert sum(out["feature_importance"].values()) == pytest.approx(1.0)


def test_shortcut_auroc_is_one_when_a_feature_separates_the_classes_and_nan_without_both_classes():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 500)
    X = _table(rng, 1000)
    X["a"] += 10 * y
    ey = np.repeat([0, 1], 200)
    ex = _table(rng, 400)
    ex["a"] += 10 * ey
    out = shortcut_auroc(X, y, {"test": (ex, ey), "only_lenses": (ex[ey == 1], ey[ey == 1]),
                                "empty": (ex.iloc[:0], ey[:0])}, seed=0)
    assert out["auroc"]["test"] > 0.99
    assert np.isnan(out["auroc"]["only_lenses"]) and np.isnan(out["auroc"]["empty"])
    assert (out["n_lenses"]["only_lenses"], out["n_nonlenses"]["only_lenses"]) == (200, 0)
    assert max(out["feature_importance"], key=out["feature_importance"].get) == "a"


def test_shortcut_auroc_refuses_a_training_set_with_too_few_of_a_class():
    X = pd.DataFrame({"a": np.arange(20.0)})
    with pytest.raises(ValueError, match=r"at least 5 lenses and 5 non-lenses to train, got 2 lenses and 18"):
        shortcut_auroc(X, np.r_[np.zeros(18), np.ones(2)], {})


def test_shortcut_auroc_refuses_labels_that_are_not_binary():
    X = pd.DataFrame({"a": np.arange(20.0)})
    with pytest.raises(ValueError, match=r"train_y must be 0 or 1, got values \[2.0\]"):
        shortcut_auroc(X, np.r_[np.zeros(10), np.full(10, 2)], {})


def test_shortcut_auroc_refuses_eval_sets_with_other_columns():
    rng = np.random.default_rng(0)
    X = _table(rng, 40)
    with pytest.raises(ValueError, match=r"eval set 'test' has columns \['a'\], train_X has \['a', 'b', 'c'\]"):
        shortcut_auroc(X, np.repeat([0, 1], 20), {"test": (X[["a"]], np.zeros(40))})


def test_shortcut_auroc_by_kind_finds_the_one_type_the_statistics_separate():
    # lenses and the "plain" non-lenses share one distribution; the "bright" non-lenses sit far off in "a":
    # against the plain ones the classifier is at chance, against the bright ones perfect, and the set's
    # AUROC is the share-weighted mean of the two (each non-lens is paired with every lens)
    rng = np.random.default_rng(3)
    y = np.repeat([0, 0, 1], 600)
    kind = np.repeat(["plain", "bright", "lens"], 600)
    X = _table(rng, 1800)
    X.loc[kind == "bright", "a"] -= 10
    ey = np.repeat([0, 0, 1], 300)
    ekind = np.repeat(["plain", "bright", "lens"], 300)
    ex = _table(rng, 900)
    ex.loc[ekind == "bright", "a"] -= 10
    out = shortcut_auroc(X, y, {"test": (ex, ey, ekind), "no_kinds": (ex, ey)}, seed=0)
    by = out["auroc_by_kind"]["test"]
    assert list(by) == ["plain", "bright"]  # lowest AUROC first
    assert by["bright"]["auroc"] > 0.99 and abs(by["plain"]["auroc"] - 0.5) < 0.1
    assert by["plain"]["share"] == by["bright"]["share"] == 0.5 and by["plain"]["n"] == 300
    assert out["auroc"]["test"] == pytest.approx(sum(v["share"] * v["auroc"] for v in by.values()))
    assert "no_kinds" not in out["auroc_by_kind"]
    assert out["scores"]["test"].shape == (900,)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(ey, out["scores"]["test"]) == pytest.approx(out["auroc"]["test"])


def test_shortcut_auroc_refuses_kinds_of_another_length():
    rng = np.random.default_rng(0)
    X = _table(rng, 40)
    with pytest.raises(ValueError, match=r"eval set 'test' has 40 rows but 3 kinds"):
        shortcut_auroc(X, np.repeat([0, 1], 20), {"test": (X, np.repeat([0, 1], 20), ["a", "b", "c"])})
