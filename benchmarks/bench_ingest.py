"""Ingest throughput: `ingest_files` against a bare astropy open-and-read loop over the same files.

    python benchmarks/bench_ingest.py [--survey des] [--n 1000]

* bare astropy: ``fits.open`` each file and read every HDU's data, one process.
* ingest, 1 worker: validation, quarantine rules, sha256, measurements, catalog rows.
* ingest, all cores: the same over a process pool.
* ingest without variance, 1 worker: the same files rewritten without their
  ``VAR_<b>`` extensions, so every band's variance is derived from its sky pixels
  (science/noise.py); what that costs per file is reported beside the plain rate.
* ingest of gzip-compressed files, 1 worker: the same files as ``*.fits.gz``, read through the bounded
  decompression (``fits_reader.gunzip``: zlib's ``max_length`` stops a file that expands past
  ``MAX_FILE_BYTES`` before it is held); beside it ``gunzip`` against ``gzip.decompress`` alone over those
  files (what the bound costs).
* pool start-up: ingest of one file per core over a fresh pool (``workers=0``), the
  first pool of the process apart from the later ones (a forkserver starts once
  per process), median of ``--startup-repeats``.
Figures: ingest(1) / bare (target >= 0.7), ingest(all) / ingest(1) (scaling),
ingest without variance / with, gzip / plain, gunzip / gzip.decompress, and the pool start-up medians.
The files are simulated first (untimed) and read once before timing so every
variant sees a warm page cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, report, timed  # noqa: E402

from lens_assets.science import parallel  # noqa: E402
from lens_assets.science.families import load_family  # noqa: E402
from lens_assets.science.ingest import find_fits, ingest_files  # noqa: E402
from lens_assets.science.simulation import simulate_to_directory  # noqa: E402
from lens_assets.science.surveys import get_survey  # noqa: E402


def bare_astropy(paths):
    from astropy.io import fits

    total = 0.0
    for p in paths:
        with fits.open(p, memmap=False) as hdul:
            for hdu in hdul:
                if hdu.data is not None:
                    total += float(hdu.data[0, 0])
    return total


def without_variance(paths, out_dir: Path) -> list[Path]:
    """Copies of ``paths`` without their VAR_<band> extensions (untimed setup)."""
    from astropy.io import fits

    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        with fits.open(p, memmap=False) as hdul:
            kept = fits.HDUList([h.copy() for h in hdul if not h.name.upper().startswith("VAR_")])
            kept.writeto(out_dir / p.name, overwrite=True)
        out.append(out_dir / p.name)
    return out


def gzipped(paths, out_dir: Path) -> list[Path]:
    """The files compressed as ``<name>.gz`` under ``out_dir``."""
    import gzip

    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        (out_dir / f"{p.name}.gz").write_bytes(gzip.compress(p.read_bytes(), compresslevel=6))
        out.append(out_dir / f"{p.name}.gz")
    return out


def decompress_all(blobs, fn) -> None:
    for name, data in blobs:
        fn(data, name)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--survey", default="des")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--startup-repeats", type=int, default=7)
    args = ap.parse_args(argv)
    survey = get_survey(args.survey)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        simulate_to_directory(survey, load_family("baseline"), n_cutouts=args.n, seed=11,
                              out_dir=root / "raw" / survey.name / "sim-11", workers=0, progress=False)
        paths = find_fits(root / "raw" / survey.name)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        bare_astropy(paths)  # warm the page cache and imports
        ingest_files(paths[:20], survey, root=root, workers=1, progress=False)
        few = paths[:cores()]  # one file per worker: the time is the pool's start-up and one task each
        startup = [timed(ingest_files, few, survey, root=root, workers=0, progress=False)[1]
                   for _ in range(1 + args.startup_repeats)]
        t_bare = min(timed(bare_astropy, paths)[1] for _ in range(args.repeats))
        t_one = min(timed(ingest_files, paths, survey, root=root, workers=1, progress=False)[1]
                    for _ in range(args.repeats))
        results = [timed(ingest_files, paths, survey, root=root, workers=0, progress=False)
                   for _ in range(args.repeats)]
        t_all = min(t for _, t in results)
        assert len(results[0][0].catalog) == len(paths)
        novar = without_variance(paths, root / "novar" / survey.name)
        ingest_files(novar[:20], survey, root=root, workers=1, progress=False)
        novar_results = [timed(ingest_files, novar, survey, root=root, workers=1, progress=False)
                         for _ in range(args.repeats)]
        t_novar = min(t for _, t in novar_results)
        flags = novar_results[0][0].catalog["band_flags"]
        assert len(novar_results[0][0].catalog) == len(novar) and flags.str.contains("var_derived").all()
        import gzip

        from lens_assets.science.fits_reader import gunzip

        gz = gzipped(paths, root / "gz" / survey.name)
        gz_results = [timed(ingest_files, gz, survey, root=root, workers=1, progress=False)
                      for _ in range(args.repeats)]
        t_gz = min(t for _, t in gz_results)
        assert len(gz_results[0][0].catalog) == len(gz)
        blobs = [(p.name, p.read_bytes()) for p in gz]
        t_gunzip = [timed(decompress_all, blobs, gunzip)[1] for _ in range(3)]
        t_plain_gz = [timed(decompress_all, blobs, lambda d, _n: gzip.decompress(d))[1] for _ in range(3)]
    n, c = len(paths), cores()
    rec = {"survey": survey.name, "n_files": n, "mb": size_mb, "cores": c,
           "bare_files_per_s": n / t_bare, "ingest_1_files_per_s": n / t_one, "ingest_all_files_per_s": n / t_all,
           "ingest_1_over_bare": t_bare / t_one, "scaling": t_one / t_all,
           "ingest_1_novar_files_per_s": n / t_novar, "novar_ms_per_file": 1e3 * (t_novar - t_one) / n,
           "novar_over_var": t_one / t_novar,
           "ingest_1_gz_files_per_s": n / t_gz, "gz_over_plain": t_one / t_gz,
           "gunzip_ms_per_file": 1e3 * statistics.median(t_gunzip) / n,
           "gzip_decompress_ms_per_file": 1e3 * statistics.median(t_plain_gz) / n,
           "pool_start_method": getattr(parallel, "START_METHOD", "fork"),
           "pool_first_startup_s": startup[0], "pool_startup_median_s": statistics.median(startup[1:]),
           "ingest_all_median_s": statistics.median(t for _, t in results)}
    report("ingest", [
        ("files", f"{n} {survey.name} cutouts, {survey.n_bands} bands x (image, var, psf), {size_mb:.0f} MB"),
        ("bare astropy open+read (1 core)", f"{rec['bare_files_per_s']:.0f} files/s"),
        ("ingest_files, 1 worker", f"{rec['ingest_1_files_per_s']:.0f} files/s  -> "
                                   f"{rec['ingest_1_over_bare']:.2f}x bare (target >= 0.7x)"),
        (f"ingest_files, {c} workers", f"{rec['ingest_all_files_per_s']:.0f} files/s  -> "
                                       f"{rec['scaling']:.2f}x one worker"),
        ("ingest_files without VAR_<b>, 1 worker", f"{rec['ingest_1_novar_files_per_s']:.0f} files/s  -> "
                                                  f"{rec['novar_over_var']:.2f}x with variance, "
                                                  f"+{rec['novar_ms_per_file']:.2f} ms/file for {survey.n_bands} "
                                                  f"sky-noise estimates"),
        ("ingest_files of *.fits.gz, 1 worker", f"{rec['ingest_1_gz_files_per_s']:.0f} files/s  -> "
                                                f"{rec['gz_over_plain']:.2f}x the plain files"),
        ("bounded gunzip vs gzip.decompress (median of 3)",
         f"{rec['gunzip_ms_per_file']:.3f} vs {rec['gzip_decompress_ms_per_file']:.3f} ms/file -> "
         f"{rec['gunzip_ms_per_file'] / rec['gzip_decompress_ms_per_file']:.2f}x"),
        (f"pool start-up ({rec['pool_start_method']}, {c} files)",
         f"first {rec['pool_first_startup_s'] * 1e3:.0f} ms, then median {rec['pool_startup_median_s'] * 1e3:.0f} ms "
         f"({args.startup_repeats} pools)"),
    ], rec)
    return rec


if __name__ == "__main__":
    main()
