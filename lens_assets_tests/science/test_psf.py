import math

import numpy as np
import pytest
from scipy import signal

from lens_assets.science.psf import (FWHM_PER_SIGMA, fft_convolve, gaussian_sigma_kernel, homogenize, match_psf,
                                     matching_kernels, measure_fwhm_px, psf_kernel, target_fwhm_arcsec)


def _moments_sigma(img):
    y, x = np.indices(img.shape)
    w = img / img.sum()
    cx, cy = (w * x).sum(), (w * y).sum()
    return math.sqrt((w * ((x - cx) ** 2 + (y - cy) ** 2)).sum() / 2.0)


def test_gaussian_sigma_3_to_5_uses_a_sigma_4_kernel():
    assert gaussian_sigma_kernel(3.0, 5.0) == pytest.approx(4.0)
    # the analytic path of homogenize: a delta through the kernel shows the kernel itself
    size, k = 65, 41
    image = np.zeros((1, 1, size, size))
    image[0, 0, size // 2, size // 2] = 1.0
    res = homogenize(image, image, [[None]], np.array([[3.0 * FWHM_PER_SIGMA]]), np.array([[True]]),
                     pixel_scale_arcsec=1.0, target_fwhm=5.0 * FWHM_PER_SIGMA, kernel_size=k)
    assert res.kernel_source[0, 0] == "gaussian"
    assert _moments_sigma(res.image[0, 0].astype(float)) == pytest.approx(4.0, rel=1e-3)
    with pytest.raises(ValueError, match="target sigma 2.0 px is narrower than the source 3.0 px"):
        gaussian_sigma_kernel(3.0, 2.0)


def test_photutils_kernel_between_gaussians_is_the_sigma_4_gaussian():
    src = psf_kernel("gaussian", 3.0 * FWHM_PER_SIGMA, size=51)
    tgt = psf_kernel("gaussian", 5.0 * FWHM_PER_SIGMA, size=51)
    kernel = matching_kernels(src[None], tgt, window=None)[0]
    assert _moments_sigma(kernel) == pytest.approx(4.0, rel=0.01)


def test_batched_kernels_equal_photutils_make_kernel():
    from photutils.psf_matching import SplitCosineBellWindow, make_kernel

    rng = np.random.default_rng(0)
    srcs = np.stack([psf_kernel("moffat", f, moffat_beta=b, size=35) + rng.normal(0, 1e-5, (35, 35))
                     for f, b in [(3.0, 2.5), (4.0, 3.5), (2.5, 4.5)]])
    tgt = psf_kernel("gaussian", 5.5, size=35)
    for window in (None, SplitCosineBellWindow(alpha=0.3, beta=0.5)):
        ours = matching_kernels(srcs, tgt, window=window)
        for s, k in zip(srcs, ours):
            np.testing.assert_allclose(k, make_kernel(s, tgt, window=window), atol=1e-12)


@pytest.mark.parametrize("src,tgt", [((3.0, 2.5), (5.0, 3.0)), ((3.5, 4.5), (4.6, 2.5)), ((2.5, 3.0), (6.0, 4.0))])
def test_photutils_kernel_between_moffats_reproduces_the_target_fwhm_within_1pct(src, tgt):
    source = psf_kernel("moffat", src[0], moffat_beta=src[1], size=41)
    target = psf_kernel("moffat", tgt[0], moffat_beta=tgt[1], size=41)
    matched = match_psf(source, source, target)  # the PSF itself through the matching
    assert measure_fwhm_px(matched) == pytest.approx(measure_fwhm_px(target), rel=0.01)
    assert measure_fwhm_px(target) == pytest.approx(tgt[0], rel=0.02)


def test_convolution_is_linear_with_no_wrap_around():
    rng = np.random.default_rng(1)
    planes = rng.normal(size=(3, 48, 40))
    planes[:, :, -1] += 100.0  # bright right edge: a circular convolution would leak it to the left edge
    kernels = np.stack([psf_kernel("moffat", 6.0, moffat_beta=2.5, size=21)] * 3)
    ours = fft_convolve(planes, kernels)
    for p, k, o in zip(planes, kernels, ours):
        np.testing.assert_allclose(o, signal.convolve2d(p, k, mode="same", boundary="fill"), atol=1e-9)


def test_convolution_and_matching_conserve_flux_and_leave_inputs_alone():
    image = np.zeros((1, 2, 64, 64))
    image[0, :, 30:34, 29:33] = [[5.0]], [[2.0]]
    before = image.copy()
    psfs = [[psf_kernel("moffat", 3.0, moffat_beta=3.0, size=25), None]]
    res = homogenize(image, image, psfs, np.array([[3.0, 3.0]]), np.array([[True, True]]), pixel_scale_arcsec=1.0,
                     target_fwhm=5.0, kernel_size=25)
    np.testing.assert_array_equal(image, before)
    np.testing.assert_allclose(res.image.sum(axis=(2, 3)), image.sum(axis=(2, 3)), rtol=1e-4)
    assert list(res.kernel_source[0]) == ["psf_image", "gaussian"]


def test_propagated_variance_matches_monte_carlo():
    rng = np.random.default_rng(2)
    h = 40
    yy, xx = np.indices((h, h))
    var = 1.0 + 4.0 * np.exp(-((yy - 20) ** 2 + (xx - 18) ** 2) / 30.0)  # non-uniform: sky + a source
    psf = psf_kernel("moffat", 2.5, moffat_beta=3.0, size=21)
    n = 3000
    noise = rng.standard_normal((n, 1, h, h)) * np.sqrt(var)
    res = homogenize(noise, np.broadcast_to(var, noise.shape), [[psf]] * n, np.full((n, 1), 2.5),
                     np.ones((n, 1), bool), pixel_scale_arcsec=1.0, target_fwhm=5.0, kernel_size=21)
    empirical = res.image[:, 0].astype(float).var(axis=0)
    predicted = res.variance[0, 0].astype(float)
    inner = (slice(10, 30), slice(10, 30))
    ratio = empirical[inner] / predicted[inner]
    assert ratio.mean() == pytest.approx(1.0, abs=0.01)  # 400 pixels x 3000 draws
    assert np.abs(ratio - 1).max() < 0.12  # single pixels: the std of a variance from 3000 draws is 2.6%
    assert predicted[inner].mean() < var[inner].mean()  # smoothing reduces per-pixel variance


def test_bands_already_broader_than_the_target_are_left_alone_with_their_residual():
    image = np.random.default_rng(3).normal(size=(1, 2, 32, 32))
    res = homogenize(image, np.ones_like(image), [[None, None]], np.array([[1.2, 0.8]]), np.array([[True, True]]),
                     pixel_scale_arcsec=0.2, target_fwhm=1.0, kernel_size=15)
    assert list(res.matched[0]) == [False, True]
    np.testing.assert_allclose(res.image[0, 0], image[0, 0], rtol=1e-6)
    assert res.residual[0, 0] == pytest.approx(0.2) and res.residual[0, 1] == 0.0
    assert list(res.fwhm_after[0]) == pytest.approx([1.2, 1.0])


def test_missing_bands_stay_zero():
    image = np.zeros((1, 2, 32, 32))
    res = homogenize(image, image, [[None, None]], np.array([[0.5, 0.5]]), np.array([[True, False]]),
                     pixel_scale_arcsec=0.2, target_fwhm=1.0, kernel_size=15)
    assert list(res.matched[0]) == [True, False] and not res.image[0, 1].any()


def test_target_fwhm_default_is_the_broadest_band_at_the_90th_percentile():
    assert target_fwhm_arcsec([0.9, 1.1, 1.0], 0.2) == pytest.approx(1.1 * math.exp(1.2815516 * 0.2))
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\), got 100"):
        target_fwhm_arcsec([1.0], 0.2, percentile=100)


