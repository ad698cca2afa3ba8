"""Reading survey cutout FITS files: bytes to header values and arrays, then :func:`.fits_validation.validate_cutout`.

Files made only of plain image HDUs are parsed straight from their bytes
(:func:`_scan_plain_hdus`, :func:`_cards`); anything else is opened with astropy,
whose errors and warnings become the quarantine reason of a broken file.
"""

from __future__ import annotations

import io
import math
import re
import warnings
import zlib

import numpy as np

from . import fits_validation
from .fits_validation import (BAND_KEYWORDS, FITS_BLOCK, PRIMARY_KEYWORDS, Cutout, QuarantineError,
                              validate_cutout)
from .surveys import SurveySpec

__all__ = ["read_cutout", "gunzip"]


class _PlainHDU:
    """One uncompressed, unscaled image HDU located by :func:`_scan_plain_hdus` (the parts of astropy's
    ``ImageHDU`` the reader uses: ``fileinfo()`` and a ``header`` parsed on demand), with the text of its
    cards before ``END`` as the scanner checked them."""

    __slots__ = ("_raw", "_hdr_loc", "_dat_loc", "name", "text")

    def __init__(self, raw: bytes, hdr_loc: int, dat_loc: int, name: str = "", text: str | None = None):
        self._raw, self._hdr_loc, self._dat_loc, self.name, self.text = raw, hdr_loc, dat_loc, name, text

    def fileinfo(self) -> dict:
        return {"hdrLoc": self._hdr_loc, "datLoc": self._dat_loc}

    @property
    def header(self):
        from astropy.io import fits

        return fits.Header.fromstring(self._raw[self._hdr_loc:self._dat_loc].decode("ascii"))


_STRUCTURE_KEYS = ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "GROUPS", "EXTNAME")
_SCALING_KEYS = ("BSCALE", "BZERO", "BLANK", "ZIMAGE", "THEAP")
_BITPIX_DTYPE = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
# the cards a plain header may hold before END, on the file's bytes: a standard keyword (left-justified in
# columns 1-8, value indicator in 9-10) or a commentary card, printable ASCII throughout, none keyed END.
# Matched from a header's start, it stops at the first card that is not plain or is keyed END (which must
# then be the END card itself).
_PLAIN_HEADER = re.compile(rb"(?:(?!END {5})(?:(?!CONTINUE|HIERARCH)(?=[A-Z0-9_-]{1,8} *= )[A-Z0-9_ -]{8}= "
                           rb"[ -~]{70}|(?:COMMENT |HISTORY | {8})[ -~]{72}))*")
# over the text of plain cards, one match per card: the card when it holds a structural or scaling keyword
# (a keyword of _STRUCTURE_KEYS or _SCALING_KEYS, or NAXISn), "" otherwise. A plain card is a keyword card
# (keyword and blanks in columns 1-8, "= " in 9-10) or a commentary card, so either branch takes 80 characters.
_STRUCTURAL_CARDS = re.compile("((?:" + "|".join(k + "[A-Z0-9_-]*" if k == "NAXIS" else k
                                                 for k in _STRUCTURE_KEYS + _SCALING_KEYS) + ") *= .{70})|.{80}",
                               re.S)
# the same, for every keyword card: (card, keyword), or ("", "") for a commentary card
_KEYWORD_CARDS = re.compile(r"(([A-Z0-9_-]{1,8}) *= .{70})|.{80}", re.S)
_END_CARD = "END" + " " * 77
_END_CARD_BYTES = _END_CARD.encode("ascii")
_LAYOUTS: dict = {}  # (first HDU?, structural cards) -> _layout(...), for headers parsed without astropy
_MAX_LAYOUTS = 1024


