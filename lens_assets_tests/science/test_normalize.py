import numpy as np
import pytest

from lens_assets.science.normalize import center_crop, center_pad, overlap_matrix, resample_flux


def test_overlap_matrix_is_exact_area_overlap():
    w = overlap_matrix(4, 1.0, 2, 2.0)  # 2 output pixels of 2 input pixels each
    np.testing.assert_allclose(w, [[1, 1, 0, 0], [0, 0, 1, 1]])
    w = overlap_matrix(3, 1.0, 2, 1.5)  # the middle input pixel splits in half
    np.testing.assert_allclose(w, [[1, 0.5, 0], [0, 0.5, 1]])


@pytest.mark.parametrize("scale_in,scale_out", [(0.2, 0.263), (0.3, 0.263), (0.168, 0.2)])
def test_resampling_conserves_flux_to_1e4(scale_in, scale_out):
    h = 100
    yy, xx = np.indices((h, h))
    image = 50 * np.exp(-((yy - 49.5) ** 2 + (xx - 49.5) ** 2) / (2 * 6.0**2))
    before = image.copy()
    out, _ = resample_flux(image, scale_in, scale_out)
    np.testing.assert_array_equal(image, before)
    assert out.sum() == pytest.approx(image.sum(), rel=1e-4)
    assert out.shape == (int(h * scale_in / scale_out),) * 2


def test_resampled_variance_is_the_squared_weights_monte_carlo():
    rng = np.random.default_rng(0)
    var = np.full((30, 30), 4.0)
    draws = rng.standard_normal((4000, 30, 30)) * 2.0
    out, pred = resample_flux(draws, 0.2, 0.263, variance=var)
    np.testing.assert_allclose(out.var(axis=0).mean(), pred.mean(), rtol=0.02)


def test_center_crop_and_its_error():
    a = np.arange(36).reshape(6, 6)
    np.testing.assert_array_equal(center_crop(a, 2), [[14, 15], [20, 21]])
    with pytest.raises(ValueError, match="cannot crop 6x6 to 8x8"):
        center_crop(a, 8)


def test_normalize_cutout_converts_to_nanomaggies_and_resamples_a_finer_grid(tmp_path):
    from lens_assets.science.fits_contract import BandHDUs, read_cutout, write_cutout
    from lens_assets.science.normalize import normalize_cutout
    from lens_assets.science.psf import psf_kernel
    from lens_assets.science.surveys import get_survey

    des = get_survey("des")
    yy, xx = np.indices((100, 100))
    blob = (1000 * np.exp(-((yy - 49.5) ** 2 + (xx - 49.5) ** 2) / (2 * 5.0**2))).astype(np.float32)
    bands = {b: BandHDUs(blob, {"BUNIT": "count/s", "MAGZP": 30.0, "PIXSCALE": 0.2, "PSFFWHM": 1.0},
                         variance=np.full_like(blob, 2.0), psf=psf_kernel("gaussian", 5.0, size=21))
             for b in des.band_names}
    write_cutout(tmp_path / "x.fits", {"OBJID": "x", "RA": 1.0, "DEC": 2.0, "SURVEY": "des"}, bands)
    c = read_cutout((tmp_path / "x.fits").read_bytes(), name="x.fits", survey=des)
    n = normalize_cutout(c, des)
    assert n.resampled and n.image.shape == (5, 76, 76)  # 100 px x 0.2" = 20" = 76 px at 0.263"
    to_nmgy = 10 ** (-0.4 * (30.0 - 22.5))
    assert n.image[0].sum() == pytest.approx(blob.sum(dtype=float) * to_nmgy, rel=1e-4)
    assert all(p.shape[0] % 2 == 1 and p.sum() == pytest.approx(1.0) for p in n.psf)


@pytest.mark.parametrize("h,size", [(48, 64), (47, 64), (76, 160), (64, 64)])
def test_center_pad_is_the_inverse_of_center_crop(h, size):
    a = np.arange(2 * h * h, dtype=np.float32).reshape(2, h, h) + 1
    before = a.copy()
    p = center_pad(a, size)
    assert p.shape == (2, size, size) and p.dtype == a.dtype
    np.testing.assert_array_equal(center_crop(p, h), a)
    assert p.sum() == a.sum() and (p != 0).sum() == a.size  # zeros around, nothing else
    np.testing.assert_array_equal(a, before)
    p[0, 0, 0] = -1  # a new array, not a view
    np.testing.assert_array_equal(a, before)


def test_center_pad_refuses_to_shrink():
    with pytest.raises(ValueError, match=r"cannot pad 65x65 to 64x64"):
        center_pad(np.zeros((65, 65)), 64)
