"""The benchmarks' JSON records hold whatever asset metadata a run returns."""

import json
import sys
from pathlib import Path

import dagster as dg
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import _util  # noqa: E402


def test_a_record_with_a_table_schema_and_numpy_values_is_written_as_json(tmp_path, monkeypatch):
    monkeypatch.setattr(_util, "RESULTS", tmp_path)
    schema = dg.TableSchema(columns=[dg.TableColumn("objid", "string")])
    record = {"metadata": {"cutout_catalog": {"schema": schema, "n": np.int64(3), "auroc": np.float32(0.5),
                                              "bands": ("g", "r"), "path": Path("/x")}}, "wall_s": 1.5}
    _util.report("t", [("a", "b")], record)
    back = json.loads((tmp_path / "t.json").read_text())["metadata"]["cutout_catalog"]
    assert back["n"] == 3 and back["auroc"] == 0.5 and back["bands"] == ["g", "r"] and back["path"] == "/x"
    assert isinstance(back["schema"], str) and "objid" in back["schema"]


def test_numeric_ablation_levers_are_checked_before_any_run(tmp_path):
    import pytest

    import bench_ablation

    assert bench_ablation.deep_factor("deep=100") == 100.0 and bench_ablation.group_share("group=0.25") == 0.25
    assert bench_ablation.training_overrides("theta_e_balance=0.5") == {"theta_e_balance": 0.5}
    assert bench_ablation.training_overrides("colour_residual=0") == {"colour_residual": False}  # the default is on
    assert bench_ablation.training_overrides("colour_residual") == {"colour_residual": True}
    assert bench_ablation.training_overrides("zoom=1.6") == {"zoom_max": 1.6}
    assert bench_ablation.training_overrides("lr=3e-3+batch_size=128") == {"lr": 3e-3, "batch_size": 128}
    # the profile's torch renderer for lenstronomy families; a GalSim-rendered training family keeps its renderer
    assert bench_ablation.renderer_override("physical") == {}
    assert bench_ablation.renderer_override("galsim") == {"renderer": "lenstronomy"}
    assert bench_ablation.renderer_override("physical", "lenstronomy") == {"renderer": "lenstronomy"}
    assert bench_ablation.renderer_override("galsim", "torch") == {"renderer": "lenstronomy"}  # never torch
    assert bench_ablation.renderer_override("cluster", "torch") == {"renderer": "lenstronomy"}
    assert bench_ablation.arg_parser().parse_args(["--renderer", "lenstronomy"]).renderer == "lenstronomy"
    for lever, what in (("deep=0", "positive"), ("deep=x", "positive"), ("group=1.5", r"\[0, 1\]"),
                        ("theta_e_balance=-1", r"\[0, 1\]"), ("zoom=0.5", r"\[1, 3\]"), ("lr=0", r"\(0, 1\)"),
                        ("batch_size=1.5", "whole number"), ("batch_size=inf", "whole number")):
        with pytest.raises(ValueError, match=what):
            bench_ablation.deep_factor(lever) if lever.startswith("deep") else (
                bench_ablation.group_share(lever) if lever.startswith("group") else
                bench_ablation.training_overrides(lever))
    assert bench_ablation.negative_weights("negatives=twin:0.2/ring:0.25") == {"twin": 0.2, "ring": 0.25}
    for lever, what in (("negatives=halo:0.2", "'halo' is not a non-lens type"),
                        ("negatives=ring:-1", ">= 0"), ("negatives=ring", ">= 0"),
                        ("negatives=", "'' is not a non-lens type")):
        with pytest.raises(ValueError, match=what):
            bench_ablation.main(["--levers", f"physical,{lever}"])  # refused before any run
    assert bench_ablation.toml_edits("toml=deflector.group_fraction:0.5/selection.min_arc_snr:10") == [
        ("deflector", "group_fraction", "0.5"), ("selection", "min_arc_snr", "10")]  # numbers as written
    for lever, what in (("toml=deflector:0.5", "is not <section>.<key>:<value>"),
                        ("toml=deflector.group_fraction:x", "must be a number"),
                        ("toml=deflector.no_such_key:1", "has no no_such_key in \\[deflector\\]")):
        with pytest.raises((ValueError, KeyError), match=what):
            bench_ablation.main(["--levers", f"physical,{lever}"])  # refused before any run
    from lens_assets.science.families import load_family

    quasars = load_family(bench_ablation.family_file("quasars=0.3", tmp_path))  # the loader checks the choice
    kind, rng = quasars.sections["source"]["kind"], __import__("numpy").random.default_rng(0)
    assert sum(kind.sample(rng) == "quasar" for _ in range(4000)) / 4000 == pytest.approx(0.3, abs=0.025)
    with pytest.raises(ValueError, match=r"quasar share must be a number in \[0, 1\]"):
        bench_ablation.main(["--levers", "physical,quasars=1.5"])  # refused before any run
    written = bench_ablation.family_file("toml=selection.min_arc_snr:10", tmp_path)
    assert "min_arc_snr = 10\n" in open(written).read()
    with pytest.raises(ValueError, match="give weights as"):
        bench_ablation.negative_weights("negatives")
    assert bench_ablation.lever_slug("negatives=twin:0.2/ring:0.25") == "negativestwin_0.2_ring_0.25"
    long = bench_ablation.lever_slug("negatives=twin:0.2/ring:0.2/spiral:0.2/companion_blob:0.2")
    assert len(long) == 32 and long.startswith("negativestwin_0.2_ring_")
    assert long != bench_ablation.lever_slug("negatives=twin:0.2/ring:0.2/spiral:0.2/companion_blob:0.3")
    with pytest.raises(SystemExit, match="unknown lever"):  # main refuses before any run
        bench_ablation.main(["--levers", "physical,no_such_lever"])