def _scan_plain_hdus(data: bytes) -> tuple[_PlainHDU, dict] | None:
    """``(primary HDU, {EXTNAME: (hdu, array)})`` for a file made only of plain image HDUs with plain
    headers, read straight from the bytes.

    astropy builds a full ``Header`` and HDU object per extension and that is most
    of the cost of reading a 16-extension cutout. Files of uncompressed images
    without scaling keywords (``BSCALE``, ``BZERO``, ``BLANK``) are laid out
    exactly by the FITS standard: 2880-byte header blocks up to ``END``, then
    ``|BITPIX|/8 * prod(NAXISn)`` big-endian bytes padded to a block.

    A header is plain when every card before ``END`` is a commentary card
    (``COMMENT``, ``HISTORY``, blank keyword) or a standard keyword (``A-Z 0-9 _ -``,
    left-justified) with the value indicator ``= `` in columns 9-10; the ``END``
    card is ``END`` and blanks, and blank cards fill the rest of its block; every
    byte is printable ASCII. Anything else returns ``None`` and the caller uses
    astropy, which also words the error for a broken file: tables, random groups,
    compressed or scaled images, a length that is not whole blocks, ``CONTINUE``
    long strings, ``HIERARCH`` keywords, lower-case or misplaced keywords, odd
    ``END`` padding, non-ASCII bytes, a repeated structural keyword or two
    extensions with the same ``EXTNAME``. Arrays are read-only views of ``data``.

    Each header is checked by one regular-expression match over its cards, its
    structural cards are picked out by one ``findall``, and what they say (dtype,
    shape, name) is remembered by their text: a survey's files repeat them.
    """
    size = len(data)
    if size % FITS_BLOCK:
        return None
    out: dict = {}
    primary = None
    pos, first = 0, True
    while pos < size:
        hdr_loc = pos
        cards_end = _PLAIN_HEADER.match(data, pos).end()  # the cards before END, all plain
        if not data.startswith(_END_CARD_BYTES, cards_end):
            return None  # a card that is not plain, an END card with text, or no END before the file ends
        after = cards_end + 80
        end = after + (hdr_loc - after) % FITS_BLOCK  # the END card's block ends the header
        if data.count(b" ", after, end) != end - after:  # rare: anything but spaces after END
            try:
                rest = data[after:end].decode("ascii")
            except UnicodeDecodeError:
                return None
            if rest.strip():
                return None  # cards after END: let astropy decide
        text = data[hdr_loc:cards_end].decode("ascii")
        key = (first, *filter(None, _STRUCTURAL_CARDS.findall(text)))
        layout = _LAYOUTS.get(key, _MISSING)
        if layout is _MISSING:
            layout = _layout(key[1:], first=first)
            if all(card in _VALUES for card in key[1:]):  # no value needed astropy: the same cards, the same answer
                if len(_LAYOUTS) >= _MAX_LAYOUTS:
                    _LAYOUTS.clear()
                _LAYOUTS[key] = layout
        if layout is None:
            return None
        dtype, shape, nbytes, name = layout
        if (name and name.upper() in out) or end + nbytes > size:
            return None
        arr = np.ndarray(shape, dtype, buffer=data, offset=end) if nbytes else None
        hdu = _PlainHDU(data, hdr_loc, end, name, text)
        primary = primary or hdu
        out[name.upper()] = (hdu, arr)
        pos = end + -(-nbytes // FITS_BLOCK) * FITS_BLOCK
        first = False
    return primary, out


_MISSING = object()


def _layout(cards: tuple[str, ...], *, first: bool) -> tuple | None:
    """``(dtype, shape, nbytes, name)`` of a plain image HDU from its structural cards (in header order), or
    ``None`` when they do not describe one: a repeated structural keyword, a scaling keyword, a primary HDU
    that is not ``SIMPLE = T`` or has random groups, an extension that is not a plain ``IMAGE``, a ``BITPIX``,
    ``NAXIS`` or ``NAXISn`` out of the standard, an ``EXTNAME`` with blanks around it."""
    keys: dict[str, str] = {}
    for card in cards:
        key = card[:8].rstrip()
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
        if not isinstance(naxis, int) or not 0 <= naxis <= 999:
            return None
        shape = tuple(_card_value(keys[f"NAXIS{j}"]) for j in range(naxis, 0, -1))
        name = _card_value(keys["EXTNAME"]) if "EXTNAME" in keys else ("PRIMARY" if first else "")
    except (KeyError, TypeError, ValueError, QuarantineError):
        return None
    if dtype is None or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape) \
            or not isinstance(name, str) or name != name.strip():
        return None
    dtype = np.dtype(dtype)
    count = math.prod(shape) if shape else 0  # Python integers: no overflow on absurd NAXISn
    return dtype, shape, count * dtype.itemsize, name


def _open(data: bytes, name: str, *, fast_path: bool = True):
    """``(primary values, {EXTNAME: (hdu, array)}, band_header)``; ``band_header(hdu)`` gives the values of
    :data:`BAND_KEYWORDS` in an image extension's header."""
    if not data.startswith(b"SIMPLE  ="):
        raise QuarantineError("unreadable", f"{name}: not a FITS file (first bytes {data[:16]!r})")
    plain = _scan_plain_hdus(data) if fast_path else None
    if plain is not None:
        primary = _cards(plain[0], data, PRIMARY_KEYWORDS, where=f"{name}: primary header")
        return primary, plain[1], lambda hdu: _cards(hdu, data, BAND_KEYWORDS, where=f"{name}: {hdu.name}")
    return _open_with_astropy(data, name)


