"""SNAP: masks (nucleus shapes, size range in µm, area budget), the colour box, the stored tiles'
invariants checked from the attack store, the method against its controls, config checks."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu
from torch import nn
from wsiattack import config as wsiconfig
from wsiattack import stores
from wsiattack.attacks.methods import build_method
from wsiattack.attacks.perturb import perturb_slide
from wsiattack.attacks.snap import blob_mask, colour_box, nucleus_shapes
from wsiattack.encoders.embedding import channels_first, to_unit_pixels
from wsiattack.errors import AttackError, ConfigError
from wsiattack.synthetic import render_slide
from wsiattack.tissue import otsu_threshold

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MPP = 0.5
BUDGET = 0.05  # the masks' largest share of the tile's area


@pytest.fixture(scope="module")
def he_tiles():
    """Four 224 px tiles of a synthetic H&E slide with tumour (nuclei drawn by the demo renderer)."""
    image = render_slide(rng=np.random.default_rng(5), width_px=448, height_px=448, tumor=True, tumor_share=0.3)
    return image.reshape(2, 224, 2, 224, 3).swapaxes(1, 2).reshape(4, 224, 224, 3).copy()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.GELU(), nn.Conv2d(8, 16, 3, stride=2))

    def forward(self, x):
        return self.net(x).mean(dim=(2, 3))


def snap_spec(method="snap", **extra):
    return (
        {"method": method, "eps": BUDGET, "steps": 5, **extra}
        if method == "snap"
        else {
            "method": method,
            "eps": BUDGET,
            **extra,
        }
    )


def run(spec, tiles_uint8, *, seed=0, encoder=None):
    method, objective = build_method(spec, tile_mpp=MPP)
    encoder = encoder or SmallCNN().eval()
    clean = to_unit_pixels(tiles_uint8)
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
    return outcome, adv.permute(0, 2, 3, 1).numpy(), after


def test_otsu_threshold_matches_scikit_image():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.03, 5000), rng.normal(0.6, 0.1, 2000)])
    bin_width = np.ptp(values) / 256
    assert otsu_threshold(values, value_range=None) == pytest.approx(threshold_otsu(values, nbins=256), abs=bin_width)
    assert 0.2 < otsu_threshold(values, value_range=None) < 0.45


def test_nucleus_shapes_come_from_the_haematoxylin_channel_within_the_size_range(he_tiles):
    diameter_px = (5 / MPP, 12 / MPP)
    shapes = [shape for tile in he_tiles for shape in nucleus_shapes(tile, diameter_px=diameter_px)]
    assert len(shapes) >= 8, "the demo renderer draws nuclei: the tiles must yield nucleus shapes"
    diameters = np.array([2 * np.sqrt(shape.sum() / np.pi) for shape in shapes])
    assert diameters.min() >= diameter_px[0] and diameters.max() <= diameter_px[1]
    for shape in shapes:  # each shape is one connected blob
        assert ndimage.label(shape)[1] == 1
    flat = np.full((64, 64, 3), 200, dtype=np.uint8)
    assert nucleus_shapes(flat, diameter_px=diameter_px) == []


@pytest.mark.parametrize("source", ["nuclei", "ellipses"])
def test_blob_mask_keeps_the_area_budget_and_counts_its_blobs(he_tiles, source):
    rng = np.random.default_rng(1)
    for tile in he_tiles:
        mask, placed = blob_mask(tile, blobs=12, diameter_px=(10, 24), max_area_fraction=BUDGET, source=source, rng=rng)
        assert mask.dtype == bool and mask.shape == tile.shape[:2]
        assert 0 < mask.mean() <= BUDGET
        assert 1 <= placed <= 12 and ndimage.label(mask)[1] <= placed
    tight, placed = blob_mask(
        he_tiles[0], blobs=50, diameter_px=(10, 24), max_area_fraction=0.01, source=source, rng=rng
    )
    assert tight.sum() <= int(0.01 * 224 * 224) and placed < 50, "blobs that would exceed the budget are skipped"


def test_blob_mask_is_deterministic_and_falls_back_to_ellipses_on_a_tile_without_nuclei(he_tiles):
    def draw(tile, seed, source="nuclei"):
        return blob_mask(
            tile,
            blobs=8,
            diameter_px=(10, 24),
            max_area_fraction=BUDGET,
            source=source,
            rng=np.random.default_rng(seed),
        )

    assert np.array_equal(draw(he_tiles[1], 3)[0], draw(he_tiles[1], 3)[0])
    assert not np.array_equal(draw(he_tiles[1], 3)[0], draw(he_tiles[1], 4)[0])
    flat = np.full((224, 224, 3), 210, dtype=np.uint8)
    fallback, placed = draw(flat, 3)
    assert placed == 8 and np.array_equal(fallback, draw(flat, 3, source="ellipses")[0])


@pytest.mark.parametrize("method", ["snap", "snap_median", "snap_random"])
def test_snap_changes_only_masked_pixels_within_the_tiles_colour_box(he_tiles, method):
    outcome, adv, _ = run(snap_spec(method), he_tiles)
    masks = outcome.masks.numpy()
    assert masks.shape == he_tiles.shape[:3] and (masks.reshape(4, -1).mean(axis=1) <= BUDGET).all()
    changed = (adv != he_tiles).any(axis=3)
    assert not (changed & ~masks).any(), "a pixel outside the mask changed"
    assert changed.any()
    low, high = (v.squeeze((2, 3)).numpy() for v in colour_box(to_unit_pixels(he_tiles) * 255))
    per_channel = adv.reshape(4, -1, 3)
    assert (per_channel.min(axis=1) >= np.round(low)).all() and (per_channel.max(axis=1) <= np.round(high)).all()


def test_snap_and_its_controls_share_their_masks_and_the_optimised_patch_wins(he_tiles):
    outcomes = {
        method: run(snap_spec(method, **({"steps": 20} if method == "snap" else {})), he_tiles)
        for method in ("snap", "snap_median", "snap_random")
    }
    masks = [outcome.masks for outcome, _, _ in outcomes.values()]
    assert all(torch.equal(masks[0], other) for other in masks[1:])
    after = {method: values[2] for method, values in outcomes.items()}
    assert (after["snap"] > after["snap_median"]).all() and (after["snap"] > after["snap_random"]).all()
    snap_outcome = outcomes["snap"][0]
    assert (snap_outcome.iterations == 20).all() and (snap_outcome.best_step > 0).all()
    median_fill = outcomes["snap_median"][1][masks[0].numpy()]  # every masked pixel has its tile's median
    assert len(np.unique(median_fill.reshape(-1, 3), axis=0)) <= 4


def test_blob_size_follows_the_tiles_resolution(he_tiles):
    spec = snap_spec("snap_median", blobs=1, mask_source="ellipses", blob_um=[8.0, 8.0])
    areas = {}
    for mpp in (0.25, 0.5, 1.0):
        method, _ = build_method(spec, tile_mpp=mpp)
        masks, _ = method.masks(to_unit_pixels(he_tiles[:1]), torch.Generator().manual_seed(0))
        areas[mpp] = float(masks.sum())
    disc = {mpp: np.pi * (4 / mpp) ** 2 for mpp in areas}
    for mpp, area in areas.items():
        assert area == pytest.approx(disc[mpp], rel=0.25)


def write_tiles(path, tiles, *, mpp):
    with stores.atomic_store(path, kind=stores.TILES, attrs={"slide_id": "s1", "target_mpp": mpp}) as group:
        stores.create_tiles_array(group, n_tiles=len(tiles), tile_px=tiles.shape[1])[...] = tiles
        stores.write_array(group, "coords", np.zeros((len(tiles), 2), dtype=np.int64))
    return path


class TinyEncoder(SmallCNN):
    weights_id = "tiny:0"

    def describe(self):
        return {"encoder": "tiny", "weights_id": self.weights_id}


def test_attack_store_holds_masks_whose_invariants_hold_on_the_stored_uint8_tiles(tmp_path, he_tiles):
    tiles_path = write_tiles(tmp_path / "tiles.zarr", he_tiles, mpp=MPP)
    spec = {
        **snap_spec("snap"),
        "objective": "cosine",
        "budget": {"fraction": 0.5, "min_tiles": 1},
        "selection": "random",
        "seed": 0,
    }
    spec = wsiconfig.validate_config(
        {"samples": "s.csv", "classes": ["a", "b"], "encoders": ["demo"], "attacks": {"snap": spec}}
    )["attacks"]["snap"] | {"name": "snap"}
    k = perturb_slide(
        slide_id="s1",
        tiles_store=tiles_path,
        encoder=TinyEncoder().eval(),
        spec=spec,
        out_store=tmp_path / "a.zarr",
        device=torch.device("cpu"),
    )
    group = stores.open_store(tmp_path / "a.zarr", kind=stores.ATTACK)
    index, adv, masks = (np.asarray(group[name][...]) for name in ("index", "adv_tiles", "masks"))
    assert k == 2 and masks.shape == (2, 224, 224) and masks.dtype == np.uint8
    clean = he_tiles[index]
    assert not ((adv != clean).any(axis=3) & (masks == 0)).any()
    for tile, adv_tile, mask in zip(clean, adv, masks, strict=True):
        assert (adv_tile.reshape(-1, 3).min(axis=0) >= tile.reshape(-1, 3).min(axis=0)).all()
        assert (adv_tile.reshape(-1, 3).max(axis=0) <= tile.reshape(-1, 3).max(axis=0)).all()
        assert mask.mean() <= BUDGET
    assert np.allclose(np.asarray(group["mask_area"][...]), masks.reshape(2, -1).mean(axis=1))
    assert (np.asarray(group["mask_blobs"][...]) >= 1).all()
    assert group.attrs["bound"] == {"norm": "mask", "eps": BUDGET, "radius": BUDGET}
    assert group.attrs["method_params"]["blob_um"] == [5.0, 12.0]


def attack_config(entry):
    return {"samples": "s.csv", "classes": ["a", "b"], "encoders": ["demo"], "attacks": {"snap": entry}}


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"attacks\.snap\.selection: the vulnerability probe"):
        wsiconfig.validate_config(attack_config(snap_spec("snap", selection="vulnerability")))
    with pytest.raises(ConfigError, match="mask_source"):
        wsiconfig.validate_config(attack_config(snap_spec("snap", mask_source="squares")))
    with pytest.raises(ConfigError, match="blob_um"):
        wsiconfig.validate_config(attack_config(snap_spec("snap", blob_um=[5.0])))
    with pytest.raises(ConfigError, match=r"attacks\.snap\.steps: not a parameter of method 'snap_median'"):
        wsiconfig.validate_config(attack_config({"method": "snap_median", "eps": BUDGET, "steps": 3}))
    with pytest.raises(ConfigError, match=r"blob_um \[12.0, 5.0\]"):
        build_method(snap_spec("snap", blob_um=[12.0, 5.0]), tile_mpp=MPP)
    with pytest.raises(AttackError, match="tile_mpp"):
        build_method(snap_spec("snap"))
