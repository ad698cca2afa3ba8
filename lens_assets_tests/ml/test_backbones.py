import pytest
import torch

from lens_assets.ml.backbones import (BACKBONES, FAMILIES, count_parameters, create_backbone, load_weights,
                                      smallest_backbone)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_takes_the_survey_bands_and_cutout_size(name):
    model = create_backbone(name, in_chans=5, img_size=64)
    out = model(torch.randn(2, 5, 64, 64))
    assert out.shape == (2, 1)
    assert {s.family for s in BACKBONES.values()} == set(FAMILIES)


def test_vit_uses_8px_patches_on_small_cutouts():
    model = create_backbone("vit_tiny_p8", in_chans=4, img_size=48)
    assert model.patch_embed.patch_size == (8, 8) and model.patch_embed.num_patches == 36


def test_unknown_backbone_lists_the_registry():
    with pytest.raises(KeyError, match=r"unknown backbone 'vgg'; registered backbones are \[.*'resnet10t'"):
        create_backbone("vgg", in_chans=5, img_size=64)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_weights_load_and_mismatches_are_refused(tmp_path, fmt):
    src = create_backbone("resnet10t", in_chans=5, img_size=64)
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save(src.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = create_backbone("resnet10t", in_chans=5, img_size=64, weights_path=path)
    x = torch.randn(1, 5, 64, 64)
    src.eval(), dst.eval()
    assert torch.equal(src(x), dst(x))
    other = create_backbone("resnet18", in_chans=5, img_size=64)
    with pytest.raises((ValueError, RuntimeError)):
        load_weights(other, path)


def test_smallest_backbone_has_the_fewest_parameters():
    name = smallest_backbone(in_chans=5, img_size=64)
    sizes = {n: count_parameters(create_backbone(n, in_chans=5, img_size=64)) for n in BACKBONES}
    assert sizes[name] == min(sizes.values())
    timm_name = smallest_backbone(in_chans=5, img_size=64, timm_only=True)
    assert BACKBONES[timm_name].timm_name and sizes[timm_name] == min(v for n, v in sizes.items()
                                                                      if BACKBONES[n].timm_name)


def test_three_channel_weights_load_into_a_five_band_model_with_the_first_conv_adapted(tmp_path):
    from timm.models import adapt_input_conv

    rgb = create_backbone("resnet10t", in_chans=3, img_size=64, num_classes=1000)  # ImageNet-style
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    model = create_backbone("resnet10t", in_chans=5, img_size=64, weights_path=path)
    expected = adapt_input_conv(5, rgb.state_dict()["conv1.0.weight"])
    assert torch.equal(model.state_dict()["conv1.0.weight"], expected)
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], rgb.state_dict()["layer1.0.conv1.weight"])
    assert model.fc.out_features == 1  # the 1000-class head is left at its initialization


def test_a_lightning_checkpoint_of_a_member_loads_as_backbone_weights(tmp_path):
    from lens_assets.ml.module import LensClassifier

    member = LensClassifier(backbone="resnet10t", in_chans=5, img_size=64, film=True)
    path = tmp_path / "member.ckpt"
    torch.save({"state_dict": member.state_dict(), "hyper_parameters": dict(member.hparams), "epoch": 0}, path)
    model = create_backbone("resnet10t", in_chans=5, img_size=64, weights_path=path)
    for k, v in member.net.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_weights_of_another_architecture_are_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(create_backbone("resnet18", in_chans=5, img_size=64).state_dict(), path)
    with pytest.raises(ValueError, match=rf"{path}: checkpoint does not fit the ResNet model"):
        create_backbone("resnet10t", in_chans=5, img_size=64, weights_path=path)
    path = tmp_path / "vit.pt"
    torch.save(create_backbone("vit_tiny_p8", in_chans=5, img_size=64).state_dict(), path)
    with pytest.raises(ValueError, match=rf"{path}: checkpoint does not fit"):
        create_backbone("resnet10t", in_chans=5, img_size=64, weights_path=path)


def test_weights_of_another_band_count_load_into_the_first_convolution(tmp_path):
    """A 5-band member's weights into a 6-band (LSST) model: the first convolution is the band mean in every
    band, scaled 5/6, so a flat image gives the same first-layer response; everything else loads unchanged."""
    src = create_backbone("resnet10t", in_chans=5, img_size=48)
    path = tmp_path / "five.pt"
    torch.save(src.state_dict(), path)
    dst = create_backbone("resnet10t", in_chans=6, img_size=48)
    info = load_weights(dst, path)
    first = dst.pretrained_cfg["first_conv"] + ".weight"
    assert info["adapted"] == [first]
    w5, w6 = src.state_dict()[first], dst.state_dict()[first]
    torch.testing.assert_close(w6, w5.mean(dim=1, keepdim=True).repeat(1, 6, 1, 1) * 5 / 6)
    flat5, flat6 = torch.full((1, 5, 9, 9), 0.7), torch.full((1, 6, 9, 9), 0.7)
    torch.testing.assert_close(torch.nn.functional.conv2d(flat6, w6), torch.nn.functional.conv2d(flat5, w5))
    key = next(k for k in src.state_dict() if k.endswith("weight") and k != first and src.state_dict()[k].ndim == 4)
    torch.testing.assert_close(dst.state_dict()[key], src.state_dict()[key])
