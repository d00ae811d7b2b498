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
