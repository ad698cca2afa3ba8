"""Run-config profiles for ``survey_pipeline``: ``demo`` (minutes on 2 CPU cores) and ``full`` (the quality run).

    python -m lens_assets.demo --profile full --survey des

Each profile is the run config of every op that differs from its defaults; the
simulation priors are the families' (``science/families/*.toml``), the same in
both profiles: only sizes, epochs and the report's gates change.
"""

from __future__ import annotations

import copy

__all__ = ["PROFILES", "CLUSTER_PROFILES", "run_config", "check_run_config"]

PROFILES: dict[str, dict] = {
    # 4k physical cutouts (+ 400 per held-out family, 400 lens/twin pairs): the whole graph in minutes on 2 CPU cores.
    # The gates are set for what this much data can show; the demo's quality targets are the report's targets.
    "demo": {
        # the training family's light by the batched torch renderer (lenstronomy's pixels to 2e-4 of the peak, the same
        # objects and noise draws): on two seeds the demo's figures moved within their noise and its simulation ran
        # 1.44-1.61x faster (README, Simulation); held-out families and the pairs keep their own renderers
        "simulated_cutouts": {"n_cutouts": 4000, "n_heldout": 400, "more_heldout_families": ["galsim"],
                              "renderer": "torch"},
        # one member, regnetx_002 (bench_ablation's best per CPU-minute): the physical population needs data more
        # than members, and a 4-epoch ViT on a few thousand cutouts stayed near chance
        # head dropout 0.2: the candidates' MC-dropout uncertainty; off the simulator it changed nothing beyond the
        # run-to-run noise in two seeds (bench_ablation head_dropout, docs/results.md)
        # colour residual: in five runs it raised galsim (other code) every time, by 0.05 on average; in the three
        # that measured it, the lensing-only AUROC of the theta_E >= 1.2" pairs by 0.07; heldout fell 0.03
        # (docs/results.md)
        "lens_classifier": {"members": ["regnetx_002"], "epochs": 8, "batch_size": 64, "lr": 2e-3, "patience": 4,
                            "head_dropout": 0.2, "colour_residual": True},
        "score_calibrator": {"fusion": "mean"},
        # Gates (blocking: a miss stops the promotion) set for what 4,000 cutouts can show, so a broken run is never
        # promoted: test AUROC >= 0.75 (chance is 0.5) and ECE <= 0.15 (on 600 test rows a perfectly calibrated
        # model scores 0.053 on average and 0.071 at the 95th percentile, simulated; a constant probability at the
        # lens fraction scores 0.06, so the AUROC gate is what stops a model that learned nothing). Targets (advisory: a
        # miss is a WARN, shown and recorded, blocking nothing): the galaxy issue's demo targets, test AUROC >= 0.90
        # and every held-out family >= 0.85, and the lensing-only gate of the full profile, 0.95. TPR10 and the
        # faint-arc FNR have no demo target: not gated.
        "bologna_report": {"min_auroc": 0.75, "target_auroc": 0.90, "min_tpr10": None, "max_ece": 0.15,
                           "min_heldout_auroc": None, "target_heldout_auroc": 0.85,
                           "min_lensing_only_auroc": None, "target_lensing_only_auroc": 0.95,
                           "max_fnr_flux_ratio_lt_0_1": None},
    },
    # The quality run: >= 5,000 test non-lenses for TPR10 (120,000 x 15% test x 50% non-lenses = 9,000);
    # gates are the release targets.
    "full": {
        # 120,000 cutouts for 18 epochs. More data alone moved little (120,000 for 6 epochs, the steps of 72,000 for
        # 10, gave the 72,000 figures within a few hundredths); more steps on them raised both held-out families
        # beyond their intervals: heldout 0.588 (6 epochs), 0.619-0.643 (12, three runs), 0.665 (18); galsim 0.793,
        # 0.823-0.837, 0.853 (docs/results.md, The full profile; 18 over the better 12-epoch seed by about the two
        # seeds' spread). 18 epochs nearly fill the 100-minute budget: 90.1 minutes from a fresh clone on 2 bf16
        # cores (training at 468 img/s), about 94 estimated on the AMX machine of the 12-epoch runs (406 img/s).
        # The torch renderer takes the time (side by side with
        # lenstronomy at 72,000, one run each: test -0.007, heldout -0.020, beyond its interval over objects, galsim
        # +0.006) and is the demo's; held-out families keep their own renderers
        "simulated_cutouts": {"n_cutouts": 120000, "n_heldout": 8000, "more_heldout_families": ["galsim"],
                              "renderer": "torch"},
        # regnetx_002: at equal epochs it trained 2.1x faster than resnet10t and beat it off the simulator
        # (bench_ablation member= levers, docs/results.md); the vit_tiny_p8 member stayed near chance on CPU budgets
        "lens_classifier": {"members": ["regnetx_002"], "epochs": 18, "batch_size": 128, "lr": 2e-3, "patience": 4,
                            "head_dropout": 0.2, "colour_residual": True},
        "bologna_report": {"min_auroc": 0.99, "min_tpr10": 0.6, "max_ece": 0.02, "min_heldout_auroc": 0.95,
                           "min_lensing_only_auroc": 0.95, "max_fnr_flux_ratio_lt_0_1": 0.3},
        "shortcut_audit": {"max_shortcut_auroc": 0.65},
    },
}


