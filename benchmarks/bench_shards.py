"""PSF matching + normalization throughput, shard-build peak memory, and data-loader headroom.

    python benchmarks/bench_shards.py [--n 512] [--sizes 5000,50000] [--skip-memory]

1. Matching + normalization (in memory, DES 5 bands 64x64, after reading the files):
   the batched path (``normalize_cutout`` + ``homogenize``) on one core and on all
   cores, against the naive loop on the same cutouts: per cutout and band,
   photutils ``make_kernel`` + ``astropy.convolution.convolve_fft`` for the image
   and for the variance (kernel squared).
2. Shard-build peak memory at two catalog sizes, each in a fresh process
   (a catalog of N rows cycling over a few hundred simulated files): main
   process and largest worker peak RSS, and the ratio of the large to the small.
3. The shards' PSF check (``matched_fwhm_within_3pct``: ``matched_psf_fwhm`` on 64 objects): the FWHM
   measured on the PSF's core (``psf._core``) against the spline zoom of the whole matched PSF image, the
   same objects, alternating, medians of three rounds; and the largest difference between their FWHMs.
4. Data loader: samples/s from shards with a torch DataLoader against the
   training step rate (forward + backward + AdamW, batch 64) of the smallest
   registered backbone on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

from _util import cores, report, timed  # noqa: E402

from lens_assets.science.families import load_family  # noqa: E402
from lens_assets.science.fits_contract import read_cutout  # noqa: E402
from lens_assets.science.ingest import find_fits, ingest_files  # noqa: E402
from lens_assets.science.normalize import center_crop, normalize_cutout  # noqa: E402
from lens_assets.science.parallel import parallel_map  # noqa: E402
from lens_assets.science.psf import _place_psf, homogenize, psf_kernel  # noqa: E402
from lens_assets.science.shards import build_shards, shard_settings  # noqa: E402
from lens_assets.science.simulation import simulate_to_directory  # noqa: E402
from lens_assets.science.surveys import get_survey  # noqa: E402

SURVEY = get_survey("des")
_CUTOUTS: list = []


def ours(cutouts, settings):
    for i in range(0, len(cutouts), 256):
        chunk = cutouts[i:i + 256]
        norm = [normalize_cutout(c, SURVEY) for c in chunk]
        res = homogenize(np.stack([n.image for n in norm]), np.stack([n.variance for n in norm]),
                         [n.psf for n in norm], np.stack([c.psf_fwhm_arcsec for c in chunk]),
                         np.stack([c.present for c in chunk]), pixel_scale_arcsec=SURVEY.pixel_scale_arcsec,
                         target_fwhm=settings.target_fwhm_arcsec, kernel_size=settings.kernel_size)
        center_crop(res.image, SURVEY.cutout_size_px)


def _ours_chunk(args):
    cutouts, settings = args  # the cutouts travel with the task: pool workers do not share this process's globals
    ours(cutouts, settings)
    return len(cutouts)


def naive(cutouts, settings):
    from astropy.convolution import convolve_fft
    from photutils.psf_matching import make_kernel

    k = settings.kernel_size
    target = psf_kernel("gaussian", settings.target_fwhm_arcsec / SURVEY.pixel_scale_arcsec, size=k)
    for c in cutouts:
        for b in range(SURVEY.n_bands):
            image = c.image[b] * c.nmgy_per_unit[b]
            var = c.variance[b] * c.nmgy_per_unit[b] ** 2
            psf = np.zeros((k, k))
            _place_psf(psf, c.psf[b])  # the same centred, normalized K x K PSF the batched path uses
            kernel = make_kernel(psf, target)
            convolve_fft(image, kernel, normalize_kernel=False, boundary="fill")
            convolve_fft(var, kernel**2, normalize_kernel=False, boundary="fill")


def matching_section(root: Path, n: int, total: int = 2048) -> dict:
    global _CUTOUTS
    files = find_fits(root / "raw" / SURVEY.name)[:n]
    distinct = [read_cutout(p.read_bytes(), name=p.name, survey=SURVEY) for p in files]
    # cycle the distinct cutouts to `total` so pool start-up is amortized as in a real shard build
    _CUTOUTS = (distinct * -(-total // len(distinct)))[:total]
    settings = shard_settings(SURVEY)
    ours(_CUTOUTS[:16], settings)
    t_one = min(timed(ours, _CUTOUTS, settings)[1] for _ in range(2))
    c = cores()
    step = 256
    tasks = [(_CUTOUTS[i:i + step], settings) for i in range(0, len(_CUTOUTS), step)]
    t_all = min(timed(parallel_map, _ours_chunk, tasks, workers=0, progress=False)[1] for _ in range(2))
    n_naive = min(64, len(distinct))
    _, t_naive = timed(naive, _CUTOUTS[:n_naive], settings)
    return {"n": len(_CUTOUTS), "n_distinct": len(distinct), "ours_1core_per_s": len(_CUTOUTS) / t_one,
            "ours_all_per_s": len(_CUTOUTS) / t_all,
            "naive_per_s": n_naive / t_naive, "speedup_1core": (len(_CUTOUTS) / t_one) / (n_naive / t_naive),
            "cores": c}


MEMORY_CHILD = r'''
import json, resource, sys, time
from pathlib import Path
import pandas as pd
from lens_assets.science.shards import build_shards, shard_settings
from lens_assets.science.surveys import get_survey
root, n, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
cat = pd.read_parquet(root / "catalog.parquet")
reps = -(-n // len(cat))
big = pd.concat([cat] * reps, ignore_index=True).iloc[:n].copy()
big["objid"] = [f"{o}-r{i}" for i, o in enumerate(big["objid"])]
survey = get_survey("des")
t = time.perf_counter()
m = build_shards(big, survey, root=root, out_dir=out, settings=shard_settings(survey), workers=0, progress=False)
sec = time.perf_counter() - t
print(json.dumps({"n": n, "seconds": sec, "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "shards": len(m["shards"])}))
'''


def memory_section(root: Path, sizes: list[int]) -> dict:
    out = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(root), str(n), tmp], capture_output=True,
                                  text=True, check=True)
            out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def replicated_shards(root: Path, n_rows: int, name: str = "loader_shards") -> Path:
    """Shards of ``n_rows`` rows cycling over the catalog in ``root`` (objids made unique)."""
    import pandas as pd

    cat = pd.read_parquet(root / "catalog.parquet")
    reps = -(-n_rows // len(cat))
    big = pd.concat([cat] * reps, ignore_index=True).iloc[:n_rows].copy()
    big["objid"] = [f"{o}-r{i}" for i, o in enumerate(big["objid"])]
    shard_dir = root / name
    build_shards(big, SURVEY, root=root, out_dir=shard_dir, settings=shard_settings(SURVEY), workers=0,
                 progress=False)
    return shard_dir


def loader_rates(shard_dir: Path, batch: int = 64, workers=(0, 2)) -> dict:
    """Samples/s of a shuffled DataLoader over the shards, per worker count."""
    import torch

    from lens_assets.ml.data import ShardDataset, collate

    ds = ShardDataset(shard_dir)
    rates = {}
    for w in workers:
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=w,
                                             collate_fn=collate, persistent_workers=False)
        t = time.perf_counter()
        seen = 0
        for b in loader:
            seen += len(b["label"])
        rates[w] = seen / (time.perf_counter() - t)
    return rates


def loader_section(root: Path, n_rows: int = 4096, batch: int = 64) -> dict:
    import torch

    from lens_assets.ml.backbones import create_backbone, smallest_backbone

    rates = loader_rates(replicated_shards(root, n_rows), batch)
    # the cheapest timm backbone by parameters (compact_cnn has fewer parameters but far more compute per image)
    name = smallest_backbone(in_chans=SURVEY.n_bands, img_size=SURVEY.cutout_size_px, timm_only=True)
    torch.set_num_threads(cores())
    model = create_backbone(name, in_chans=SURVEY.n_bands, img_size=SURVEY.cutout_size_px)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, SURVEY.n_bands, SURVEY.cutout_size_px, SURVEY.cutout_size_px)
    y = torch.rand(batch, 1)

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    steps = 6
    t = time.perf_counter()
    for _ in range(steps):
        step()
    train_rate = steps * batch / (time.perf_counter() - t)
    return {"backbone": name, "train_img_per_s": train_rate, "loader_img_per_s_0_workers": rates[0],
            "loader_img_per_s_2_workers": rates[2], "headroom": max(rates.values()) / train_rate}


def fwhm_check_section(root: Path, rounds: int = 3) -> dict:
    """``matched_psf_fwhm`` as the shard asset's check runs it, measuring on the PSF's core and on the whole
    matched image (``psf._core`` replaced by the identity), alternating."""
    import pandas as pd

    from lens_assets.science import psf
    from lens_assets.science.shards import matched_psf_fwhm

    catalog = pd.read_parquet(root / "catalog.parquet")
    settings = shard_settings(SURVEY)
    core = psf._core
    times: dict[str, list] = {"core": [], "whole": []}
    fwhm = {}
    for _ in range(rounds):
        for name, fn in (("core", core), ("whole", lambda a: a)):
            psf._core = fn
            try:
                fwhm[name], sec = timed(matched_psf_fwhm, catalog, SURVEY, root=root, settings=settings)
            finally:
                psf._core = core
            times[name].append(sec)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"n_measured": len(fwhm["core"]), "core_s": med["core"], "whole_s": med["whole"],
            "speedup": med["whole"] / med["core"],
            "max_abs_diff_arcsec": float(np.abs(fwhm["core"]["fwhm_matched"] - fwhm["whole"]["fwhm_matched"]).max())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512, help="cutouts for the matching benchmark")
    ap.add_argument("--files", type=int, default=512, help="distinct simulated files")
    ap.add_argument("--sizes", default="5000,50000", help="catalog sizes for the memory benchmark")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        simulate_to_directory(SURVEY, load_family("baseline"), n_cutouts=max(args.files, args.n), seed=5,
                              out_dir=root / "raw" / SURVEY.name / "sim-5", workers=0, progress=False)
        res = ingest_files(find_fits(root / "raw" / SURVEY.name), SURVEY, root=root, workers=0, progress=False)
        res.catalog.to_parquet(root / "catalog.parquet")
        match = matching_section(root, args.n)
        fwhm = fwhm_check_section(root)
        memory = {} if args.skip_memory else memory_section(root, [int(s) for s in args.sizes.split(",")])
        loader = loader_section(root)
    rows = [
        ("matching input", f"{match['n']} DES cutouts ({match['n_distinct']} distinct), 5 bands, 64x64 px, "
                           "PSF images (Gaussian/Moffat)"),
        ("naive loop (1 core)", f"{match['naive_per_s']:.0f} cutouts/s (photutils make_kernel + astropy convolve_fft)"),
        ("batched (1 core)", f"{match['ours_1core_per_s']:.0f} cutouts/s -> {match['speedup_1core']:.1f}x naive "
                             "(target >= 10x)"),
        (f"batched ({match['cores']} cores)", f"{match['ours_all_per_s']:.0f} cutouts/s (target >= 2000)"),
    ]
    rows.append(("PSF check (64 objects)", f"{fwhm['n_measured']} bands measured in {fwhm['core_s']:.2f} s on the "
                                            f"core against {fwhm['whole_s']:.2f} s on the whole image -> "
                                            f"{fwhm['speedup']:.1f}x; FWHMs differ by at most "
                                            f"{fwhm['max_abs_diff_arcsec']:.1e}\""))
    sizes = sorted(memory)
    for n in sizes:
        m = memory[n]
        rows.append((f"shard build {n} rows", f"main peak {m['main_peak_mb']:.0f} MB, worker peak "
                                              f"{m['worker_peak_mb']:.0f} MB, {n / m['seconds']:.0f} cutouts/s "
                                              f"incl. FITS reads, {m['shards']} shards"))
    if len(sizes) == 2:
        small, large = memory[sizes[0]], memory[sizes[1]]
        ratio = max(large["main_peak_mb"] / small["main_peak_mb"], large["worker_peak_mb"] / small["worker_peak_mb"])
        rows.append(("peak memory ratio", f"{ratio:.2f} ({sizes[1]} vs {sizes[0]} rows; target <= 1.3)"))
        memory["ratio"] = ratio
    rows += [
        ("smallest backbone train step", f"{loader['train_img_per_s']:.0f} img/s ({loader['backbone']}, batch 64, "
                                         "CPU)"),
        ("data loader", f"{loader['loader_img_per_s_0_workers']:.0f} img/s (0 workers), "
                        f"{loader['loader_img_per_s_2_workers']:.0f} img/s (2 workers) -> "
                        f"{loader['headroom']:.1f}x the step rate (target >= 5x)"),
    ]
    rec = {"matching": match, "fwhm_check": fwhm, "memory": {str(k): v for k, v in memory.items()}, "loader": loader}
    report("shards", rows, rec)
    return rec


if __name__ == "__main__":
    main()
