"""The lens classifier as plain Lightning: runs without Dagster (the asset launches it as a job).

Inputs are PSF-matched shards in nanomaggies. The network sees
``asinh(image / s)`` with one noise scale ``s`` per cutout (the median noise over
its bands), so colours are kept where the signal is faint and bright cores are
compressed, with no min-max scaling. Augmentations preserve photometry: 90°
rotations, flips, sub-pixel shifts (bilinear), and extra noise drawn from the
variance map; nothing alters colours. The loss is BCE weighted by
``label_confidence``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from .backbones import create_backbone

__all__ = ["LensClassifier", "scale_input", "augment"]


def scale_input(image: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``asinh(image / s)`` with ``s`` the cutout's median per-pixel noise over all bands."""
    s = torch.sqrt(variance.flatten(1).median(dim=1).values.clamp_min(1e-20))
    return torch.asinh(image / s[:, None, None, None])


def augment(image: torch.Tensor, variance: torch.Tensor, *, generator: torch.Generator | None = None,
            max_shift_px: float = 0.5, max_extra_noise: float = 0.5):
    """Photometry-preserving augmentation of a batch (same transform for every band of a cutout)."""
    b = image.shape[0]
    dev = image.device
    k = int(torch.randint(0, 4, (1,), generator=generator))
    image, variance = torch.rot90(image, k, dims=(2, 3)), torch.rot90(variance, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,), generator=generator)):
        image, variance = image.flip(3), variance.flip(3)
    h, w = image.shape[-2:]
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1).to(dev) * max_shift_px
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = shift[:, 0] * 2 / w
    theta[:, 1, 2] = shift[:, 1] * 2 / h
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    variance = F.grid_sample(variance, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    amp = (torch.rand(b, 1, 1, 1, generator=generator) * max_extra_noise).to(dev)
    noise = torch.randn(image.shape, generator=generator).to(dev)
    image = image + amp * noise * variance.clamp_min(0).sqrt()
    return image, variance * (1 + amp**2)


class LensClassifier(L.LightningModule):
    """A timm backbone with one logit: P(lens) = sigmoid(logit)."""

    def __init__(self, *, backbone: str = "resnet10t", in_chans: int = 5, img_size: int = 64, lr: float = 1e-3,
                 weight_decay: float = 0.05, max_epochs: int = 10, augment: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.net = create_backbone(backbone, in_chans=in_chans, img_size=img_size, num_classes=1)
        self._val_scores: list = []
        self._val_labels: list = []

    def forward(self, image: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        return self.net(scale_input(image, variance)).squeeze(1)

    def _loss(self, batch, logits):
        return F.binary_cross_entropy_with_logits(logits, batch["label"], weight=batch["label_confidence"])

    def training_step(self, batch, batch_idx):
        image, variance = batch["image"], batch["variance"]
        if self.hparams.augment:
            image, variance = augment(image, variance)
        loss = self._loss(batch, self(image, variance))
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(image))
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["image"], batch["variance"])
        self.log("val_loss", self._loss(batch, logits), prog_bar=True, batch_size=len(logits))
        self._val_scores.append(logits.detach().float().cpu())
        self._val_labels.append(batch["label"].detach().cpu())

    def on_validation_epoch_end(self):
        from sklearn.metrics import roc_auc_score

        if not self._val_scores:
            return
        s, y = torch.cat(self._val_scores).numpy(), torch.cat(self._val_labels).numpy()
        self._val_scores.clear()
        self._val_labels.clear()
        auroc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else 0.5
        self.log("val_auroc", auroc, prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        # cosine decay to 0 over this run's epochs. A LambdaLR keeps only its epoch in a checkpoint (not the
        # length, as CosineAnnealingLR does), so a run resumed with more epochs decays over the new length
        # instead of climbing back up the cosine after the first start's end
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_train_start(self):
        for config in self.trainer.lr_scheduler_configs:  # restored from a checkpoint when resuming
            self.apply_schedule(config.scheduler)

    @staticmethod
    def apply_schedule(sched) -> None:
        """Set the optimizer's learning rates to the schedule's at its current epoch: a resumed run restores the
        optimizer with the rate of its first start's schedule, which a longer run must not keep for an epoch."""
        for group, lr in zip(sched.optimizer.param_groups, [f(sched.last_epoch) * b for f, b in
                                                             zip(sched.lr_lambdas, sched.base_lrs)]):
            group["lr"] = lr

    def lr_factor(self, epoch: int) -> float:
        """Learning rate over its initial value after ``epoch`` epochs: 0.5 (1 + cos(pi epoch / max_epochs))."""
        import math

        total = max(1, self.hparams.max_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, total) / total))
