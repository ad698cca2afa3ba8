"""PSF-matched, flux-normalized HDF5 shards (lens_assets.science.shards).

A small simulated sdss population (48 px cutouts, the fastest survey) is
ingested once per module; a few hand-written files with known sources check
flux conservation and the PSF actually reached.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from scipy.special import erf

from lens_assets.science import fits_validation
from lens_assets.science.families import load_family
from lens_assets.science.fits_contract import BandHDUs, read_cutout, write_cutout
from lens_assets.science.ingest import find_fits, ingest_files
from lens_assets.science.psf import measure_fwhm_px, psf_kernel
from lens_assets.science.shards import (FLAG_BITS, SHARD_FORMAT_VERSION, build_shards, manifest_data_version,
                                        match_batch, matched_psf_fwhm, read_manifest, shard_content_sha256,
                                        shard_settings)
from lens_assets.science.simulation import simulate_to_directory
from lens_assets.science.surveys import get_survey

SDSS = get_survey("sdss")
BANDS = SDSS.band_names  # u g r i z
SIZE = SDSS.cutout_size_px  # 48
PIX = SDSS.pixel_scale_arcsec  # 0.396
N_SIM = 24
BROADER = FLAG_BITS["psf_broader_than_target"]
HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """(root, catalog): 24 simulated sdss cutouts in root/raw/sdss/sim-0, ingested."""
    root = tmp_path_factory.mktemp("shards")
    simulate_to_directory(SDSS, load_family("baseline"), n_cutouts=N_SIM, seed=3, out_dir=root / "raw/sdss/sim-0",
                          workers=1, progress=False)
    result = ingest_files(find_fits(root / "raw/sdss/sim-0"), SDSS, root=root, workers=1, progress=False)
    assert result.quarantine.empty and len(result.catalog) == N_SIM
    return root, result.catalog


@pytest.fixture(scope="module")
def built(sim):
    """(root, catalog, out_dir, settings, manifest) of a workers=1 build with 10 rows per shard."""
    root, catalog = sim
    settings = shard_settings(SDSS, rows_per_shard=10)
    out = root / "shards-w1"
    manifest = build_shards(catalog, SDSS, root=root, out_dir=out, settings=settings, workers=1, progress=False)
    return root, catalog, out, settings, manifest


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_shards(out_dir: Path, manifest: dict) -> dict:
    """Every dataset of every shard in ``manifest``, concatenated in order (objid as str)."""
    parts: dict[str, list] = {}
    for entry in manifest["shards"]:
        with h5py.File(Path(out_dir) / entry["file"], "r") as f:
            for key in f:
                parts.setdefault(key, []).append(f["objid"].asstr()[:] if key == "objid" else f[key][:])
    return {k: np.concatenate(v) for k, v in parts.items()}


def nanomaggy_input(root: Path, source_file: str):
    """The file's image and variance in nanomaggies (float64 reference; the shard builder converts in float32)."""
    c = read_cutout((Path(root) / source_file).read_bytes(), name=source_file, survey=SDSS)
    scale = c.nmgy_per_unit[:, None, None]
    image = (c.image.astype(np.float64) * scale).astype(np.float32)
    variance = (c.variance.astype(np.float64) * scale**2).astype(np.float32)
    return c, image, variance


def repeated(catalog: pd.DataFrame, times: int) -> pd.DataFrame:
    """``catalog`` ``times`` over with unique objids, all rows pointing at the same source files."""
    return pd.concat([catalog.assign(objid=catalog["objid"] + f"-rep{k}") for k in range(times)],
                     ignore_index=True)


# --------------------------------------------------------------------------- 1. layout and manifest


def test_shards_rows_and_checksums(built):
    root, catalog, out, settings, manifest = built
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 4]
    assert manifest["n_rows"] == len(catalog) == N_SIM
    for entry in manifest["shards"]:
        assert HEX64.match(entry["sha256"])
        assert sha256(out / entry["file"]) == entry["sha256"]
        with h5py.File(out / entry["file"], "r") as f:
            assert len(f["images"]) == entry["rows"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rows.parquet", "shard-00000.h5",
                                                     "shard-00001.h5", "shard-00002.h5"]
    assert HEX64.match(manifest["sha256"])
    assert read_manifest(out) == manifest
    assert manifest["survey"] == "sdss" and manifest["bands"] == list(BANDS)
    assert manifest["cutout_size_px"] == SIZE and manifest["pixel_scale_arcsec"] == PIX
    assert manifest["format_version"] == SHARD_FORMAT_VERSION and manifest["rows_table"] == "rows.parquet"
    assert manifest["settings"]["target_fwhm_arcsec"] == settings.target_fwhm_arcsec
    assert manifest["settings"]["rows_per_shard"] == 10


def test_read_manifest_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest.json does not exist: materialize psf_matched_shards"):
        read_manifest(tmp_path)


def test_rows_table_locates_every_object(built):
    root, catalog, out, settings, manifest = built
    rows = pd.read_parquet(out / "rows.parquet")
    assert len(rows) == N_SIM and rows["objid"].is_unique
    assert list(rows["objid"]) == list(catalog["objid"])
    expected_shard = [f"shard-{i // 10:05d}.h5" for i in range(N_SIM)]
    assert list(rows["shard"]) == expected_shard
    assert list(rows["index"]) == [i % 10 for i in range(N_SIM)]
    assert list(rows["label"]) == list(catalog["label"])
    # each (shard, index) really holds that objid
    for shard, part in rows.groupby("shard"):
        with h5py.File(out / shard, "r") as f:
            objids = f["objid"].asstr()[:]
        assert list(objids[part["index"].to_numpy()]) == list(part["objid"])
    for b in BANDS:
        np.testing.assert_allclose(rows[f"fwhm_before_{b}"], catalog[f"psf_fwhm_{b}"], rtol=1e-6)
        assert rows[f"psf_matched_{b}"].dtype == bool


