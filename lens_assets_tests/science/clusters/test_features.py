import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest

from lens_assets.science.clusters.extinction import ccm89_a_lambda_over_a_v, reddening_vector
from lens_assets.science.clusters.features import (CONTEXT_KEYS, FEATURE_MONOTONE, cluster_feature_names,
                                                   cluster_features, cluster_features_schema,
                                                   robust_colour_consistency, segment_colours, segment_columns)
from lens_assets.science.surveys import get_survey

DES = get_survey("des")
BANDS = [b.name for b in DES.bands]
LAM = [b.wavelength_nm for b in DES.bands]
SED = np.array([22.6, 22.0, 21.7, 21.5, 21.4])  # one source's AB magnitudes g r i z Y
CONTEXT = {"seeing_arcsec": 0.9, "psf_fwhm_arcsec": 0.95, "depth_mag": 24.3}
BCG = (200.0, 200.0)
PS = DES.pixel_scale_arcsec


def _segments(mags, *, rel_err=0.01, rng=None, r_arcsec=10.0, phi_deg=None, misalign_deg=0.0,
              orientation_deg=None, curvature=None, bands=BANDS):
    """A segments table: AB magnitudes (n, B) -> fluxes in nanomaggies with rel_err Gaussian noise; segments on a
    circle of r_arcsec about BCG at phi_deg, tangential unless told otherwise."""
    mags = np.atleast_2d(np.asarray(mags, dtype=float))
    n = len(mags)
    phi = np.linspace(0.0, 360.0, n, endpoint=False) if phi_deg is None else np.asarray(phi_deg, dtype=float)
    r = np.broadcast_to(np.asarray(r_arcsec, dtype=float), (n,))
    df = pd.DataFrame({
        "segment_id": np.arange(n), "x_px": BCG[0] + r * np.cos(np.deg2rad(phi)) / PS,
        "y_px": BCG[1] + r * np.sin(np.deg2rad(phi)) / PS, "r_arcsec": r, "phi_deg": phi,
        "area_px": np.full(n, 40.0), "snr": np.full(n, 30.0), "length_arcsec": np.full(n, 3.0),
        "width_arcsec": np.full(n, 0.5), "elongation": np.full(n, 6.0),
        "orientation_deg": phi + 90.0 if orientation_deg is None else np.broadcast_to(orientation_deg, (n,)),
        "tangential_misalignment_deg": np.broadcast_to(misalign_deg, (n,)),
        "curvature_per_arcsec": 1.0 / r if curvature is None else np.broadcast_to(curvature, (n,)),
        "curvature_center_offset_arcsec": np.full(n, 0.2),
    })
    flux = 10 ** (-0.4 * (mags - 22.5))
    err = rel_err * flux
    noisy = flux if rng is None else flux + rng.normal(0.0, err)
    for j, b in enumerate(bands):
        df[f"flux_{b}"] = noisy[:, j]
        df[f"flux_err_{b}"] = err[:, j]
    return df


def _one_source(n, rng):
    """n images of one source: SED plus an achromatic magnification offset each."""
    return SED[None, :] + rng.uniform(-1.0, 1.0, (n, 1))


def _colour_shift_to_mags(dc):
    """Magnitude shifts (B,) whose adjacent differences are dc (K,), the reddest band unchanged."""
    return np.r_[np.cumsum(np.asarray(dc)[::-1])[::-1], 0.0]


def _consistency(df, **kw):
    sc = segment_colours(df, BANDS)
    return robust_colour_consistency(sc.colours, sc.colour_cov, reddening=reddening_vector(LAM), **kw)


