import numpy as np
import pytest

from lens_assets.science.clusters.extinction import ccm89_a_lambda_over_a_v, reddening_vector
from lens_assets.science.surveys import get_survey


def test_a_v_is_one_at_v():
    # x = 1/0.55 = 1.818, y = x - 1.82 = -0.0018: a = 1 - 0.00032, b = -0.00257, a + b/3.1 = 0.9988
    assert ccm89_a_lambda_over_a_v(550.0) == pytest.approx(1.0, rel=0.01)


def test_textbook_ccm89_values_by_hand():
    # B, 440 nm: x = 2.2727, y = 0.4527; a = 1 + 0.08013 - 0.10340 - 0.00225 + 0.03028 + 0.00038 - 0.00668 + 0.00129
    # = 0.99975; b = 0.63984 + 0.46793 + 0.09950 - 0.22619 - 0.01184 + 0.04566 - 0.00815 = 1.00675;
    # A/A_V = 0.99975 + 1.00675 / 3.1 = 1.3245
    assert ccm89_a_lambda_over_a_v(440.0) == pytest.approx(1.3245, abs=1e-3)
    # J, 1250 nm (infrared branch): x = 0.8, x^1.61 = 0.69823; a = 0.574 * 0.69823 = 0.40078,
    # b = -0.527 * 0.69823 = -0.36797; A/A_V = 0.40078 - 0.36797 / 3.1 = 0.2821
    assert ccm89_a_lambda_over_a_v(1250.0) == pytest.approx(0.2821, abs=1e-3)
    # I, 800 nm: x = 1.25, y = -0.57; a terms 1 - 0.10088 - 0.16390 + 0.00449 + 0.07609 - 0.00119 - 0.02659 - 0.00645
    # = 0.78157; b terms -0.80563 + 0.74176 - 0.19859 - 0.56837 + 0.03746 + 0.18186 + 0.04086 = -0.57065;
    # A/A_V = 0.78157 - 0.57065 / 3.1 = 0.5975 (inside the textbook 0.48-0.60)
    assert ccm89_a_lambda_over_a_v(800.0) == pytest.approx(0.5975, abs=1e-3)
    # R_V enters only through b/R_V: at 440 nm with R_V = 5, 0.99975 + 1.00675 / 5
    assert ccm89_a_lambda_over_a_v(440.0, r_v=5.0) == pytest.approx(0.99975 + 1.00675 / 5.0, abs=1e-3)


def test_vectorized_and_monotone_decreasing_from_400_to_2000_nm():
    lam = np.linspace(400.0, 2000.0, 400)
    before = lam.copy()
    a = ccm89_a_lambda_over_a_v(lam)
    assert a.shape == lam.shape and np.all(np.diff(a) < 0)
    np.testing.assert_array_equal(lam, before)
    assert np.ndim(ccm89_a_lambda_over_a_v(550.0)) == 0


def test_branches_join_continuously():
    # x = 1.1 (909.09 nm) and x = 3.3 (303.03 nm): both sides agree to < 0.1%
    for edge in (1000.0 / 1.1, 1000.0 / 3.3):
        lo, hi = ccm89_a_lambda_over_a_v([edge * (1 - 1e-6), edge * (1 + 1e-6)])
        assert lo == pytest.approx(hi, rel=1e-3)


@pytest.mark.parametrize("r_v", [2.5, 3.1, 5.0])
def test_every_branch_equals_dust_extinctions_ccm89_from_125_to_3333_nm(r_v):
    """The infrared, optical, ultraviolet and far-ultraviolet (x >= 5.9) branches against the astropy-affiliated
    dust_extinction package's CCM89 (Gordon 2024), over the whole range."""
    import astropy.units as u
    from dust_extinction.parameter_averages import CCM89

    lam = np.geomspace(125.01, 3333.0, 400)
    assert (1000.0 / lam >= 5.9).sum() >= 20  # the far-ultraviolet curvature terms are exercised
    np.testing.assert_allclose(ccm89_a_lambda_over_a_v(lam, r_v=r_v), CCM89(Rv=r_v)(lam * u.nm), rtol=1e-10)


def test_ultraviolet_bump_near_217_nm():
    # the 2175 A bump: A/A_V at 217.5 nm (x = 4.6) exceeds its neighbours at 250 nm and 180 nm
    a = ccm89_a_lambda_over_a_v([250.0, 217.5, 180.0])
    assert a[1] > a[0] and a[1] > a[2]


@pytest.mark.parametrize("survey", ["des", "hsc", "lsst", "euclid", "hst", "kids", "sdss"])
def test_reddening_vector_components_are_positive(survey):
    lam = [b.wavelength_nm for b in get_survey(survey).bands]
    v = reddening_vector(lam)
    assert v.shape == (len(lam) - 1,) and np.all(v > 0)


def test_reddening_vector_is_r_v_times_differences_of_a_over_a_v():
    lam = [b.wavelength_nm for b in get_survey("des").bands]
    a = ccm89_a_lambda_over_a_v(lam)
    np.testing.assert_allclose(reddening_vector(lam), 3.1 * (a[:-1] - a[1:]))
    # g - r per E(B-V) for DES: R_g - R_r ~ 3.7 - 2.6 ~ 1.1
    assert reddening_vector(lam)[0] == pytest.approx(1.14, abs=0.05)


def test_out_of_range_wavelength_is_named():
    with pytest.raises(ValueError, match=r"wavelength_nm \[4000.0\] outside the CCM89 range"):
        ccm89_a_lambda_over_a_v([500.0, 4000.0])
    with pytest.raises(ValueError, match=r"wavelength_nm \[100.0\]"):
        ccm89_a_lambda_over_a_v(100.0)


def test_bad_r_v_and_unordered_bands_are_refused():
    with pytest.raises(ValueError, match="r_v must be a positive"):
        ccm89_a_lambda_over_a_v(550.0, r_v=0.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        reddening_vector([640.0, 480.0])
    with pytest.raises(ValueError, match="at least two bands"):
        reddening_vector([640.0])
