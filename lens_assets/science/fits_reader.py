"""Reading survey cutout FITS files: bytes to header values and arrays, then :func:`.fits_validation.validate_cutout`.

Files made only of plain image HDUs are parsed straight from their bytes
(:func:`_scan_plain_hdus`, :func:`_cards`); anything else is opened with astropy,
whose errors and warnings become the quarantine reason of a broken file.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np

from .fits_validation import (BAND_KEYWORDS, FITS_BLOCK, PRIMARY_KEYWORDS, Cutout, QuarantineError,
                              validate_cutout)
from .surveys import SurveySpec

__all__ = ["read_cutout"]


class _PlainHDU:
    """One uncompressed, unscaled image HDU located by :func:`_scan_plain_hdus` (the parts of astropy's
    ``ImageHDU`` the reader uses: ``fileinfo()`` and a ``header`` parsed on demand)."""

    __slots__ = ("_raw", "_info")

    def __init__(self, raw: bytes, hdr_loc: int, dat_loc: int):
        self._raw, self._info = raw, {"hdrLoc": hdr_loc, "datLoc": dat_loc}

    def fileinfo(self) -> dict:
        return self._info

    @property
    def header(self):
        from astropy.io import fits

        return fits.Header.fromstring(self._raw[self._info["hdrLoc"]:self._info["datLoc"]].decode("ascii"))


_STRUCTURE_KEYS = ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "GROUPS", "EXTNAME")
_SCALING_KEYS = ("BSCALE", "BZERO", "BLANK", "ZIMAGE", "THEAP")
_BITPIX_DTYPE = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def _scan_plain_hdus(data: bytes) -> tuple[_PlainHDU, dict] | None:
    """``(primary HDU, {EXTNAME: (hdu, array)})`` for a file made only of plain image HDUs, read straight
    from the bytes.

    astropy builds a full ``Header`` and HDU object per extension and that is most
    of the cost of reading a 16-extension cutout. Files of uncompressed images
    without scaling keywords (``BSCALE``, ``BZERO``, ``BLANK``) are laid out
    exactly by the FITS standard: 2880-byte header blocks up to ``END``, then
    ``|BITPIX|/8 * prod(NAXISn)`` big-endian bytes padded to a block. Anything
    else (tables, random groups, compressed or scaled images, a length that is
    not whole blocks) returns ``None`` and the caller uses astropy, which also
    words the error for a broken file. Arrays are read-only views of ``data``.
    """
    if len(data) % FITS_BLOCK:
        return None
    out: dict = {}
    primary = None
    pos, first = 0, True
    while pos < len(data):
        keys: dict[str, str] = {}
        hdr_loc, end = pos, None
        while end is None:
            if pos + FITS_BLOCK > len(data):
                return None
            block = data[pos:pos + FITS_BLOCK].decode("ascii", errors="replace")
            pos += FITS_BLOCK
            for i in range(0, FITS_BLOCK, 80):
                card = block[i:i + 80]
                key = card[:8].rstrip()
                if key == "END":
                    end = pos
                    break
                if card[8:10] == "= " and (key in _STRUCTURE_KEYS or key.startswith("NAXIS") or key in _SCALING_KEYS):
                    if key in keys:
                        return None  # a repeated structural keyword: let astropy decide what it means
                    keys[key] = card
        if any(k in keys for k in _SCALING_KEYS):
            return None
        try:
            if first:
                if _card_value(keys["SIMPLE"]) is not True or "GROUPS" in keys:
                    return None
            elif _card_value(keys["XTENSION"]) != "IMAGE" or _card_value(keys.get("PCOUNT", "PCOUNT  = 0")) != 0 \
                    or _card_value(keys.get("GCOUNT", "GCOUNT  = 1")) != 1:
                return None
            dtype = _BITPIX_DTYPE.get(_card_value(keys["BITPIX"]))
            naxis = _card_value(keys["NAXIS"])
            shape = tuple(_card_value(keys[f"NAXIS{j}"]) for j in range(naxis, 0, -1))
            name = _card_value(keys["EXTNAME"]) if "EXTNAME" in keys else ("PRIMARY" if first else "")
        except (KeyError, TypeError, ValueError):
            return None
        if dtype is None or not all(isinstance(n, int) and n >= 0 for n in shape) or not isinstance(name, str) \
                or name != name.strip():
            return None
        count = int(np.prod(shape)) if shape else 0
        nbytes = count * np.dtype(dtype).itemsize
        if end + nbytes > len(data):
            return None
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape) if count else None
        hdu = _PlainHDU(data, hdr_loc, end)
        primary = primary or hdu
        out[name.upper()] = (hdu, arr)
        pos = end + -(-nbytes // FITS_BLOCK) * FITS_BLOCK
        first = False
    return primary, out


def _open(data: bytes, name: str):
    if not data.startswith(b"SIMPLE  ="):
        raise QuarantineError("unreadable", f"{name}: not a FITS file (first bytes {data[:16]!r})")
    plain = _scan_plain_hdus(data)
    if plain is not None:
        return _cards(plain[0], data, PRIMARY_KEYWORDS), plain[1]
    return _open_with_astropy(data, name)


def _open_with_astropy(data: bytes, name: str):
    """Any FITS file astropy reads (scaled or compressed images, tables beside the images); its
    exceptions and warnings become the quarantine reason of a broken file."""
    from astropy.io import fits

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False)
            arrays = {h.name.upper(): (h, h.data) for h in hdul}  # arrays are copied once, to float32
            primary = _cards(hdul[0], data, PRIMARY_KEYWORDS)
        except Exception as err:  # astropy raises many types for corrupt input; report the message
            if _cut_short(data, caught):
                raise QuarantineError("truncated", f"{name}: file length {len(data)} bytes is shorter than its "
                                                   f"headers say; it was cut short ({type(err).__name__}: "
                                                   f"{err})") from None
            raise QuarantineError("unreadable", f"{name}: astropy cannot read it ({type(err).__name__}: "
                                                f"{err})") from None
    if _cut_short(data, caught):
        raise QuarantineError("truncated", f"{name}: file length {len(data)} bytes is shorter than its headers "
                                           f"say (or not a whole number of {FITS_BLOCK}-byte blocks); it was "
                                           f"cut short")
    return primary, arrays


_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([ED][+-]?\d+)?$")


def _card_value(card: str):
    """Value of one 80-character card image: FITS fixed/free format for str, bool, int and float.

    Anything else (complex values, odd layouts) is handed to astropy's parser.
    """
    text = card[10:]
    stripped = text.lstrip()
    if stripped.startswith("'"):
        out, i = [], 1
        while i < len(stripped):
            ch = stripped[i]
            if ch == "'":
                if stripped[i + 1:i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                return "".join(out).rstrip()
            out.append(ch)
            i += 1
    else:
        token = stripped.split("/", 1)[0].strip()
        if token in ("T", "F"):
            return token == "T"
        if _INT.match(token):
            return int(token)
        if _FLOAT.match(token.upper()):
            return float(token.upper().replace("D", "E"))
    from astropy.io import fits

    return fits.Card.fromstring(card).value


def _cards(hdu, raw: bytes, keywords: tuple[str, ...]) -> dict:
    """The values of ``keywords`` in ``hdu``'s header, parsed from the file's own card images.

    astropy re-parses a card's value on every access, and that dominates reading
    a cutout; the contract's keywords are plain values, read straight from the
    header block (``fileinfo`` gives its byte range).
    """
    info = hdu.fileinfo()
    block = raw[info["hdrLoc"]:info["datLoc"]].decode("ascii", errors="replace")
    wanted, out = set(keywords), {}
    for i in range(0, len(block) - 79, 80):
        card = block[i:i + 80]
        key = card[:8].rstrip()
        if key == "END":
            break
        if key in wanted and card[8:10] == "= " and key not in out:
            out[key] = _card_value(card)
    return out


def _cut_short(data: bytes, caught) -> bool:
    return len(data) % FITS_BLOCK != 0 or any("truncated" in str(w.message) for w in caught)


def read_cutout(data: bytes, *, name: str, survey: SurveySpec) -> Cutout:
    """Validate one file's bytes against the contract for ``survey``.

    ``name`` is how errors name the file (e.g. ``raw/des/sim-0/x.fits``).
    Raises :class:`QuarantineError`; returns a :class:`Cutout` otherwise.
    """
    primary, arrays = _open(data, name)
    return validate_cutout(primary, arrays, name=name, survey=survey,
                           band_header=lambda hdu: _cards(hdu, data, BAND_KEYWORDS))