def test_hdf5_datasets(built):
    root, catalog, out, settings, manifest = built
    n = 0
    for entry in manifest["shards"]:
        with h5py.File(out / entry["file"], "r") as f:
            rows = entry["rows"]
            for key in ("images", "variance"):
                ds = f[key]
                assert ds.shape == (rows, 5, SIZE, SIZE) and ds.dtype == np.float32
                assert ds.chunks == (1, 5, SIZE, SIZE)
                assert ds.compression == "lzf" and ds.shuffle
            assert f["band_flags"].shape == (rows, 5) and f["band_flags"].dtype == np.uint16
            assert f["footprint_px"].shape == (rows,) and (f["footprint_px"][:] == SIZE).all()  # none padded
            for key in ("fwhm_before", "fwhm_after", "residual"):
                assert f[key].shape == (rows, 5) and f[key].dtype == np.float32
            assert f["psf_matched"].dtype == bool
            assert f["label"].dtype == np.int8
            part = catalog.iloc[n:n + rows]
            assert list(f["objid"].asstr()[:]) == list(part["objid"])
            np.testing.assert_array_equal(f["label"][:], part["label"].to_numpy())
            for col in ("label_confidence", "flux_ratio", "theta_e"):
                np.testing.assert_allclose(f[col][:], part[col].to_numpy(), rtol=1e-6)
            attrs = f.attrs
            assert attrs["survey"] == "sdss" and attrs["bands"] == "u,g,r,i,z"
            assert attrs["target_fwhm_arcsec"] == settings.target_fwhm_arcsec
            assert "nanomaggies" in attrs["units"] and attrs["format_version"] == SHARD_FORMAT_VERSION
            assert np.isfinite(f["images"][:]).all() and (f["variance"][:] >= -1e-6).all()
        n += rows
    assert n == N_SIM


@pytest.mark.parametrize("compression,expected", [("gzip", "gzip"), ("none", None)])
def test_compression_changes_bytes_not_data(built, compression, expected):
    root, catalog, out, settings, manifest = built
    other = root / f"shards-{compression}"
    m = build_shards(catalog, SDSS, root=root, out_dir=other,
                     settings=shard_settings(SDSS, rows_per_shard=10, compression=compression), workers=1,
                     progress=False)
    a, b = read_shards(out, manifest), read_shards(other, m)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with h5py.File(other / "shard-00000.h5", "r") as f:
        assert f["images"].compression == expected


def test_missing_catalog_columns_are_named(built, tmp_path):
    root, catalog, *_ = built
    with pytest.raises(ValueError, match=r"catalog lacks columns \['source_sha256', 'theta_e'\]"):
        build_shards(catalog.drop(columns=["source_sha256", "theta_e"]), SDSS, root=root, out_dir=tmp_path,
                     settings=shard_settings(SDSS), workers=1, progress=False)


# --------------------------------------------------------------------------- 2. determinism


def content_sha256_of_file(path: Path) -> str:
    """A shard's content hash from the file: every dataset read back whole with h5py and hashed here, combined by
    ``shard_content_sha256`` (the writer hashes the rows as they arrive instead)."""
    datasets = {}
    with h5py.File(path, "r") as f:
        for key in f:
            if key == "objid":
                objids = list(f["objid"].asstr()[:])
                datasets[key] = ["utf-8", [len(objids)], hashlib.sha256(json.dumps(objids).encode()).hexdigest()]
            else:
                data = np.ascontiguousarray(f[key][:])
                datasets[key] = [data.dtype.str, list(data.shape), hashlib.sha256(data.tobytes()).hexdigest()]
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    return shard_content_sha256(datasets, attrs)


def test_same_shards_with_one_or_two_workers(built):
    root, catalog, out, settings, manifest = built
    m2 = build_shards(catalog, SDSS, root=root, out_dir=root / "shards-w2", settings=settings, workers=2,
                      progress=False)
    a, b = read_shards(out, manifest), read_shards(root / "shards-w2", m2)
    for key in a:  # the data are the same ...
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # ... so their content hashes and the data version are; the file bytes need not be (HDF5 metadata blocks)
    assert [s["content_sha256"] for s in m2["shards"]] == [s["content_sha256"] for s in manifest["shards"]]
    assert m2["sha256"] == manifest["sha256"]  # the data version ignores the build time
    assert m2["seconds"] >= 0 and "seconds" in manifest
    for entry in m2["shards"]:
        assert sha256(root / "shards-w2" / entry["file"]) == entry["sha256"]
    pd.testing.assert_frame_equal(pd.read_parquet(root / "shards-w2/rows.parquet"),
                                  pd.read_parquet(out / "rows.parquet"))


