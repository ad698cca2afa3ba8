"""bench_clusters' speed section: each fast path and the library call it replaces, on the same fields, agree."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_clusters  # noqa: E402


def test_speed_times_each_path_and_its_reference_and_they_agree():
    s = bench_clusters.speed("des", 1)
    # the closed-form convergence and lenstronomy's hessian give one Einstein radius; the renders one image
    assert s["einstein_radius_max_rel_diff"] < 1e-12 and s["render_max_rel_diff"] < 1e-12
    times = ("einstein_radius_s", "einstein_radius_lensmodel_s", "square_grid_kappa_s", "render_field_s",
             "render_system_s", "segments_s", "light_removal_plus_photutils_s")
    assert all(s[k] > 0 for k in times)
