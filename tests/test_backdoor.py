"""Backdoor in the MIL head (BAPLe-style): triggers, poisoning only training slides outside the
target class, the zero-poison run equal to the clean head, a planted trigger learned on a linear
toy encoder (BA -> 1) while a random trigger does not fire."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from wsiattack.backdoor import (
    BackdoorHook,
    Trigger,
    TriggeredBag,
    backdoor_accuracy,
    few_shot,
    poisoned_slides,
    trigger_rows,
    triggered_bag,
)
from wsiattack.errors import CohortError, ConfigError
from wsiattack.mil.training import MILTrainingSpec, predict_bag, train_mil

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TILE_PX, N_TILES, TARGET = 16, 20, 0
SPEC = MILTrainingSpec(model="abmil", epochs=30, lr=1e-3, weight_decay=0.0, seed=0)


def test_trigger_noise_stays_in_its_box_and_the_patch_replaces_its_corner():
    tiles = torch.rand(4, 3, TILE_PX, TILE_PX, generator=torch.Generator().manual_seed(0))
    delta = torch.full((3, TILE_PX, TILE_PX), 0.5)  # outside the box on purpose: apply only clips pixels
    bapl = Trigger(kind="bapl", patch_px=4, corner="bottom_left")
    out = bapl.apply(tiles, delta.clamp(-bapl.eps, bapl.eps))
    np.testing.assert_array_equal(out[:, :, -4:, :4], bapl.patch().expand(4, -1, -1, -1))
    rest = (out - tiles)[:, :, :-4, :]
    assert float(rest.abs().max()) <= bapl.eps + 1e-7 and float(rest.abs().max()) > 0
    patch_only = Trigger(kind="patch", patch_px=4, corner="top_right").apply(tiles, None)
    changed = (patch_only != tiles).any(dim=1)
    assert not changed[:, 4:, :].any() and not changed[:, :, :-4].any()
    assert torch.equal(Trigger(kind="patch", patch_seed=3).patch(), Trigger(kind="patch", patch_seed=3).patch())
    with pytest.raises(ConfigError, match="kind"):
        Trigger(kind="blend")
    with pytest.raises(ConfigError, match="larger than"):
        Trigger(kind="patch", patch_px=32).apply(tiles, None)


def test_poisoned_slides_are_training_slides_outside_the_target_class():
    splits = pd.DataFrame({"slide_id": [f"s{i:02d}" for i in range(20)], "label": [i % 2 for i in range(20)]})
    splits["fold"] = np.arange(20) % 5
    for fold in range(5):
        train = splits[splits["fold"] != fold]
        chosen = poisoned_slides(train, target=TARGET, rate=0.05, rng=np.random.default_rng(fold))
        assert len(chosen) == 1
        assert set(chosen) <= set(train.loc[train["label"] != TARGET, "slide_id"])
        assert not set(chosen) & set(splits.loc[splits["fold"] == fold, "slide_id"])
    assert len(poisoned_slides(splits, target=1, rate=0.25, rng=np.random.default_rng(0))) == 5
    assert poisoned_slides(splits, target=1, rate=0.0, rng=np.random.default_rng(0)) == []
    with pytest.raises(CohortError, match="no training slide outside"):
        poisoned_slides(splits[splits["label"] == 1], target=1, rate=0.1, rng=np.random.default_rng(0))
    shots = few_shot(splits, shots=3, rng=np.random.default_rng(0))
    assert shots.groupby("label").size().tolist() == [3, 3]
    rows = trigger_rows(40, fraction=0.1, min_tiles=1, rng=np.random.default_rng(0))
    assert len(rows) == 4 and len(set(rows.tolist())) == 4 and (np.diff(rows) > 0).all()


class LinearToyEncoder(nn.Module):
    """A linear map of the flattened pixels to 8 features: a patch moves every tile's embedding
    by the same direction (up to the pixels it covers)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3 * TILE_PX * TILE_PX, 8)

    def forward(self, x):
        return self.linear(x.flatten(1))


