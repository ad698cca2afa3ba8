"""Ablations of the training population: each lever on and off at the same CPU budget, judged off the simulator.

    .venv/bin/python benchmarks/bench_ablation.py                       # every lever, DES, the demo's sizes
    .venv/bin/python benchmarks/bench_ablation.py --levers physical,no_twins --n-cutouts 8000 --epochs 6

Each lever is one whole survey_pipeline run (simulation -> catalog -> shards ->
splits -> shortcut audit -> one member -> calibrator -> report) in its own data
root with the same sizes, member, epochs and seed, so each trains for the same
number of images. Every run is scored on the same evaluation data: the held-out
families (``heldout`` and any in ``--heldout``, e.g. ``galsim``, rendered by other
code) and lens/twin pairs of the default ``physical`` family (``pairs_family``),
whichever family it trained on. The table puts side by side what says whether a
finder learned lensing: held-out AUROC per family, lensing-only AUROC (lens vs its
own scene without deflection; also over the pairs of θE ≥ 1.2″) and the shortcut AUROC of the run's own training
population (how well non-lensing statistics separate its classes), beside the
in-distribution test AUROC, TPR10, FNR(flux ratio < 0.1) and the AUROC of those faint-arc lenses against every
non-lens (informative where the FNR is 1), and the wall time.

Levers (a family file written from ``physical.toml`` with one section changed):

* ``physical``: the default population.
* ``baseline``: the earlier population (independent priors, no twins, no shared environment).
* ``no_twins``: physical without counterfactual twins (their weight given to the other non-lens types).
* ``no_environment``: physical without neighbours, satellites and stars.
* ``selection_without_collett_terms``: physical selected by θE ≥ FWHM/2 and the arcs' S/N against sky, read and
  source noise alone (without the source's size in the resolution test and the deflector's photon noise).
* ``no_observation``: physical without the randomized observing conditions (zero-point error,
  misregistration, gradients, withheld variance maps, small cutouts, sky/read-noise scales, core+wings PSFs).
* ``deep=<factor>``: physical with the same selected scenes (the family keeps its name, so the same draws)
  rendered at ``factor`` times the exposure (``[noise] render_exposure_factor``; the noise falls by at least the
  square root of it): a ceiling experiment, what the finder learns when noise hides less. Only the training
  population and its val/test splits are deeper: the held-out families and the lens/twin pairs stay at the survey's
  depth, so their figures measure a finder trained deep and tested at survey depth.
* ``negatives=<type>:<weight>/...``: physical with those ``[negatives]`` weights (the other types keep theirs), e.g.
  more of the lens-like mimics (rings, spirals, compact blobs) and fewer twins.
* ``toml=<section>.<key>:<number>/...``: physical with those numeric keys set (any section; the family loader
  checks the result), e.g. ``toml=deflector.group_fraction:0.5/deflector.group_central_sigma_min_kms:150``.
* ``group=<fraction>``: physical with that share of deflectors at the centre of a group halo
  (``[deflector] group_fraction``): group-scale lenses, whose arcs lie further out than the galaxy's light implies.
* ``quasars=<share>``: physical with that share of the selected sources hosting a lensed quasar
  (``[source] kind``; the default 0.1).
* ``train_family=<name>``: the packaged family ``<name>`` (e.g. ``heldout``, ``galsim``) trains the run, renamed
  ``<name>_train`` so that its objects are other draws than the held-out family of that name. Trained on
  ``heldout``, the ``heldout`` column is that family's in-distribution figure at this budget: the most a finder
  trained on anything else could be expected to reach there; the other columns say how it transfers.

Training levers (the physical population, the member changed):

* ``film``: the member with FiLM conditioning on the observing conditions (``film: true``).
* ``colour_residual`` (``colour_residual=0``): the member with (without) the RingFinder band difference as one more
  input channel. The demo profile has it since it was measured, so every lever has it; ``colour_residual=0`` is the
  member without.
* ``radial_residual``: the member with each band less its radial median profile as more input channels.
* ``elliptical_residual``: the same with the median on ellipses of the deflector's shape (adaptive moments).
* ``ema=<epochs>``: validation, model selection and scoring with a moving average of the weights over about that
  many epochs (``module.LensClassifier.update_weight_average``).
* ``head_dropout`` (``head_dropout=<p>``): the member with dropout (default 0.2) on its pooled features before the
  classifier, which MC-dropout scoring needs. The demo profile trains with 0.2 since it was measured, so every
  lever has it; ``head_dropout=0`` is the member without.
* ``arc_attention``: the member with a tangential self-attention branch about the centre whose logit adds to
  the backbone's (``module.TangentialAttention``).
* ``float32_stem[=0]``: the member's first convolution in float32 under bf16 autocast, so the scaled input is
  not rounded to bf16 first (``module.float32_first_conv``).
* ``fresh=<share>``: that share of every training batch replaced by physical objects simulated on the fly
  (``ml/fresh.py``); compare at equal CPU time with ``--max-minutes``.
* ``theta_e_balance=<alpha>``: training rows drawn at weight share^-alpha of their scene's Einstein-radius bin
  (``ml/data.balance_weights``), alpha in [0, 1].
* ``physics`` (``physics=<w>``): the gated physics-consistency loss at weight w (default 0.1), warm-up 2 epochs.
* ``upsample=<k>``: the member's input upsampled k times (bilinear) before the backbone, at k² the compute.
* ``zoom=<max>``: each training cutout magnified by a factor log-uniform in [1, max] (``module.augment``): larger
  Einstein radii, deflectors and PSFs than the population draws, for both classes alike.
* ``lr=<rate>``, ``batch_size=<n>``: the member's peak learning rate (AdamW, cosine schedule; the demo profile's
  2e-3) or its CPU batch size (the demo profile's 64), at the same epochs.
* ``member=<backbone>``: another backbone in place of ``--members`` (e.g. ``member=resnet10t``), at the
  same epochs; the wall time and training img/s say what it costs.

Shard levers (the physical population and member, the PSF matching changed):

* ``psf_target=<arcsec>``: ``psf_matched_shards``' ``target_fwhm_arcsec`` (default: the broadest band's nominal
  seeing at its 90th percentile, 1.45" for DES); bands already broader than a narrower target stay unmatched and
  flagged.

Levers combine with ``+``: ``radial_residual+zoom=1.5`` trains with both, ``group=0.25+theta_e_balance=0.5`` on
that population with that weighting. A combination holds at most one population lever, and no two parts may set
the same option.

``--train-seed`` changes the members' initialization and batch order while the data stay those of ``--seed``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import report, write_family  # noqa: E402

from lens_assets.science.metrics import THETA_E_HALVES  # noqa: E402

LEVERS = ("physical", "baseline", "no_twins", "no_environment", "no_observation", "selection_without_collett_terms")
POPULATION_PREFIXES = ("deep=", "group=", "negatives=", "quasars=", "toml=",
                       "train_family=")  # levers that carry a value
VALUE_LEVERS = ("deep=<factor>", "group=<fraction>", "negatives=<type>:<weight>/...", "quasars=<share>",
                "toml=<section>.<key>:<number>/...",
                "train_family=<name>")  # a family written from physical.toml with one value set, or a packaged one
TRAINING_LEVERS = ("film", "colour_residual[=0]", "radial_residual", "elliptical_residual",
                   "ema=<epochs>", "head_dropout[=p]", "upsample=<k>", "zoom=<max>",
                   "arc_attention", "float32_stem[=0]", "fresh=<share>", "physics[=w]", "theta_e_balance=<alpha>",
                   "member=<backbone>", "lr=<rate>",
                   "batch_size=<n>")  # the physical population, another training choice
SHARD_LEVERS = ("psf_target=<arcsec>",)  # the physical population, other PSF-matched shards
# bologna_report's lensing-only AUROC over the pairs of the upper θE half, by the name it gives it
LO_LARGE = f"lensing_only_auroc_theta_e_{THETA_E_HALVES[1][0]}"


def lever_parts(lever: str) -> list[str]:
    """The levers a combined lever (``a+b``) is made of; a single lever is its own one part. A ``+`` joins levers
    where a lever's name follows it, so a number's exponent (``deep=1e+2``) stays in its lever."""
    parts = re.split(r"\+(?=[A-Za-z_]|$)", lever) if lever else [""]
    if any(not p for p in parts):
        raise ValueError(f"lever {lever!r}: an empty part; combine levers as <lever>+<lever>")
    return parts


def is_population(lever: str) -> bool:
    """Whether ``lever`` (one part) chooses the training population."""
    return lever in LEVERS or lever.startswith(POPULATION_PREFIXES)


def _merged(lever: str, overrides) -> dict:
    """``overrides`` of every part of a combined ``lever`` in one config; a ``ValueError`` where two parts set the
    same option."""
    out: dict = {}
    for part in lever_parts(lever):
        got = overrides(part)
        twice = sorted(set(got) & set(out))
        if twice:
            raise ValueError(f"lever {lever!r}: {twice} set by two of its parts")
        out.update(got)
    return out


def unknown_parts(lever: str) -> list[str]:
    """The parts of ``lever`` that are no lever at all."""
    return [p for p in lever_parts(lever) if not is_population(p) and not training_overrides(p)
            and not shard_overrides(p)]


def shard_overrides(lever: str) -> dict:
    """``psf_matched_shards`` config of a shard lever (empty for the others)."""
    if len(lever_parts(lever)) > 1:
        return _merged(lever, shard_overrides)
    if lever.startswith("psf_target="):
        return {"target_fwhm_arcsec": float(lever.split("=", 1)[1])}
    return {}


def training_overrides(lever: str) -> dict:
    """``lens_classifier`` config of a training lever (empty for a population lever)."""
    if len(lever_parts(lever)) > 1:
        return _merged(lever, training_overrides)
    if lever == "film":
        return {"film": True}
    if lever in ("colour_residual", "colour_residual=1", "colour_residual=0"):
        return {"colour_residual": lever != "colour_residual=0"}
    if lever == "radial_residual":
        return {"radial_residual": True}
    if lever == "elliptical_residual":
        return {"elliptical_residual": True}
    if lever.startswith("ema="):
        return {"ema_epochs": lever_number(lever, lambda v: v > 0, "the average's memory in epochs must be > 0")}
    if lever.startswith("physics"):
        return {"physics_weight": float(lever.split("=", 1)[1]) if "=" in lever else 0.1}
    if lever.startswith("theta_e_balance="):
        return {"theta_e_balance": lever_number(lever, lambda v: 0.0 <= v <= 1.0, "alpha must be a number in [0, 1]")}
    if lever.startswith("fresh="):
        return {"fresh_fraction": float(lever.split("=", 1)[1])}
    if lever == "arc_attention":
        return {"arc_attention": True}
    if lever in ("float32_stem", "float32_stem=1", "float32_stem=0"):
        return {"float32_stem": lever != "float32_stem=0"}
    if lever.startswith("upsample="):
        return {"upsample": int(lever.split("=", 1)[1])}
    if lever.startswith("zoom="):
        return {"zoom_max": lever_number(lever, lambda v: 1.0 <= v <= 3.0, "the largest zoom must be in [1, 3]")}
    if lever.startswith("lr="):
        return {"lr": lever_number(lever, lambda v: 0.0 < v < 1.0, "the learning rate must be in (0, 1)")}
    if lever.startswith("batch_size="):
        return {"batch_size": int(lever_number(lever, lambda v: v >= 2 and v.is_integer(),
                                               "the batch size must be a whole number >= 2"))}
    if lever.startswith("head_dropout"):
        return {"head_dropout": float(lever.split("=", 1)[1]) if "=" in lever else 0.2}
    if lever.startswith("member="):
        from lens_assets.ml.backbones import get_spec

        name = lever.split("=", 1)[1]
        get_spec(name)  # an unknown backbone is an error listing the registry
        return {"members": [name]}
    return {}


def lever_number(lever: str, ok, what: str) -> float:
    """The number after ``=`` in ``lever``; a ``ValueError`` saying ``what`` it must be unless ``ok(number)``."""
    try:
        value = float(lever.split("=", 1)[1])
    except (IndexError, ValueError):
        value = float("nan")
    if not ok(value):  # NaN fails every comparison
        raise ValueError(f"lever {lever!r}: {what}")
    return value


def deep_factor(lever: str) -> float:
    """The exposure factor of a ``deep=<factor>`` lever (a positive number)."""
    return lever_number(lever, lambda v: v > 0, "the exposure factor must be a positive number")


def group_share(lever: str) -> float:
    """The share of a ``group=<fraction>`` lever (a number in [0, 1])."""
    return lever_number(lever, lambda v: 0.0 <= v <= 1.0, "the group share must be a number in [0, 1]")


def quasar_share(lever: str) -> float:
    """The share of a ``quasars=<share>`` lever (a number in [0, 1])."""
    return lever_number(lever, lambda v: 0.0 <= v <= 1.0, "the quasar share must be a number in [0, 1]")


def heldout_names(families) -> list[str]:
    """The family names (``SIMFAM``, what the evaluation selects by) of ``--heldout`` entries, names or TOML paths."""
    from lens_assets.science.families import load_family

    return [load_family(f).name for f in families]


def lever_slug(lever: str) -> str:
    """``lever`` as a file and family name: ``=`` dropped, other characters outside ``[A-Za-z0-9_.]`` as ``_``; past
    32 characters its first 23 and 8 hex digits of its sha1 (a family name is written into each file's header)."""
    import hashlib

    slug = re.sub(r"[^A-Za-z0-9_.]", "_", lever.replace("=", ""))
    return slug if len(slug) <= 32 else f"{slug[:23]}_{hashlib.sha1(lever.encode()).hexdigest()[:8]}"


def negative_weights(lever: str) -> dict:
    """The ``[negatives]`` weights a ``negatives=<type>:<weight>/...`` lever sets (the other types keep theirs)."""
    from lens_assets.science.families import PHYSICAL_NEGATIVE_TYPES

    out = {}
    for part in lever.split("=", 1)[1].split("/") if "=" in lever else []:
        kind, _, value = part.partition(":")
        if kind not in PHYSICAL_NEGATIVE_TYPES:
            raise ValueError(f"lever {lever!r}: {kind!r} is not a non-lens type of the physical population; the "
                             f"types are {list(PHYSICAL_NEGATIVE_TYPES)}")
        out[kind] = lever_number(f"{kind}={value}", lambda v: v >= 0, "each weight must be a number >= 0")
    if not out:
        raise ValueError(f"lever {lever!r}: give weights as negatives=<type>:<weight>/<type>:<weight>...")
    return out


def toml_edits(lever: str) -> list[tuple[str, str, str]]:
    """The ``(section, key, value)`` edits of a ``toml=<section>.<key>:<value>/...`` lever; each value a number."""
    out = []
    for part in lever.split("=", 1)[1].split("/") if "=" in lever else []:
        name, _, value = part.partition(":")
        section, _, key = name.partition(".")
        if not section or not key:
            raise ValueError(f"lever {lever!r}: {part!r} is not <section>.<key>:<value>")
        lever_number(f"{name}={value}", lambda v: v == v, "each value must be a number")
        out.append((section, key, value.strip()))  # as written: an integer key stays an integer
    if not out:
        raise ValueError(f"lever {lever!r}: give edits as toml=<section>.<key>:<value>/...")
    return out


def population_edits(lever: str) -> list[tuple[str, str, str]]:
    """The ``(section, key, value)`` edits of ``physical.toml`` that make a population lever's family."""
    if lever.startswith("deep="):
        return [("noise", "render_exposure_factor", repr(deep_factor(lever)))]
    if lever.startswith("group="):
        return [("deflector", "group_fraction", repr(group_share(lever)))]
    if lever.startswith("toml="):
        return toml_edits(lever)
    if lever.startswith("quasars="):
        share = quasar_share(lever)
        p = [round(1.0 - share, 12), share]  # rounded: 1 - 0.07 is written 0.93, not 0.9299999999999999
        return [("source", "kind", f'{{ dist = "choice", values = ["extended", "quasar"], p = {p!r} }}')]
    if lever.startswith("negatives="):
        return [("negatives", kind, repr(weight)) for kind, weight in negative_weights(lever).items()]
    if lever == "no_twins":
        return [("negatives", "twin", "0.0")]
    if lever == "no_environment":
        return [("environment", "n_neighbours", '{ dist = "randint", low = 0, high = 0 }'),
                ("environment", "satellite_fraction", "0.0"), ("environment", "star_fraction", "0.0")]
    if lever == "selection_without_collett_terms":
        return [("selection", "deflector_photon_noise", "0"), ("selection", "source_size_in_resolution", "0.0")]
    if lever == "no_observation":
        return [*(("observation", key, "0.0") for key in ("zero_point_error_mag", "misregistration_px",
                                                          "background_gradient_sigma", "variance_withheld_fraction",
                                                          "small_cutout_fraction")),
                ("noise", "sky_scale", "1.0"), ("noise", "read_noise_scale", "1.0"),
                ("psf", "profile", '{ dist = "choice", values = ["gaussian", "moffat"], p = [0.5, 0.5] }'),
                ("psf", "seeing_scatter_scale", "1.0")]
    raise ValueError(f"unknown lever {lever!r}; levers are "
                     f"{list(LEVERS) + list(VALUE_LEVERS) + list(TRAINING_LEVERS)}")


def family_file(lever: str, out_dir: Path) -> str:
    """The family (name or TOML path) that trains the ``lever`` run; a written family is loaded first, so an edit
    it refuses stops here. A combined lever trains on its population part's family (``physical`` without one)."""
    if len(lever_parts(lever)) > 1:
        populations = [p for p in lever_parts(lever) if is_population(p)]
        if len(populations) > 1:
            raise ValueError(f"lever {lever!r}: more than one population lever ({populations}); combine one "
                             "population with training or shard levers")
        return family_file(populations[0], out_dir) if populations else "physical"
    if lever in ("physical", "baseline"):
        return lever
    if lever.startswith("train_family="):
        from lens_assets.science.families import FAMILY_DIR

        base = lever.split("=", 1)[1]
        if not (FAMILY_DIR / f"{base}.toml").is_file():
            raise ValueError(f"lever {lever!r}: no packaged family {base!r}; they are "
                             f"{sorted(p.stem for p in FAMILY_DIR.glob('*.toml'))}")
        return str(write_family(base, out_dir / f"{base}_train.toml", [], name=f"{base}_train"))
    if training_overrides(lever) or shard_overrides(lever):
        return "physical"
    slug = lever_slug(lever)
    # deep keeps the name: objects are seeded by it, so these are the same scenes
    name = None if lever.startswith("deep=") else f"physical_{slug}"
    return str(write_family("physical", out_dir / f"physical_{slug}.toml", population_edits(lever), name=name))


def renderer_override(family: str, renderer: str | None = None) -> dict:
    """``simulated_cutouts`` fields for the training ``family``: ``renderer`` (default the demo profile's, torch)
    draws a family that lenstronomy renders; one that other code renders (GalSim: ``train_family=galsim``) keeps its
    own."""
    from lens_assets.ml.torch_simulation import torch_refusal
    from lens_assets.science.families import load_family

    if torch_refusal(load_family(family)):
        return {"renderer": "lenstronomy"}
    return {} if renderer is None else {"renderer": renderer}


def lever_config(lever: str, args, work: Path) -> dict:
    """The run config of ``lever``'s survey_pipeline run (its family file written under ``work``)."""
    from lens_assets.profiles import run_config

    names = heldout_names(args.heldout)
    family = family_file(lever, work)
    ov = {"simulated_cutouts": {"n_cutouts": args.n_cutouts, "n_heldout": args.n_heldout, "family": family,
                                "more_heldout_families": args.heldout, "n_pairs": args.n_pairs,
                                "pairs_family": "physical",
                                **renderer_override(family, getattr(args, "renderer", None))},
          "psf_matched_shards": shard_overrides(lever),
          "lens_classifier": {"members": args.members, "epochs": args.epochs, "max_minutes": args.max_minutes,
                              "seed": getattr(args, "train_seed", 0), **training_overrides(lever)},
          "score_calibrator": {"fusion": "mean", "heldout_families": ["heldout", *names]},
          "shortcut_audit": {"heldout_families": ["heldout", *names]}}
    config = run_config("demo", seed=args.seed, overrides=ov)
    config["loggers"] = {"console": {"config": {"log_level": "WARNING"}}}
    return config


def run_lever(lever: str, args, work: Path) -> dict:
    import dagster as dg

    from lens_assets.definitions import defs
    from lens_assets.resources.storage import LocalStorage

    root = work / lever_slug(lever)
    names = heldout_names(args.heldout)
    config = lever_config(lever, args, work)
    family = config["ops"]["simulated_cutouts"]["config"]["family"]

    job = defs.resolve_job_def("survey_pipeline")
    t0 = time.perf_counter()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(partition_key=args.survey, instance=instance, run_config=config,
                                        resources={"storage": LocalStorage(root=str(root))}, raise_on_error=False)
        wall = time.perf_counter() - t0
        from lens_assets.demo import only_gates_failed

        if not result.success and not only_gates_failed(result):  # a failed gate only withholds the promotion
            failures = [str(e.event_specific_data.error)[:400] for e in result.all_events
                        if e.event_type_value == "STEP_FAILURE"]
            raise RuntimeError(f"lever {lever}: the pipeline failed: {failures}")
        meta = {}
        for event in result.get_asset_materialization_events():
            mat = event.event_specific_data.materialization
            meta[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    r, lc = meta["bologna_report"], meta["lens_classifier"]
    member = lc["members"].split(",")[0]
    row = {"lever": lever, "family": family, "wall_s": wall, "auroc": r["auroc"], "tpr10": r["tpr10"],
           "fnr_flux_ratio_lt_0.1": r["fnr_flux_ratio_lt_0.1"], "auroc_flux_ratio_lt_0.1": r["auroc_flux_ratio_lt_0.1"],
           "n_test_nonlenses": r["n_test_nonlenses"],
           "heldout_auroc": r["heldout_auroc"], "lensing_only_auroc": r.get("lensing_only_auroc", float("nan")),
           LO_LARGE: r.get(LO_LARGE, float("nan")),
           "shortcut_auroc": meta["shortcut_audit"]["shortcut_auroc"],
           "shortcut_auroc_without_twins": meta["shortcut_audit"].get("shortcut_auroc_without_twins", float("nan")),
           "train_img_per_s": lc.get(f"{member}/train_img_per_s", float("nan")),
           "renderer": meta["simulated_cutouts"].get("renderer", "lenstronomy")}
    for fam in names:
        row[f"heldout_{fam}_auroc"] = r.get(f"heldout_{fam}_auroc", float("nan"))
    return row


def arg_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The options of one ablation run: the data sizes, held-out families, member, epochs, seeds, work folder. The
    defaults are the demo profile's cutouts, member and epochs, with 400 objects per held-out family and 400 pairs
    (docs/results.md's runs)."""
    from lens_assets.profiles import PROFILES

    demo = PROFILES["demo"]
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--survey", default="des")
    ap.add_argument("--n-cutouts", type=int, default=demo["simulated_cutouts"]["n_cutouts"])
    ap.add_argument("--n-heldout", type=int, default=400)
    ap.add_argument("--n-pairs", type=int, default=400)
    ap.add_argument("--heldout", default="galsim",
                    help="further held-out families, names or TOML paths (comma-separated; '' for none)")
    ap.add_argument("--members", default=",".join(demo["lens_classifier"]["members"]))
    ap.add_argument("--epochs", type=int, default=demo["lens_classifier"]["epochs"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-seed", type=int, default=0, help="the members' seed (the data follow --seed)")
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="train every lever for this many minutes (equal CPU budget; set --epochs high and the "
                         "cosine schedule spans --epochs); 0: --epochs decides")
    ap.add_argument("--work", default=None, help="folder for the runs' data (default: a temporary one)")
    from lens_assets.ml.torch_simulation import RENDERERS

    ap.add_argument("--renderer", default=None, choices=RENDERERS,
                    help="what draws the training family's light (default the demo profile's, torch; "
                         "lenstronomy: the reference, as the runs before the profiles changed)")
    return ap


def main(argv=None) -> list[dict]:
    ap = arg_parser()
    ap.add_argument("--levers", default=",".join(LEVERS))
    args = ap.parse_args(argv)
    args.members = args.members.split(",")
    args.heldout = [f for f in args.heldout.split(",") if f]
    levers = [lv for lv in args.levers.split(",") if lv]  # a trailing comma is no lever
    unknown = [p for lv in levers for p in unknown_parts(lv)]  # before hours of runs
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; levers are "
                         f"{list(LEVERS) + list(VALUE_LEVERS) + list(TRAINING_LEVERS) + list(SHARD_LEVERS)}")
    with tempfile.TemporaryDirectory() as tmp:  # every population's family is written and loaded, and every
        from lens_assets.definitions import ASSETS
        from lens_assets.profiles import check_run_config

        for lv in levers:  # combination's options merged and bounds checked: a bad value or a clash stops here
            config = lever_config(lv, args, Path(tmp))  # a bad lever raises here, naming itself
            try:
                check_run_config(ASSETS, config)
            except ValueError as err:
                raise SystemExit(f"lever {lv!r}: {err}") from None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for lever in levers:
            print(f"-- {lever}", flush=True)
            rows.append(run_lever(lever, args, work))
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    cols = ["auroc", "tpr10", "fnr_flux_ratio_lt_0.1", "auroc_flux_ratio_lt_0.1", "heldout_auroc",
            *[k for k in rows[0] if k.startswith("heldout_") and k != "heldout_auroc"], "lensing_only_auroc",
            LO_LARGE, "shortcut_auroc", "shortcut_auroc_without_twins"]
    head = "| lever | " + " | ".join(cols) + " | wall min | renderer |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for row in rows:
        lines.append(f"| {row['lever']} | " + " | ".join(f"{row[c]:.3f}" for c in cols)
                     + f" | {row['wall_s'] / 60:.1f} | {row.get('renderer', '')} |")
    print("\n".join(lines))
    report("ablation", [(row["lever"], ", ".join(f"{c} {row[c]:.3f}" for c in cols)) for row in rows],
           {"rows": rows, "settings": {k: v for k, v in vars(args).items()}})
    return rows


if __name__ == "__main__":
    main()
