"""Scoring a survey drop end to end against its stages alone, and the inbox sensor's tick time.

    python benchmarks/bench_scoring.py [--n 1024] [--drops 1000]

1. One simulated DES drop (``--n`` unlabeled cutouts). Each stage is timed alone on
   the same drop in this run, each with every core: FITS read + validation
   (``ingest_files``), PSF matching + normalization of cutouts already read
   (``match_batch``; the cutouts travel to the worker processes with their tasks),
   the ensemble forward on preloaded arrays (``--members``, default the demo profile's, with its
   colour residual; bf16 autocast where the CPU has native bf16, ``channels_last`` CNNs), and the same forward
   with ``torch.asinh`` scaling the input instead of ``module.asinh`` (and the two asinh alone, per value),
   fusion + calibration, the Parquet write. End to end is what ``candidate_scores``
   runs: ``score_files`` (each file read once, validated and matched by worker
   processes while this process runs the models), fusion, calibration, write.
   Target: end to end >= 70% of the slowest stage's rate. Every stage and end to
   end run once per round (``--repeats``, default 3) and the medians are reported,
   so a slow spell on a shared machine hits them alike.
   The members have random weights: throughput does not depend on training.
2. The same drop scored in a process whose main module is a script that imports what the ``dagster`` console
   script imports (``dagster job execute``, ``dagster asset materialize``; ``python -m lens_assets.demo`` imports
   more): multiprocessing's workers import the parent's main module before their first task, and
   ``science.parallel`` launches them without it. Each way in its own process, the two ways alternating for
   ``--repeats`` rounds (medians): a pool's start-up (two workers, a trivial task) and ``score_files`` end to end.
3. ``survey_inbox_sensor`` ticks with ``--drops`` complete drops present: the first
   tick (none handled yet, 100 requested), a steady tick (all handled), and a tick
   over as many incomplete drops. Target: <= 5 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, input_asinh, report, timed  # noqa: E402

from lens_assets import layout  # noqa: E402


def _match_preread(args):
    """Match cutouts read before the stage is timed. They travel with the task: pool workers come from a
    forkserver (``science.parallel``), so they do not inherit this process's memory."""
    from lens_assets.science.shards import match_batch

    rows, cutouts, settings = args
    return match_batch(rows, cutouts, settings)


