"""Sky noise without a variance map: hand-derivable cases (science layer, no dagster)."""

from __future__ import annotations

import numpy as np
import pytest

from lens_assets.science.noise import (MIN_VALID_PX, derived_variance, sky_noise, sky_noise_sigma,
                                       whole_stamp_mad_sigma)

SIZE = 64
SIGMA = 2.0


def noise(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, SIGMA, (size, size))


def galaxy(*, size: int = SIZE, cover: float = 0.2, peak_over_noise: float = 100.0, profile: str = "gaussian"):
    """A centred galaxy whose 1-sigma isophote encloses ``cover`` of the stamp, peaking at 100 sigma.

    Radius of that isophote: ``r1 = sqrt(cover * size**2 / pi)`` (16.2 px for 20% of 64x64).
    Gaussian: ``peak * exp(-r1**2 / (2 s**2)) = sigma`` gives ``s = r1 / sqrt(2 ln 100)`` (5.3 px);
    exponential: ``peak * exp(-r1 / h) = sigma`` gives ``h = r1 / ln 100`` (3.5 px, broader wings).
    """
    r1 = np.sqrt(cover * size * size / np.pi)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(x, y)
    peak = peak_over_noise * SIGMA
    if profile == "gaussian":
        return peak * np.exp(-r**2 / (2 * (r1 / np.sqrt(2 * np.log(peak_over_noise)))**2))
    return peak * np.exp(-r / (r1 / np.log(peak_over_noise)))


@pytest.mark.parametrize("seed", range(5))
def test_pure_gaussian_noise_gives_its_sigma(seed):
    assert sky_noise_sigma(noise(seed)) == pytest.approx(SIGMA, rel=0.03)


@pytest.mark.parametrize("profile", ["gaussian", "exponential"])
@pytest.mark.parametrize("seed", range(5))
def test_bright_galaxy_covering_a_fifth_is_masked(seed, profile):
    g = galaxy(profile=profile)
    assert (g > SIGMA).mean() == pytest.approx(0.20, abs=0.01)  # the fixture is what it says
    image = noise(seed) + g
    est = sky_noise(image)
    assert est.sigma == pytest.approx(SIGMA, rel=0.05)
    assert est.source_masked and est.n_sky_px < 0.8 * SIZE * SIZE  # the galaxy was masked
    # the sky level is only used for the Poisson term: the exponential's wings below the detection threshold
    # lift it by ~0.15 sigma on average (0.03 sigma for the Gaussian)
    assert abs(est.median) < 0.3 * SIGMA
    # the estimate the reader used before is biased high on the same stamp (by ~30%): the change matters
    assert whole_stamp_mad_sigma(image) > 1.2 * SIGMA
    assert whole_stamp_mad_sigma(noise(seed)) == pytest.approx(SIGMA, rel=0.05)  # ... and fine without it


def test_input_is_not_modified():
    image = noise(3) + galaxy()
    mask = np.zeros(image.shape, bool)
    mask[:4] = True
    before, mask_before = image.copy(), mask.copy()
    sky_noise(image, mask=mask)
    derived_variance(image, sky_noise(image), gain_e_per_unit=2.0)
    np.testing.assert_array_equal(image, before)
    np.testing.assert_array_equal(mask, mask_before)


def test_masked_and_nonfinite_pixels_are_left_out():
    image = noise(4)
    image[:10] = 1e6  # masked: would dominate if used
    image[10, :5] = np.nan
    mask = np.zeros(image.shape, bool)
    mask[:10] = True
    est = sky_noise(image, mask=mask)
    assert est.n_valid_px == SIZE * SIZE - 10 * SIZE - 5
    assert est.sigma == pytest.approx(SIGMA, rel=0.03)


def test_constant_image_is_an_error_not_a_zero_variance():
    with pytest.raises(ValueError, match=r"sky of the 4096 valid pixels is constant \(value 7\): no sky noise"):
        sky_noise(np.full((SIZE, SIZE), 7.0))


def test_constant_sky_around_a_source_is_an_error():
    image = np.zeros((SIZE, SIZE))
    image[20:44, 20:44] = np.random.default_rng(0).normal(50.0, 5.0, (24, 24))  # 14% of the stamp
    with pytest.raises(ValueError, match=r"sky of the 4096 valid pixels is constant \(value 0\)"):
        sky_noise(image)


