"""The FITS reader cannot be fooled: headers the plain-HDU scanner does not fully understand go to astropy or to
quarantine, and the fast path agrees with an astropy-only read."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
from astropy.io import fits

from lens_assets.science.fits_contract import (BandHDUs, QuarantineError, _image_hdu, _scan_plain_hdus, read_cutout,
                                               write_cutout)
from lens_assets.science.ingest import ingest_files
from lens_assets.science.surveys import get_survey

DES = get_survey("des")
SIZE = DES.cutout_size_px  # 64
PIX = 0.263


def noise_image(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (size, size)).astype(np.float32)


def band_header(band: str, **extra) -> fits.Header:
    return fits.Header([("BAND", band), ("BUNIT", "nanomaggy"), ("PIXSCALE", PIX), ("PSFFWHM", 1.0),
                        *extra.items()])


def astropy_file(primary: dict, *, images: dict | None = None, extra_hdus=(), primary_cards=()) -> bytes:
    """A des cutout written by astropy: ``images`` maps band -> image (default: noise in every band)."""
    header = fits.Header()
    for key, value in {"OBJID": "obj-1", "RA": 10.0, "DEC": -5.0, "SURVEY": "des", **primary}.items():
        header[key] = value
    for card in primary_cards:
        header.append(card)
    images = images if images is not None else {b: noise_image(i) for i, b in enumerate(DES.band_names)}
    hdus = [fits.PrimaryHDU(header=header)]
    hdus += [fits.ImageHDU(img, header=band_header(b), name=f"IMAGE_{b}") for b, img in images.items()]
    buf = io.BytesIO()
    fits.HDUList(hdus + list(extra_hdus)).writeto(buf)
    return buf.getvalue()


def read(data: bytes, **kw):
    return read_cutout(data, name="inbox/des/d/x.fits", survey=DES, **kw)


def replace_card(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with the 80-byte card that starts with ``old`` replaced by ``new`` (padded to 80)."""
    i = data.index(old)
    assert i % 80 == 0
    return data[:i] + new.ljust(80) + data[i + 80:]


# --------------------------------------------------------------------------- the three bugs of issue 11


def test_an_81_character_objid_astropy_writes_with_continue_reads_in_full(tmp_path):
    long_a, long_b = "J" + "0" * 67 + "a" * 13, "J" + "0" * 67 + "b" * 13  # 81 characters, equal for the first 68
    raw = astropy_file({"OBJID": long_a})
    assert b"CONTINUE" in raw and len(long_a) == 81
    assert read(raw).objid == long_a == fits.open(io.BytesIO(raw))[0].header["OBJID"]
    (tmp_path / "a.fits").write_bytes(raw)
    (tmp_path / "b.fits").write_bytes(astropy_file({"OBJID": long_b}))
    res = ingest_files(sorted(tmp_path.glob("*.fits")), DES, root=tmp_path, workers=1, progress=False)
    assert res.catalog["objid"].tolist() == [long_a, long_b] and res.quarantine.empty  # no false duplicate


@pytest.mark.parametrize("writer", ["astropy", "plain_bytes"])
def test_two_image_r_extensions_are_quarantined_as_duplicate_extension(tmp_path, writer):
    constant = np.full((SIZE, SIZE), 1e6, np.float32) + noise_image(9)
    if writer == "astropy":
        raw = astropy_file({}, extra_hdus=[fits.ImageHDU(constant, header=band_header("r"), name="IMAGE_r")])
    else:  # the contract writer's own bytes plus a second IMAGE_r: the layout the plain-HDU scanner reads
        path = tmp_path / "x.fits"
        write_cutout(path, {"OBJID": "obj-1", "RA": 10.0, "DEC": -5.0, "SURVEY": "des"},
                     {b: BandHDUs(image=noise_image(i), header={"BUNIT": "nanomaggy", "PIXSCALE": PIX,
                                                                "PSFFWHM": 1.0})
                      for i, b in enumerate(DES.band_names)})
        raw = path.read_bytes() + _image_hdu("IMAGE_r", constant, [("BAND", "r"), ("BUNIT", "nanomaggy"),
                                                                    ("PIXSCALE", PIX)])
    with pytest.raises(QuarantineError, match=r"x\.fits: HDUs 2 and 6 are both named 'IMAGE_R'") as err:
        read(raw)
    assert err.value.reason == "duplicate_extension" and err.value.objid == "obj-1"


