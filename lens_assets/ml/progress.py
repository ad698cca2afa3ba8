"""Training progress as log lines, for jobs whose log is the run's event log (Dagster Pipes), where a progress bar
cannot show: :class:`EpochReport` passes :func:`epoch_line` to a callable after every epoch."""

from __future__ import annotations

import time
from typing import Callable

import lightning as L

__all__ = ["epoch_line", "EpochReport"]


def epoch_line(epoch: int, epochs: int, metrics: dict, best: float | None, epoch_seconds: list[float],
               n_train: int, unit: str = "img") -> str:
    """One line of training progress after ``epoch`` (1-based) of ``epochs``: the epoch's training loss and
    validation AUROC (``metrics``; a missing figure reads "n/a"), the best validation AUROC so far, the epoch's wall
    time (training and validation) and ``unit``s per second over the ``n_train`` training rows, and the time the
    remaining epochs take at this start's median epoch time (the upper median; early stopping may end the run
    before)."""
    def figure(value):
        return "n/a" if value is None else f"{float(value):.3f}"

    last = epoch_seconds[-1]
    per_epoch = sorted(epoch_seconds)[len(epoch_seconds) // 2]
    left_min = max(0, epochs - epoch) * per_epoch / 60
    return (f"epoch {epoch}/{epochs}: train loss {figure(metrics.get('train_loss'))}, val AUROC "
            f"{figure(metrics.get('val_auroc'))} (best {figure(best)}), {last:.0f} s at "
            f"{n_train / last if last > 0 else 0:.0f} {unit}/s, {left_min:.1f} min left at most")


class EpochReport(L.Callback):
    """Calls ``fn`` with ``label`` + :func:`epoch_line` after each epoch, once validation and the monitoring
    callbacks have run; ``checkpoint`` is the run's best-by-``val_auroc`` ``ModelCheckpoint``."""

    def __init__(self, fn: Callable[[str], None], n_train: int, checkpoint, *, label: str = "", unit: str = "img"):
        self.fn, self.n_train, self.checkpoint, self.label, self.unit = fn, n_train, checkpoint, label, unit
        self.seconds: list[float] = []
        self.t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self.t0)
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k in ("train_loss", "val_auroc")}
        self.fn(self.label + epoch_line(trainer.current_epoch + 1, trainer.max_epochs, metrics,
                                        self.checkpoint.best_model_score, self.seconds, self.n_train, self.unit))
