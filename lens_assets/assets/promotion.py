"""Asset group `release`: the vetted ensemble and calibrator of each survey, the only pair that scores new data."""

import dagster as dg

from lens_assets import layout
from lens_assets.assets._common import survey_asset
from lens_assets.assets.evaluation import gate_verdict
from lens_assets.model_registry import no_retry, promote
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.surveys import get_survey

PROMOTION_CODE_VERSION = "promote-1"


@survey_asset(
    group_name="release",
    kinds={"python", "pytorch"},
    code_version=PROMOTION_CODE_VERSION,
    deps=[dg.AssetKey("bologna_report")],  # by key: release needs the report's records, not its code
)
def promoted_model(context: dg.AssetExecutionContext, storage: LocalStorage) -> dg.MaterializeResult:
    """The survey's promoted ensemble and calibrator (promoted/<survey>/): checkpoints, calibrator.json and the
    gate results that let them through.

    In a run with bologna_report, its blocking gate checks stop this step when
    one fails; run on its own, it reads the gate results the report recorded.
    Materializes only when bologna_report evaluated exactly the current
    ensemble and calibrator and every one of its gates passed (a missed target
    is shown, not enforced); otherwise it
    fails naming the failed gates and the previously promoted pair stays in
    use. candidate_scores scores with this pair only, and re-scores the drops
    when a new pair is promoted.
    """
    import json

    survey = get_survey(context.partition_key)
    path = storage.pull(*layout.report_json(survey.name))
    if not path.exists():
        raise no_retry(f"{path} does not exist: materialize bologna_report for {survey.name} first")
    report = json.loads(path.read_text())
    promotion = promote(storage, survey.name, report=report, run_id=context.run.run_id)
    context.log.info(f"{survey.name}: promoted ensemble {promotion['model_version']} with calibrator "
                     f"{promotion['calibrator_version']} (replacing {promotion['previous_version'] or 'nothing'})")
    rows = ["| check | figure | gate | target | passed |", "|---|---|---|---|---|"]
    for name, c in promotion["checks"].items():
        value = c["value"]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.3f}"
        target = "none" if c.get("target") is None else c["target"]
        rows.append(f"| {name} | {shown} | {c['gate']} | {target} | {gate_verdict(c)} |")
    metadata = {
        "why": dg.MetadataValue.md(f"Promoted because every gate of bologna_report (version "
                                   f"{promotion['report_version']}) passed:\n\n" + "\n".join(rows)),
        "model_version": promotion["model_version"],
        "calibrator_version": promotion["calibrator_version"],
        "promoted_version": promotion["version"],
        "previous_version": promotion["previous_version"] or "",
        "promoted_at": promotion["promoted_at"],
        "path": dg.MetadataValue.path(storage.url(*layout.promoted_dir(survey.name))),
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(promotion["version"]))
