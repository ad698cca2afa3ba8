"""The survey cutout FITS contract (docs/fits_inbox_contract.md): writing and validated reading.

One file per object. Primary header: ``OBJID``, ``RA``, ``DEC`` (deg, ICRS),
``SURVEY``; optional ``Z_PHOT``, ``Z_SPEC``, ``Z_ERR``; labeled data adds ``LENS``,
``LABELSRC``, ``LABELCNF``, ``FLUXRAT``, ``THETA_E`` (simulations also write
``ARCSNR``, the lensed light's matched-filter S/N). Per band ``b``: ``IMAGE_<b>``
(2-D float, header ``BAND``, ``BUNIT``, ``MAGZP`` when ``BUNIT`` is ``count/s`` or
``adu``, ``PIXSCALE`` or a celestial WCS, optional ``PSFFWHM``, optional ``GAIN`` in
electrons per image unit, also read from the primary header), optional ``VAR_<b>``
and ``PSF_<b>``.

A band without ``VAR_<b>`` gets a variance from its sky pixels
(:func:`.noise.sky_noise`: sources masked, sigma-clipped), flagged ``var_derived``
and either ``var_poisson`` (``GAIN`` given: sky plus the sources' Poisson term) or
``var_sky_only`` (no gain: sky variance everywhere, which underestimates the noise
on bright sources); ``var_sky_unmasked`` when sources left under 10% of the
pixels as sky and the estimate used them all.

Sizes: a cutout must cover the survey's ``min_cutout_arcsec`` (else ``too_small``).
One smaller than the survey grid (``cutout_size_px`` at ``pixel_scale_arcsec``) is
read as it is and flagged ``padded`` in every band; :func:`.normalize.normalize_cutout`
pads it with zero image and zero variance (the contract's "no data", as for a missing
band) after resampling. One at least :data:`CROP_FLAG_RATIO` times the grid is flagged
``cropped`` (the shard builder keeps its centre).

:func:`read_cutout` turns bytes into a :class:`Cutout` or raises
:class:`QuarantineError` with a reason code from :data:`QUARANTINE_REASONS` and a
message naming the file, the field and the value.

The code lives in three modules: :mod:`.fits_writer` (writing),
:mod:`.fits_reader` (bytes to header values and arrays, astropy for anything the
plain-HDU scanner does not take) and :mod:`.fits_validation` (keyword, range,
unit, shape and pixel checks). This module is the public face of the contract and
re-exports their names.
"""

from __future__ import annotations

from .fits_reader import (_BITPIX_DTYPE, _FLOAT, _INT, _SCALING_KEYS, _STRUCTURE_KEYS, _card_value,  # noqa: F401
                          _cards, _cut_short, _open, _open_with_astropy, _PlainHDU, _scan_plain_hdus, read_cutout)
from .fits_validation import (BAND_FLAGS, BAND_KEYWORDS, CROP_FLAG_RATIO, FITS_BLOCK, FLUX_UNITS,  # noqa: F401
                              GAIN_RANGE, LABEL_SOURCE_PREFIXES, MAGZP_RANGE, MAX_NAN_FRACTION, PRIMARY_KEYWORDS,
                              QUARANTINE_REASONS, RESAMPLE_TOLERANCE, SIZE_TOLERANCE_ARCSEC, Cutout,
                              QuarantineError, _number, _pixel_scale, _read_bands, nanomaggies_per_unit,
                              size_on_survey_grid, validate_cutout)
from .fits_writer import (_KEYWORD_CHARS, SIM_ROLES, TRUTH_KEYS, BandHDUs, _card, _header_block,  # noqa: F401
                          _image_hdu, _var_unit, check_sim_role, cutout_bytes, simulated_cutout_bytes, write_cutout,
                          write_simulated_cutout)

__all__ = [
    "BandHDUs",
    "Cutout",
    "QuarantineError",
    "QUARANTINE_REASONS",
    "LABEL_SOURCE_PREFIXES",
    "BAND_FLAGS",
    "CROP_FLAG_RATIO",
    "write_cutout",
    "write_simulated_cutout",
    "simulated_cutout_bytes",
    "SIM_ROLES",
    "check_sim_role",
    "read_cutout",
    "nanomaggies_per_unit",
]