def test_data_version_independent_of_workers_for_larger_catalogs(sim):
    root, catalog = sim
    big = repeated(catalog, 3)  # 72 rows: batches of 18 with one worker, 16 with two
    settings = shard_settings(SDSS)
    m1 = build_shards(big, SDSS, root=root, out_dir=root / "det-w1", settings=settings, workers=1, progress=False)
    m2 = build_shards(big, SDSS, root=root, out_dir=root / "det-w2", settings=settings, workers=2, progress=False)
    a, b = read_shards(root / "det-w1", m1), read_shards(root / "det-w2", m2)
    for key in a:  # the data are the same ...
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # ... so the content hashes and the data version should be too
    assert [s["content_sha256"] for s in m1["shards"]] == [s["content_sha256"] for s in m2["shards"]]
    assert m1["sha256"] == m2["sha256"]


def test_content_hash_is_the_data_read_back_and_the_data_version_follows_content_not_file_bytes(built, tmp_path):
    root, catalog, out, settings, manifest = built
    for entry in manifest["shards"]:
        assert HEX64.match(entry["content_sha256"])
        assert content_sha256_of_file(out / entry["file"]) == entry["content_sha256"]
    assert manifest_data_version(manifest) == manifest["sha256"]
    # other bytes, same content (as another HDF5 process state could write): same data version
    rebytes = json.loads(json.dumps(manifest))
    for entry in rebytes["shards"]:
        entry["sha256"] = "f" * 64
    rebytes["rows_table_sha256"] = "e" * 64
    assert manifest_data_version(rebytes) == manifest["sha256"]
    # one changed value in one shard: another content hash and another data version
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    with h5py.File(changed / "shard-00001.h5", "r+") as f:
        f["theta_e"][3] = f["theta_e"][3] + 0.5
    assert content_sha256_of_file(changed / "shard-00001.h5") != manifest["shards"][1]["content_sha256"]
    edited = json.loads(json.dumps(manifest))
    edited["shards"][1]["content_sha256"] = content_sha256_of_file(changed / "shard-00001.h5")
    assert manifest_data_version(edited) != manifest["sha256"]


# --------------------------------------------------------------------------- 3. flux in nanomaggies


def test_simulated_flux_is_kept(built):
    """Unmatched bands are the nanomaggy input bit for bit; matched bands keep the catalog flux up to the
    noise that the zero-padded convolution spills off the 48 px edges (sdss files have no margin)."""
    root, catalog, out, settings, manifest = built
    data = read_shards(out, manifest)
    totals = data["images"].astype(np.float64).sum(axis=(2, 3))
    margin = settings.kernel_size // 2
    border = np.ones((SIZE, SIZE), bool)
    border[margin:-margin, margin:-margin] = False
    n_bright = n_unmatched = 0
    for j, row in enumerate(catalog.itertuples()):
        c, image, variance = nanomaggy_input(root, row.source_file)
        for b, band in enumerate(BANDS):
            flux = getattr(row, f"flux_{band}")
            assert image[b].sum(dtype=np.float64) == pytest.approx(flux, rel=1e-5, abs=1e-4)
            if not data["psf_matched"][j, b]:
                n_unmatched += 1
                np.testing.assert_allclose(data["images"][j, b], image[b], rtol=1e-6)  # float32 conversion
                np.testing.assert_allclose(data["variance"][j, b], variance[b], rtol=1e-6)
            elif flux > 10:
                n_bright += 1
                edge_noise = math.sqrt(variance[b][border].sum(dtype=np.float64))
                assert abs(totals[j, b] - flux) <= 0.01 * flux + edge_noise, (row.objid, band)
    assert n_bright >= 20 and n_unmatched >= 5


def _pixel_gaussian(size: int | tuple[int, int], fwhm_px: float, total: float) -> np.ndarray:
    """A pixel-integrated circular Gaussian of total ``total`` centred on the (even or odd) image centre;
    ``size`` is the side, or (height, width)."""
    sigma = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    h, w = (size, size) if isinstance(size, int) else size
    lines = [np.diff(erf((np.arange(n + 1) - n / 2) / (math.sqrt(2.0) * sigma))) / 2.0 for n in (h, w)]
    return total * np.outer(*lines)


GALAXY_FWHM = 0.6  # arcsec, intrinsic
PSF_FWHM = {"u": 1.2, "g": 1.1, "r": 1.0, "i": 0.9, "z": 2.2}  # z is broader than the default target (1.98")
TOTAL_COUNTS = {"u": 400.0, "g": 800.0, "r": 1000.0, "i": 1200.0, "z": 1500.0}  # count/s
MAGZP = 24.0  # 1 count/s = 10**(-0.4 * 1.5) nanomaggies
NMGY_PER_COUNT = 10 ** (-0.4 * (MAGZP - 22.5))


