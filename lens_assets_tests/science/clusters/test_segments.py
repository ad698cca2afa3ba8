"""Arc segments of a synthetic cluster field whose arc, streak and galaxies are known exactly."""

import math

import numpy as np
import pandas as pd
import pytest

from lens_assets.science.clusters.segments import (SEGMENT_COLUMNS, estimate_bcg_xy, find_arc_segments,
                                                   segment_columns, segment_gallery, subtract_cluster_light)

N, PIX, FWHM = 201, 0.2, 2.5  # px, arcsec/px, px
BCG = (100.0, 100.0)
BANDS = ("g", "r", "i")
SIGMA = np.array([1.0, 0.8, 1.2])  # noise per pixel per band
ARC_R_PX, ARC_PHI = 15.0 / PIX, (45.0, 105.0)  # 15" about the BCG, 60 deg
MEMBERS = ((150.0, 60.0), (40.0, 130.0))
STREAK_PHI, STREAK_R_PX = 250.0, (55.0, 90.0)
YY, XX = np.mgrid[0:N, 0:N].astype(float)


def _gauss(x0, y0, sigma):
    return np.exp(-0.5 * ((XX - x0) ** 2 + (YY - y0) ** 2) / sigma**2)


def _ridge(xs, ys):
    """A ridge of Gaussian cross-section sigma 1 px through the points, peak 1."""
    out = sum(_gauss(x, y, 1.0) for x, y in zip(xs, ys))
    return out / out.max()


def _bands(amplitudes, profile):
    return np.asarray(amplitudes, float)[:, None, None] * profile


@pytest.fixture(scope="module")
def field():
    phi = np.radians(np.linspace(*ARC_PHI, 300))
    arc = _bands([6.0, 5.0, 4.0], _ridge(BCG[0] + ARC_R_PX * np.cos(phi), BCG[1] + ARC_R_PX * np.sin(phi)))
    t, ps = np.linspace(*STREAK_R_PX, 120), math.radians(STREAK_PHI)
    streak = _bands([5.0, 5.0, 5.0], _ridge(BCG[0] + t * math.cos(ps), BCG[1] + t * math.sin(ps)))
    galaxies = _bands([50.0, 120.0, 200.0], _gauss(*BCG, 25.0))
    galaxies += _bands([20.0, 50.0, 80.0], sum(_gauss(x, y, 12.5) for x, y in MEMBERS))
    variance = np.broadcast_to((SIGMA**2)[:, None, None], arc.shape).copy()
    noise = np.random.default_rng(0).normal(size=arc.shape) * SIGMA[:, None, None]
    return {"image": galaxies + arc + streak + noise, "variance": variance, "arc": arc, "galaxies": galaxies}


def _find(f, **kw):
    return find_arc_segments(f["image"], f["variance"], bands=BANDS, pixel_scale_arcsec=PIX, psf_fwhm_px=FWHM,
                             **{"bcg_xy": BCG, **kw})


@pytest.fixture(scope="module")
def found(field):
    return {light: _find(field, light=light) for light in ("median", "model")}


def _row_near(table, x, y, tol_px):
    d = np.hypot(table["x_px"] - x, table["y_px"] - y)
    rows = table[d < tol_px]
    assert len(rows) == 1, table
    return rows.iloc[0]


def _arc_centroid():
    """Centroid of a uniform arc of radius R spanning 2a: R sin(a) / a from the centre, on the bisector."""
    a = math.radians(ARC_PHI[1] - ARC_PHI[0]) / 2
    mid = math.radians(sum(ARC_PHI) / 2)
    rho = ARC_R_PX * math.sin(a) / a
    return BCG[0] + rho * math.cos(mid), BCG[1] + rho * math.sin(mid)


def _arc_row(table):
    return _row_near(table, *_arc_centroid(), tol_px=3.0)