def test_too_few_valid_pixels_is_an_error():
    image = noise(5)
    mask = np.ones(image.shape, bool)
    mask[0, :MIN_VALID_PX - 1] = False
    with pytest.raises(ValueError, match=rf"only {MIN_VALID_PX - 1} valid pixels"):
        sky_noise(image, mask=mask)


def test_wrong_shapes_are_errors():
    with pytest.raises(ValueError, match=r"image must be 2-D, got shape \(3, 64, 64\)"):
        sky_noise(np.zeros((3, SIZE, SIZE)))
    with pytest.raises(ValueError, match=r"mask has shape \(8, 8\), image \(64, 64\)"):
        sky_noise(noise(0), mask=np.zeros((8, 8), bool))


def test_source_mask_leaving_under_a_tenth_falls_back_to_all_pixels():
    image = noise(6) + galaxy()
    est = sky_noise(image, dilate_px=40)  # the dilated mask covers the whole stamp
    assert not est.source_masked and est.n_sky_px == est.n_valid_px == SIZE * SIZE
    assert est.sigma > 1.05 * SIGMA  # clipped but unmasked, the galaxy biases it: the reader flags var_sky_unmasked


def test_derived_variance_sky_only_and_with_gain():
    image = noise(7) + galaxy()
    est = sky_noise(image)
    sky_only = derived_variance(image, est)
    assert sky_only.dtype == np.float32 and np.ptp(sky_only) == 0
    assert sky_only[0, 0] == pytest.approx(est.sigma**2, rel=1e-6)
    gain = 4.0  # e- per unit: a pixel 200 units above the sky holds 800 e-, variance 800 e-^2 = 50 units^2
    with_gain = derived_variance(image, est, gain_e_per_unit=gain)
    excess = np.clip(image - est.median, 0.0, None)
    np.testing.assert_allclose(with_gain, est.sigma**2 + excess / gain, rtol=1e-5)
    centre = SIZE // 2
    assert with_gain[centre, centre] - sky_only[centre, centre] == pytest.approx(
        (image[centre, centre] - est.median) / gain, rel=1e-5)
    with pytest.raises(ValueError, match=r"gain must be positive and finite, got -1"):
        derived_variance(image, est, gain_e_per_unit=-1.0)


# --------------------------------------------------------------------------- the fast path gives the reference figures


def _reference_sky_noise(image, *, mask=None, n_sigma=2.0, smooth_sigma_px=1.0, min_group_px=5, dilate_px=2,
                         iterations=1):
    """sky_noise written with astropy's sigma_clipped_stats, np.median and scipy's filters, step by step: the
    figures the numpy fast path (one sort, partitions, shifted ORs, cached kernel) must give to the last bit."""
    import math

    from astropy.stats import sigma_clipped_stats
    from scipy import ndimage

    from lens_assets.science.noise import _CLIP_STD_FACTOR, MIN_SKY_FRACTION

    def clipped(values):
        _, med, std = sigma_clipped_stats(values, sigma=3.0, maxiters=10)
        return float(med), float(std) / _CLIP_STD_FACTOR

    img = np.asarray(image)
    valid = np.isfinite(img) if mask is None else np.isfinite(img) & ~np.asarray(mask, bool)
    n_valid = int(valid.sum())
    if n_valid < MIN_VALID_PX:
        return "error"
    values = img[valid].astype(np.float64)
    median = float(np.median(values))
    sigma = 1.482602 * float(np.median(np.abs(values - median)))
    if not sigma > 0.0:
        median, sigma = clipped(values)
    if not sigma > 0.0:
        return "error"
    smoothed = ndimage.gaussian_filter(np.where(valid, img, median).astype(np.float64), smooth_sigma_px,
                                       mode="nearest")
    factor = 1.0 / (2.0 * math.sqrt(math.pi) * smooth_sigma_px) if smooth_sigma_px > 0 else 1.0
    structure = ndimage.generate_binary_structure(2, 1)
    sky, masked = valid, True
    for _ in range(iterations):
        labels, n = ndimage.label(smoothed > median + n_sigma * sigma * factor, structure=structure)
        sources = np.zeros(img.shape, bool)
        if n:
            keep = np.bincount(labels.ravel()) >= min_group_px
            keep[0] = False
            sources = keep[labels]
            if dilate_px > 0 and sources.any():
                sources = ndimage.binary_dilation(sources, structure=structure, iterations=dilate_px)
        candidate = valid & ~sources
        if candidate.sum() < max(MIN_VALID_PX, MIN_SKY_FRACTION * n_valid):
            masked, sky = False, valid
            median, sigma = clipped(values)
            break
        sky = candidate
        median, sigma = clipped(img[sky].astype(np.float64))
        if not sigma > 0.0:
            return "error"
    return repr(sigma), repr(median), int(sky.sum()), n_valid, masked