def _open_with_astropy(data: bytes, name: str):
    """Any FITS file astropy reads (scaled or compressed images, tables beside the images, long strings,
    ``HIERARCH`` keywords); its exceptions and warnings become the quarantine reason of a broken file."""
    from astropy.io import fits

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False)
            hdus = [(h.name.upper(), h) for h in hdul]
            _check_declared_size(hdul, data, name)  # before .data: a tile-compressed image is decompressed there
            arrays = {ext: (h, h.data) for ext, h in hdus}  # arrays are copied once, to float32
        except QuarantineError:
            raise
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
    if any("non-ASCII characters" in str(w.message) for w in caught):
        offset, byte = _first_non_ascii(data, hdul)
        raise QuarantineError("non_ascii_header", f"{name}: a header holds non-ASCII byte 0x{byte:02x} at offset "
                                                  f"{offset}; FITS headers are ASCII (astropy would read it as '?')")
    primary = _header_values(hdul[0].header, PRIMARY_KEYWORDS, where=f"{name}: primary header")
    _check_unique_names([ext for ext, _ in hdus], name, objid=_objid_text(primary))
    return primary, arrays, lambda hdu: _header_values(hdu.header, BAND_KEYWORDS, where=f"{name}: {hdu.name}")


def _check_declared_size(hdul, data: bytes, name: str) -> None:
    """``too_large`` when the tile-compressed images' headers declare more than :data:`MAX_FILE_BYTES` of pixels
    in all. (An uncompressed HDU's data lie within the file's bytes, or the file is ``truncated``.)"""
    from astropy.io import fits

    declared = 0
    for h in hdul:
        if isinstance(h, fits.CompImageHDU) and h.header.get("NAXIS", 0):
            declared += abs(int(h.header.get("BITPIX", 8))) // 8 * math.prod(
                int(h.header.get(f"NAXIS{j}", 0)) for j in range(1, int(h.header["NAXIS"]) + 1))
    limit = fits_validation.MAX_FILE_BYTES
    if declared > limit:
        raise QuarantineError("too_large", f"{name}: its images declare {declared:,} bytes of pixels, more than "
                                           f"{limit:,} (MAX_FILE_BYTES)")
    if any(isinstance(h, fits.CompImageHDU) and str(h.compression_type).upper().startswith("GZIP") for h in hdul):
        _check_gzip_tiles(data, name)


_TILE_COLUMNS = ("COMPRESSED_DATA", "GZIP_COMPRESSED_DATA")  # the second: tiles that could not be quantized


