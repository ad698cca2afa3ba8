"""The GPU batch size from a forward-only memory probe: the arithmetic by hand, the probe itself on a GPU."""

import pytest
import torch

from lens_assets.ml.memory import batch_from_probe, probe_batch_size

MiB = 2**20


def test_batch_is_the_largest_power_of_two_that_fits_the_training_budget():
    # budget 0.7 * 1000 = 700 MiB; 100 + 3 b <= 700 gives b <= 200, so 128
    assert batch_from_probe(1 * MiB, 100 * MiB, 1000 * MiB) == 128
    # fraction 1, factor 3: 4 + 3 b <= 10 gives b <= 2; the bound itself fits
    assert batch_from_probe(1, 4, 10, fraction=1.0, train_factor=3.0) == 2
    # a smaller training factor leaves room for more: 100 + 1 b <= 700 gives b <= 600, so 512
    assert batch_from_probe(1 * MiB, 100 * MiB, 1000 * MiB, train_factor=1.0) == 512


def test_batch_is_capped_at_max_batch_rounded_down_to_a_power_of_two():
    assert batch_from_probe(1024, 0, 2**30) == 1024
    assert batch_from_probe(1024, 0, 2**30, max_batch=100) == 64
    assert batch_from_probe(1024, 0, 2**30, max_batch=1) == 1


def test_min_batch_is_kept_when_it_fits_but_no_power_of_two_above_it_does():
    # 690 + 3 b <= 700 gives b <= 3.33: the power of two is 2, a min_batch of 3 still fits
    assert batch_from_probe(1 * MiB, 690 * MiB, 1000 * MiB) == 2
    assert batch_from_probe(1 * MiB, 690 * MiB, 1000 * MiB, min_batch=3) == 3


def test_a_batch_that_cannot_fit_is_a_clear_error():
    with pytest.raises(ValueError, match=r"a batch of 1 needs about 704 MiB .* only 700 MiB \(0.7 of 1000 MiB free\)"):
        batch_from_probe(1 * MiB, 701 * MiB, 1000 * MiB)
    with pytest.raises(ValueError, match=r"a batch of 4 needs"):
        batch_from_probe(1 * MiB, 690 * MiB, 1000 * MiB, min_batch=4)
    with pytest.raises(ValueError, match=r"min_batch <= max_batch"):
        batch_from_probe(1, 0, 2**30, min_batch=8, max_batch=4)
    with pytest.raises(ValueError, match=r"per_sample_bytes must be positive"):
        batch_from_probe(0, 0, 2**30)


def test_probe_needs_a_cuda_device():
    with pytest.raises(ValueError, match=r"needs a CUDA device, got 'cpu'"):
        probe_batch_size(torch.nn.Linear(2, 1), (2,), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_on_a_gpu_gives_a_power_of_two_batch_and_leaves_the_model_as_it_was():
    from lens_assets.ml.module import LensClassifier

    model = LensClassifier(backbone="resnet10t", in_chans=5, img_size=64)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    probe = probe_batch_size(model, (5, 64, 64), device="cuda", max_batch=256)
    assert set(probe) == {"batch_size", "per_sample_bytes", "free_bytes", "fixed_bytes"}
    b = probe["batch_size"]
    assert 1 <= b <= 256 and b & (b - 1) == 0
    assert probe["per_sample_bytes"] > 5 * 64 * 64 * 4  # more than the input image alone
    n_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert probe["fixed_bytes"] >= 4 * n_param_bytes and probe["free_bytes"] > 0
    assert b == batch_from_probe(probe["per_sample_bytes"], probe["fixed_bytes"], probe["free_bytes"], max_batch=256)
    # the model is back on the CPU, in training mode, with its batch-norm statistics untouched
    assert next(model.parameters()).device.type == "cpu" and model.training
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    # a training step at the probed batch size fits on the device
    model.cuda()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(b, 5, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, torch.ones_like(x)).float().mean()
    loss.backward()
    opt.step()
