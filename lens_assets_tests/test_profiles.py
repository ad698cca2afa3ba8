"""Run-config profiles: they are valid configs of survey_pipeline and the full one is big enough for TPR10."""

import math

import pytest
from dagster import DagsterInvalidConfigError, validate_run_config

from lens_assets.assets.evaluation import GATE_FIELDS, ReportConfig
from lens_assets.assets.shards import SplitConfig
from lens_assets.assets.simulation import SimulationConfig
from lens_assets.definitions import ALL_ASSETS, ASSETS, defs
from lens_assets.profiles import PROFILES, check_run_config, run_config
from lens_assets.science.families import load_family



@pytest.mark.parametrize("profile", ["demo", "full"])
def test_profile_is_a_valid_run_config_of_survey_pipeline(profile):
    job = defs.resolve_job_def("survey_pipeline")
    config = run_config(profile, seed=3)
    resolved = validate_run_config(job, config)
    for op, fields in PROFILES[profile].items():
        for field, value in fields.items():
            assert resolved["ops"][op]["config"][field] == value, (op, field)
    assert resolved["ops"]["simulated_cutouts"]["config"]["seed"] == 3
    # the schema does not carry the pydantic bounds (ge, le, gt): the config classes check them
    check_run_config(ASSETS, config)


@pytest.mark.parametrize("profile", ["demo", "full"])
def test_every_gate_of_a_profile_can_fail_and_a_broken_model_is_never_promoted(profile):
    """A gate or target is a threshold a figure can miss, or None (not gated, and saying so): a minimum of 0 or a
    maximum of 1 would pass whatever the figure. Each profile gates the test AUROC above chance, so a model that
    learned nothing is not promoted; the demo's quality targets are its issue's, as advisory targets."""
    cfg = ReportConfig(**run_config(profile)["ops"]["bologna_report"]["config"])
    fields = {k: getattr(cfg, k) for pair in GATE_FIELDS.values() for k in pair}
    assert len(fields) == 12
    for gate_field, target_field in GATE_FIELDS.values():
        for name in (gate_field, target_field):  # a minimum above 0, a maximum below 1
            value = fields[name]
            assert value is None or (value > 0 if gate_field.startswith("min_") else value < 1), (name, value)
    assert cfg.min_auroc is not None and cfg.min_auroc >= 0.7
    if profile == "full":  # the release gates, every one blocking
        assert all(fields[gate] is not None and fields[target] is None for gate, target in GATE_FIELDS.values())
    else:
        assert (cfg.target_auroc, cfg.target_heldout_auroc, cfg.target_lensing_only_auroc) == (0.90, 0.85, 0.95)
        assert {k: v for k, v in fields.items() if not k.startswith("target_")} == {
            "min_auroc": 0.75, "min_tpr10": None, "max_ece": 0.15, "min_heldout_auroc": None,
            "min_lensing_only_auroc": None, "max_fnr_flux_ratio_lt_0_1": None}  # as README's Profiles says


def test_a_target_easier_than_its_gate_is_refused_and_a_misspelt_one_by_the_schema():
    with pytest.raises(ValueError, match="target_auroc 0.8 is easier than min_auroc 0.9"):
        ReportConfig(min_auroc=0.9, target_auroc=0.8)
    with pytest.raises(ValueError, match="target_ece 0.2 is easier than max_ece 0.1"):
        ReportConfig(max_ece=0.1, target_ece=0.2)
    assert ReportConfig(min_auroc=None, target_auroc=0.5).target_auroc == 0.5
    job = defs.resolve_job_def("survey_pipeline")
    with pytest.raises(DagsterInvalidConfigError, match=r'unexpected config entry "target_aurc"'):
        validate_run_config(job, run_config("demo", overrides={"bologna_report": {"target_aurc": 0.9}}))


def test_a_run_config_with_a_misspelt_field_is_rejected_by_the_schema():
    job = defs.resolve_job_def("survey_pipeline")
    with pytest.raises(DagsterInvalidConfigError, match=r'unexpected config entry "epoch"'):
        validate_run_config(job, run_config("demo", overrides={"lens_classifier": {"epoch": 2}}))


@pytest.mark.parametrize("track,op,field,value", [
    ("galaxy", "simulated_cutouts", "renderer", "galsim"),
    ("galaxy", "psf_matched_shards", "compression", "zip"),
    ("galaxy", "lens_classifier", "precision", "fp16"),
    ("galaxy", "lens_classifier", "fresh_renderer", "numpy"),
    ("galaxy", "score_calibrator", "method", "sigmoid"),
    ("galaxy", "score_calibrator", "fusion", "median"),
    ("clusters", "arc_segments", "light", "box"),
    ("clusters", "cluster_track_b", "precision", "fp16"),
    ("clusters", "cluster_report", "scoring_model", "fused"),
])
def test_a_choice_outside_its_options_is_refused_by_the_schema_before_any_step_runs(track, op, field, value):
    """Choices are Literal types, so the launchpad and the run's config check refuse them at launch (before, a
    misspelt calibration method failed only after the ensemble had scored every row)."""
    job = defs.resolve_job_def("survey_pipeline" if track == "galaxy" else "cluster_pipeline")
    with pytest.raises(DagsterInvalidConfigError, match=rf"{op}:config:{field} not in enum type Literal"):
        validate_run_config(job, run_config("demo", track=track, overrides={op: {field: value}}))


