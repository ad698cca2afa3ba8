"""The FITS inbox contract (read_cutout) and ingestion into the catalog / quarantine tables."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lens_assets.science.families import load_family
from lens_assets.science.fits_contract import (QUARANTINE_REASONS, BandHDUs, QuarantineError, read_cutout,
                                               write_cutout, write_simulated_cutout)
from lens_assets.science.ingest import find_fits, ingest_files
from lens_assets.science.schemas import catalog_schema, quarantine_schema
from lens_assets.science.simulation import simulate_one
from lens_assets.science.surveys import get_survey

# --------------------------------------------------------------------------- helpers

DES = get_survey("des")
BANDS = DES.band_names  # g r i z Y
SIZE = DES.cutout_size_px  # 64
PIX = 0.263
FWHM_TO_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
DROP = object()  # an override value meaning "remove this header card / band"
DEFAULT = object()


def gaussian_psf(size: int = 11, sigma_px: float = 1.5) -> np.ndarray:
    """A centred, normalized, odd-sized square Gaussian PSF image."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    psf = np.exp(-(x**2 + y**2) / (2 * sigma_px**2))
    return (psf / psf.sum()).astype(np.float32)


def synthetic_image(seed: int, size: int = SIZE, *, noise: float = 1.0) -> np.ndarray:
    """Gaussian noise plus a centred Gaussian blob (positive total flux)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    blob = 50.0 * np.exp(-(x**2 + y**2) / (2 * 3.0**2))
    return (blob + rng.normal(0.0, noise, (size, size))).astype(np.float32)


def band_hdus(*, seed: int = 0, size: int = SIZE, image=DEFAULT, variance=DEFAULT, psf=DEFAULT,
              header: dict | None = None) -> BandHDUs:
    """One valid des band (nanomaggy, PIXSCALE, PSFFWHM, VAR and PSF); ``header`` values of DROP remove cards.

    ``variance=None`` / ``psf=None`` leave those extensions out.
    """
    img = synthetic_image(seed, size) if image is DEFAULT else image
    hdr = {"BUNIT": "nanomaggy", "PIXSCALE": PIX, "PSFFWHM": 1.0}
    for key, value in (header or {}).items():
        if value is DROP:
            hdr.pop(key, None)
        else:
            hdr[key] = value
    var = np.ones(np.shape(img), dtype=np.float32) if variance is DEFAULT else variance
    return BandHDUs(image=img, header=hdr, variance=var, psf=gaussian_psf() if psf is DEFAULT else psf)


def make_file(path: Path, *, objid: str = "obj-0", seed: int = 0, primary: dict | None = None,
              bands: dict | None = None, **band_kwargs) -> bytes:
    """Write a valid des inbox file to ``path`` and return its bytes.

    ``primary`` updates the primary header (DROP removes a card); ``bands`` maps a band name
    to a :class:`BandHDUs` (replacing or adding it) or to DROP (removing it); ``band_kwargs``
    go to :func:`band_hdus` for every default band.
    """
    prim = {"OBJID": objid, "RA": 10.0 + 0.01 * seed, "DEC": -20.0, "SURVEY": "des"}
    for key, value in (primary or {}).items():
        if value is DROP:
            prim.pop(key, None)
        else:
            prim[key] = value
    all_bands = {b: band_hdus(seed=1000 * seed + i, **band_kwargs) for i, b in enumerate(BANDS)}
    for band, value in (bands or {}).items():
        if value is DROP:
            all_bands.pop(band, None)
        else:
            all_bands[band] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_cutout(path, prim, all_bands)
    return path.read_bytes()


def read(data: bytes, name: str = "inbox/des/test.fits"):
    return read_cutout(data, name=name, survey=DES)


def idx(band: str) -> int:
    return BANDS.index(band)


@pytest.fixture(scope="module")
def simulated():
    """Three simulated des cutouts of the baseline family (the first call builds lenstronomy's setup)."""
    family = load_family("baseline")
    return family, [simulate_one(DES, family, 7, i) for i in range(3)]


# --------------------------------------------------------------------------- 1. round trip


def test_round_trip_preserves_arrays_units_and_geometry(tmp_path):
    rng = np.random.default_rng(42)
    images = {b: rng.normal(100.0, 5.0, (SIZE, SIZE)).astype(np.float32) for b in BANDS}
    variances = {b: rng.uniform(1.0, 9.0, (SIZE, SIZE)).astype(np.float32) for b in BANDS}
    psfs = {b: gaussian_psf(11, 1.2 + 0.1 * i) for i, b in enumerate(BANDS)}
    fwhms = {b: 0.9 + 0.05 * i for i, b in enumerate(BANDS)}
    bands = {b: BandHDUs(image=images[b], variance=variances[b], psf=psfs[b],
                         header={"BUNIT": "count/s", "MAGZP": 30.0, "PIXSCALE": PIX, "PSFFWHM": fwhms[b]})
             for b in BANDS}
    path = tmp_path / "rt.fits"
    write_cutout(path, {"OBJID": "rt-1", "RA": 359.5, "DEC": -45.25, "SURVEY": "des"}, bands)

    c = read_cutout(path.read_bytes(), name="rt.fits", survey=DES)

    assert c.objid == "rt-1" and c.ra == 359.5 and c.dec == -45.25 and c.survey == "des"
    assert c.bands == ("g", "r", "i", "z", "Y")
    assert c.image.shape == c.variance.shape == (5, SIZE, SIZE)
    for i, b in enumerate(BANDS):
        np.testing.assert_array_equal(c.image[i], images[b])
        np.testing.assert_array_equal(c.variance[i], variances[b])
        assert c.psf[i].shape == (11, 11)
        np.testing.assert_allclose(c.psf[i], psfs[b] / psfs[b].sum(dtype=np.float64), rtol=1e-6, atol=1e-9)
        assert c.psf[i].sum() == pytest.approx(1.0, abs=1e-12)
    # 10**(-0.4 * (30 - 22.5)) = 10**-3: a count/s image with ZP 30 is 1/1000 nanomaggy per unit
    np.testing.assert_allclose(c.nmgy_per_unit, [1e-3] * 5, rtol=1e-12)
    assert c.pixel_scale_arcsec == pytest.approx(PIX, abs=1e-12)
    np.testing.assert_allclose(c.psf_fwhm_arcsec, [fwhms[b] for b in BANDS], rtol=1e-6)
    assert not c.nan_mask.any()
    assert c.band_flags == {} and c.ignored_bands == ()
    assert c.present.all()


def test_simulated_cutout_round_trips_with_truth(tmp_path, simulated):
    family, cutouts = simulated
    for k, sim in enumerate(cutouts):
        path = tmp_path / f"sim-{k}.fits"
        write_simulated_cutout(path, sim, survey=DES, family=family, seed=7)
        c = read_cutout(path.read_bytes(), name=path.name, survey=DES)
        s = sim.system
        assert c.objid == s.objid
        assert c.primary["LENS"] is bool(s.is_lens)
        assert c.primary["FLUXRAT"] == pytest.approx(sim.flux_ratio, abs=1e-6)
        assert c.primary["THETA_E"] == pytest.approx(s.theta_e_arcsec, abs=1e-5)
        assert c.primary["ARCSNR"] == pytest.approx(sim.arc_snr, abs=1e-4)
        from lens_assets.science.ingest import catalog_row

        assert catalog_row(c, sha256="0" * 64, survey=DES)["arc_snr"] == c.primary["ARCSNR"]
        assert c.primary["LABELSRC"] == "sim:lenstronomy"
        np.testing.assert_allclose(c.image, sim.image.astype(np.float32), rtol=1e-6)
        np.testing.assert_allclose(c.variance, sim.variance.astype(np.float32), rtol=1e-6)
        for i in range(len(BANDS)):
            np.testing.assert_allclose(c.psf[i], sim.psf[i] / sim.psf[i].sum(), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(c.nmgy_per_unit, [10 ** (-0.4 * (zp - 22.5)) for zp in sim.zero_points],
                                   rtol=1e-12)
        np.testing.assert_allclose(c.psf_fwhm_arcsec, [s.psf_fwhm_arcsec[b] for b in BANDS], atol=1e-5)
        assert c.pixel_scale_arcsec == pytest.approx(DES.pixel_scale_arcsec)
        assert c.band_flags == {}


# --------------------------------------------------------------------------- 2. quarantine reasons
# Each builder returns (file bytes, fragments the message must contain besides the file name).


def _unreadable(tmp):
    data = np.random.default_rng(3).bytes(6000)
    return data, ["not a FITS file", repr(data[:16])]


def _truncated(tmp):
    full = make_file(tmp / "full.fits")
    data = full[:-3000]
    return data, []


def _truncated_padding(tmp):
    # only padding of the last block is missing: astropy reads it, the length check catches it
    full = make_file(tmp / "full.fits")
    data = full[:-100]
    return data, [f"file length {len(data)} bytes"]


def _missing_objid(tmp):
    return make_file(tmp / "f.fits", primary={"OBJID": DROP}), ["OBJID"]


def _missing_ra(tmp):
    return make_file(tmp / "f.fits", primary={"RA": DROP}), ["lacks RA"]


def _bad_dec(tmp):
    return make_file(tmp / "f.fits", primary={"DEC": 123}), ["DEC = 123"]


def _survey_mismatch(tmp):
    return make_file(tmp / "f.fits", primary={"SURVEY": "hsc"}), ["SURVEY = 'hsc'", "des"]


def _no_image_hdu(tmp):
    path = tmp / "f.fits"
    write_cutout(path, {"OBJID": "obj-0", "RA": 10.0, "DEC": -20.0, "SURVEY": "des"}, {})
    return path.read_bytes(), ["no IMAGE_<band> extension", "PRIMARY"]


def _no_known_band(tmp):
    bands = {b: DROP for b in BANDS} | {"F999": band_hdus()}
    return make_file(tmp / "f.fits", bands=bands), ["F999"]


def _not_2d(tmp):
    # write_cutout refuses a 3-D image, so replace the r image of a valid file with astropy
    from astropy.io import fits

    make_file(tmp / "f.fits")
    with fits.open(tmp / "f.fits") as hdul:
        hdul["IMAGE_r"].data = np.zeros((3, SIZE, SIZE), dtype=np.float32)
        hdul.writeto(tmp / "cube.fits")
    return (tmp / "cube.fits").read_bytes(), ["IMAGE_r", "(3, 64, 64)"]


def _one_band_not_square(tmp):
    img = np.zeros((64, 63), dtype=np.float32)
    return make_file(tmp / "f.fits", bands={"r": band_hdus(image=img)}), ["(64, 63)", "(64, 64)"]


def _shape_mismatch_bands(tmp):
    img = synthetic_image(5, 70)
    return make_file(tmp / "f.fits", bands={"r": band_hdus(image=img)}), ["IMAGE_r", "(70, 70)", "(64, 64)"]


def _shape_mismatch_var(tmp):
    var = np.ones((66, 66), dtype=np.float32)
    return make_file(tmp / "f.fits", bands={"r": band_hdus(variance=var)}), ["VAR_r", "(66, 66)"]


def _too_small(tmp):
    return make_file(tmp / "f.fits", size=32), ["32x32", "8.42\"", "min_cutout_arcsec = 10\"", "64 px"]


def _no_sky_noise(tmp):
    flat = np.full((SIZE, SIZE), 3.0, dtype=np.float32)
    return (make_file(tmp / "f.fits", bands={"g": band_hdus(image=flat, variance=None)}),
            ["IMAGE_g", "no VAR_g", "constant", "value 3"])


def _mostly_nan(tmp):
    img = synthetic_image(1)
    img[:40, :] = np.nan  # 62.5 %
    return make_file(tmp / "f.fits", bands={"r": band_hdus(image=img)}), ["IMAGE_r", "62%"]


def _negative_variance(tmp):
    var = np.ones((SIZE, SIZE), dtype=np.float32)
    var[3, 4] = -2.5
    return make_file(tmp / "f.fits", bands={"r": band_hdus(variance=var)}), ["VAR_r", "1 negative", "-2.5"]


def _zero_variance(tmp):
    return (make_file(tmp / "f.fits", bands={"g": band_hdus(variance=np.zeros((SIZE, SIZE), np.float32))}),
            ["VAR_g", "zero in every finite pixel"])


def _no_data(tmp):
    zeros = np.zeros((SIZE, SIZE), np.float32)
    return make_file(tmp / "f.fits", image=zeros, variance=zeros), ["every band", "holds no data"]


def _missing_magzp(tmp):
    return (make_file(tmp / "f.fits", bands={"r": band_hdus(header={"BUNIT": "count/s"})}),
            ["IMAGE_r", "'count/s'", "MAGZP"])


def _bad_bunit(tmp):
    return make_file(tmp / "f.fits", bands={"r": band_hdus(header={"BUNIT": "Jy"})}), ["IMAGE_r", "'Jy'"]


def _missing_pixscale(tmp):
    return make_file(tmp / "f.fits", bands={"r": band_hdus(header={"PIXSCALE": DROP})}), ["IMAGE_r",
                                                                                         "PIXSCALE"]


def _bad_pixel_value(tmp):
    img = synthetic_image(5, SIZE)
    img[32, 40] = 1e38  # finite in float32; PSF matching would sum it over the kernel into inf and NaN
    return make_file(tmp / "f.fits", bands={"i": band_hdus(image=img)}), ["IMAGE_i", "(y=32, x=40)", "1e+38"]


def _bad_variance_value(tmp):
    var = np.ones((SIZE, SIZE), dtype=np.float32)
    var[5, 6] = 3e31
    return make_file(tmp / "f.fits", bands={"z": band_hdus(variance=var)}), ["VAR_z", "(y=5, x=6)", "3e+31"]


def _too_coarse(tmp):  # PIXSCALE given in arcmin by mistake: 0.263' = 15.78"
    return make_file(tmp / "f.fits", header={"PIXSCALE": 15.78}), ["15.78\"/px", "seeing FWHM", "arcsec"]


def _empty_psffwhm(tmp):  # the card is there with no value after "= " (astropy writes None so)
    from astropy.io import fits

    make_file(tmp / "f.fits")
    with fits.open(tmp / "f.fits", mode="update") as hdul:
        hdul["IMAGE_g"].header["PSFFWHM"] = None
    return (tmp / "f.fits").read_bytes(), ["IMAGE_g", "PSFFWHM"]


def _pixscale_mismatch(tmp):
    return make_file(tmp / "f.fits", bands={"r": band_hdus(header={"PIXSCALE": 0.3})}), ["0.263", "0.3"]


def _bad_psf(tmp):
    return make_file(tmp / "f.fits", bands={"r": band_hdus(psf=gaussian_psf(10))}), ["PSF_r", "(10, 10)"]


def _astropy_edit(tmp, edit) -> bytes:
    """A valid file rewritten by astropy after ``edit(hdul)``."""
    import io

    from astropy.io import fits

    with fits.open(io.BytesIO(make_file(tmp / "f.fits"))) as hdul:
        edit(hdul)
        buf = io.BytesIO()
        hdul.writeto(buf)
    return buf.getvalue()


def _duplicate_extension(tmp):
    from astropy.io import fits

    def add_second_r(hdul):
        hdul.append(fits.ImageHDU(np.full((SIZE, SIZE), 1e6, np.float32), header=hdul["IMAGE_r"].header.copy(),
                                  name="IMAGE_r"))
    return _astropy_edit(tmp, add_second_r), ["IMAGE_R", "HDUs"]


def _duplicate_keyword(tmp):
    return _astropy_edit(tmp, lambda hdul: hdul[0].header.append(("RA", 11.0))), ["RA", "primary header"]


def _non_ascii_header(tmp):
    data = bytearray(make_file(tmp / "f.fits"))
    data[data.index(b"'obj-0") + 2] = 0xE9  # 'oéj-0': astropy would read it as 'o?j-0'
    return bytes(data), ["0xe9", "ASCII"]


QUARANTINE_CASES = [
    # (case id, reason, builder, match pattern)
    ("unreadable", "unreadable", _unreadable, r"not a FITS file"),
    ("truncated", "truncated", _truncated, r"astropy cannot read it|cut short"),
    ("truncated-padding", "truncated", _truncated_padding, r"cut short"),
    ("missing_header-objid", "missing_header", _missing_objid, r"primary header lacks OBJID"),
    ("missing_header-ra", "missing_header", _missing_ra, r"primary header lacks RA"),
    ("bad_header_value", "bad_header_value", _bad_dec, r"DEC = 123 is outside"),
    ("survey_mismatch", "survey_mismatch", _survey_mismatch, r"SURVEY = 'hsc' but this is the des survey"),
    ("no_image_hdu", "no_image_hdu", _no_image_hdu, r"no IMAGE_<band> extension"),
    ("no_known_band", "no_known_band", _no_known_band, r"bands \['F999'\] are not des bands"),
    ("not_2d", "not_2d", _not_2d, r"must be 2-D"),
    ("shape_mismatch-one_band_not_square", "shape_mismatch", _one_band_not_square,
     r"IMAGE_r has shape \(64, 63\), other bands \(64, 64\)|IMAGE_\w has shape \(64, 64\), other bands \(64, 63\)"),
    ("shape_mismatch", "shape_mismatch", _shape_mismatch_bands, r"IMAGE_r has shape \(70, 70\)"),
    ("shape_mismatch-var", "shape_mismatch", _shape_mismatch_var, r"VAR_r has shape \(66, 66\)"),
    ("too_small", "too_small", _too_small, r"32x32 px at 0\.263\"/px = 8\.42\" across, less than the des "
                                           r"minimum min_cutout_arcsec = 10\""),
    ("no_sky_noise", "no_sky_noise", _no_sky_noise, r"IMAGE_g has no VAR_g and its sky noise cannot be measured"),
    ("mostly_nan", "mostly_nan", _mostly_nan, r"62% non-finite \(2560 NaN, 0 \+inf, 0 -inf of 4096 pixels; "
                                               r"more than 50% non-finite\)"),
    ("negative_variance", "negative_variance", _negative_variance, r"negative pixels"),
    ("no_data", "no_data", _no_data, r"every band's image and variance are zero in every finite pixel"),
    ("zero_variance", "zero_variance", _zero_variance, r"VAR_g is zero in every finite pixel while IMAGE_g is not"),
    ("missing_magzp", "missing_magzp", _missing_magzp, r"needs MAGZP"),
    ("bad_bunit", "bad_bunit", _bad_bunit, r"BUNIT 'Jy' is not one of"),
    ("missing_pixscale", "missing_pixscale", _missing_pixscale, r"neither PIXSCALE nor a celestial WCS"),
    ("pixscale_mismatch", "pixscale_mismatch", _pixscale_mismatch, r"differ by more than 1%"),
    ("bad_pixel_value", "bad_pixel_value", _bad_pixel_value, r"IMAGE_i: pixel \(y=32, x=40\) = 1e\+38 nanomaggy is "
                                                             r"1e\+38 nanomaggies, beyond \+/-1e\+15"),
    ("bad_pixel_value-var", "bad_pixel_value", _bad_variance_value, r"VAR_z: pixel \(y=5, x=6\) = 3e\+31 "
                                                                    r"\(nanomaggy\)\^2 is 3e\+31 nanomaggies\^2"),
    ("too_coarse", "too_coarse", _too_coarse, r"pixel scale 15\.78\"/px is coarser than the des \w+ seeing FWHM "
                                              r"[\d.]+\", the broadest of its bands"),
    ("bad_header_value-empty", "bad_header_value", _empty_psffwhm, r"IMAGE_g: PSFFWHM has no value"),
    ("bad_psf", "bad_psf", _bad_psf, r"odd square finite image"),
    ("duplicate_extension", "duplicate_extension", _duplicate_extension, r"HDUs 4 and 16 are both named 'IMAGE_R'"),
    ("duplicate_keyword", "duplicate_keyword", _duplicate_keyword, r"primary header: RA is given more than once"),
    ("non_ascii_header", "non_ascii_header", _non_ascii_header, r"non-ASCII byte 0xe9 at offset 332"),
]


@pytest.mark.parametrize("reason,build,pattern", [pytest.param(r, b, p, id=i) for i, r, b, p in QUARANTINE_CASES])
def test_read_cutout_quarantines(tmp_path, reason, build, pattern):
    data, fragments = build(tmp_path)
    name = f"inbox/des/case-{reason}.fits"
    with pytest.raises(QuarantineError, match=pattern) as err:
        read_cutout(data, name=name, survey=DES)
    assert err.value.reason == reason
    assert err.value.message == str(err.value)
    assert err.value.message.startswith(f"{name}: ")
    for fragment in fragments:  # extension names may be upper-cased, so compare case-insensitively
        assert fragment.lower() in err.value.message.lower()
    # once the primary header is read, the error carries the OBJID for the quarantine table
    if reason not in ("unreadable", "truncated", "non_ascii_header") and "OBJID" not in fragments:
        assert err.value.objid == "obj-0"


def test_every_reason_read_cutout_can_raise_has_a_case():
    covered = {reason for _, reason, _, _ in QUARANTINE_CASES}
    # duplicate_objid needs two files: ingest_files decides it (test_hundred_files_ten_broken); no_bcg is a cluster
    # field's, decided by arc_segments (science/clusters/test_report.py); objtype_mismatch is a cluster drop's,
    # decided by cluster_candidates (assets/test_cluster_scoring.py)
    # bad_file_name is read_one's, before any byte is read (test_a_file_name_that_is_not_utf8_is_quarantined);
    # not_scorable is score_files' (ml/test_score.py); not_square is retired (test_a_non_square_cutout_is_padded);
    # too_large needs the limit lowered (test_a_file_or_gzip_beyond_max_file_bytes_is_too_large_and_never_read_whole)
    assert covered == set(QUARANTINE_REASONS) - {"duplicate_objid", "no_bcg", "objtype_mismatch", "bad_file_name",
                                                 "not_scorable", "not_square", "too_large"}


def test_block_aligned_truncation_is_truncated(tmp_path):
    full = make_file(tmp_path / "full.fits")
    with pytest.raises(QuarantineError) as err:
        read(full[:-2880])
    assert err.value.reason == "truncated", err.value.message


def test_simrole_reaches_the_catalog_and_an_unknown_role_is_quarantined(tmp_path):
    make_file(tmp_path / "a.fits", objid="plain", seed=1)  # real data carry no SIMROLE
    make_file(tmp_path / "b.fits", objid="held", seed=2, primary={"SIMROLE": "heldout", "SIMFAM": "renamed"})
    make_file(tmp_path / "c.fits", objid="typo", seed=3, primary={"SIMROLE": "held-out"})
    result = ingest_files(find_fits(tmp_path), DES, root=tmp_path, workers=1, progress=False)
    cat = catalog_schema(DES).validate(result.catalog)
    assert dict(zip(cat["objid"], cat["sim_role"])) == {"plain": "", "held": "heldout"}
    q = result.quarantine.iloc[0]
    assert len(result.quarantine) == 1 and q["reason"] == "bad_header_value"
    assert "c.fits: SIMROLE = 'held-out' is not one of ['train', 'heldout', 'pairs']" in q["message"]


@pytest.mark.parametrize("magzp", ["thirty", -1000.0, 1000.0], ids=["non_numeric", "overflow", "underflow"])
def test_bad_magzp_is_quarantined_not_fatal(tmp_path, magzp):
    make_file(tmp_path / "a_good.fits", objid="good")
    make_file(tmp_path / "b_bad.fits", objid="bad",
              bands={"r": band_hdus(header={"BUNIT": "count/s", "MAGZP": magzp})})
    result = ingest_files(find_fits(tmp_path), DES, root=tmp_path, workers=1, progress=False)
    assert len(result.catalog) == 1 and len(result.quarantine) == 1
    q = result.quarantine.iloc[0]
    assert q["reason"] == "bad_header_value"
    assert "b_bad.fits: IMAGE_r" in q["message"] and "MAGZP" in q["message"]
    assert result.quarantine["reason"].iloc[0] == "bad_header_value"


def test_a_control_byte_in_a_header_value_is_quarantined_not_fatal(tmp_path):
    # astropy will not even print such a card: the file is quarantined with the card's keyword and raw value,
    # and the files beside it are ingested
    make_file(tmp_path / "a_good.fits", objid="good")
    raw = bytearray(make_file(tmp_path / "b_bad.fits", objid="bad",
                              bands={"r": band_hdus(header={"BUNIT": "count/s", "MAGZP": 30.0})}))
    at = raw.find(b"MAGZP   = ") + 25
    raw[at] = 0x7F
    (tmp_path / "b_bad.fits").write_bytes(bytes(raw))
    result = ingest_files(find_fits(tmp_path), DES, root=tmp_path, workers=1, progress=False)
    assert list(result.catalog["objid"]) == ["good"] and len(result.quarantine) == 1
    q = result.quarantine.iloc[0]
    assert q["reason"] == "bad_header_value" and "b_bad.fits: IMAGE_r" in q["message"]
    assert "MAGZP card 'MAGZP   =" in q["message"] and "\\x7f30.0" in q["message"], q["message"]

# --------------------------------------------------------------------------- 3. accepted with flags


def test_partial_nans_are_zeroed_masked_and_flagged(tmp_path):
    img = synthetic_image(9)
    bad = np.zeros_like(img, dtype=bool)
    bad[10:20, 5:30] = True  # 250 px, 6 %
    bad[50, 50] = True
    img[bad] = np.nan
    c = read(make_file(tmp_path / "f.fits", bands={"r": band_hdus(image=img)}))
    r = idx("r")
    np.testing.assert_array_equal(c.nan_mask[r], bad)
    assert (c.image[r][bad] == 0).all()
    np.testing.assert_array_equal(c.image[r][~bad], img[~bad])
    assert (c.variance[r][bad] == 0).all() and (c.variance[r][~bad] == 1).all()
    assert c.band_flags == {"r": ["nan_masked"]}
    assert not c.nan_mask[[i for i in range(5) if i != r]].any()
    assert np.isfinite(c.image).all()


def test_missing_band_is_zero_filled_and_flagged(tmp_path):
    c = read(make_file(tmp_path / "f.fits", bands={"z": DROP}))
    z = idx("z")
    assert c.band_flags == {"z": ["missing"]}
    assert (c.image[z] == 0).all() and (c.variance[z] == 0).all()
    assert c.psf[z] is None
    assert c.psf_fwhm_arcsec[z] == pytest.approx(DES.band("z").seeing_fwhm_arcsec)
    np.testing.assert_array_equal(c.present, [b != "z" for b in BANDS])
    assert (c.image[idx("g")] != 0).any()


def test_unknown_band_is_ignored_and_reported(tmp_path):
    c = read(make_file(tmp_path / "f.fits", bands={"F999": band_hdus(seed=99)}))
    assert c.ignored_bands == ("F999",)
    assert c.bands == BANDS and c.image.shape[0] == 5
    assert c.band_flags == {}


def test_missing_variance_is_derived_from_sky_noise(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 2.0, (SIZE, SIZE)).astype(np.float32)
    c = read(make_file(tmp_path / "f.fits", bands={"i": band_hdus(image=noise, variance=None)}))
    i = idx("i")
    assert c.band_flags == {"i": ["var_derived", "var_sky_only"]}  # no GAIN card: sky only
    assert np.ptp(c.variance[i]) == 0  # one value everywhere
    assert c.variance[i][0, 0] == pytest.approx(4.0, rel=0.06)


def test_missing_variance_is_sky_noise_not_biased_by_the_galaxy(tmp_path):
    rng = np.random.default_rng(1)
    y, x = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    galaxy = 200.0 * np.exp(-(x**2 + y**2) / (2 * 5.3**2))  # above 1 sigma = 2 over ~20% of the stamp
    image = (galaxy + rng.normal(0.0, 2.0, (SIZE, SIZE))).astype(np.float32)
    c = read(make_file(tmp_path / "f.fits", bands={"r": band_hdus(image=image, variance=None)}))
    assert c.variance[idx("r")][0, 0] == pytest.approx(4.0, rel=0.10)  # the old whole-stamp MAD gave ~7


def test_missing_variance_with_gain_adds_the_poisson_term(tmp_path):
    img = synthetic_image(3, noise=2.0)  # a 50-unit blob on sigma-2 noise
    c = read(make_file(tmp_path / "f.fits", bands={"g": band_hdus(image=img, variance=None, header={"GAIN": 5.0})}))
    g = idx("g")
    assert c.band_flags == {"g": ["var_derived", "var_poisson"]}
    sky = c.variance[g].min()  # pixels at or below the sky level carry the sky variance alone
    assert sky == pytest.approx(4.0, rel=0.10) and (c.variance[g] == sky).mean() > 0.45
    centre = SIZE // 2
    # 5 e-/unit: a pixel ~50 units above the sky holds ~250 e-, variance 250 e-^2 = 10 units^2 on top of the sky
    assert c.variance[g][centre, centre] - sky == pytest.approx(max(img[centre, centre], 0) / 5.0, rel=0.02)


def test_gain_from_the_primary_header_is_used(tmp_path):
    c = read(make_file(tmp_path / "f.fits", primary={"GAIN": 2.0}, bands={"g": band_hdus(variance=None)}))
    assert c.band_flags == {"g": ["var_derived", "var_poisson"]}


def test_bad_gain_is_a_bad_header_value(tmp_path):
    data = make_file(tmp_path / "f.fits", bands={"g": band_hdus(variance=None, header={"GAIN": -3.0})})
    with pytest.raises(QuarantineError, match=r"inbox/des/test\.fits: IMAGE_g: GAIN = -3\.0 is outside") as err:
        read(data)
    assert err.value.reason == "bad_header_value"


def test_gain_is_not_read_where_a_variance_map_is_given(tmp_path):
    c = read(make_file(tmp_path / "f.fits", bands={"g": band_hdus(header={"GAIN": -3.0})}))
    assert c.band_flags == {} and (c.variance == 1).all()


@pytest.mark.parametrize("size,flags", [(39, ["padded"]), (63, ["padded"]), (64, None), (79, None),
                                        (80, ["cropped"]), (100, ["cropped"])])
def test_size_flags_against_the_des_grid(tmp_path, size, flags):
    # des: grid 64 px = 16.8", minimum 10" = 38.02 px (38 px is 9.99"); cropped from 1.25 x 64 = 80 px
    c = read(make_file(tmp_path / "f.fits", size=size))
    assert c.image.shape == (5, size, size)  # the reader keeps the file's size; normalize_cutout pads
    assert c.band_flags == ({} if flags is None else {b: flags for b in BANDS})


def test_just_under_the_minimum_is_too_small(tmp_path):
    with pytest.raises(QuarantineError, match=r"38x38 px at 0\.263\"/px = 9\.99\" across, less than the des "
                                              r"minimum min_cutout_arcsec = 10\"") as err:
        read(make_file(tmp_path / "f.fits", size=38))
    assert err.value.reason == "too_small"


@pytest.mark.parametrize("shape,offset,flags", [
    ((64, 50), (0, 7), ["padded", "padded_square"]),  # 50 columns of the grid's 64 hold data: padded
    ((61, 64), (1, 0), ["padded", "padded_square"]),  # odd difference: one row before, two after (center_pad)
    ((70, 64), (0, 3), ["padded_square"]),  # both sides cover the grid: neither padded nor cropped
    ((90, 120), (15, 0), ["cropped", "padded_square"]),  # 120 >= 1.25 x 64: its centre is kept
    ((52, 200), (74, 0), ["padded", "cropped", "padded_square"]),  # 52 rows of 64 with data, 200 columns cut
])
def test_a_non_square_cutout_is_padded_to_square_keeping_every_pixel(tmp_path, shape, offset, flags):
    rng = np.random.default_rng(7)
    images = {b: rng.normal(5.0, 1.0, shape).astype(np.float32) for b in BANDS}
    variances = {b: rng.uniform(0.5, 2.0, shape).astype(np.float32) for b in BANDS}
    c = read(make_file(tmp_path / "f.fits", bands={b: band_hdus(image=images[b], variance=variances[b])
                                                   for b in BANDS}))
    side = max(shape)
    dy, dx = offset
    assert c.file_shape == shape and c.square_offset_px == offset and c.image.shape == (5, side, side)
    inside = np.s_[dy:dy + shape[0], dx:dx + shape[1]]
    for i, b in enumerate(BANDS):
        np.testing.assert_array_equal(c.image[i][inside], images[b])
        np.testing.assert_array_equal(c.variance[i][inside], variances[b])
    outside = np.ones((side, side), bool)
    outside[inside] = False
    assert outside.sum() == side * side - shape[0] * shape[1]
    assert (c.image[:, outside] == 0).all() and (c.variance[:, outside] == 0).all() and not c.nan_mask.any()
    assert c.band_flags == {b: flags for b in BANDS}


def _clipped(tmp_path, *, keep_from: int, name: str = "f.fits", wcs: bool = True,
             rows_up: int = 0) -> tuple[bytes, np.ndarray]:
    """A 64 x 64 cutout around a blob at its centre (RA 10, DEC -20) with its first ``keep_from`` columns cut off,
    as a survey's cutout service clips at a tile's edge; its WCS (``wcs``) still puts RA/DEC on the blob."""
    full = synthetic_image(3)
    kept = full[:, keep_from:].copy()
    hdr = {}
    if wcs:  # the blob at 0-based (31.5, 31.5) of the full cutout: FITS CRPIX 32.5 - keep_from in the clipped one
        hdr = {**{k: v for k, v in WCS_CD.items()}, "CRPIX1": 32.5 - keep_from, "CRPIX2": 32.5 - rows_up}
    bands = {b: band_hdus(image=kept, header=hdr) for b in BANDS}
    return make_file(tmp_path / name, bands=bands, primary={"RA": 10.0, "DEC": -20.0}), full


def test_a_clipped_cutout_is_padded_with_its_object_at_the_centre_by_its_wcs(tmp_path):
    data, full = _clipped(tmp_path, keep_from=8)  # 64 x 56: the blob 8 px left of the array's centre
    c = read(data)
    assert c.file_shape == (64, 56) and c.square_offset_px == (0, 8) and c.image.shape == (5, 64, 64)
    from lens_assets.science.ingest import catalog_row

    row = catalog_row(c, sha256="0" * 64, survey=DES)  # the catalog keeps the file's shape beside the side as read
    assert (row["cutout_px"], row["file_height_px"], row["file_width_px"]) == (64, 64, 56)
    np.testing.assert_array_equal(c.image[0, :, 8:], full[:, 8:])  # every kept pixel where the full cutout had it
    assert (c.image[:, :, :8] == 0).all() and (c.variance[:, :, :8] == 0).all()
    # 48 px of data on the clipped side of the blob, 12.6" across: read, padded (8 columns of the grid empty)
    assert c.band_flags == {b: ["padded", "padded_square"] for b in BANDS}
    # without a WCS the object is taken to be at the file's centre (the contract): centred padding, 4 px each side
    assert read(_clipped(tmp_path, keep_from=8, name="g.fits", wcs=False)[0]).square_offset_px == (0, 4)
    # the WCS puts the object 4 rows below the centre too: the square grows to the smallest that holds it where a
    # centred file's centre would be, 71 px, the object's pixel (27.5, 23.5) moving to (34.5, 34.5), as the centre
    # of 64 px moves in 71 (half a pixel before the odd square's centre, the padding's rounding)
    c = read(_clipped(tmp_path, keep_from=8, name="h.fits", rows_up=4)[0])
    assert c.image.shape == (5, 71, 71) and c.square_offset_px == (7, 11)
    assert c.band_flags["g"] == ["padded", "padded_square"]


def test_a_sub_pixel_offset_of_the_wcs_is_no_shift_and_refuses_nothing(tmp_path):
    """Cutout services centre on the nearest pixel, so RA/DEC often lie a fraction of a pixel off the centre: that
    is read as the centred file it is (the cluster track needs the whole grid on the shorter side)."""
    from lens_assets.science.clusters.catalog import field_survey

    img = synthetic_image(3)[:, 4:60].copy()  # 64 x 56, the blob at the centre
    # RA/DEC 0.3 px right of it and 0.2 px above; half a pixel off either way on both axes (a tie, decided by
    # round-off in the last bits if it were rounded); 0.99 px off
    for i, (dx, dy) in enumerate([(0.3, -0.2), (0.5, 0.5), (-0.5, -0.5), (0.5, -0.5), (0.99, -0.99)]):
        hdr = {**WCS_CD, "CRPIX1": 28.5 + dx, "CRPIX2": 32.5 + dy}
        data = make_file(tmp_path / f"f{i}.fits", bands={b: band_hdus(image=img, header=hdr) for b in BANDS},
                         primary={"RA": 10.0, "DEC": -20.0})
        c = read(data)
        assert c.square_offset_px == (0, 4) and c.image.shape[-1] == 64, (dx, dy)
        field = read_cutout(data, name="f.fits", survey=field_survey(DES, 56))  # min_cutout = the whole 56 px grid
        assert field.square_offset_px == (0, 4) and field.band_flags["g"] == ["padded_square"], (dx, dy)
    # 1.7 px off is one whole pixel: the padding moves by one column, and the data around the object lose two
    hdr = {**WCS_CD, "CRPIX1": 28.5 - 1.7, "CRPIX2": 32.5}
    c = read(make_file(tmp_path / "g.fits", bands={b: band_hdus(image=img, header=hdr) for b in BANDS},
                       primary={"RA": 10.0, "DEC": -20.0}))
    assert c.square_offset_px == (0, 5) and c.band_flags["g"] == ["padded", "padded_square"]


def test_the_wcs_is_taken_from_the_first_band_in_the_survey_order_whatever_the_file_order(tmp_path):
    img = synthetic_image(3)[:, 4:60].copy()
    wcs = {"g": {**WCS_CD, "CRPIX1": 28.5 + 6, "CRPIX2": 32.5}, "z": {**WCS_CD, "CRPIX1": 28.5 - 6, "CRPIX2": 32.5}}
    offsets = set()
    for order in (("z", "g", "r", "i", "Y"), ("g", "r", "i", "z", "Y")):
        bands = {b: band_hdus(image=img, header=wcs.get(b, {})) for b in order}
        prim = {"OBJID": "o", "RA": 10.0, "DEC": -20.0, "SURVEY": "des"}
        write_cutout(tmp_path / "f.fits", prim, bands)
        offsets.add(read((tmp_path / "f.fits").read_bytes()).square_offset_px)
    # g's WCS in both orders: the object 6 columns right of the centre, so the square grows to 68 px
    assert offsets == {(2, 0)}


def _band_header(extra: dict, ctype=("RA---TAN", "DEC--TAN")):
    from astropy.io import fits

    h = fits.Header()
    h.update({"NAXIS": 2, "NAXIS1": 56, "NAXIS2": 64, "CTYPE1": ctype[0], "CTYPE2": ctype[1], "CRVAL1": 10.0,
              "CRVAL2": -20.0, "CD1_1": -PIX / 3600, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": PIX / 3600, **extra})
    return h


def _object_at(*headers, ra: float, dec: float):
    from types import SimpleNamespace

    from lens_assets.science.fits_validation import _object_pixel

    bands = [(f"b{i}", {"_hdu": SimpleNamespace(header=h)}, None) for i, h in enumerate(headers)]
    return _object_pixel(bands, ra, dec, (64, 56))


def test_the_object_pixel_follows_astropy_through_sip_swapped_axes_frames_and_later_bands():
    from astropy.coordinates import SkyCoord
    from astropy.wcs import WCS

    # a cutout keeping its CCD's reference pixel 1,500 px away, with SIP distortion: the object truly at (28, 31.5)
    sip = _band_header({"CRPIX1": -1500.0, "CRPIX2": -1500.0, "A_ORDER": 2, "B_ORDER": 2, "A_2_0": 2e-6,
                        "A_0_2": 1e-6, "B_2_0": 1e-6, "B_0_2": 2e-6}, ("RA---TAN-SIP", "DEC--TAN-SIP"))
    ra, dec = (float(v) for v in WCS(sip).all_pix2world(28.0, 31.5, 0))
    assert _object_at(sip, ra=ra, dec=dec) == (pytest.approx(31.5, abs=1e-6), pytest.approx(28.0, abs=1e-6))
    # the first axis DEC, the second RA: RA 10, DEC -20 at CRPIX (x=31.5, y=23.5)
    swapped = _band_header({"CRPIX1": 32.5, "CRPIX2": 24.5, "CRVAL1": -20.0, "CRVAL2": 10.0, "CD1_1": PIX / 3600,
                            "CD2_2": -PIX / 3600}, ("DEC--TAN", "RA---TAN"))
    assert _object_at(swapped, ra=10.0, dec=-20.0) == (pytest.approx(23.5), pytest.approx(31.5))
    # a galactic WCS: the ICRS position converted, not taken for (l, b)
    gal = SkyCoord(10.0, -20.0, unit="deg").galactic
    galactic = _band_header({"CRPIX1": 20.5, "CRPIX2": 30.5, "CRVAL1": gal.l.deg, "CRVAL2": gal.b.deg},
                            ("GLON-TAN", "GLAT-TAN"))
    assert _object_at(galactic, ra=10.0, dec=-20.0) == (pytest.approx(29.5, abs=1e-6), pytest.approx(19.5, abs=1e-6))
    # a first band whose WCS misses the image or cannot be read leaves the decision to the next band's
    good = _band_header({"CRPIX1": 20.5, "CRPIX2": 30.5})
    far = _band_header({"CRPIX1": 5000.0, "CRPIX2": 30.5})
    broken = _band_header({"CRPIX1": 20.5, "CRPIX2": 30.5, "CTYPE1": "RA---XYZ"})
    for first in (far, broken):
        assert _object_at(first, good, ra=10.0, dec=-20.0) == (pytest.approx(29.5), pytest.approx(19.5))
    assert _object_at(far, ra=10.0, dec=-20.0) is None


def test_a_clipped_cutout_whose_object_lies_near_the_cut_is_too_small(tmp_path):
    # 64 x 40: the blob 7.5 px from the cut, so 16 px (4.2") of data around it, under DES's 10"
    data, _ = _clipped(tmp_path, keep_from=24)
    with pytest.raises(QuarantineError, match=r"images are 64x40 px at 0\.263\"/px = 4\.21\" across around the "
                                              r"object, which its WCS puts -12, \+0 px \(x, y\) from the file's "
                                              r"centre, less than the des minimum") as err:
        read(data)
    assert err.value.reason == "too_small"


def test_a_non_square_cutout_is_too_small_by_its_shorter_side(tmp_path):
    # 64 px is 16.8" but 37 px is 9.73": a lens at the edge of the finder's area would be cut off across
    img = synthetic_image(0)[:, :37].copy()
    with pytest.raises(QuarantineError, match=r"images are 64x37 px at 0\.263\"/px = 9\.73\" across, less than "
                                              r"the des minimum") as err:
        read(make_file(tmp_path / "f.fits", bands={b: band_hdus(image=img) for b in BANDS}))
    assert err.value.reason == "too_small"
    assert read(make_file(tmp_path / "g.fits", bands={b: band_hdus(image=synthetic_image(0)[:, :39].copy())
                                                      for b in BANDS})).file_shape == (64, 39)


@pytest.mark.parametrize("size,sigma_px", [(11, 1.5), (21, 2.0)])
def test_missing_fwhm_is_measured_from_psf(tmp_path, size, sigma_px):
    psf = gaussian_psf(size, sigma_px)
    c = read(make_file(tmp_path / "f.fits", bands={"g": band_hdus(psf=psf, header={"PSFFWHM": DROP})}))
    g = idx("g")
    assert c.band_flags == {"g": ["fwhm_from_psf"]}
    assert c.psf_fwhm_arcsec[g] == pytest.approx(FWHM_TO_SIGMA * sigma_px * PIX, rel=0.05)
    assert c.psf_fwhm_arcsec[idx("r")] == 1.0  # header value where present


def test_missing_fwhm_and_psf_uses_nominal_seeing(tmp_path):
    c = read(make_file(tmp_path / "f.fits", bands={"Y": band_hdus(psf=None, header={"PSFFWHM": DROP})}))
    y = idx("Y")
    assert c.band_flags == {"Y": ["fwhm_nominal"]}
    assert c.psf_fwhm_arcsec[y] == DES.band("Y").seeing_fwhm_arcsec
    assert c.psf[y] is None


WCS_CD = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": -20.0, "CRPIX1": 32.5,
          "CRPIX2": 32.5, "CD1_1": -PIX / 3600, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": PIX / 3600}
WCS_CDELT = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": -20.0, "CRPIX1": 32.5,
             "CRPIX2": 32.5, "CDELT1": -PIX / 3600, "CDELT2": PIX / 3600}


@pytest.mark.parametrize("wcs", [WCS_CD, WCS_CDELT], ids=["cd_matrix", "cdelt"])
def test_wcs_gives_pixel_scale(tmp_path, wcs):
    c = read(make_file(tmp_path / "f.fits", header={"PIXSCALE": DROP, **wcs}))
    assert c.pixel_scale_arcsec == pytest.approx(PIX, abs=1e-6)


@pytest.mark.parametrize("bunit,magzp,factor", [("nanomaggy", None, 1.0), ("count/s", 22.5, 1.0),
                                                ("adu", 25.0, 0.1), ("count/s", 30.0, 1e-3)])
def test_flux_unit_factor(tmp_path, bunit, magzp, factor):
    header = {"BUNIT": bunit} | ({"MAGZP": magzp} if magzp is not None else {})
    c = read(make_file(tmp_path / "f.fits", header=header))
    np.testing.assert_allclose(c.nmgy_per_unit, [factor] * 5, rtol=1e-12)


# --------------------------------------------------------------------------- 4. provenance


def test_label_provenance(tmp_path):
    inbox = tmp_path / "inbox"
    make_file(inbox / "a_pretrain.fits", objid="pre", seed=1,
              primary={"LENS": True, "LABELSRC": "pretrain:galaxiesml", "LABELCNF": 0.8})
    make_file(inbox / "b_weak.fits", objid="weak", seed=2,
              primary={"LENS": True, "LABELSRC": "weak:gzoo", "LABELCNF": 0.9})
    make_file(inbox / "c_unlabeled.fits", objid="none", seed=3)
    make_file(inbox / "d_sim.fits", objid="sim", seed=4,
              primary={"LENS": False, "LABELSRC": "sim:lenstronomy", "LABELCNF": 1.0})
    result = ingest_files(find_fits(inbox), DES, root=tmp_path, workers=1, progress=False)
    assert result.quarantine.empty
    cat = catalog_schema(DES).validate(result.catalog, lazy=True).set_index("objid")

    assert cat.loc["pre", "usable_for_training"] == False  # noqa: E712 (numpy bool)
    assert cat.loc["pre", "label"] == 1 and cat.loc["pre", "label_source"] == "pretrain:galaxiesml"

    assert cat.loc["weak", "label_confidence"] < 0.5
    assert cat.loc["weak", "usable_for_training"] == True  # noqa: E712
    assert re.search(r"weak label confidence 0\.9 capped", cat.loc["weak", "notes"])

    assert cat.loc["none", "label"] == -1 and cat.loc["none", "label_source"] == "none"
    assert cat.loc["none", "usable_for_training"] == False  # noqa: E712

    assert cat.loc["sim", "label"] == 0 and cat.loc["sim", "label_confidence"] == 1.0
    assert cat.loc["sim", "usable_for_training"] == True and cat.loc["sim", "notes"] == ""  # noqa: E712


def test_catalog_row_reports_flags_and_ignored_bands(tmp_path):
    inbox = tmp_path / "inbox"
    make_file(inbox / "f.fits", objid="flags", bands={"z": DROP, "F999": band_hdus(seed=5),
                                                     "g": band_hdus(variance=None)})
    result = ingest_files(find_fits(inbox), DES, root=tmp_path, workers=1, progress=False)
    row = catalog_schema(DES).validate(result.catalog).iloc[0]
    assert row["n_bands_present"] == 4
    assert row["band_flags"] == "g:var_derived|var_sky_only;z:missing"
    assert row["ignored_bands"] == "F999" and "F999" in row["notes"]
    assert row["variance_map_available"] == False  # noqa: E712
    assert math.isnan(row["flux_z"]) and row["flux_g"] > 0


# --------------------------------------------------------------------------- 5. headline


def _write_inbox(inbox: Path, simulated) -> dict[str, str]:
    """90 valid files and 10 broken ones in ``inbox``; returns {broken file name: expected reason}."""
    family, sims = simulated
    for k, sim in enumerate(sims):
        write_simulated_cutout(inbox / f"good_{k:03d}.fits", sim, survey=DES, family=family, seed=7)
    for k in range(len(sims), 90):
        make_file(inbox / f"good_{k:03d}.fits", objid=f"good-{k:03d}", seed=k)

    broken = {}
    (inbox / "bad_unreadable.fits").write_bytes(np.random.default_rng(0).bytes(5000))
    broken["bad_unreadable.fits"] = "unreadable"
    data = make_file(inbox / "bad_truncated.fits", objid="bad-trunc", seed=101)
    (inbox / "bad_truncated.fits").write_bytes(data[:-3000])
    broken["bad_truncated.fits"] = "truncated"
    make_file(inbox / "bad_no_objid.fits", seed=102, primary={"OBJID": DROP})
    broken["bad_no_objid.fits"] = "missing_header"
    make_file(inbox / "bad_dec.fits", objid="bad-dec", seed=103, primary={"DEC": 123})
    broken["bad_dec.fits"] = "bad_header_value"
    make_file(inbox / "bad_survey.fits", objid="bad-survey", seed=104, primary={"SURVEY": "hsc"})
    broken["bad_survey.fits"] = "survey_mismatch"
    make_file(inbox / "bad_one_band_not_square.fits", objid="bad-square", seed=105,
              bands={"i": band_hdus(image=np.zeros((64, 63), np.float32))})
    broken["bad_one_band_not_square.fits"] = "shape_mismatch"
    make_file(inbox / "bad_small.fits", objid="bad-small", seed=106, size=32)
    broken["bad_small.fits"] = "too_small"
    nan_img = synthetic_image(107)
    nan_img[::, :48] = np.nan
    make_file(inbox / "bad_nan.fits", objid="bad-nan", seed=107, bands={"g": band_hdus(image=nan_img)})
    broken["bad_nan.fits"] = "mostly_nan"
    make_file(inbox / "bad_bunit.fits", objid="bad-bunit", seed=108, header={"BUNIT": "Jy"})
    broken["bad_bunit.fits"] = "bad_bunit"
    shutil.copyfile(inbox / "good_050.fits", inbox / "zz_copy_of_good_050.fits")
    broken["zz_copy_of_good_050.fits"] = "duplicate_objid"
    return broken


def _sorted(df: pd.DataFrame, key: str) -> pd.DataFrame:
    return df.sort_values(key).reset_index(drop=True)


def test_gzipped_files_are_read_decompressed_and_links_to_nothing_are_quarantined_not_passed_over(tmp_path):
    """find_fits lists *.fits.gz and a dangling link of a FITS name too, so every one is counted: the gzipped
    file is ingested as its decompressed bytes (its sha256 is the stored file's), a corrupt one and the link are
    quarantined as unreadable."""
    import gzip
    import hashlib

    inbox = tmp_path / "inbox"
    plain = make_file(inbox / "a.fits", objid="obj-a")
    gz = gzip.compress(make_file(tmp_path / "b.fits", objid="obj-b"))
    (inbox / "b.FITS.gz").write_bytes(gz)
    (inbox / "c.fits.gz").write_bytes(b"not gzip at all")
    (inbox / "d.fits").symlink_to(tmp_path / "gone.fits")
    (inbox / "notes.txt").write_text("not a cutout")
    paths = find_fits(inbox)
    assert [p.name for p in paths] == ["a.fits", "b.FITS.gz", "c.fits.gz", "d.fits"]
    result = ingest_files(paths, DES, root=tmp_path, workers=1, progress=False)
    assert result.n_files == 4 == len(result.catalog) + len(result.quarantine)
    cat = result.catalog.set_index("objid")
    assert cat.loc["obj-b", "source_file"] == "inbox/b.FITS.gz"
    assert cat.loc["obj-b", "source_sha256"] == hashlib.sha256(gz).hexdigest()
    assert cat.loc["obj-a", "source_sha256"] == hashlib.sha256(plain).hexdigest()
    quar = result.quarantine.set_index("source_file")
    assert quar.loc["inbox/c.fits.gz", "reason"] == "unreadable"
    assert quar.loc["inbox/c.fits.gz", "message"].startswith("inbox/c.fits.gz: not a readable gzip file")
    assert quar.loc["inbox/d.fits", "reason"] == "unreadable"
    assert quar.loc["inbox/d.fits", "message"].startswith("inbox/d.fits: cannot be read (No such file")


def test_fpack_files_are_read_and_files_of_other_names_are_listed_as_unread(tmp_path):
    """A ``.fits.fz`` file (fpack: an empty primary HDU with the primary keywords, each extension a
    tile-compressed image, RICE_1 quantized) is ingested like its plain file, within the quantization; files
    whose names are not FITS cutout names are not read, and ``unread_files`` names them (the markers aside)."""
    import io

    from astropy.io import fits

    from lens_assets.science.ingest import scan_folder

    def unread_files(root, ignore):
        return scan_folder(root, ignore=ignore)[1]

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    plain = make_file(tmp_path / "plain" / "a.fits", objid="obj-a")
    with fits.open(io.BytesIO(plain)) as hdul:
        hdus = [fits.PrimaryHDU(header=hdul[0].header)] + [
            fits.CompImageHDU(h.data, header=h.header, name=h.name, compression_type="RICE_1") for h in hdul[1:]]
        fits.HDUList(hdus).writeto(inbox / "a.fits.fz")
    for name in ("notes.txt", "b.fits.bz2", "_COMPLETE"):
        (inbox / name).write_bytes(b"x")
    assert [p.name for p in find_fits(inbox)] == ["a.fits.fz"]
    assert [p.name for p in unread_files(inbox, ignore=("_COMPLETE",))] == ["b.fits.bz2", "notes.txt"]
    # folders are walked, not listed, whatever their names; a marker's name counts only in the folder itself; a
    # link to no file is listed; so is a link to a folder (outside the root here), which neither walk follows
    (inbox / "sub.fits").mkdir()
    (inbox / "sub.fits" / "_COMPLETE").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    make_file(tmp_path / "elsewhere" / "c.fits", objid="obj-c")
    (inbox / "batch.fits").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (inbox / "gone.txt").symlink_to(tmp_path / "nothing")
    assert [p.name for p in find_fits(inbox)] == ["a.fits.fz"]  # c.fits behind the link is not read...
    unread = [str(p.relative_to(inbox)) for p in unread_files(inbox, ignore=("_COMPLETE",))]
    assert unread == ["b.fits.bz2", "batch.fits", "gone.txt", "notes.txt", "sub.fits/_COMPLETE"]  # ...and is said
    assert scan_folder(inbox, ignore=("_COMPLETE",))[0] == find_fits(inbox)  # one walk gives both lists
    (inbox / "batch.fits").unlink()
    (inbox / "gone.txt").unlink()
    shutil.rmtree(inbox / "sub.fits")
    result = ingest_files(find_fits(inbox), DES, root=tmp_path, workers=1, progress=False)
    assert result.quarantine.empty and list(result.catalog["objid"]) == ["obj-a"]
    fz, ref = read((inbox / "a.fits.fz").read_bytes(), "inbox/a.fits.fz"), read(plain)
    noise = np.sqrt(ref.variance)
    assert np.abs(fz.image - ref.image).max() < 0.5 * noise.min()  # RICE_1 quantizes to a fraction of the noise
    assert np.abs(fz.image - ref.image).max() > 0  # it was compressed, lossily, and read back through astropy
    row = result.catalog.iloc[0]
    assert row["source_file"] == "inbox/a.fits.fz" and row["cutout_px"] == ref.image.shape[-1]


def test_a_file_or_gzip_beyond_max_file_bytes_is_too_large_and_never_read_whole(tmp_path, monkeypatch):
    """A stored file over MAX_FILE_BYTES is refused from its size alone; a .gz file is decompressed only up to the
    limit (a small file that expands without bound never fills the worker's memory)."""
    import gzip

    from lens_assets.science import fits_validation
    from lens_assets.science.clusters.scoring import objtype_quarantine

    inbox = tmp_path / "inbox"
    small = make_file(inbox / "a.fits", objid="obj-a", size=40)
    big = make_file(inbox / "b.fits", objid="obj-b", size=64)
    bomb = gzip.compress(make_file(tmp_path / "c.fits", objid="obj-c", size=64), compresslevel=9)
    (inbox / "c.fits.gz").write_bytes(bomb)
    (inbox / "d.fits.gz").write_bytes(gzip.compress(make_file(tmp_path / "d.fits", objid="obj-d", size=40)))
    limit = len(small) + 2880
    assert len(bomb) < limit < len(big)
    monkeypatch.setattr(fits_validation, "MAX_FILE_BYTES", limit)
    read_whole = Path.read_bytes

    def read_bytes(self):
        assert self.name != "b.fits", "an oversized file was read into memory"
        return read_whole(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    result = ingest_files(find_fits(inbox), DES, root=tmp_path, workers=1, progress=False)
    assert result.n_files == 4 == len(result.catalog) + len(result.quarantine)
    assert sorted(result.catalog["objid"]) == ["obj-a", "obj-d"]
    quar = result.quarantine.set_index("source_file")
    assert (quar["reason"] == "too_large").all() and sorted(quar.index) == ["inbox/b.fits", "inbox/c.fits.gz"]
    assert quar.loc["inbox/b.fits", "message"] == (f"inbox/b.fits: {len(big):,} bytes, more than {limit:,} "
                                                   f"(MAX_FILE_BYTES)")
    assert quar.loc["inbox/c.fits.gz", "message"] == (f"inbox/c.fits.gz: decompresses to more than {limit:,} bytes "
                                                      f"(MAX_FILE_BYTES) from {len(bomb):,}")
    # the cluster track's OBJTYPE check reads only the primary header of any file, oversized or not (the file is
    # hashed streaming where it is quarantined)
    import hashlib

    from lens_assets.science.clusters import scoring

    field = make_file(tmp_path / "e.fits", objid="obj-e", size=64, primary={"OBJTYPE": "galaxy"})
    assert len(field) > limit
    reads = []

    def spying_open(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        real_read = f.read
        f.read = lambda n=-1: reads.append(n) or real_read(n)
        return f

    monkeypatch.setattr(scoring, "open", spying_open, raising=False)
    q = objtype_quarantine(tmp_path / "e.fits", "e.fits", survey="des")
    assert q["reason"] == "objtype_mismatch" and q["source_sha256"] == hashlib.sha256(field).hexdigest()
    assert reads == [scoring.PRIMARY_HEADER_MAX_BYTES] and scoring.PRIMARY_HEADER_MAX_BYTES < limit


def test_a_tile_compressed_file_declaring_more_pixels_than_max_file_bytes_is_too_large(tmp_path, monkeypatch):
    """A tile-compressed image expands without bound as astropy decompresses it: its declared size decides first."""
    from astropy.io import fits

    from lens_assets.science import fits_validation

    prim = fits.Header([("OBJID", "x"), ("RA", 1.0), ("DEC", 2.0), ("SURVEY", "des")])
    band = fits.Header([("BAND", "g"), ("BUNIT", "nanomaggy"), ("PIXSCALE", PIX), ("PSFFWHM", 1.0)])
    zeros = np.zeros((1000, 1000), np.float32)
    zeros[500, 500] = 1.0
    raw = _astropy_file([fits.PrimaryHDU(header=prim), fits.CompImageHDU(zeros, header=band, name="IMAGE_g"),
                         fits.CompImageHDU(np.ones_like(zeros), name="VAR_g")])
    assert len(raw) < 400_000 < zeros.nbytes
    monkeypatch.setattr(fits_validation, "MAX_FILE_BYTES", 400_000)
    decompressed = []
    real = fits.CompImageHDU.data
    monkeypatch.setattr(fits.CompImageHDU, "data", property(lambda h: decompressed.append(1) or real.fget(h)))
    with pytest.raises(QuarantineError, match=r"its images declare 8,000,000 bytes of pixels, more than 400,000 "
                                              r"\(MAX_FILE_BYTES\)") as err:
        read(raw)
    assert err.value.reason == "too_large" and decompressed == []
    monkeypatch.setattr(fits_validation, "MAX_FILE_BYTES", 8_000_000)
    assert read(raw).image.shape == (5, 1000, 1000) and decompressed  # at the limit: read


def _gzip_cases():
    import gzip

    a, b = b"SIMPLE  = T" + bytes(range(256)) * 40, b"second member" * 100
    one = gzip.compress(a)
    bad_crc = bytearray(one)
    bad_crc[-8] ^= 0xFF
    return {"one member": one, "two members": one + gzip.compress(b), "NULs after": one + b"\0" * 700,
            "NULs between": one + b"\0" * 3 + gzip.compress(b), "empty": b"", "truncated": one[:-20],
            "no trailer": one[:-8], "bad CRC": bytes(bad_crc), "garbage after": one + b"not gzip",
            "not gzip": b"plain bytes"}


@pytest.mark.parametrize("case", list(_gzip_cases()))
def test_gunzip_gives_what_gzip_decompress_gives_or_refuses_what_it_refuses(case):
    import gzip

    from lens_assets.science.fits_reader import gunzip

    data = _gzip_cases()[case]
    try:
        want = gzip.decompress(data)
    except (OSError, EOFError) as err:
        with pytest.raises(QuarantineError, match=r"^x\.gz: not a readable gzip file") as got:
            gunzip(data, "x.gz")
        assert got.value.reason == "unreadable", err
    else:
        assert gunzip(data, "x.gz") == want


def test_a_gzip_tile_that_expands_past_its_tile_is_refused_before_astropy_decompresses_it():
    """A tile-compressed image that declares 10 x 10 px but holds one GZIP tile of 16 MiB: astropy would decompress
    the tile whole before checking its shape. Each tile is decompressed at most one byte past its 400 bytes."""
    import gzip
    import io
    import tracemalloc

    from astropy.io import fits

    payload = gzip.compress(b"\0" * (16 << 20), compresslevel=9)  # 16 KB
    col = fits.Column(name="COMPRESSED_DATA", format="1PB()",
                      array=np.array([np.frombuffer(payload, np.uint8)], dtype=object))
    tiles = fits.BinTableHDU.from_columns([col], name="IMAGE_g")
    for key, value in (("ZIMAGE", True), ("ZBITPIX", -32), ("ZNAXIS", 2), ("ZNAXIS1", 10), ("ZNAXIS2", 10),
                       ("ZTILE1", 10), ("ZTILE2", 10), ("ZCMPTYPE", "GZIP_1"), ("BAND", "g"),
                       ("BUNIT", "nanomaggy"), ("PIXSCALE", PIX), ("PSFFWHM", 1.0)):
        tiles.header[key] = value
    prim = fits.PrimaryHDU(header=fits.Header([("OBJID", "x"), ("RA", 1.0), ("DEC", 2.0), ("SURVEY", "des")]))
    out = io.BytesIO()
    fits.HDUList([prim, tiles]).writeto(out)
    with fits.open(io.BytesIO(out.getvalue())) as hdul:
        assert type(hdul[1]).__name__ == "CompImageHDU" and hdul[1].header["NAXIS1"] == 10  # astropy's view
    tracemalloc.start()
    try:
        with pytest.raises(QuarantineError, match=r"HDU 1 \(IMAGE_G\): GZIP tile 0 decompresses past the 400 bytes "
                                                  r"of its 100-pixel tile; the file is corrupt") as err:
            read(out.getvalue())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.reason == "unreadable" and peak < 4 << 20  # astropy alone peaks over 16 MiB here


def test_pixels_as_coarse_as_a_band_of_the_survey_are_read_and_coarser_ones_refused(tmp_path):
    """Euclid's NISP bands (0.3"/px) beside VIS (0.1"/px): a file of the NISP bands alone is read (VIS missing),
    a pixel coarser than every band's seeing is too_coarse."""
    from lens_assets.science.surveys import get_survey

    euclid = get_survey("euclid")
    nisp = [b for b in euclid.bands if b.native_pixel_scale_arcsec >= 0.3]
    assert nisp and all(b.native_pixel_scale_arcsec <= max(x.seeing_fwhm_arcsec for x in euclid.bands) for b in nisp)
    prim = {"OBJID": "nisp-1", "RA": 10.0, "DEC": -20.0, "SURVEY": "euclid"}

    def write(scale):
        bands = {b.name: band_hdus(size=48, header={"PIXSCALE": scale}) for b in nisp}
        write_cutout(tmp_path / "n.fits", prim, bands)
        return (tmp_path / "n.fits").read_bytes()

    cut = read_cutout(write(0.3), name="n.fits", survey=euclid)
    assert cut.pixel_scale_arcsec == 0.3 and "missing" in cut.band_flags[euclid.reference_band]
    with pytest.raises(QuarantineError, match=r"n.fits: pixel scale 1\.5\"/px is coarser") as err:
        read_cutout(write(1.5), name="n.fits", survey=euclid)
    assert err.value.reason == "too_coarse"


def test_a_band_of_zeros_in_image_and_variance_is_missing_and_an_all_nan_variance_mostly_nan(tmp_path):
    zeros = np.zeros((SIZE, SIZE), np.float32)
    cut = read_cutout(make_file(tmp_path / "a.fits", bands={"z": band_hdus(image=zeros, variance=zeros)}),
                      name="a.fits", survey=DES)
    assert cut.band_flags["z"] == ["missing"] and cut.present.sum() == DES.n_bands - 1
    nan_var = np.full((SIZE, SIZE), np.nan, np.float32)
    with pytest.raises(QuarantineError, match=r"VAR_r is 100% non-finite") as err:
        read_cutout(make_file(tmp_path / "b.fits", bands={"r": band_hdus(variance=nan_var)}), name="b.fits",
                    survey=DES)
    assert err.value.reason == "mostly_nan"


def test_a_file_name_that_is_not_utf8_is_quarantined_with_the_name_escaped(tmp_path):
    import os

    inbox = tmp_path / "inbox"
    make_file(inbox / "good.fits", objid="obj-good")
    data = make_file(tmp_path / "x.fits", objid="obj-cafe")
    with open(os.path.join(os.fsencode(inbox), b"caf\xe9.fits"), "wb") as f:  # Latin-1 bytes on a UTF-8 system
        f.write(data)
    result = ingest_files(find_fits(inbox), DES, root=tmp_path, workers=1, progress=False)
    assert result.n_files == 2 and list(result.catalog["objid"]) == ["obj-good"]
    (q,) = result.quarantine.to_dict("records")
    assert q["reason"] == "bad_file_name" and q["source_file"] == "inbox/caf\\xe9.fits"
    assert q["message"] == "inbox/caf\\xe9.fits: the file name is not UTF-8 text; rename the file"
    quarantine_schema().validate(result.quarantine)
    result.quarantine.to_parquet(tmp_path / "q.parquet")  # a table can hold it


def test_hundred_files_ten_broken(tmp_path, simulated):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    broken = _write_inbox(inbox, simulated)
    paths = find_fits(inbox)
    assert len(paths) == 100

    result = ingest_files(paths, DES, root=tmp_path, workers=1, progress=False)
    cat, quar = result.catalog, result.quarantine

    assert result.n_files == 100 == len(cat) + len(quar)
    assert len(cat) == 90 and len(quar) == 10
    assert quar["reason"].nunique() == 10
    assert dict(zip(quar["source_file"], quar["reason"])) == {f"inbox/{n}": r for n, r in broken.items()}
    assert (quar["message"].str.len() > 0).all()
    for _, q in quar.iterrows():
        assert q["source_file"] in q["message"]
    dup = quar.set_index("reason").loc["duplicate_objid"]
    assert dup["objid"] == "good-050" and "inbox/good_050.fits" in dup["message"]

    catalog_schema(DES).validate(cat, lazy=True)
    quarantine_schema().validate(quar, lazy=True)

    family, sims = simulated
    expected_ids = {s.system.objid for s in sims} | {f"good-{k:03d}" for k in range(len(sims), 90)}
    assert set(cat["objid"]) == expected_ids
    assert set(cat["source_file"]) == {f"inbox/good_{k:03d}.fits" for k in range(90)}
    for table in (cat, quar):
        for name in table["source_file"]:
            assert not Path(name).is_absolute() and (tmp_path / name).is_file()
    labeled = cat.set_index("objid").loc[[s.system.objid for s in sims]]
    assert list(labeled["label"]) == [int(s.system.is_lens) for s in sims]
    assert (labeled["label_source"] == "sim:lenstronomy").all()

    parallel = ingest_files(paths, DES, root=tmp_path, workers=2, progress=False)
    assert parallel.n_files == 100
    pd.testing.assert_frame_equal(_sorted(parallel.catalog, "objid"), _sorted(cat, "objid"))
    pd.testing.assert_frame_equal(_sorted(parallel.quarantine, "source_file"), _sorted(quar, "source_file"))


def test_written_files_are_standard_fits_that_astropy_verifies(tmp_path):
    from astropy.io import fits

    make_file(tmp_path / "a.fits", primary={"NOTE": "it's", "BIGNUM": 1.2345678901234567e300, "N": -3, "OK": False})
    with fits.open(tmp_path / "a.fits") as hdul:
        hdul.verify("exception")
        head = hdul[0].header
        assert (head["NOTE"], head["BIGNUM"], head["N"], head["OK"]) == ("it's", 1.2345678901234567e300, -3, False)
        assert [h.name for h in hdul][:4] == ["PRIMARY", "IMAGE_g", "VAR_g", "PSF_g"]  # band case kept
        assert hdul["IMAGE_G"].data.dtype.kind == "f" and hdul["IMAGE_G"].data.dtype.itemsize == 4


@pytest.mark.parametrize("primary,match", [
    ({"TOOLONGKEY": 1}, r"FITS keyword 'TOOLONGKEY' must be at most 8 characters"),
    ({"NOTE": "x" * 80}, r"FITS keyword NOTE: string 'x+' is longer than 68 ASCII characters"),
    ({"BAD": float("nan")}, r"FITS keyword BAD: value nan is not finite"),
    ({"OBJ": [1, 2]}, r"FITS keyword OBJ: unsupported value type list"),
])
def test_writer_rejects_what_fits_cannot_hold(tmp_path, primary, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_file(tmp_path / "a.fits", primary=primary)


def test_header_values_read_from_card_images_match_astropy(tmp_path):
    """The fast card reader agrees with astropy on every value form a producer may write."""
    import io

    from astropy.io import fits

    from lens_assets.science.fits_contract import _cards

    cards = [("OBJID", "o'brien  x"), ("RA", 1.5), ("DEC", -3.25e-7), ("SURVEY", ""), ("LENS", False),
             ("LABELCNF", 1), ("FLUXRAT", 0.25), ("THETA_E", 2.0), ("Z_SPEC", 1e-3), ("SIMKIND", "ring")]
    header = fits.Header(cards)
    header.append(fits.Card.fromstring("Z_PHOT  =              1.5D-02 / photometric redshift, D exponent"))
    header.append(fits.Card.fromstring("Z_ERR   = (1, 2)"))  # complex: handed to astropy
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(header=header)]).writeto(buf)
    raw = buf.getvalue()
    with fits.open(io.BytesIO(raw)) as hdul:
        keys = tuple(k for k, _ in cards) + ("Z_PHOT", "Z_ERR", "ABSENT")
        ours = _cards(hdul[0], raw, keys)
        assert ours == {k: hdul[0].header[k] for k in keys if k in hdul[0].header}
    assert ours["OBJID"] == "o'brien  x" and ours["Z_PHOT"] == 0.015 and ours["LENS"] is False
    assert "ABSENT" not in ours


# --------------------------------------------------------------------------- plain-image fast path vs astropy


def _astropy_file(hdus) -> bytes:
    import io

    from astropy.io import fits

    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def _assert_same_reading(raw: bytes):
    """read_cutout through the plain-HDU scanner equals read_cutout with astropy opening the file."""
    from lens_assets.science.fits_reader import _scan_plain_hdus

    fast = read(raw)
    assert _scan_plain_hdus(raw) is not None
    slow = read_cutout(raw, name="inbox/des/test.fits", survey=DES, fast_path=False)
    assert fast.primary == slow.primary and fast.band_flags == slow.band_flags
    for attr in ("image", "variance", "nan_mask", "psf_fwhm_arcsec", "nmgy_per_unit"):
        np.testing.assert_array_equal(getattr(fast, attr), getattr(slow, attr), err_msg=attr)
    for a, b in zip(fast.psf, slow.psf):
        assert (a is None and b is None) or np.array_equal(a, b)
    assert fast.pixel_scale_arcsec == slow.pixel_scale_arcsec


def test_plain_files_read_without_astropy_objects_equal_astropy(tmp_path, simulated):
    family, cutouts = simulated
    write_simulated_cutout(tmp_path / "sim.fits", cutouts[0], survey=DES, family=family, seed=7)
    _assert_same_reading((tmp_path / "sim.fits").read_bytes())
    _assert_same_reading(make_file(tmp_path / "nan.fits", image=np.where(np.eye(SIZE) > 0, np.nan,
                                                                         synthetic_image(3)).astype(np.float32)))
    _assert_same_reading(make_file(tmp_path / "wcs.fits", header={"PIXSCALE": DROP, **WCS_CD}))
    _assert_same_reading(make_file(tmp_path / "nopsf.fits", psf=None, variance=None, header={"PSFFWHM": DROP}))


def test_plain_reader_takes_integer_and_double_images_as_astropy_does():
    from astropy.io import fits

    rng = np.random.default_rng(0)
    hdus = [fits.PrimaryHDU(header=fits.Header([("OBJID", "int-1"), ("RA", 1.0), ("DEC", 2.0), ("SURVEY", "des")]))]
    dtypes = {"g": np.int16, "r": np.int32, "i": np.float64, "z": np.uint8, "Y": np.int64}
    for b, dt in dtypes.items():
        img = (rng.normal(50, 10, (SIZE, SIZE)).clip(0, 250)).astype(dt)
        hdus.append(fits.ImageHDU(img, header=fits.Header([("BAND", b), ("BUNIT", "adu"), ("MAGZP", 30.0),
                                                           ("PIXSCALE", PIX), ("PSFFWHM", 1.1)]), name=f"IMAGE_{b}"))
    raw = _astropy_file(hdus)
    _assert_same_reading(raw)
    c = read(raw)
    assert c.image.dtype == np.float32 and c.band_flags["g"] == ["var_derived", "var_sky_only"]


@pytest.mark.parametrize("variant", ["bzero", "bscale", "table", "compressed", "compressed_gzip_1",
                                     "compressed_gzip_2", "groups_like_primary_extname"])
def test_files_outside_the_plain_subset_are_left_to_astropy(variant):
    from astropy.io import fits

    from lens_assets.science.fits_contract import _scan_plain_hdus

    prim = fits.Header([("OBJID", "x"), ("RA", 1.0), ("DEC", 2.0), ("SURVEY", "des")])
    band = fits.Header([("BAND", "g"), ("BUNIT", "adu"), ("MAGZP", 30.0), ("PIXSCALE", PIX)])
    img = np.arange(SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    if variant == "bzero":  # unsigned 16-bit images are stored as int16 with BZERO = 32768
        hdus = [fits.PrimaryHDU(header=prim), fits.ImageHDU(img.astype(np.uint16), header=band, name="IMAGE_g")]
    elif variant == "bscale":
        hdu = fits.ImageHDU(img, header=band, name="IMAGE_g")
        hdu.scale("int16", bscale=0.5)
        hdus = [fits.PrimaryHDU(header=prim), hdu]
    elif variant == "table":
        hdus = [fits.PrimaryHDU(header=prim), fits.ImageHDU(img, header=band, name="IMAGE_g"),
                fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.ones(3))], name="EXTRA")]
    elif variant == "compressed":
        hdus = [fits.PrimaryHDU(header=prim), fits.CompImageHDU(img, header=band, name="IMAGE_g")]
    elif variant.startswith("compressed_gzip"):  # GZIP tiles pass the check of each tile's decompressed size
        hdus = [fits.PrimaryHDU(header=prim), fits.CompImageHDU(img, header=band, name="IMAGE_g",
                                                                compression_type=variant[11:].upper(),
                                                                tile_shape=(16, SIZE))]
    else:
        prim["EXTNAME"] = " PRIM"  # a leading blank is significant in FITS strings: astropy decides the name
        hdus = [fits.PrimaryHDU(header=prim), fits.ImageHDU(img, header=band, name="IMAGE_g")]
    raw = _astropy_file(hdus)
    assert _scan_plain_hdus(raw) is None
    c = read(raw)  # read through astropy: values as astropy gives them
    ref = fits.open(__import__("io").BytesIO(raw))["IMAGE_g"].data.astype(np.float32) * 10 ** (-0.4 * 7.5)
    np.testing.assert_allclose(c.image[idx("g")] * c.nmgy_per_unit[idx("g")], ref, rtol=1e-6)


def test_plain_reader_views_do_not_leak_into_the_cutout(tmp_path):
    """The scanner's arrays are read-only views of the file's bytes; the cutout's arrays are writable copies."""
    raw = make_file(tmp_path / "a.fits")
    c = read(raw)
    c.image[0, 0, 0] = 123.0
    assert read(raw).image[0, 0, 0] != 123.0


def test_scanner_remembers_header_layouts_but_checks_each_file(tmp_path):
    """What a header's structural cards say is remembered from file to file; the file's own length, its
    extension names and every header's cards are still checked each time."""
    from lens_assets.science.fits_reader import _LAYOUTS, _scan_plain_hdus

    raw = make_file(tmp_path / "a.fits")
    _LAYOUTS.clear()
    first, again = _scan_plain_hdus(raw), _scan_plain_hdus(raw)  # the second from remembered layouts
    assert _LAYOUTS
    assert [(k, h.fileinfo(), None if a is None else (a.dtype, a.shape)) for k, (h, a) in first[1].items()] == \
        [(k, h.fileinfo(), None if a is None else (a.dtype, a.shape)) for k, (h, a) in again[1].items()]
    assert _scan_plain_hdus(raw[:-2880]) is None  # the same headers, the last extension's data cut short
    i = raw.index(b"EXTNAME = 'VAR_g")
    assert _scan_plain_hdus(raw[:i] + b"EXTNAME = 'IMAGE_g'".ljust(80) + raw[i + 80:]) is None  # a name twice
    j = raw.index(b"BUNIT   =", i - i % 2880)
    assert _scan_plain_hdus(raw[:j] + b"BUNIT   =  'adu' junk".ljust(80) + raw[j + 80:]) is not None
    assert _scan_plain_hdus(raw[:j] + b"bunit   = 'adu'".ljust(80) + raw[j + 80:]) is None  # not a plain card
    assert read(raw).primary == read_cutout(raw, name="inbox/des/test.fits", survey=DES, fast_path=False).primary


def test_pair_id_comes_from_pairid_and_is_empty_without_it(tmp_path):
    from lens_assets.science.ingest import catalog_row

    make_file(tmp_path / "a.fits", objid="plain", seed=1)
    c = read_cutout((tmp_path / "a.fits").read_bytes(), name="a.fits", survey=DES)
    assert catalog_row(c, sha256="0" * 64, survey=DES)["pair_id"] == ""
    c.primary["PAIRID"] = " p-0007 "  # a lens/twin pair's shared id, as the contract hands it on
    assert catalog_row(c, sha256="0" * 64, survey=DES)["pair_id"] == "p-0007"
    cat = catalog_schema(DES).validate(ingest_files([tmp_path / "a.fits"], DES, root=tmp_path, workers=1,
                                                    progress=False).catalog)
    assert cat["pair_id"].tolist() == [""]


def test_pairid_in_a_file_reaches_the_catalog(tmp_path):
    make_file(tmp_path / "b.fits", objid="lens", seed=2, primary={"PAIRID": "p-0007", "SIMFAM": "lensing_only"})
    cat = ingest_files([tmp_path / "b.fits"], DES, root=tmp_path, workers=1, progress=False).catalog
    assert cat.loc[0, "pair_id"] == "p-0007" and cat.loc[0, "sim_family"] == "lensing_only"