def test_segment_columns_put_band_fluxes_after_area():
    cols = segment_columns(("g", "r"))
    assert cols[:6] == list(SEGMENT_COLUMNS[:6])
    assert cols[6:10] == ["flux_g", "flux_err_g", "flux_r", "flux_err_r"]
    assert cols[10:] == list(SEGMENT_COLUMNS[6:])


@pytest.mark.parametrize("light", ["median", "model"])
def test_arc_is_one_tangential_segment_with_the_arc_curvature(found, field, light):
    table, segmap = found[light]
    arc = _arc_row(table)
    ridge = field["arc"].sum(axis=0) > 0.5 * field["arc"].sum(axis=0).max()
    assert set(np.unique(segmap[ridge])) == {arc.segment_id}  # the whole ridge is one segment
    assert arc.r_arcsec == pytest.approx(15.0, abs=1.0)
    assert arc.phi_deg == pytest.approx(75.0, abs=2.0)
    assert arc.tangential_misalignment_deg < 20.0
    assert arc.curvature_per_arcsec == pytest.approx(1.0 / 15.0, rel=0.25)
    assert arc.curvature_center_offset_arcsec < 3.0
    assert arc.elongation > 3.0 and arc.length_arcsec > arc.width_arcsec


def test_radial_streak_is_radial_and_straight(found):
    table, _ = found["median"]
    mid = sum(STREAK_R_PX) / 2
    streak = _row_near(table, BCG[0] + mid * math.cos(math.radians(STREAK_PHI)),
                       BCG[1] + mid * math.sin(math.radians(STREAK_PHI)), tol_px=3.0)
    assert streak.tangential_misalignment_deg > 60.0
    assert streak.curvature_per_arcsec == 0.0 and np.isnan(streak.curvature_center_offset_arcsec)
    # a bar of 35 px with a sigma-1 px cross-section: 4 sigma_major ~ 4 x 35 / sqrt(12) px
    assert streak.length_arcsec == pytest.approx(4 * 35 / math.sqrt(12) * PIX, rel=0.2)


def test_median_light_recovers_the_arc_flux_per_band(found, field):
    arc = _arc_row(found["median"][0])
    injected = field["arc"].sum(axis=(1, 2))
    for b, name in enumerate(BANDS):
        assert arc[f"flux_{name}"] == pytest.approx(injected[b], rel=0.2)


@pytest.mark.parametrize("light", ["median", "model"])
def test_fluxes_and_errors_are_sums_over_the_segment_mask(found, field, light):
    table, segmap = found[light]
    resid = subtract_cluster_light(field["image"], field["variance"], method=light, pixel_scale_arcsec=PIX,
                                   psf_fwhm_px=FWHM)
    assert list(table["segment_id"]) == list(range(1, len(table) + 1)) == sorted(set(np.unique(segmap)) - {0})
    for row in table.itertuples():
        mask = segmap == row.segment_id
        assert row.area_px == mask.sum()
        for b, name in enumerate(BANDS):
            assert getattr(row, f"flux_err_{name}") == pytest.approx(math.sqrt(field["variance"][b][mask].sum()))
            assert getattr(row, f"flux_{name}") == pytest.approx(resid[b][mask].sum())


def test_no_segment_is_left_within_the_exclusion_radius(found):
    for table, _ in found.values():
        assert (table["r_arcsec"] >= 2.0).all()
    table, _ = found["median"]
    assert (np.hypot(table["x_px"] - BCG[0], table["y_px"] - BCG[1]) * PIX >= 2.0).all()


@pytest.mark.parametrize("method", ["median", "model"])
def test_light_methods_keep_the_arc_and_remove_the_galaxy_cores(field, method):
    resid = subtract_cluster_light(field["image"], field["variance"], method=method, pixel_scale_arcsec=PIX,
                                   psf_fwhm_px=FWHM)
    for x, y in (BCG, *MEMBERS):
        core = np.hypot(XX - x, YY - y) < 5.0
        galaxy = field["galaxies"][:, core].sum()
        assert abs(resid[:, core].sum()) < 0.1 * galaxy
    on_arc = field["arc"][0] > 0.05 * field["arc"][0].max()
    assert resid[:, on_arc].sum() == pytest.approx(field["arc"][:, on_arc].sum(), rel=0.15)