@pytest.mark.parametrize("seed", range(4))
def test_sky_noise_gives_the_reference_figures_to_the_last_bit(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(40):
        size = int(rng.choice([20, 33, 64]))
        image = rng.normal(rng.uniform(-5, 5), rng.uniform(0.01, 3), (size, size))
        image += galaxy(size=size, cover=float(rng.uniform(0.01, 0.5)), peak_over_noise=float(rng.uniform(3, 300)),
                        profile=str(rng.choice(["gaussian", "exponential"])))
        kind, kw = i % 6, {}
        if kind == 1:
            image[rng.random(image.shape) < 0.1] = np.nan
        elif kind == 2:
            image = np.round(image)  # ties: medians of even counts, a MAD of 0
        elif kind == 3:
            image[: size // 2] = 1.0
        elif kind == 4:
            image = image.astype(np.float32)
            kw["mask"] = rng.random(image.shape) < 0.3
        elif kind == 5:
            kw = {"iterations": 2, "dilate_px": int(rng.integers(0, 4)), "min_group_px": int(rng.integers(1, 8)),
                  "smooth_sigma_px": float(rng.choice([0.0, 0.7, 2.0]))}
        cases.append((image, kw))
    for image, kw in cases:
        try:
            est = sky_noise(image, **kw)
            ours = repr(est.sigma), repr(est.median), est.n_sky_px, est.n_valid_px, est.source_masked
        except ValueError:
            ours = "error"
        assert ours == _reference_sky_noise(image, **kw), kw


def test_clipped_stats_are_astropys_sigma_clipped_stats_to_the_last_bit():
    from astropy.stats import sigma_clipped_stats

    from lens_assets.science.noise import _CLIP_STD_FACTOR, _clipped_stats

    rng = np.random.default_rng(11)
    samples = [rng.normal(0, 1, 4000), rng.standard_cauchy(999), rng.lognormal(0, 2, 1500), rng.pareto(1.5, 777),
               np.round(rng.normal(5, 2, 1000)), np.concatenate([np.zeros(600), rng.normal(0, 1, 200)]),
               np.concatenate([rng.normal(0, 1, 900), rng.normal(12, 3, 300)]), rng.standard_t(2, 2048),
               np.concatenate([np.full(50, -0.0), [1e6], rng.normal(0, 1e-3, 3)])]
    for values in samples:
        _, median, std = sigma_clipped_stats(values, sigma=3.0, maxiters=10)
        got = _clipped_stats(values)
        assert repr(got) == repr((float(median), float(std) / _CLIP_STD_FACTOR))


def test_filter_helpers_are_scipys():
    from scipy import ndimage

    from lens_assets.science.noise import _dilate_cross, _gaussian_filter

    rng = np.random.default_rng(2)
    cross = ndimage.generate_binary_structure(2, 1)
    for _ in range(50):
        m = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.uniform(0, 0.3)
        n = int(rng.integers(1, 5))
        np.testing.assert_array_equal(_dilate_cross(m, n), ndimage.binary_dilation(m, structure=cross, iterations=n))
    for sigma in (0.5, 1.0, 1.7, 3.0):
        image = rng.normal(size=(40, 33))
        assert _gaussian_filter(image, sigma).tobytes() == ndimage.gaussian_filter(image, sigma,
                                                                                  mode="nearest").tobytes()