def test_option_errors_are_clear():
    with pytest.raises(ValueError, match="kernel_size must be odd, got 10"):
        homogenize(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)), [[None]], np.ones((1, 1)), np.ones((1, 1), bool),
                   pixel_scale_arcsec=1, target_fwhm=2, kernel_size=10)
    with pytest.raises(ValueError, match="window 'hann' is not 'auto', None or a photutils window"):
        match_psf(np.zeros((9, 9)), psf_kernel("gaussian", 2.0, size=9), psf_kernel("gaussian", 3.0, size=9),
                  window="hann")
    with pytest.raises(ValueError, match=r"source PSFs must be \(n, K, K\) and the target \(K, K\) with K odd"):
        matching_kernels(np.ones((2, 9, 9)), np.ones((11, 11)))


def test_matched_variance_is_never_negative_next_to_zero_variance_padding():
    from lens_assets.science.psf import homogenize, psf_kernel

    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 1, 48, 48)).astype(np.float32)
    var = np.ones_like(img)
    var[:, :, :, :10] = 0.0  # zero-padded columns, as ingest pads small cutouts
    img[:, :, :, :10] = 0.0
    psfs = [[psf_kernel("gaussian", 2.0)], [psf_kernel("gaussian", 2.5)]]
    out = homogenize(img, var, psfs, np.array([[2.0], [2.5]]) * 0.2, np.ones((2, 1), bool), pixel_scale_arcsec=0.2,
                     target_fwhm=0.8, kernel_size=21)
    assert (out.variance >= 0).all()
    assert out.variance[:, :, :, 30:].min() > 0  # real pixels keep a (smoothed, smaller) variance


