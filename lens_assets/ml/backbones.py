"""Backbone registry over timm: small-cutout settings, ``in_chans`` = the survey's bands.

``pretrained=False`` by default (no downloads at run time); ``weights_path``
loads a local state dict (``torch.load(..., weights_only=True)``), a Lightning
checkpoint of a member (``state_dict`` keys prefixed ``net.``) or a safetensors
file, adapting the first convolution to the number of bands (timm's
``adapt_input_conv``: 3-channel ImageNet-style weights into a 5-band model) and
leaving out a classifier of another number of classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BackboneSpec", "BACKBONES", "create_backbone", "smallest_backbone", "count_parameters", "load_weights",
           "FAMILIES", "first_conv", "widen_first_conv"]

FAMILIES = ("cnn", "hybrid", "vit")  # hybrid: convolutional stem and stages with attention or token mixers


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    family: str  # one of FAMILIES
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (given the cutout size)
    needs_img_size: bool = False
    channels_last: bool = True  # train and score in channels_last (oneDNN's preferred layout for convolutions)


def _spec(name, family, timm_name=None, channels_last=True, **kwargs):
    return BackboneSpec(name, timm_name or name, family, kwargs, channels_last=channels_last)


BACKBONES = {
    "resnet10t": _spec("resnet10t", "cnn"),
    "resnet18": _spec("resnet18", "cnn"),
    "convnext_atto": _spec("convnext_atto", "cnn"),
    "convnext_femto": _spec("convnext_femto", "cnn"),
    "efficientnet_b0": _spec("efficientnet_b0", "cnn"),
    "mobilenetv3_small_100": _spec("mobilenetv3_small_100", "cnn"),
    "regnetx_002": _spec("regnetx_002", "cnn"),
    "regnetx_004": _spec("regnetx_004", "cnn"),  # twice regnetx_002's width: the capacity step within its family
    # full resolution in its first stage (no strided stem): for low-resolution inputs such as cluster_track_b's
    # 40 px field overview at 1"/px, where a strided stem loses the arcs' few-pixel widths
    "compact_cnn": BackboneSpec("compact_cnn", "", "cnn"),
    # channels_last off: with torch 2.15 on the CPU its deterministic backward in channels_last corrupts the heap
    # (segfault or "corrupted size vs. prev_size", fp32 and bf16 alike); contiguous it trains fine
    "fastvit_t8": _spec("fastvit_t8", "hybrid", channels_last=False),
    "mobilevitv2_050": _spec("mobilevitv2_050", "hybrid"),
    "efficientvit_b0": _spec("efficientvit_b0", "hybrid"),
    # 8 px patches: a 64 px cutout is 8x8 tokens (16 px patches would leave 4x4). Kept so that earlier
    # ensembles still load; it is 3x slower than resnet10t on a CPU and no longer a default member
    "vit_tiny_p8": BackboneSpec("vit_tiny_p8", "vit_tiny_patch16_224", "vit", {"patch_size": 8}, needs_img_size=True,
                                channels_last=False),
}


def _compact_cnn_class():
    import torch.nn as nn

    class _CompactCNN(nn.Module):
        """Four stages of two 3x3 convolutions (BatchNorm, GELU), 2x2 max pooling between stages (stride 8 in
        all), global average pooling and a linear classifier (none when ``num_classes`` is 0: the pooled
        features). The timm attributes that ``load_weights`` and ``widen_first_conv`` read are set."""

        def __init__(self, *, in_chans: int, num_classes: int = 1, widths=(32, 64, 96, 128)):
            super().__init__()
            chans = (in_chans, *widths)
            self.stages = nn.ModuleList(nn.Sequential(
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]), nn.GELU(),
                nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                nn.GELU()) for i in range(len(widths)))
            self.pool = nn.MaxPool2d(2)
            self.num_features = widths[-1]
            self.fc = nn.Linear(widths[-1], num_classes) if num_classes else nn.Identity()
            self.pretrained_cfg = {"first_conv": "stages.0.0", "classifier": "fc"}

        def get_classifier(self):
            return self.fc

        def forward_features(self, x):
            for i, stage in enumerate(self.stages):
                x = stage(x if i == 0 else self.pool(x))
            return x

        def forward_head(self, x, pre_logits: bool = False):
            pooled = x.mean(dim=(2, 3))
            return pooled if pre_logits else self.fc(pooled)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    return _CompactCNN


def CompactCNN(**kwargs):  # noqa: N802 - a class made on first use, so importing this module needs no torch
    """A compact full-resolution CNN (see ``_compact_cnn_class``)."""
    return _compact_cnn_class()(**kwargs)


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; registered backbones are {sorted(BACKBONES)}") from None


def create_backbone(name: str, *, in_chans: int, img_size: int, num_classes: int = 1, pretrained: bool = False,
                    weights_path: str | Path | None = None):
    """A timm model for ``in_chans`` bands of ``img_size`` px cutouts; the error lists the registry."""
    import timm

    spec = get_spec(name)
    kwargs = dict(spec.kwargs)
    if spec.needs_img_size:
        kwargs["img_size"] = img_size
    if not spec.timm_name:  # a backbone of this module
        if pretrained:
            raise ValueError(f"backbone {name!r} has no pretrained weights; give weights_path instead")
        model = CompactCNN(in_chans=in_chans, num_classes=num_classes, **kwargs)
    else:
        model = timm.create_model(spec.timm_name, pretrained=pretrained, in_chans=in_chans, num_classes=num_classes,
                                  **kwargs)
    if weights_path:
        load_weights(model, weights_path)
    return model


def first_conv(model):
    """``model``'s first convolution, the module timm's ``pretrained_cfg['first_conv']`` names."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if not name:
        raise ValueError(f"{type(model).__name__} names no first convolution (timm pretrained_cfg['first_conv'])")
    if not isinstance(name, str):  # e.g. fastvit: parallel branches that all see the input
        raise ValueError(f"{type(model).__name__} has {len(name)} first convolutions in parallel ({', '.join(name)}): "
                         "widening or converting one of them alone would be wrong")
    return model.get_submodule(name)