def test_segment_colours_propagate_flux_errors_by_hand():
    df = _segments([[22.0, 22.0, 22.0]], bands=["g", "r", "i"])
    df["flux_g"], df["flux_r"], df["flux_i"] = 100.0, 50.0, 25.0
    df["flux_err_g"], df["flux_err_r"], df["flux_err_i"] = 1.0, 1.0, 1.0
    colours, cov, keep = segment_colours(df, ["g", "r", "i"])
    np.testing.assert_allclose(colours[0], [-2.5 * np.log10(2.0)] * 2)
    s = 2.5 / np.log(10) * np.array([0.01, 0.02, 0.04])  # mag errors: (2.5/ln10) err/flux
    np.testing.assert_allclose(cov[0], [[s[0] ** 2 + s[1] ** 2, -s[1] ** 2], [-s[1] ** 2, s[1] ** 2 + s[2] ** 2]])
    assert keep.tolist() == [True]


def test_segment_colours_mask_non_positive_flux_and_low_snr_without_dropping_rows():
    df = _segments(np.tile(SED, (4, 1)))
    df.loc[1, "flux_r"] = 0.0
    df.loc[2, "flux_Y"] = -0.3
    df.loc[3, "snr"] = 2.0
    before = df.copy()
    sc = segment_colours(df, BANDS, min_snr=3.0)
    assert sc.keep.tolist() == [True, False, False, False] and sc.n_used == 1
    assert sc.colours.shape == (4, 4) and sc.colour_cov.shape == (4, 4, 4)
    assert np.all(np.isnan(sc.colours[1:])) and np.all(np.isfinite(sc.colours[0]))
    pd.testing.assert_frame_equal(df, before)


def test_one_source_colour_is_consistent_and_random_colours_are_not():
    rng = np.random.default_rng(1)
    one = _consistency(_segments(_one_source(20, rng), rng=rng))
    assert one["n_used"] == 20
    assert one["consistent_fraction"] > 0.8 and one["consistent_fraction_dereddened"] > 0.8
    assert one["colour_dispersion"] < 0.03
    np.testing.assert_allclose(one["colour_centroid"], SED[:-1] - SED[1:], atol=0.01)
    rand = _consistency(_segments(SED + rng.normal(0.0, 0.5, (20, 5)), rng=rng))
    assert rand["consistent_fraction"] < 0.3 and rand["consistent_fraction_dereddened"] < 0.3
    assert rand["colour_dispersion"] > 0.2


def test_differential_extinction_is_removed_along_the_ccm_vector_only():
    rng = np.random.default_rng(2)
    mags = _one_source(20, rng)
    red = np.arange(20) % 2 == 1
    a_b = 3.1 * ccm89_a_lambda_over_a_v(LAM)  # A_b / E(B-V)
    reddened = mags + np.where(red[:, None], 0.3 * a_b, 0.0)
    res = _consistency(_segments(reddened, rng=rng))
    assert res["consistent_fraction"] < 0.6
    assert res["consistent_fraction_dereddened"] > 0.8
    # the centroid sits between the groups, so only the difference in E(B-V) is physical
    assert res["ebv"][red].mean() - res["ebv"][~red].mean() == pytest.approx(0.3, abs=0.05)

    v = reddening_vector(LAM)
    u = np.array([v[1], -v[0], 0.0, 0.0])  # perpendicular to v in colour space; a 0.5 mag shift
    shifted = mags + np.where(red[:, None], _colour_shift_to_mags(0.5 * u / np.linalg.norm(u)), 0.0)
    perp = _consistency(_segments(shifted, rng=rng))
    assert perp["consistent_fraction"] < 0.6 and perp["consistent_fraction_dereddened"] < 0.6


def test_nonnegative_ebv_constraint_clips_at_zero():
    rng = np.random.default_rng(3)
    res = _consistency(_segments(_one_source(12, rng), rng=rng), ebv_constraint="nonnegative")
    assert np.all(res["ebv"] >= 0.0)


