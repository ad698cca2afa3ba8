"""The inbox contract for producers and consumers: ``inbox/<survey>/<drop>/`` with ``_COMPLETE`` written last,
and the ranked candidates that come back in ``candidates/<survey>/<drop>/``.

    from lens_assets.inbox import candidate_table, simulate_drop
    simulate_drop(storage, "des", "2026-11-21-demo", n=200, seed=7)   # an unlabeled simulated drop
    candidate_table(storage, "des", "2026-11-21-demo")               # once candidate_scores has run

A real producer copies its ``<objid>.fits`` files into the drop folder and then
creates the empty ``_COMPLETE`` file; until then ``survey_inbox_sensor`` waits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from lens_assets import layout
from lens_assets.layout import COMPLETE_MARKER
from lens_assets.partitions import drop_name_problem
from lens_assets.resources.storage import LocalStorage

__all__ = ["publish_drop", "simulate_drop", "candidate_table", "COMPLETE_MARKER"]


def publish_drop(storage: LocalStorage, survey: str, drop: str, files: list[Path]) -> Path:
    """Copy ``files`` into ``inbox/<survey>/<drop>/`` and write ``_COMPLETE`` after the last one."""
    problem = drop_name_problem(drop)
    if problem:
        raise ValueError(f"{storage.url(*layout.inbox_survey(survey))}: {problem}")
    dest = storage.path(*layout.inbox_drop(survey, drop))
    marker = layout.complete_marker(survey, drop)
    if storage.exists(*marker):
        raise FileExistsError(f"{storage.url(*layout.inbox_drop(survey, drop))} is already complete; a drop is "
                              "written once")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / Path(f).name)
    storage.push(*layout.inbox_drop(survey, drop))
    storage.path(*marker).touch()
    storage.push(*marker)
    return dest


def simulate_drop(storage: LocalStorage, survey: str, drop: str, *, n: int, seed: int, family: str = "physical",
                  workers: int = 0, progress: bool = False) -> pd.DataFrame:
    """Publish ``n`` simulated cutouts without their truth as an inbox drop; returns the truth (for checking)."""
    import tempfile

    from lens_assets.science.families import load_family
    from lens_assets.science.simulation import simulate_to_directory
    from lens_assets.science.surveys import get_survey

    with tempfile.TemporaryDirectory(dir=storage.root_path if storage.root_path.exists() else None) as tmp:
        truth, _ = simulate_to_directory(get_survey(survey), load_family(family), n_cutouts=n, seed=seed,
                                         out_dir=Path(tmp), workers=workers, progress=progress, labeled=False)
        publish_drop(storage, survey, drop, sorted(Path(tmp).glob("*.fits")))
    return truth


def candidate_table(storage: LocalStorage, survey: str, drop: str) -> pd.DataFrame:
    """The ranked candidates of a drop (pulled from the store when it is remote)."""
    return pd.read_parquet(storage.pull(*layout.candidate_table(survey, drop)))
