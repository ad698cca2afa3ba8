"""A fuzzed survey drop: FITS files with many kinds of damage, each with the outcome the contract expects.

    kinds = write_fuzz_drop(out_dir, n_files=1000, seed=0)   # file name -> kind
    report = ingest_fuzz_drop(out_dir, kinds)                 # per-kind outcomes, crashes, counts

Every kind is a builder ``(rng, objid) -> bytes`` and an expected outcome:
``"ingested"`` or a quarantine reason. ``duplicate_objid`` files repeat the OBJID of
the drop's first valid file, so they are quarantined by the drop-level rule.
Used by ``lens_assets_tests/science/test_fuzz_drop.py`` (a small drop) and
``benchmarks/bench_fuzz_drop.py`` (1,000 files and more).
"""

from __future__ import annotations

import gzip
import io
import re
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lens_assets.science.fits_contract import BandHDUs, QuarantineError, cutout_bytes, read_cutout
from lens_assets.science.ingest import find_fits, ingest_files, read_one, relative_names
from lens_assets.science.surveys import SurveySpec, get_survey

__all__ = ["KINDS", "write_fuzz_drop", "ingest_fuzz_drop", "score_fuzz_drop", "outcomes_by_kind",
           "expected_outcomes", "find_crashes", "read_seconds", "small_drop", "DropReport", "FIRST_OBJID"]

DES = get_survey("des")
PIX = DES.pixel_scale_arcsec
SIZE = DES.cutout_size_px
FIRST_OBJID = "fuzz-valid-first"  # the OBJID every duplicate_objid file repeats
INGESTED = "ingested"


def _gaussian_psf(size: int = 11, sigma_px: float = 1.5) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    psf = np.exp(-(x**2 + y**2) / (2 * sigma_px**2))
    return (psf / psf.sum()).astype(np.float32)


def _image(rng) -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    return (50.0 * np.exp(-(x**2 + y**2) / 18.0) + rng.normal(0.0, 1.0, (SIZE, SIZE))).astype(np.float32)


def _bands(rng, *, header: dict | None = None, drop: tuple = ()) -> dict:
    """Valid des bands (count/s with MAGZP, PIXSCALE, PSFFWHM, VAR and PSF), ``drop`` left out."""
    hdr = {"BUNIT": "count/s", "MAGZP": 30.0, "PIXSCALE": PIX, "PSFFWHM": 1.0, **(header or {})}
    return {b: BandHDUs(image=_image(rng), header=dict(hdr), variance=np.ones((SIZE, SIZE), np.float32),
                        psf=_gaussian_psf())
            for b in DES.band_names if b not in drop}


def _primary(objid: str, **extra) -> dict:
    return {"OBJID": objid, "RA": 150.0, "DEC": 2.0, "SURVEY": "des", **extra}


def _valid(rng, objid: str) -> bytes:
    return cutout_bytes(_primary(objid), _bands(rng))


