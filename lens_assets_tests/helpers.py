"""Test data builders shared across test modules."""

from pathlib import Path

from lens_assets.science.families import load_family
from lens_assets.science.ingest import find_fits, ingest_files
from lens_assets.science.shards import build_shards, shard_settings
from lens_assets.science.simulation import simulate_to_directory
from lens_assets.science.surveys import get_survey


def make_sdss_shards(root: Path, *, n: int, seed: int, rows_per_shard: int = 4096):
    """Simulate ``n`` SDSS cutouts under ``root``, ingest them and write shards to ``root/shards``; the catalog."""
    survey = get_survey("sdss")
    simulate_to_directory(survey, load_family("baseline"), n_cutouts=n, seed=seed,
                          out_dir=root / f"raw/sdss/sim-{seed}", workers=1, progress=False)
    catalog = ingest_files(find_fits(root / "raw/sdss"), survey, root=root, workers=1, progress=False).catalog
    build_shards(catalog, survey, root=root, out_dir=root / "shards",
                 settings=shard_settings(survey, rows_per_shard=rows_per_shard), workers=1, progress=False)
    return catalog


def write_promotion(storage, survey: str, version: str) -> None:
    """A ``promoted/<survey>/promotion.json`` naming ``version``, as promoted_model writes it (no checkpoints:
    for tests of what reads only the version, such as the inbox sensor)."""
    import json

    path = storage.path("promoted", survey, "promotion.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"survey": survey, "version": version}))