def test_model_only_at_removes_the_galaxy_there_and_keeps_the_members(field):
    resid = subtract_cluster_light(field["image"], field["variance"], method="model", pixel_scale_arcsec=PIX,
                                   psf_fwhm_px=FWHM, model_only_at=BCG)
    core = np.hypot(XX - BCG[0], YY - BCG[1]) < 5.0
    assert abs(resid[:, core].sum()) < 0.1 * field["galaxies"][:, core].sum()
    for x, y in MEMBERS:  # left whole: their light is all in the residual
        member = np.hypot(XX - x, YY - y) < 5.0
        light = field["image"][:, member].sum() - (field["galaxies"] - _bands([20.0, 50.0, 80.0], sum(
            _gauss(mx, my, 12.5) for mx, my in MEMBERS)))[:, member].sum()
        assert resid[:, member].sum() == pytest.approx(light, rel=0.1)
    # and find_arc_segments passes it on: the members become segments of their own
    table, _ = _find(field, light="model", model_only_bcg=True)
    for x, y in MEMBERS:
        assert np.hypot(table["x_px"] - x, table["y_px"] - y).min() < 3.0
    with pytest.raises(ValueError, match="model_only_at needs method='model'"):
        subtract_cluster_light(field["image"], field["variance"], method="median", pixel_scale_arcsec=PIX,
                               model_only_at=BCG)


def test_noise_only_gives_few_segments_and_an_empty_table_has_the_columns():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(3, N, N)) * SIGMA[:, None, None]
    variance = np.broadcast_to((SIGMA**2)[:, None, None], image.shape).copy()
    kw = dict(bands=BANDS, pixel_scale_arcsec=PIX, psf_fwhm_px=FWHM, bcg_xy=BCG)
    table, _ = find_arc_segments(image, variance, nsigma=3.0, **kw)
    assert len(table) <= 2
    empty, segmap = find_arc_segments(image, variance, nsigma=50.0, **kw)
    assert empty.empty and list(empty.columns) == segment_columns(BANDS)
    assert empty["segment_id"].dtype == np.int64 and empty["area_px"].dtype == np.int64
    assert empty["snr"].dtype == np.float64 and not segmap.any()


def test_everything_excluded_gives_the_empty_table(field):
    table, segmap = _find(field, exclude_radius_arcsec=1000.0)
    assert table.empty and list(table.columns) == segment_columns(BANDS) and not segmap.any()


def test_a_noiseless_arc_has_the_curvature_of_its_circle():
    """Geometric refinement of the Kasa fit: the circle of a sigma-1 px ridge of radius 75 px is recovered."""
    phi = np.radians(np.linspace(*ARC_PHI, 300))
    arc = _bands([5.0], _ridge(BCG[0] + ARC_R_PX * np.cos(phi), BCG[1] + ARC_R_PX * np.sin(phi)))
    table, _ = find_arc_segments(arc, np.ones_like(arc), bands=("r",), pixel_scale_arcsec=PIX, psf_fwhm_px=FWHM,
                                 bcg_xy=BCG)
    row = _arc_row(table)
    assert row.curvature_per_arcsec == pytest.approx(1.0 / 15.0, rel=0.02)
    assert row.curvature_center_offset_arcsec < 0.2
    assert row.tangential_misalignment_deg < 1.0


def test_bcg_is_estimated_when_not_given(field, found):
    x, y = estimate_bcg_xy(field["image"], field["variance"], psf_fwhm_px=FWHM)
    assert math.hypot(x - BCG[0], y - BCG[1]) < 1.5
    table, _ = _find(field, bcg_xy=None)
    assert _arc_row(table).r_arcsec == pytest.approx(_arc_row(found["median"][0]).r_arcsec, abs=0.1)


