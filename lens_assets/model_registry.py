"""Which ensemble and calibrator score a survey's data: the trained, the calibrated and the promoted one.

``lens_classifier`` writes ``models/<survey>/ensemble.json`` (members and their
checkpoints), ``score_calibrator`` writes ``calibrators/<survey>/calibrator.json``
(fit for those checkpoints), ``bologna_report`` evaluates the pair against its
gates, and ``promoted_model`` copies a pair whose report passed every gate to
``promoted/<survey>/``. Scoring new data (``candidate_scores``) reads only the
promoted copy, so retraining or recalibrating never changes what scores a drop
until the new pair has been vetted: a model that fails a gate is never used.

``promoted/<survey>/`` holds ``ensemble.json`` (checkpoint paths pointing at the
copies beside it), ``calibrator.json`` (byte for byte, so its version is the one
the report evaluated), ``<member>.ckpt`` and ``promotion.json`` (versions, the
gates with their figures, the report run). It is replaced as one folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import dagster as dg

from lens_assets import layout
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.fileio import sha256_file


def no_retry(message: str) -> dg.Failure:
    """A failure that running the step again cannot mend (missing or mismatched inputs): retry policies skip it."""
    return dg.Failure(message, allow_retries=False)


def calibrator_version(text: str) -> str:
    """sha256 prefix of ``calibrator.json``: score_calibrator's data version and the candidates' column."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _checked_members(storage: LocalStorage, ensemble: dict, source: Path) -> dict:
    """``ensemble`` with each member's local checkpoint ``path``, after checking it against its sha256."""
    for m in ensemble["members"]:
        ckpt = storage.path(m["checkpoint"])
        sha = sha256_file(ckpt) if ckpt.exists() else "missing"
        if sha != m["sha256"]:
            raise no_retry(f"{ckpt}: sha256 {sha[:16]} differs from {m['sha256'][:16]} in {source}; "
                           "re-materialize lens_classifier")
        m["path"] = str(ckpt)
    return ensemble


def read_ensemble(storage: LocalStorage, survey: str) -> dict:
    """The trained ensemble manifest; each member's checkpoint is checked against its recorded sha256."""
    storage.pull(*layout.models_dir(survey))
    path = storage.path(*layout.ensemble_manifest(survey))
    if not path.exists():
        raise no_retry(f"{path} does not exist: materialize lens_classifier for {survey} first")
    return _checked_members(storage, json.loads(path.read_text()), path)


def _calibrator_doc(path: Path) -> dict:
    """A ``calibrator.json`` with its :func:`calibrator_version` as ``version``."""
    text = path.read_text()
    return {**json.loads(text), "version": calibrator_version(text)}


def _matched(ensemble: dict, doc: dict, ensemble_file: Path, calibrator_file: Path) -> None:
    if [m["sha256"] for m in ensemble["members"]] != [m["sha256"] for m in doc["members"]]:
        raise no_retry(f"{calibrator_file} was fit for other checkpoints than {ensemble_file} lists: "
                       "re-materialize score_calibrator")


def _scoring_objects(ensemble: dict, doc: dict):
    from lens_assets.ml.score import Fusion
    from lens_assets.science.calibration import Calibrator

    return ensemble, Fusion.from_dict(doc["fusion"]), Calibrator.from_dict(doc["calibrator"]), doc


def load_scoring(storage: LocalStorage, survey: str):
    """(ensemble manifest, Fusion, Calibrator, calibrator document) of the latest trained and calibrated pair,
    vetted or not, after checking the calibrator was fit for these checkpoints (what :func:`promote` judges; new
    data uses :func:`load_promoted`)."""
    path = storage.pull(*layout.calibrator_doc(survey))
    if not path.exists():
        raise no_retry(f"{path} does not exist: materialize score_calibrator for {survey} first")
    doc = _calibrator_doc(path)
    ensemble = read_ensemble(storage, survey)
    _matched(ensemble, doc, storage.path(*layout.ensemble_manifest(survey)), path)
    return _scoring_objects(ensemble, doc)


def read_promotion(storage: LocalStorage, survey: str) -> dict | None:
    """``promoted/<survey>/promotion.json``, or None when no model of the survey has been promoted."""
    path = storage.pull(*layout.promotion_doc(survey))
    return json.loads(path.read_text()) if path.exists() else None


