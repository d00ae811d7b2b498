"""Stain-space attack: the deconvolution against scikit-image, the identity, the (alpha, beta) box
recovered from the attacked tiles, the objective against its random-jitter control, config checks."""

import itertools

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed
from torch import nn
from wsiattack import config as wsiconfig
from wsiattack.attacks.methods import build_method
from wsiattack.attacks.stain import StainBox, StainJitter, StainPGD, hed_to_rgb, jitter, rgb_to_hed
from wsiattack.encoders.embedding import channels_first, to_unit_pixels
from wsiattack.encoders.model import build_encoder
from wsiattack.errors import ConfigError
from wsiattack.synthetic import render_slide

SIGMA = 0.05

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def he_tiles():
    """Two 224 px tiles of a synthetic H&E slide with tumour, plus pure black and white pixels."""
    image = render_slide(rng=np.random.default_rng(5), width_px=448, height_px=448, tumor=True, tumor_share=0.3)
    tiles = image.reshape(2, 224, 2, 224, 3).swapaxes(1, 2).reshape(4, 224, 224, 3)
    tiles = tiles[np.argsort(tiles.reshape(4, -1).mean(axis=1))[:2]].copy()
    tiles[:, 0, :4] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 128, 255]]
    return tiles


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.GELU(), nn.Conv2d(8, 16, 3, stride=2))

    def forward(self, x):
        return self.net(x).mean(dim=(2, 3))


def run(method, encoder, tiles_uint8, *, seed=0):
    clean = to_unit_pixels(tiles_uint8)
    _, objective = build_method({"method": "stain_jitter", "eps": SIGMA})
    with torch.no_grad():
        reference = encoder(clean)
    outcome = method(
        encoder=encoder,
        clean=clean,
        reference=reference,
        generator=torch.Generator().manual_seed(seed),
        objective=objective.fn,
    )
    adv = method.ball.quantize(outcome.adversarial, channels_first(tiles_uint8))
    with torch.no_grad():
        after = objective.fn(encoder(adv.float() / 255), reference)
    return outcome, adv, after


def test_deconvolution_is_scikit_images(he_tiles):
    pixels = to_unit_pixels(he_tiles)
    ours = rgb_to_hed(pixels, clip=True).permute(0, 2, 3, 1).numpy()
    reference = np.stack([rgb2hed(tile) for tile in he_tiles])
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    back = hed_to_rgb(torch.as_tensor(reference, dtype=torch.float32).permute(0, 3, 1, 2))
    np.testing.assert_allclose(back.permute(0, 2, 3, 1).numpy(), np.stack([hed2rgb(h) for h in reference]), atol=1e-6)


def test_the_identity_jitter_reproduces_every_stored_level(he_tiles):
    box = StainBox(SIGMA)
    pixels = to_unit_pixels(he_tiles)
    same = box.quantize(jitter(rgb_to_hed(pixels), box.identity(2, device=pixels.device)), None)
    assert torch.equal(same, channels_first(he_tiles))


def recovered_jitter(clean: torch.Tensor, adversarial: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per tile and stain, (alpha, beta) of hed' = alpha·hed + beta fitted on unclipped pixels."""
    hed, hed_adv = rgb_to_hed(clean), rgb_to_hed(adversarial)
    alphas, betas = np.empty((len(clean), 3)), np.empty((len(clean), 3))
    for t in range(len(clean)):
        inside = ((adversarial[t] > 1e-4) & (adversarial[t] < 1 - 1e-4)).all(dim=0)
        for s in range(3):
            x, y = hed[t, s][inside].double().numpy(), hed_adv[t, s][inside].double().numpy()
            alphas[t, s], betas[t, s] = np.polyfit(x, y, 1)
    return alphas, betas


def test_stain_pgd_stays_in_its_box_spends_it_and_beats_its_jitter_control(he_tiles):
    encoder = build_encoder("demo")
    attacked, adv, after = run(StainPGD(eps=SIGMA, steps=3), encoder, he_tiles)
    alphas, betas = recovered_jitter(to_unit_pixels(he_tiles), attacked.adversarial)
    assert np.abs(alphas - 1).max() <= SIGMA + 1e-3 and np.abs(betas).max() <= SIGMA + 1e-3
    assert np.isclose(np.abs(betas), SIGMA, atol=1e-3).sum() >= 3  # sign steps end on the box's faces
    _, _, control = run(StainJitter(eps=SIGMA), encoder, he_tiles)
    assert torch.all(after > control), (after, control)
    assert torch.all(attacked.iterations == 3)
    changed = (adv.int() - channels_first(he_tiles).int()).abs().amax()
    assert 0 < changed <= 255


def test_same_seed_same_bytes_and_larger_sigma_never_scores_lower(he_tiles):
    encoder = SmallCNN().eval().requires_grad_(False)
    first = run(StainPGD(eps=SIGMA, steps=4), encoder, he_tiles)[1]
    assert torch.equal(first, run(StainPGD(eps=SIGMA, steps=4), encoder, he_tiles)[1])
    assert not torch.equal(first, run(StainPGD(eps=SIGMA, steps=4), encoder, he_tiles, seed=1)[1])
    scores = [run(StainPGD(eps=sigma, steps=4), encoder, he_tiles)[0].objective for sigma in (0.01, 0.03, 0.1)]
    assert all(torch.all(b >= a * 0.99) for a, b in itertools.pairwise(scores)), scores


def attack_config(entry):
    return {"samples": "s.csv", "classes": ["a", "b"], "encoders": ["demo"], "attacks": {"stain": entry}}


def test_config_fills_the_stain_defaults_and_refuses_pixel_only_settings():
    entry = wsiconfig.validate_config(attack_config({"method": "stain_pgd", "eps": SIGMA}))["attacks"]["stain"]
    assert entry["steps"] == 10 and entry["step_size"] == pytest.approx(2.5 * SIGMA / 10)
    with pytest.raises(ConfigError, match=r"attacks\.stain\.selection.*vulnerability"):
        wsiconfig.validate_config(attack_config({"method": "stain_pgd", "eps": SIGMA, "selection": "vulnerability"}))
    with pytest.raises(ConfigError, match=r"attacks\.stain\.norm: not a parameter of method 'stain_pgd'"):
        wsiconfig.validate_config(attack_config({"method": "stain_pgd", "eps": SIGMA, "norm": "l2"}))