def drop_section(root: Path, n: int, batch: int = 128, repeats: int = 3, member_names=("resnet10t",),
                 colour_residual: bool = False) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from lens_assets.inbox import simulate_drop
    from lens_assets.ml.module import LensClassifier, median_measured_variance
    from lens_assets.ml.module import asinh as vectorized_asinh
    from lens_assets.ml.train import residual_band_indices
    from lens_assets.ml.score import Fusion, default_device, logits_of_batch, score_files
    from lens_assets.resources.storage import LocalStorage
    from lens_assets.science.calibration import Calibrator
    from lens_assets.science.ingest import find_fits, ingest_files, read_one, relative_names
    from lens_assets.science.parallel import bounded_imap
    from lens_assets.science.shards import shard_settings
    from lens_assets.science.surveys import get_survey
    from lens_assets.ml.precision import resolve_precision

    survey = get_survey("des")
    storage = LocalStorage(root=str(root))
    simulate_drop(storage, "des", "bench", n=n, seed=424242)
    files = find_fits(storage.path(*layout.inbox_drop("des", "bench")))
    device = default_device()
    torch.manual_seed(0)
    residual = residual_band_indices(survey.name, list(survey.band_names)) if colour_residual else None
    members = [LensClassifier(backbone=b, in_chans=survey.n_bands, img_size=survey.cutout_size_px,
                              residual_bands=residual).eval().to(device).use_channels_last() for b in member_names]
    fusion, cal = Fusion.mean(len(members)), Calibrator("temperature", temperature=1.7)
    settings = shard_settings(survey)
    out = {"n": len(files), "device": device, "members": list(member_names), "colour_residual": colour_residual,
           "precision": resolve_precision("auto", gpu=device.startswith("cuda"))}

    def rate(fn):
        res, seconds = timed(fn)
        return res, len(files) / seconds

    def end_to_end():
        res = score_files(files, survey, root=storage.root_path, settings=settings, members=members, fusion=fusion,
                          calibrator=cal, batch_size=batch, workers=0, device=device, progress=False)
        res.scores.to_parquet(root / "e2e.parquet", index=False)
        return res.scores

    ingest_files(files[:32], survey, root=storage.root_path, workers=0, progress=False)  # warm caches and pools
    paths, names = relative_names(files, storage.root_path)
    runs: dict[str, list] = {}
    for rnd in range(repeats):  # every stage and end to end once per round: a slow spell hits them alike
        ing, r = rate(lambda: ingest_files(files, survey, root=storage.root_path, workers=0, progress=False))
        runs.setdefault("ingest_per_s", []).append(r)
        preread = {nm: read_one(p, nm, survey)[2] for p, nm in zip(paths, names)}
        records = ing.catalog.to_dict("records")
        cutouts = [preread[row["source_file"]] for row in records]  # the catalog's rows, in its order
        tasks = [(records[i:i + batch], cutouts[i:i + batch], settings) for i in range(0, len(records), batch)]
        del preread
        batches, r = rate(lambda: list(bounded_imap(_match_preread, tasks, workers=0, progress=False)))
        runs.setdefault("match_per_s", []).append(r)
        del tasks, cutouts
        logits_of_batch(members, batches[0]["image"][:8], batches[0]["variance"][:8], device=device)
        # the forward with the input scaled by module.asinh and by torch.asinh, on the same batches, in turn
        scaled = {}
        ways = [("model_per_s", vectorized_asinh), ("model_torch_asinh_per_s", torch.asinh)]
        for key, fn in (ways if rnd % 2 == 0 else ways[::-1]):
            with input_asinh(fn):
                scaled[key], r = rate(lambda: np.concatenate(
                    [logits_of_batch(members, b["image"], b["variance"], device=device) for b in batches]))
            runs.setdefault(key, []).append(r)
        logits = scaled["model_per_s"]
        out["max_abs_logit_diff_torch_asinh"] = max(out.get("max_abs_logit_diff_torch_asinh", 0.0),
                                                    float(np.abs(scaled["model_torch_asinh_per_s"] - logits).max()))
        image, variance = torch.from_numpy(batches[0]["image"]), torch.from_numpy(batches[0]["variance"])
        x = image / torch.sqrt(median_measured_variance(variance, 1).clamp_min(1e-20))[:, None, None, None]
        for name, fn in (("asinh_torch_ns", torch.asinh), ("asinh_vectorized_ns", vectorized_asinh)):
            def five():  # each result dropped before the next call, as the forward drops its input's
                for _ in range(5):
                    fn(x)

            fn(x)
            _, seconds = timed(five)
            runs.setdefault(name, []).append(seconds / 5 / x.numel() * 1e9)
        _, r = rate(lambda: cal.predict(fusion(logits)))
        runs.setdefault("calibrate_per_s", []).append(r)
        table = pd.DataFrame({"objid": ing.catalog["objid"], "logit": fusion(logits),
                              "score": cal.predict(fusion(logits))})
        _, r = rate(lambda: table.to_parquet(root / "bench.parquet", index=False))
        runs.setdefault("write_per_s", []).append(r)
        scored, r = rate(end_to_end)
        runs.setdefault("end_to_end_per_s", []).append(r)
        out["max_abs_logit_diff_vs_stages"] = float(np.abs(scored["logit"].to_numpy() - fusion(logits)).max())
    out.update({k: float(np.median(v)) for k, v in runs.items()})  # medians over the rounds
    out["rounds"] = runs
    out["ratio_to_slowest_by_round"] = [e / m for e, m in zip(runs["end_to_end_per_s"], runs["model_per_s"])]
    stages = {k: v for k, v in out.items() if k.endswith("_per_s") and k not in ("end_to_end_per_s",
                                                                                   "model_torch_asinh_per_s")}
    out["slowest_stage"] = min(stages, key=stages.get)
    # stages run one after another in one process: their combined rate is the harmonic sum
    out["sequential_stages_per_s"] = 1.0 / sum(1.0 / v for v in stages.values())
    out["ratio_to_slowest"] = out["end_to_end_per_s"] / stages[out["slowest_stage"]]
    return out