def test_the_nonnegative_ebv_is_the_free_gls_fit_clipped_at_zero_row_by_row():
    from lens_assets.science.clusters.features import _fit_ebv

    rng = np.random.default_rng(4)
    v = reddening_vector(LAM)
    resid = rng.normal(size=(50, len(v))) + 0.1 * v  # segments on both sides of the reddening vector
    a = rng.normal(size=(50, len(v), len(v)))
    inv = a @ a.transpose(0, 2, 1) + np.eye(len(v))  # a symmetric positive-definite weight per segment
    free = _fit_ebv(resid, inv, v, False)
    # the weighted least-squares E of r = E v + noise by numpy's solver, through the weight's Cholesky factor
    for i in (0, 17, 42):
        chol = np.linalg.cholesky(inv[i])
        want = np.linalg.lstsq(chol.T @ v[:, None], chol.T @ resid[i], rcond=None)[0][0]
        assert free[i] == pytest.approx(want, rel=1e-10)
    assert (free < 0).sum() >= 10 and (free > 0).sum() >= 10
    np.testing.assert_array_equal(_fit_ebv(resid, inv, v, True), np.maximum(free, 0.0))


def test_huber_centroid_resists_a_three_mag_outlier_by_hand():
    c0 = 0.6
    x = c0 + np.r_[np.linspace(-0.04, 0.04, 9), 3.0]
    colours, cov = x[:, None], np.full((10, 1, 1), 1e-4)
    before = colours.copy()
    res = robust_colour_consistency(colours, cov)
    # median c0 + 0.005, MAD 0.025, scale 1.4826 * 0.025; the nine inliers get weight 1 and the outlier
    # contributes psi = delta: sum over inliers (x - mu) + delta * scale = 0 -> mu = c0 + delta * scale / 9
    hand = c0 + 1.345 * 1.4826 * 0.025 / 9
    assert res["colour_centroid"][0] == pytest.approx(hand, abs=1e-9)
    assert abs(res["colour_centroid"][0] - c0) < 0.05 and abs(x.mean() - c0) == pytest.approx(0.3)
    np.testing.assert_array_equal(colours, before)


def test_mahalanobis_and_regularized_covariance_of_a_diagonal_case_by_hand():
    a, b, s1, s2 = 0.1, 0.06, 0.02, 0.03
    colours = np.array([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b], [0.0, 0.0]])
    cov = np.tile(np.diag([s1 ** 2, s2 ** 2]), (5, 1, 1))
    res = robust_colour_consistency(colours, cov, intrinsic_scatter_mag=0.0)
    np.testing.assert_allclose(res["colour_centroid"], [0.0, 0.0], atol=1e-12)  # symmetric about 0
    np.testing.assert_allclose(res["mahalanobis"], [a / s1, a / s1, b / s2, b / s2, 0.0])  # 5, 5, 2, 2, 0
    assert res["consistent_fraction"] == pytest.approx(3 / 5)  # d^2 = 25, 25, 4, 4, 0 vs chi2_2(95%) = 5.99
    # sample scatter diag(2a^2/4, 2b^2/4) = diag(0.005, 0.0018) with zero covariance: shrinkage 1, and
    # excess + mean measurement covariance gives it back
    assert res["shrinkage_intensity"] == 1.0
    np.testing.assert_allclose(res["colour_cov"], np.diag([0.005, 0.0018]), atol=1e-12)
    floor = robust_colour_consistency(colours, cov)  # 0.05 mag floor added in quadrature
    assert floor["mahalanobis"][0] == pytest.approx(a / np.hypot(s1, 0.05))
    # intrinsic_scatter_mag=None: the excess scatter diag(0.0046, 0.0009) + own covariance: a / sqrt(0.005)
    own = robust_colour_consistency(colours, cov, intrinsic_scatter_mag=None)
    assert own["mahalanobis"][0] == pytest.approx(a / np.sqrt(0.005))


def test_fewer_than_two_usable_segments_give_nan_figures():
    for n in (0, 1):
        res = robust_colour_consistency(np.zeros((n, 4)), np.zeros((n, 4, 4)), reddening=reddening_vector(LAM))
        assert res["n_used"] == n and np.isnan(res["consistent_fraction"])
        assert np.isnan(res["consistent_fraction_dereddened"]) and np.all(np.isnan(res["colour_centroid"]))
        assert res["mahalanobis"].shape == (n,)


