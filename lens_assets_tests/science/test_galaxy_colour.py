"""Galaxy-scale colour consistency: one source's images agree, an unrelated colour does not, dust is solved."""

import math

import numpy as np
import pytest

from lens_assets.science.clusters.extinction import ccm89_a_lambda_over_a_v, reddening_vector
from lens_assets.science.galaxy_colour import COLOUR_COLUMNS, arc_colour_consistency, arc_colour_table

BANDS = ["g", "r", "i", "z", "Y"]
LAM = np.array([473.0, 642.0, 784.0, 926.0, 1009.0])
PIX = 0.263
FWHM_PX = 5.5
N = 64
NOISE = 0.01  # per-pixel sigma, every band
KW = dict(bands=BANDS, wavelengths_nm=LAM, pixel_scale_arcsec=PIX, psf_fwhm_px=FWHM_PX)


def _sed(beta: float, ebv: float = 0.0) -> np.ndarray:
    """Per-band flux of f_nu ~ lambda^beta (i band 1), dimmed by CCM89 dust of E(B-V) = ebv."""
    a = ebv * 3.1 * ccm89_a_lambda_over_a_v(LAM)
    return (LAM / LAM[2]) ** beta * 10 ** (-0.4 * a)


def _gauss(x0, y0, s_major, s_minor, angle):
    y, x = np.mgrid[0:N, 0:N].astype(float)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (x - x0) * c + (y - y0) * s, -(x - x0) * s + (y - y0) * c
    g = np.exp(-0.5 * ((u / s_major) ** 2 + (v / s_minor) ** 2))
    return g / g.sum()


def _cutout(arcs, *, seed=0, deflector_flux=400.0):
    """A red round deflector at the centre plus ``arcs``: (angle about the centre, flux, sed, point-like?)."""
    c = (N - 1) / 2.0
    image = deflector_flux * _sed(3.0)[:, None, None] * _gauss(c, c, 3.0, 3.0, 0.0)[None]
    psf_sigma = FWHM_PX / 2.3548
    for phi, flux, sed, point in arcs:
        r = 3.5 / PIX  # 3.5 arcsec from the centre
        x, y = c + r * math.cos(phi), c + r * math.sin(phi)
        # an arc: stretched along the tangent; a point image: the PSF itself
        shape = _gauss(x, y, psf_sigma, psf_sigma, 0.0) if point else _gauss(x, y, 4.0, 2.4, phi + math.pi / 2)
        image = image + flux * sed[:, None, None] * shape[None]
    rng = np.random.default_rng(seed)
    return image + rng.normal(0.0, NOISE, image.shape), np.full(image.shape, NOISE**2)


def test_two_arcs_of_one_source_are_consistent():
    img, var = _cutout([(0.3, 60.0, _sed(0.3), False), (0.3 + math.pi, 40.0, _sed(0.3), False)])
    out = arc_colour_consistency(img, var, **KW)
    assert out["colour_gate"] == "ok"
    assert out["n_colour_segments"] == 2
    assert out["colour_consistency"] == 1.0
    assert out["colour_dispersion"] < 0.05


def test_an_arc_of_another_colour_is_inconsistent():
    # a knot with an emission line in r: g - r redder and r - i bluer by 0.75 mag each, far beyond the errors, and
    # colour changes of opposite signs are not the CCM89 reddening vector (all positive), so the dust solve cannot
    # absorb them
    line = _sed(0.3) * np.array([1.0, 2.0, 1.0, 1.0, 1.0])
    arcs = [(0.3, 60.0, _sed(0.3), False), (0.3 + 2.1, 50.0, _sed(0.3), False), (0.3 + 4.2, 50.0, line, False)]
    out = arc_colour_consistency(*_cutout(arcs), **KW)
    assert out["colour_gate"] == "ok" and out["n_colour_segments"] == 3
    assert out["colour_consistency"] == pytest.approx(2 / 3)


