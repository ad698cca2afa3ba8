"""A fuzzed drop end to end: every kind of damage in lens_assets_tests/fuzz_drop.py, ingested and scored.

    python benchmarks/bench_fuzz_drop.py [--n 1000] [--seed 0] [--repeats 5] [--workers 1] [--no-score]

* writes ``--n`` files (the kinds in turn) into a temporary drop;
* reads each file on its own with the ingest's reader and counts crashes (anything
  but a quarantine escaping it);
* ``ingest_files`` over the drop: per kind, the outcomes (``ingested`` or a
  quarantine reason) against the one the kind expects; n_ingested + n_quarantined
  against n_files; files/s (median of ``--repeats``);
* ``score_files`` over the drop with one untrained member (the plumbing, not the
  scores): per kind ``scored`` or the reason; n_scored + n_quarantined = n_files;
* ``read_cutout`` over every file with the plain-HDU scanner and astropy-only
  (``fast_path=False``): the ratio of their times, median of ``--repeats``, on the
  whole drop and on the plain valid files only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lens_assets_tests.fuzz_drop

from _util import cores, report  # noqa: E402

from lens_assets.science.ingest import find_fits, ingest_files  # noqa: E402
from lens_assets_tests.fuzz_drop import (DES, KINDS, expected_outcomes, find_crashes, ingest_fuzz_drop,  # noqa: E402
                                         read_seconds, score_fuzz_drop, write_fuzz_drop)


def _fmt(counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) if counter else "-"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-score", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        drop = root / "inbox" / "des" / "fuzz"
        kinds = write_fuzz_drop(drop, n_files=args.n, seed=args.seed)
        crashes = find_crashes(root, kinds)  # also warms the page cache and the imports
        ing = ingest_fuzz_drop(root, kinds, workers=args.workers)
        ingest_s = [ing.seconds] + [ingest_files(find_fits(root), DES, root=root, workers=args.workers,
                                                 progress=False).seconds for _ in range(args.repeats - 1)]
        sc = None if args.no_score else score_fuzz_drop(root, kinds, workers=args.workers)
        valid = root / "valid"
        valid.mkdir()
        for name, kind in kinds.items():
            if kind == "valid":
                (valid / name).write_bytes((drop / name).read_bytes())
        ratios, ratios_valid, fast_s = [], [], []
        for _ in range(args.repeats):
            fast, slow = read_seconds(drop, fast_path=True), read_seconds(drop, fast_path=False)
            ratios.append(slow / fast)
            fast_s.append(fast)
            ratios_valid.append(read_seconds(valid, fast_path=False) / read_seconds(valid, fast_path=True))
    expected = expected_outcomes(kinds)
    n_kinds = len(set(kinds.values()))
    n_damage = sum(KINDS[k][1] != "ingested" for k in set(kinds.values()))
    print(f"\n{'kind':<22} {'expected':<20} {'files':>5}  ingest outcomes / score outcomes")
    all_as_expected = True
    for kind in KINDS:
        if kind not in expected:
            continue
        got = ing.outcomes.get(kind, {})
        ok = dict(got) == dict(expected[kind])
        if sc is not None:
            ok &= dict(sc.outcomes.get(kind, {})) == dict(expected_outcomes(
                {n: k for n, k in kinds.items() if k == kind}, accepted="scored")[kind])
        all_as_expected &= ok
        scored = "" if sc is None else " / " + _fmt(sc.outcomes.get(kind, {}))
        print(f"{kind:<22} {KINDS[kind][1]:<20} {sum(expected[kind].values()):>5}  {_fmt(got)}{scored}"
              f"{'' if ok else '  <-- unexpected'}")
    rows = [
        ("files", f"{len(kinds)}"),
        ("kinds (damage kinds)", f"{n_kinds} ({n_damage})"),
        ("crashes", f"{len(crashes)}"),
        ("ingest: n_ingested + n_quarantined", f"{ing.n_accepted} + {ing.n_quarantined} = "
                                              f"{ing.n_accepted + ing.n_quarantined} (n_files {ing.n_files}: "
                                              f"{'adds up' if ing.adds_up else 'DOES NOT ADD UP'})"),
        ("every kind as expected (ingest and score)", f"{all_as_expected}"),
        (f"ingest files/s ({args.workers} worker, median of {len(ingest_s)})",
         f"{len(kinds) / statistics.median(ingest_s):.0f}"),
        (f"read_cutout files/s, fast path (median of {args.repeats})", f"{len(kinds) / statistics.median(fast_s):.0f}"),
        ("astropy-only / fast-path read time, whole drop (median)", f"{statistics.median(ratios):.2f}x"),
        ("astropy-only / fast-path read time, valid files (median)", f"{statistics.median(ratios_valid):.2f}x"),
    ]
    if sc is not None:
        rows.insert(4, ("score: n_scored + n_quarantined", f"{sc.n_accepted} + {sc.n_quarantined} = "
                                                          f"{sc.n_accepted + sc.n_quarantined} (n_files {sc.n_files}: "
                                                          f"{'adds up' if sc.adds_up else 'DOES NOT ADD UP'})"))
        rows.append(("score files/s (1 untrained member, CPU)", f"{len(kinds) / sc.seconds:.0f}"))
    record = {"n_files": len(kinds), "n_kinds": n_kinds, "n_damage_kinds": n_damage, "crashes": len(crashes),
              "n_ingested": ing.n_accepted, "n_quarantined": ing.n_quarantined, "ingest_adds_up": ing.adds_up,
              "every_kind_as_expected": all_as_expected, "ingest_seconds": ingest_s,
              "read_ratio_astropy_over_fast": ratios, "read_ratio_valid": ratios_valid, "cores": cores(),
              "outcomes": {k: dict(v) for k, v in ing.outcomes.items()},
              "command": "python benchmarks/bench_fuzz_drop.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if sc is not None:
        record.update(n_scored=sc.n_accepted, score_quarantined=sc.n_quarantined, score_adds_up=sc.adds_up,
                      score_seconds=sc.seconds, score_outcomes={k: dict(v) for k, v in sc.outcomes.items()})
    for name, kind, tb in crashes:
        print(f"CRASH {name} ({kind}):\n{tb}")
    report("fuzz_drop", rows, record)
    return record


if __name__ == "__main__":
    main()