def _write_known(path: Path, objid: str, size: int, *, seed: int, with_psf: bool = True) -> None:
    rng = np.random.default_rng(seed)
    bands = {}
    for band in BANDS:
        psf_px = PSF_FWHM[band] / PIX
        observed = math.hypot(GALAXY_FWHM, PSF_FWHM[band]) / PIX
        image = _pixel_gaussian(size, observed, TOTAL_COUNTS[band]) + rng.normal(0.0, 0.001, (size, size))
        psf = psf_kernel("gaussian", psf_px, size=25).astype(np.float32) if with_psf else None
        bands[band] = BandHDUs(image=image.astype(np.float32), variance=np.full((size, size), 1e-4, np.float32),
                               psf=psf, header={"BUNIT": "count/s", "MAGZP": MAGZP, "PIXSCALE": PIX,
                                                "PSFFWHM": PSF_FWHM[band]})
    write_cutout(path, {"OBJID": objid, "RA": 150.0 + seed * 0.01, "DEC": 2.0, "SURVEY": "sdss"}, bands)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """Three files with a centred Gaussian galaxy of known flux: 48 px, 64 px (cropped in the shard) and
    48 px without PSF images (Gaussian kernels from PSFFWHM)."""
    root = tmp_path_factory.mktemp("known")
    inbox = root / "inbox/sdss"
    inbox.mkdir(parents=True)
    _write_known(inbox / "a48.fits", "known-48", 48, seed=1)
    _write_known(inbox / "b64.fits", "known-64", 64, seed=2)
    _write_known(inbox / "c48_nopsf.fits", "known-nopsf", 48, seed=3, with_psf=False)
    result = ingest_files(find_fits(inbox), SDSS, root=root, workers=1, progress=False)
    assert result.quarantine.empty, result.quarantine["message"].tolist()
    catalog = result.catalog
    settings = shard_settings(SDSS)
    manifest = build_shards(catalog, SDSS, root=root, out_dir=root / "shards", settings=settings, workers=1,
                            progress=False)
    return root, catalog, settings, manifest, read_shards(root / "shards", manifest)


def test_known_sources_flux_conserved_in_nanomaggies(known):
    root, catalog, settings, manifest, data = known
    assert list(data["objid"]) == ["known-48", "known-64", "known-nopsf"]
    assert data["images"].shape == (3, 5, SIZE, SIZE)
    totals = data["images"].astype(np.float64).sum(axis=(2, 3))
    for j, row in enumerate(catalog.itertuples()):
        for b, band in enumerate(BANDS):
            expected = TOTAL_COUNTS[band] * NMGY_PER_COUNT
            assert getattr(row, f"flux_{band}") == pytest.approx(expected, rel=2e-3)
            # matched or not, cropped from 64 px or not: the shard keeps the flux (well within 1%)
            assert totals[j, b] == pytest.approx(getattr(row, f"flux_{band}"), rel=2e-3), (row.objid, band)
            assert totals[j, b] == pytest.approx(expected, rel=0.01)


def test_known_sources_reach_the_target_psf(known):
    root, catalog, settings, manifest, data = known
    target = settings.target_fwhm_arcsec
    for j in range(3):
        for b, band in enumerate(BANDS):
            measured = measure_fwhm_px(data["images"][j, b]) * PIX
            if band == "z":  # already broader: left as observed
                assert not data["psf_matched"][j, b]
                assert measured == pytest.approx(math.hypot(GALAXY_FWHM, PSF_FWHM["z"]), rel=0.03)
            else:  # galaxy (x) target PSF
                assert data["psf_matched"][j, b]
                assert measured == pytest.approx(math.hypot(GALAXY_FWHM, target), rel=0.03), (j, band)
    # the centred source stays centred after the 64 -> 48 px crop
    img = data["images"][1, 2]
    yy, xx = np.mgrid[:SIZE, :SIZE]
    assert (img * yy).sum() / img.sum() == pytest.approx((SIZE - 1) / 2, abs=0.05)
    assert (img * xx).sum() / img.sum() == pytest.approx((SIZE - 1) / 2, abs=0.05)


