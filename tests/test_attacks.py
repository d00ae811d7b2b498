"""Attack stage around the methods: budgets, selection, uint8 rounding, the attack store, sweeps."""

import contextlib
import hashlib
import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from wsiattack import runtime, stores
from wsiattack.attacks.bounds import Ball, quantize_l2, quantize_linf
from wsiattack.attacks.budget import slide_rng, tiles_to_attack
from wsiattack.attacks.objectives import OBJECTIVES, Objective, cosine_distance
from wsiattack.attacks.params import normalise_attack
from wsiattack.attacks.perturb import perturb_slide
from wsiattack.attacks.selection import centrality_scores, random_selection, top_k_selection
from wsiattack.attacks.sweep import expand_sweep
from wsiattack.encoders.model import build_encoder
from wsiattack.errors import AttackError, ConfigError, StoreError
from wsiattack.evaluation import attacked_bag
from wsiattack.extraction import extract_slide, reembed_slide
from wsiattack.schema import check_attack_entry

EPS = 4 / 255
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- budget and selection ------------------------------------------------------------------------


def test_budget_is_a_fraction_with_minimum_and_maximum_counts():
    assert tiles_to_attack(10_000, fraction=0.001, min_tiles=1) == 10
    assert tiles_to_attack(250, fraction=0.001, min_tiles=1) == 1
    assert tiles_to_attack(250, fraction=0.001, min_tiles=3) == 3
    assert tiles_to_attack(2, fraction=0.001, min_tiles=5) == 2
    assert tiles_to_attack(100_000, fraction=0.01, min_tiles=1, max_tiles=50) == 50
    assert tiles_to_attack(1_000, fraction=0.01, min_tiles=1, max_tiles=50) == 10
    with pytest.raises(ConfigError, match="min_tiles <= max_tiles"):
        tiles_to_attack(100, fraction=0.1, min_tiles=5, max_tiles=2)
    with pytest.raises(ConfigError, match="fraction 0.0 must be in"):
        tiles_to_attack(100, fraction=0.0, min_tiles=1)


def test_random_selection_is_seeded_per_slide_and_stream_zero_is_unchanged():
    pick = lambda seed, slide: random_selection(1000, k=10, rng=slide_rng(seed, slide)).index  # noqa: E731
    np.testing.assert_array_equal(pick(0, "a"), pick(0, "a"))
    assert not np.array_equal(pick(0, "a"), pick(0, "b"))
    assert not np.array_equal(pick(0, "a"), pick(1, "a"))
    assert np.all(np.diff(pick(0, "a")) > 0)
    legacy = np.sort(np.random.default_rng([0, zlib.crc32(b"a")]).choice(1000, size=10, replace=False))
    np.testing.assert_array_equal(pick(0, "a"), legacy)  # stores written before streams existed stay valid
    assert slide_rng(0, "a", stream=1).integers(2**62) != slide_rng(0, "a").integers(2**62)


def test_top_k_takes_the_highest_scores_with_ties_to_the_lower_index():
    chosen = top_k_selection(np.array([0.5, 2.0, 2.0, -1.0, 2.0, 0.7]), k=2, what="test")
    np.testing.assert_array_equal(chosen.index, [1, 2])
    np.testing.assert_array_equal(chosen.scores, [2.0, 2.0])
    with pytest.raises(AttackError, match="test: need one finite score per tile"):
        top_k_selection(np.array([0.5, np.nan]), k=1, what="test")


def test_centrality_prefers_tiles_nearest_the_slide_mean():
    features = np.array([[10.0, 0], [-10, 0], [0.1, 0], [0, 10], [0, -10], [0, 0.2]])
    np.testing.assert_array_equal(top_k_selection(centrality_scores(features), k=2, what="t").index, [2, 5])


# --- rounding to uint8 keeps the bound ----------------------------------------------------------


def test_quantize_linf_keeps_the_bound_after_rounding():
    clean = torch.full((1, 3, 2, 2), 100, dtype=torch.uint8)
    eps = 0.01  # 2.55 grey levels: rounding to 3 would break the bound
    out = quantize_linf((clean.float() + 2.55) / 255, clean, eps)
    assert (out.int() - clean.int()).abs().max() == 2
    assert quantize_linf(torch.ones(1, 3, 2, 2), clean, 1.0).max() == 255


