"""Train one ensemble member from shards and splits: plain Lightning, resumable.

    python -m lens_assets.ml.train --shards data/shards/des --splits data/splits/des/dataset_splits.parquet \\
        --out runs/des/resnet10t --backbone resnet10t --epochs 10

Launched by Dagster Pipes (the ``lens_classifier`` asset) it reads its settings
from the Pipes extras, logs a line when it starts and after every epoch (``report``,
:func:`.progress.epoch_line`) and reports its summary as a custom message. A checkpoint
is written every epoch (``last.ckpt`` plus the best by validation AUROC, on the
validation split's ``stop`` half only: its ``calibrate`` half is the
calibrator's, see :func:`lens_assets.ml.data.training_datasets`); when ``out``
already holds ``last.ckpt`` training resumes from it, so a run killed
mid-training continues where it stopped. CSV logs go to
``out/logs/version_N`` (one per start, so a resumed run keeps the earlier log).
``out/run.json`` records a fingerprint of the shards, splits and settings; a
checkpoint left by a run with another fingerprint is discarded, not resumed, and
so is one whose ``run.json`` is missing or unreadable (its origin is unknown: a
warning names the file and the error). A discarded run's logs go with it, so the
new run's ``val_auroc_by_epoch`` holds only its own epochs.

On a GPU the batch size comes from a forward-only memory probe
(:mod:`lens_assets.ml.memory`, capped at ``max_batch_size``) before the trainer
starts; ``batch_size`` is the batch size on the CPU.

CPU first: ``precision="auto"`` trains in ``bf16-mixed`` on a GPU and on a CPU
with native bf16 (:func:`lens_assets.ml.precision.cpu_bf16_supported`), in
``32-true`` otherwise; CNNs train in ``channels_last``; torch uses one thread
per core of the process's CPU affinity. ``deterministic=True`` stays on the
CPU in either precision (the CPU bf16 kernels have no non-deterministic
variant Lightning or torch would refuse; runs repeat bit for bit).

Two-stage training: ``weights_path`` initializes the backbone from a local
file (a state dict, safetensors, or another member's Lightning checkpoint),
its first convolution adapted to the number of bands.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["TrainSettings", "train"]


@dataclass
class TrainSettings:
    backbone: str = "resnet10t"
    epochs: int = 10
    batch_size: int = 64  # on the CPU; on a GPU the memory probe chooses it
    max_batch_size: int = 1024  # cap of the GPU memory probe
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    num_workers: int = 0
    # memory (GB) for the decompressed training and stop-half rows after their first read; negative: auto (0.4 of
    # the memory available when training starts), 0: off. The same arrays either way; off with loader workers
    cache_gb: float = -1.0
    patience: int = 5
    augment: bool = True
    accelerator: str = "auto"
    progress: bool = True
    precision: str = "auto"  # "auto" | "bf16-mixed" | "32-true" (auto: bf16 on a GPU or a bf16 CPU)
    film: bool = False  # FiLM conditioning of the pooled features on the observing conditions
    colour_residual: bool = False  # one more input channel: the RingFinder band difference (module.colour_residual)
    radial_residual: bool = False  # one more channel per band: the band less its radial median (module.radial_residual)
    elliptical_residual: bool = False  # the same on ellipses of the deflector's shape (module.elliptical_residual)
    ema_epochs: float = 0.0  # validation and scoring use a moving average of the weights over this many epochs; 0: off
    head_dropout: float = 0.0  # dropout on the pooled features before the classifier; > 0 enables MC-dropout scoring
    upsample: int = 1  # the network input upsampled this many times (bilinear): more feature map for small arcs
    zoom_max: float = 1.0  # training cutouts magnified by a factor log-uniform in [1, zoom_max] (module.augment)
    float32_stem: bool = False  # the first convolution in float32 under bf16 autocast (module.float32_first_conv)
    arc_attention: bool = False  # a tangential self-attention branch about the centre (module.TangentialAttention)
    fresh_fraction: float = 0.0  # share of each training batch replaced by objects simulated on the fly (ml/fresh)
    fresh_family: str = "physical"  # the simulation family the fresh objects are drawn from
    fresh_renderer: str = "torch"  # "torch" (ml/torch_render, batched) or "lenstronomy" (simulate_one)
    theta_e_balance: float = 0.0  # sampling weight share(scene theta_E bin)^-alpha, both classes alike; 0: uniform
    physics_weight: float = 0.0  # weight of the gated physics-consistency loss (module.physics_consistency); 0: off
    physics_warmup_epochs: int = 2  # the physics weight rises linearly from 0 over these epochs
    weights_path: str = ""  # initial backbone weights (a local file), "" for a random initialization
    max_minutes: float = 0.0  # wall-clock budget (Lightning max_time, counted over resumed starts too), 0 for none

    def __post_init__(self):
        from .precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {list(PRECISIONS)}")


def residual_band_indices(survey: str, bands: list[str]) -> tuple[int, int]:
    """(blue, red) band indices of the colour residual: the survey's bluest band and its reference band (the
    reddest band when the reference is the bluest)."""
    from lens_assets.science.surveys import get_survey

    if len(bands) < 2:
        raise ValueError(f"colour_residual needs two bands; {survey} shards have {bands}")
    ref = get_survey(survey).reference_band
    red = next((i for i, b in enumerate(bands) if b.lower() == ref.lower()), len(bands) - 1)
    return 0, (red if red != 0 else len(bands) - 1)


def _matched_psf_fwhm_px(shard_dir: Path, survey: str) -> float:
    """The FWHM (px) of the PSF the shards were matched to (their manifest's target), 4 px without a manifest."""
    from lens_assets.science.shards import MANIFEST_FILE, read_manifest
    from lens_assets.science.surveys import get_survey

    if not (Path(shard_dir) / MANIFEST_FILE).exists():
        return 4.0
    return float(read_manifest(shard_dir)["settings"]["target_fwhm_arcsec"]) / get_survey(survey).pixel_scale_arcsec


AUTO_CACHE_SHARE = 0.4  # of the available memory, for cache_gb < 0


def cache_bytes(s: TrainSettings) -> int:
    """Bytes for decompressed rows (``ml.data.ShardDataset``): ``cache_gb``, or with a negative one
    :data:`AUTO_CACHE_SHARE` of the memory available now; 0 with loader workers (each would hold its own)."""
    if s.num_workers > 0 or s.cache_gb == 0:
        return 0
    if s.cache_gb > 0:
        return int(s.cache_gb * 1e9)
    from .data import available_memory_bytes

    return int(AUTO_CACHE_SHARE * available_memory_bytes())


def _loaders(shard_dir: Path, splits_path: Path, s: TrainSettings, batch_size: int):
    import torch

    from .data import collate, training_datasets

    data = training_datasets(shard_dir, splits_path, cache_bytes=cache_bytes(s))
    if s.fresh_fraction > 0:
        from lens_assets.science.shards import read_manifest

        from .fresh import FreshMix

        data["train"] = FreshMix(data["train"], family=s.fresh_family, fraction=s.fresh_fraction, seed=s.seed,
                                 shard_settings=read_manifest(shard_dir)["settings"], renderer=s.fresh_renderer)
    gen = torch.Generator().manual_seed(s.seed)
    order = {"shuffle": True}
    if not 0.0 <= s.theta_e_balance <= 1.0:
        raise ValueError(f"theta_e_balance must be in [0, 1], got {s.theta_e_balance}")
    if s.zoom_max > 1.0 and (s.film or s.physics_weight > 0):  # both take the matched PSF as the image's own
        raise ValueError(f"zoom_max {s.zoom_max} widens each cutout's PSF, which FiLM's conditions and the physics "
                         "term take as the matched PSF: train with zoom_max 1 or without film and physics_weight")
    if s.theta_e_balance > 0 and s.fresh_fraction > 0:
        # a fresh object replaces a row by (seed, epoch, row): a row drawn n times would bring the same fresh
        # object n times, and its weight would go to an object of any radius
        raise ValueError("theta_e_balance and fresh_fraction cannot be combined: set one of them to 0")
    if s.theta_e_balance > 0:  # rows drawn with replacement, as many per epoch as the split has
        from .data import balance_weights, row_truth

        weights = balance_weights(row_truth(shard_dir, data["train"].objid, "scene_theta_e"), s.theta_e_balance)
        order = {"sampler": torch.utils.data.WeightedRandomSampler(torch.as_tensor(weights), len(weights),
                                                                    replacement=True, generator=gen)}
    train = torch.utils.data.DataLoader(data["train"], batch_size=batch_size, generator=gen,
                                        num_workers=s.num_workers, collate_fn=collate, drop_last=False, **order)
    val = torch.utils.data.DataLoader(data["val"], batch_size=batch_size, shuffle=False,
                                      num_workers=s.num_workers, collate_fn=collate)
    return train, val, data["train"]


def train(shard_dir: str | Path, splits_path: str | Path, out_dir: str | Path, settings: TrainSettings, *,
          after_epoch: Callable[[], None] | None = None, report: Callable[[str], None] | None = None) -> dict:
    """Fit (or resume) one model; returns a summary with the best checkpoint and its validation AUROC.

    ``after_epoch`` is called at the start of every epoch after the first of this
    start, once the previous epoch's checkpoints are on disk (a job whose disk does
    not outlive it copies them to the store there, so a retry can resume).
    ``report`` receives one line when training starts (the member, its epochs and out dir, device, precision,
    threads, rows, batches; or that every epoch is already trained) and one after every epoch
    (:func:`.progress.epoch_line`): under Dagster Pipes they go to the run's event log, where a progress bar
    cannot.
    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lens_assets.science.fileio import write_json_atomic

    from .fresh import FreshEpoch
    from .module import LensClassifier
    from .precision import available_cores, fit_in_run_folder, resolve_precision
    from .progress import EpochReport

    class _AfterEpoch(L.Callback):
        """Calls ``fn`` when an epoch after this start's first begins: Lightning saves checkpoints after its
        other callbacks, so the previous epoch's are complete by then."""

        def __init__(self, fn):
            self.fn, self.first = fn, None

        def on_train_epoch_start(self, trainer, pl_module):
            if self.first is None:
                self.first = trainer.current_epoch
            else:
                self.fn()

    import resource
    import time

    shard_dir, splits_path, out_dir = Path(shard_dir), Path(splits_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = available_cores()
    torch.set_num_threads(threads)
    L.seed_everything(settings.seed, workers=True)
    train_loader, val_loader, train_ds = _loaders(shard_dir, splits_path, settings, settings.batch_size)
    layout = getattr(train_ds, "base", train_ds).layout()
    in_chans, img_size, shard_survey, shard_bands = (layout[k] for k in ("in_chans", "img_size", "survey", "bands"))
    residual = residual_band_indices(shard_survey, shard_bands) if settings.colour_residual else None
    model = LensClassifier(backbone=settings.backbone, in_chans=in_chans, img_size=img_size, lr=settings.lr,
                           weight_decay=settings.weight_decay, max_epochs=settings.epochs, augment=settings.augment,
                           film=settings.film, residual_bands=residual, radial_residual=settings.radial_residual,
                           head_dropout=settings.head_dropout, upsample=settings.upsample,
                           arc_attention=settings.arc_attention, physics_weight=settings.physics_weight,
                           physics_warmup_epochs=settings.physics_warmup_epochs,
                           psf_fwhm_px=_matched_psf_fwhm_px(shard_dir, shard_survey),
                           weights_path=settings.weights_path or None,
                           zoom_max=settings.zoom_max, float32_stem=settings.float32_stem,
                           elliptical_residual=settings.elliptical_residual, ema_epochs=settings.ema_epochs)
    gpu = torch.cuda.is_available() and settings.accelerator in ("auto", "gpu", "cuda")
    precision = resolve_precision(settings.precision, gpu=gpu)
    model.use_channels_last()
    channels_last = model.memory_format == torch.channels_last
    probe = None
    batch_size = settings.batch_size
    if gpu:  # forward-only memory probe on the device, then the loaders again with its batch size
        from .memory import probe_batch_size

        probe = probe_batch_size(model, (in_chans, img_size, img_size), device="cuda",
                                 max_batch=settings.max_batch_size,
                                 dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float32)
        batch_size = probe["batch_size"]
        train_loader, val_loader, train_ds = _loaders(shard_dir, splits_path, settings, batch_size)
    fingerprint = run_fingerprint(shard_dir, splits_path, settings)
    stale = _discard_stale_run(out_dir, fingerprint)  # before the logger picks its version folder
    write_json_atomic(out_dir / "run.json", {"fingerprint": fingerprint, "settings": asdict(settings)})
    checkpoint = ModelCheckpoint(dirpath=out_dir, filename="best", monitor="val_auroc", mode="max", save_top_k=1,
                                 every_n_epochs=1)
    # last.ckpt after every epoch, improved or not (ModelCheckpoint's own save_last only follows a saved best)
    latest = ModelCheckpoint(dirpath=out_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                             enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=settings.epochs, accelerator="gpu" if gpu else "cpu", devices=1,
        max_time={"seconds": settings.max_minutes * 60} if settings.max_minutes > 0 else None,
        precision=precision, deterministic=not gpu,
        callbacks=[checkpoint, latest, EarlyStopping(monitor="val_auroc", mode="max", patience=settings.patience),
                   *([_AfterEpoch(after_epoch)] if after_epoch else []),
                   *([EpochReport(report, len(train_ds), checkpoint)] if report else []),
                   *([FreshEpoch()] if settings.fresh_fraction > 0 else [])],
        logger=CSVLogger(out_dir, name="logs"), enable_progress_bar=settings.progress,  # a new version per (re)start
        log_every_n_steps=1, enable_model_summary=False)
    last = out_dir / "last.ckpt"
    resumed_after_epochs = None
    saved = torch.load(last, map_location="cpu", weights_only=True) if last.exists() else None
    if saved is not None:  # Lightning stores the 0-based epoch that had just finished
        resumed_after_epochs = int(saved["epoch"]) + 1
    start_epoch = resumed_after_epochs or 0
    if report:  # the run's one start line: what trains where, and how, or that nothing is left to fit
        head = f"training {settings.backbone} for {settings.epochs} epochs into {out_dir}"
        report(f"{head}: {start_epoch} epochs already trained, nothing to fit" if start_epoch >= settings.epochs
               else f"{head} on {'cuda' if gpu else 'cpu'}: {precision}, {threads} threads"
                    f"{', channels_last' if channels_last else ''}; {len(train_ds)} training rows in batches of "
                    f"{batch_size}; epochs {start_epoch + 1} to {settings.epochs}"
                    + (f" (resumed after {start_epoch})" if start_epoch else ""))
    t0 = time.perf_counter()
    if start_epoch >= settings.epochs:  # already trained this long: nothing to fit (Lightning refuses to)
        best_path, best_score = _best_in_checkpoint(saved)
        epochs_done, global_step = start_epoch, int(saved["global_step"])
    else:
        if hasattr(train_ds, "set_epoch"):  # a resumed run's loader workers copy the dataset before any epoch hook
            train_ds.set_epoch(start_epoch)
        fit_in_run_folder(trainer, model, train_loader, val_loader, ckpt_path=str(last) if last.exists() else None)
        best_path, best_score = checkpoint.best_model_path, checkpoint.best_model_score
        epochs_done, global_step = int(trainer.current_epoch), int(trainer.global_step)
    seconds = time.perf_counter() - t0
    epochs_now = max(0, epochs_done - start_epoch)
    summary = {
        "best_checkpoint": str(best_path), "last_checkpoint": str(last),
        "best_val_auroc": float(best_score) if best_score is not None else None,
        "epochs_run": epochs_done, "global_step": global_step,
        "resumed_after_epochs": resumed_after_epochs, "device": "cuda" if gpu else "cpu",
        "fingerprint": fingerprint, "restarted_stale_run": stale,
        "n_train": len(train_ds), "n_val_stop": len(val_loader.dataset), "settings": asdict(settings),
        "seconds": seconds, "batch_size": batch_size, "batch_size_probe": probe,
        "precision": precision, "threads": threads, "channels_last": channels_last, "film": settings.film,
        "residual_bands": [shard_bands[i] for i in residual] if residual else [],
        "radial_residual": settings.radial_residual,
        "elliptical_residual": settings.elliptical_residual,
        "ema_epochs": settings.ema_epochs,
        "head_dropout": settings.head_dropout,
        "upsample": settings.upsample,
        "zoom_max": settings.zoom_max,
        "float32_stem": settings.float32_stem,
        "arc_attention": settings.arc_attention,
        "fresh_fraction": settings.fresh_fraction,
        "theta_e_balance": settings.theta_e_balance,
        "physics_weight": settings.physics_weight,
        "physics_failures": int(model.physics_failures),
        "fresh_family": settings.fresh_family if settings.fresh_fraction > 0 else "",
        "n_fresh": int(getattr(train_ds, "n_fresh", 0)),  # drawn in this process (0 with loader workers)
        "weights_path": settings.weights_path,
        "train_img_per_s": len(train_ds) * epochs_now / seconds if seconds > 0 else 0.0,
        "epochs_fitted": epochs_now,  # by this start: 0 where an earlier run trained every epoch it could
        # rows kept decompressed in memory after their first read (cache_gb), train split and stop half
        "cached_rows": sum(getattr(getattr(d, "base", d), "cached_rows", 0) for d in (train_ds, val_loader.dataset)),
        "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if gpu
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "val_auroc_by_epoch": _val_auroc_by_epoch(out_dir / "logs"),
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


# settings that change what is trained (not how long, how fast or how verbosely): a run may be extended
# max_batch_size only caps the GPU batch size, which the memory probe picks from the free memory at each start
_FINGERPRINT_EXCLUDES = ("num_workers", "progress", "accelerator", "epochs", "patience", "max_batch_size",
                         "max_minutes", "cache_gb")


def run_fingerprint(shard_dir: Path, splits_path: Path, settings: TrainSettings) -> str:
    """sha256 of the shard manifest, the splits file and the settings: a run may only resume its own checkpoint."""
    import hashlib

    from lens_assets.science.fileio import update_from_file
    from lens_assets.science.shards import MANIFEST_FILE, read_manifest

    h = hashlib.sha256()
    manifest = Path(shard_dir) / MANIFEST_FILE
    if manifest.exists():  # the shards' data version (from content: a rebuild of the same data keeps it)
        h.update(read_manifest(shard_dir)["sha256"].encode())
    else:
        h.update(b"no manifest")
    update_from_file(h, splits_path)
    h.update(json.dumps({k: v for k, v in asdict(settings).items() if k not in _FINGERPRINT_EXCLUDES},
                        sort_keys=True).encode())
    return h.hexdigest()


def _previous_fingerprint(out_dir: Path) -> str | None:
    """The fingerprint in ``out_dir/run.json``; None when there is no run.json. A run.json that cannot be read
    or has no string ``fingerprint`` raises ``ValueError`` naming the file, the field and what was found."""
    path = out_dir / "run.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    value = doc.get("fingerprint") if isinstance(doc, dict) else None
    if not isinstance(value, str) or not value:
        shown = doc.get("fingerprint", "missing") if isinstance(doc, dict) else f"a {type(doc).__name__}"
        raise ValueError(f"{path}: fingerprint is {shown!r}; expected the run's sha256 hex string")
    return value


def _discard_stale_run(out_dir: Path, fingerprint: str) -> bool:
    """Remove the checkpoints and logs of a previous run that is not this one; True when one was removed.

    Stale: ``run.json`` names another fingerprint, or it is unreadable, or it is
    missing beside checkpoints or logs (a checkpoint of unknown origin is never
    resumed). The logs go too, so epochs of the old run do not show up in this one's.
    """
    import logging
    import shutil

    leftovers = sorted(out_dir.glob("*.ckpt")) + ([out_dir / "logs"] if (out_dir / "logs").exists() else [])
    try:
        previous = _previous_fingerprint(out_dir)
    except ValueError as err:
        logging.getLogger(__name__).warning(f"{err}; treating the previous run as stale: its checkpoints and logs "
                                            "are discarded and training starts from scratch")
        stale = True
    else:
        if previous is None and leftovers:
            logging.getLogger(__name__).warning(
                f"{out_dir / 'run.json'}: missing beside {', '.join(p.name for p in leftovers)}; checkpoints of "
                "unknown origin are discarded and training starts from scratch")
        stale = previous != fingerprint and (previous is not None or bool(leftovers))
    if stale:
        for old in leftovers:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    return stale


def _best_in_checkpoint(saved: dict) -> tuple:
    """(best checkpoint path, best validation AUROC) as the ModelCheckpoint callback saved them."""
    for key, state in saved.get("callbacks", {}).items():
        if str(key).startswith("ModelCheckpoint") and "'monitor': 'val_auroc'" in str(key) \
                and "best_model_path" in state:
            score = state.get("best_model_score")
            return state["best_model_path"], (float(score) if score is not None else None)
    return "", None


def _val_auroc_by_epoch(logs_dir: Path) -> list:
    """Validation AUROC per epoch over every (re)start's CSV log; a later start's value for an epoch wins."""
    import pandas as pd

    by_epoch: dict = {}
    versions = sorted(Path(logs_dir).glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for metrics_csv in versions:
        m = pd.read_csv(metrics_csv)
        if "val_auroc" not in m:
            continue
        m = m.dropna(subset=["val_auroc"])
        by_epoch.update({int(e): float(a) for e, a in zip(m["epoch"], m["val_auroc"])})
    return [{"epoch": e, "val_auroc": a} for e, a in sorted(by_epoch.items())]


def pipes_main(sync_factory: Callable[[dict], Any] | None = None) -> None:
    """Run under Dagster Pipes: settings arrive as extras, the summary goes back as a custom message.

    ``sync_factory(extras)``, for a job whose disk is not the orchestrator's, gives an
    object with ``pull_inputs() -> (shard_dir, splits_path, out_dir)`` (the out dir
    with any checkpoints to resume from) and ``push_outputs()`` (called after every
    epoch and at the end); without it the extras' paths are used as they are.
    """
    from dagster_pipes import open_dagster_pipes

    from .progress import figure, rate_text

    with open_dagster_pipes() as pipes:
        ex = pipes.extras
        settings = TrainSettings(**{**ex.get("settings", {}), "progress": False})
        sync = sync_factory(ex) if sync_factory else None
        shard_dir, splits_path, out_dir = (sync.pull_inputs() if sync else
                                           (ex["shard_dir"], ex["splits_path"], ex["out_dir"]))
        summary = train(shard_dir, splits_path, out_dir, settings, after_epoch=sync.push_outputs if sync else None,
                        report=pipes.log.info)
        if sync:
            sync.push_outputs()
        pipes.log.info(f"best val AUROC {figure(summary['best_val_auroc'])} "
                       f"{rate_text(summary['train_img_per_s'], summary['epochs_fitted'])} on {summary['device']}")
        pipes.report_custom_message(summary)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--out", required=True)
    for field, default in asdict(TrainSettings()).items():
        kind = type(default)
        if kind is bool:
            ap.add_argument(f"--{field.replace('_', '-')}", type=lambda v: v.lower() in ("1", "true", "yes"),
                            default=default)
        else:
            ap.add_argument(f"--{field.replace('_', '-')}", type=kind, default=default)
    args = vars(ap.parse_args(argv))
    settings = TrainSettings(**{k: args[k] for k in asdict(TrainSettings())})
    print(json.dumps(train(args["shards"], args["splits"], args["out"], settings), indent=2))


def launched_by_pipes() -> bool:
    import os

    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR

    return bool(os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR))


if __name__ == "__main__":
    pipes_main() if launched_by_pipes() else main()