def test_inputs_are_not_modified(field):
    image, variance = field["image"].copy(), field["variance"].copy()
    image[:, :3, :3] = np.nan  # no data there
    variance[:, :3, :3] = 0.0
    before = image.copy(), variance.copy()
    for method in ("median", "model"):
        resid = subtract_cluster_light(image, variance, method=method, pixel_scale_arcsec=PIX, psf_fwhm_px=FWHM)
        assert np.all(resid[:, :3, :3] == 0.0) and np.isfinite(resid).all()
    find_arc_segments(image, variance, bands=BANDS, pixel_scale_arcsec=PIX, psf_fwhm_px=FWHM, bcg_xy=None)
    np.testing.assert_array_equal(image, before[0])
    np.testing.assert_array_equal(variance, before[1])


def test_unknown_light_names_the_valid_ones(field):
    with pytest.raises(ValueError, match=r"light 'fit' is not one of \['median', 'model'\]"):
        _find(field, light="fit")


def test_unknown_method_names_the_valid_ones(field):
    with pytest.raises(ValueError, match=r"method 'isophote' is not one of \['median', 'model'\]"):
        subtract_cluster_light(field["image"], field["variance"], method="isophote", pixel_scale_arcsec=PIX)


def test_model_method_needs_the_psf(field):
    with pytest.raises(ValueError, match="psf_fwhm_px is required for method='model'"):
        subtract_cluster_light(field["image"], field["variance"], method="model", pixel_scale_arcsec=PIX)


def test_bands_must_match_the_image(field):
    with pytest.raises(ValueError, match=r"bands has 2 names \('g', 'r'\) but image has 3 bands"):
        find_arc_segments(field["image"], field["variance"], bands=("g", "r"), pixel_scale_arcsec=PIX,
                          psf_fwhm_px=FWHM, bcg_xy=BCG)


def test_variance_shape_must_match_the_image(field):
    with pytest.raises(ValueError, match=r"variance has shape \(3, 201, 200\) but image has shape \(3, 201, 201\)"):
        find_arc_segments(field["image"], field["variance"][:, :, :200], bands=BANDS, pixel_scale_arcsec=PIX,
                          psf_fwhm_px=FWHM, bcg_xy=BCG)


def test_gallery_writes_a_png(found, field, tmp_path):
    table, segmap = found["median"]
    path = segment_gallery(field["image"], segmap, table, path=tmp_path / "g" / "segments.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(table, pd.DataFrame)


@pytest.mark.parametrize("shape,size", [((152, 152), 9), ((37, 50), 9), ((10, 12), 9), ((60, 7), 5), ((33, 33), 3)])
def test_box_median_is_scipys_median_filter(shape, size):
    """The same values as ``ndimage.median_filter(mode="reflect")``, edges, ties and the second pass's +-inf
    placeholders included; a row block boundary falls inside the larger images."""
    from scipy import ndimage

    from lens_assets.science.clusters.segments import box_median

    rng = np.random.default_rng(sum(shape) + size)
    img = rng.normal(size=shape)
    img[rng.random(shape) < 0.1] = np.inf
    img[rng.random(shape) < 0.1] = -np.inf
    img[:, :3] = 1.0  # ties
    out = box_median(img, size)
    assert np.array_equal(out, ndimage.median_filter(img, size=size, mode="reflect"))
    assert not np.array_equal(out, img)  # it filters


def test_box_median_hands_what_it_does_not_lay_out_to_scipy():
    """NaN, an even box and a box wider than the image go to scipy, so the answer is scipy's whatever the input."""
    from scipy import ndimage

    from lens_assets.science.clusters.segments import box_median

    rng = np.random.default_rng(3)
    img = rng.normal(size=(20, 20))
    img[4, 5] = np.nan
    small = rng.normal(size=(6, 30))
    for x, size in ((img, 5), (rng.normal(size=(20, 20)), 4), (small, 13)):
        np.testing.assert_array_equal(box_median(x, size), ndimage.median_filter(x, size=size, mode="reflect"))