def test_quantize_l2_holds_the_radius_exactly_and_only_undoes_overshooting_roundings():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(20, 236, (3, 3, 16, 16), generator=g, dtype=torch.int64).to(torch.uint8)
    ball = Ball("l2", 2 / 255)
    radius = ball.radius(clean.float())
    direction = torch.randn(3, 3, 16, 16, generator=g)
    adversarial = (
        clean.float() / 255 + direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * radius
    )  # on the sphere
    nearest = torch.round(adversarial * 255).to(torch.int64) - clean.to(torch.int64)
    assert torch.all(nearest.flatten(1).pow(2).sum(1) > (radius * 255) ** 2)  # nearest rounding breaks it here
    out = quantize_l2(adversarial, clean, radius).to(torch.int64) - clean.to(torch.int64)
    assert torch.all(out.flatten(1).pow(2).sum(1) <= (radius * 255) ** 2 + 1e-6)  # radius² = 3072 grey levels² here
    changed = out != nearest
    exact = adversarial.double() * 255 - clean.double()
    assert torch.all(nearest[changed].abs() > exact[changed].abs())  # only roundings away from clean were undone
    assert torch.all((out - nearest)[changed].abs() == 1)
    inside = clean.float() / 255 + (adversarial - clean.float() / 255) * 0.5
    torch.testing.assert_close(
        quantize_l2(inside, clean, radius), torch.round(inside * 255).to(torch.uint8), rtol=0, atol=0
    )


class _FactoryDeviceSpy(torch.overrides.TorchFunctionMode):
    """Records every tensor factory call made without an explicit device: on a GPU such a tensor
    lands on the CPU and the next op that mixes it with the tiles fails."""

    FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange}

    def __init__(self):
        super().__init__()
        self.missing: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and "device" not in kwargs:
            self.missing.append(func.__name__)
        return func(*args, **kwargs)


def test_quantize_l2_makes_every_tensor_on_the_tiles_device_and_avoids_float64_on_mps():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(20, 236, (2, 3, 16, 16), generator=g, dtype=torch.int64).to(torch.uint8)
    radius = Ball("l2", 2 / 255).radius(clean.float())
    direction = torch.randn(2, 3, 16, 16, generator=g)
    adversarial = clean.float() / 255 + direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * radius
    with _FactoryDeviceSpy() as spy:
        quantize_l2(adversarial, clean, radius)  # on the sphere: the overshoot path runs (previous test)
    assert spy.missing == []
    from wsiattack.runtime import exact_dtype

    assert exact_dtype(torch.device("mps")) == torch.float32 and exact_dtype(torch.device("cuda")) == torch.float64


# --- perturb_slide: the attack store --------------------------------------------------------------


class TinyEncoder(nn.Module):
    """A seeded small CNN with the TileEncoder interface the attack stage uses."""

    weights_id = "tiny:0"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.GELU(), nn.Conv2d(8, 16, 3, stride=2), nn.GELU())

    def forward(self, x):
        features = self.net(x)
        return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)

    def describe(self):
        return {"encoder": "tiny", "weights_id": self.weights_id}


class BrightnessSensitive(TinyEncoder):
    """f(x) = 10·mean(x²): the gradient (20·x/n) grows with brightness, so bright tiles are the
    most vulnerable to a small perturbation."""

    def forward(self, x):
        return 10 * (x * x).mean(dim=(1, 2, 3)).unsqueeze(1)


def write_tiles(path, tiles):
    with stores.atomic_store(path, kind=stores.TILES, attrs={"slide_id": "s1"}) as group:
        stores.create_tiles_array(group, n_tiles=len(tiles), tile_px=tiles.shape[1])[...] = tiles
        stores.write_array(group, "coords", np.zeros((len(tiles), 2), dtype=np.int64))
    return path


