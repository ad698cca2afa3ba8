"""Fresh training objects (``ml/fresh.py``) against the fixed shards they are mixed with, in one run.

    python benchmarks/bench_fresh.py [--survey des] [--family physical] [--n 64] [--rounds 3]

Builds a small set of shards of the family (not timed), then per round, interleaved: reads ``--n`` rows of
the fixed shards (``ShardDataset``), and draws ``--n`` fresh objects the whole way (population draw,
rendering, FITS bytes, validation, PSF matching) with the torch renderer and with lenstronomy, and draws
the systems alone (the population's selection, which both renderers share). Medians over the rounds, one
process. Training consumes about 190-260 images/s on 2 bf16 cores (regnetx_002, README): the fresh rate
against that says what share of a batch can be fresh before the data, not the model, sets the pace.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, report  # noqa: E402


def main(argv=None) -> dict:
    import numpy as np

    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.fresh import FRESH_SEED_OFFSET, FreshMix
    from lens_assets.science.families import load_family
    from lens_assets.science.ingest import find_fits, ingest_files
    from lens_assets.science.shards import build_shards, read_manifest, shard_settings
    from lens_assets.science.simulation import _member, simulate_to_directory
    from lens_assets.science.surveys import get_survey

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--survey", default="des")
    ap.add_argument("--family", default="physical")
    ap.add_argument("--n", type=int, default=64, help="objects per round and per path")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    survey, family = get_survey(args.survey), load_family(args.family)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        simulate_to_directory(survey, family, n_cutouts=args.n, seed=1, out_dir=root / "raw", workers=0,
                              progress=False)
        catalog = ingest_files(find_fits(root / "raw"), survey, root=root, workers=0, progress=False).catalog
        build_shards(catalog, survey, root=root, out_dir=root / "shards", settings=shard_settings(survey),
                     workers=0, progress=False)
        base = ShardDataset(root / "shards")
        settings = read_manifest(root / "shards")["settings"]
        mixes = {r: FreshMix(base, family=args.family, fraction=0.5, seed=0, shard_settings=settings, renderer=r)
                 for r in ("torch", "lenstronomy")}
        mixes["torch"].simulate([10**7])  # warm-up: imports, caches
        mixes["lenstronomy"].simulate([10**7 + 1])
        t = {"fixed_read": [], "fresh_torch": [], "fresh_lenstronomy": [], "draw_only": []}
        for r in range(args.rounds):
            idx = list(range(r * args.n, (r + 1) * args.n))
            t0 = time.perf_counter()
            base.__getitems__(list(np.random.default_rng(r).permutation(len(base))[:args.n]))
            t["fixed_read"].append(args.n / (time.perf_counter() - t0))
            for name in ("torch", "lenstronomy"):
                t0 = time.perf_counter()
                mixes[name].simulate(idx)
                t[f"fresh_{name}"].append(args.n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for i in idx:
                _member(survey, family, FRESH_SEED_OFFSET, 10**6 + i)
            t["draw_only"].append(args.n / (time.perf_counter() - t0))
    rate = {k: statistics.median(v) for k, v in t.items()}
    rec = {"survey": survey.name, "family": family.name, "n": args.n, "rounds": args.rounds, "cores": cores(),
           **{f"{k}_per_s": v for k, v in rate.items()},
           "torch_over_lenstronomy": rate["fresh_torch"] / rate["fresh_lenstronomy"],
           "fixed_over_fresh_torch": rate["fixed_read"] / rate["fresh_torch"], "rounds_per_s": t}
    report(f"fresh_{survey.name}_{family.name}", [
        ("objects", f"{args.n} per round of '{family.name}' on {survey.name}, medians over {args.rounds} rounds"),
        ("fixed shards, read", f"{rate['fixed_read']:8.1f} rows/s"),
        ("fresh, torch renderer", f"{rate['fresh_torch']:8.1f} objects/s  "
                                  f"({rec['torch_over_lenstronomy']:.2f}x the lenstronomy path)"),
        ("fresh, lenstronomy", f"{rate['fresh_lenstronomy']:8.1f} objects/s"),
        ("population draw alone", f"{rate['draw_only']:8.1f} systems/s (what both fresh paths pay first)"),
        ("fixed / fresh (torch)", f"{rec['fixed_over_fresh_torch']:.0f}x"),
    ], rec)
    return rec


if __name__ == "__main__":
    main()