def test_two_extensions_declaring_the_same_band_are_quarantined_as_duplicate_extension():
    other = fits.ImageHDU(noise_image(7), header=band_header("r"), name="IMAGE_X")  # BAND = 'r' under another name
    with pytest.raises(QuarantineError, match=r"IMAGE_R and IMAGE_X both hold band 'r'") as err:
        read(astropy_file({}, extra_hdus=[other]))
    assert err.value.reason == "duplicate_extension"


@pytest.mark.parametrize("value,counts", [(np.inf, "0 NaN, 4096 +inf, 0 -inf"), (-np.inf, "0 NaN, 0 +inf, 4096 -inf")])
def test_infinite_pixels_are_reported_as_non_finite_not_nan(value, counts):
    images = {b: noise_image(i) for i, b in enumerate(DES.band_names)}
    images["g"] = np.full((SIZE, SIZE), value, np.float32)
    with pytest.raises(QuarantineError) as err:
        read(astropy_file({}, images=images))
    assert err.value.reason == "mostly_nan"
    assert err.value.message == (f"inbox/des/d/x.fits: IMAGE_g is 100% non-finite ({counts} of 4096 pixels; "
                                 f"more than 50% non-finite)")


def test_a_band_with_a_few_infinite_pixels_is_masked_as_nan_pixels_are():
    images = {b: noise_image(i) for i, b in enumerate(DES.band_names)}
    images["i"][3, :5] = [np.inf, -np.inf, np.nan, np.inf, 1.0]
    c = read(astropy_file({}, images=images))
    k = DES.band_names.index("i")
    assert c.nan_mask[k].sum() == 4 and c.nan_mask[k, 3, :4].all() and np.isfinite(c.image).all()
    assert "nan_masked" in c.band_flags["i"]


# --------------------------------------------------------------------------- headers the scanner hands to astropy


def _astropy_value(raw: bytes, key: str, hdu: int = 0):
    return fits.open(io.BytesIO(raw))[hdu].header[key]


def test_hierarch_card_naming_a_contract_keyword_is_read_as_astropy_reads_it():
    raw = astropy_file({}, primary_cards=[fits.Card("HIERARCH Z_PHOT", 0.75)])
    assert b"HIERARCH Z_PHOT" in raw and _scan_plain_hdus(raw) is None
    assert read(raw).primary["Z_PHOT"] == 0.75 == _astropy_value(raw, "Z_PHOT")


def test_hierarch_repeat_of_a_contract_keyword_is_duplicate_keyword():
    raw = astropy_file({}, primary_cards=[fits.Card("HIERARCH RA", 11.0)])
    with pytest.raises(QuarantineError, match=r"primary header: RA is given more than once") as err:
        read(raw)
    assert err.value.reason == "duplicate_keyword" and err.value.objid == "obj-1"


def test_a_repeated_contract_keyword_in_a_plain_header_is_duplicate_keyword():
    raw = replace_card(astropy_file({}), b"SURVEY  =", b"RA      =                 11.0")
    with pytest.raises(QuarantineError, match=r"primary header: RA is given more than once") as err:
        read(raw)
    assert err.value.reason == "duplicate_keyword"


@pytest.mark.parametrize("card", [b"RA      = 10.0 deg", b"RA      = 1.0.0", b"RA      = 'ten"])
def test_an_unparsable_value_is_bad_header_value_naming_the_card(card):
    raw = replace_card(astropy_file({}), b"RA      =", card)
    with pytest.raises(QuarantineError, match=r"x\.fits: primary header: RA: card .* cannot be parsed") as err:
        read(raw)
    assert err.value.reason == "bad_header_value" and err.value.objid == ""