def write_features(path, features, *, weights_id):
    with stores.atomic_store(path, kind=stores.FEATURES, attrs={"slide_id": "s1", "weights_id": weights_id}) as group:
        stores.write_array(group, "features", features.astype(np.float32))
    return path


@pytest.fixture
def slide(tmp_path):
    """12 tiles of 32 px, brightness rising with a shuffled order, texture on top."""
    rng = np.random.default_rng(0)
    levels = rng.permutation(np.linspace(40, 200, 12))
    tiles = np.clip(levels[:, None, None, None] + rng.normal(0, 12, (12, 32, 32, 3)), 0, 255).astype(np.uint8)
    return write_tiles(tmp_path / "tiles.zarr", tiles), tiles, levels


SPEC = {
    "name": "pgd",
    "method": "pgd",
    "objective": "cosine",
    "eps": EPS,
    "steps": 3,
    "step_size": 1 / 255,
    "budget": {"fraction": 0.25, "min_tiles": 1},
    "selection": "random",
    "seed": 0,
}
ARRAYS = (
    "index",
    "adv_tiles",
    "linf",
    "l2",
    "objective_before_rounding",
    "objective",
    "iterations",
    "best_step",
    "selection_score",
)


def perturb(tmp_path, tiles_path, spec, name="a.zarr", encoder=None, **kwargs):
    encoder = encoder or TinyEncoder().eval()
    k = perturb_slide(
        slide_id="s1",
        tiles_store=tiles_path,
        encoder=encoder,
        spec=spec,
        out_store=tmp_path / name,
        device=CPU,
        **kwargs,
    )
    return k, stores.open_store(tmp_path / name, kind=stores.ATTACK)


def digest(path):
    return hashlib.sha256(np.asarray(stores.open_store(path, kind=stores.TILES)["tiles"][...]).tobytes()).hexdigest()


def test_perturb_slide_writes_a_complete_deterministic_store_and_leaves_the_tiles_alone(tmp_path, slide):
    path, tiles, _ = slide
    before = digest(path)
    k, a = perturb(tmp_path, path, SPEC, "a.zarr")
    _, b = perturb(tmp_path, path, SPEC, "b.zarr")
    assert digest(path) == before  # the tiles store is never written
    assert k == 3 and a["adv_tiles"].shape == (3, 32, 32, 3) and a["adv_tiles"].dtype == np.uint8
    index, adv = np.asarray(a["index"][...]), np.asarray(a["adv_tiles"][...])
    diff = adv.astype(int) - tiles[index].astype(int)
    assert np.abs(diff).max() == 4  # the full bound is used, never exceeded after rounding
    np.testing.assert_allclose(a["linf"][...], np.abs(diff).reshape(3, -1).max(1) / 255, rtol=1e-6)
    np.testing.assert_allclose(a["l2"][...], np.linalg.norm(diff.reshape(3, -1) / 255, axis=1), rtol=1e-5)
    assert np.all(a["objective"][...] > 0) and np.all(a["objective_before_rounding"][...] > 0)
    np.testing.assert_array_equal(a["iterations"][...], [3, 3, 3])
    assert np.all(np.isnan(a["selection_score"][...]))  # random selection has no score
    for name in ARRAYS:
        np.testing.assert_array_equal(a[name][...], b[name][...])  # same seed, same bytes
    assert dict(a.attrs) == {**dict(b.attrs)}  # no wall time or other run-dependent attrs
    attrs = a.attrs
    assert attrs["attack"]["seed"] == 0 and attrs["label_free"] is True and attrs["threat_model"] == "white-box"
    assert attrs["bound"] == {"norm": "linf", "eps": EPS, "radius": EPS}
    assert attrs["method_params"] == {"norm": "linf", "steps": 3, "step_size": 1 / 255, "restarts": 1}
    assert attrs["selection_probe_tiles"] == 0


