"""Score cutouts with a trained ensemble: member logits, then a fused logit.

    members = load_members([".../resnet10t/best.ckpt", ".../vit_tiny_p8/best.ckpt"])
    logits = member_logits(members, ShardDataset(shard_dir, objids=...))  # (n, n_members)
    fused = Fusion.mean(len(members))(logits)

Checkpoints are Lightning checkpoints read with ``torch.load(weights_only=True)``
(plain tensors and hyperparameters, no pickled code). Every member sees the
same batch, read once; on a GPU and on a CPU with native bf16 the forward runs
in bf16 autocast (``precision="auto"``; ``"32-true"`` forces float32), CNN
members in ``channels_last``, under ``inference_mode``; logits come back as
float32. Memory is bounded by the batch size, whatever the number of rows.
FiLM members also take each row's ``fwhm_before`` and ``band_flags``.

Fusion is the mean of the members' logits, or a logistic regression of the
label on the member logits fit on the validation split (weights plus bias);
calibration (``science.calibration``) follows it either way.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["load_member", "load_members", "member_logits", "member_scores", "member_outputs", "Fusion", "fit_fusion",
           "FUSION_METHODS", "score_files", "ScoredFiles", "uncertainty_columns", "UNCERTAINTY_COLUMNS"]

FUSION_METHODS = ("mean", "val_weights")


def load_member(checkpoint: str | Path, *, device: str = "cpu"):
    """A ``LensClassifier`` in eval mode from a Lightning checkpoint (``weights_only=True``)."""
    import torch

    from .module import LensClassifier

    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except OSError:  # missing or unreadable: the OS error names the file
        raise
    except Exception as err:  # not a torch file or a truncated one (torch raises several kinds)
        raise ValueError(f"{checkpoint}: not a LensClassifier checkpoint (torch cannot read it: "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if not (isinstance(ckpt, dict) and "hyper_parameters" in ckpt and "state_dict" in ckpt):
        raise ValueError(f"{checkpoint}: not a LensClassifier checkpoint (no hyper_parameters/state_dict)")
    hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    model = LensClassifier(**hp)
    model.load_state_dict(state)
    return model.eval().to(device).use_channels_last()


def load_members(checkpoints, *, device: str = "cpu") -> list:
    return [load_member(c, device=device) for c in checkpoints]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def member_logits(members: list, dataset, *, batch_size: int = 256, num_workers: int = 0,
                  device: str | None = None, progress: bool = False, precision: str = "auto") -> np.ndarray:
    """Logits of every member for every row of ``dataset`` (a ``ShardDataset``), shape (n, n_members)."""
    return member_scores(members, dataset, batch_size=batch_size, num_workers=num_workers, device=device,
                         progress=progress, precision=precision)[0]


def member_scores(members: list, dataset, *, batch_size: int = 256, num_workers: int = 0,
                  device: str | None = None, progress: bool = False, precision: str = "auto",
                  mc_samples: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, n_members) of every member for every row of ``dataset`` and their MC-dropout standard
    deviations (n, n_members; NaN for a member without head dropout, or all NaN with ``mc_samples`` 0)."""
    import torch

    from .data import collate

    device = device or default_device()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate)
    out = np.empty((len(dataset), len(members)), np.float32)
    std = np.full((len(dataset), len(members)), np.nan, np.float32)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="score", unit="batch")
    start = 0
    generator = torch.Generator().manual_seed(0)  # the same MC draws on every run
    for batch in loader:
        n = len(batch["image"])
        out[start:start + n], std[start:start + n] = member_outputs(
            members, batch["image"].numpy(), batch["variance"].numpy(), device=device, precision=precision,
            fwhm_before=batch["fwhm_before"].numpy(), band_flags=batch["band_flags"].numpy(), mc_samples=mc_samples,
            generator=generator)
        start += n
    return out, std


UNCERTAINTY_COLUMNS = ("logit_std_ensemble", "logit_std_mc", "uncertainty")


