"""Which of the `heldout` family's differences costs the finder: variants of it, each with one thing changed, all
scored by one finder trained on the default population.

    .venv/bin/python benchmarks/bench_heldout_attribution.py --n-cutouts 4000 --n-heldout 400 --n-pairs 400 \\
        --epochs 8 --members regnetx_002

The `heldout` family differs from the training population (`physical`) in many priors at once: its PSFs (Moffat
with heavy wings), its deflectors (bluer, independent of the Einstein radius), its sources (clumpier, more
quasars), its noise and its non-lenses (rings, spirals, mergers, chance alignments). Each variant below is
`heldout.toml` with one of them moved to the training population's (see ``VARIANTS``), or, for
``plain_negatives``, with plain galaxies as its only non-lenses. The variants are further held-out families of
one ``bench_ablation.py`` run (lever ``physical``), so one trained finder scores them all, beside `heldout` itself,
and a variant whose AUROC rises most names the difference the finder does not carry over; ``--lever`` trains the
finder with another ablation lever instead. Each variant has its own name, so its objects are other draws than
`heldout`'s: each AUROC is within about ±0.04 (400 objects), a difference of two within about ±0.06.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import report, write_family  # noqa: E402

PHYSICAL_NOISE = '{ dist = "loguniform", low = 0.5, high = 2.0 }'
# variant -> (section, key, value) edits of heldout.toml, each towards the training population: the physical
# family's value where it has the same key (the noise range, the source clumpiness); one kind for what it mixes
# (PSFs: only Gaussian, no Moffat wings; physical mixes Gaussian, Moffat with beta 2-5 and core + wings) or draws
# another way (its red sequence reddens with redshift; here one red colour with some scatter; its lensed quasars
# are 10% of the sources, here none)
VARIANTS = {
    "psf_gaussian": [("psf", "profile", '{ dist = "choice", values = ["gaussian"] }')],
    # the red sequence at z ~ 0.5 (physical: beta = 2.0 + 1.2 z with scatter 0.2)
    "red_deflector": [("lens_light", "color_beta", '{ dist = "normal", mean = 2.6, std = 0.3 }')],
    "smooth_source": [("source", "clumpy_fraction", "0.5"),
                      ("source", "n_clumps", '{ dist = "randint", low = 1, high = 4 }')],
    "no_quasars": [("source", "kind", '{ dist = "choice", values = ["extended", "quasar"], p = [1.0, 0.0] }')],
    "physical_noise": [("noise", "exposure_scale", PHYSICAL_NOISE)],
    "plain_negatives": [("negatives", k, "1.0" if k == "plain" else "0.0")
                        for k in ("plain", "companions", "merger", "ring", "spiral", "chance_alignment")],
}
VARIANTS["all_but_negatives"] = [e for k, v in VARIANTS.items() if k != "plain_negatives" for e in v]


def variant_files(out_dir: Path) -> dict[str, Path]:
    """Each variant's family TOML, written into ``out_dir`` and named ``heldout_<variant>``."""
    return {name: write_family("heldout", out_dir / f"heldout_{name}.toml", edits, name=f"heldout_{name}")
            for name, edits in VARIANTS.items()}


def main(argv=None) -> dict:
    import bench_ablation

    ap = bench_ablation.arg_parser(__doc__)
    ap.add_argument("--lever", default="physical", help="the bench_ablation.py lever that trains the finder (e.g. "
                    "group=0.25): which differences it carries over")
    args = ap.parse_args(argv)
    args.members = args.members.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = variant_files(work)
        args.heldout = [f for f in args.heldout.split(",") if f] + [str(p) for p in files.values()]
        row = bench_ablation.run_lever(args.lever, args, work)
    base = row["heldout_auroc"]
    lines = ["| held-out family | AUROC | change against `heldout` |", "|---|---|---|",
             f"| `heldout` | {base:.3f} | — |"]
    for key in [k for k in row if k.startswith("heldout_") and k != "heldout_auroc"]:  # run_lever's order
        fam, auroc = key[len("heldout_"):-len("_auroc")], row[key]
        lines.append(f"| `{fam}` | {auroc:.3f} | {auroc - base:+.3f} |" if fam.startswith("heldout_")
                     else f"| `{fam}` | {auroc:.3f} | (another family) |")
    print("\n".join(lines))
    print(f"lever {args.lever}: test AUROC {row['auroc']:.3f}, lensing-only {row['lensing_only_auroc']:.3f}, "
          f"wall {row['wall_s'] / 60:.1f} min")
    report(f"heldout_attribution_{bench_ablation.lever_slug(args.lever)}",
           [(k, f"{v:.3f}") for k, v in row.items() if k.startswith("heldout_")],
           {"row": row, "variants": {k: [list(e) for e in v] for k, v in VARIANTS.items()},
            "settings": {k: v for k, v in vars(args).items()}})
    return row


if __name__ == "__main__":
    main()