def test_l2_attack_store_respects_the_radius_after_rounding(tmp_path, slide):
    path, tiles, _ = slide
    spec = {**SPEC, "norm": "l2", "step_size": None}
    _, store = perturb(tmp_path, path, spec)
    radius = EPS * math.sqrt(32 * 32 * 3)
    assert store.attrs["bound"]["radius"] == pytest.approx(radius)
    assert store.attrs["method_params"]["step_size"] == pytest.approx(2.5 * EPS / 3)
    diff = np.asarray(store["adv_tiles"][...]).astype(int) - tiles[np.asarray(store["index"][...])].astype(int)
    assert np.all(np.linalg.norm(diff.reshape(len(diff), -1), axis=1) <= radius * 255 + 1e-9)
    assert np.all(store["l2"][...] <= radius * (1 + 1e-6))


def test_noise_control_uses_the_same_tiles_and_scores_lower(tmp_path, slide):
    path, _, _ = slide
    _, pgd = perturb(tmp_path, path, SPEC, "pgd.zarr")
    _, noise = perturb(tmp_path, path, {**SPEC, "name": "noise", "method": "noise"}, "noise.zarr")
    np.testing.assert_array_equal(pgd["index"][...], noise["index"][...])
    assert np.all(pgd["objective"][...] > noise["objective"][...])
    np.testing.assert_array_equal(noise["iterations"][...], 0)


def test_vulnerability_selection_probes_every_tile_and_picks_the_most_sensitive(tmp_path, slide):
    path, tiles, levels = slide
    spec = {**SPEC, "objective": "l2", "selection": "vulnerability"}
    encoder = BrightnessSensitive().eval()
    k, store = perturb(tmp_path, path, spec, encoder=encoder)
    np.testing.assert_array_equal(store["index"][...], np.sort(np.argsort(levels)[-k:]))  # the brightest
    assert store.attrs["selection_probe_tiles"] == 12 and store.attrs["selection"]["probe_gradient_evaluations"] == 1
    assert np.all(np.isfinite(store["selection_score"][...]))
    with torch.no_grad():
        features = encoder(torch.as_tensor(tiles).permute(0, 3, 1, 2).float() / 255).numpy()
    features_path = write_features(tmp_path / "features.zarr", features, weights_id=encoder.weights_id)
    _, with_features = perturb(tmp_path, path, spec, "b.zarr", encoder=encoder, features_store=features_path)
    np.testing.assert_array_equal(with_features["index"][...], store["index"][...])


def test_centrality_selection_needs_matching_clean_features(tmp_path, slide):
    path, _, _ = slide
    spec = {**SPEC, "selection": "centrality"}
    features = np.tile([[10.0, 0.0]], (12, 1)) * np.where(np.arange(12) % 2, 1, -1)[:, None]
    features[[3, 8, 10]] = 0.01  # nearest the mean (0, 0)
    good = write_features(tmp_path / "f.zarr", features, weights_id=TinyEncoder.weights_id)
    _, store = perturb(tmp_path, path, spec, features_store=good)
    np.testing.assert_array_equal(store["index"][...], [3, 8, 10])
    assert store.attrs["label_free"] is True
    with pytest.raises(AttackError, match="selection 'centrality' needs the clean features store"):
        perturb(tmp_path, path, spec, "b.zarr")
    wrong = write_features(tmp_path / "w.zarr", features, weights_id="other")
    with pytest.raises(StoreError, match="re-run extraction"):
        perturb(tmp_path, path, spec, "c.zarr", features_store=wrong)
    short = write_features(tmp_path / "s.zarr", features[:5], weights_id=TinyEncoder.weights_id)
    with pytest.raises(StoreError, match="5 feature rows for 12 tiles"):
        perturb(tmp_path, path, spec, "d.zarr", features_store=short)


