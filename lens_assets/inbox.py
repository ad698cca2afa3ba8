"""The inbox contract for producers and consumers: ``inbox/<survey>/<drop>/`` with ``_COMPLETE`` written last,
and the ranked candidates that come back in ``candidates/<survey>/<drop>/``.

    from lens_assets.inbox import candidate_table, simulate_drop
    simulate_drop(storage, "des", "2026-11-21-demo", n=200, seed=7)   # an unlabeled simulated drop
    candidate_table(storage, "des", "2026-11-21-demo")               # once candidate_scores has run

A real producer copies its ``<objid>.fits`` files into the drop folder and then
creates the empty ``_COMPLETE`` file; until then ``survey_inbox_sensor`` waits.

A drop of cluster fields (FITS with ``OBJTYPE = 'cluster_field'``) is marked by an
empty ``_CLUSTER_FIELDS`` file written before ``_COMPLETE`` (``publish_drop(...,
cluster=True)``); it is scored by ``cluster_candidates`` into
``candidates/<survey>/<drop>/cluster_candidates.parquet``::

    simulate_cluster_drop(storage, "des", "2026-11-21-clusters", n=20, seed=7)
    cluster_candidate_table(storage, "des", "2026-11-21-clusters")
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from lens_assets import layout
from lens_assets.layout import CLUSTER_MARKER, COMPLETE_MARKER
from lens_assets.partitions import drop_name_problem
from lens_assets.resources.storage import LocalStorage

__all__ = ["publish_drop", "simulate_drop", "candidate_table", "simulate_cluster_drop", "cluster_candidate_table",
           "COMPLETE_MARKER", "CLUSTER_MARKER"]


def publish_drop(storage: LocalStorage, survey: str, drop: str, files: list[Path], *, cluster: bool = False) -> Path:
    """Copy ``files`` into ``inbox/<survey>/<drop>/`` and write ``_COMPLETE`` after the last one; ``cluster``: the
    files are cluster fields, marked by ``_CLUSTER_FIELDS`` (written before ``_COMPLETE``)."""
    problem = drop_name_problem(drop)
    if problem:
        raise ValueError(f"{storage.url(*layout.inbox_survey(survey))}: {problem}")
    names: dict[str, Path] = {}
    for f in files:  # the drop is flat: two files of one name would leave one of them
        first = names.setdefault(Path(f).name, Path(f))
        if first != Path(f):
            raise ValueError(f"publish_drop: {first} and {f} share the name {Path(f).name!r} in "
                             f"{storage.url(*layout.inbox_drop(survey, drop))}; rename one")
    dest = storage.path(*layout.inbox_drop(survey, drop))
    marker = layout.complete_marker(survey, drop)
    if storage.exists(*marker):
        raise FileExistsError(f"{storage.url(*layout.inbox_drop(survey, drop))} is already complete; a drop is "
                              "written once")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / Path(f).name)
    storage.push(*layout.inbox_drop(survey, drop))
    if cluster:
        storage.path(*layout.cluster_marker(survey, drop)).touch()
        storage.push(*layout.cluster_marker(survey, drop))
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


def simulate_cluster_drop(storage: LocalStorage, survey: str, drop: str, *, n: int, seed: int,
                          family: str = "cluster", workers: int = 0, progress: bool = False) -> pd.DataFrame:
    """Publish ``n`` simulated cluster fields without their truth as a drop of cluster fields (``_CLUSTER_FIELDS``);
    returns the truth (for checking). ``family``: a cluster family's name or TOML path."""
    import tempfile

    from lens_assets.science.clusters.fields import simulate_cluster_fields
    from lens_assets.science.families import load_family
    from lens_assets.science.surveys import get_survey

    fam = load_family(family)
    if fam.population != "cluster":
        raise ValueError(f"family {fam.name!r} has population {fam.population!r}; a drop of cluster fields needs "
                         "population = 'cluster' (e.g. 'cluster', 'cluster_heldout')")
    with tempfile.TemporaryDirectory(dir=storage.root_path if storage.root_path.exists() else None) as tmp:
        truth = simulate_cluster_fields(get_survey(survey), fam, n_fields=n, seed=seed, out_dir=Path(tmp),
                                        workers=workers, labeled=False, progress=progress)
        publish_drop(storage, survey, drop, sorted(Path(tmp).glob("*.fits")), cluster=True)
    return truth


def cluster_candidate_table(storage: LocalStorage, survey: str, drop: str) -> pd.DataFrame:
    """The ranked cluster-lens candidates of a drop of cluster fields (pulled from the store when it is remote)."""
    return pd.read_parquet(storage.pull(*layout.cluster_candidate_table(survey, drop)))
