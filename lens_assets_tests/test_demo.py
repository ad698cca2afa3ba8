"""What `make demo` prints about the report's uncertainty, read from report.json."""

import json

from lens_assets.demo import _uncertainty_of_report, member_line, precision_note


def test_the_demo_reads_the_uncertainty_deciles_from_the_storage_or_nothing(tmp_path):
    from lens_assets import layout
    from lens_assets.resources.storage import LocalStorage

    storage = LocalStorage(root=str(tmp_path))
    assert _uncertainty_of_report(storage, "des") == {}  # no report yet
    path = storage.path(*layout.report_json("des"))
    path.parent.mkdir(parents=True)
    bins = [{"bin": 1, "error_rate": 0.1}, {"bin": 2, "error_rate": 0.4}]
    path.write_text(json.dumps({"uncertainty": {"bins": bins, "error_auroc": 0.7}}))
    assert _uncertainty_of_report(storage, "des")["bins"] == bins
    path.write_text(json.dumps({"uncertainty": {"bins": [], "n_unmeasured": 5}}))  # one member, no dropout
    assert _uncertainty_of_report(storage, "des") == {}


def test_the_demo_passes_its_simulation_overrides_to_the_job(monkeypatch):
    import argparse

    import lens_assets.demo as demo

    seen = {}

    def run_job(name, instance, *, survey, ops, tolerate):
        seen.update(name=name, survey=survey, sim=ops["simulated_cutouts"]["config"])
        return None  # as a run that did not finish: the demo stops there

    monkeypatch.setattr(demo, "run_job", run_job)
    args = argparse.Namespace(survey="des", profile="demo", seed=0, n_cutouts=50, epochs=None, renderer="torch")
    assert demo.run_galaxy(None, args) == 1
    assert seen["name"] == "survey_pipeline" and seen["sim"]["renderer"] == "torch" and seen["sim"]["n_cutouts"] == 50
    args.renderer, args.n_cutouts = None, None
    demo.run_galaxy(None, args)
    assert seen["sim"]["renderer"] == "torch" and seen["sim"]["n_cutouts"] == 4000  # the profile's own
    args.renderer = "lenstronomy"
    demo.run_galaxy(None, args)
    assert seen["sim"]["renderer"] == "lenstronomy"  # the reference, when asked for


def test_the_demo_prints_each_check_as_a_gate_a_target_or_not_gated():
    import dagster as dg

    from lens_assets.demo import check_verdict

    def evaluation(passed, severity, blocking, **meta):
        return dg.AssetCheckEvaluation(asset_key=dg.AssetKey("bologna_report"), check_name="auroc_at_least_gate",
                                       passed=passed, metadata=meta, severity=severity, blocking=blocking)

    error, warn = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN
    assert check_verdict(evaluation(True, error, True, gate=0.75, target=0.9, gate_met=True, target_met=True)) == (
        "passed")
    assert check_verdict(evaluation(False, error, True, gate=0.75, target=0.9, gate_met=False,
                                    target_met=False)) == "FAILED"
    assert check_verdict(evaluation(False, warn, True, gate=0.75, target=0.9, gate_met=True, target_met=False)) == (
        "target 0.9 not met (WARN, not blocking)")
    assert check_verdict(evaluation(True, warn, True, gate="not gated", target="none", gate_met=True,
                                    target_met=True)) == "not gated"
    # checks of other assets: the shortcut audit's (not blocking) and a WARN of a blocking check
    assert check_verdict(evaluation(False, error, False, shortcut_auroc=0.7, gate=0.65)) == "FAILED (not blocking)"
    assert check_verdict(evaluation(False, warn, True, n=3)) == "FAILED (not blocking)"


def test_the_demo_refuses_a_config_its_assets_refuse_before_any_run(monkeypatch, capsys):
    import lens_assets.demo as demo

    def resolve_job_def(name):
        raise AssertionError(f"{name} was started with a config its assets refuse")

    monkeypatch.setattr(demo.defs, "resolve_job_def", resolve_job_def)
    ops = {"lens_classifier": {"config": {"epochs": 0}}, "simulated_cutouts": {"config": {"n_cutouts": -5}}}
    assert demo.run_job("survey_pipeline", None, survey="des", ops=ops) is None
    err = capsys.readouterr().err
    assert "survey_pipeline not started" in err
    assert "lens_classifier config epochs = 0" in err and "simulated_cutouts config n_cutouts = -5" in err
    clusters = {"cluster_fields": {"config": {"n_fields": 0}}}  # the cluster track's assets are checked too
    assert demo.run_job("cluster_pipeline", None, survey="des", ops=clusters) is None
    assert "cluster_pipeline not started" in capsys.readouterr().err


def test_the_demo_says_when_a_member_was_trained_by_an_earlier_run():
    meta = {"m/best_val_auroc": 0.83801, "m/epochs_run": 8, "m/epochs_fitted": 8, "m/train_img_per_s": 366.4,
            "m/device": "cpu", "m/precision": "bf16-mixed", "m/checkpoint": "/d/best.ckpt"}
    assert member_line("m", meta) == ("  model m           : best val AUROC 0.8380 after 8 epochs at 366 img/s on cpu "
                                      "(bf16-mixed) -> /d/best.ckpt")
    resumed = {**meta, "m/epochs_fitted": 2, "m/train_img_per_s": 120.0}  # 2 of the 8 epochs fitted now
    assert "after 8 epochs at 120 img/s on cpu" in member_line("m", resumed)
    again = {**meta, "m/epochs_fitted": 0, "m/train_img_per_s": 0.0}  # a second make demo: nothing to fit
    assert member_line("m", again) == ("  model m           : best val AUROC 0.8380 after 8 epochs (no epoch fitted in "
                                       "this run) on cpu (bf16-mixed) -> /d/best.ckpt")


def test_the_demo_warns_before_it_trains_in_float32(monkeypatch):
    from lens_assets.ml import precision

    assert precision_note("bf16-mixed") is None
    note = precision_note("32-true")
    assert note.startswith("note: this CPU has no native bf16") and "float32" in note
    # what "auto" resolves to decides it: a GPU or a bf16 CPU trains in bf16, a CPU without bf16 in float32
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    assert precision_note(precision.resolve_precision("auto", gpu=True)) is None
    assert precision_note(precision.resolve_precision("auto", gpu=False)) == note
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    assert precision_note(precision.resolve_precision("auto", gpu=False)) is None