def test_demo_encoder_attack_then_reembed_replaces_only_the_selected_rows(tmp_path, slide):
    path, _, _ = slide
    demo = build_encoder("demo")
    extract_slide(
        slide_id="s1", tiles_store=path, encoder=demo, batch_size=16, device=CPU, out_store=tmp_path / "clean.zarr"
    )
    spec = {**SPEC, "budget": {"fraction": 0.1, "min_tiles": 1}, "steps": 2}
    k, store = perturb(tmp_path, path, spec, "attack.zarr", encoder=demo)
    reembed_slide(
        slide_id="s1",
        attack_store=tmp_path / "attack.zarr",
        encoder=demo,
        batch_size=16,
        device=CPU,
        out_store=tmp_path / "re.zarr",
    )
    clean = np.asarray(stores.open_store(tmp_path / "clean.zarr", kind=stores.FEATURES)["features"][...])
    re = stores.open_store(tmp_path / "re.zarr", kind=stores.REEMBEDDED)
    bag = attacked_bag(clean, index=np.asarray(re["index"][...]), replacement=np.asarray(re["features"][...]))
    untouched = np.setdiff1d(np.arange(12), store["index"][...])
    np.testing.assert_array_equal(bag[untouched], clean[untouched])
    shifted = 1 - np.sum(bag[store["index"][...]] * clean[store["index"][...]], axis=1) / (
        np.linalg.norm(bag[store["index"][...]], axis=1) * np.linalg.norm(clean[store["index"][...]], axis=1)
    )
    np.testing.assert_allclose(
        shifted, store["objective"][...], rtol=1e-3, atol=1e-6
    )  # re-embedding sees what the attack stored


# --- method parameters and sweeps -----------------------------------------------------------------


def test_normalise_fills_method_defaults_and_refuses_foreign_parameters():
    entry = normalise_attack({"method": "pgd", "eps": 8 / 255, "steps": 20}, where="attacks.x")
    assert (
        entry["step_size"] == pytest.approx(2.5 * (8 / 255) / 20) and entry["norm"] == "linf" and entry["restarts"] == 1
    )
    assert normalise_attack({"method": "apgd", "eps": EPS}, where="a")["steps"] == 100
    assert normalise_attack({"method": "cw", "eps": EPS}, where="a")["kappa"] is None
    with pytest.raises(ConfigError, match=r"attacks.x.momentum: not a parameter of method 'pgd'"):
        normalise_attack({"method": "pgd", "eps": EPS, "momentum": 0.9}, where="attacks.x")
    with pytest.raises(ConfigError, match=r"attacks.x.steps: 0 is less than the minimum of 1"):  # the schema's range
        check_attack_entry({"method": "pgd", "eps": EPS, "steps": 0}, where="attacks.x")
    with pytest.raises(ConfigError, match=r"attacks.x.method: unknown method 'pgdd'"):
        normalise_attack({"method": "pgdd", "eps": EPS}, where="attacks.x")


def test_sweep_expands_the_grid_into_readable_deterministic_names():
    sweep = {
        "methods": ["pgd", "noise"],
        "eps": ["1/255", 4 / 255, "7.5/255"],
        "fractions": [0.001, 0.01],
        "selections": ["random", "vulnerability"],
        "base": {"objective": "cosine", "seed": 3, "steps": 20, "budget": {"min_tiles": 2}},
    }
    entries = expand_sweep(sweep)
    assert len(entries) == 2 * 3 * 2 * 2
    assert list(entries)[:3] == ["pgd_eps1_f0.001_random", "pgd_eps1_f0.001_vulnerability", "pgd_eps1_f0.01_random"]
    assert "noise_eps7.5_f0.01_vulnerability" in entries
    pgd = entries["pgd_eps4_f0.01_random"]
    assert pgd["eps"] == pytest.approx(4 / 255) and pgd["steps"] == 20 and pgd["seed"] == 3
    assert pgd["budget"] == {"min_tiles": 2, "max_tiles": None, "fraction": 0.01} and pgd["selection"] == "random"
    assert "steps" not in entries["noise_eps4_f0.01_random"]  # base method parameters go where they apply
    assert expand_sweep(sweep) == entries


def test_sweep_entries_get_the_schema_defaults_and_mil_only_where_a_head_is_used():
    entries = expand_sweep(
        {
            "methods": ["pgd"],
            "eps": ["4/255"],
            "selections": ["random", "attention"],
            "params": {"pgd": {"step_size": "1/255"}},
            "base": {"mil": "abmil"},
        }
    )
    plain, gray = entries["pgd_eps4_f0.001_random"], entries["pgd_eps4_f0.001_attention"]
    assert (
        plain["seed"] == 0
        and plain["objective"] == "cosine"
        and plain["budget"] == {"fraction": 0.001, "min_tiles": 1, "max_tiles": None}
    )
    assert plain["step_size"] == pytest.approx(1 / 255)  # fractions parsed as for entries under attacks
    assert "mil" not in plain and gray["mil"] == "abmil"


