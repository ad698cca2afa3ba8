"""Asset group `evaluation`: the ensemble's calibrator and the Bologna report.

``score_calibrator`` scores the validation and test splits and the held-out
simulation family once with every ensemble member (``scores/<survey>/ensemble_logits.parquet``),
fuses the members' logits and fits the calibrator on the validation split.
``bologna_report`` reads those scores: nothing is scored twice.
"""

import json

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from lens_assets.assets._common import png_markdown, sha256_of_strings, survey_asset
from lens_assets.assets.catalog import catalog_paths
from lens_assets.assets.shards import dataset_splits, psf_matched_shards, shard_dir
from lens_assets.assets.training import lens_classifier, read_ensemble
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.calibration import Calibrator, fit_calibrator
from lens_assets.science.metrics import bologna_metrics, expected_calibration_error
from lens_assets.science.surveys import get_survey

EVALUATION_CODE_VERSION = "eval-2"
SCORED_SPLITS = ("val", "test", "heldout")


class CalibratorConfig(dg.Config):
    method: str = Field(default="auto", description="temperature, isotonic, or auto (lower cross-validated NLL)")
    fusion: str = Field(default="mean", description="mean (of member logits) or val_weights (logistic "
                        "regression on the validation split)")
    target_prevalence: float | None = Field(
        default=None, gt=0, lt=1, description="expected lens prevalence of the survey: shifts calibrated "
        "probabilities from the training prevalence by Bayes' rule (Saerens et al. 2002); None keeps it")
    heldout_families: list[str] = Field(default=["heldout"], description="simulation families scored for "
                                        "robustness (they are kept out of the splits)")
    batch_size: int = Field(default=256, ge=1)


def scores_path(storage: LocalStorage, survey: str):
    return storage.path("scores", survey, "ensemble_logits.parquet")


def calibrator_path(storage: LocalStorage, survey: str):
    return storage.path("calibrators", survey, "calibrator.json")