def _fwhm_of_whole_image(psf: np.ndarray, upsample: int = 8) -> float:
    """measure_fwhm_px's definition on the whole image: cubic-spline zoom, half-maximum area, pixel removed."""
    from scipy import ndimage

    fine = ndimage.zoom(psf, upsample, order=3, grid_mode=True, mode="grid-constant")
    area = np.count_nonzero(fine >= 0.5 * fine.max()) / upsample**2
    return math.sqrt(max(4 * area / math.pi - 1 / 12 * FWHM_PER_SIGMA**2, 0.0))


@pytest.mark.parametrize("profile,fwhm,beta", [("gaussian", 1.2, 3), ("gaussian", 3.0, 3), ("gaussian", 9.0, 3),
                                               ("moffat", 2.0, 2.0), ("moffat", 5.5, 2.0), ("moffat", 4.0, 5.0)])
@pytest.mark.parametrize("size", [15, 41, 83])
def test_fwhm_measured_on_the_core_equals_the_whole_images(profile, fwhm, beta, size):
    from scipy import ndimage

    psf = psf_kernel(profile, fwhm, moffat_beta=beta, size=size)
    # centred, off-centre by whole and by sub-pixels, and next to an edge (the core's box is clipped there)
    for shift in [(0, 0), (3, -2), (0.4, 0.3), (size // 2 - 2, -(size // 2 - 2))]:
        shifted = np.clip(ndimage.shift(psf, shift, order=3), 0, None)
        assert measure_fwhm_px(shifted) == pytest.approx(_fwhm_of_whole_image(shifted), rel=1e-3)


def test_fwhm_of_a_noisy_star_stamp_is_the_whole_images():
    rng = np.random.default_rng(4)
    for fwhm in (2.0, 3.5, 5.0):
        psf = psf_kernel("moffat", fwhm, moffat_beta=2.5, size=41)
        for _ in range(10):
            noisy = psf + rng.normal(0.0, 0.01 * psf.max(), psf.shape)  # a star's stamp at S/N 100 at the peak
            assert measure_fwhm_px(noisy) == pytest.approx(_fwhm_of_whole_image(noisy), rel=1e-3)


def test_fwhm_of_an_elongated_psf_with_a_second_peak_is_the_whole_images():
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:61, :61] - 30.0
    for _ in range(20):
        sx, sy = rng.uniform(1, 4, 2)
        dx, dy = rng.uniform(-15, 15, 2)
        img = np.exp(-0.5 * ((x / sx) ** 2 + (y / sy) ** 2)) + rng.uniform(0.05, 0.8) * np.exp(
            -0.5 * (((x - dx) / 1.5) ** 2 + ((y - dy) / 1.5) ** 2))
        assert measure_fwhm_px(img) == pytest.approx(_fwhm_of_whole_image(img), rel=1e-3)