def widen_first_conv(model, extra: int) -> None:
    """Give ``model``'s first convolution ``extra`` more input channels with zero weights, in place: the model's
    output is unchanged until training moves them (its weights for the existing channels are kept as they are)."""
    import torch

    conv = first_conv(model)
    w = conv.weight
    zeros = torch.zeros(w.shape[0], extra, *w.shape[2:], dtype=w.dtype, device=w.device)
    conv.weight = torch.nn.Parameter(torch.cat([w.detach(), zeros], dim=1))
    conv.in_channels += extra


def _read_state(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # not a torch file, or one that needs pickled code (refused: weights only)
        raise ValueError(f"{path}: torch cannot read it as weights ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    if any(k.startswith("net.") for k in state):  # a LensClassifier member: its backbone's weights
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    return state


def _adapt_first_conv(in_chans: int, weight):
    """The first convolution's weight for ``in_chans`` bands: timm's ``adapt_input_conv`` for 3-channel (RGB)
    weights; from any other band count, the mean over the source bands in every target band, scaled by
    source/target bands, so a flat input of the same value per band gives the same response."""
    if weight.shape[1] == 3:
        from timm.models import adapt_input_conv

        return adapt_input_conv(in_chans, weight)
    return weight.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (weight.shape[1] / in_chans)


def load_weights(model, path: str | Path) -> dict:
    """Load a local checkpoint into ``model``; returns what was adapted and left out.

    The first convolution's weight, where its input channels differ (a model
    with another number of bands), is adapted (``_adapt_first_conv``);
    a classifier of another shape is left at its initialization. Any other
    difference (another architecture) is a ``ValueError`` naming the file.
    """
    import torch

    path = Path(path)
    state = dict(_read_state(path))
    own = model.state_dict()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    head = {f"{n}." for n, m in model.named_modules() if classifier is not None and m is classifier}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv") if isinstance(cfg.get("first_conv"), str) else None
    adapted, dropped, wrong = [], [], []
    for k, v in list(state.items()):
        if k not in own or own[k].shape == v.shape:
            continue
        mine = own[k]
        if (v.ndim == 4 and mine.ndim == 4 and v.shape[0] == mine.shape[0] and v.shape[2:] == mine.shape[2:]
                and v.shape[1] != mine.shape[1] and (first is None or k == f"{first}.weight")):
            state[k] = _adapt_first_conv(mine.shape[1], v.to(torch.float32)).to(mine.dtype)
            adapted.append(k)
        elif any(k.startswith(h) for h in head):
            del state[k]
            dropped.append(k)
        else:
            wrong.append(f"{k} {tuple(v.shape)} vs {tuple(mine.shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False) if not wrong else ([], [])
    missing = [m for m in missing if not any(m.startswith(h) for h in head)]
    if wrong or unexpected or missing:
        raise ValueError(f"{path}: checkpoint does not fit the {type(model).__name__} model (another architecture?"
                         f"{' shapes ' + ', '.join(wrong[:3]) if wrong else ''}"
                         f"{'; missing ' + str(missing[:5]) if missing else ''}"
                         f"{'; unexpected ' + str(unexpected[:5]) if unexpected else ''})")
    return {"adapted": adapted, "left_out": dropped}


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def smallest_backbone(*, in_chans: int = 5, img_size: int = 64, timm_only: bool = False) -> str:
    """The registered backbone with the fewest parameters for this input (``timm_only``: among timm's models)."""
    sizes = {n: count_parameters(create_backbone(n, in_chans=in_chans, img_size=img_size)) for n in BACKBONES
             if BACKBONES[n].timm_name or not timm_only}
    return min(sizes, key=sizes.get)
