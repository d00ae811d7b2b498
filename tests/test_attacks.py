"""Attack stage: budgets, selection, the PGD/noise methods, quantisation and the attack store."""

import numpy as np
import pytest
import torch
from torch import nn

from wsiattack import stores
from wsiattack.attacks.budget import select_tiles, slide_rng, tiles_to_attack
from wsiattack.attacks.methods import PGD, UniformNoise, quantize
from wsiattack.attacks.objectives import cosine_distance
from wsiattack.attacks.perturb import perturb_slide
from wsiattack.encoders.model import build_encoder, channels_first, to_unit_pixels
from wsiattack.errors import AttackError

EPS = 4 / 255


@pytest.fixture(scope="module")
def demo():
    return build_encoder("demo")


@pytest.fixture
def clean_uint8():
    return np.random.default_rng(0).integers(30, 226, size=(3, 224, 224, 3), dtype=np.uint8)


def test_budget_is_a_fraction_with_bounds():
    assert tiles_to_attack(10_000, fraction=0.001, min_tiles=1) == 10
    assert tiles_to_attack(250, fraction=0.001, min_tiles=1) == 1
    assert tiles_to_attack(250, fraction=0.001, min_tiles=3) == 3
    assert tiles_to_attack(2, fraction=0.001, min_tiles=5) == 2


def test_same_seed_same_tiles_across_attacks_and_different_across_slides():
    pick = lambda seed, slide: select_tiles(1000, 10, strategy="random", rng=slide_rng(seed, slide))  # noqa: E731
    np.testing.assert_array_equal(pick(0, "a"), pick(0, "a"))
    assert not np.array_equal(pick(0, "a"), pick(0, "b"))
    assert not np.array_equal(pick(0, "a"), pick(1, "a"))
    assert np.all(np.diff(pick(0, "a")) > 0)


def test_quantize_keeps_the_bound_after_rounding():
    clean = torch.full((1, 3, 2, 2), 100, dtype=torch.uint8)
    eps = 0.01  # 2.55 grey levels: rounding to 3 would break the bound
    adversarial = (clean.float() + 2.55) / 255
    out = quantize(adversarial, clean, eps)
    assert (out.int() - clean.int()).abs().max() == 2
    assert quantize(torch.ones(1, 3, 2, 2), clean, 1.0).max() == 255


def run_method(method, demo, clean_uint8, seed=0):
    clean = to_unit_pixels(clean_uint8)
    with torch.no_grad():
        clean_embedding = demo(clean)
    return method(demo, clean, clean_embedding, torch.Generator().manual_seed(seed), cosine_distance), clean


def test_pgd_beats_noise_within_the_bound(demo, clean_uint8):
    pgd, clean = run_method(PGD(eps=EPS, steps=5, step_size=1 / 255), demo, clean_uint8)
    noise, _ = run_method(UniformNoise(eps=EPS), demo, clean_uint8)
    assert (pgd.adversarial - clean).abs().max() <= EPS + 1e-6
    assert pgd.adversarial.min() >= 0 and pgd.adversarial.max() <= 1
    assert torch.all(pgd.objective > noise.objective)
    assert demo.training is False


def test_more_steps_never_lower_the_best_objective(demo, clean_uint8):
    short, _ = run_method(PGD(eps=EPS, steps=2, step_size=1 / 255), demo, clean_uint8)
    long, _ = run_method(PGD(eps=EPS, steps=6, step_size=1 / 255), demo, clean_uint8)
    assert torch.all(long.objective >= short.objective - 1e-7)


def test_zero_gradient_is_an_error():
    class Constant(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :4] * 0 + 1.0

    clean = torch.rand(2, 3, 8, 8)
    with pytest.raises(AttackError, match="all-zero input gradient for 2 tile"):
        PGD(eps=EPS, steps=2, step_size=1 / 255)(Constant(), clean, torch.ones(2, 4), torch.Generator().manual_seed(0), cosine_distance)


@pytest.fixture
def tiles_store(tmp_path, clean_uint8):
    path = tmp_path / "tiles.zarr"
    tiles = np.concatenate([clean_uint8] * 4)  # 12 tiles
    with stores.atomic_store(path, kind=stores.TILES, attrs={"slide_id": "s1"}) as group:
        array = stores.create_tiles_array(group, n_tiles=len(tiles), tile_px=224)
        array[...] = tiles
        stores.write_array(group, "coords", np.zeros((len(tiles), 2), dtype=np.int64))
    return path, tiles


SPEC = {"name": "pgd", "method": "pgd", "objective": "cosine", "eps": EPS, "steps": 3, "step_size": 1 / 255, "budget": {"fraction": 0.25, "min_tiles": 1}, "selection": "random", "seed": 0}


def test_perturb_slide_writes_a_complete_deterministic_attack_store(tmp_path, tiles_store, demo):
    path, tiles = tiles_store
    outputs = []
    for name in ("a.zarr", "b.zarr"):
        k = perturb_slide(slide_id="s1", tiles_store=path, encoder=demo, spec=SPEC, out_store=tmp_path / name, device=torch.device("cpu"))
        outputs.append(stores.open_store(tmp_path / name, kind=stores.ATTACK))
    a, b = outputs
    assert k == 3 and a["adv_tiles"].shape == (3, 224, 224, 3) and a["adv_tiles"].dtype == np.uint8
    index = np.asarray(a["index"][...])
    adv = np.asarray(a["adv_tiles"][...])
    diff = adv.astype(int) - tiles[index].astype(int)
    assert np.abs(diff).max() == 4  # the full bound is used, never exceeded after rounding
    np.testing.assert_allclose(a["linf"][...], np.abs(diff).reshape(3, -1).max(1) / 255, rtol=1e-6)
    assert np.all(a["objective"][...] > 0) and np.all(a["objective_before_rounding"][...] > 0)
    for name in ("index", "adv_tiles", "linf", "l2", "objective", "objective_before_rounding"):
        np.testing.assert_array_equal(a[name][...], b[name][...])  # same seed, same bytes
    assert a.attrs["attack"]["seed"] == 0 and a.attrs["label_free"] is True


def test_noise_control_uses_the_same_tiles_and_scores_lower(tmp_path, tiles_store, demo):
    path, _ = tiles_store
    noise_spec = {**SPEC, "name": "noise", "method": "noise"}
    for name, spec in (("pgd.zarr", SPEC), ("noise.zarr", noise_spec)):
        perturb_slide(slide_id="s1", tiles_store=path, encoder=demo, spec=spec, out_store=tmp_path / name, device=torch.device("cpu"))
    pgd, noise = (stores.open_store(tmp_path / n, kind=stores.ATTACK) for n in ("pgd.zarr", "noise.zarr"))
    np.testing.assert_array_equal(pgd["index"][...], noise["index"][...])
    assert np.all(pgd["objective"][...] > noise["objective"][...])
