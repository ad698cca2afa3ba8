"""PSF-matched, flux-normalized HDF5 shards, built streaming with bounded memory.

Each shard ``shard-NNNNN.h5`` holds ``images`` (N, bands, H, W) float32 in
nanomaggies, ``variance`` (same, nanomaggies^2), ``band_flags`` (N, bands) uint16
(bits in :data:`FLAG_BITS`), ``footprint_px`` (N,) the side of the file's data on
the survey grid (smaller than the cutout when the row is ``padded``: the data are
the centred ``footprint_px`` square, zeros around before PSF matching; a
``padded_square`` row's data are a rectangle inside the square it was padded to on
reading, whose side this is, and may be ``padded`` within it), ``objid``,
the labels, and the per-row PSF table (``fwhm_before``, ``fwhm_after``,
``residual`` in arcsec, ``psf_matched``).
A shard is written under a temporary name and renamed when complete;
``manifest.json`` lists files, row counts, the sha256 of each file's bytes (what
a copy is checked against) and of its content (``content_sha256``: every
dataset's name, dtype, shape and values, and the attributes), and its own
``sha256`` is the data version: a hash of the manifest with the file-byte hashes
left out. HDF5 does not promise the same bytes for the same data (the library
writes parts of its metadata blocks from memory it does not clear), so the data
version is made from content alone and does not depend on which process wrote a
shard. ``rows.parquet`` is the per-row table of all shards. Every file
is renamed into place complete (:mod:`.fileio`), ``manifest.json`` last, so a
folder whose manifest exists holds every file it names.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import atomic_path, read_within, sha256_file, write_text_atomic
from .ingest import MISSING  # the catalog's missing value
from . import fits_validation
from .fits_contract import BAND_FLAGS, read_cutout
from .normalize import center_crop, normalize_cutout
from .parallel import bounded_imap
from .psf import homogenize, target_fwhm_arcsec
from .surveys import SurveySpec, get_survey

__all__ = ["ShardSettings", "FLAG_BITS", "build_shards", "process_batch", "match_batch", "shard_settings",
           "read_manifest", "manifest_data_version", "shard_content_sha256", "SHARD_FORMAT_VERSION", "MANIFEST_FILE",
           "ROWS_FILE", "COMPRESSIONS"]

MANIFEST_FILE = "manifest.json"  # in every shard folder, renamed into place last
ROWS_FILE = "rows.parquet"  # objid -> shard, index, per-band PSF facts
COMPRESSIONS = ("lzf", "gzip", "none")  # of the shards' HDF5 datasets
SHARD_FORMAT_VERSION = "3"  # 2: band_flags uint16 with the padding, cropping and noise-estimate bits; footprint_px;
# 3: rows.parquet carries scene_theta_e
FLAG_BITS = {"missing": 1, "nan_masked": 2, "var_derived": 4, "fwhm_from_psf": 8, "fwhm_nominal": 16,
             "psf_broader_than_target": 32, "resampled": 64, "padded": 128, "cropped": 256, "var_sky_only": 512,
             "var_poisson": 1024, "var_sky_unmasked": 2048, "padded_square": 4096}
assert set(BAND_FLAGS) <= set(FLAG_BITS), set(BAND_FLAGS) - set(FLAG_BITS)
LABEL_COLUMNS = ("label", "label_confidence", "flux_ratio", "theta_e")
# catalog truth carried into ``rows.parquet`` for training (the catalog's -1 where it has no such column)
ROW_TRUTH_COLUMNS = ("scene_theta_e",)


@dataclass(frozen=True)
class ShardSettings:
    """How a survey's shards are made: the target PSF, the kernel support and the shard layout."""

    survey: str
    target_fwhm_arcsec: float
    kernel_size: int
    cutout_size_px: int
    rows_per_shard: int = 4096
    batch_size: int = 256
    compression: str = "lzf"


