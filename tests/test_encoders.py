"""The encoder wrapper: [0, 1] pixels in, embeddings out; extraction loop and device plumbing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsiattack import runtime
from wsiattack.encoders import registry
from wsiattack.encoders.model import build_encoder, embed_tiles, iter_batches, to_unit_pixels
from wsiattack.errors import ConfigError, EncoderError


@pytest.fixture(scope="module")
def demo():
    return build_encoder("demo")


def test_demo_encoder_is_seeded_frozen_and_in_eval_mode(demo):
    again = build_encoder("demo")
    assert demo.weights_id == again.weights_id and demo.weights_id.startswith("seeded:0:sha256:")
    assert not demo.training and not any(p.requires_grad for p in demo.parameters())
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(demo(x), again(x))
        assert demo(x).shape == (2, registry.ENCODERS["demo"].embed_dim)


def test_wrapper_equals_model_of_normalised_resized_pixels(demo):
    """forward(x) == readout(backbone(normalise(resize(x)))), computed by hand."""
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(registry.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(registry.IMAGENET_STD).view(1, 3, 1, 1)
    resized = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        by_hand = demo.backbone.forward_features((resized - mean) / std)[:, 0]  # CLS read-out
        torch.testing.assert_close(demo(x), by_hand)


def test_wrapper_is_differentiable_in_pixel_space(demo):
    x = torch.rand(1, 3, 224, 224, requires_grad=True)
    # (Not .sum(): the final LayerNorm makes the sum of the features a constant.)
    (demo(x) * torch.linspace(-1, 1, demo.spec.embed_dim)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_uint8_tiles_become_unit_pixels():
    tiles = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    tiles[0, :, :, 0] = 255
    pixels = to_unit_pixels(tiles)
    assert pixels.shape == (1, 3, 4, 4) and pixels.dtype == torch.float32
    assert pixels[0, 0].min() == 1.0 and pixels[0, 1:].max() == 0.0


def test_prefetching_batches_cover_the_array_in_order():
    array = np.arange(10 * 2).reshape(10, 2)
    got = list(iter_batches(array, batch_size=3))
    assert [s for s, _ in got] == [0, 3, 6, 9]
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), array)


def test_embed_tiles_matches_a_direct_forward_pass(demo):
    tiles = np.random.default_rng(0).integers(0, 256, size=(5, 224, 224, 3), dtype=np.uint8)
    embedded = embed_tiles(demo, tiles, batch_size=2, device=torch.device("cpu"), label="s1")
    with torch.no_grad():
        direct = demo(to_unit_pixels(tiles)).numpy()
    np.testing.assert_allclose(embedded, direct, rtol=1e-4, atol=1e-5)


def test_non_finite_embedding_names_slide_and_tile(demo, monkeypatch):
    tiles = np.zeros((4, 224, 224, 3), dtype=np.uint8)
    tiles[3] = 255
    original = type(demo).forward

    def broken(self, pixels):  # NaN wherever a tile is all white
        out = original(self, pixels)
        return torch.where(pixels.flatten(1).amin(1, keepdim=True) == 1.0, torch.nan, out)

    monkeypatch.setattr(type(demo), "forward", broken)
    with pytest.raises(EncoderError, match=r"slide7: non-finite embedding for tile 3 with encoder 'demo'"):
        embed_tiles(demo, tiles, batch_size=2, device=torch.device("cpu"), label="slide7")


def test_device_resolution_and_autocast_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match=r"config: device: 'cuda' requested but not available"):
        runtime.resolve_device("cuda")
    with runtime.autocast(torch.device("cpu"), "bfloat16"):  # autocast stays off on the CPU
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto").type == "cuda"


def test_unknown_encoder():
    with pytest.raises(EncoderError, match=r"unknown encoder 'nope' \(known: demo"):
        registry.get_spec("nope")
