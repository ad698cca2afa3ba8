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