MAIN_SCRIPT = """
import json, sys, time
from dagster._cli import main as _dagster  # noqa: F401  (what the `dagster` console script imports)

if __name__ == "__main__":
    import torch

    from lens_assets.ml.module import LensClassifier
    from lens_assets.ml.score import Fusion, default_device, score_files
    from lens_assets.ml.train import residual_band_indices
    from lens_assets.science import parallel
    from lens_assets.science.calibration import Calibrator
    from lens_assets.science.shards import shard_settings
    from lens_assets.science.surveys import get_survey

    root, mode, members, colour = sys.argv[1:5]
    if mode == "import":  # multiprocessing's default: every worker imports the main module
        parallel._needs_main = lambda fn, first_item: True
    files = sorted(str(p) for p in __import__("pathlib").Path(root, "inbox").rglob("*.fits"))
    survey = get_survey("des")
    torch.manual_seed(0)
    device = default_device()
    res = residual_band_indices("des", list(survey.band_names)) if colour == "1" else None
    nets = [LensClassifier(backbone=b, in_chans=survey.n_bands, img_size=survey.cutout_size_px,
                           residual_bands=res).eval().to(device).use_channels_last() for b in members.split(",")]
    kw = dict(root=root, settings=shard_settings(survey), members=nets, fusion=Fusion.mean(len(nets)),
              calibrator=Calibrator("temperature", temperature=1.7), workers=0, device=device, progress=False)
    parallel.parallel_map(abs, range(2), workers=2, progress=False)  # the forkserver starts once per process
    score_files(files[:64], survey, **kw)
    t = time.perf_counter()
    parallel.parallel_map(abs, range(2), workers=2, progress=False)
    pool_start_s = time.perf_counter() - t
    t = time.perf_counter()
    score_files(files, survey, **kw)
    print(json.dumps({"pool_start_s": pool_start_s, "end_to_end_per_s": len(files) / (time.perf_counter() - t)}))
"""


def main_module_section(root: Path, repeats: int, member_names, colour_residual: bool) -> dict:
    """Pool start-up and end to end scoring of the drop under ``root`` in a process whose main module imports what
    the ``dagster`` console script imports: workers importing it (multiprocessing's default) against workers
    launched without it (``science.parallel``), each round in its own process, the two ways alternating."""
    import json
    import subprocess

    import numpy as np

    script = root / "dagster_main.py"
    script.write_text(MAIN_SCRIPT)
    runs: dict[str, list] = {"import": [], "hidden": []}
    for r in range(repeats):  # one round per process, the two ways alternating: a slow spell hits both
        for mode in (("import", "hidden") if r % 2 == 0 else ("hidden", "import")):
            done = subprocess.run([sys.executable, str(script), str(root), mode, ",".join(member_names),
                                   str(int(colour_residual))], capture_output=True, text=True, check=False,
                                  timeout=1800)
            if done.returncode:
                raise RuntimeError(f"{script} {mode} failed:\n{done.stderr[-2000:]}")
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {mode: {key: float(np.median([row[key] for row in rows])) for key in rows[0]}
            for mode, rows in runs.items()}