def shard_settings(survey: SurveySpec, *, target_fwhm_arcsec: float | None = None, percentile: float = 90.0,
                   rows_per_shard: int = 4096, batch_size: int = 256, compression: str = "lzf") -> ShardSettings:
    """Defaults: target = the broadest band's nominal FWHM at the ``percentile`` of the survey's seeing
    scatter; kernel support = 3 target FWHM each side (odd, at most the cutout size minus one)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of {list(COMPRESSIONS)}")
    if target_fwhm_arcsec is None:
        target_fwhm_arcsec = target_fwhm_arcsec_default(survey, percentile=percentile)
    if target_fwhm_arcsec <= 0:
        raise ValueError(f"target_fwhm_arcsec must be positive, got {target_fwhm_arcsec}")
    fwhm_px = target_fwhm_arcsec / survey.pixel_scale_arcsec
    k = max(11, 2 * int(np.ceil(3.0 * fwhm_px)) + 1)
    k = min(k, survey.cutout_size_px - 1 if survey.cutout_size_px % 2 == 0 else survey.cutout_size_px)
    return ShardSettings(survey=survey.name, target_fwhm_arcsec=float(target_fwhm_arcsec), kernel_size=k,
                         cutout_size_px=survey.cutout_size_px, rows_per_shard=rows_per_shard,
                         batch_size=batch_size, compression=compression)


def target_fwhm_arcsec_default(survey: SurveySpec, *, percentile: float = 90.0) -> float:
    return target_fwhm_arcsec([b.seeing_fwhm_arcsec for b in survey.bands], survey.seeing_scatter,
                              percentile=percentile)


def _flag_bits(band_flags: dict, bands, *, broader: np.ndarray, resampled: bool) -> np.ndarray:
    bits = np.zeros(len(bands), dtype=np.uint16)
    for i, b in enumerate(bands):
        for f in band_flags.get(b, ()):
            bits[i] |= FLAG_BITS[f]
        if broader[i]:
            bits[i] |= FLAG_BITS["psf_broader_than_target"]
        if resampled:
            bits[i] |= FLAG_BITS["resampled"]
    return bits


def process_batch(args) -> dict:
    """Read, normalize, PSF-match and crop a batch of catalog rows (runs in a worker process)."""
    rows, root, settings = args
    survey = get_survey(settings.survey)
    cutouts = []
    for row in rows:
        # the bytes are parsed below, so hashing them in memory costs no second read (a cutout is ~100 kB)
        data, size = read_within(Path(root) / row["source_file"], fits_validation.MAX_FILE_BYTES)
        if data is None:  # the catalog read it, so it was no larger: not read now
            raise ValueError(f"{row['source_file']}: now {size:,} bytes, over MAX_FILE_BYTES "
                             f"({fits_validation.MAX_FILE_BYTES:,}), where the catalog read it; the file changed "
                             f"after cataloging: re-materialize cutout_catalog")
        sha = hashlib.sha256(data).hexdigest()
        if sha != row["source_sha256"]:
            raise ValueError(f"{row['source_file']}: sha256 {sha[:12]}… differs from the catalog's "
                             f"{row['source_sha256'][:12]}…; the file changed after cataloging: re-materialize "
                             f"cutout_catalog")
        cutouts.append(read_cutout(data, name=row["source_file"], survey=survey))
    return match_batch(rows, cutouts, settings)


def match_batch(rows: list[dict], cutouts: list, settings: ShardSettings) -> dict:
    """Normalize, PSF-match and crop cutouts already read: the arrays of a shard batch, one row per cutout
    (``rows`` give ``objid`` and the label columns)."""
    survey = get_survey(settings.survey)
    size, margin = settings.cutout_size_px, settings.kernel_size // 2
    # match on up to `margin` extra pixels around the cutout where the file has them, so the crop sees no
    # edge effect; a file exactly the cutout size is matched with zeros beyond its edges, and so is a padded
    # one (normalize_cutout padded it to `size` with zero image and variance)
    work = size + 2 * margin
    groups: dict[int, list] = {}
    for j, c in enumerate(cutouts):
        norm = normalize_cutout(c, survey)
        side = min(norm.image.shape[-1], work)
        groups.setdefault(side, []).append((j, c, norm))
    n, nb = len(rows), survey.n_bands
    # a batch whose files all have the survey's size is one group holding every row in order: homogenize's
    # arrays are the batch's as they are, with no zeroed copy to fill (the usual case)
    whole = len(groups) == 1 and size in groups and len(groups[size]) == n
    out = {"image": None, "variance": None,
           "band_flags": np.zeros((n, nb), np.uint16), "footprint_px": np.zeros(n, np.int16),
           "fwhm_before": np.zeros((n, nb), np.float32),
           "fwhm_after": np.zeros((n, nb), np.float32), "residual": np.zeros((n, nb), np.float32),
           "psf_matched": np.zeros((n, nb), bool)}
    for side, members in groups.items():
        imgs = np.stack([center_crop(m[2].image, side) for m in members])
        vars_ = np.stack([center_crop(m[2].variance, side) for m in members])
        res = homogenize(imgs, vars_, [m[2].psf for m in members], np.stack([m[1].psf_fwhm_arcsec for m in members]),
                         np.stack([m[1].present for m in members]), pixel_scale_arcsec=survey.pixel_scale_arcsec,
                         target_fwhm=settings.target_fwhm_arcsec, kernel_size=settings.kernel_size)
        rows_of = [m[0] for m in members]  # the batch rows of this group, in order
        if whole and all(a.dtype == np.float32 and a.shape == (n, nb, size, size) and a.flags.c_contiguous
                         for a in (res.image, res.variance)):
            out["image"], out["variance"] = res.image, res.variance
        else:
            if out["image"] is None:
                out["image"] = np.zeros((n, nb, size, size), np.float32)
                out["variance"] = np.zeros((n, nb, size, size), np.float32)
            out["image"][rows_of] = center_crop(res.image, size)
            out["variance"][rows_of] = center_crop(res.variance, size)
        out["fwhm_before"][rows_of] = res.fwhm_before
        out["fwhm_after"][rows_of] = res.fwhm_after
        out["residual"][rows_of] = res.residual
        out["psf_matched"][rows_of] = res.matched
        for k, (j, c, norm) in enumerate(members):
            out["footprint_px"][j] = min(norm.footprint_px, size)
            out["band_flags"][j] = _flag_bits(c.band_flags, c.bands, broader=res.residual[k] > 0,
                                              resampled=norm.resampled)
    if out["image"] is None:  # no cutouts
        out["image"] = np.zeros((n, nb, size, size), np.float32)
        out["variance"] = np.zeros((n, nb, size, size), np.float32)
    out["objid"] = np.array([r["objid"] for r in rows], dtype=object)
    for col in LABEL_COLUMNS:
        out[col] = np.array([r[col] for r in rows], dtype=np.float32 if col != "label" else np.int8)
    for col in ROW_TRUTH_COLUMNS:
        out[col] = np.array([r.get(col, MISSING) for r in rows], dtype=np.float32)
    return out


SMALL_DATASETS = (("band_flags", "u2"), ("footprint_px", "i2"), ("fwhm_before", "f4"), ("fwhm_after", "f4"),
                  ("residual", "f4"),
                  ("psf_matched", "?"), ("label", "i1"), ("label_confidence", "f4"), ("flux_ratio", "f4"),
                  ("theta_e", "f4"))


class _ShardWriter:
    """Writes batches into shard files of ``rows_per_shard`` rows; each is renamed into place when full.

    Datasets are created at their final size and the per-row scalars are written
    once when a shard closes, so a shard's content does not depend on how its rows
    were batched; ``content_sha256`` (what the data version is made of) hashes that
    content as the rows arrive.
    """

    def __init__(self, out_dir: Path, settings: ShardSettings, bands: tuple[str, ...], n_total: int):
        self.out_dir, self.settings, self.bands = Path(out_dir), settings, bands
        self.shards: list[dict] = []
        self.rows: list[pd.DataFrame] = []
        self._remaining = n_total
        self._file = None
        self._n = 0

    def _open(self):
        import h5py

        name = f"shard-{len(self.shards):05d}.h5"
        self._path = self.out_dir / name
        self._tmp = self.out_dir / f".{name}.tmp"
        self._size = min(self.settings.rows_per_shard, self._remaining)
        self._file = h5py.File(self._tmp, "w")
        s, nb = self.settings.cutout_size_px, len(self.bands)
        comp = None if self.settings.compression == "none" else self.settings.compression
        for key in ("images", "variance"):
            self._file.create_dataset(key, shape=(self._size, nb, s, s), dtype="f4", chunks=(1, nb, s, s),
                                      compression=comp, shuffle=comp is not None)
        self._small: dict[str, list] = {k: [] for k, _ in SMALL_DATASETS}
        self._small["objid"] = []
        # the big datasets are hashed as their rows arrive (C order, row after row: the bytes of the dataset)
        self._digest = {"images": hashlib.sha256(), "variance": hashlib.sha256()}
        attrs = self._file.attrs
        attrs["survey"], attrs["bands"] = self.settings.survey, ",".join(self.bands)
        attrs["target_fwhm_arcsec"] = self.settings.target_fwhm_arcsec
        attrs["units"] = "images: nanomaggies; variance: nanomaggies^2; fwhm: arcsec"
        attrs["format_version"] = SHARD_FORMAT_VERSION
        self._n = 0

    def append(self, batch: dict) -> None:
        start = 0
        total = len(batch["objid"])
        while start < total:
            if self._file is None:
                self._open()
            take = min(total - start, self._size - self._n)
            sl = slice(start, start + take)
            for key, src in (("images", "image"), ("variance", "variance")):
                rows = np.ascontiguousarray(batch[src][sl], dtype=np.float32)
                self._file[key][self._n:self._n + take] = rows
                self._digest[key].update(rows)  # the buffer itself: no copy of the rows
            for key in self._small:
                self._small[key].append(batch[key][sl])
            self.rows.append(pd.DataFrame({
                "objid": batch["objid"][sl].astype(str), "shard": self._path.name,
                "index": np.arange(self._n, self._n + take),
                **{f"fwhm_before_{b}": batch["fwhm_before"][sl, i] for i, b in enumerate(self.bands)},
                **{f"psf_matched_{b}": batch["psf_matched"][sl, i] for i, b in enumerate(self.bands)},
                "max_residual": batch["residual"][sl].max(axis=1),
                "footprint_px": batch["footprint_px"][sl],
                "label": batch["label"][sl],
                **{col: batch[col][sl] for col in ROW_TRUTH_COLUMNS}}))
            self._n += take
            self._remaining -= take
            start += take
            if self._n == self._size:
                self._close()

    def _close(self) -> None:
        import h5py

        if self._file is None:
            return
        s = min(1024, self._size)
        nb, side = len(self.bands), self.settings.cutout_size_px
        content = {key: ["<f4", [self._n, nb, side, side], self._digest[key].hexdigest()]
                   for key in ("images", "variance")}
        for key, dtype in SMALL_DATASETS:
            data = np.ascontiguousarray(np.concatenate(self._small[key]).astype(dtype))
            self._file.create_dataset(key, data=data, chunks=(s, *data.shape[1:]))
            content[key] = [data.dtype.str, list(data.shape), hashlib.sha256(data).hexdigest()]
        objids = [str(o) for o in np.concatenate(self._small["objid"])]
        self._file.create_dataset("objid", data=np.array(objids, dtype=object), dtype=h5py.string_dtype(),
                                  chunks=(s,))
        content["objid"] = ["utf-8", [len(objids)], hashlib.sha256(json.dumps(objids).encode()).hexdigest()]
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in self._file.attrs.items()}
        self._file.close()
        self._file = None
        sha = sha256_file(self._tmp)  # streamed: a full shard is ~1 GB
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self._path)
        self.shards.append({"file": self._path.name, "rows": int(self._n), "sha256": sha,
                            "content_sha256": shard_content_sha256(content, attrs)})

    def finish(self) -> None:
        self._close()


def build_shards(catalog: pd.DataFrame, survey: SurveySpec, *, root: Path, out_dir: Path,
                 settings: ShardSettings, workers: int = 1, progress: bool = True) -> dict:
    """Write PSF-matched shards of ``catalog``'s rows to ``out_dir``; return the manifest (also written).

    Memory is bounded by the batch size times the batches in flight, not by the
    catalog's length.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    need = ["objid", "source_file", "source_sha256", *LABEL_COLUMNS]
    missing = [c for c in need if c not in catalog.columns]
    if missing:
        raise ValueError(f"catalog lacks columns {missing}")
    records = catalog[need + [c for c in ROW_TRUTH_COLUMNS if c in catalog.columns]].to_dict("records")
    # small catalogs still make several tasks; the size depends on the catalog only, never on `workers`
    bs = max(16, min(settings.batch_size, -(-len(records) // 8)))
    tasks = [(records[i:i + bs], str(root), settings) for i in range(0, len(records), bs)]
    import astropy.io.fits  # noqa: F401  (one-worker path; pool workers: the forkserver preload)
    import photutils.psf_matching  # noqa: F401

    writer = _ShardWriter(out_dir, settings, survey.band_names, len(records))
    t0 = time.perf_counter()
    n_matched = n_broader = 0
    for batch in bounded_imap(process_batch, tasks, workers=workers, progress=progress, unit="cutout",
                              desc=f"shards {survey.name}", weights=[len(t[0]) for t in tasks]):
        n_matched += int(batch["psf_matched"].sum())
        n_broader += int((batch["residual"] > 0).sum())
        writer.append(batch)
    writer.finish()
    seconds = time.perf_counter() - t0
    rows = pd.concat(writer.rows, ignore_index=True) if writer.rows else pd.DataFrame()
    with atomic_path(out_dir / ROWS_FILE) as tmp:
        rows.to_parquet(tmp, index=False)
    manifest = {
        "survey": survey.name, "bands": list(survey.band_names), "cutout_size_px": settings.cutout_size_px,
        "pixel_scale_arcsec": survey.pixel_scale_arcsec, "settings": asdict(settings),
        "format_version": SHARD_FORMAT_VERSION, "n_rows": int(len(records)), "shards": writer.shards,
        "n_band_matched": n_matched, "n_band_broader_than_target": n_broader, "seconds": seconds,
        "rows_table": ROWS_FILE, "rows_table_sha256": sha256_file(out_dir / ROWS_FILE),
    }
    manifest["sha256"] = manifest_data_version(manifest)
    write_text_atomic(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))  # last
    return manifest


def shard_content_sha256(datasets: dict[str, list], attrs: dict) -> str:
    """sha256 of a shard's content: ``datasets`` maps name -> [dtype, shape, sha256 of its C-order bytes (objid:
    of its JSON list)], ``attrs`` the file attributes. The same data give the same hash whatever the HDF5 bytes."""
    text = json.dumps({"datasets": datasets, "attrs": attrs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_data_version(manifest: dict) -> str:
    """The data version of a shard folder: sha256 of its manifest without the build time, its own hash and the
    hashes of the files' bytes (each shard's content_sha256 stands for its data; the rows table is made from the
    same rows)."""
    content = {k: v for k, v in manifest.items() if k not in ("seconds", "sha256", "rows_table_sha256")}
    content["shards"] = [{k: v for k, v in e.items() if k != "sha256"} for e in manifest["shards"]]
    text = json.dumps(content, indent=2, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(shard_dir: Path) -> dict:
    path = Path(shard_dir) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: materialize psf_matched_shards first")
    return json.loads(path.read_text())


def matched_psf_fwhm(catalog: pd.DataFrame, survey: SurveySpec, *, root: Path, settings: ShardSettings,
                     max_objects: int = 64, seed: int = 0) -> pd.DataFrame:
    """Send a sample of the catalog's PSF images through the shard builder's own matching and measure them.

    Returns one row per (object, band) that was matched from a PSF image: the
    measured FWHM of the matched PSF, the target and the relative error.
    """
    from .psf import measure_fwhm_px

    with_psf = catalog[catalog["psf_image_available"]]
    sample = with_psf.sample(n=min(max_objects, len(with_psf)), random_state=seed) if len(with_psf) else with_psf
    k = settings.kernel_size
    canvas = 2 * k + 1
    out = []
    for row in sample.itertuples():
        c = read_cutout((Path(root) / row.source_file).read_bytes(), name=row.source_file, survey=survey)
        norm = normalize_cutout(c, survey)
        planes = np.zeros((1, survey.n_bands, canvas, canvas))
        for b, p in enumerate(norm.psf):
            if p is not None:
                s = min(p.shape[0], canvas)
                planes[0, b] += np.pad(center_crop(p, s), (canvas - s) // 2)
        res = homogenize(planes, planes, [norm.psf], c.psf_fwhm_arcsec[None], c.present[None],
                         pixel_scale_arcsec=survey.pixel_scale_arcsec, target_fwhm=settings.target_fwhm_arcsec,
                         kernel_size=k)
        for b, band in enumerate(survey.band_names):
            if res.matched[0, b] and res.kernel_source[0, b] == "psf_image":
                fwhm = measure_fwhm_px(res.image[0, b]) * survey.pixel_scale_arcsec
                out.append({"objid": row.objid, "band": band, "fwhm_before": float(c.psf_fwhm_arcsec[b]),
                            "fwhm_matched": fwhm, "target": settings.target_fwhm_arcsec,
                            "rel_error": fwhm / settings.target_fwhm_arcsec - 1.0})
    return pd.DataFrame(out, columns=["objid", "band", "fwhm_before", "fwhm_matched", "target", "rel_error"])