def test_levers_combine_with_a_plus_one_population_at_most_and_no_option_set_twice(tmp_path):
    import pytest

    import bench_ablation

    from lens_assets.science.families import load_family

    assert bench_ablation.training_overrides("radial_residual+zoom=1.5+colour_residual=0") == {
        "radial_residual": True, "zoom_max": 1.5, "colour_residual": False}
    assert bench_ablation.shard_overrides("psf_target=1.15+radial_residual") == {"target_fwhm_arcsec": 1.15}
    assert bench_ablation.training_overrides("group=0.25+theta_e_balance=0.5") == {"theta_e_balance": 0.5}
    assert bench_ablation.family_file("radial_residual+zoom=1.5", tmp_path) == "physical"
    fam = load_family(bench_ablation.family_file("group=0.25+theta_e_balance=0.5", tmp_path))
    assert fam.name == load_family(bench_ablation.family_file("group=0.25", tmp_path)).name == "physical_group0.25"
    assert fam.sections["deflector"]["group_fraction"].params["value"] == 0.25
    assert bench_ablation.lever_slug("radial_residual+zoom=1.5") == "radial_residual_zoom1.5"
    assert bench_ablation.lever_parts("deep=1e+2+radial_residual") == ["deep=1e+2", "radial_residual"]  # an exponent
    assert bench_ablation.deep_factor(bench_ablation.lever_parts("deep=1e+2+radial_residual")[0]) == 100.0
    for lever, what in (("zoom=1.5+zoom=2", r"\['zoom_max'\] set by two"),
                        ("group=0.25+no_twins", "more than one population lever"),
                        ("radial_residual+", "an empty part")):
        with pytest.raises(ValueError, match=what):
            bench_ablation.main(["--levers", f"physical,{lever}"])  # refused before any run
    with pytest.raises(SystemExit, match=r"unknown lever\(s\) \['nope'\]"):
        bench_ablation.main(["--levers", "radial_residual+nope"])


def test_a_packaged_family_trains_a_run_as_other_draws_of_the_same_priors(tmp_path):
    import pytest

    import bench_ablation

    from lens_assets.science.families import load_family

    base, fam = load_family("heldout"), load_family(bench_ablation.family_file("train_family=heldout", tmp_path))
    assert fam.name == "heldout_train"  # objects are seeded by the family's name: not the held-out family's draws
    assert fam.sections.keys() == base.sections.keys()
    for section, priors in base.sections.items():
        for key, prior in priors.items():
            new = fam.sections[section][key]
            assert (new.dist, dict(new.params)) == (prior.dist, dict(prior.params)), (section, key)
    with pytest.raises(ValueError, match="no packaged family 'nope'"):
        bench_ablation.main(["--levers", "physical,train_family=nope"])  # refused before any run


def test_heldout_variants_each_change_only_their_own_priors(tmp_path):
    import bench_heldout_attribution as attribution

    from lens_assets.science.families import load_family

    base = load_family("heldout")
    files = attribution.variant_files(tmp_path)
    assert set(files) == set(attribution.VARIANTS)
    for name, path in files.items():
        fam = load_family(path)
        assert fam.name == f"heldout_{name}"
        changed = {(s, k) for s, k, _ in attribution.VARIANTS[name]}
        for section, priors in base.sections.items():
            for key, prior in priors.items():
                new = fam.sections[section][key]
                same = (new.dist, dict(new.params)) == (prior.dist, dict(prior.params))
                assert same != ((section, key) in changed), (name, section, key)
        if ("negatives", "plain") not in changed:
            assert fam.negative_weights == base.negative_weights
    plain = load_family(files["plain_negatives"]).negative_weights
    assert plain["plain"] == 1.0 and sum(plain.values()) == 1.0


def test_the_ablation_table_has_a_column_per_heldout_family_named_as_the_run_scored_it(monkeypatch, tmp_path, capsys):
    import bench_ablation

    monkeypatch.setattr(_util, "RESULTS", tmp_path)
    figures = {"auroc": 0.8, "tpr10": 0.1, "fnr_flux_ratio_lt_0.1": 0.9, "auroc_flux_ratio_lt_0.1": 0.7,
               "heldout_auroc": 0.5, "heldout_galsim_auroc": 0.6, "heldout_mine_auroc": 0.55,
               "lensing_only_auroc": 0.9, "lensing_only_auroc_theta_e_ge_1.2": 0.7, "shortcut_auroc": 0.67,
               "shortcut_auroc_without_twins": 0.61}
    monkeypatch.setattr(bench_ablation, "run_lever", lambda lever, args, work: {"lever": lever, "wall_s": 60.0,
                                                                                "renderer": "torch", **figures})
    rows = bench_ablation.main(["--levers", "physical", "--work", str(tmp_path)])
    head = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| lever |"))
    assert "heldout_galsim_auroc | heldout_mine_auroc | lensing_only_auroc" in head
    assert rows[0]["heldout_mine_auroc"] == 0.55
    assert head.endswith("| wall min | renderer |")  # which code drew the training data, row by row
    # the column is read from bologna_report's metadata under this name (test_evaluation checks the report has it)
    assert bench_ablation.LO_LARGE == "lensing_only_auroc_theta_e_ge_1.2" and bench_ablation.LO_LARGE in head


def test_ablation_refuses_a_config_bound_before_any_run(tmp_path):
    import bench_ablation
    import pytest

    with pytest.raises(SystemExit, match="lens_classifier config epochs = 0"):  # the config class's ge=1
        bench_ablation.main(["--levers", "physical", "--epochs", "0", "--work", str(tmp_path)])
    assert not (tmp_path / "physical").exists()  # nothing ran
