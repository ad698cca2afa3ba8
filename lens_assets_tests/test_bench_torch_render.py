"""bench_torch_render times both renderers on the same objects and checks they agree."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_torch_render  # noqa: E402


@pytest.mark.slow  # it compiles the kernels (10-40 s from a cold inductor cache)
def test_the_benchmark_renders_the_same_objects_both_ways(monkeypatch):
    import torch

    monkeypatch.setattr(bench_torch_render, "report", lambda *a, **k: None)  # no results file from a test
    threads = torch.get_num_threads()
    rec = bench_torch_render.main(["--batch", "6", "--n-lenstronomy", "3", "--rounds", "1", "--device", "cpu"])
    assert rec["max_abs_diff_over_peak"] < 1e-2  # the renderers agree on the objects both drew
    assert rec["lenstronomy_per_s"] > 0 and rec["torch32_truth_over_lenstronomy"] > 0
    assert rec["gpu_per_s"] is None and torch.get_num_threads() == threads  # the caller's threads are restored


def test_the_benchmark_keeps_its_eager_rows_where_nothing_compiles(monkeypatch):
    import lens_assets.ml.torch_render as tr

    eager = tr.render

    def render(*args, compiled=False, **kwargs):
        if compiled:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return eager(*args, **kwargs)

    monkeypatch.setattr(bench_torch_render, "report", lambda *a, **k: None)
    monkeypatch.setattr(tr, "render", render)
    rec = bench_torch_render.main(["--batch", "4", "--n-lenstronomy", "2", "--rounds", "1", "--device", "cpu"])
    assert rec["compile_error"] == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    assert rec["compile_s"] is None and "compiled_truth_per_s" not in rec and rec["torch32_truth_per_s"] > 0


def test_bench_fresh_times_both_renderers_and_the_fixed_read(monkeypatch):
    import bench_fresh

    monkeypatch.setattr(bench_fresh, "report", lambda *a, **k: None)
    rec = bench_fresh.main(["--n", "3", "--rounds", "1", "--survey", "sdss", "--family", "baseline"])
    assert all(rec[f"{k}_per_s"] > 0 for k in ("fixed_read", "fresh_torch", "fresh_lenstronomy", "draw_only"))
    assert rec["torch_over_lenstronomy"] == rec["fresh_torch_per_s"] / rec["fresh_lenstronomy_per_s"]