@pytest.mark.parametrize("odd", ["lowercase", "no_value_indicator", "short_key_indicator", "end_text", "end_nul",
                                 "after_end"])
def test_odd_card_layouts_are_read_as_astropy_reads_them(odd):
    raw = astropy_file({"Z_SPEC": 0.5})
    if odd == "lowercase":
        raw = replace_card(raw, b"Z_SPEC  =", b"z_spec  =                  0.5")
    elif odd == "no_value_indicator":
        raw = replace_card(raw, b"Z_SPEC  =", b"Z_SPEC     0.5")
    elif odd == "short_key_indicator":
        raw = replace_card(raw, b"Z_SPEC  =", b"Z_SPEC= 0.5")
    else:
        end = raw.index(b"END" + b" " * 77)
        if odd == "end_text":
            raw = raw[:end] + b"END     junk".ljust(80) + raw[end + 80:]
        elif odd == "end_nul":
            raw = raw[:end + 80] + b"\0" * 80 + raw[end + 160:]
        else:
            raw = raw[:end + 80] + b"COMMENT after END".ljust(80) + raw[end + 160:]
    try:
        expected = ("value", _astropy_value(raw, "Z_SPEC"))
    except KeyError:
        expected = ("absent", None)
    c = read(raw)
    assert (("value", c.primary["Z_SPEC"]) if "Z_SPEC" in c.primary else ("absent", None)) == expected
    assert _scan_plain_hdus(raw) is None  # the scanner handed it to astropy


def test_a_wcs_pixel_scale_outside_the_pixscale_range_is_bad_header_value():
    images = {b: noise_image(i) for i, b in enumerate(DES.band_names)}
    header = fits.Header()
    for k, v in {"OBJID": "w", "RA": 1.0, "DEC": 2.0, "SURVEY": "des"}.items():
        header[k] = v
    wcs = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 32.0, "CRPIX2": 32.0, "CRVAL1": 1.0,
           "CRVAL2": 2.0, "CD1_1": 1e-30, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 1e-30}  # 3.6e-27"/px
    hdus = [fits.PrimaryHDU(header=header)]
    for b, img in images.items():
        hdus.append(fits.ImageHDU(img, header=fits.Header([("BAND", b), ("BUNIT", "nanomaggy"), *wcs.items()]),
                                  name=f"IMAGE_{b}"))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    with pytest.raises(QuarantineError,
                       match=r"IMAGE_g: WCS pixel scale = 3\.6\d*e-27 is outside \[1e-06, 3600\.0\]") as err:
        read(buf.getvalue())
    assert err.value.reason == "bad_header_value"


def test_a_non_ascii_header_byte_is_quarantined_not_read_as_a_question_mark():
    raw = bytearray(astropy_file({"OBJID": "obj-1"}))
    raw[raw.index(b"'obj-1") + 5] = 0xB1  # astropy would read OBJID 'obj-?'
    assert _astropy_value(bytes(raw), "OBJID") == "obj-?"
    with pytest.raises(QuarantineError, match=r"x\.fits: a header holds non-ASCII byte 0xb1 at offset \d+") as err:
        read(bytes(raw))
    assert err.value.reason == "non_ascii_header"


def test_absurd_axis_lengths_do_not_overflow_the_scanner():
    raw = astropy_file({})
    i = raw.index(b"NAXIS1  =", 2880)
    raw = raw[:i] + b"NAXIS1  = 9223372036854775807".ljust(80) + raw[i + 80:]
    assert _scan_plain_hdus(raw) is None
    with pytest.raises(QuarantineError) as err:
        read(raw)
    assert err.value.reason in ("truncated", "unreadable")