def _check_gzip_tiles(data: bytes, name: str) -> None:
    """``unreadable`` when a GZIP tile of a tile-compressed image decompresses past the bytes its tile holds.

    astropy decompresses each GZIP tile whole and only then compares it with the tile's shape, so a tile of a
    small declared image can expand without bound; here each is decompressed at most one byte past its bound,
    from the compressed table as stored (``disable_image_compression``), before astropy decodes any."""
    from astropy.io import fits

    with fits.open(io.BytesIO(data), memmap=False, disable_image_compression=True) as raw:
        for i, h in enumerate(raw):
            if not (h.header.get("ZIMAGE") and str(h.header.get("ZCMPTYPE", "")).upper().startswith("GZIP")):
                continue
            # ZTILE1 defaults to the row (ZNAXIS1), the others to 1 (the tiled-image convention)
            tile = math.prod(int(h.header.get(f"ZTILE{j}", h.header.get("ZNAXIS1", 1) if j == 1 else 1))
                             for j in range(1, int(h.header.get("ZNAXIS", 0)) + 1))
            bound = tile * max(4, abs(int(h.header.get("ZBITPIX", 8))) // 8)  # quantized floats: 4-byte integers
            for column in (c for c in _TILE_COLUMNS if c in h.columns.names):
                for k, cell in enumerate(h.data[column]):
                    out = zlib.decompressobj(zlib.MAX_WBITS | 32).decompress(bytes(cell), bound + 1)
                    if len(out) > bound:
                        raise QuarantineError("unreadable", f"{name}: HDU {i} ({h.name}): GZIP tile {k} "
                                                            f"decompresses past the {bound:,} bytes of its "
                                                            f"{tile:,}-pixel tile; the file is corrupt")


def _first_non_ascii(data: bytes, hdul) -> tuple[int, int]:
    """``(offset, byte)`` of the first byte over 0x7f in a header of ``hdul``."""
    for h in hdul:
        info = h.fileinfo()
        match = re.search(rb"[\x80-\xff]", data[info["hdrLoc"]:info["datLoc"]])
        if match:
            return info["hdrLoc"] + match.start(), match.group()[0]
    return -1, 0  # pragma: no cover - astropy warned, so some header holds one


def _check_unique_names(names: list[str], name: str, *, objid: str) -> None:
    seen: dict[str, int] = {}
    for i, ext in enumerate(names):
        if ext and ext in seen:
            raise QuarantineError("duplicate_extension", f"{name}: HDUs {seen[ext]} and {i} are both named "
                                                         f"{ext!r}; which one holds the data is ambiguous",
                                  objid=objid)
        seen.setdefault(ext, i)


_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([ED][+-]?\d+)?$")


_VALUES: dict[str, object] = {}  # card image -> value, for the values parsed without astropy
_MAX_VALUES = 4096
_ASTROPY = object()  # _plain_value's answer for a card astropy must parse


def _card_value(card: str):
    """Value of one 80-character card image: FITS fixed/free format for str, bool, int and float.

    Anything else (complex values, text after a closing quote, odd layouts) is handed to
    astropy's parser; a value it cannot parse either is ``bad_header_value``, and an
    undefined value (nothing after ``= ``) is ``None``, as astropy's ``Header`` gives it.

    Values of the plain forms are remembered by card image (they are immutable and the
    same card always reads the same): the structural cards of a survey's files
    (``BITPIX``, ``NAXISn``, ``XTENSION``, ``BAND``, ``BUNIT``...) repeat in every file.
    """
    try:
        return _VALUES[card]
    except KeyError:
        pass
    value = _plain_value(card)
    if value is _ASTROPY:
        return _astropy_value(card)
    if len(_VALUES) >= _MAX_VALUES:
        _VALUES.clear()
    _VALUES[card] = value
    return value


def _plain_value(card: str):
    """:func:`_card_value` of a card in the plain forms, or ``_ASTROPY``."""
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
                rest = stripped[i + 1:].lstrip()
                if rest == "" or rest.startswith("/"):
                    return "".join(out).rstrip()
                break  # text after the closing quote: astropy decides what the string is
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
    return _ASTROPY


def _astropy_value(card: str):
    """:func:`_card_value` of a card astropy parses."""
    from astropy.io import fits

    try:
        return _defined(fits.Card.fromstring(card).value)
    except Exception as err:  # astropy raises VerifyError (and others) for an unparsable value
        raise QuarantineError("bad_header_value", f"card {card.rstrip()!r} cannot be parsed "
                                                  f"({type(err).__name__}: {err})") from None


def _defined(value):
    from astropy.io import fits

    return None if isinstance(value, fits.card.Undefined) else value


def _cards(hdu, raw: bytes, keywords: tuple[str, ...], *, where: str = "header") -> dict:
    """The values of ``keywords`` in ``hdu``'s header, parsed from the file's own card images.

    astropy re-parses a card's value on every access, and that dominates reading
    a cutout; the contract's keywords are plain values, read straight from the
    header block (``fileinfo`` gives its byte range). A keyword given twice is
    ``duplicate_keyword``; ``where`` names the header in errors.
    """
    wanted, out, repeated = set(keywords), {}, []
    for key, card in _keyword_cards(hdu, raw):
        if key in wanted:
            if key in out:
                repeated.append(key)
                continue
            try:
                out[key] = _card_value(card)
            except QuarantineError as err:
                raise QuarantineError(err.reason, f"{where}: {key}: {err.message}") from None
    return _unique(out, repeated, where)


def _keyword_cards(hdu, raw: bytes):
    """``(keyword, card)`` of every card before ``END`` with the value indicator in columns 9-10: from the
    text the scanner checked for a :class:`_PlainHDU`, from the header block for any other HDU."""
    if isinstance(hdu, _PlainHDU) and hdu.text is not None:
        return [(key, card) for card, key in _KEYWORD_CARDS.findall(hdu.text) if key]
    info = hdu.fileinfo()
    block = raw[info["hdrLoc"]:info["datLoc"]].decode("ascii", errors="replace")
    found = []
    for i in range(0, len(block) - 79, 80):
        card = block[i:i + 80]
        key = card[:8].rstrip()
        if key == "END":
            break
        if card[8:10] == "= ":
            found.append((key, card))
    return found


def _header_values(header, keywords: tuple[str, ...], *, where: str) -> dict:
    """The values of ``keywords`` in an astropy ``Header``, as its cards hold them (``CONTINUE`` strings
    joined, ``HIERARCH`` and lower-case keywords matched as astropy matches them, strings that look like
    record-valued cards kept as strings); a keyword given twice is ``duplicate_keyword``."""
    wanted, out, repeated = set(keywords), {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy's notes on non-standard cards: the values decide
        for card in header.cards:
            key = str(card.rawkeyword).upper()
            if key not in wanted:
                continue
            if key in out:
                repeated.append(key)
                continue
            try:
                out[key] = _defined(card.rawvalue)
            except Exception as err:  # astropy raises VerifyError for an unparsable value
                raise QuarantineError("bad_header_value", f"{where}: {key} card {_card_text(card)!r} "
                                                          f"cannot be parsed ({type(err).__name__}: {err})") from None
    return _unique(out, repeated, where)


def _card_text(card) -> str:
    """The card's 80 characters for a message. astropy refuses to rebuild them for a card with control bytes
    (``ValueError``, and ``VerifyError`` for its value), so then the text it was read from stands in."""
    from astropy.io.fits.verify import VerifyError

    try:
        return str(card.image).rstrip()
    except (ValueError, VerifyError):
        raw = getattr(card, "_image", None)  # the card as read from the file
        return str(raw).rstrip() if raw else f"{card.rawkeyword} = (unreadable)"


def _unique(values: dict, repeated: list[str], where: str) -> dict:
    """``values`` when no keyword was repeated; otherwise ``duplicate_keyword`` (carrying the OBJID when
    that is not the repeated one)."""
    if not repeated:
        return values
    objid = "" if "OBJID" in repeated else _objid_text(values)
    raise QuarantineError("duplicate_keyword", f"{where}: {', '.join(sorted(set(repeated)))} "
                                               f"{'is' if len(set(repeated)) == 1 else 'are'} given more than once; "
                                               f"which value holds is ambiguous", objid=objid)


def _objid_text(primary: dict) -> str:
    """The OBJID as the catalog writes it ("" when absent), for errors raised before validation."""
    value = primary.get("OBJID")
    return "" if value is None else str(value).strip()


def _cut_short(data: bytes, caught) -> bool:
    return len(data) % FITS_BLOCK != 0 or any("truncated" in str(w.message) for w in caught)


def gunzip(data: bytes, name: str) -> bytes:
    """``data`` decompressed (every gzip member; NUL padding between and after them skipped, as
    ``gzip.decompress`` does), stopping one byte past :data:`MAX_FILE_BYTES` (``too_large``) so that a small file
    that expands without bound never fills the worker's memory. One pass: zlib's ``max_length`` bounds each
    member's output as it grows, and a file of one member is returned without a copy."""
    limit = fits_validation.MAX_FILE_BYTES
    members, rest, total = [], data, 0
    while rest:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # a gzip member: header, deflate data, CRC and length checked
        try:
            out = d.decompress(rest, limit - total + 1)
        except zlib.error as err:
            raise QuarantineError("unreadable", f"{name}: not a readable gzip file ({err})") from None
        total += len(out)
        if total > limit:
            raise QuarantineError("too_large", f"{name}: decompresses to more than {limit:,} bytes "
                                               f"(MAX_FILE_BYTES) from {len(data):,}")
        if not d.eof:
            raise QuarantineError("unreadable", f"{name}: not a readable gzip file (compressed file ended before "
                                                f"the end-of-stream marker was reached)")
        members.append(out)
        rest = d.unused_data.lstrip(b"\0")
    return b"".join(members)


def read_cutout(data: bytes, *, name: str, survey: SurveySpec, fast_path: bool = True,
                galaxy_only: bool = False) -> Cutout:
    """Validate one file's bytes against the contract for ``survey``.

    ``name`` is how errors name the file (e.g. ``raw/des/sim-0/x.fits``).
    Raises :class:`QuarantineError`; returns a :class:`Cutout` otherwise.
    ``fast_path=False`` opens every file with astropy (the reference the
    plain-HDU scanner is tested against). ``galaxy_only``: a cluster field
    (``OBJTYPE = 'cluster_field'``) is ``objtype_mismatch`` (:func:`.fits_validation.validate_cutout`).
    """
    if name.lower().endswith(".gz"):  # a gzip-compressed file (find_fits takes *.fits.gz): read decompressed
        data = gunzip(data, name)
    primary, arrays, band_header = _open(data, name, fast_path=fast_path)
    return validate_cutout(primary, arrays, name=name, survey=survey, band_header=band_header,
                           galaxy_only=galaxy_only)