def test_circle_of_tangential_arcs_by_hand():
    r = 8.0
    row = cluster_features(_segments(np.tile(SED, (4, 1)), r_arcsec=r, phi_deg=[0, 90, 180, 270]), bands=BANDS,
                           wavelengths_nm=LAM, bcg_xy=BCG, pixel_scale_arcsec=PS, context=CONTEXT)
    assert row["n_segments"] == 4 and row["n_segments_used"] == 4
    assert row["tangential_alignment"] == pytest.approx(1.0)
    assert row["arc_curvature"] == pytest.approx(1.0)
    assert row["ellipticity_coherence"] == pytest.approx(1.0)
    assert row["radial_concentration"] == 1.0 and row["arc_centroid_offset_arcsec"] == pytest.approx(0.0, abs=1e-9)
    assert row["bcg_distance_mean_arcsec"] == pytest.approx(r) and row["bcg_distance_std_arcsec"] == 0.0
    # square of side r*sqrt(2): four sides and two diagonals, mean d^2 = (4 * 2r^2 + 2 * 4r^2) / 6 = 8r^2/3
    assert row["pairwise_separation_rms_arcsec"] == pytest.approx(r * np.sqrt(8 / 3))
    assert row["total_arc_length_arcsec"] == 12.0 and row["curvature_center_offset_arcsec"] == 0.2
    assert row["colour_consistency"] == 1.0 and row["colour_dispersion_mag"] == 0.0
    assert row["median_colour_g_r"] == pytest.approx(SED[0] - SED[1])
    assert np.isnan(row["radial_colour_gradient"])  # one radius: no slope
    assert {k: row[k] for k in CONTEXT} == CONTEXT and row["pixel_scale_arcsec"] == PS
    assert list(row) == cluster_feature_names(BANDS)


def test_radial_segments_give_minus_one_and_random_orientations_low_coherence():
    phi = np.linspace(0, 360, 12, endpoint=False)
    radial = _segments(np.tile(SED, (12, 1)), phi_deg=phi, misalign_deg=90.0, orientation_deg=phi)
    row = cluster_features(radial, bands=BANDS, wavelengths_nm=LAM, bcg_xy=BCG, pixel_scale_arcsec=PS,
                           context=CONTEXT)
    assert row["tangential_alignment"] == pytest.approx(-1.0)
    assert row["ellipticity_coherence"] == pytest.approx(1.0)  # all share one angle (90 deg) to their tangent
    # orientations 0, 45, 90, 135 deg off the tangent, each thrice: 2 x angle spans the circle, resultant 0
    mixed = _segments(np.tile(SED, (12, 1)), phi_deg=phi, orientation_deg=phi + 90 + np.tile([0, 45, 90, 135], 3))
    row = cluster_features(mixed, bands=BANDS, wavelengths_nm=LAM, bcg_xy=BCG, pixel_scale_arcsec=PS,
                           context=CONTEXT)
    assert row["ellipticity_coherence"] == pytest.approx(0.0, abs=1e-12)


def test_radial_colour_gradient_is_the_theil_sen_slope():
    r = np.array([5.0, 10.0, 15.0, 20.0])
    mags = np.tile(SED, (4, 1))
    mags[:, 0] += 0.02 * r  # g - r grows 0.02 mag per arcsec
    row = cluster_features(_segments(mags, r_arcsec=r), bands=BANDS, wavelengths_nm=LAM, bcg_xy=BCG,
                           pixel_scale_arcsec=PS, context=CONTEXT)
    assert row["radial_colour_gradient"] == pytest.approx(0.02)


def test_two_band_survey_has_no_dereddened_consistency():
    hst = get_survey("hst")
    bands, lam = [b.name for b in hst.bands], [b.wavelength_nm for b in hst.bands]
    rng = np.random.default_rng(4)
    row = cluster_features(_segments(SED[None, :2] + rng.uniform(-1, 1, (6, 1)), rng=rng, bands=bands), bands=bands,
                           wavelengths_nm=lam, bcg_xy=BCG, pixel_scale_arcsec=PS, context=CONTEXT)
    assert np.isnan(row["colour_consistency"]) and row["colour_consistency_raw"] > 0.8