def test_sweep_params_override_per_method_and_bad_sweeps_name_the_key():
    entries = expand_sweep(
        {
            "methods": ["apgd", "cw"],
            "eps": ["8/255"],
            "base": {"steps": 50},
            "params": {"cw": {"steps": 10, "kappa": 0.3}},
            "prefix": "s1_",
        }
    )
    assert entries["s1_apgd_eps8_f0.001_random"]["steps"] == 50
    assert entries["s1_cw_eps8_f0.001_random"]["steps"] == 10 and entries["s1_cw_eps8_f0.001_random"]["kappa"] == 0.3
    bad = [
        ({"methods": ["pgd"]}, r"sweep.eps: required"),
        (
            {"methods": ["pgd"], "eps": ["4/255", 4 / 255]},
            r"sweep.eps: 0.0156.* gives the same name 'pgd_eps4_f0.001_random'",
        ),
        ({"methods": ["pgdd"], "eps": [0.01]}, r"sweep.methods\[0\]: unknown 'pgdd'"),
        ({"methods": ["pgd"], "eps": [0.01], "selections": ["attn"]}, r"sweep.selections\[0\]: unknown 'attn'"),
        (
            {"methods": ["pgd"], "eps": [0.01], "fractions": [0]},
            r"sweep.fractions\[0\]: 0 must be a number in \(0, 1\]",
        ),
        ({"methods": ["pgd"], "eps": [0.01], "params": {"cw": {}}}, r"sweep.params.cw: not one of sweep.methods"),
        ({"methods": ["pgd"], "eps": [0.01], "base": {"eps": 0.1}}, r"sweep.base.eps: set by the grid"),
        (
            {"methods": ["pgd"], "eps": [0.01], "params": {"pgd": {"kappa": 1.0}}},
            r"kappa: not a parameter of method 'pgd'",
        ),
        ({"methods": ["pgd"], "eps": [0.01], "grid": {}}, r"sweep.grid: unknown key"),
        ({"methods": ["pgd"], "eps": ["4/0"]}, r"sweep.eps\[0\]: division by zero"),
        ({"methods": ["pgd"], "eps": [0.01], "base": {"objectiv": "l2"}}, r"sweep.base.objectiv: unknown key"),
        (
            {"methods": ["pgd"], "eps": [0.01], "base": {"budget": {"min_tile": 2}}},
            r"sweep.base.budget.min_tile: unknown key",
        ),
        ({"methods": ["pgd"], "eps": [0.01], "params": {"pgd": {"stepz": 3}}}, r"sweep.params.pgd.stepz: unknown key"),
        # every generated entry is checked against the schema's $defs/attack, naming entry and key
        (
            {"methods": ["pgd"], "eps": [0.01], "base": {"objective": "cosin"}},
            r"sweep \(pgd_eps2.55_f0.001_random\).objective: 'cosin' is not one of",
        ),
        (
            {"methods": ["pgd"], "eps": [0.01], "base": {"seed": -1}},
            r"sweep \(pgd_eps2.55_f0.001_random\).seed: -1 is less than the minimum",
        ),
        (
            {"methods": ["pgd"], "eps": [0.01], "base": {"budget": {"min_tiles": 0}}},
            r"sweep \(pgd_eps2.55_f0.001_random\).budget.min_tiles: 0 is less than",
        ),
        (
            {"methods": ["noise", "pgd"], "eps": [0.01], "params": {"pgd": {"steps": "ten"}}},
            r"sweep \(pgd_eps2.55_f0.001_random\).steps: 'ten' is not of type 'integer'",
        ),
        (
            {"methods": ["pgd"], "eps": [0.01], "params": {"pgd": {"norm": "l1"}}},
            r"sweep \(pgd_eps2.55_f0.001_random\).norm: 'l1' is not one of",
        ),
    ]
    for sweep, message in bad:
        with pytest.raises(ConfigError, match=message):
            expand_sweep(sweep)