def test_known_sources_variance_is_propagated(known):
    """Variance goes through kernel^2: a constant variance map shrinks in the interior of matched bands."""
    root, catalog, settings, manifest, data = known
    const = 1e-4 * NMGY_PER_COUNT**2
    centre = slice(SIZE // 2 - 4, SIZE // 2 + 4)
    for j in range(3):
        for b, band in enumerate(BANDS):
            v = data["variance"][j, b][centre, centre]
            if data["psf_matched"][j, b]:
                assert (v < const).all() and (v > 0).all()
            else:
                np.testing.assert_allclose(data["variance"][j, b], const, rtol=1e-6)


# --------------------------------------------------------------------------- 4. PSF bookkeeping


def test_psf_matching_bookkeeping(built):
    root, catalog, out, settings, manifest = built
    d = read_shards(out, manifest)
    target = np.float32(settings.target_fwhm_arcsec)
    matched, before, after, residual, flags = (d["psf_matched"], d["fwhm_before"], d["fwhm_after"], d["residual"],
                                               d["band_flags"])
    np.testing.assert_allclose(before, catalog[[f"psf_fwhm_{b}" for b in BANDS]].to_numpy(), rtol=1e-6)
    assert matched.any() and (~matched).any()
    np.testing.assert_array_equal(after[matched], target)
    np.testing.assert_array_equal(after[~matched], before[~matched])
    assert (before[matched] < target).all()
    broader = (flags & BROADER) != 0
    np.testing.assert_array_equal(residual > 0, broader)
    np.testing.assert_array_equal(broader, ~matched)  # every band is present in the simulated files
    np.testing.assert_allclose(residual[broader], before[broader] - target, rtol=1e-5, atol=1e-6)
    assert (residual[~broader] == 0).all()
    assert manifest["n_band_matched"] == int(matched.sum())
    assert manifest["n_band_broader_than_target"] == int(broader.sum())
    rows = pd.read_parquet(out / "rows.parquet")
    np.testing.assert_allclose(rows["max_residual"], residual.max(axis=1))


def test_narrow_target_matches_nothing_and_flags_everything(sim, tmp_path):
    root, catalog = sim
    settings = shard_settings(SDSS, target_fwhm_arcsec=0.5)  # narrower than every sdss PSF
    assert settings.kernel_size == 11
    manifest = build_shards(catalog, SDSS, root=root, out_dir=tmp_path, settings=settings, workers=1,
                            progress=False)
    assert manifest["n_band_matched"] == 0
    assert manifest["n_band_broader_than_target"] == N_SIM * 5
    d = read_shards(tmp_path, manifest)
    assert not d["psf_matched"].any()
    assert ((d["band_flags"] & BROADER) != 0).all()
    np.testing.assert_array_equal(d["fwhm_after"], d["fwhm_before"])
    np.testing.assert_allclose(d["residual"], d["fwhm_before"] - np.float32(0.5), rtol=1e-5)
    for j, row in enumerate(catalog.itertuples()):
        c, image, variance = nanomaggy_input(root, row.source_file)
        assert not np.allclose(c.nmgy_per_unit, 1.0)  # the conversion is really exercised
        np.testing.assert_allclose(d["images"][j], image, rtol=1e-6)  # float32 conversion
        np.testing.assert_allclose(d["variance"][j], variance, rtol=1e-6)


# --------------------------------------------------------------------------- 5. matched PSF check


def test_matched_psf_fwhm_hits_target(built):
    root, catalog, out, settings, manifest = built
    table = matched_psf_fwhm(catalog, SDSS, root=root, settings=shard_settings(SDSS))
    assert list(table.columns) == ["objid", "band", "fwhm_before", "fwhm_matched", "target", "rel_error"]
    assert len(table) == manifest["n_band_matched"]  # every matched band had a PSF image
    assert (table["rel_error"].abs() <= 0.03).all(), table["rel_error"].describe()
    assert (table["fwhm_before"] < table["target"]).all()
    assert (table["target"] == settings.target_fwhm_arcsec).all()
    np.testing.assert_allclose(table["rel_error"], table["fwhm_matched"] / table["target"] - 1.0)


# --------------------------------------------------------------------------- 6. stale inputs


def _copy_files(src_root: Path, dst_root: Path, names) -> None:
    for name in names:
        (dst_root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_root / name, dst_root / name)


def test_file_changed_after_cataloging_raises(sim, tmp_path):
    root, catalog = sim
    part = catalog.iloc[:2]
    _copy_files(root, tmp_path, part["source_file"])
    settings = shard_settings(SDSS)
    # unchanged copies build fine
    build_shards(part, SDSS, root=tmp_path, out_dir=tmp_path / "ok", settings=settings, workers=1, progress=False)
    # a file rewritten with other (valid FITS) bytes
    changed = part["source_file"].iloc[1]
    shutil.copyfile(root / part["source_file"].iloc[0], tmp_path / changed)
    with pytest.raises(ValueError, match=r"changed after cataloging") as err:
        build_shards(part, SDSS, root=tmp_path, out_dir=tmp_path / "bad", settings=settings, workers=1,
                     progress=False)
    assert changed in str(err.value) and "re-materialize cutout_catalog" in str(err.value)
    assert not (tmp_path / "bad/manifest.json").exists()


def test_a_file_swapped_for_one_over_the_size_limit_is_refused_unread(sim, tmp_path, monkeypatch):
    root, catalog = sim
    part = catalog.iloc[:2]
    _copy_files(root, tmp_path, part["source_file"])
    changed = tmp_path / part["source_file"].iloc[1]
    changed.write_bytes(changed.read_bytes() * 3)  # larger than any file the catalog read, under the lowered limit
    monkeypatch.setattr(fits_validation, "MAX_FILE_BYTES", (changed.stat().st_size // 3) * 2)
    read = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or open(self, "rb").read())
    with pytest.raises(ValueError, match=r"over MAX_FILE_BYTES .* changed after cataloging") as err:
        build_shards(part, SDSS, root=tmp_path, out_dir=tmp_path / "bad", settings=shard_settings(SDSS), workers=1,
                     progress=False)
    assert part["source_file"].iloc[1] in str(err.value)
    assert changed.name not in read  # refused from its size


# --------------------------------------------------------------------------- 7. settings


def test_shard_settings_defaults():
    s = shard_settings(SDSS)
    broadest = max(b.seeing_fwhm_arcsec for b in SDSS.bands)
    assert broadest == 1.53  # u
    # norm.ppf(0.9) = 1.2816 (hand value); seeing_scatter 0.20
    assert s.target_fwhm_arcsec == pytest.approx(broadest * math.exp(1.2816 * SDSS.seeing_scatter), rel=1e-4)
    assert s.target_fwhm_arcsec == pytest.approx(1.9770, abs=1e-3)
    # 3 target FWHM each side: 1.977 / 0.396 = 4.99 px -> 2 * ceil(14.98) + 1 = 31
    assert s.kernel_size % 2 == 1 and s.kernel_size == 31
    assert s.kernel_size <= SIZE - 1
    assert (s.survey, s.cutout_size_px, s.rows_per_shard, s.batch_size, s.compression) == ("sdss", 48, 4096, 256,
                                                                                          "lzf")
    # a broad target is capped at the largest odd size below the cutout
    assert shard_settings(SDSS, target_fwhm_arcsec=5.0).kernel_size == 47
    # a narrow one is at least 11 px
    assert shard_settings(SDSS, target_fwhm_arcsec=0.2).kernel_size == 11
    # a higher percentile asks for a broader target
    assert shard_settings(SDSS, percentile=97.5).target_fwhm_arcsec > s.target_fwhm_arcsec


@pytest.mark.parametrize("kwargs,match", [
    ({"compression": "zip"}, r"compression 'zip' is not one of \['lzf', 'gzip', 'none'\]"),
    ({"target_fwhm_arcsec": 0.0}, r"target_fwhm_arcsec must be positive, got 0.0"),
    ({"target_fwhm_arcsec": -1.5}, r"target_fwhm_arcsec must be positive, got -1.5"),
    ({"percentile": 100.0}, r"percentile must be in \(0, 100\), got 100.0"),
], ids=["zip", "zero_target", "negative_target", "percentile_100"])
def test_shard_settings_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shard_settings(SDSS, **kwargs)


# --------------------------------------------------------------------------- 8. many rows, small batches


def test_many_rows_in_small_batches(sim, tmp_path):
    root, catalog = sim
    big = repeated(catalog, 10)
    assert len(big) == 240 and big["objid"].is_unique
    settings = shard_settings(SDSS, batch_size=16, rows_per_shard=100)
    manifest = build_shards(big, SDSS, root=root, out_dir=tmp_path, settings=settings, workers=1, progress=False)
    assert manifest["n_rows"] == 240
    assert [s["rows"] for s in manifest["shards"]] == [100, 100, 40]
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    assert len(rows) == 240 and list(rows["objid"]) == list(big["objid"])
    d = read_shards(tmp_path, manifest)
    assert d["images"].shape == (240, 5, SIZE, SIZE)
    # the same file gives the same shard row wherever it falls in the batches
    for k in range(1, 10):
        np.testing.assert_array_equal(d["images"][k * N_SIM:(k + 1) * N_SIM], d["images"][:N_SIM])


# --------------------------------------------------------------------------- 9. cutouts in their own sizes

HST = get_survey("hst")
DES = get_survey("des")
HST_NATIVE = 0.04  # arcsec/px of the HST test files; the hst grid is 160 px at 0.05"/px
NO_LABEL = {"label": -1, "label_confidence": 0.0, "flux_ratio": -1.0, "theta_e": -1.0}


def _own_size_file(path: Path, survey, size: int | tuple[int, int], pixel_scale: float, *, bands,
                   psf_fwhm_arcsec: float, seed: int = 0, total_nmgy: float = 100.0, noise: float = 0.001) -> bytes:
    """A centred Gaussian galaxy (FWHM 3 x the PSF) of ``total_nmgy`` per band, uniform variance noise**2,
    a Gaussian PSF image: ``size`` px (a side, or (height, width)) at ``pixel_scale``."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if isinstance(size, int) else size
    hdus = {}
    for band in bands:
        observed_px = math.hypot(3 * psf_fwhm_arcsec, psf_fwhm_arcsec) / pixel_scale
        image = _pixel_gaussian(shape, observed_px, total_nmgy) + rng.normal(0.0, noise, shape)
        hdus[band] = BandHDUs(image=image.astype(np.float32), variance=np.full(shape, noise**2, np.float32),
                              psf=psf_kernel("gaussian", psf_fwhm_arcsec / pixel_scale, size=25).astype(np.float32),
                              header={"BUNIT": "nanomaggy", "PIXSCALE": pixel_scale, "PSFFWHM": psf_fwhm_arcsec})
    write_cutout(path, {"OBJID": path.stem, "RA": 150.0, "DEC": 2.0, "SURVEY": survey.name}, hdus)
    return path.read_bytes()


def _row(objid: str) -> dict:
    return {"objid": objid, **NO_LABEL}


def _unpadded_match(norm, c, survey, settings):
    """What PSF matching gives on the footprint alone (zeros beyond its edges by construction)."""
    from lens_assets.science.normalize import center_crop as crop
    from lens_assets.science.psf import homogenize

    f = norm.footprint_px
    return homogenize(crop(norm.image, f)[None], crop(norm.variance, f)[None], [norm.psf], c.psf_fwhm_arcsec[None],
                      c.present[None], pixel_scale_arcsec=survey.pixel_scale_arcsec,
                      target_fwhm=settings.target_fwhm_arcsec, kernel_size=settings.kernel_size)


def test_hst_96px_at_004_one_band_is_resampled_and_padded_to_160(tmp_path):
    from lens_assets.science.normalize import normalize_cutout

    data = _own_size_file(tmp_path / "hst96.fits", HST, 96, HST_NATIVE, bands=["F814W"], psf_fwhm_arcsec=0.09)
    c = read_cutout(data, name="inbox/hst/hst96.fits", survey=HST)
    assert c.image.shape == (2, 96, 96) and c.pixel_scale_arcsec == pytest.approx(HST_NATIVE)
    assert c.band_flags == {"F814W": ["padded"], "F160W": ["missing", "padded"]}
    settings = shard_settings(HST)
    out = match_batch([_row(c.objid)], [c], settings)
    assert out["image"].shape == out["variance"].shape == (1, 2, 160, 160)
    foot = int(96 * HST_NATIVE / HST.pixel_scale_arcsec)  # 76 px of 0.05" (3.80" of the file's 3.84")
    assert out["footprint_px"][0] == foot == 76
    bits = out["band_flags"][0]
    for flag in ("padded", "resampled"):
        assert (bits & FLAG_BITS[flag] != 0).all(), flag
    assert bits[1] & FLAG_BITS["missing"] and not bits[0] & FLAG_BITS["missing"]
    assert out["psf_matched"][0].tolist() == [True, False]
    image, var = out["image"][0, 0], out["variance"][0, 0]
    assert np.isfinite(image).all() and np.isfinite(var).all() and (var >= -1e-6 * var.max()).all()  # FFT round-off
    # flux in nanomaggies is kept through resampling, padding and PSF matching (a compact, centred galaxy)
    assert image.sum(dtype=np.float64) == pytest.approx(100.0, rel=0.01)
    # padding is zero beyond the kernel's reach of the footprint; inside, it is what matching the footprint
    # alone gives (the zeros add nothing, and nothing wraps around)
    lo = (160 - foot) // 2
    reach = settings.kernel_size // 2
    outside = np.ones((160, 160), bool)
    outside[lo - reach:lo + foot + reach, lo - reach:lo + foot + reach] = False
    assert np.abs(image[outside]).max() <= 1e-6 * image.max() and np.abs(var[outside]).max() <= 1e-6 * var.max()
    norm = normalize_cutout(c, HST)
    assert norm.padded and norm.footprint_px == foot and norm.image.shape == (2, 160, 160)
    alone = _unpadded_match(norm, c, HST, settings)
    np.testing.assert_allclose(image[lo:lo + foot, lo:lo + foot], alone.image[0, 0], atol=1e-6 * image.max())
    np.testing.assert_allclose(var[lo:lo + foot, lo:lo + foot], alone.variance[0, 0], atol=1e-6 * var.max())
    # the matched variance falls off towards the padded edge (zeros convolved in), it never rises or rings
    # (resampling 0.04 -> 0.05"/px leaves a 4-px periodic pattern in it: compare over whole periods)
    centre = var[lo + reach:lo + foot - reach, lo + reach:lo + foot - reach]
    assert var.max() <= centre.max() * (1 + 1e-4)
    cols = slice(lo + reach, lo + reach + 48)
    assert var[lo, cols].mean() < var[lo + reach:lo + reach + 4, cols].mean()  # lower at the edge (narrow kernel)
    assert (out["image"][0, 1] == 0).all() and (out["variance"][0, 1] == 0).all()  # the missing band


def test_hst_96x140px_at_004_is_padded_to_square_then_resampled_and_padded_to_160(tmp_path):
    """A real HST cutout's shape: 96 rows, 140 columns at 0.04"/px (3.84" by 5.6"), one band with a PSF image."""
    data = _own_size_file(tmp_path / "hst96x140.fits", HST, (96, 140), HST_NATIVE, bands=["F814W"],
                          psf_fwhm_arcsec=0.09)
    c = read_cutout(data, name="inbox/hst/hst96x140.fits", survey=HST)
    assert c.file_shape == (96, 140) and c.square_offset_px == (22, 0) and c.image.shape == (2, 140, 140)
    assert c.band_flags == {"F814W": ["padded", "padded_square"], "F160W": ["missing", "padded", "padded_square"]}
    with fits.open(io.BytesIO(data)) as hdul:
        file_image = hdul["IMAGE_F814W"].data.astype(np.float32)
    np.testing.assert_array_equal(c.image[0, 22:118], file_image)  # every pixel of the file, rows moved by 22
    for pad in (np.s_[:22], np.s_[118:]):
        assert (c.image[0, pad] == 0).all() and (c.variance[0, pad] == 0).all() and not c.nan_mask[0, pad].any()
    out = match_batch([_row(c.objid)], [c], shard_settings(HST))
    assert out["image"].shape == (1, 2, 160, 160) and out["footprint_px"][0] == 112  # 140 x 0.04 / 0.05
    bits = int(out["band_flags"][0, 0])
    assert bits == FLAG_BITS["padded"] | FLAG_BITS["resampled"] | FLAG_BITS["padded_square"]
    image = out["image"][0, 0].astype(np.float64)
    # flux kept, and the galaxy at the file's centre stays at the grid's centre (H - W is even: no half pixel)
    assert image.sum() == pytest.approx(100.0, rel=0.01)
    y, x = np.mgrid[:160, :160]
    assert (image * y).sum() / image.sum() == pytest.approx(79.5, abs=0.05)
    assert (image * x).sum() / image.sum() == pytest.approx(79.5, abs=0.05)


def test_hst_40px_is_too_small_naming_size_and_minimum(tmp_path):
    from lens_assets.science.fits_contract import QuarantineError

    data = _own_size_file(tmp_path / "hst40.fits", HST, 40, HST_NATIVE, bands=["F814W"], psf_fwhm_arcsec=0.09)
    with pytest.raises(QuarantineError, match=r"inbox/hst/hst40\.fits: images are 40x40 px at 0\.04\"/px = 1\.60\" "
                                              r"across, less than the hst minimum min_cutout_arcsec = 3\.5\"") as err:
        read_cutout(data, name="inbox/hst/hst40.fits", survey=HST)
    assert err.value.reason == "too_small" and err.value.objid == "hst40"


def test_des_48px_is_padded_to_64(tmp_path):
    data = _own_size_file(tmp_path / "des48.fits", DES, 48, DES.pixel_scale_arcsec, bands=DES.band_names,
                          psf_fwhm_arcsec=1.0)
    c = read_cutout(data, name="des48.fits", survey=DES)
    assert 48 * DES.pixel_scale_arcsec == pytest.approx(12.62, abs=0.01)
    assert 48 * DES.pixel_scale_arcsec >= DES.min_cutout_arcsec == 10.0
    assert c.band_flags == {b: ["padded"] for b in DES.band_names}
    settings = shard_settings(DES)
    out = match_batch([_row(c.objid)], [c], settings)
    assert out["image"].shape == (1, 5, 64, 64) and out["footprint_px"][0] == 48
    assert (out["band_flags"][0] == FLAG_BITS["padded"]).all()  # not resampled: 0.263"/px already
    np.testing.assert_allclose(out["image"][0].sum(axis=(1, 2)), 100.0, rtol=0.01)
    from lens_assets.science.normalize import normalize_cutout

    norm = normalize_cutout(c, DES)
    alone = _unpadded_match(norm, c, DES, settings)
    np.testing.assert_allclose(out["image"][0][:, 8:56, 8:56], alone.image[0], atol=1e-6 * out["image"].max())
    np.testing.assert_allclose(out["variance"][0][:, 8:56, 8:56], alone.variance[0], atol=1e-6 * out["variance"].max())


def test_des_100px_is_cropped_to_64_and_flagged(tmp_path):
    data = _own_size_file(tmp_path / "des100.fits", DES, 100, DES.pixel_scale_arcsec, bands=DES.band_names,
                          psf_fwhm_arcsec=1.0)
    c = read_cutout(data, name="des100.fits", survey=DES)
    assert c.image.shape == (5, 100, 100) and c.band_flags == {b: ["cropped"] for b in DES.band_names}
    out = match_batch([_row(c.objid)], [c], shard_settings(DES))
    assert out["image"].shape == (1, 5, 64, 64) and out["footprint_px"][0] == 64
    assert (out["band_flags"][0] == FLAG_BITS["cropped"]).all()
    # the crop is the centre: the galaxy (FWHM 3.2") is inside, its flux kept to 1%
    np.testing.assert_allclose(out["image"][0].sum(axis=(1, 2)), 100.0, rtol=0.01)
    # 66 px (1.03x the grid) loses only the matching margin: not flagged
    small = _own_size_file(tmp_path / "des66.fits", DES, 66, DES.pixel_scale_arcsec, bands=DES.band_names,
                           psf_fwhm_arcsec=1.0)
    assert read_cutout(small, name="des66.fits", survey=DES).band_flags == {}


def test_own_size_hst_drop_every_file_processed_or_quarantined(tmp_path):
    inbox = tmp_path / "inbox/hst/drop-1"
    inbox.mkdir(parents=True)
    for size, scale in ((96, HST_NATIVE), (140, HST_NATIVE), (200, HST_NATIVE), (160, 0.05), (40, HST_NATIVE),
                        (80, 0.05)):
        _own_size_file(inbox / f"s{size}-{scale}.fits", HST, size, scale, bands=["F814W"], psf_fwhm_arcsec=0.09)
    (inbox / "broken.fits").write_bytes(b"not fits")
    result = ingest_files(find_fits(inbox), HST, root=tmp_path, workers=1, progress=False)
    assert result.n_files == 7 == len(result.catalog) + len(result.quarantine)
    assert sorted(result.quarantine["reason"]) == ["too_small", "unreadable"]
    assert result.quarantine.set_index("reason").loc["too_small", "source_file"].endswith("s40-0.04.fits")
    cat = result.catalog.set_index("objid")
    # 96 and 140 px at 0.04" are 76 and 112 px on the grid, 80 px at 0.05" is 4.0": padded; 200 px at 0.04"
    # is exactly the 8" grid, 160 px at 0.05" is the grid
    padded = cat["band_flags"].str.contains("padded")
    assert sorted(cat.index[padded]) == ["s140-0.04", "s80-0.05", "s96-0.04"]
    assert not cat["band_flags"].str.contains("cropped").any()
    settings = shard_settings(HST)
    manifest = build_shards(result.catalog, HST, root=tmp_path, out_dir=tmp_path / "shards", settings=settings,
                            workers=1, progress=False)
    assert manifest["n_rows"] == 5
    d = read_shards(tmp_path / "shards", manifest)
    assert d["images"].shape == (5, 2, 160, 160)
    foot = dict(zip(pd.read_parquet(tmp_path / "shards/rows.parquet")["objid"], d["footprint_px"]))
    assert foot == {"s96-0.04": 76, "s140-0.04": 112, "s200-0.04": 160, "s160-0.05": 160, "s80-0.05": 80}


def test_shards_are_hashed_streaming_not_read_whole_and_the_rows_table_is_in_the_manifest(sim, tmp_path,
                                                                                          monkeypatch):
    """A full shard is ~1 GB: its sha256 is computed in chunks, never from ``read_bytes()`` of the whole file.
    The rows table's sha256 is in the manifest too, so a reader can check every file the manifest names."""
    root, catalog = sim
    real = Path.read_bytes

    def no_whole_shard(self):
        if self.suffix in (".h5", ".tmp", ".parquet"):
            raise AssertionError(f"{self.name} read whole into memory")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", no_whole_shard)
    out = tmp_path / "shards"
    manifest = build_shards(catalog, SDSS, root=root, out_dir=out, settings=shard_settings(SDSS, rows_per_shard=10),
                            workers=1, progress=False)
    monkeypatch.undo()
    assert [e["sha256"] for e in manifest["shards"]] == [sha256(out / e["file"]) for e in manifest["shards"]]
    assert manifest["rows_table_sha256"] == sha256(out / "rows.parquet")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rows.parquet", "shard-00000.h5",
                                                     "shard-00001.h5", "shard-00002.h5"]
