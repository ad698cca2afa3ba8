"""What `make demo` prints about the report's uncertainty, read from report.json."""

import json

from lens_assets.demo import _uncertainty_of_report


def test_the_demo_reads_the_uncertainty_deciles_or_nothing(tmp_path):
    path = tmp_path / "report.json"
    bins = [{"bin": 1, "error_rate": 0.1}, {"bin": 2, "error_rate": 0.4}]
    path.write_text(json.dumps({"uncertainty": {"bins": bins, "error_auroc": 0.7}}))
    assert _uncertainty_of_report({"report_json": str(path)})["bins"] == bins
    path.write_text(json.dumps({"uncertainty": {"bins": [], "n_unmeasured": 5}}))  # one member, no dropout
    assert _uncertainty_of_report({"report_json": str(path)}) == {}
    assert _uncertainty_of_report({"report_json": str(tmp_path / "missing.json")}) == {}
    assert _uncertainty_of_report({}) == {}