def test_overrides_replace_fields_and_keep_the_others():
    base = run_config("demo")["ops"]
    out = run_config("demo", overrides={"lens_classifier": {"epochs": 1, "members": ["resnet10t"]},
                                        "dataset_splits": {"seed": 7}})["ops"]
    assert out["lens_classifier"]["config"] == {**base["lens_classifier"]["config"], "epochs": 1,
                                                "members": ["resnet10t"]}
    assert out["dataset_splits"] == {"config": {"seed": 7}}  # an op the profile does not set is added
    assert out["simulated_cutouts"] == base["simulated_cutouts"]
    assert PROFILES["demo"]["lens_classifier"]["epochs"] != 1  # the profile itself is not modified
    assert run_config("demo") == {"ops": base}
    validate_run_config(defs.resolve_job_def("survey_pipeline"), {"ops": out})


def test_unknown_profile_is_a_key_error_listing_the_profiles():
    with pytest.raises(KeyError, match=r"unknown galaxy profile 'quick'; profiles are \['demo', 'full'\]"):
        run_config("quick")


def test_full_profile_has_at_least_5000_test_nonlenses():
    sim = SimulationConfig(**run_config("full")["ops"]["simulated_cutouts"]["config"])
    splits = SplitConfig(**run_config("full")["ops"].get("dataset_splits", {}).get("config", {}))
    test_fraction = splits.fractions[2]
    assert test_fraction == pytest.approx(0.15)
    family = load_family(sim.family)
    assert "heldout" in splits.exclude_families  # held-out objects are not in the test split: only n_cutouts count
    p_nonlens = 1.0 - family.lens_fraction
    # non-lenses are Binomial(n, 1 - lens_fraction); the splits stratify by label, so the test split holds
    # test_fraction of them: ask for 5,000 three standard deviations below the expectation
    mean = sim.n_cutouts * p_nonlens * test_fraction
    sd = test_fraction * math.sqrt(sim.n_cutouts * p_nonlens * (1 - p_nonlens))
    assert mean - 3 * sd >= 5000, (sim.n_cutouts, family.lens_fraction, mean, sd)


@pytest.mark.parametrize("profile", ["demo", "full"])
def test_cluster_profile_is_a_valid_run_config_of_cluster_pipeline(profile):
    from lens_assets.assets.cluster_track_b import ClusterTrackBConfig
    from lens_assets.assets.clusters import ClusterClassifierConfig, ClusterFieldsConfig
    from lens_assets.profiles import CLUSTER_PROFILES

    classes = {"cluster_fields": ClusterFieldsConfig, "cluster_classifier": ClusterClassifierConfig,
               "cluster_track_b": ClusterTrackBConfig}
    config = run_config(profile, seed=5, track="clusters")
    resolved = validate_run_config(defs.resolve_job_def("cluster_pipeline"), config)
    for op, fields in CLUSTER_PROFILES[profile].items():
        for field, value in fields.items():
            assert resolved["ops"][op]["config"][field] == value, (op, field)
    assert resolved["ops"]["cluster_fields"]["config"]["seed"] == 5
    for op, cfg in config["ops"].items():
        classes[op](**cfg["config"])
    # the fusion fits on the val split's calibrate half (a tenth of the fields, half of them non-lenses) and needs
    # ten non-lenses there for FPR <= 0.1 to allow one false positive
    assert CLUSTER_PROFILES[profile]["cluster_fields"]["n_fields"] * 0.1 * 0.5 >= 10
    with pytest.raises(KeyError, match=r"unknown clusters profile 'quick'"):
        run_config("quick", track="clusters")


def test_check_run_config_applies_the_config_classes_bounds_that_the_schema_lacks():
    for profile in ("demo", "full"):  # the profiles themselves pass, both tracks (the demo checks both)
        check_run_config(ALL_ASSETS, run_config(profile))
        check_run_config(ALL_ASSETS, run_config(profile, track="clusters"))
    with pytest.raises(ValueError, match="cluster_fields config n_fields = 0"):  # the cluster track's classes too
        check_run_config(ALL_ASSETS, run_config("demo", track="clusters",
                                                overrides={"cluster_fields": {"n_fields": 0}}))
    bad = run_config("full", overrides={"lens_classifier": {"seed": -1, "epochs": 0},
                                        "simulated_cutouts": {"n_cutouts": 0}})
    validate_run_config(defs.resolve_job_def("survey_pipeline"), bad)  # the schema accepts them ...
    with pytest.raises(ValueError) as err:  # ... the classes do not, each named with its op, field and value
        check_run_config(ASSETS, bad)
    for part in ("simulated_cutouts config n_cutouts = 0", "lens_classifier config seed = -1",
                 "lens_classifier config epochs = 0"):
        assert part in str(err.value), part