def _astropy_edit(data: bytes, edit: Callable) -> bytes:
    """``data`` rewritten by astropy after ``edit(hdul)`` (astropy writes long strings, HIERARCH, ...)."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(io.BytesIO(data)) as hdul:
            edit(hdul)
            out = io.BytesIO()
            hdul.writeto(out, output_verify="ignore")
    return out.getvalue()


def _replace_card(data: bytes, key: bytes, card: bytes) -> bytes:
    i = data.index(key.ljust(8) + b"=")
    return data[:i] + card.ljust(80) + data[i + 80:]


def _continue_objid(rng, objid: str) -> bytes:
    long_id = (objid + "-" + "x" * 81)[:81]  # 81 characters: astropy continues it on a CONTINUE card
    return _astropy_edit(_valid(rng, objid), lambda h: h[0].header.set("OBJID", long_id))


def _hierarch(rng, objid: str) -> bytes:
    def add(hdul):
        hdul[0].header["HIERARCH ESO OBS PROG ID"] = "094.A-0001"
        hdul[0].header["HIERARCH Z_PHOT"] = 0.42  # a contract keyword written as HIERARCH: astropy reads it
        hdul["IMAGE_g"].header["HIERARCH DET CHIP TEMP"] = -120.5
    return _astropy_edit(_valid(rng, objid), add)


def _end_nul_padding(rng, objid: str) -> bytes:
    data = bytearray(_valid(rng, objid))
    end = data.index(b"END" + b" " * 77)
    stop = end + 80 + (-(end + 80) % 2880)
    data[end + 80:stop] = b"\0" * (stop - end - 80)  # a producer that pads the header with NULs
    return bytes(data)


def _truncated(rng, objid: str) -> bytes:
    """Cut after a whole block inside an image's data. (A cut exactly between two HDUs leaves a valid file
    with fewer extensions, which nothing in the contract can tell from one written that way.)"""
    data = _valid(rng, objid)
    starts = [m.start() - m.start() % 2880 for m in re.finditer(rb"EXTNAME = 'IMAGE_", data)]
    start = starts[int(rng.integers(0, len(starts)))]  # its header is one block; its 64x64 data six more
    return data[:start + 2880 * int(rng.integers(2, 7))]


def _bad_block_padding(rng, objid: str) -> bytes:
    data = _valid(rng, objid)
    return data[:len(data) - int(rng.integers(1, 2000))]  # the last block's padding cut off


def _missing_band(rng, objid: str) -> bytes:
    return cutout_bytes(_primary(objid), _bands(rng, drop=("z",)))


def _duplicate_extension(rng, objid: str) -> bytes:
    from astropy.io import fits

    def add(hdul):
        hdul.append(fits.ImageHDU(np.full((SIZE, SIZE), 1e6, np.float32) + _image(rng),
                                  header=hdul["IMAGE_r"].header.copy(), name="IMAGE_r"))
    return _astropy_edit(_valid(rng, objid), add)


def _duplicate_keyword(rng, objid: str) -> bytes:
    return _astropy_edit(_valid(rng, objid), lambda h: h[0].header.append(("RA", 151.0)))  # RA twice


def _nan_image(rng, objid: str) -> bytes:
    img = _image(rng)
    img[: SIZE * 3 // 4] = np.nan
    bands = _bands(rng)
    bands["i"].image = img
    return cutout_bytes(_primary(objid), bands)


def _inf_image(rng, objid: str) -> bytes:
    bands = _bands(rng)
    bands["g"].image = np.where(rng.random((SIZE, SIZE)) < 0.8, np.inf, -np.inf).astype(np.float32)
    return cutout_bytes(_primary(objid), bands)


def _wrong_bunit(rng, objid: str) -> bytes:
    return cutout_bytes(_primary(objid), _bands(rng, header={"BUNIT": "Jy/beam"}))


def _wrong_magzp(rng, objid: str) -> bytes:
    return cutout_bytes(_primary(objid), _bands(rng, header={"MAGZP": float(rng.choice([-5.0, 99.0, 0.0]))}))


def _wrong_shape(rng, objid: str) -> bytes:
    bands = _bands(rng)
    bands["r"] = BandHDUs(image=_image(rng)[:, :-3], header=dict(bands["r"].header))
    return cutout_bytes(_primary(objid), bands)


def _non_square(rng, objid: str) -> bytes:
    """Every band 64 x 61 px, as a cutout clipped at a survey tile's edge: padded to square and read."""
    bands = {b: BandHDUs(image=h.image[:, 3:], header=h.header, variance=h.variance[:, 3:], psf=h.psf)
             for b, h in _bands(rng).items()}
    return cutout_bytes(_primary(objid), bands)


def _flipped_header_bytes(rng, objid: str) -> bytes:
    data = bytearray(_valid(rng, objid))
    for _ in range(int(rng.integers(1, 4))):  # high-bit bytes in the primary header's OBJID..SURVEY cards
        data[int(rng.integers(4 * 80, 8 * 80))] |= 0x80
    return bytes(data)


def _empty(rng, objid: str) -> bytes:
    return b""


def _not_fits(rng, objid: str) -> bytes:
    return [b"\x89PNG\r\n\x1a\n" + rng.bytes(200), b"objid,ra,dec\nx,1,2\n",
            gzip.compress(_valid(rng, objid))][int(rng.integers(0, 3))]


def _duplicate_objid(rng, objid: str) -> bytes:
    return _valid(rng, FIRST_OBJID)


def _unparsable_value(rng, objid: str) -> bytes:
    return _replace_card(_valid(rng, objid), b"DEC", b"DEC     = 2.0.1 / degrees")


def _absurd_naxis(rng, objid: str) -> bytes:
    data = _valid(rng, objid)
    i = data.index(b"NAXIS1  =", 2880)
    return data[:i] + b"NAXIS1  = 4000000000000".ljust(80) + data[i + 80:]


def _missing_objid(rng, objid: str) -> bytes:
    return cutout_bytes({k: v for k, v in _primary(objid).items() if k != "OBJID"}, _bands(rng))


def _pixscale_mismatch(rng, objid: str) -> bytes:
    bands = _bands(rng)
    bands["Y"].header["PIXSCALE"] = 0.4
    return cutout_bytes(_primary(objid), bands)


