"""Training progress as log lines, for jobs whose log is the run's event log (Dagster Pipes), where a progress bar
cannot show: :class:`EpochReport` passes :func:`epoch_line` to a callable after every epoch."""

from __future__ import annotations

import math
import time
from typing import Callable

import lightning as L

__all__ = ["epoch_line", "EpochReport", "figure", "rate_text"]


def figure(value) -> str:
    """A figure for a log line: three decimals, or "n/a" where there is none (None or not finite)."""
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.3f}"


def rate_text(img_per_s: float, epochs_fitted: int) -> str:
    """How fast a run trained, for a summary line: "at N img/s", or that it fitted no epoch (an earlier run trained
    every epoch it could, so this one only reloaded the checkpoint)."""
    return f"at {img_per_s:.0f} img/s" if epochs_fitted else "(no epoch fitted in this run)"


def epoch_line(epoch: int, epochs: int, metrics: dict, best: float | None, epoch_seconds: list[float],
               n_train: int, unit: str = "img") -> str:
    """One line of training progress after ``epoch`` (1-based) of ``epochs``: the epoch's training loss and
    validation AUROC (``metrics``; a missing figure reads "n/a"), the best validation AUROC so far, the epoch's wall
    time (``epoch_seconds[-1]``: training, validation and what runs between epochs) and ``unit``s per second over
    the ``n_train`` rows it trained on, and about the time the remaining epochs take at the median of
    ``epoch_seconds`` (the upper median; early stopping may end the run before)."""
    last = epoch_seconds[-1]
    per_epoch = sorted(epoch_seconds)[len(epoch_seconds) // 2]
    left_min = max(0, epochs - epoch) * per_epoch / 60
    return (f"epoch {epoch}/{epochs}: train loss {figure(metrics.get('train_loss'))}, val AUROC "
            f"{figure(metrics.get('val_auroc'))} (best {figure(best)}), {last:.0f} s at "
            f"{n_train / last if last > 0 else 0:.0f} {unit}/s, about {left_min:.1f} min left")


class EpochReport(L.Callback):
    """Calls ``fn`` with ``label`` + :func:`epoch_line` at the end of each epoch, after validation. Lightning runs
    this hook before the monitoring callbacks' (``ModelCheckpoint``, ``EarlyStopping``), so the best so far is the
    larger of ``checkpoint``'s best ``val_auroc`` (earlier epochs, resumed ones included) and this epoch's. Each
    epoch's time runs from the previous epoch's report (from the start of training for the first), so checkpoint
    writes and what runs between epochs (a remote job's upload) count in it; its rate counts the rows of the
    batches it trained (a batch's ``label``), so an epoch a time limit cuts short is not credited with every row
    (``n_train`` where the batches carry no ``label``)."""

    def __init__(self, fn: Callable[[str], None], n_train: int, checkpoint, *, label: str = "", unit: str = "img"):
        self.fn, self.n_train, self.checkpoint, self.label, self.unit = fn, n_train, checkpoint, label, unit
        self.seconds: list[float] = []
        self.since = time.perf_counter()
        self.rows = 0

    def on_train_start(self, trainer, pl_module):
        self.since = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(batch, dict) and "label" in batch:
            self.rows += len(batch["label"])

    def on_train_epoch_end(self, trainer, pl_module):
        now = time.perf_counter()
        self.seconds.append(now - self.since)
        self.since = now
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k in ("train_loss", "val_auroc")}
        scores = [float(v) for v in (self.checkpoint.best_model_score, metrics.get("val_auroc")) if v is not None]
        self.fn(self.label + epoch_line(trainer.current_epoch + 1, trainer.max_epochs, metrics,
                                        max(scores) if scores else None, self.seconds, self.rows or self.n_train,
                                        self.unit))
        self.rows = 0