def test_fast_path_false_reads_through_astropy_and_agrees_on_a_plain_file():
    raw = astropy_file({"OBJID": "o'brien", "Z_PHOT": 1.5e-2})
    assert _scan_plain_hdus(raw) is not None
    fast, slow = read(raw), read(raw, fast_path=False)
    assert fast.primary == slow.primary and fast.objid == slow.objid == "o'brien"
    np.testing.assert_array_equal(fast.image, slow.image)
    assert math.isclose(fast.primary["Z_PHOT"], 0.015)


# --------------------------------------------------------------------------- differential fuzz: fast path vs astropy

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lens_assets.science.fits_contract import BAND_KEYWORDS, PRIMARY_KEYWORDS  # noqa: E402

# keywords astropy manages itself (structure, scaling, the extension name) are not drawn
_MANAGED = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "EXTNAME",
            "EXTVER", "EXTLEVEL", "GROUPS", "BSCALE", "BZERO", "BLANK", "END", "CONTINUE", "HIERARCH", "COMMENT",
            "HISTORY", "ZIMAGE", "THEAP", "CHECKSUM", "DATASUM"}
_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_contract_key = st.sampled_from(sorted(set(PRIMARY_KEYWORDS) | set(BAND_KEYWORDS)))
_free_key = st.from_regex(r"[A-Z][A-Z0-9_-]{0,7}", fullmatch=True).filter(lambda k: k not in _MANAGED)
_string = st.one_of(st.text(_PRINTABLE, max_size=12), st.text(_PRINTABLE, min_size=60, max_size=140),
                    st.sampled_from(["o'brien", "''", "a/b", "&", "x&", "AXIS.1: 1", " lead", "trail   "]))
_number = st.one_of(st.integers(-10**12, 10**12), st.booleans(),
                    st.floats(allow_nan=False, allow_infinity=False, width=64),
                    st.floats(-1e3, 1e3, allow_nan=False))


@st.composite
def _card(draw):
    """One header card astropy writes: a plain keyword (maybe a contract one) with a str/int/float/bool value,
    a D-exponent float, a HIERARCH keyword, or a COMMENT/HISTORY/blank card."""
    kind = draw(st.sampled_from(["plain"] * 4 + ["contract", "d_float", "d_float", "hierarch", "hierarch",
                                                 "commentary", "commentary"]))
    if kind == "commentary":
        return fits.Card(draw(st.sampled_from(["COMMENT", "HISTORY", ""])), draw(st.text(_PRINTABLE, max_size=90)))
    value = draw(st.one_of(_string, _number))
    if kind == "d_float":
        mant, exp = draw(st.floats(-99.0, 99.0, allow_nan=False)), draw(st.integers(-30, 30))
        return fits.Card.fromstring(f"{draw(_free_key):<8}= {f'{mant:.6f}D{exp:+03d}':>20} / D exponent")
    if kind == "hierarch":
        name = draw(st.one_of(_contract_key, st.from_regex(r"[A-Za-z][A-Za-z0-9 ]{8,20}[A-Za-z0-9]", fullmatch=True)))
        return fits.Card(f"HIERARCH {name}", value if not isinstance(value, str) else value[:40])
    return fits.Card(draw(_contract_key if kind == "contract" else _free_key), value)