def _survey_mismatch(rng, objid: str) -> bytes:
    return cutout_bytes(_primary(objid, SURVEY="hsc"), _bands(rng))


def _gzip(rng, objid: str) -> bytes:
    """A valid file gzip-compressed, named ``*.fits.gz`` (:data:`SUFFIXES`): read decompressed."""
    return gzip.compress(_valid(rng, objid))


def _fpack(rng, objid: str) -> bytes:
    """A valid file as fpack writes it, named ``*.fits.fz``: an empty primary HDU with its keywords, each extension
    a RICE_1 tile-compressed image (read through astropy)."""
    from astropy.io import fits

    with fits.open(io.BytesIO(_valid(rng, objid))) as hdul:
        hdus = [fits.PrimaryHDU(header=hdul[0].header)] + [
            fits.CompImageHDU(h.data, header=h.header, name=h.name, compression_type="RICE_1") for h in hdul[1:]]
        buf = io.BytesIO()
        fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


SUFFIXES = {"gzip": ".fits.gz", "fpack": ".fits.fz"}  # kind -> its files' suffix (".fits" for the rest)

# kind -> (builder, expected outcome)
KINDS: dict[str, tuple[Callable, str]] = {
    "valid": (_valid, INGESTED),
    "continue_objid": (_continue_objid, INGESTED),
    "hierarch_cards": (_hierarch, INGESTED),
    "end_nul_padding": (_end_nul_padding, INGESTED),
    "missing_band": (_missing_band, INGESTED),
    "non_square": (_non_square, INGESTED),
    "gzip": (_gzip, INGESTED),
    "fpack": (_fpack, INGESTED),
    "truncated": (_truncated, "truncated"),
    "bad_block_padding": (_bad_block_padding, "truncated"),
    "duplicate_extension": (_duplicate_extension, "duplicate_extension"),
    "duplicate_keyword": (_duplicate_keyword, "duplicate_keyword"),
    "nan_image": (_nan_image, "mostly_nan"),
    "inf_image": (_inf_image, "mostly_nan"),
    "wrong_bunit": (_wrong_bunit, "bad_bunit"),
    "wrong_magzp": (_wrong_magzp, "bad_header_value"),
    "wrong_shape": (_wrong_shape, "shape_mismatch"),
    "flipped_header_bytes": (_flipped_header_bytes, "non_ascii_header"),
    "empty_file": (_empty, "unreadable"),
    "not_fits": (_not_fits, "unreadable"),
    "duplicate_objid": (_duplicate_objid, "duplicate_objid"),
    "unparsable_value": (_unparsable_value, "bad_header_value"),
    "absurd_naxis": (_absurd_naxis, "truncated"),
    "missing_objid": (_missing_objid, "missing_header"),
    "pixscale_mismatch": (_pixscale_mismatch, "pixscale_mismatch"),
    "survey_mismatch": (_survey_mismatch, "survey_mismatch"),
}


def write_fuzz_drop(out_dir: Path, *, n_files: int, seed: int = 0, kinds: tuple[str, ...] | None = None) -> dict:
    """Write ``n_files`` files (kinds in turn, first a valid file with :data:`FIRST_OBJID`) under ``out_dir``;
    returns ``{file name: kind}``."""
    kinds = tuple(kinds or KINDS)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"fuzz kinds {sorted(unknown)} are not among {sorted(KINDS)}")
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for i in range(n_files):
        kind = "valid" if i == 0 else kinds[i % len(kinds)]
        objid = FIRST_OBJID if i == 0 else f"fuzz-{i:05d}"
        name = f"{i:05d}-{kind}{SUFFIXES.get(kind, '.fits')}"
        (out_dir / name).write_bytes(KINDS[kind][0](rng, objid))
        written[name] = kind
    return written


def small_drop(root: Path, *, per_kind: int, seed: int) -> tuple[Path, dict]:
    """``per_kind`` files of every kind in ``root/inbox/des/fuzz-0``: ``(root, {file name: kind})``."""
    return root, write_fuzz_drop(root / "inbox/des/fuzz-0", n_files=per_kind * len(KINDS), seed=seed)


@dataclass
class DropReport:
    """Outcomes of one pass over a drop: ``outcomes`` maps kind -> Counter of outcome (``ingested``/``scored``
    or a quarantine reason); ``crashes`` lists ``(file, kind, traceback)`` of files whose reading raised
    anything but a quarantine."""

    n_files: int
    n_accepted: int
    n_quarantined: int
    seconds: float
    outcomes: dict = field(default_factory=dict)
    crashes: list = field(default_factory=list)
    catalog: object = None
    quarantine: object = None
    scores: object = None  # score_fuzz_drop: score_files' scores table

    @property
    def adds_up(self) -> bool:
        return self.n_accepted + self.n_quarantined == self.n_files