def promoted_version(storage: LocalStorage, survey: str) -> str | None:
    """``<model_version>-<calibrator_version>`` of the promoted pair, or None."""
    doc = read_promotion(storage, survey)
    return doc["version"] if doc else None


def load_promoted(storage: LocalStorage, survey: str):
    """(ensemble manifest, Fusion, Calibrator, calibrator document) of the survey's promoted pair: the only one
    new data is scored with. A clear failure when nothing has been promoted."""
    folder = storage.pull(*layout.promoted_dir(survey))
    ens_file = storage.path(*layout.promoted_ensemble(survey))
    cal_file = storage.path(*layout.promoted_calibrator(survey))
    if not storage.path(*layout.promotion_doc(survey)).exists():
        raise no_retry(f"{folder} holds no promoted model: no ensemble of {survey} has passed bologna_report's "
                       "gates yet (materialize bologna_report, then promoted_model)")
    missing = [f.name for f in (ens_file, cal_file) if not f.exists()]
    if missing:
        raise no_retry(f"{folder} lacks {', '.join(missing)}: materialize promoted_model for {survey} again")
    doc = _calibrator_doc(cal_file)
    ensemble = _checked_members(storage, json.loads(ens_file.read_text()), ens_file)
    _matched(ensemble, doc, ens_file, cal_file)
    return _scoring_objects(ensemble, doc)


def promote(storage: LocalStorage, survey: str, *, report: dict, run_id: str) -> dict:
    """Copy the survey's current ensemble and calibrator to ``promoted/<survey>/`` after checking that ``report``
    (``bologna_report``'s report.json) evaluated exactly this pair and passed every gate (a missed target is
    recorded, not refused); returns the promotion
    document. The previous promotion stays in place when anything is refused."""
    ensemble, _, _, doc = load_scoring(storage, survey)
    evaluated = report.get("calibrator_version")
    if evaluated != doc["version"]:
        raise no_retry(f"{layout.relative(layout.report_json(survey))} evaluated calibrator {evaluated}, but the "
                       f"current {layout.relative(layout.calibrator_doc(survey))} is {doc['version']}: re-materialize "
                       "bologna_report")
    checks = report.get("checks") or {}
    if not checks:
        raise no_retry(f"{layout.relative(layout.report_json(survey))} records no gate results: re-materialize "
                       "bologna_report")
    # a check that failed blocks unless the report marked it not blocking (a missed target: ``blocking`` false);
    # reports written before ``blocking`` was recorded gated every check
    failed = {k: v for k, v in checks.items() if not v["passed"] and v.get("blocking", True)}
    if failed:
        raise no_retry(f"ensemble {ensemble['version']} with calibrator {doc['version']} is not promoted: "
                       + "; ".join(f"{k} failed ({v['value']} against gate {v['gate']})" for k, v in failed.items()))
    previous = read_promotion(storage, survey)
    members = []
    calibrator_file = storage.path(*layout.calibrator_doc(survey))
    with storage.staged_dir(f"promoted-{survey}") as staged:
        def staged_path(parts):  # where a file of promoted/<survey>/ is in the folder that replaces it
            return staged.joinpath(*parts[len(layout.promoted_dir(survey)):])

        for m in ensemble["members"]:
            ckpt = layout.promoted_checkpoint(survey, m["name"])
            shutil.copyfile(m["path"], staged_path(ckpt))
            members.append({**{k: v for k, v in m.items() if k != "path"}, "trained_checkpoint": m["checkpoint"],
                            "checkpoint": layout.relative(ckpt)})
        promoted = {**{k: v for k, v in ensemble.items() if k != "members"}, "members": members}
        staged_path(layout.promoted_ensemble(survey)).write_text(json.dumps(promoted, indent=2))
        copied = staged_path(layout.promoted_calibrator(survey))
        shutil.copyfile(calibrator_file, copied)
        if _calibrator_doc(copied)["version"] != doc["version"]:
            raise no_retry(f"{calibrator_file} changed while it was being promoted: materialize promoted_model again")
        promotion = {"survey": survey, "version": f"{ensemble['version']}-{doc['version']}",
                     "model_version": ensemble["version"], "calibrator_version": doc["version"],
                     "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run_id": run_id,
                     "report_version": report.get("version", ""), "checks": checks,
                     "previous_version": previous["version"] if previous else None}
        staged_path(layout.promotion_doc(survey)).write_text(json.dumps(promotion, indent=2, default=float))
    storage.publish_dir(staged, *layout.promoted_dir(survey))
    return promotion
