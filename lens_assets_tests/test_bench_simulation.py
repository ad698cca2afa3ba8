"""bench_simulation times every path it names on the same objects, lenstronomy's and the torch renderer's."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_simulation  # noqa: E402


def test_every_row_is_timed(monkeypatch):
    monkeypatch.setattr(bench_simulation, "report", lambda *a, **k: None)  # no results file from a test
    rec = bench_simulation.main(["--family", "physical", "--n", "2", "--n-parallel", "4"])
    rates = [k for k in rec if k.endswith("_per_s")]
    assert len(rates) == 8 and all(rec[k] > 0 for k in rates)
    assert rec["torch_over_lenstronomy_one_core"] == pytest.approx(
        rec["torch_one_core_cutouts_per_s"] / rec["one_core_cutouts_per_s"], rel=1e-12)
