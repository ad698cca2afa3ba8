"""Fresh simulated cutouts in every training batch, mixed with the fixed shards at a chosen share.

``FreshMix`` wraps the train split's :class:`~lens_assets.ml.data.ShardDataset`: in each batch it reads the fixed
rows and replaces a ``fraction`` of them with objects simulated on the fly from a family. A fresh object goes the
whole way a fixed one went — drawn by the same population code, priors and selection, rendered by the batched torch
renderer (``renderer="torch"``, the default; within 5e-4 of lenstronomy's pixels, the same noise draws) or by
lenstronomy (``simulate_one``), written as inbox-contract FITS bytes in memory (zero-point error, withheld variance
maps and crops included), read and validated (``read_cutout``) and PSF-matched and normalized with the shards' own
settings (``match_batch``) — so the network cannot tell fresh rows from fixed ones by how they were processed, only
by being new.

Deterministic from the seed: which rows of a batch are replaced depends on (seed, epoch, row), and the
object that replaces a row is object ``epoch * n_rows + row`` of the family under the seed
``FRESH_SEED_OFFSET + seed`` (never an object of the fixed set, whose seeds are small), so a run and its
resumption draw the same objects. The epoch comes from :class:`FreshEpoch`, a Lightning callback.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["FreshMix", "FreshEpoch", "FRESH_SEED_OFFSET"]

FRESH_SEED_OFFSET = 1_000_003  # fresh objects' simulation seed = this + the training seed
RENDERERS = ("torch", "lenstronomy")  # torch: ml/torch_render, a batch at a time; lenstronomy: simulate_one
HELDOUT_FAMILIES = ("heldout", "galsim")  # kept out of training: the report's figures off the simulator


class FreshMix:
    """The rows of ``base`` with a share ``fraction`` replaced by fresh objects of ``family`` (map-style, with
    ``__getitems__`` like ``ShardDataset``, so the DataLoader's shuffling and batching are unchanged)."""

    def __init__(self, base, *, family: str, fraction: float, seed: int, shard_settings: dict,
                 renderer: str = "torch"):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fresh fraction must be in [0, 1], got {fraction}")
        if renderer not in RENDERERS:
            raise ValueError(f"fresh renderer {renderer!r} is not one of {list(RENDERERS)}")
        self.renderer = renderer
        from lens_assets.science.families import load_family
        from lens_assets.science.shards import ShardSettings

        self.base, self.fraction, self.seed = base, float(fraction), int(seed)
        self.family = load_family(family)  # a clear error for an unknown family, before training starts
        if self.family.renderer != "lenstronomy":
            raise ValueError(f"fresh family {family!r} is rendered by {self.family.renderer}; fresh objects are "
                             "drawn by the lenstronomy population code (physical, baseline or a TOML of those)")
        if self.family.name in HELDOUT_FAMILIES:
            raise ValueError(f"fresh family {family!r} is a held-out family: training on it would make its "
                             "held-out figures meaningless")
        self.settings = ShardSettings(**shard_settings)
        self.epoch = 0
        self.n_fresh = 0  # fresh objects drawn by this copy (a worker process counts its own)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def shard_names(self) -> list:
        return self.base.shard_names

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def is_fresh(self, rows) -> np.ndarray:
        """Which of ``rows`` are replaced in this epoch: a hash of (seed, epoch, row) below ``fraction``."""
        u = np.array([zlib.crc32(f"{self.seed}:{self.epoch}:{int(r)}".encode()) / 2**32 for r in rows])
        return u < self.fraction

    def fresh_objects(self, rows) -> list[int]:
        return [self.epoch * len(self.base) + int(r) for r in rows]

    def simulate(self, indices) -> dict:
        """Shard arrays (``match_batch``) of the family's objects ``indices`` under the fresh seed."""
        from lens_assets.science.fits_contract import read_cutout, simulated_cutout_bytes
        from lens_assets.science.shards import match_batch
        from lens_assets.science.simulation import simulate_one
        from lens_assets.science.surveys import get_survey

        survey = get_survey(self.settings.survey)
        seed = FRESH_SEED_OFFSET + self.seed
        if self.renderer == "torch":
            from .torch_simulation import simulate_torch

            rendered = simulate_torch(survey, self.family, seed, indices)
        else:
            rendered = [simulate_one(survey, self.family, seed, i) for i in indices]
        rows, cutouts = [], []
        for c in rendered:
            data = simulated_cutout_bytes(c, survey=survey, family=self.family, seed=seed)
            cutouts.append(read_cutout(data, name=f"fresh/{c.system.objid}.fits", survey=survey))
            rows.append({"objid": c.system.objid, "label": int(c.system.is_lens), "label_confidence": 1.0,
                         "flux_ratio": c.flux_ratio, "theta_e": c.system.theta_e_arcsec})
        self.n_fresh += len(rows)
        return match_batch(rows, cutouts, self.settings)

    def __getitems__(self, rows: list[int]) -> dict:
        out = self.base.__getitems__(rows)
        fresh = self.is_fresh(rows)
        if fresh.any():
            new = self.simulate(self.fresh_objects(np.asarray(rows)[fresh]))
            for key in ("image", "variance", "label", "label_confidence", "fwhm_before", "band_flags"):
                out[key][fresh] = new[key].astype(out[key].dtype, copy=False)
        return out

    def __getitem__(self, row: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([row]).items()}


def FreshEpoch():
    """A Lightning callback that tells the training loader's :class:`FreshMix` which epoch starts."""
    import lightning as L

    class _FreshEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            if isinstance(dataset, FreshMix):
                dataset.set_epoch(trainer.current_epoch)

    return _FreshEpoch()
