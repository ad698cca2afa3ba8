"""Training data from PSF-matched shards: a torch Dataset that reads whole batches from HDF5.

Rows are addressed by (shard, index) from the shards' ``rows.parquet``; a
split's rows come from ``dataset_splits`` (:func:`training_datasets`: the
train split, and the validation split's ``stop`` half for early stopping and
checkpoint choice; its ``calibrate`` half is left to the calibrator). ``__getitems__`` reads a batch with
one sorted fancy-index read per shard (what the DataLoader calls with
automatic batching), so throughput is bounded by decompression, not by
per-row HDF5 calls. Each worker process opens its own file handles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["ShardDataset", "collate", "training_datasets", "balance_weights", "row_truth", "THETA_E_BALANCE_EDGES",
           "available_memory_bytes"]

# log-spaced bins of the scene's Einstein radius (arcsec) for ``balance_weights``; values beyond fall in the end bins
THETA_E_BALANCE_EDGES = tuple(float(x) for x in np.geomspace(0.3, 3.0, 11))


class ShardDataset:
    """(image, variance, label, label_confidence, fwhm_before, band_flags) per row, images in nanomaggies.

    ``fwhm_before`` (bands,) is the PSF FWHM before matching in arcsec and
    ``band_flags`` (bands,) the shards' flag bits: the observing conditions a
    FiLM member is conditioned on (with the noise level from ``variance``).

    ``objids`` (optional) restricts and orders the rows, e.g. one split.

    ``cache_bytes`` > 0 keeps the decompressed images and variances of the first rows that fit in that many bytes
    in memory once read, so that later epochs copy them instead of decompressing them again (the same arrays
    either way). A copy sent to a loader worker process streams (its cache would be one more per worker).
    """

    def __init__(self, shard_dir: str | Path, objids=None, *, cache_bytes: int = 0):
        self.shard_dir = Path(shard_dir)
        from lens_assets.science.shards import ROWS_FILE

        rows = pd.read_parquet(self.shard_dir / ROWS_FILE, columns=["objid", "shard", "index"])
        if objids is not None:
            rows = rows.set_index("objid").loc[list(objids)].reset_index()
        self.objid = rows["objid"].to_numpy()
        self.shard_names = sorted(rows["shard"].unique())
        shard_no = {s: i for i, s in enumerate(self.shard_names)}
        self.shard = rows["shard"].map(shard_no).to_numpy()
        self.index = rows["index"].to_numpy()
        self._files = None
        self.cache_bytes = int(cache_bytes)
        self._cache = None  # (images, variance, filled) for the first rows, made at the first read

    def __len__(self) -> int:
        return len(self.objid)

    def _open(self):
        import h5py

        if self._files is None:
            self._files = [h5py.File(self.shard_dir / s, "r") for s in self.shard_names]
            # per-row scalars are small: read them once
            self._labels = [(f["label"][:].astype(np.float32), f["label_confidence"][:]) for f in self._files]
            self._conditions = [(f["fwhm_before"][:].astype(np.float32), f["band_flags"][:].astype(np.int32))
                                for f in self._files]
            self._arrays = [(f["images"], f["variance"]) for f in self._files]
        return self._files

    def layout(self) -> dict:
        """``survey``, ``bands`` (list), ``in_chans`` and ``img_size`` of the shards (their first file's attributes
        and image shape: every shard of a build shares them)."""
        import h5py

        with h5py.File(self.shard_dir / self.shard_names[0], "r") as f:
            return {"survey": str(f.attrs["survey"]), "bands": str(f.attrs["bands"]).split(","),
                    "in_chans": int(f["images"].shape[1]), "img_size": int(f["images"].shape[-1])}

    @property
    def cached_rows(self) -> int:
        """Rows held in memory now (0 without a cache)."""
        return int(self._cache[2].sum()) if self._cache is not None else 0

    def row_bytes(self) -> int:
        """Bytes of one row's image and variance in memory (float32)."""
        return 2 * 4 * int(np.prod(self._open()[0]["images"].shape[1:]))

    def __getitems__(self, rows: list[int]) -> dict:
        f0 = self._open()[0]
        rows = np.asarray(rows)
        n = len(rows)
        out = {"image": np.empty((n, *f0["images"].shape[1:]), np.float32),
               "variance": np.empty((n, *f0["variance"].shape[1:]), np.float32),
               "label": np.empty(n, np.float32), "label_confidence": np.empty(n, np.float32),
               "fwhm_before": np.empty((n, f0["images"].shape[1]), np.float32),
               "band_flags": np.empty((n, f0["images"].shape[1]), np.int32)}
        if self.cache_bytes > 0:
            self._cached_arrays(rows, out["image"], out["variance"])
        else:
            self._read_arrays(rows, out["image"], out["variance"])
        shard, index = self.shard[rows], self.index[rows]
        for s in np.unique(shard):
            m = shard == s
            out["label"][m] = self._labels[s][0][index[m]]
            out["label_confidence"][m] = self._labels[s][1][index[m]]
            out["fwhm_before"][m] = self._conditions[s][0][index[m]]
            out["band_flags"][m] = self._conditions[s][1][index[m]]
        return out

    def _cached_arrays(self, rows: np.ndarray, image_out: np.ndarray, variance_out: np.ndarray) -> None:
        """Images and variances of ``rows`` into the outputs: from the cache where it holds them, else read (and
        kept when the row has a place in the cache)."""
        if self._cache is None:
            n = int(min(len(self), self.cache_bytes // self.row_bytes()))
            shape = image_out.shape[1:]
            self._cache = (np.empty((n, *shape), np.float32), np.empty((n, *shape), np.float32), np.zeros(n, bool))
        images, variance, filled = self._cache
        placed = (rows >= 0) & (rows < len(filled))  # a negative index reads, but never takes another row's place
        hit = placed.copy()
        hit[placed] = filled[rows[placed]]
        if (~hit).any():
            miss = np.flatnonzero(~hit)
            self._read_arrays(rows[miss], image_out, variance_out, at=miss)  # straight into the batch
            kept = miss[placed[miss]]  # the rows with a place in the cache take a copy
            images[rows[kept]], variance[rows[kept]] = image_out[kept], variance_out[kept]
            filled[rows[kept]] = True
        if hit.any():
            image_out[hit], variance_out[hit] = images[rows[hit]], variance[rows[hit]]

    def _read_arrays(self, rows: np.ndarray, image_out: np.ndarray, variance_out: np.ndarray, *,
                     at: np.ndarray | None = None) -> None:
        """Images and variances of ``rows`` from the shards into the outputs, row ``i`` at position ``at[i]``
        (default ``i``)."""
        n = len(rows)
        at = np.arange(n) if at is None else np.asarray(at)
        shard, index = self.shard[rows], self.index[rows]
        order = np.lexsort((index, shard))  # read each shard front to back
        # read_direct of contiguous runs: h5py's fancy indexing builds a point selection and is ~15x slower
        start = 0
        while start < n:
            end = start + 1
            s, first = shard[order[start]], index[order[start]]
            while end < n and shard[order[end]] == s and index[order[end]] == first + (end - start):
                end += 1
            dest = at[order[start:end]]
            images, variance = self._arrays[s]
            src = np.s_[first:first + end - start]
            if end - start == 1 or (np.diff(dest) == 1).all():
                sl = np.s_[dest[0]:dest[0] + len(dest)]
                images.read_direct(image_out, src, sl)
                variance.read_direct(variance_out, src, sl)
            else:
                image_out[dest] = images[src]
                variance_out[dest] = variance[src]
            start = end

    def __getitem__(self, row: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([row]).items()}

    def __getstate__(self):  # file handles do not cross process boundaries
        state = dict(self.__dict__)
        state["_files"] = None
        state["_cache"], state["cache_bytes"] = None, 0  # a worker streams: no cache per worker process
        state.pop("_labels", None)
        state.pop("_arrays", None)
        state.pop("_conditions", None)
        return state


def collate(batch: dict):
    """DataLoader ``collate_fn`` for batches from ``__getitems__``: numpy to torch, no copies."""
    import torch

    return {k: torch.from_numpy(v) for k, v in batch.items()}


def training_datasets(shard_dir: str | Path, splits_path: str | Path, *, cache_bytes: int = 0) -> dict:
    """``{"train": ..., "val": ...}`` ShardDatasets: the train split, and the rows of the val split whose
    ``val_role`` is ``stop`` (what early stopping and checkpoint choice see; the ``calibrate`` rows are kept
    out so the calibrator is fit on rows the model was not selected on).

    An empty train split or stop half is a ``ValueError`` naming the file; a stop half without lenses or
    without non-lenses is a warning (validation AUROC is then undefined and reads 0.5).

    ``cache_bytes``: memory for decompressed rows (:class:`ShardDataset`), the train split's first, what it leaves
    to the stop half.
    """
    import logging

    from lens_assets.science.splits import require_both_labels, val_roles

    splits = pd.read_parquet(splits_path)
    roles = val_roles(splits, source=str(splits_path))
    rows = {"train": splits["split"] == "train", "val": (splits["split"] == "val") & (roles == "stop")}
    for empty, what in ((~rows["train"].any(), "the train split is empty"),
                        (~(splits["split"] == "val").any(), "the val split is empty"),
                        (~rows["val"].any(), "the val split's stop half is empty")):
        if empty:
            raise ValueError(f"{splits_path}: {what}")
    try:
        require_both_labels(splits.loc[rows["val"], "label"], what=f"{splits_path}: the val split's stop half")
    except ValueError as err:
        logging.getLogger(__name__).warning(f"{err}; early stopping and checkpoint choice see a constant AUROC")
    train = ShardDataset(shard_dir, objids=splits.loc[rows["train"], "objid"], cache_bytes=cache_bytes)
    left = max(0, int(cache_bytes) - len(train) * train.row_bytes()) if cache_bytes > 0 else 0
    return {"train": train, "val": ShardDataset(shard_dir, objids=splits.loc[rows["val"], "objid"], cache_bytes=left)}


def available_memory_bytes(*, meminfo: str = "/proc/meminfo", cgroup_root: str = "/sys/fs/cgroup",
                           proc_cgroup: str = "/proc/self/cgroup") -> int:
    """Memory this process can still take without swapping or being killed: the system's ``MemAvailable``, or
    less where its memory cgroup (v2 or v1, its own limit or an ancestor's) leaves less below the limit. A container
    or an ECS task sees the host's /proc/meminfo, so the limit is what keeps its job from being killed; reclaimable
    file cache (``inactive_file``, e.g. shards just copied from S3) is not counted as used. 0 where neither can be
    read (no cache rather than a guess)."""
    import os

    free = None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES
            return 0
    room = _cgroup_room(Path(cgroup_root), Path(proc_cgroup))
    return free if room is None else min(free, room)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _read_stat(path: Path) -> dict:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def _cgroup_room(root: Path, proc_cgroup: Path) -> int | None:
    """Bytes the process's memory cgroup leaves below the tightest limit on it or its ancestors, its reclaimable
    file cache not counted as used; None without a limit or without a cgroup to read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    paths = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            if parts[1] == "":
                paths["v2"] = parts[2]
            elif "memory" in parts[1].split(","):
                paths["v1"] = parts[2]
    rooms = []
    if (root / "cgroup.controllers").exists():  # cgroup v2: the group's files and its ancestors', up to the mount
        group = root / paths.get("v2", "/").lstrip("/")
        group = group if group.is_dir() else root  # a namespaced view: the mount is the group
        while True:
            limit, usage = _read_int(group / "memory.max"), _read_int(group / "memory.current")
            if limit is not None and usage is not None:
                cache = _read_stat(group / "memory.stat").get("inactive_file", 0)
                rooms.append(max(0, limit - max(0, usage - cache)))
            if group == root or root not in group.parents:
                break
            group = group.parent
    else:  # cgroup v1: memory.stat's hierarchical limit counts the ancestors
        base = root / "memory"
        group = base / paths.get("v1", "/").lstrip("/")
        group = group if (group / "memory.stat").exists() else base
        stat = _read_stat(group / "memory.stat")
        limit = stat.get("hierarchical_memory_limit", _read_int(group / "memory.limit_in_bytes"))
        usage = _read_int(group / "memory.usage_in_bytes")
        if limit is not None and usage is not None:
            rooms.append(max(0, limit - max(0, usage - stat.get("total_inactive_file", 0))))
    return min(rooms) if rooms else None


def balance_weights(values, alpha: float, *, edges=THETA_E_BALANCE_EDGES, max_ratio: float = 10.0) -> np.ndarray:
    """Sampling weights that flatten ``values``' distribution by ``alpha``: a row in a bin holding the share p
    of the finite values weighs p^-alpha (0: every row alike; 1: every occupied bin drawn equally often), capped
    at ``max_ratio`` times the smallest weight so a bin of a few rows is not repeated without end. Rows whose
    value is NaN (no scene, real data) weigh the mean of the others. Normalized to mean 1.

    Used on the scene's Einstein radius (``scene_theta_e``), which a lens and the non-lenses made from its scene
    share: both classes are reweighted alike, so the reweighting itself separates nothing."""
    v = np.asarray(values, dtype=np.float64)
    if not alpha >= 0:
        raise ValueError(f"balance alpha must be >= 0, got {alpha}")
    w = np.ones(len(v))
    finite = np.isfinite(v)
    if alpha == 0 or not finite.any():
        return w
    inner = np.asarray(edges, dtype=np.float64)[1:-1]
    b = np.digitize(v[finite], inner)  # 0 .. len(edges) - 2
    share = np.bincount(b, minlength=len(inner) + 1) / finite.sum()
    wf = share[b] ** -alpha
    wf = np.minimum(wf, wf.min() * max_ratio)
    w[finite] = wf
    w[~finite] = wf.mean()
    return w / w.mean()


def row_truth(shard_dir: str | Path, objids, column: str) -> np.ndarray:
    """``column`` of the shards' ``rows.parquet`` for ``objids`` in their order: NaN where missing (the catalog's
    -1) or where the shards were written without it."""
    from lens_assets.science.shards import ROWS_FILE

    path = Path(shard_dir) / ROWS_FILE
    import pyarrow.parquet as pq

    if column not in pq.read_schema(path).names:
        return np.full(len(objids), np.nan)
    rows = pd.read_parquet(path, columns=["objid", column]).set_index("objid")
    v = rows.loc[list(objids), column].to_numpy(dtype=np.float64)
    return np.where(v < 0, np.nan, v)