def test_noise_at_eps_zero_is_the_null_control_the_unmodified_tiles(tmp_path, slide):
    """The null control (noise, eps 0) stores the selected tiles exactly: re-embedding them shows
    how far batch size and path alone move a feature, the floor under every other shift."""
    path, tiles, _ = slide
    spec = {
        "name": "null",
        "method": "noise",
        "objective": "cosine",
        "eps": 0.0,
        "budget": {"fraction": 0.25, "min_tiles": 1},
        "selection": "random",
        "seed": 0,
    }
    k, store = perturb(tmp_path, path, spec, "null.zarr")
    _, pgd = perturb(tmp_path, path, SPEC, "pgd.zarr")
    index = np.asarray(store["index"][...])
    np.testing.assert_array_equal(index, pgd["index"][...])  # same seed: the attack's tiles
    np.testing.assert_array_equal(store["adv_tiles"][...], tiles[index])
    assert np.all(store["linf"][...] == 0) and np.all(store["l2"][...] == 0) and np.all(store["objective"][...] < 1e-6)


class PrecisionSpy(TinyEncoder):
    """Records, at every forward pass, the TF32 switches and the autocast dtypes asked for."""

    spec = SimpleNamespace(precision="bfloat16")  # the encoder's safe dtype, as a registry spec states it

    def __init__(self, autocasts):
        super().__init__()
        self.autocasts, self.seen = autocasts, []

    def forward(self, x):
        self.seen.append(
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, tuple(self.autocasts))
        )
        return super().forward(x)


@pytest.mark.parametrize("precision", ["float32", "tf32", "encoder"])
def test_every_forward_pass_of_an_attack_runs_in_its_precision(tmp_path, slide, monkeypatch, precision):
    """Probe, reference, steps and the rounded tiles alike: an objective compares like with like."""
    path, _, _ = slide
    autocasts = []

    @contextlib.contextmanager
    def spy_autocast(device, dtype_name):  # runtime.autocast is a no-op off CUDA: record, and autocast the CPU
        autocasts.append(dtype_name)
        try:
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                yield
        finally:
            autocasts.pop()

    objective_saw = []

    def spy_cosine(embedding, clean):  # the objective is exact whatever the encoder ran in
        objective_saw.append(
            (torch.is_autocast_enabled("cpu"), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        )
        return cosine_distance(embedding, clean)

    monkeypatch.setattr(runtime, "autocast", spy_autocast)
    monkeypatch.setitem(OBJECTIVES, "cosine", Objective("cosine", spy_cosine))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    encoder = PrecisionSpy(autocasts).eval()
    spec = {**SPEC, "selection": "vulnerability", "precision": precision}
    k, store = perturb(tmp_path, path, spec, encoder=encoder)
    tf32 = precision == "tf32"
    expected = (tf32, tf32, ("bfloat16",) if precision == "encoder" else ())
    assert k > 0 and len(encoder.seen) >= 1 + 1 + SPEC["steps"] + 1  # probe (one batch), reference, steps, rounded
    assert set(encoder.seen) == {expected}
    assert objective_saw and set(objective_saw) == {(False, False, False)}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before  # restored
    assert store.attrs["attack"]["precision"] == precision
    with pytest.raises(ConfigError, match=r"attack precision 'fp8': use one of float32, tf32, encoder"):
        with runtime.attack_precision(CPU, mode="fp8", encoder_precision="float32"):
            pass
    entry = {key: value for key, value in SPEC.items() if key != "name"}
    with pytest.raises(ConfigError, match=r"attacks.t.precision: 'fp8' is not one of"):
        check_attack_entry({**entry, "precision": "fp8"}, where="attacks.t")
    with pytest.raises(ConfigError, match=r"attacks.s.precision: a shuffled control .* without running an encoder"):
        normalise_attack({"method": "shuffled", "source": "pgd", "eps": EPS, "precision": "tf32"}, where="attacks.s")
