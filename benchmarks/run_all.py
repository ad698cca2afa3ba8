"""`make bench`: every benchmark, one after the other, with the default sizes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_calibration  # noqa: E402
import bench_clusters  # noqa: E402
import bench_fresh  # noqa: E402
import bench_galaxy_colour  # noqa: E402
import bench_ingest  # noqa: E402
import bench_population  # noqa: E402
import bench_shards  # noqa: E402
import bench_simulation  # noqa: E402
import bench_scoring  # noqa: E402
import bench_torch_render  # noqa: E402
import bench_training  # noqa: E402
import noise_floor  # noqa: E402

if __name__ == "__main__":
    bench_simulation.main([])
    bench_population.main([])
    bench_ingest.main([])
    bench_shards.main([])
    bench_training.main([])
    bench_scoring.main([])
    bench_calibration.main([])
    noise_floor.main([])
    bench_torch_render.main([])
    bench_fresh.main([])
    bench_clusters.main([])
    bench_galaxy_colour.main([])