def uncertainty_columns(logits, mc_std, fusion: "Fusion", probability=None) -> dict:
    """Per-row uncertainty of the fused logit and of the probability (docs/assets.md, ``candidate_scores``):

    * ``logit_std_ensemble``: the members' disagreement on the fused logit's scale: the standard deviation over
      members of ``m w_j z_j`` (``m`` members, fusion weight ``w_j``, logit ``z_j``; their mean is the fused
      logit less its bias, and with mean fusion they are the logits themselves); NaN with one member;
    * ``logit_std_mc``: the MC-dropout standard deviation of the fused logit, ``sqrt(sum_j w_j^2 s_j^2)`` over
      the members with head dropout (fusion weights ``w_j``; each member's draws are independent); NaN when
      no member has head dropout;
    * ``uncertainty``: how far the probability moves within that spread: with ``s`` the root of the sum of the
      two variances that exist and ``z`` the fused logit, ``(P(z + s) - P(z - s)) / 2``, ``P`` the calibrated
      probability (``probability``, a callable on fused logits; the logistic function without one). NaN when
      neither spread exists.

    Why not ``s`` itself: the logit's spread grows with its size (a confident score's features are large, and
    so is what dropping some of them moves), so in logit units the most confident candidates looked the most
    uncertain (``make demo``: AUROC 0.39 for finding the errors). The probability's spread is small where the
    probability is near 0 or 1 and largest at the decision boundary, where the errors are.
    """
    from scipy.special import expit

    z = np.asarray(logits, dtype=float)
    s = np.asarray(mc_std, dtype=float)
    n, m = z.shape
    w = np.asarray(fusion.weights, dtype=float)
    ens = (z * (m * w)).std(axis=1) if m > 1 else np.full(n, np.nan)
    w2 = w**2
    has = np.isfinite(s)
    mc = np.sqrt(np.where(has, s**2, 0.0) @ w2)
    mc = np.where(has.any(axis=1), mc, np.nan)
    both = np.stack([ens**2, mc**2])
    spread = np.where(np.isfinite(both).any(axis=0), np.sqrt(np.nansum(both, axis=0)), np.nan)
    fused = fusion(z) if len(z) else np.empty(0)
    prob = probability or expit
    ok = np.isfinite(spread)
    total = np.full(n, np.nan)
    if ok.any():
        up, down = prob(fused[ok] + spread[ok]), prob(fused[ok] - spread[ok])
        total[ok] = np.maximum((np.asarray(up, float) - np.asarray(down, float)) / 2, 0.0)  # rounding at a knot
    return {"logit_std_ensemble": ens, "logit_std_mc": mc, "uncertainty": total}


@dataclass
class Fusion:
    """fused logit = bias + sum_j weights[j] * logit_j."""

    method: str
    weights: list
    bias: float = 0.0

    @classmethod
    def mean(cls, n_members: int) -> "Fusion":
        return cls("mean", [1.0 / n_members] * n_members, 0.0)

    def __call__(self, logits) -> np.ndarray:
        z = np.asarray(logits, dtype=float)
        if z.ndim != 2 or z.shape[1] != len(self.weights):
            raise ValueError(f"expected logits of shape (n, {len(self.weights)}), got {z.shape}")
        return z @ np.asarray(self.weights, dtype=float) + self.bias

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fusion":
        return cls(d["method"], [float(w) for w in d["weights"]], float(d["bias"]))


def fit_fusion(logits, labels, *, method: str = "mean") -> Fusion:
    """``mean`` of member logits, or ``val_weights``: an L2-regularized logistic regression of the labels
    on the member logits (fit on the validation split)."""
    z = np.asarray(logits, dtype=float)
    if method == "mean":
        return Fusion.mean(z.shape[1])
    if method != "val_weights":
        raise ValueError(f"fusion method {method!r} is not one of {list(FUSION_METHODS)}")
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels, dtype=int)
    if len(np.unique(y)) != 2:
        raise ValueError("fitting fusion weights needs both lenses and non-lenses in the validation labels")
    lr = LogisticRegression(C=1.0).fit(z, y)
    return Fusion("val_weights", [float(w) for w in lr.coef_[0]], float(lr.intercept_[0]))


def logits_of_batch(members: list, image, variance, *, device: str, precision: str = "auto", fwhm_before=None,
                    band_flags=None) -> np.ndarray:
    """Member logits (n, n_members), float32, of one in-memory batch of nanomaggie images and variances.

    ``fwhm_before`` and ``band_flags`` (n, bands) are needed by FiLM members only.
    """
    return member_outputs(members, image, variance, device=device, precision=precision, fwhm_before=fwhm_before,
                          band_flags=band_flags)[0]