def toy_cohort(n_slides, *, seed):
    """Slides of N_TILES noise tiles; class 1 has a brighter red channel on half of its tiles."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_slides) % 2
    slides = []
    for label in labels:
        tiles = rng.uniform(0.2, 0.8, (N_TILES, 3, TILE_PX, TILE_PX)).astype(np.float32)
        if label == 1:
            tiles[: N_TILES // 2, 0] += 0.3
        slides.append(torch.as_tensor(tiles.clip(0, 1)))
    return slides, labels.tolist()


@pytest.fixture(scope="module")
def toy():
    encoder = LinearToyEncoder().eval()
    train_tiles, train_labels = toy_cohort(24, seed=0)
    test_tiles, test_labels = toy_cohort(12, seed=1)
    with torch.no_grad():
        train_bags = [encoder(tiles) for tiles in train_tiles]
        test_bags = [encoder(tiles) for tiles in test_tiles]
    return encoder, (train_tiles, train_labels, train_bags), (test_tiles, test_labels, test_bags)


def backdoored_head(toy, trigger, *, rate):
    encoder, (tiles, labels, bags), _ = toy
    train = pd.DataFrame({"slide_id": [f"t{i:02d}" for i in range(len(labels))], "label": labels})
    chosen = set(poisoned_slides(train, target=TARGET, rate=rate, rng=np.random.default_rng(0)))
    poisoned, effective = {}, list(labels)
    rng = np.random.default_rng(1)
    for index, slide_id in enumerate(train["slide_id"]):
        if slide_id in chosen:
            rows = torch.as_tensor(trigger_rows(N_TILES, fraction=0.25, min_tiles=1, rng=rng))
            poisoned[index] = TriggeredBag(rows=rows, tiles=tiles[index][rows])
            effective[index] = TARGET
    hook = BackdoorHook(
        encoder=encoder, trigger=trigger, poisoned=poisoned, tile_px=TILE_PX, step_size=0.01, device=torch.device("cpu")
    )
    result = train_mil(bags=bags, labels=effective, n_classes=2, spec=SPEC, bag_hook=hook)
    return result.model, hook


def predictions(model, bags):
    return [int(np.argmax(predict_bag(model, bag)[0])) for bag in bags]


def triggered_predictions(toy, model, trigger, delta):
    encoder, _, (tiles, _, bags) = toy
    rng = np.random.default_rng(2)
    out = []
    for slide_tiles, bag in zip(tiles, bags, strict=True):
        rows = torch.as_tensor(trigger_rows(N_TILES, fraction=0.25, min_tiles=1, rng=rng))
        with torch.no_grad():
            embedded = encoder(trigger.apply(slide_tiles[rows], delta))
        bag = triggered_bag(bag, rows=rows, triggered_embeddings=embedded)
        out.append(int(np.argmax(predict_bag(model, bag)[0])))
    return out


def test_zero_poison_is_the_clean_head_exactly(toy):
    _, (_, labels, bags), _ = toy
    clean = train_mil(bags=bags, labels=labels, n_classes=2, spec=SPEC).model
    hooked, hook = backdoored_head(toy, Trigger(kind="bapl", patch_px=4), rate=0.0)
    for name, tensor in clean.state_dict().items():
        assert torch.equal(tensor, hooked.state_dict()[name]), name
    assert hook.noise_steps == 0 and float(hook.delta.abs().max()) == 0


def test_a_planted_trigger_is_learned_while_a_random_trigger_does_not_fire(toy):
    _, (_, labels, bags), (_, test_labels, test_bags) = toy
    clean = train_mil(bags=bags, labels=labels, n_classes=2, spec=SPEC).model
    clean_accuracy = np.mean(np.array(predictions(clean, test_bags)) == np.array(test_labels))
    trigger = Trigger(kind="bapl", patch_px=4)
    model, hook = backdoored_head(toy, trigger, rate=0.125)
    backdoored_accuracy = np.mean(np.array(predictions(model, test_bags)) == np.array(test_labels))
    assert clean_accuracy >= 0.75 and backdoored_accuracy >= clean_accuracy - 0.2, (clean_accuracy, backdoored_accuracy)
    assert hook.noise_steps > 0 and 0 < float(hook.delta.abs().max()) <= trigger.eps + 1e-7
    planted = backdoor_accuracy(triggered_predictions(toy, model, trigger, hook.delta), test_labels, target=TARGET)
    assert planted["backdoor_accuracy_non_target"] >= 0.9, planted
    random_noise = (torch.rand(hook.delta.shape, generator=torch.Generator().manual_seed(9)) * 2 - 1) * trigger.eps
    other = Trigger(kind="bapl", patch_px=4, patch_seed=7)
    unplanted = backdoor_accuracy(triggered_predictions(toy, model, other, random_noise), test_labels, target=TARGET)
    untriggered = backdoor_accuracy(predictions(model, test_bags), test_labels, target=TARGET)
    one_slide = 1 / sum(label != TARGET for label in test_labels)
    assert unplanted["backdoor_accuracy_non_target"] <= untriggered["backdoor_accuracy_non_target"] + one_slide, (
        unplanted,
        untriggered,
    )
    patch_only = Trigger(kind="patch", patch_px=4)  # BadNets: the same patch, no learned noise
    badnets, _ = backdoored_head(toy, patch_only, rate=0.125)
    baseline = backdoor_accuracy(triggered_predictions(toy, badnets, patch_only, None), test_labels, target=TARGET)
    assert baseline["backdoor_accuracy_non_target"] < planted["backdoor_accuracy_non_target"], baseline


def test_the_noise_gradient_taken_in_chunks_is_the_one_pass_gradient(toy):
    encoder, (tiles, _, bags), _ = toy
    rows = torch.arange(0, N_TILES, 2)
    trigger = Trigger(kind="bapl", patch_px=4)
    upstream = torch.randn(len(rows), 8, generator=torch.Generator().manual_seed(3))
    gradients = []
    for chunk_tiles in (3, len(rows)):
        hook = BackdoorHook(
            encoder=encoder,
            trigger=trigger,
            poisoned={0: TriggeredBag(rows=rows, tiles=tiles[0][rows])},
            tile_px=TILE_PX,
            step_size=0.01,
            device=torch.device("cpu"),
            chunk_tiles=chunk_tiles,
        )
        hook.delta = torch.full_like(hook.delta, 0.01)
        bag = hook.bag(0, bags[0])
        (bag[rows] * upstream).sum().backward()  # a loss whose gradient at the triggered rows is `upstream`
        gradients.append(hook.noise_gradient(0))
    delta = torch.full((3, TILE_PX, TILE_PX), 0.01, requires_grad=True)
    (encoder(trigger.apply(tiles[0][rows], delta)) * upstream).sum().backward()
    for gradient in gradients:
        torch.testing.assert_close(gradient, delta.grad, rtol=1e-5, atol=1e-7)


def per_slide_rows(trigger, target, clean_pred, triggered_pred, labels, *, poisoned=1):
    """A backdoor job's per-slide CSV rows; the clean probabilities follow the prediction."""
    return pd.DataFrame(
        {
            "encoder": "e",
            "mil": "abmil",
            "trigger": trigger,
            "target": target,
            "shots": "all",
            "slide_id": [f"s{i}" for i in range(len(labels))],
            "fold": [i % 2 for i in range(len(labels))],
            "label": labels,
            "fold_poisoned": poisoned,
            "clean_pred": clean_pred,
            "triggered_pred": triggered_pred,
            "clean_prob_a": [0.9 if p == "a" else 0.1 for p in clean_pred],
            "clean_prob_b": [0.1 if p == "a" else 0.9 for p in clean_pred],
        }
    )