# Run configs of ``cluster_pipeline``, by the same names. The fusion fits its weights on the val split's calibrate
# half and needs ten non-lenses there for FPR <= 0.1 to allow one false positive: 300 fields give about fifteen.
CLUSTER_PROFILES: dict[str, dict] = {
    # the cluster track in a few minutes on 2 CPU cores (pu_200 is skipped with a note: about 90 training lenses)
    "demo": {
        "cluster_fields": {"n_fields": 300},
        "cluster_classifier": {"pu_labeled": [10, 50, 200]},
    },
    # the quality run: 1,600 + 400 held-out fields, PU from 10, 50 and 200 labeled lenses for both tracks
    "full": {
        "cluster_fields": {"n_fields": 1600, "n_heldout": 400},
        "cluster_classifier": {"pu_labeled": [10, 50, 200]},
        "cluster_track_b": {"pu_labeled": [10, 50, 200]},
    },
}


def run_config(profile: str, *, seed: int | None = None, overrides: dict | None = None,
               track: str = "galaxy") -> dict:
    """The ``ops`` run config of ``profile`` for ``track`` (``galaxy``: :data:`PROFILES`, ``clusters``:
    :data:`CLUSTER_PROFILES`); ``overrides`` maps op -> fields to replace."""
    profiles, seeded = {"galaxy": (PROFILES, "simulated_cutouts"),
                        "clusters": (CLUSTER_PROFILES, "cluster_fields")}[track]
    try:
        ops = copy.deepcopy(profiles[profile])
    except KeyError:
        raise KeyError(f"unknown {track} profile {profile!r}; profiles are {sorted(profiles)}") from None
    if seed is not None:
        ops[seeded]["seed"] = seed
    for op, fields in (overrides or {}).items():
        ops.setdefault(op, {}).update(fields)
    return {"ops": {op: {"config": cfg} for op, cfg in ops.items()}}


def check_run_config(assets, config: dict) -> None:
    """Check each op's config in ``config`` (``{"ops": {op: {"config": {...}}}}``) with its asset's config class,
    bounds included (``ge``, ``le``, ``gt``: dagster's schema does not carry them, so a bad value would fail only
    when its asset is reached). Raises ValueError naming every op, field and value refused."""
    import typing

    import pydantic

    refused = []
    for asset in assets:
        name = asset.key.to_user_string()
        fields = config.get("ops", {}).get(name, {}).get("config")
        cls = typing.get_type_hints(asset.op.compute_fn.decorated_fn).get("config")
        if fields is None or cls is None:
            continue
        try:
            cls(**fields)
        except pydantic.ValidationError as err:
            refused += [f"{name} config {'.'.join(map(str, e['loc']))} = {e.get('input')!r}: {e['msg']}"
                        for e in err.errors()]
    if refused:
        raise ValueError("; ".join(refused))