@st.composite
def _cutout_file(draw) -> bytes:
    """A des cutout written by astropy with drawn extra cards in every header and small drawn images."""
    size = draw(st.sampled_from([40, 48, 64, 24]))  # 24 px is under min_cutout_arcsec: too_small
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    primary = fits.Header([("OBJID", draw(st.one_of(st.text(_PRINTABLE, min_size=1, max_size=100),
                                                       st.integers(0, 10**9)))),
                           ("RA", draw(st.one_of(st.floats(0.0, 360.0), st.floats(-10.0, 370.0)))),
                           ("DEC", draw(st.one_of(st.floats(-90.0, 90.0), st.floats(-95.0, 95.0)))),
                           ("SURVEY", draw(st.sampled_from(["des"] * 8 + ["DES ", "hsc"])))])
    for card in draw(st.lists(_card(), max_size=8)):
        primary.append(card, useblanks=False, bottom=True)
    hdus = [fits.PrimaryHDU(header=primary)]
    bands = draw(st.lists(st.sampled_from(list(DES.band_names)), min_size=1, max_size=5, unique=True))
    for band in bands:
        dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.int16, np.int32]))
        image = rng.normal(100.0, 10.0, (size, size))
        if draw(st.integers(0, 3)) == 0:
            image.flat[rng.choice(image.size, draw(st.integers(1, image.size)), replace=False)] = \
                draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        if np.dtype(dtype).kind == "i":
            image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
        header = fits.Header([("BAND", band),
                              ("BUNIT", draw(st.sampled_from(["nanomaggy"] * 8 + ["count/s", "Jy"]))),
                              ("MAGZP", 30.0), ("PIXSCALE", draw(st.sampled_from([PIX] * 12 + [0.3])))])
        for card in draw(st.lists(_card(), max_size=4)):
            header.append(card, useblanks=False, bottom=True)
        hdus.append(fits.ImageHDU(image.astype(dtype), header=header, name=f"IMAGE_{band}"))
        if draw(st.booleans()):
            hdus.append(fits.ImageHDU(np.ones((size, size), np.float32), name=f"VAR_{band}"))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HIERARCH and long-string notes
        fits.HDUList(hdus).writeto(buf, output_verify="ignore")
    return _FitsBytes(buf.getvalue())


class _FitsBytes(bytes):
    """A drawn file; a failing example prints its header cards, not its pixels."""

    def __repr__(self) -> str:
        with fits.open(io.BytesIO(self)) as hdul:
            return "<FITS file; headers:\n" + "\n---\n".join(h.header.tostring(sep="\n").rstrip() for h in hdul) + ">"


def _outcome(raw: bytes, *, fast_path: bool):
    try:
        return read(raw, fast_path=fast_path)
    except QuarantineError as err:
        return err


def _assert_agrees_with_astropy(c, raw: bytes):
    """The cutout's OBJID, position and pixels are astropy's."""
    with fits.open(io.BytesIO(raw)) as hdul:
        assert c.objid == str(hdul[0].header["OBJID"]).strip()
        assert c.ra == float(hdul[0].header["RA"]) % 360.0 and c.dec == float(hdul[0].header["DEC"])
        for k, band in enumerate(c.bands):
            if "missing" in c.band_flags.get(band, ()):
                continue
            ref = hdul[f"IMAGE_{band}"].data.astype(np.float32)
            ok = ~c.nan_mask[k]
            np.testing.assert_array_equal(c.image[k][ok], ref[ok])
            assert not np.isfinite(ref[c.nan_mask[k]]).any() or f"VAR_{band}" in hdul


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_cutout_file())
def test_fast_path_agrees_with_astropy_or_both_quarantine(raw):
    fast, slow = _outcome(raw, fast_path=True), _outcome(raw, fast_path=False)  # any other exception fails
    event(f"scanner {'took' if _scan_plain_hdus(raw) is not None else 'left'} it; "
          f"{fast.reason if isinstance(fast, QuarantineError) else 'read'}")
    if isinstance(fast, QuarantineError) or isinstance(slow, QuarantineError):
        assert isinstance(fast, QuarantineError) and isinstance(slow, QuarantineError), (fast, slow)
        assert (fast.reason, fast.objid) == (slow.reason, slow.objid), (fast.message, slow.message)
        return
    assert fast.objid == slow.objid and fast.primary == slow.primary
    assert fast.band_flags == slow.band_flags and fast.pixel_scale_arcsec == slow.pixel_scale_arcsec
    for attr in ("image", "variance", "nan_mask", "psf_fwhm_arcsec", "nmgy_per_unit"):
        np.testing.assert_array_equal(getattr(fast, attr), getattr(slow, attr), err_msg=attr)
    _assert_agrees_with_astropy(fast, raw)
