"""Simulated cutouts written with the batched torch renderer: ``science.simulation.simulate_to_directory``'s files,
the light drawn by :func:`~lens_assets.ml.torch_render.render_systems` a chunk of objects at a time.

Each object is drawn by the same population code from its own generator (``science.simulation._member``), its
noise from that generator exactly as lenstronomy's ``render_system`` draws it, and it is written by the same
``write_cutout`` (``LABELSRC = sim:torch``); only the noiseless light comes from the torch renderer, float32 on one
thread per worker. The pixels differ from the lenstronomy-rendered file of the same object by far less than its
noise (within 1e-3 of the band's maximum in ``lens_assets_tests/ml/test_torch_simulation.py``; 2e-4 of the band's
peak seen in the noiseless light). A run is reproducible for the same ``n_cutouts`` and ``chunk``, whatever the
number of workers; an object drawn in another chunk (another run size) differs in float32 rounding only (about
2e-7 of the band's maximum: a batch pads its PSFs and canvases to its widest object). ``benchmarks/bench_simulation.py``
times both renderers on the same objects.
"""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["simulate_torch", "simulate_to_directory_torch", "torch_refusal", "CHUNK_OBJECTS", "RENDERERS"]

CHUNK_OBJECTS = 32  # objects per worker task: one rendered batch
RENDER_VERSION = "torch-1"  # in simulated_cutouts' data version with renderer torch: bump when the light changes
LABEL_SOURCE = "sim:torch"  # LABELSRC of its files: the catalog's label_source says which code drew the light
# what can draw a lenstronomy family's galaxy cutouts (simulated_cutouts' renderer)
RENDERERS = ("lenstronomy", "torch")


def torch_refusal(family) -> str | None:
    """Why the torch renderer cannot draw ``family`` (``None``: it can): it draws the galaxy cutouts of families
    rendered by lenstronomy (population physical or priors), not another code's families nor cluster fields."""
    if family.renderer != "lenstronomy":
        return f"family {family.name!r} is rendered by {family.renderer}"
    if family.population == "cluster":
        return f"family {family.name!r} draws cluster fields"
    return None


def simulate_torch(survey, family, seed: int, indices) -> list:
    """``science.simulation.simulate_one`` for each of ``indices``, the light of all of them rendered in one torch
    batch (float32): ``RenderedCutout`` objects, in order."""
    import torch

    from lens_assets.science.simulation import _member

    from .torch_render import render_systems

    drawn = [_member(survey, family, seed, i) for i in indices]
    return render_systems([d[0] for d in drawn], [d[1] for d in drawn], survey, dtype=torch.float32)


def _simulate_chunk(args) -> list[dict]:
    import torch

    from lens_assets.science.simulation import write_cutout

    survey, family, seed, indices, out_dir, labeled, role = args
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one process per core
    try:
        cutouts = simulate_torch(survey, family, seed, indices)
    finally:
        torch.set_num_threads(threads)
    return [write_cutout(c, out_dir, survey=survey, family=family, seed=seed, labeled=labeled, role=role,
                         label_source=LABEL_SOURCE) for c in cutouts]


def simulate_to_directory_torch(survey, family, *, n_cutouts: int, seed: int, out_dir: Path, workers: int = 1,
                                progress: bool = True, start_index: int = 0, labeled: bool = True,
                                role: str = "train", chunk: int = CHUNK_OBJECTS):
    """``science.simulation.simulate_to_directory`` with the light rendered by torch, ``chunk`` objects a batch:
    the same objects, files and truth table; returns ``(truth, seconds)``."""
    import pandas as pd

    from lens_assets.science.fits_contract import check_sim_role
    from lens_assets.science.parallel import parallel_map

    if n_cutouts < 1:
        raise ValueError(f"n_cutouts must be >= 1, got {n_cutouts}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    refusal = torch_refusal(family)
    if refusal:
        raise ValueError(f"the torch renderer draws the galaxy cutouts of families rendered by lenstronomy "
                         f"(population physical or priors); {refusal}")
    check_sim_role(role)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = list(range(start_index, start_index + n_cutouts))
    tasks = [(survey, family, seed, indices[j:j + chunk], str(out_dir), labeled, role)
             for j in range(0, n_cutouts, chunk)]
    t0 = time.perf_counter()
    rows = parallel_map(_simulate_chunk, tasks, workers=workers, progress=progress, chunksize=1,
                        desc=f"simulate {survey.name}/{family.name} (torch)", unit="cutout",
                        item_size=lambda task: len(task[3]))
    return pd.DataFrame([r for chunk_rows in rows for r in chunk_rows]), time.perf_counter() - t0