def _row(objid, df, label):
    row = cluster_features(df, bands=BANDS, wavelengths_nm=LAM, bcg_xy=BCG, pixel_scale_arcsec=PS, context=CONTEXT)
    return {"objid": objid, "survey": "des", "label": label, **row}


def test_empty_and_single_segment_fields_give_nan_and_validate():
    empty = _segments(np.zeros((0, 5)))
    one = _segments(SED)
    rows = [_row("e", empty, 0), _row("o", one, -1), _row("c", _segments(np.tile(SED, (5, 1))), 1)]
    assert rows[0]["n_segments"] == 0 and rows[0]["n_segments_used"] == 0
    assert all(np.isnan(rows[0][k]) for k in cluster_feature_names(BANDS)[2:-4])
    assert rows[1]["n_segments"] == 1 and rows[1]["n_segments_used"] == 1
    for k in ("colour_consistency", "colour_consistency_raw", "colour_mahalanobis_median", "colour_dispersion_mag",
              "bcg_distance_std_arcsec", "pairwise_separation_rms_arcsec"):
        assert np.isnan(rows[1][k])
    table = pd.DataFrame(rows)
    cluster_features_schema(BANDS).validate(table)
    bad = table.copy()
    bad.loc[2, "tangential_alignment"] = 2.0
    with pytest.raises(pa.errors.SchemaError, match="tangential_alignment"):
        cluster_features_schema(BANDS).validate(bad)


def test_monotone_keys_are_features():
    assert set(FEATURE_MONOTONE) <= set(cluster_feature_names(BANDS))
    assert FEATURE_MONOTONE["colour_consistency"] == 1 and FEATURE_MONOTONE["seeing_arcsec"] == -1


def test_error_paths_name_the_field_and_value():
    df = _segments(np.tile(SED, (3, 1)))
    kw = dict(bands=BANDS, bcg_xy=BCG, pixel_scale_arcsec=PS, context=CONTEXT)
    with pytest.raises(ValueError, match=r"wavelengths_nm has 4 values for 5 bands"):
        cluster_features(df, wavelengths_nm=LAM[:4], **kw)
    with pytest.raises(ValueError, match=r"shrinkage 'oas' is not one of \['ledoit_wolf'\]"):
        robust_colour_consistency(np.zeros((3, 2)), np.zeros((3, 2, 2)), shrinkage="oas")
    with pytest.raises(ValueError, match=r"shrinkage 1.5 must lie in \[0, 1\]"):
        robust_colour_consistency(np.zeros((3, 2)), np.zeros((3, 2, 2)), shrinkage=1.5)
    with pytest.raises(ValueError, match=r"ebv_constraint 'positive' is not one of \['free', 'nonnegative'\]"):
        robust_colour_consistency(np.zeros((3, 2)), np.zeros((3, 2, 2)), ebv_constraint="positive")
    with pytest.raises(ValueError, match=r"colour_cov has shape \(3, 2\)"):
        robust_colour_consistency(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"reddening must be .* shape \(2,\)"):
        robust_colour_consistency(np.zeros((3, 2)), np.zeros((3, 2, 2)), reddening=[1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match=r"segments lacks columns \['flux_err_Y'\]"):
        cluster_features(df.drop(columns="flux_err_Y"), wavelengths_nm=LAM, **kw)
    with pytest.raises(ValueError, match=r"unknown \['airmass'\], missing \[\]"):
        cluster_features(df, wavelengths_nm=LAM, **{**kw, "context": {**CONTEXT, "airmass": 1.2}})
    with pytest.raises(ValueError, match=r"row 1: flux_err_g = -1.0 is negative"):
        segment_colours(df.assign(flux_err_g=[0.1, -1.0, 0.1]), BANDS)
    assert segment_columns(["g", "r"])[-4:] == ["flux_g", "flux_r", "flux_err_g", "flux_err_r"]
    assert set(CONTEXT_KEYS) == set(CONTEXT)