def calibrator_version(text: str) -> str:
    """sha256 prefix of ``calibrator.json``: score_calibrator's data version and the candidates' column."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_scoring(storage: LocalStorage, survey: str):
    """(ensemble manifest, Fusion, Calibrator, calibrator document) for scoring new data; the document's
    ``version`` is its :func:`calibrator_version`."""
    from lens_assets.ml.score import Fusion

    path = calibrator_path(storage, survey)
    storage.pull(*path.relative_to(storage.root_path).parts)
    if not path.exists():
        raise dg.Failure(f"{path} does not exist: materialize score_calibrator for {survey} first")
    text = path.read_text()
    doc = {**json.loads(text), "version": calibrator_version(text)}
    ensemble = read_ensemble(storage, survey)
    if [m["sha256"] for m in ensemble["members"]] != [m["sha256"] for m in doc["members"]]:
        raise dg.Failure(f"{path} was fit for other checkpoints than models/{survey}/ensemble.json lists: "
                         "re-materialize score_calibrator")
    return ensemble, Fusion.from_dict(doc["fusion"]), Calibrator.from_dict(doc["calibrator"]), doc


def _rows_to_score(storage: LocalStorage, survey: str, heldout_families) -> pd.DataFrame:
    for parts in (("splits", survey), ("catalog", survey), ("shards", survey)):
        storage.pull(*parts)
    splits = pd.read_parquet(storage.path("splits", survey, "dataset_splits.parquet"), columns=["objid", "split"])
    cat_path, _ = catalog_paths(storage, survey)
    import pyarrow.parquet as pq

    truth = [c for c in ("flux_ratio", "theta_e", "arc_snr") if c in pq.read_schema(cat_path).names]
    catalog = pd.read_parquet(cat_path, columns=["objid", "label", *truth, "sim_family", "sim_kind", "source_file",
                                                 "source_sha256"])
    in_shards = set(pd.read_parquet(shard_dir(storage, survey) / "rows.parquet", columns=["objid"])["objid"])
    held = catalog[catalog["sim_family"].isin(heldout_families) & catalog["objid"].isin(in_shards)
                   & catalog["label"].isin([0, 1])]
    rows = pd.concat([splits[splits["split"].isin(["val", "test"])],
                      pd.DataFrame({"objid": held["objid"], "split": "heldout"})], ignore_index=True)
    if rows["objid"].duplicated().any():
        raise dg.Failure(f"objects both in the splits and in a held-out family: "
                         f"{rows.loc[rows['objid'].duplicated(), 'objid'].head(5).tolist()}")
    return rows.merge(catalog, on="objid", how="left", validate="one_to_one")


@survey_asset(
    group_name="evaluation",
    kinds={"python", "scikit-learn"},
    code_version=EVALUATION_CODE_VERSION,
    deps=[lens_classifier, dataset_splits, psf_matched_shards],
)
def score_calibrator(context: dg.AssetExecutionContext, config: CalibratorConfig,
                     storage: LocalStorage) -> dg.MaterializeResult:
    """Fused ensemble logits mapped to calibrated lens probabilities, fit on the validation split.

    Temperature scaling and isotonic regression are both fit; the lower
    cross-validated NLL wins (`method=auto`). Writes `calibrators/<survey>/calibrator.json`
    (fusion weights, calibrator, member checkpoints) and the scores of the
    val/test/held-out rows that `bologna_report` evaluates.
    """
    from scipy.special import expit

    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.score import default_device, fit_fusion, load_members, member_logits
    from lens_assets.science.plots import reliability_plot

    survey = get_survey(context.partition_key)
    ensemble = read_ensemble(storage, survey.name)
    rows = _rows_to_score(storage, survey.name, config.heldout_families)
    device = default_device()
    members = load_members([m["path"] for m in ensemble["members"]], device=device)
    names = [m["name"] for m in ensemble["members"]]
    import time

    t0 = time.perf_counter()
    logits = member_logits(members, ShardDataset(shard_dir(storage, survey.name), objids=rows["objid"]),
                           batch_size=config.batch_size, device=device)
    seconds = time.perf_counter() - t0
    val = (rows["split"] == "val").to_numpy()
    y_val = rows.loc[val, "label"].to_numpy()
    fusion = fit_fusion(logits[val], y_val, method=config.fusion)
    fused = fusion(logits)
    cal = fit_calibrator(fused[val], y_val, method=config.method, target_prevalence=config.target_prevalence)
    for j, name in enumerate(names):
        rows[f"logit_{name}"] = logits[:, j]
    rows["logit"] = fused
    rows["probability"] = cal.predict(fused)
    out = storage.write_parquet(rows, "scores", survey.name, "ensemble_logits.parquet")

    before, after = expit(fused[val]), rows.loc[val, "probability"].to_numpy()
    ece_before, ece_after = expected_calibration_error(y_val, before), expected_calibration_error(y_val, after)
    doc = {"survey": survey.name, "members": ensemble["members"], "fusion": fusion.to_dict(),
           "calibrator": cal.to_dict(), "fit_on": "val", "n_val": int(val.sum()),
           "ece_val_before": ece_before, "ece_val_after": ece_after}
    for m in doc["members"]:
        m.pop("path", None)
    text = json.dumps(doc, indent=2)
    path = storage.write_text(text, "calibrators", survey.name, "calibrator.json")
    plot = reliability_plot({"sigmoid(fused logit)": (y_val, before), f"calibrated ({cal.method})": (y_val, after)},
                            storage.path("reports", survey.name, "calibration_reliability_val.png"))
    storage.push("reports", survey.name, "calibration_reliability_val.png")
    context.log.info(f"calibrator {cal.method} (fusion {fusion.method}) on {val.sum()} validation rows: "
                     f"ECE {ece_before:.4f} -> {ece_after:.4f}; scored {len(rows)} rows at "
                     f"{len(rows) / seconds:.0f}/s on {device}")
    metadata = {
        "path": dg.MetadataValue.path(str(path)),
        "scores_path": dg.MetadataValue.path(str(out)),
        "method": cal.method,
        "temperature": cal.temperature if cal.method == "temperature" else float("nan"),
        "cv_nll": dg.MetadataValue.json(cal.cv_nll or {}),
        "fusion": fusion.method,
        "fusion_weights": dg.MetadataValue.json(dict(zip(names, fusion.weights))),
        "target_prevalence": config.target_prevalence if config.target_prevalence is not None else float("nan"),
        "train_prevalence": cal.train_prevalence,
        "ece_before": ece_before,
        "ece_after": ece_after,
        "n_val": int(val.sum()),
        "n_scored": len(rows),
        "scoring_img_per_s": len(rows) / seconds if seconds > 0 else float("nan"),
        "device": device,
        "reliability": png_markdown(plot, alt="reliability diagram on the validation split"),
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(calibrator_version(text)))


class ReportConfig(dg.Config):
    min_auroc: float = Field(default=0.99, ge=0, le=1, description="gate of the auroc check")
    min_tpr10: float = Field(default=0.6, ge=0, le=1, description="gate of the tpr10 check")
    max_ece: float = Field(default=0.02, ge=0, le=1, description="gate of the ece check")


REPORT_CHECKS = [
    dg.AssetCheckSpec("auroc_at_least_gate", asset="bologna_report", description="test AUROC ≥ min_auroc"),
    dg.AssetCheckSpec("tpr10_at_least_gate", asset="bologna_report", description="test TPR10 ≥ min_tpr10"),
    dg.AssetCheckSpec("ece_at_most_gate", asset="bologna_report", description="test ECE (calibrated) ≤ max_ece"),
]
HEADLINE = ("auroc", "auprc", "tpr0", "tpr10", "tpr_at_fpr_0.1", "ece", "fnr_flux_ratio_lt_0.1")


def report_figures(scores: pd.DataFrame) -> dict:
    """Metrics of the test split (``in_distribution``) and of the held-out family (``heldout``).

    Ranking figures use the fused logit (calibration is monotone, and isotonic
    plateaus would only add ties); ECE uses the calibrated probability.
    """
    out = {}
    for name, split in (("in_distribution", "test"), ("heldout", "heldout")):
        part = scores[scores["split"] == split]
        if part.empty or part["label"].nunique() < 2:
            continue
        truth = {k: part[k].where(part[k] >= 0, np.nan).to_numpy()  # -1: not known
                 for k in ("flux_ratio", "theta_e", "arc_snr") if k in part}
        out[name] = bologna_metrics(part["label"].to_numpy(), part["logit"].to_numpy(), **truth,
                                    probs=part["probability"].to_numpy())
    return out


def report_markdown(survey: str, figures: dict, calibrator: dict) -> str:
    ind, held = figures["in_distribution"], figures.get("heldout", {})
    lines = [f"# Bologna report: {survey}", "",
             "Ranking figures on the fused ensemble logit; ECE on calibrated probabilities (15 equal-mass bins).",
             "TPR0/TPR10: fraction of lenses scored strictly above the highest / 10th-highest non-lens.", "",
             "| figure | test (in-distribution) | held-out family | gap |", "|---|---|---|---|"]
    for k in ("auroc", "auprc", "tpr0", "tpr10", "tpr_at_fpr_0.1", "tpr_at_fpr_0.001", "ece",
              "n_test_lenses", "n_test_nonlenses"):
        a, b = ind.get(k, float("nan")), held.get(k, float("nan"))
        gap = "" if k.startswith("n_") else f"{a - b:+.4f}"
        fmt = (lambda v: f"{v:.0f}") if k.startswith("n_") else (lambda v: f"{v:.4f}")
        lines.append(f"| {k} | {fmt(a)} | {fmt(b)} | {gap} |")
    nan = float("nan")
    lines += ["", "## False-negative rate by lensed-flux ratio (at the TPR10 threshold)", "",
              "The noise floor is the FNR of an observer who knew each lens's arcs exactly (matched filter, "
              "from the simulated arc S/N) at the same number of false positives: no finder can go below it.", "",
              "| flux ratio | test FNR | noise floor | test lenses | held-out FNR | noise floor | held-out lenses |",
              "|---|---|---|---|---|---|---|"]
    for b, label in (("lt_0.1", "< 0.1"), ("0.1_0.3", "0.1–0.3"), ("ge_0.3", "≥ 0.3")):
        lines.append(f"| {label} | {ind[f'fnr_flux_ratio_{b}']:.3f} | "
                     f"{ind.get(f'noise_limited_fnr_flux_ratio_{b}', nan):.3f} | "
                     f"{ind[f'n_lenses_flux_ratio_{b}']:.0f} | {held.get(f'fnr_flux_ratio_{b}', nan):.3f} | "
                     f"{held.get(f'noise_limited_fnr_flux_ratio_{b}', nan):.3f} | "
                     f"{held.get(f'n_lenses_flux_ratio_{b}', 0):.0f} |")
    for title, key, unit in (("Einstein radius", "theta_e", "θE (arcsec)"),
                             ("arc S/N (matched filter, from the simulation)", "arc_snr", "arc S/N")):
        bins = [k.removeprefix(f"recall_{key}_") for k in ind if k.startswith(f"recall_{key}_")]
        if not bins:
            continue
        lines += ["", f"## Recall by {title} (at the TPR10 threshold)", "",
                  f"| {unit} | test recall | test lenses | held-out recall | held-out lenses |",
                  "|---|---|---|---|---|"]
        for b in bins:
            lines.append(f"| {b.replace('_', '–').replace('lt–', '< ').replace('ge–', '≥ ')} | "
                         f"{ind[f'recall_{key}_{b}']:.3f} | {ind[f'n_lenses_{key}_{b}']:.0f} | "
                         f"{held.get(f'recall_{key}_{b}', nan):.3f} | {held.get(f'n_lenses_{key}_{b}', 0):.0f} |")
    lines += ["", f"Calibrator: {calibrator['calibrator']['method']} after {calibrator['fusion']['method']} fusion "
              f"of {', '.join(m['name'] for m in calibrator['members'])}; fit on {calibrator['n_val']} validation "
              "rows.", "", "![ROC](roc.png)", "", "![scores](score_histograms.png)", "",
              "![reliability](reliability.png)", ""]
    return "\n".join(lines)


@survey_asset(
    group_name="evaluation",
    kinds={"python", "markdown"},
    code_version=EVALUATION_CODE_VERSION,
    deps=[score_calibrator],
    check_specs=REPORT_CHECKS,
)
def bologna_report(context: dg.AssetExecutionContext, config: ReportConfig,
                   storage: LocalStorage) -> dg.MaterializeResult:
    """Bologna Lens Finding Challenge figures on the test split and on a held-out simulation family.

    AUROC, AUPRC, TPR0, TPR10 (with the number of non-lenses), TPR at FPR 0.1 and
    1e-3, ECE, FNR per lensed-flux-ratio bin and recall per θE bin; ROC, score
    histograms and reliability diagram. Writes `reports/<survey>/bologna/report.json` and `report.md`.
    """
    from scipy.special import expit

    from lens_assets.science.plots import reliability_plot, roc_plot, score_histograms

    survey = get_survey(context.partition_key)
    path = scores_path(storage, survey.name)
    storage.pull("scores", survey.name)
    storage.pull("calibrators", survey.name)
    if not path.exists():
        raise dg.Failure(f"{path} does not exist: materialize score_calibrator for {survey.name} first")
    scores = pd.read_parquet(path)
    calibrator = json.loads(calibrator_path(storage, survey.name).read_text())
    figures = report_figures(scores)
    if "in_distribution" not in figures:
        raise dg.Failure(f"{path}: the test split needs lenses and non-lenses to be evaluated")
    ind, held = figures["in_distribution"], figures.get("heldout", {})
    out_dir = storage.path("reports", survey.name, "bologna")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {"test": scores[scores["split"] == "test"], "held-out family": scores[scores["split"] == "heldout"]}
    parts = {k: (v["label"].to_numpy(), v) for k, v in parts.items() if v["label"].nunique() == 2}
    roc = roc_plot({k: (y, v["logit"].to_numpy()) for k, (y, v) in parts.items()}, out_dir / "roc.png")
    hist = score_histograms({k: (y, v["logit"].to_numpy()) for k, (y, v) in parts.items()},
                            out_dir / "score_histograms.png")
    y, t = parts["test"]
    rel = reliability_plot({"test, sigmoid(fused logit)": (y, expit(t["logit"].to_numpy())),
                            "test, calibrated": (y, t["probability"].to_numpy())}, out_dir / "reliability.png")
    report = {"survey": survey.name, "in_distribution": ind, "heldout": held,
              "gap": {k: ind[k] - held[k] for k in ("auroc", "tpr0", "tpr10") if k in held},
              "calibrator": calibrator, "scores_path": str(path),
              "gates": {"min_auroc": config.min_auroc, "min_tpr10": config.min_tpr10, "max_ece": config.max_ece}}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    md = out_dir / "report.md"
    md.write_text(report_markdown(survey.name, figures, calibrator))
    storage.push("reports", survey.name, "bologna")
    context.log.info(f"{survey.name}: AUROC {ind['auroc']:.4f}, TPR0 {ind['tpr0']:.3f}, TPR10 {ind['tpr10']:.3f} "
                     f"({ind['n_test_nonlenses']:.0f} non-lenses), ECE {ind['ece']:.4f}; held-out AUROC "
                     f"{held.get('auroc', float('nan')):.4f}; report {md}")
    metadata = {k: float(ind[k]) for k in (*HEADLINE, "tpr_at_fpr_0.001", "n_test_lenses", "n_test_nonlenses")}
    for k in ("auroc", "tpr0", "tpr10"):
        metadata[f"heldout_{k}"] = float(held.get(k, float("nan")))
    metadata["heldout_auroc_gap"] = float(ind["auroc"] - held.get("auroc", float("nan")))
    metadata["n_heldout_nonlenses"] = float(held.get("n_test_nonlenses", 0.0))
    for k, v in ind.items():
        if k.startswith(("fnr_flux_ratio_", "noise_limited_fnr_flux_ratio_", "recall_theta_e_", "recall_arc_snr_")):
            metadata[k] = float(v)
    metadata.update({
        "report_path": dg.MetadataValue.path(str(md)),
        "report_json": dg.MetadataValue.path(str(out_dir / "report.json")),
        "roc": png_markdown(roc, alt="ROC"),
        "score_histograms": png_markdown(hist, alt="score histograms"),
        "reliability": png_markdown(rel, alt="reliability diagram"),
    })
    checks = [
        dg.AssetCheckResult(check_name="auroc_at_least_gate", passed=bool(ind["auroc"] >= config.min_auroc),
                            metadata={"auroc": ind["auroc"], "gate": config.min_auroc}),
        dg.AssetCheckResult(check_name="tpr10_at_least_gate", passed=bool(ind["tpr10"] >= config.min_tpr10),
                            metadata={"tpr10": ind["tpr10"], "gate": config.min_tpr10,
                                      "n_test_nonlenses": ind["n_test_nonlenses"]}),
        dg.AssetCheckResult(check_name="ece_at_most_gate", passed=bool(ind["ece"] <= config.max_ece),
                            metadata={"ece": ind["ece"], "gate": config.max_ece}),
    ]
    version = sha256_of_strings([json.dumps(report["in_distribution"], default=float), calibrator_path(
        storage, survey.name).read_text()])
    return dg.MaterializeResult(metadata=metadata, check_results=checks, data_version=dg.DataVersion(version[:16]))