def member_outputs(members: list, image, variance, *, device: str, precision: str = "auto", fwhm_before=None,
                   band_flags=None, mc_samples: int = 0, generator=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`logits_of_batch` and, with ``mc_samples`` > 0, each member's MC-dropout standard deviation of its
    logit over that many draws of its head (``LensClassifier.mc_dropout_logits``; NaN for a member trained
    without head dropout). Both (n, n_members), float32; the logits are the deterministic ones either way."""
    import torch

    from .precision import bf16_autocast

    if mc_samples == 1:
        raise ValueError("mc_samples must be 0 (no MC dropout) or at least 2: one draw has no spread")

    x = torch.from_numpy(np.ascontiguousarray(image)).to(device, non_blocking=True)
    v = torch.from_numpy(np.ascontiguousarray(variance)).to(device, non_blocking=True)
    extra = ()
    if any(getattr(m, "needs_conditions", False) for m in members):
        if fwhm_before is None or band_flags is None:
            film = [m.hparams.backbone for m in members if getattr(m, "needs_conditions", False)]
            raise ValueError(f"FiLM member(s) {film} need fwhm_before and band_flags with the images")
        extra = (torch.from_numpy(np.ascontiguousarray(fwhm_before)).to(device),
                 torch.from_numpy(np.ascontiguousarray(band_flags)).to(device))
    logits, std = [], []
    with torch.inference_mode(), bf16_autocast(device, precision):
        for m in members:
            args = (x, v, *(extra if getattr(m, "needs_conditions", False) else ()))
            if mc_samples > 0 and getattr(m, "head_dropout", 0.0):
                det, draws = m.mc_dropout_logits(*args, n_samples=mc_samples, generator=generator)
                logits.append(det.float().cpu().numpy())
                std.append(draws.float().std(dim=0).cpu().numpy())
            else:
                logits.append(m(*args).float().cpu().numpy())
                std.append(np.full(len(x), np.nan, np.float32))
    return np.stack(logits, axis=1), np.stack(std, axis=1).astype(np.float32)


def read_and_match(args) -> tuple[list, dict]:
    """Worker: read and validate a batch of files (the catalog's ingest rules) and PSF-match the good ones.

    Returns the per-file outcomes in order, ``(catalog row, quarantine row)`` with
    one of them ``None``, and the shard arrays (``match_batch``) of the good files; an optional fourth task item,
    the keyword arguments of :func:`~lens_assets.science.galaxy_colour.arc_colour_table`, adds their colour table
    as ``"colour"``.
    """
    from lens_assets.science.ingest import read_one
    from lens_assets.science.shards import match_batch
    from lens_assets.science.surveys import get_survey

    paths, names, settings, *rest = args
    colour = rest[0] if rest else None
    survey = get_survey(settings.survey)
    outcomes, rows, cutouts = [], [], []
    for path, name in zip(paths, names):
        row, q, cutout = read_one(path, name, survey)
        outcomes.append((row, q))
        if cutout is not None:
            rows.append(row)
            cutouts.append(cutout)
    batch = match_batch(rows, cutouts, settings)
    if colour is not None:  # the galaxy-scale colour consistency of every matched cutout
        from lens_assets.science.galaxy_colour import arc_colour_table

        batch["colour"] = arc_colour_table(batch["image"], batch["variance"], **colour)
    return outcomes, batch


@contextmanager
def _threads_beside_workers(device: str, n_workers: int):
    """Torch threads on the CPU while ``n_workers`` processes read and match: the cores they leave, at least one.

    With every core busy in a worker, the default (one thread per core) oversubscribes the machine: on 2 cores
    end to end scoring of 4,096 files ran at 487/s with two threads and 535/s with one (bench_scoring).
    """
    import torch

    from .precision import available_cores

    if device != "cpu" or n_workers <= 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, available_cores() - n_workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ScoredFiles:
    """``scores``: one row per catalog row (``objid``, ``logit`` fused, ``logit_<j>`` per member, ``score``
    calibrated, the :data:`UNCERTAINTY_COLUMNS`, ``psf_matched_bands``, ``band_flag_bits``); ``catalog`` and
    ``quarantine`` as ``ingest_files`` makes them (``len(catalog) + len(quarantine) == n_files``)."""

    scores: "object"
    catalog: "object"
    quarantine: "object"
    n_files: int
    seconds: float


def score_files(paths, survey, *, root: str | Path, settings, members: list, fusion: "Fusion", calibrator,
                batch_size: int = 128, workers: int = 0, device: str | None = None,
                progress: bool = True, precision: str = "auto", mc_samples: int = 16,
                colour_consistency: bool = False) -> ScoredFiles:
    """Score FITS files end to end, reading each file once: validate it with the catalog's ingest rules
    (a bad file is quarantined with its reason, a repeated OBJID as ``duplicate_objid``), PSF-match and
    normalize it as the training shards were (``settings``, the shards' ``ShardSettings``), run every
    member, fuse, calibrate, and give each row the uncertainty columns of :func:`uncertainty_columns`
    (``mc_samples`` head draws per member with head dropout).

    ``colour_consistency`` adds the columns of :func:`~lens_assets.science.galaxy_colour.arc_colour_table`
    (colour consistency of the residual structure about each cutout's centre, computed by the workers on the
    matched cutouts; tens of cutouts/s per core, ``bench_galaxy_colour.py``).

    Files are read and matched by ``workers`` processes in batches of ``batch_size``
    while this process runs the models; at most a few batches are in flight, so
    memory does not grow with the number of files.
    """
    import time

    import pandas as pd

    from lens_assets.science.ingest import FirstObjid, catalog_frame, quarantine_frame, relative_names
    from lens_assets.science.parallel import bounded_imap, resolve_workers

    device = device or default_device()
    t0 = time.perf_counter()
    paths, names = relative_names(paths, root)
    colour = None
    if colour_consistency:
        from lens_assets.science.galaxy_colour import survey_colour_kwargs

        colour = survey_colour_kwargs(survey, settings.target_fwhm_arcsec)
    tasks = [([str(p) for p in paths[i:i + batch_size]], names[i:i + batch_size], settings, colour)
             for i in range(0, len(paths), batch_size)]
    import astropy.io.fits  # noqa: F401  (one-worker path; pool workers: the forkserver preload)
    import photutils.psf_matching  # noqa: F401

    seen = FirstObjid(survey.name)
    rows, quarantined, logits, mc_std, matched, flags, colours = [], [], [], [], [], [], []
    import torch

    generator = torch.Generator().manual_seed(0)
    with _threads_beside_workers(device, min(resolve_workers(workers), len(tasks))):
        for outcomes, batch in bounded_imap(read_and_match, tasks, workers=workers, progress=progress, unit="file",
                                            desc=f"score {survey.name}", weights=[len(t[0]) for t in tasks]):
            keep, k = [], 0
            for row, q in outcomes:
                if row is None:
                    quarantined.append(q)
                    continue
                dup = seen.duplicate(row)
                if dup is None:
                    rows.append(row)
                    keep.append(k)
                else:
                    quarantined.append(dup)
                k += 1
            if not keep:
                continue
            keep = np.asarray(keep) if len(keep) < k else slice(None)
            z, s = member_outputs(members, batch["image"][keep], batch["variance"][keep], device=device,
                                  precision=precision, fwhm_before=batch["fwhm_before"][keep],
                                  band_flags=batch["band_flags"][keep], mc_samples=mc_samples, generator=generator)
            logits.append(z)
            mc_std.append(s)
            matched.append(batch["psf_matched"][keep].sum(axis=1))
            bits = batch["band_flags"][keep].astype(np.int64)
            flags.append(np.bitwise_or.reduce(bits, axis=1) if bits.shape[1] else np.zeros(len(bits), np.int64))
            if colour is not None:
                colours.append(batch["colour"].iloc[keep] if isinstance(keep, np.ndarray) else batch["colour"])
    z = np.concatenate(logits) if logits else np.empty((0, len(members)), np.float32)
    fused = fusion(z) if len(z) else np.empty(0)
    unscored = np.flatnonzero(~np.isfinite(fused))
    for i in unscored:  # one file the members cannot score is quarantined, never the drop's whole table lost
        r = rows[i]
        quarantined.append({"objid": r["objid"], "source_file": r["source_file"], "source_sha256": r["source_sha256"],
                            "reason": "not_scorable", "survey": survey.name,
                            "message": f"{r['source_file']}: the ensemble's logit is {float(fused[i])} (members "
                                       f"{[float(v) for v in z[i]]}): its matched pixels hold values the members "
                                       f"cannot score"})
    if len(unscored):
        kept = np.setdiff1d(np.arange(len(rows)), unscored)
        rows, z, fused = [rows[i] for i in kept], z[kept], fused[kept]
        mc_std = [np.concatenate(mc_std)[kept]]
        matched, flags = [np.concatenate(matched)[kept]], [np.concatenate(flags)[kept]]
        if colour is not None:
            colours = [pd.concat(colours, ignore_index=True).iloc[kept]]
    catalog = catalog_frame(rows, survey)
    scores = pd.DataFrame({"objid": catalog["objid"].to_numpy(), "logit": fused})
    for j in range(len(members)):
        scores[f"logit_{j}"] = z[:, j]
    scores["score"] = calibrator.predict(fused) if len(z) else np.empty(0)
    sd = np.concatenate(mc_std) if mc_std else np.empty((0, len(members)), np.float32)
    for name, values in uncertainty_columns(z, sd, fusion, calibrator.predict).items():
        scores[name] = values
    scores["psf_matched_bands"] = np.concatenate(matched) if matched else np.empty(0, np.int64)
    scores["band_flag_bits"] = np.concatenate(flags) if flags else np.empty(0, np.int64)
    if colour is not None:
        from lens_assets.science.galaxy_colour import COLOUR_COLUMNS, arc_colour_table

        n_bands = survey.n_bands
        table = (pd.concat(colours, ignore_index=True) if colours else
                 arc_colour_table(np.empty((0, n_bands, 1, 1)), np.empty((0, n_bands, 1, 1)), **colour))
        for name in COLOUR_COLUMNS:
            scores[name] = table[name].to_numpy()
    return ScoredFiles(scores=scores, catalog=catalog, quarantine=quarantine_frame(quarantined), n_files=len(paths),
                       seconds=time.perf_counter() - t0)
