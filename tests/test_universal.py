"""Universal perturbations (attacks.universal): the closed form on a linear encoder, training on
the fold's training slides only, the exact application, determinism, and the config rules."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from wsiattack import config as wsiconfig
from wsiattack import shardjobs, stores
from wsiattack.attacks.objectives import l2_distance
from wsiattack.attacks.params import attack_norm, is_derived
from wsiattack.attacks.universal import apply_pattern, learn_pattern, learn_universal, read_pattern
from wsiattack.errors import AttackError, ConfigError

CPU = torch.device("cpu")
TILE_PX = 16
EPS = 4 / 255


class Linear(nn.Module):
    """f(x) = w · x: one output, so ‖f(x + δ) − f(x)‖ = |w · δ| whatever the tile (no clipping)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3 * TILE_PX * TILE_PX, generator=torch.Generator().manual_seed(seed)))
        self.weights_id = f"linear-{seed}"

    def forward(self, x):
        return (x.flatten(1) @ self.w)[:, None]

    def describe(self):
        return {"encoder": "linear", "weights_id": self.weights_id}


def grey_tiles(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(60, 190, (n, TILE_PX, TILE_PX, 3)).astype(np.uint8)


def test_on_a_linear_encoder_the_pattern_is_the_closed_form_eps_sign_w():
    encoder = Linear()
    learned = learn_pattern(
        encoder,
        grey_tiles(6),
        eps=EPS,
        steps=4,
        step_size=EPS,
        batch_tiles=4,
        objective=l2_distance,
        generator=torch.Generator().manual_seed(0),
        device=CPU,
    )
    sign_w = torch.sign(encoder.w.detach()).view(3, TILE_PX, TILE_PX).permute(1, 2, 0).numpy().astype(np.int16)
    # max over the box of |w·δ| is ±eps·sign(w): which sign depends on the random start
    matches = [np.array_equal(learned.levels, s * 4 * sign_w) for s in (1, -1)]
    assert any(matches), np.unique(learned.levels, return_counts=True)
    optimum = 4 / 255 * float(encoder.w.detach().abs().sum())
    assert learned.eval_objective.max() == pytest.approx(optimum, rel=1e-4)
    assert learned.eval_step[0] == 0 and learned.eval_step[-1] == 4 and len(learned.train_objective) == 4


def test_application_adds_the_same_offsets_to_every_tile_and_counts_the_clipped_values():
    levels = np.full((TILE_PX, TILE_PX, 3), 4, dtype=np.int16)
    levels[0, 0] = -4
    clean = grey_tiles(3)
    clean[1, 5, 5] = 254  # pushed past 255 in all three channels
    adversarial, clipped = apply_pattern(clean, levels)
    np.testing.assert_array_equal(adversarial[0].astype(np.int16) - clean[0], levels)
    assert adversarial[1, 5, 5].tolist() == [255, 255, 255]
    assert clipped.tolist() == [0, pytest.approx(3 / (3 * TILE_PX * TILE_PX)), 0]
    with pytest.raises(AttackError, match="pattern of shape"):
        apply_pattern(grey_tiles(1)[:, :8, :8], levels)


SPEC = {
    "name": "uap",
    "method": "universal",
    "objective": "cosine",
    "eps": EPS,
    "steps": 3,
    "step_size": EPS / 2,
    "train_tiles": 2,
    "batch_tiles": 2,
    "budget": {"fraction": 0.5, "min_tiles": 1},
    "selection": "random",
    "seed": 0,
}
SLIDES = {"s1": 0, "s2": 0, "s3": 1, "s4": 1}  # slide -> the fold in which it is a test slide


class TwoFeatures(Linear):
    """Mean and spread of the red channel: a 2-d embedding, so the cosine objective has a gradient."""

    def forward(self, x):
        return torch.stack([x[:, 0].mean(dim=(1, 2)) + 0.1, x[:, 0].std(dim=(1, 2)) * 3], dim=1)


@pytest.fixture
def cohort(tmp_path):
    """Four slides' tiles stores (pixels stored) in one shard directory, and the splits."""
    shard = tmp_path / "tiles" / "shard0"
    for i, slide in enumerate(SLIDES):
        with stores.atomic_store(shard / f"{slide}.zarr", kind=stores.TILES, attrs={"slide_id": slide}) as group:
            tiles = grey_tiles(6, seed=i)
            stores.create_tiles_array(group, n_tiles=len(tiles), tile_px=TILE_PX)[...] = tiles
            stores.write_array(group, "coords", np.zeros((len(tiles), 2), dtype=np.int64))
    splits = tmp_path / "splits.csv"
    pd.DataFrame(
        {"slide_id": list(SLIDES), "label": "normal", "patient_id": list(SLIDES), "fold": list(SLIDES.values())}
    ).to_csv(splits, index=False)
    return shard, splits


def learn(cohort, fold, out):
    shard, splits = cohort
    return learn_universal(
        tile_stores=stores.slide_stores([shard]),
        splits_csv=splits,
        fold=fold,
        encoder=TwoFeatures(),
        spec=SPEC,
        device=CPU,
        out_store=out,
    )


def test_each_fold_learns_from_its_training_slides_only_and_its_test_slides_get_its_pattern(cohort, tmp_path):
    patterns = {fold: tmp_path / "universal" / f"fold{fold}.zarr" for fold in (0, 1)}
    for fold, path in patterns.items():
        learn(cohort, fold, path)
        attrs = stores.open_store(path, kind=stores.UNIVERSAL).attrs
        assert set(attrs["training_tiles"]) == {s for s, f in SLIDES.items() if f != fold}
        assert attrs["fold"] == fold and attrs["n_training_tiles"] == 4
        assert attrs["best_objective"] == pytest.approx(
            max(stores.open_store(path, kind=stores.UNIVERSAL)["eval_objective"][...])
        )
    shard, splits = cohort
    out = tmp_path / "attacks" / "shard0"
    slides = [shardjobs.ShardSlide(s.name.removesuffix(".zarr"), str(s)) for s in stores.slide_stores([shard])]
    assert (
        shardjobs.universal_shard(
            slides=slides, spec=SPEC, splits_csv=splits, pattern_of_fold=patterns, out_attacks=out
        )
        == 12
    )
    levels = {fold: read_pattern(path, spec=SPEC)[0] for fold, path in patterns.items()}
    assert not np.array_equal(levels[0], levels[1])
    for slide, fold in SLIDES.items():
        attack = stores.open_store(out / f"{slide}.zarr", kind=stores.ATTACK)
        clean = np.asarray(stores.open_store(shard / f"{slide}.zarr", kind=stores.TILES)["tiles"][...])[
            attack["index"][...]
        ]
        np.testing.assert_array_equal(attack["adv_tiles"][...], apply_pattern(clean, levels[fold])[0])
        assert attack.attrs["pattern"]["fold"] == fold and attack.attrs["k"] == 3
        assert float(np.max(attack["linf"][...])) <= EPS + 1e-7 and attack.attrs["threat_model"] == "white-box"


def test_the_same_spec_learns_the_same_bytes_and_a_changed_spec_is_refused(cohort, tmp_path):
    first, second = learn(cohort, 0, tmp_path / "a.zarr"), learn(cohort, 0, tmp_path / "b.zarr")
    np.testing.assert_array_equal(first.levels, second.levels)
    np.testing.assert_array_equal(first.train_objective, second.train_objective)
    with pytest.raises(AttackError, match="learned with other settings"):
        read_pattern(tmp_path / "a.zarr", spec={**SPEC, "eps": 8 / 255})
    read_pattern(
        tmp_path / "a.zarr", spec={**SPEC, "name": "uap_all", "budget": {"fraction": 1.0}}
    )  # budget: no re-learning


def universal_config(entry):
    return {
        "samples": "results/demo/samples.csv",
        "classes": ["normal", "tumor"],
        "encoders": ["demo"],
        "attacks": {"uap": entry},
    }


def test_config_fills_the_universal_defaults_and_refuses_what_it_cannot_do():
    entry = wsiconfig.validate_config(universal_config({"method": "universal", "eps": "4/255"}))["attacks"]["uap"]
    assert {k: entry[k] for k in ("steps", "train_tiles", "batch_tiles")} == {
        "steps": 100,
        "train_tiles": 8,
        "batch_tiles": 16,
    }
    assert (
        entry["step_size"] == pytest.approx(2.5 * 4 / 255 / 100) and attack_norm(entry) == "linf" and is_derived(entry)
    )
    for extra, message in (
        ({"selection": "vulnerability"}, r"attacks\.uap\.selection: a universal perturbation"),
        (
            {"objective": "mil_cross_entropy"},
            r"attacks\.uap\.objective: a universal perturbation is learned label-free",
        ),
        ({"momentum": 1.0}, r"attacks\.uap\.momentum: not a parameter of method 'universal'"),
        ({"train_tiles": 0}, r"attacks\.uap\.train_tiles"),
    ):
        with pytest.raises(ConfigError, match=message):
            wsiconfig.validate_config(universal_config({"method": "universal", "eps": "4/255", **extra}))