def find_crashes(root: Path, kinds: dict, survey: SurveySpec = DES) -> list:
    """Each file read on its own with the ingest's reader: the ones that raise anything but a quarantine."""
    crashes = []
    paths, names = relative_names(find_fits(root), root)
    for path, name in zip(paths, names):
        try:
            read_one(path, name, survey)
        except Exception:  # what the fuzz drop is for: any exception escaping the reader is a crash
            crashes.append((name, kinds.get(Path(name).name, "?"), traceback.format_exc(limit=3)))
    return crashes


def expected_outcomes(kinds: dict, *, accepted: str = INGESTED) -> dict:
    """kind -> Counter of the outcome each of its files should get (``accepted`` for the files let in)."""
    out: dict[str, Counter] = {}
    for kind in kinds.values():
        outcome = KINDS[kind][1]
        out.setdefault(kind, Counter())[accepted if outcome == INGESTED else outcome] += 1
    return out


def outcomes_by_kind(accepted_files, quarantine, kinds: dict, *, accepted: str) -> dict:
    """kind -> Counter of outcomes, from the accepted files' names and the quarantine table."""
    outcome = {Path(f).name: accepted for f in accepted_files}
    outcome.update({Path(f).name: r for f, r in zip(quarantine["source_file"], quarantine["reason"])})
    table: dict[str, Counter] = {}
    for name, kind in kinds.items():
        table.setdefault(kind, Counter())[outcome.get(name, "missing from both tables")] += 1
    return table


def ingest_fuzz_drop(root: Path, kinds: dict, *, survey: SurveySpec = DES, workers: int = 1) -> DropReport:
    """Ingest the drop (``ingest_files``) after reading each file on its own to find crashes."""
    crashes = find_crashes(root, kinds, survey)
    if crashes:
        return DropReport(n_files=len(kinds), n_accepted=0, n_quarantined=0, seconds=float("nan"), crashes=crashes)
    res = ingest_files(find_fits(root), survey, root=root, workers=workers, progress=False)
    return DropReport(n_files=res.n_files, n_accepted=len(res.catalog), n_quarantined=len(res.quarantine),
                      seconds=res.seconds, outcomes=outcomes_by_kind(res.catalog["source_file"], res.quarantine,
                                                                     kinds, accepted=INGESTED),
                      catalog=res.catalog, quarantine=res.quarantine)


def random_member(survey: SurveySpec = DES, *, seed: int = 0):
    """An untrained ``LensClassifier`` (resnet10t) for the survey's bands: scoring's plumbing without training."""
    import torch

    from lens_assets.ml.module import LensClassifier

    torch.manual_seed(seed)
    return LensClassifier(backbone="resnet10t", in_chans=survey.n_bands, img_size=survey.cutout_size_px).eval()


def score_fuzz_drop(root: Path, kinds: dict, *, survey: SurveySpec = DES, workers: int = 1,
                    batch_size: int = 64) -> DropReport:
    """Score the drop end to end (``score_files``) with one random member, a mean fusion and a temperature-1
    calibrator; ``n_accepted`` counts scored rows."""
    from lens_assets.ml.score import Fusion, score_files
    from lens_assets.science.calibration import Calibrator
    from lens_assets.science.shards import shard_settings

    res = score_files(find_fits(root), survey, root=root, settings=shard_settings(survey), members=[random_member()],
                      fusion=Fusion.mean(1), calibrator=Calibrator("temperature"), batch_size=batch_size,
                      workers=workers, device="cpu", progress=False, precision="32-true")
    return DropReport(n_files=res.n_files, n_accepted=len(res.scores), n_quarantined=len(res.quarantine),
                      seconds=res.seconds, outcomes=outcomes_by_kind(res.catalog["source_file"], res.quarantine,
                                                                     kinds, accepted="scored"),
                      catalog=res.catalog, quarantine=res.quarantine, scores=res.scores)


def read_seconds(root: Path, *, fast_path: bool, survey: SurveySpec = DES) -> float:
    """Seconds to read every file of the drop with ``read_cutout`` (quarantines included), one process."""
    import time

    blobs = [(str(p), p.read_bytes()) for p in find_fits(root)]
    t0 = time.perf_counter()
    for name, data in blobs:
        try:
            read_cutout(data, name=name, survey=survey, fast_path=fast_path)
        except QuarantineError:
            pass
    return time.perf_counter() - t0