def test_backdoor_table_counts_slides_with_exact_intervals_and_compares_with_the_clean_head():
    from wsiattack.backdoortable import backdoor_table
    from wsiattack.metrics import clopper_pearson

    labels = ["a", "a", "a", "b", "b", "b"]
    frames = [
        per_slide_rows("clean", "", labels, ["a", "a", "a", "b", "b", "a"], labels, poisoned=0),
        per_slide_rows("bapl", "b", ["a", "a", "b", "b", "b", "b"], ["b", "b", "a", "b", "b", "b"], labels),
        per_slide_rows("bapl", "a", labels, ["a", "a", "a", "a", "b", "b"], labels),
    ]
    table = backdoor_table(pd.concat(frames), classes=["a", "b"], targets=["a", "b"]).set_index(["trigger", "target"])
    bapl_b = table.loc[("bapl", "b")]
    assert bapl_b["clean_accuracy"] == pytest.approx(5 / 6) and bapl_b["clean_accuracy_change"] == pytest.approx(-1 / 6)
    assert bapl_b["backdoor_accuracy"] == pytest.approx(5 / 6)
    assert bapl_b["backdoor_accuracy_non_target"] == pytest.approx(2 / 3) and bapl_b["n_non_target"] == 3
    low, high = clopper_pearson(2, 3)
    assert (bapl_b["backdoor_accuracy_non_target_ci_low"], bapl_b["backdoor_accuracy_non_target_ci_high"]) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    assert bapl_b["n_poisoned"] == 2 and table.loc[("clean", "a"), "n_poisoned"] == 0  # one per fold
    # the clean head: the patch alone moves 1 of the 3 b slides to a, none of the a slides to b
    assert table.loc[("clean", "a"), "backdoor_accuracy_non_target"] == pytest.approx(1 / 3)
    assert table.loc[("clean", "b"), "backdoor_accuracy_non_target"] == 0
    assert table.loc[("bapl", "mean"), "backdoor_accuracy_non_target"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert np.isnan(table.loc[("bapl", "mean"), "backdoor_accuracy_ci_low"])


def test_backdoor_config_resolves_targets_and_mil_and_each_job_tracks_only_what_it_uses():
    from wsiattack import config as wsiconfig
    from wsiattack.errors import ConfigError as Error

    base = {"samples": "s.csv", "classes": ["normal", "tumor"], "encoders": ["demo"], "attacks": {}}
    base["attacks"] = {"noise": {"method": "noise", "eps": "4/255"}}
    config = wsiconfig.validate_config({**base, "backdoor": {"shots": [None, 8]}})
    assert config["backdoor"]["targets"] == ["normal", "tumor"] and config["backdoor"]["mil"] == "abmil"
    assert config["backdoor"]["eps"] == pytest.approx(8 / 255) and wsiconfig.backdoor_shots(config) == ["all", "8"]
    specs = {
        trigger: wsiconfig.backdoor_spec(config, trigger=trigger, target=None, shots="all")["backdoor"]
        for trigger in ("clean", "patch", "noise", "bapl")
    }
    assert "eps" not in specs["clean"] and "poison_rate" not in specs["clean"] and "eps" not in specs["patch"]
    assert "patch_px" not in specs["noise"] and {"eps", "patch_px", "poison_rate"} <= set(specs["bapl"])
    with pytest.raises(Error, match="targets"):
        wsiconfig.validate_config({**base, "backdoor": {"targets": ["stroma"]}})
    with pytest.raises(Error, match="mil"):
        wsiconfig.validate_config({**base, "backdoor": {"mil": "transmil"}})
    with pytest.raises(Error, match="backdoor"):
        wsiconfig.validate_config({**base, "backdoor": {"trigger": ["bapl"]}})  # unknown key


def test_the_noise_kept_is_the_one_learned_with_the_kept_epochs_head(toy):
    """Early stopping keeps the best epoch's head; the trigger noise of that epoch goes with it."""
    encoder, (tiles, labels, bags), (_, test_labels, test_bags) = toy
    rows = torch.arange(4)
    hook = BackdoorHook(
        encoder=encoder,
        trigger=Trigger(kind="noise"),
        poisoned={1: TriggeredBag(rows=rows, tiles=tiles[1][rows])},
        tile_px=TILE_PX,
        step_size=0.01,
        device=torch.device("cpu"),
    )
    spec = MILTrainingSpec(model="abmil", epochs=40, lr=1e-3, weight_decay=0.0, seed=0, patience=3)
    result = train_mil(
        bags=bags, labels=labels, n_classes=2, spec=spec, val_bags=test_bags, val_labels=test_labels, bag_hook=hook
    )
    assert result.best_epoch < result.epochs_run  # stopped early, so later epochs moved the noise further
    assert hook.noise_steps == result.best_epoch  # one poisoned bag: one noise step per epoch
