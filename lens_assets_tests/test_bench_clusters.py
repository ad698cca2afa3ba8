"""bench_clusters' speed section: each fast path and the library call it replaces, on the same fields, agree."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_clusters  # noqa: E402


def test_speed_times_each_path_and_its_reference_and_they_agree():
    s = bench_clusters.speed("des", 1)
    # the closed-form convergence and lenstronomy's hessian give one Einstein radius; the renders one image
    assert s["einstein_radius_max_rel_diff"] < 1e-12 and s["render_max_rel_diff"] < 1e-12
    assert s["box_median_equal"] and s["box_px"] == 9  # 2" on DES's 0.263" pixels, made odd
    assert s["box_median_speedup"] == s["median_filter_s"] / s["box_median_s"]
    times = ("einstein_radius_s", "einstein_radius_lensmodel_s", "square_grid_kappa_s", "render_field_s",
             "render_system_s", "segments_s", "light_removal_plus_photutils_s", "box_median_s", "median_filter_s")
    assert all(s[k] > 0 for k in times)


def test_selection_einstein_times_both_ways_and_keeps_the_same_scenes():
    e = bench_clusters.selection_einstein("des", 12, rounds=2)
    assert e["same_selection"] and e["n_candidates"] == 12
    assert e["speedup"] == pytest.approx(e["whole_disc_s"] / e["within_s"], rel=1e-12) and e["within_s"] > 0
    assert 0 <= e["within_share"] <= 1 - e["subcritical_share"]
    assert e["cut_share"] > 0  # the prefix did reject candidates: the within path was taken