def sensor_section(root: Path, n_drops: int) -> dict:
    import json

    import dagster as dg

    from lens_assets.resources.storage import LocalStorage
    from lens_assets.sensors.inbox import inbox_tick

    storage = LocalStorage(root=str(root / "sensor"))
    # des has a promoted model (its drops are requested), hsc's drops are incomplete
    storage.write_text(json.dumps({"survey": "des", "version": "bench"}), *layout.promotion_doc("des"))
    for i in range(n_drops):
        d = storage.path(*layout.inbox_drop("des", f"drop-{i:05d}"))
        d.mkdir(parents=True)
        (d / f"obj{i}.fits").write_bytes(b"")
        storage.path(*layout.complete_marker("des", f"drop-{i:05d}")).touch()
        inc = storage.path(*layout.inbox_drop("hsc", f"partial-{i:05d}"))
        inc.mkdir(parents=True)
        (inc / f"obj{i}.fits").write_bytes(b"")
    instance = dg.DagsterInstance.ephemeral()
    first, first_s = timed(inbox_tick, storage, instance, None, limit=100)

    handled = json.dumps({"handled": [f"des|drop-{i:05d}" for i in range(n_drops)]})
    steady, steady_s = timed(inbox_tick, storage, instance, handled, limit=100)
    return {"drops": n_drops, "incomplete_drops": n_drops, "first_tick_s": first_s,
            "first_tick_requests": len(first.run_requests), "steady_tick_s": steady_s,
            "steady_tick_requests": len(steady.run_requests)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="cutouts in the drop")
    ap.add_argument("--drops", type=int, default=1000, help="drops present for the sensor ticks")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every stage and end to end (medians)")
    ap.add_argument("--members", default=None, help="backbones, comma-separated (default: the demo profile's)")
    ap.add_argument("--colour-residual", type=int, choices=(0, 1), default=None,
                    help="members with the colour-residual input channel (default: the demo profile's setting)")
    args = ap.parse_args(argv)
    from lens_assets.profiles import PROFILES

    trained = PROFILES["demo"]["lens_classifier"]  # the members the demo trains, scored as it scores them
    if args.colour_residual is None:
        args.colour_residual = int(trained.get("colour_residual", False))
    if args.members is None:
        args.members = ",".join(trained["members"])
    with tempfile.TemporaryDirectory() as tmp:
        drop = drop_section(Path(tmp), args.n, repeats=args.repeats, member_names=args.members.split(","),
                            colour_residual=bool(args.colour_residual))
        mains = main_module_section(Path(tmp), args.repeats, args.members.split(","), bool(args.colour_residual))
        sensor = sensor_section(Path(tmp), args.drops)
    e2e_import, e2e_hidden = (mains[m]["end_to_end_per_s"] for m in ("import", "hidden"))
    rows = [
        ("drop", f"{drop['n']} DES 5-band 64x64 cutouts, {len(drop['members'])} member(s) "
                 f"({', '.join(drop['members'])}{', colour residual' if drop['colour_residual'] else ''}) in "
                 f"{drop['precision']} on {drop['device']}, {cores()} cores"),
        ("FITS read + validate", f"{drop['ingest_per_s']:.0f} cutouts/s"),
        ("PSF match + normalize (read before)", f"{drop['match_per_s']:.0f} cutouts/s"),
        ("ensemble forward (preloaded)", f"{drop['model_per_s']:.0f} cutouts/s; with torch.asinh scaling the input "
                                         f"{drop['model_torch_asinh_per_s']:.0f} cutouts/s "
                                         f"({drop['model_per_s'] / drop['model_torch_asinh_per_s']:.2f}x; max |logit "
                                         f"diff| {drop['max_abs_logit_diff_torch_asinh']:.1e})"),
        ("input scaling, asinh", f"{drop['asinh_vectorized_ns']:.2f} ns/value (module.asinh) against "
                                 f"{drop['asinh_torch_ns']:.2f} (torch.asinh): "
                                 f"{drop['asinh_torch_ns'] / drop['asinh_vectorized_ns']:.1f}x, all threads"),
        ("fusion + calibration", f"{drop['calibrate_per_s']:.0f} cutouts/s"),
        ("Parquet write", f"{drop['write_per_s']:.0f} cutouts/s"),
        ("stages one after another", f"{drop['sequential_stages_per_s']:.0f} cutouts/s"),
        ("end to end", f"{drop['end_to_end_per_s']:.0f} cutouts/s = {drop['ratio_to_slowest']:.2f}x the slowest "
                       f"stage ({drop['slowest_stage']}; target >= 0.70); max |logit diff| vs stages "
                       f"{drop['max_abs_logit_diff_vs_stages']:.1e}"),
        ("  by round", ", ".join(f"{r:.2f}x" for r in drop["ratio_to_slowest_by_round"]) + " (end to end / model, "
                       "each round)"),
        ("pool start, dagster CLI as main", f"{mains['import']['pool_start_s']:.2f} s with workers importing it, "
                                        f"{mains['hidden']['pool_start_s']:.2f} s with it hidden "
                                        f"({mains['import']['pool_start_s'] / mains['hidden']['pool_start_s']:.1f}x)"),
        ("end to end, dagster CLI as main", f"{e2e_import:.0f} cutouts/s with workers importing it, {e2e_hidden:.0f} "
                                        f"cutouts/s with it hidden ({e2e_hidden / e2e_import:.2f}x)"),
        ("sensor, first tick", f"{sensor['first_tick_s']:.3f} s with {sensor['drops']} complete + "
                               f"{sensor['incomplete_drops']} incomplete drops ({sensor['first_tick_requests']} "
                               "requested; target <= 5 s)"),
        ("sensor, steady tick", f"{sensor['steady_tick_s']:.3f} s (all handled, {sensor['steady_tick_requests']} "
                                "requested)"),
    ]
    rec = {"drop": drop, "main_module": mains, "sensor": sensor}
    report("scoring", rows, rec)
    return rec


if __name__ == "__main__":
    main()
