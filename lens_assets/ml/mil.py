"""Track B of the cluster track: a multiple-instance (MIL) model over arc-segment cutouts. Plain Lightning.

A cluster field is a *bag*: one fixed-size stamp (default 32×32 px) around each
of its arc segments' centroids (``arc_segments``' table), the brightest
``max_instances`` by S/N, each with three scalars giving its place about the
BCG. A timm backbone (:mod:`.backbones`) embeds every stamp; gated attention
pooling (Ilse, Tomczak & Welling 2018, "Attention-based Deep Multiple Instance
Learning", ICML) weighs the instances; one logit per field comes out, with the
attention weight of each instance (which segments made the call).

* :func:`segment_bags` cuts one field's bag from its PSF-matched image (the
  field is read and matched by :mod:`lens_assets.science.clusters.catalog`);
  :func:`build_bag_cache` does it for every field (processes in parallel) and
  writes one ``.npz`` that training and scoring read, so no epoch re-reads FITS.
* :class:`MILNet` is the network, :class:`MILClassifier` its LightningModule,
  :func:`train_mil` fits it on the ``train`` split with early stopping and the
  best checkpoint by validation AUROC on the ``val``/``stop`` rows (bf16 autocast
  where :mod:`.precision` says so), and :func:`score_mil` gives logits and
  attention weights from a checkpoint.
* :func:`train_pu_mil` is Elkan–Noto PU learning
  (:mod:`lens_assets.science.clusters.pu`) with :func:`train_mil`'s network as g:
  trained on ``n`` labeled lenses against the unlabeled rest.

Pixel coordinates follow :mod:`lens_assets.science.clusters.segments`: x is the
column, y the row, angles from +x towards +y.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone, get_spec

__all__ = ["Bag", "BagSet", "MILSettings", "MILNet", "MILClassifier", "N_POSITION", "SEGMENT_BAG_COLUMNS",
           "segment_bags", "normalize_field", "field_overview", "field_image", "field_bag", "build_bag_cache",
           "write_bag_cache",
           "read_bag_cache", "augment_bags", "collate_bags", "train_mil", "train_pu_mil", "pu_model_name", "load_mil",
           "score_mil", "attention_gallery", "MIL_CODE_VERSION"]

MIL_CODE_VERSION = "mil-2"  # changes when a cached bag would be cut differently (mil-2: the field overview)
N_POSITION = 3  # per-instance scalars: r / r_scale, cos(phi), sin(phi)
SEGMENT_BAG_COLUMNS = ("segment_id", "x_px", "y_px", "r_arcsec", "phi_deg", "snr")


# ---------------------------------------------------------------------------------------------------------------
# bags


@dataclass(frozen=True)
class Bag:
    """One field's instances, padded to ``max_instances``: ``stamps`` (K, C, S, S) float32, ``positions`` (K, 3)
    float32 (r / r_scale, cos φ, sin φ about the BCG), ``mask`` (K,) bool (True: a real instance), ``segment_id``
    (K,) int64 (the segment's id; -1 for the central stamp of a field without segments, and for padding),
    ``xy_px`` (K, 2) float32: the stamp's centre in the field's pixels (x, y). Padding rows are zeros.
    ``overview`` (C, P, P) float32 or None: the whole field at low resolution (:func:`field_overview`)."""

    stamps: np.ndarray
    positions: np.ndarray
    mask: np.ndarray
    segment_id: np.ndarray
    xy_px: np.ndarray
    overview: np.ndarray | None = None

    @property
    def n_instances(self) -> int:
        return int(self.mask.sum())


def normalize_field(image: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """``asinh(image / s)`` of a (C, H, W) field in nanomaggies, ``s`` the field's median per-pixel noise over its
    bands (pixels with variance > 0): the galaxy track's network input (:func:`.module.scale_input`), called,
    not copied. A new float32 array; the inputs are not modified."""
    from .module import scale_input

    img = torch.as_tensor(np.asarray(image, dtype=np.float32))[None]
    var = torch.as_tensor(np.asarray(variance, dtype=np.float32))[None]
    return scale_input(img, var)[0].numpy().copy()


def field_overview(image: np.ndarray, variance: np.ndarray, *, pixel_scale_arcsec: float,
                   arcsec_per_px: float = 1.0, normalized: np.ndarray | None = None) -> np.ndarray:
    """The whole field at low resolution, the input of the field-view model: :func:`normalize_field` (the same
    ``asinh(image / s)`` as the stamps), then averaged over areas to ``P = round(side * pixel_scale_arcsec /
    arcsec_per_px)`` pixels a side (torch's ``adaptive_avg_pool2d``: a plain block mean when the side is a
    multiple of P). A (C, P, P) float32 array. At 1"/px a 40" field is 40 px whatever the survey's grid, and an
    arc a few arcsec long spans several pixels, with its surface brightness averaged rather than sampled.
    ``normalized``: the field's :func:`normalize_field` where the caller has it already (:func:`field_bag`)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[1] != img.shape[2]:
        raise ValueError(f"image has shape {img.shape}; expected a square (bands, n, n) field")
    if not (pixel_scale_arcsec > 0 and arcsec_per_px > 0):
        raise ValueError(f"pixel_scale_arcsec and arcsec_per_px must be positive, got {pixel_scale_arcsec} and "
                         f"{arcsec_per_px}")
    side = max(1, int(round(img.shape[1] * float(pixel_scale_arcsec) / float(arcsec_per_px))))
    if side > img.shape[1]:
        raise ValueError(f"arcsec_per_px {arcsec_per_px} is finer than the field's pixels ({pixel_scale_arcsec}\"/px)")
    n = img.shape[1]
    # adaptive_avg_pool2d's windows, [floor(i n / P), ceil((i + 1) n / P)), as a (P, n) averaging matrix: numpy,
    # not torch, because this runs in forked worker processes
    start = (np.arange(side) * n) // side
    stop = -((-(np.arange(side) + 1) * n) // side)
    cols = np.arange(n)
    avg = ((cols >= start[:, None]) & (cols < stop[:, None])).astype(np.float64)
    avg /= avg.sum(axis=1, keepdims=True)
    norm = (normalize_field(img, variance) if normalized is None else np.asarray(normalized)).astype(np.float64)
    return (avg @ norm @ avg.T).astype(np.float32)  # two matrix products per band


def segment_bags(image: np.ndarray, variance: np.ndarray, segments: pd.DataFrame, *, bcg_xy: tuple[float, float],
                 pixel_scale_arcsec: float, stamp_px: int = 32, max_instances: int = 16,
                 r_scale_arcsec: float | None = None, normalized: np.ndarray | None = None) -> Bag:
    """The bag of one cluster field: a ``stamp_px`` stamp around each segment's centroid.

    ``image`` is the field's PSF-matched (C, H, W) image in nanomaggies and
    ``variance`` its variance (as ``catalog._matched`` gives them: the variance
    before matching, whose median is the per-pixel noise the detection used);
    ``segments`` the field's rows of the segments table (columns
    :data:`SEGMENT_BAG_COLUMNS`), ``bcg_xy`` the BCG (x, y) in pixels.

    Normalization: the whole field is scaled once as the galaxy track scales a
    cutout, ``asinh(image / s)`` with ``s`` the field's median noise over all
    bands (:func:`normalize_field`), then cut. One scale per field, not per
    stamp, keeps what MIL must compare across instances: the segments' relative
    surface brightness and, with one ``s`` for every band, their colours (the
    achromatic-lensing cue of the cluster track); asinh keeps faint arcs linear
    in noise units and compresses the BCG's and members' cores; and a backbone
    sees the same input statistics as a galaxy-track member, whose weights can
    initialize it.

    Stamps are centred on the pixel nearest the centroid (``floor(x + 0.5)``), at
    index ``stamp_px // 2`` in each axis, zero padded beyond the field's edge.
    The segments with the highest ``snr`` come first (ties by ``segment_id``), at
    most ``max_instances``. Each instance's scalars are ``r_arcsec /
    r_scale_arcsec`` (default half the field's side), ``cos φ``, ``sin φ`` with φ
    the segment's angle about the BCG. A field without segments gets one
    instance, the stamp centred on the BCG, with scalars (0, 0, 0), so no field
    is dropped. ``normalized``: the field's :func:`normalize_field` where the caller has it already.
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"image has shape {img.shape}; expected (bands, height, width)")
    if np.shape(variance) != img.shape:
        raise ValueError(f"variance has shape {np.shape(variance)} but image has shape {img.shape}")
    if stamp_px < 1 or max_instances < 1:
        raise ValueError(f"stamp_px and max_instances must be positive, got {stamp_px} and {max_instances}")
    missing = [c for c in SEGMENT_BAG_COLUMNS if c not in segments.columns]
    if missing:
        raise ValueError(f"segments table lacks columns {missing}; it has {list(segments.columns)}")
    bx, by = (float(v) for v in bcg_xy)
    if not (math.isfinite(bx) and math.isfinite(by)):
        raise ValueError(f"bcg_xy must be finite pixel coordinates, got {bcg_xy}")
    c, h, w = img.shape
    if r_scale_arcsec is None:
        r_scale_arcsec = 0.5 * max(h, w) * float(pixel_scale_arcsec)
    if not r_scale_arcsec > 0:
        raise ValueError(f"r_scale_arcsec must be positive, got {r_scale_arcsec}")
    norm = normalize_field(img, variance) if normalized is None else normalized
    half = stamp_px // 2
    padded = np.zeros((c, h + 2 * stamp_px, w + 2 * stamp_px), dtype=np.float32)
    padded[:, stamp_px:stamp_px + h, stamp_px:stamp_px + w] = norm
    segs = segments.sort_values(["snr", "segment_id"], ascending=[False, True], kind="stable").head(max_instances)
    if len(segs):
        xy = segs[["x_px", "y_px"]].to_numpy(dtype=float)
        phi = np.deg2rad(segs["phi_deg"].to_numpy(dtype=float))
        pos = np.stack([segs["r_arcsec"].to_numpy(dtype=float) / r_scale_arcsec, np.cos(phi), np.sin(phi)], 1)
        ids = segs["segment_id"].to_numpy(dtype=np.int64)
    else:
        xy, pos, ids = np.array([[bx, by]]), np.zeros((1, N_POSITION)), np.array([-1], dtype=np.int64)
    if not np.isfinite(xy).all() or not np.isfinite(pos).all():
        raise ValueError(f"segments have non-finite centroids or positions: {segs[list(SEGMENT_BAG_COLUMNS)]}")
    n = len(xy)
    stamps = np.zeros((max_instances, c, stamp_px, stamp_px), dtype=np.float32)
    for k, (x, y) in enumerate(xy):
        # the centre pixel (cx, cy) of the field lands at stamp index `half`; padded index = field index + stamp_px
        x0 = int(math.floor(x + 0.5)) - half + stamp_px
        y0 = int(math.floor(y + 0.5)) - half + stamp_px
        x0, y0 = min(max(x0, 0), w + stamp_px), min(max(y0, 0), h + stamp_px)  # far outside: all zeros
        stamps[k] = padded[:, y0:y0 + stamp_px, x0:x0 + stamp_px]
    out_pos = np.zeros((max_instances, N_POSITION), dtype=np.float32)
    out_pos[:n] = pos
    mask = np.zeros(max_instances, dtype=bool)
    mask[:n] = True
    seg_id = np.full(max_instances, -1, dtype=np.int64)
    seg_id[:n] = ids
    out_xy = np.zeros((max_instances, 2), dtype=np.float32)
    out_xy[:n] = xy
    return Bag(stamps=stamps, positions=out_pos, mask=mask, segment_id=seg_id, xy_px=out_xy)


def field_image(path: str | Path, name: str, survey: str, size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """(PSF-matched image, variance) of one cluster field in nanomaggies, read through the inbox contract at its
    own side ``size_px`` (the fields row's) exactly as ``arc_segments`` read it (``catalog._matched``); a file
    that no longer reads is a ``ValueError`` naming it and its quarantine reason."""
    from lens_assets.science.clusters.catalog import _matched
    from lens_assets.science.surveys import get_survey

    got = _matched(path, name, get_survey(survey), int(size_px), own_size=True)
    if isinstance(got, dict):
        raise ValueError(f"{name}: cannot be read ({got['reason']}): {got['message']}")
    _, _, image, variance, _, _ = got
    return image, variance


def field_bag(args: tuple) -> Bag:
    """One field's :func:`segment_bags` from its FITS (:func:`field_image`; the worker function of
    :func:`build_bag_cache`): ``args`` = (path, name, survey name, size_px, segments, bcg (x, y), stamp_px,
    max_instances, overview arcsec per pixel (0: no overview))."""
    from dataclasses import replace

    from lens_assets.science.surveys import get_survey

    path, name, survey_name, size_px, segments, bcg_xy, stamp_px, max_instances, overview_scale = args
    image, variance = field_image(path, name, survey_name, size_px)
    scale = get_survey(survey_name).pixel_scale_arcsec
    norm = normalize_field(image, variance)  # once, for the stamps and the overview
    bag = segment_bags(image, variance, segments, bcg_xy=bcg_xy, pixel_scale_arcsec=scale, stamp_px=stamp_px,
                       max_instances=max_instances, normalized=norm)
    if overview_scale:
        bag = replace(bag, overview=field_overview(image, variance, pixel_scale_arcsec=scale,
                                                   arcsec_per_px=overview_scale, normalized=norm))
    return bag


def build_bag_cache(fields: pd.DataFrame, segments: pd.DataFrame, *, root: str | Path, survey: str, out: str | Path,
                    stamp_px: int = 32, max_instances: int = 16, workers: int = 1, progress: bool = False,
                    key: str = "", overview_arcsec_per_px: float = 0.0) -> Path:
    """Cut every field's bag and write them to ``out`` (:func:`write_bag_cache`); returns ``out``.
    ``overview_arcsec_per_px`` > 0 also stores each field's :func:`field_overview` at that scale.

    ``fields`` has the fields table's ``objid``, ``source_file`` (relative to ``root``), ``size_px``,
    ``bcg_x_px``, ``bcg_y_px``; ``segments`` the segments table (rows matched to fields by ``objid``). ``key``
    is stored in the cache (the caller's fingerprint of what it was cut from)."""
    from lens_assets.science.parallel import parallel_map

    need = ["objid", "source_file", "size_px", "bcg_x_px", "bcg_y_px"]
    missing = [c for c in need if c not in fields.columns]
    if missing:
        raise ValueError(f"fields table lacks columns {missing}")
    if not fields["objid"].is_unique:
        raise ValueError(f"fields table repeats objids {sorted(fields['objid'][fields['objid'].duplicated()])[:5]}")
    root = Path(root)
    cols = ["objid", *SEGMENT_BAG_COLUMNS]
    by_field = dict(tuple(segments[cols].groupby("objid"))) if len(segments) else {}
    empty = pd.DataFrame({c: pd.Series(dtype=float) for c in SEGMENT_BAG_COLUMNS})
    jobs = [(str(root.joinpath(*f.source_file.split("/"))), f.source_file, survey, int(f.size_px),
             by_field[f.objid].drop(columns="objid") if f.objid in by_field else empty,
             (float(f.bcg_x_px), float(f.bcg_y_px)), stamp_px, max_instances, float(overview_arcsec_per_px))
            for f in fields.itertuples(index=False)]
    bags = parallel_map(field_bag, jobs, workers=workers, progress=progress, desc=f"MIL bags {survey}", unit="field")
    return write_bag_cache(out, list(fields["objid"]), bags, meta={
        "survey": survey, "stamp_px": stamp_px, "max_instances": max_instances, "key": key,
        "code_version": MIL_CODE_VERSION, "normalization": "asinh(image / median noise of the field)",
        "overview_arcsec_per_px": float(overview_arcsec_per_px)})


def write_bag_cache(path: str | Path, objids: Sequence[str], bags: Sequence[Bag], *, meta: dict | None = None) -> Path:
    """Write bags as one ``.npz`` (written atomically): only the real instances, concatenated, with ``offsets``
    (N + 1) marking each field's; ``objid`` (N), and ``meta`` (JSON) with ``stamp_px`` and ``max_instances``;
    ``overview`` (N, C, P, P) when every bag has one (bags with and without overviews together are an error)."""
    from lens_assets.science.fileio import atomic_path

    if len(objids) != len(bags):
        raise ValueError(f"{len(objids)} objids for {len(bags)} bags")
    if not bags:
        raise ValueError("no bags to write")
    counts = np.array([b.n_instances for b in bags], dtype=np.int64)
    if (counts == 0).any():
        raise ValueError(f"bags without instances: {[o for o, n in zip(objids, counts) if n == 0][:5]}")
    stamp_px, max_instances = bags[0].stamps.shape[-1], bags[0].mask.shape[0]
    meta = {"stamp_px": int(stamp_px), "max_instances": int(max_instances), **(meta or {})}
    arrays = {
        "objid": np.asarray([str(o) for o in objids]),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "stamps": np.concatenate([b.stamps[b.mask] for b in bags]).astype(np.float32),
        "positions": np.concatenate([b.positions[b.mask] for b in bags]).astype(np.float32),
        "segment_id": np.concatenate([b.segment_id[b.mask] for b in bags]),
        "xy_px": np.concatenate([b.xy_px[b.mask] for b in bags]).astype(np.float32),
        "meta": np.asarray(json.dumps(meta)),
    }
    has = [b.overview is not None for b in bags]
    if any(has) and not all(has):
        raise ValueError(f"{has.count(False)} of {len(bags)} bags lack the field overview the others have")
    if all(has):
        arrays["overview"] = np.stack([b.overview for b in bags]).astype(np.float32)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


@dataclass
class BagSet:
    """Bags read from a cache: ragged instance arrays and ``offsets`` (see :func:`write_bag_cache`)."""

    objid: np.ndarray
    offsets: np.ndarray
    stamps: np.ndarray
    positions: np.ndarray
    segment_id: np.ndarray
    xy_px: np.ndarray
    meta: dict = field(default_factory=dict)
    overview: np.ndarray | None = None  # (N, C, P, P): each field's field_overview, when the cache has them

    def overview_bags(self) -> "BagSet":
        """The field-view model's bags: one instance per field, its overview (segment_id -2, position scalars
        0, the field's centre as ``xy_px``), so the MIL network and training loop serve it unchanged."""
        if self.overview is None:
            raise ValueError("this bag cache has no field overviews (cut with overview_arcsec_per_px > 0)")
        n, side = len(self.objid), int(self.overview.shape[-1])
        return BagSet(objid=self.objid, offsets=np.arange(n + 1, dtype=np.int64), stamps=self.overview,
                      positions=np.zeros((n, N_POSITION), dtype=np.float32),
                      segment_id=np.full(n, -2, dtype=np.int64), xy_px=np.full((n, 2), (side - 1) / 2, np.float32),
                      meta={**self.meta, "stamp_px": side, "max_instances": 1})

    def __len__(self) -> int:
        return len(self.objid)

    @property
    def in_chans(self) -> int:
        return int(self.stamps.shape[1])

    @property
    def stamp_px(self) -> int:
        return int(self.stamps.shape[-1])

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def instances(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def index_of(self, objids) -> np.ndarray:
        """Row of each objid; an objid without a bag is a ``KeyError`` naming the first few."""
        where = {o: i for i, o in enumerate(self.objid)}
        missing = [o for o in objids if o not in where]
        if missing:
            raise KeyError(f"{len(missing)} objids have no bag in the cache, e.g. {missing[:5]}")
        return np.array([where[o] for o in objids], dtype=np.int64)

    def padded(self, rows: Sequence[int], k: int | None = None) -> dict:
        """Numpy arrays of fields ``rows`` padded to ``k`` instances (default: the most among them): ``stamps``
        (B, K, C, S, S), ``positions`` (B, K, 3), ``mask`` (B, K)."""
        rows = list(rows)
        counts = self.counts[rows]
        k = int(counts.max()) if k is None else int(k)
        c, s = self.in_chans, self.stamp_px
        stamps = np.zeros((len(rows), k, c, s, s), dtype=np.float32)
        pos = np.zeros((len(rows), k, N_POSITION), dtype=np.float32)
        mask = np.zeros((len(rows), k), dtype=bool)
        for b, i in enumerate(rows):
            sl, n = self.instances(i), int(counts[b])
            stamps[b, :n], pos[b, :n], mask[b, :n] = self.stamps[sl], self.positions[sl], True
        return {"stamps": stamps, "positions": pos, "mask": mask}


def read_bag_cache(path: str | Path) -> BagSet:
    with np.load(Path(path), allow_pickle=False) as z:
        return BagSet(objid=z["objid"].astype(str), offsets=z["offsets"], stamps=z["stamps"],
                      positions=z["positions"], segment_id=z["segment_id"], xy_px=z["xy_px"],
                      meta=json.loads(str(z["meta"])), overview=z["overview"] if "overview" in z.files else None)


# ---------------------------------------------------------------------------------------------------------------
# the network


class MILNet(nn.Module):
    """Instance embedding (timm backbone + position scalars) and gated attention pooling to one logit.

    ``forward(stamps (B, K, C, S, S), positions (B, K, 3), mask (B, K) bool)`` returns ``(logit (B,),
    attention (B, K))``. The backbone runs on the real instances only (padding costs nothing); each
    instance's pooled backbone features, with its three position scalars appended, go through
    ``Linear + ReLU`` to an embedding ``h``; the attention score is ``w·(tanh(V h) ⊙ sigmoid(U h))``
    (Ilse et al. 2018, eq. 9), softmaxed over the real instances in float32 (masked ones get exactly 0);
    the field's logit is a linear map of ``Σ a_k h_k``. Instances are a set: reordering them permutes the
    attention and leaves the logit unchanged.
    """

    def __init__(self, *, backbone: str = "resnet10t", in_chans: int = 5, stamp_px: int = 32,
                 n_position: int = N_POSITION, embed_dim: int = 128, attention_dim: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        self.backbone = create_backbone(backbone, in_chans=in_chans, img_size=stamp_px, num_classes=0)
        self.channels_last = get_spec(backbone).channels_last
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        with torch.no_grad():  # the pooled width (timm's num_features is not it for every model, e.g. mobilenetv3)
            n_features = int(self.backbone.eval()(torch.zeros(1, in_chans, stamp_px, stamp_px)).shape[-1])
        self.backbone.train()
        self.embed = nn.Sequential(nn.Linear(n_features + n_position, embed_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.attention_v = nn.Linear(embed_dim, attention_dim)
        self.attention_u = nn.Linear(embed_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.head = nn.Linear(embed_dim, 1)
        self.embed_dim = embed_dim

    def embed_instances(self, stamps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(M, C, S, S) stamps and (M, 3) scalars -> (M, embed_dim) instance embeddings."""
        x = stamps.contiguous(memory_format=torch.channels_last) if self.channels_last else stamps
        features = self.backbone(x)
        return self.embed(torch.cat([features, positions.to(features.dtype)], dim=1))

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated attention over (B, K, D) embeddings of which ``mask`` (B, K) are real: (logit, attention)."""
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every bag needs at least one real instance (mask has an all-False row)")
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            score = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))
            score = score.squeeze(-1).masked_fill(~mask, float("-inf"))
            attention = torch.softmax(score, dim=1)
            pooled = (attention.unsqueeze(-1) * h.masked_fill(~mask.unsqueeze(-1), 0.0)).sum(dim=1)
            logit = self.head(self.dropout(pooled)).squeeze(-1)
        return logit, attention

    def forward(self, stamps: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
        b, k = mask.shape
        mask = mask.bool()
        h_real = self.embed_instances(stamps[mask], positions[mask])
        h = h_real.new_zeros((b, k, h_real.shape[-1]))
        h[mask] = h_real
        return self.pool(h, mask)


class MILClassifier(L.LightningModule):
    """:class:`MILNet` trained with BCE on field labels; AdamW with a cosine decay over ``max_epochs``;
    ``val_auroc`` each validation epoch; per-field 90° rotations and flips (:func:`augment_bags`)."""

    def __init__(self, *, backbone: str = "resnet10t", in_chans: int = 5, stamp_px: int = 32,
                 n_position: int = N_POSITION, embed_dim: int = 128, attention_dim: int = 64,
                 dropout: float = 0.0, lr: float = 1e-3, weight_decay: float = 0.05, max_epochs: int = 8,
                 augment: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.net = MILNet(backbone=backbone, in_chans=in_chans, stamp_px=stamp_px, n_position=n_position,
                          embed_dim=embed_dim, attention_dim=attention_dim, dropout=dropout)
        self._val_logits: list = []
        self._val_labels: list = []
        self.val_history: list = []
        self.train_instances = 0
        self.train_step_seconds = 0.0
        self.instances_per_s_by_epoch: list = []  # over each epoch's training steps (the first holds warm-up)
        self._t0 = None
        self._epoch_start = (0, 0.0)

    def forward(self, stamps, positions, mask):
        return self.net(stamps, positions, mask)

    def on_train_epoch_start(self):
        self._epoch_start = (self.train_instances, self.train_step_seconds)

    def on_train_epoch_end(self):
        n, sec = self.train_instances - self._epoch_start[0], self.train_step_seconds - self._epoch_start[1]
        self.instances_per_s_by_epoch.append(n / sec if sec > 0 else 0.0)

    def on_train_batch_start(self, batch, batch_idx):
        import time

        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.train_step_seconds += time.perf_counter() - self._t0
        self.train_instances += int(batch["mask"].sum())

    def training_step(self, batch, batch_idx):
        stamps, positions, mask = batch["stamps"], batch["positions"], batch["mask"]
        if self.hparams.augment:
            stamps, positions = augment_bags(stamps, positions)
        logit, _ = self(stamps, positions, mask)
        loss = F.binary_cross_entropy_with_logits(logit, batch["label"])
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(logit))
        return loss

    def validation_step(self, batch, batch_idx):
        logit, _ = self(batch["stamps"], batch["positions"], batch["mask"])
        self.log("val_loss", F.binary_cross_entropy_with_logits(logit, batch["label"]), batch_size=len(logit))
        self._val_logits.append(logit.detach().float().cpu())
        self._val_labels.append(batch["label"].detach().cpu())

    def on_validation_epoch_end(self):
        from sklearn.metrics import roc_auc_score

        if not self._val_logits:
            return
        s, y = torch.cat(self._val_logits).numpy(), torch.cat(self._val_labels).numpy()
        self._val_logits.clear()
        self._val_labels.clear()
        auroc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else 0.5
        self.log("val_auroc", auroc, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_history.append({"epoch": int(self.current_epoch), "val_auroc": auroc})

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.hparams.max_epochs))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: 0.5 * (1.0 + math.cos(math.pi * min(e, total) / total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def augment_bags(stamps, positions, *, generator=None):
    """Each field's bag rotated by a random multiple of 90° and mirrored at random, stamps and position scalars
    alike, as if the whole field had been: returns new tensors (``stamps`` (B, K, C, S, S), ``positions``
    (B, K, 3)); the inputs are not modified.

    ``torch.rot90`` by one step over (y, x) takes a point (x, y) about the stamp's centre to (y, -x), φ to
    φ - 90° (cos, sin -> sin, -cos); the mirror along x takes φ to 180° - φ (cos -> -cos). Padding rows stay
    zeros. Stamps of even size rotate about the centre of the array, half a pixel from the stamp's centre pixel.
    """
    b = stamps.shape[0]
    flips = torch.randint(0, 2, (b,), generator=generator).bool()
    turns = torch.randint(0, 4, (b,), generator=generator)
    out_s, out_p = stamps.clone(), positions.clone()
    flips, turns = flips.to(stamps.device), turns.to(stamps.device)
    out_s[flips] = torch.flip(out_s[flips], dims=(-1,))
    out_p[flips, :, 1] = -out_p[flips, :, 1]
    for k in (1, 2, 3):
        sel = turns == k
        if sel.any():
            out_s[sel] = torch.rot90(out_s[sel], k, dims=(-2, -1))
            c, s = out_p[sel, :, 1], out_p[sel, :, 2]
            for _ in range(k):
                c, s = s, -c
            out_p[sel, :, 1], out_p[sel, :, 2] = c, s
    return out_s, out_p


class _BagDataset:
    """Fields ``rows`` of a :class:`BagSet` with labels; items are field rows (``collate_bags`` pads them)."""

    def __init__(self, bags: BagSet, rows: np.ndarray, labels: np.ndarray):
        self.bags, self.rows, self.labels = bags, np.asarray(rows), np.asarray(labels, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return int(self.rows[i]), float(self.labels[i])

    @property
    def n_instances(self) -> int:
        return int(self.bags.counts[self.rows].sum())


class collate_bags:  # noqa: N801 - used as a function: collate_bags(bags)(items)
    """A DataLoader ``collate_fn`` for items ``(row, label)``: the rows' bags padded to the batch's largest,
    as tensors ``stamps``, ``positions``, ``mask``, ``label``, ``row`` (a class, so loader workers can pickle it)."""

    def __init__(self, bags: BagSet):
        self.bags = bags

    def __call__(self, items):
        rows = [r for r, _ in items]
        arrays = self.bags.padded(rows)
        return {"stamps": torch.from_numpy(arrays["stamps"]), "positions": torch.from_numpy(arrays["positions"]),
                "mask": torch.from_numpy(arrays["mask"]),
                "label": torch.tensor([y for _, y in items], dtype=torch.float32),
                "row": torch.tensor(rows, dtype=torch.int64)}


# ---------------------------------------------------------------------------------------------------------------
# training and scoring


@dataclass
class MILSettings:
    """What :func:`train_mil` trains (the bag cache fixes ``stamp_px`` and ``max_instances``)."""

    backbone: str = "regnetx_002"  # the fastest of ml.backbones training on 32 px stamps on a CPU under "auto"
    epochs: int = 8
    batch_size: int = 16  # fields per batch
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    patience: int = 4  # epochs without a better val AUROC before stopping
    augment: bool = True
    embed_dim: int = 128
    attention_dim: int = 64
    dropout: float = 0.0
    precision: str = "auto"  # "auto" | "bf16-mixed" | "32-true" (ml.precision)
    accelerator: str = "auto"
    max_minutes: float = 0.0  # wall-clock budget (Lightning max_time), 0 for none
    num_workers: int = 0
    threads: int = 0  # torch threads; 0 = one per core of this process's CPU affinity (ml.precision.available_cores)
    progress: bool = True
    # labeled lenses of each PU model (train_pu_mil, model "pu_b_<n>"); [] trains none
    pu_labeled: list[int] = field(default_factory=list)
    # the field-view model (score rows "field_view"), trained by train_mil.run when the bag cache has overviews:
    # the same network and loop on one instance per field, the whole field at low resolution (field_overview),
    # with a backbone that keeps full resolution in its first stage; patience = its epochs (no early stop)
    field_view: bool = True
    field_view_backbone: str = "compact_cnn"
    field_view_epochs: int = 30
    field_view_batch_size: int = 32

    def field_view_settings(self) -> "MILSettings":
        """These settings with the field view's backbone, epochs and batch size, and no PU models."""
        from dataclasses import replace

        return replace(self, backbone=self.field_view_backbone, epochs=self.field_view_epochs,
                       batch_size=self.field_view_batch_size, patience=self.field_view_epochs, pu_labeled=[])

    def __post_init__(self):
        from .backbones import BACKBONES
        from .precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {list(PRECISIONS)}")
        for name in ("backbone", "field_view_backbone"):
            if getattr(self, name) not in BACKBONES:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {sorted(BACKBONES)}")
        for name in ("epochs", "batch_size", "patience", "embed_dim", "attention_dim", "field_view_epochs",
                     "field_view_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.pu_labeled = list(self.pu_labeled)
        bad = [n for n in self.pu_labeled if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2]
        if bad or len(set(self.pu_labeled)) < len(self.pu_labeled):
            raise ValueError(f"pu_labeled must hold distinct integers >= 2 (1 labeled lens to fit g, 1 held out for "
                             f"c), got {self.pu_labeled}")


def _split_rows(table: pd.DataFrame, bags: BagSet, split: str, val_role: str | None = None,
                label_column: str = "label"):
    sel = table["split"] == split
    if val_role is not None:
        sel &= table["val_role"] == val_role
    part = table[sel]
    return bags.index_of(list(part["objid"])), part[label_column].to_numpy(dtype=np.float32)


def train_mil(settings: MILSettings, *, bags: BagSet | str | Path, table: pd.DataFrame,
              checkpoint_path: str | Path, label_column: str = "label", model_name: str = "track_b",
              report=None) -> dict:
    """Fit :class:`MILClassifier` on ``table``'s ``train`` rows; the best epoch by AUROC on its ``val``/``stop``
    rows is saved to ``checkpoint_path``. Returns a summary (``best_val_auroc``, ``epochs_run``,
    ``train_instances_per_s`` over the training steps, ``train_fields_per_s``, ``checkpoint``, ``device``,
    ``precision``, ...).

    ``table`` has ``objid``, ``split``, ``val_role`` (the features table) and the 0/1 target ``label_column``
    (train and validation alike: :func:`train_pu_mil` passes its PU labels); every train and val row needs a bag
    in ``bags``. A previous file at ``checkpoint_path`` is replaced. ``model_name`` is the summary's ``model``.
    ``report`` (a callable) receives ``"<model_name>: "`` and :func:`.progress.epoch_line` after every epoch.
    """
    import time

    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from .precision import available_cores, fit_in_run_folder, resolve_precision
    from .progress import EpochReport

    bags = read_bag_cache(bags) if not isinstance(bags, BagSet) else bags
    missing = [c for c in ("objid", label_column, "split", "val_role") if c not in table.columns]
    if missing:
        raise ValueError(f"split table lacks columns {missing}")
    train_rows, train_y = _split_rows(table, bags, "train", label_column=label_column)
    val_rows, val_y = _split_rows(table, bags, "val", "stop", label_column=label_column)
    for name, y in (("train", train_y), ("val stop", val_y)):
        if len(np.unique(y)) < 2:
            raise ValueError(f"the {name} rows need lenses and non-lenses, got labels {sorted(set(y.tolist()))} in "
                             f"{len(y)} rows")
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.suffix != ".ckpt":
        raise ValueError(f"checkpoint_path {checkpoint_path} must end in .ckpt (Lightning's suffix)")
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_path.unlink(missing_ok=True)
    threads = settings.threads or available_cores()
    torch.set_num_threads(threads)
    L.seed_everything(settings.seed, workers=True)
    train_ds, val_ds = _BagDataset(bags, train_rows, train_y), _BagDataset(bags, val_rows, val_y)
    gen = torch.Generator().manual_seed(settings.seed)
    collate = collate_bags(bags)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=settings.batch_size, shuffle=True, generator=gen,
                                               collate_fn=collate, num_workers=settings.num_workers)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=settings.batch_size, shuffle=False,
                                             collate_fn=collate, num_workers=settings.num_workers)
    model = MILClassifier(
        backbone=settings.backbone, in_chans=bags.in_chans, stamp_px=bags.stamp_px, embed_dim=settings.embed_dim,
        attention_dim=settings.attention_dim, dropout=settings.dropout, lr=settings.lr,
        weight_decay=settings.weight_decay, max_epochs=settings.epochs, augment=settings.augment)
    gpu = torch.cuda.is_available() and settings.accelerator in ("auto", "gpu", "cuda")
    precision = resolve_precision(settings.precision, gpu=gpu)
    best = ModelCheckpoint(dirpath=checkpoint_path.parent, filename=checkpoint_path.stem, monitor="val_auroc",
                           mode="max", save_top_k=1, enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=settings.epochs, accelerator="gpu" if gpu else "cpu", devices=1, precision=precision,
        max_time={"seconds": settings.max_minutes * 60} if settings.max_minutes > 0 else None,
        deterministic=not gpu, num_sanity_val_steps=0, logger=False, enable_progress_bar=settings.progress,
        enable_model_summary=False,
        callbacks=[best, EarlyStopping(monitor="val_auroc", mode="max", patience=settings.patience),
                   *([EpochReport(report, len(train_ds), best, label=f"{model_name}: ", unit="fields")]
                     if report else [])])
    t0 = time.perf_counter()
    fit_in_run_folder(trainer, model, train_loader, val_loader)
    seconds = time.perf_counter() - t0
    step_s = model.train_step_seconds
    summary = {
        "model": model_name, "checkpoint": str(best.best_model_path),
        "best_val_auroc": float(best.best_model_score) if best.best_model_score is not None else None,
        "epochs_run": int(trainer.current_epoch), "val_auroc_by_epoch": model.val_history,
        "device": "cuda" if gpu else "cpu", "precision": precision, "threads": threads,
        "n_train": len(train_ds), "n_val_stop": len(val_ds), "n_train_instances": train_ds.n_instances,
        "train_instances_per_s": model.train_instances / step_s if step_s > 0 else 0.0,
        "train_instances_per_s_by_epoch": model.instances_per_s_by_epoch,
        "train_fields_per_s": len(train_ds) * int(trainer.current_epoch) / seconds if seconds > 0 else 0.0,
        "seconds": seconds, "stamp_px": bags.stamp_px, "max_instances": int(bags.meta.get("max_instances", 0)),
        "settings": asdict(settings),
    }
    return summary


def pu_model_name(n_labeled: int) -> str:
    """The score rows' ``model`` of the PU model trained on ``n_labeled`` labeled lenses (Track A's are ``pu_<n>``)."""
    return f"pu_b_{int(n_labeled)}"


def train_pu_mil(settings: MILSettings, *, bags: BagSet | str | Path, table: pd.DataFrame, n_labeled: int,
                 checkpoint_path: str | Path, holdout_fraction: float = 0.2, report=None):
    """Elkan–Noto PU learning with Track B's network as g = P(s=1 | bag): returns ``(PUModel, summary)``.

    The pieces are :mod:`lens_assets.science.clusters.pu`'s, as Track A's ``pu_<n>``
    uses them, with ``settings.seed`` as their seed: :func:`~.pu.simulate_pu_labels`
    labels ``n_labeled`` of the ``train`` split's lenses (s=1), the other fields
    are unlabeled (s=0); :func:`~.pu.fit_pu` holds out ``holdout_fraction`` of the
    labeled ones, trains g on the rest with ``fit_fn`` = :func:`train_mil` (the
    same loop, ``settings``, augmentation and checkpointing as ``track_b``) on s,
    and estimates c on the held-out ones. The returned model's ``g`` takes a
    frame with ``objid`` (rows with bags) and gives ``sigmoid`` of the network's
    logit; its ``prob_from_g`` gives P(lens).

    Early stopping and the best checkpoint use PU labels on the val/``stop`` rows
    too (no true labels there either): :func:`~.pu.simulate_pu_labels` labels
    ``round(n_labeled × stop lenses / train lenses)`` of their lenses (at least
    1: the same label frequency), the rest unlabeled, and the monitored AUROC is
    labeled vs unlabeled, which under "selected completely at random" is an
    increasing linear function of the true AUROC, so it picks the same epoch in
    expectation. ``summary``: ``model`` (:func:`pu_model_name`), ``n_labeled``,
    ``c``, ``c_fit``, ``n_labeled_fit``, ``n_labeled_holdout``, ``n_unlabeled``,
    ``n_val_stop_labeled``, ``best_val_pu_auroc``, ``epochs_run``, ``checkpoint``,
    ``seconds``.
    """
    from scipy.special import expit

    from lens_assets.science.clusters.pu import fit_pu, simulate_pu_labels

    bags = read_bag_cache(bags) if not isinstance(bags, BagSet) else bags
    missing = [c for c in ("objid", "label", "split", "val_role") if c not in table.columns]
    if missing:
        raise ValueError(f"split table lacks columns {missing}")
    train = table[table["split"] == "train"].reset_index(drop=True)
    stop = table[(table["split"] == "val") & (table["val_role"] == "stop")].reset_index(drop=True)
    y_train, y_stop = train["label"].to_numpy(int), stop["label"].to_numpy(int)
    n_pos, n_stop_pos = int(y_train.sum()), int(y_stop.sum())
    if n_labeled > n_pos:
        raise ValueError(f"n_labeled={n_labeled} exceeds the {n_pos} lenses of the train split")
    if n_stop_pos == 0:
        raise ValueError("the val stop rows hold no lens, so none can be labeled for early stopping")
    s_train = simulate_pu_labels(y_train, int(n_labeled), seed=settings.seed)
    n_stop = min(n_stop_pos, max(1, int(round(n_labeled * n_stop_pos / n_pos))))
    s_stop = simulate_pu_labels(y_stop, n_stop, seed=settings.seed)
    name = pu_model_name(n_labeled)
    runs: list[dict] = []

    def fit_fn(X: pd.DataFrame, s: np.ndarray):
        part = pd.concat([X.assign(pu_label=s), stop.assign(pu_label=s_stop)], ignore_index=True)
        run = train_mil(settings, bags=bags, table=part, checkpoint_path=checkpoint_path, label_column="pu_label",
                        model_name=name, report=report)
        runs.append(run)
        model = load_mil(run["checkpoint"], device=run["device"])

        def g(rows: pd.DataFrame) -> np.ndarray:
            logits, _ = score_mil(model, bags, rows=bags.index_of(list(rows["objid"])), device=run["device"],
                                  precision=settings.precision)
            return expit(logits)

        return g

    pu = fit_pu(train, s_train, fit_fn=fit_fn, holdout_fraction=holdout_fraction, seed=settings.seed)
    run = runs[-1]
    summary = {"model": name, "n_labeled": int(n_labeled), "c": pu.c, "c_fit": pu.c_fit,
               "n_labeled_fit": pu.n_labeled_fit, "n_labeled_holdout": pu.n_labeled_holdout,
               "n_unlabeled": pu.n_unlabeled, "n_val_stop_labeled": int(n_stop),
               "best_val_pu_auroc": run["best_val_auroc"], "epochs_run": run["epochs_run"],
               "checkpoint": run["checkpoint"], "device": run["device"], "seconds": run["seconds"]}
    return pu, summary


def load_mil(checkpoint: str | Path, *, device: str = "cpu"):
    """A :class:`MILClassifier` in eval mode from a Lightning checkpoint (read with ``weights_only=True``)."""

    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # not a torch file or a truncated one
        raise ValueError(f"{checkpoint}: not a MIL checkpoint (torch cannot read it: {type(err).__name__})") from err
    if not (isinstance(ckpt, dict) and "hyper_parameters" in ckpt and "state_dict" in ckpt):
        raise ValueError(f"{checkpoint}: not a MIL checkpoint (no hyper_parameters/state_dict)")
    model = MILClassifier(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval().to(device)


def score_mil(checkpoint, bags: BagSet | str | Path, *, rows: Sequence[int] | None = None, batch_size: int = 32,
              device: str = "cpu", precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """``(logits (N,), attention (N, max_instances))`` of the bags ``rows`` (default all) from a checkpoint path
    or a loaded model; attention is 0 beyond each field's instances. The forward runs under
    :func:`.precision.bf16_autocast` (bf16 on a GPU or a bf16 CPU under "auto")."""
    from .precision import bf16_autocast

    bags = read_bag_cache(bags) if not isinstance(bags, BagSet) else bags
    model = load_mil(checkpoint, device=device) if isinstance(checkpoint, (str, Path)) else checkpoint.eval()
    rows = np.arange(len(bags)) if rows is None else np.asarray(rows, dtype=np.int64)
    k_max = int(bags.meta.get("max_instances", 0)) or int(bags.counts.max())
    logits = np.zeros(len(rows), dtype=np.float64)
    attention = np.zeros((len(rows), k_max), dtype=np.float64)
    with torch.inference_mode(), bf16_autocast(device, precision):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            a = bags.padded(chunk)
            z, w = model(torch.from_numpy(a["stamps"]).to(device), torch.from_numpy(a["positions"]).to(device),
                         torch.from_numpy(a["mask"]).to(device))
            logits[start:start + len(chunk)] = z.float().cpu().numpy()
            attention[start:start + len(chunk), :w.shape[1]] = w.float().cpu().numpy()
    return logits, attention


# ---------------------------------------------------------------------------------------------------------------
# figure


def attention_gallery(images: Sequence[np.ndarray], instances: Sequence[pd.DataFrame], titles: Sequence[str], *,
                      bands: Sequence[str], path: str | Path, cols: int = 4, size_in: float = 3.2) -> Path:
    """Fields (colour composites) with a circle on each instance, its size, width and colour by its attention weight
    relative to the field's largest, and the weight written above it.

    ``instances[i]`` has ``x_px``, ``y_px``, ``attention`` for field ``i`` (weights of one field sum to 1).
    matplotlib is imported here; the PNG is written to ``path``.
    """
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    from lens_assets.science.plots import color_composite

    n = len(images)
    if n == 0:
        raise ValueError("attention_gallery needs at least one field")
    cols = min(cols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(size_in * cols, size_in * rows + 0.3))
    cmap = matplotlib.colormaps["plasma"]
    for i, (img, inst, title) in enumerate(zip(images, instances, titles)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(color_composite(img, bands), origin="lower", interpolation="nearest")
        side = img.shape[-1]
        top = float(inst["attention"].max()) if len(inst) else 1.0
        for r in inst.itertuples(index=False):
            wgt = float(r.attention)
            rel = wgt / top if top > 0 else 0.0  # 1 for the field's most attended instance
            ax.add_patch(Circle((r.x_px, r.y_px), radius=side * (0.015 + 0.045 * rel), fill=False,
                                lw=0.8 + 2.2 * rel, color=cmap(rel)))
            ax.text(r.x_px, r.y_px + side * (0.02 + 0.045 * rel), f"{wgt:.2f}", color=cmap(rel), fontsize=6,
                    ha="center", va="bottom")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
