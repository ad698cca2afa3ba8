"""Backbone registry over timm: small-cutout settings, ``in_chans`` = the survey's bands.

``pretrained=False`` by default (no downloads at run time); ``weights_path``
loads a local state dict (``torch.load(..., weights_only=True)``) or a
safetensors file, adapting the first convolution to the number of bands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BackboneSpec", "BACKBONES", "create_backbone", "smallest_backbone", "count_parameters"]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    family: str  # 'cnn' | 'vit'
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (given the cutout size)
    needs_img_size: bool = False


BACKBONES = {
    "resnet10t": BackboneSpec("resnet10t", "resnet10t", "cnn"),
    "resnet18": BackboneSpec("resnet18", "resnet18", "cnn"),
    # 8 px patches: a 64 px cutout is 8x8 tokens (16 px patches would leave 4x4)
    "vit_tiny_p8": BackboneSpec("vit_tiny_p8", "vit_tiny_patch16_224", "vit", {"patch_size": 8}, needs_img_size=True),
}


def create_backbone(name: str, *, in_chans: int, img_size: int, num_classes: int = 1, pretrained: bool = False,
                    weights_path: str | Path | None = None):
    """A timm model for ``in_chans`` bands of ``img_size`` px cutouts; the error lists the registry."""
    import timm

    try:
        spec = BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; registered backbones are {sorted(BACKBONES)}") from None
    kwargs = dict(spec.kwargs)
    if spec.needs_img_size:
        kwargs["img_size"] = img_size
    model = timm.create_model(spec.timm_name, pretrained=pretrained, in_chans=in_chans, num_classes=num_classes,
                              **kwargs)
    if weights_path is not None:
        load_weights(model, weights_path)
    return model


def load_weights(model, path: str | Path) -> None:
    """Load a local checkpoint (state dict or safetensors) into ``model``; shapes must match."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith(("fc.", "head.", "classifier."))]:
        raise ValueError(f"{path}: checkpoint does not fit the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def smallest_backbone(*, in_chans: int = 5, img_size: int = 64) -> str:
    """The registered backbone with the fewest parameters for this input."""
    sizes = {n: count_parameters(create_backbone(n, in_chans=in_chans, img_size=img_size)) for n in BACKBONES}
    return min(sizes, key=sizes.get)
