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
