import numpy as np
import pytest

from lens_assets.science.surveys import (SURVEY_NAMES, SURVEYS, get_survey, limiting_magnitude,
                                         min_cutout_arcsec_for, zero_point_from_depth)


def _lenstronomy_presets():
    from lenstronomy.SimulationAPI.ObservationConfig.DES import DES
    from lenstronomy.SimulationAPI.ObservationConfig.Euclid import Euclid
    from lenstronomy.SimulationAPI.ObservationConfig.HST import HST
    from lenstronomy.SimulationAPI.ObservationConfig.LSST import LSST

    for b in "grizY":
        yield "des", b, DES(band=b, coadd_years=3).kwargs_single_band()
    for b in "ugrizy":
        yield "lsst", b, LSST(band=b, coadd_years=10).kwargs_single_band()
    for b in ("VIS", "Y", "J", "H"):
        yield "euclid", b, Euclid(band=b).kwargs_single_band()
    yield "hst", "F160W", HST(band="WFC3_F160W", psf_type="GAUSSIAN").kwargs_single_band()


@pytest.mark.parametrize("survey,band,preset", list(_lenstronomy_presets()),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_registry_agrees_with_lenstronomy(survey, band, preset):
    b = get_survey(survey).band(band)
    assert b.seeing_fwhm_arcsec == preset["seeing"]
    assert b.magnitude_zero_point == preset["magnitude_zero_point"]
    assert b.sky_brightness == preset["sky_brightness"]
    assert b.exposure_time_s == preset["exposure_time"]
    assert b.num_exposures == preset["num_exposures"]
    assert b.read_noise_e == preset["read_noise"]
    assert b.ccd_gain == preset["ccd_gain"]
    assert b.native_pixel_scale_arcsec == preset["pixel_scale"]


def test_ground_survey_grid_is_lenstronomy_pixel_scale():
    from lenstronomy.SimulationAPI.ObservationConfig.DES import DES
    from lenstronomy.SimulationAPI.ObservationConfig.LSST import LSST

    assert get_survey("des").pixel_scale_arcsec == DES().kwargs_single_band()["pixel_scale"]
    assert get_survey("lsst").pixel_scale_arcsec == LSST().kwargs_single_band()["pixel_scale"]


@pytest.mark.parametrize("survey,depths", [
    ("hsc", {"g": 26.5, "r": 26.1, "i": 25.9, "z": 25.1, "y": 24.4}),
    ("kids", {"u": 24.2, "g": 25.1, "r": 25.0, "i": 23.7}),
    ("sdss", {"u": 22.0, "g": 22.2, "r": 22.2, "i": 21.3, "z": 20.5}),
])
def test_written_out_surveys_reproduce_their_cited_depths(survey, depths):
    s = get_survey(survey)
    for band, depth in depths.items():
        assert limiting_magnitude(s.band(band), s.pixel_scale_arcsec) == pytest.approx(depth, abs=0.01)


@pytest.mark.parametrize("survey,band", [("des", "r"), ("hsc", "i"), ("kids", "g"), ("sdss", "r")])
def test_limiting_magnitude_is_a_5_sigma_matched_filter_detection_on_the_pixel_grid(survey, band):
    """Independent of the closed form: a Gaussian PSF integrated over each pixel, every pixel's variance its own
    source, sky and read-noise electrons, and the optimal (inverse-variance, PSF-weighted) S/N sqrt(sum s^2 / var)."""
    s = get_survey(survey)
    b, pix = s.band(band), s.pixel_scale_arcsec
    m5 = limiting_magnitude(b, pix)
    t = b.exposure_time_s * b.num_exposures
    sigma = b.seeing_fwhm_arcsec / (2 * np.sqrt(2 * np.log(2))) / pix  # px
    sub = 8  # sub-pixels per pixel side, for the pixel integral
    n = int(np.ceil(12 * sigma)) | 1
    c = (np.arange(n * sub) + 0.5) / sub - n / 2
    g = np.exp(-0.5 * (c[:, None] ** 2 + c[None, :] ** 2) / sigma**2)
    psf = g.reshape(n, sub, n, sub).sum(axis=(1, 3))
    psf /= psf.sum()
    signal = 10 ** (-0.4 * (m5 - b.magnitude_zero_point)) * t * psf
    var = signal + 10 ** (-0.4 * (b.sky_brightness - b.magnitude_zero_point)) * pix**2 * t \
        + b.num_exposures * b.read_noise_e**2
    assert np.sqrt((signal**2 / var).sum()) == pytest.approx(5.0, rel=0.03)


def test_zero_point_and_depth_are_inverse():
    b = get_survey("des").band("r")
    m5 = limiting_magnitude(b, 0.263)
    zp = zero_point_from_depth(m5, sky_brightness=b.sky_brightness, seeing_fwhm_arcsec=b.seeing_fwhm_arcsec,
                               pixel_scale_arcsec=0.263, exposure_time_s=b.exposure_time_s,
                               num_exposures=b.num_exposures, read_noise_e=b.read_noise_e)
    assert zp == pytest.approx(b.magnitude_zero_point, abs=1e-6)


def test_deeper_exposure_reaches_fainter():
    b = get_survey("des").band("r")
    from dataclasses import replace

    deeper = replace(b, num_exposures=b.num_exposures * 4)  # 4x the time: ~0.75 mag deeper when sky-limited
    assert limiting_magnitude(deeper, 0.263) - limiting_magnitude(b, 0.263) == pytest.approx(0.753, abs=0.05)


def test_hst_has_f814w_and_f160w_and_every_survey_is_sane():
    assert get_survey("hst").band_names == ("F814W", "F160W")
    assert set(SURVEYS) == set(SURVEY_NAMES) == {"des", "hsc", "lsst", "euclid", "hst", "kids", "sdss"}
    for s in SURVEYS.values():
        assert s.has_band(s.reference_band)
        assert s.cutout_size_arcsec > 6.0, s.name
        assert all(b.seeing_fwhm_arcsec > 0 and b.wavelength_nm > 0 for b in s.bands)
        assert list(b.wavelength_nm for b in s.bands) == sorted(b.wavelength_nm for b in s.bands), s.name


def test_lookups_are_case_insensitive_and_errors_list_the_valid_values():
    assert get_survey("DES").band("y").name == "Y"
    with pytest.raises(KeyError, match=r"unknown survey 'ztf'; valid surveys are \['des', 'hsc'"):
        get_survey("ztf")
    with pytest.raises(KeyError, match=r"survey des has no band 'F814W'; its bands are \['g', 'r', 'i', 'z', 'Y'\]"):
        get_survey("des").band("F814W")


def test_registry_is_frozen():
    s = get_survey("des")
    with pytest.raises(Exception):
        s.pixel_scale_arcsec = 1.0
    with pytest.raises(TypeError):
        SURVEYS["des"] = s


@pytest.mark.parametrize("survey,minimum", [("des", 10.0), ("lsst", 9.0), ("euclid", 7.0), ("hst", 3.5),
                                            ("hsc", 8.5), ("kids", 9.0), ("sdss", 11.5)])
def test_min_cutout_arcsec_table(survey, minimum):
    s = get_survey(survey)
    assert s.min_cutout_arcsec == minimum  # the module docstring's table
    assert s.min_cutout_arcsec < s.cutout_size_arcsec


def test_min_cutout_arcsec_rule():
    assert min_cutout_arcsec_for(3.0, 0.88) == 10.0  # 2 x (3.0 + 1.76) = 9.52, rounded up to 0.5"
    assert min_cutout_arcsec_for(1.5, 0.10) == 3.5  # 2 x (1.5 + 0.2) = 3.4
    assert min_cutout_arcsec_for(1.5, 0.125) == 3.5  # exactly 3.5 stays


def test_min_cutout_arcsec_defaults_to_the_grid_and_is_checked():
    from dataclasses import replace

    s = get_survey("des")
    assert replace(s, min_cutout_arcsec=None).min_cutout_arcsec == s.cutout_size_arcsec
    with pytest.raises(ValueError, match=r"survey des: min_cutout_arcsec 20.0 must be in \(0, cutout_size_arcsec"):
        replace(s, min_cutout_arcsec=20.0)