def test_differential_dust_is_solved_away():
    # one image behind E(B-V) = 0.4 of dust: its g - r is redder by 0.4 x (R_g - R_r) > 0.4 mag, and the solve along
    # the CCM89 vector gives it the others' colour back
    assert 0.4 * reddening_vector(LAM)[0] > 0.4
    arcs = [(0.3, 60.0, _sed(0.3), False), (0.3 + 2.1, 50.0, _sed(0.3), False),
            (0.3 + 4.2, 80.0, _sed(0.3, ebv=0.4), False)]
    img, var = _cutout(arcs)
    out = arc_colour_consistency(img, var, **KW)
    assert out["colour_gate"] == "ok" and out["n_colour_segments"] == 3
    assert out["colour_consistency"] == 1.0
    assert arc_colour_consistency(img, var, dust=False, **KW)["colour_consistency"] == pytest.approx(2 / 3)


def test_two_arcs_of_unrelated_spectra_disagree_without_a_dust_solve():
    # with two segments a free E(B-V) each would absorb any difference along the reddening vector (a red and a blue
    # power law differ nearly along it), so two segments are compared without the solve
    img, var = _cutout([(0.3, 60.0, _sed(0.3), False), (0.3 + math.pi, 60.0, _sed(3.0), False)])
    out = arc_colour_consistency(img, var, **KW)
    assert out["colour_gate"] == "ok" and out["n_colour_segments"] == 2
    assert out["colour_consistency"] == 0.0


def test_point_images_are_gated_off():
    arcs = [(0.3, 60.0, _sed(0.0), True), (0.3 + math.pi, 40.0, _sed(1.0), True)]
    out = arc_colour_consistency(*_cutout(arcs), **KW)
    assert out["colour_gate"] == "point_images"
    assert out["n_colour_segments"] == 2
    assert math.isnan(out["colour_consistency"]) and math.isnan(out["colour_dispersion"])


def test_a_galaxy_without_residual_structure_has_no_segments():
    out = arc_colour_consistency(*_cutout([]), **KW)
    assert out["colour_gate"] == "fewer_than_two_segments"
    assert out["n_colour_segments"] == 0 and math.isnan(out["colour_consistency"])


def test_bands_without_data_are_left_out():
    img, var = _cutout([(0.3, 60.0, _sed(0.3), False), (0.3 + math.pi, 40.0, _sed(0.3), False)])
    var[[0, 4]] = 0.0  # g and Y missing: r, i, z remain
    out = arc_colour_consistency(img, var, **KW)
    assert out["colour_gate"] == "ok" and out["colour_consistency"] == 1.0
    keep_two = var.copy()
    keep_two[3] = 0.0  # r and i: one colour, compared without the dust solve
    out = arc_colour_consistency(img, keep_two, **KW)
    assert out["colour_gate"] == "ok" and out["colour_consistency"] == 1.0
    var[1:3] = 0.0  # z alone
    assert arc_colour_consistency(img, var, **KW)["colour_gate"] == "fewer_than_two_bands"


def test_table_matches_single_calls_and_shapes_are_checked():
    a = _cutout([(0.3, 60.0, _sed(0.3), False), (0.3 + math.pi, 40.0, _sed(0.3), False)])
    b = _cutout([])
    table = arc_colour_table(np.stack([a[0], b[0]]), np.stack([a[1], b[1]]), objids=["a", "b"], **KW)
    assert list(table.columns) == ["objid", *COLOUR_COLUMNS]
    for row, (img, var) in zip(table.itertuples(index=False), (a, b)):
        one = arc_colour_consistency(img, var, **KW)
        assert row.colour_gate == one["colour_gate"] and row.n_colour_segments == one["n_colour_segments"]
        assert row.colour_consistency == pytest.approx(one["colour_consistency"], nan_ok=True)
    empty = arc_colour_table(np.empty((0, 5, 8, 8)), np.empty((0, 5, 8, 8)), **KW)
    assert len(empty) == 0 and list(empty.columns) == list(COLOUR_COLUMNS)
    assert empty.dtypes.to_dict() == table.drop(columns="objid").dtypes.to_dict()
    with pytest.raises(ValueError, match="bands=5"):
        arc_colour_consistency(a[0][:4], a[1][:4], **KW)
    with pytest.raises(ValueError, match="objids"):
        arc_colour_table(a[0][None], a[1][None], objids=["a", "b"], **KW)
