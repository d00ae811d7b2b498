"""evaluate and train_mil hold one slide's bag at a time, whatever the cohort size (#18)."""

from __future__ import annotations

import importlib.util
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from wsiattack import stores
from wsiattack.errors import CohortError
from wsiattack.evaluation import evaluate_attack
from wsiattack.mil import load_mil_checkpoint
from wsiattack.mil.folds import FeatureBags, train_fold, usable
from wsiattack.mil.training import MILTrainingSpec, train_mil

CLASSES = ["normal", "tumor"]


def _bench():
    """The cohort writer of tests/benchmarks/bench_cohort_memory.py (one definition, and the bench cannot rot)."""
    path = Path(__file__).parent / "benchmarks" / "bench_cohort_memory.py"
    module_spec = importlib.util.spec_from_file_location("bench_cohort_memory", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def write_cohort(root, *, n_slides=12):
    return _bench().write_cohort(root, n_slides=n_slides, n_tiles=30, dim=8, folds=3, k=2)["models"]


@pytest.fixture
def live_bags(monkeypatch):
    """The most bags read from the stores that were alive at once."""
    alive, peak = [], [0]
    read = FeatureBags.__getitem__

    def spy(self, slide_id):
        bag = read(self, slide_id)
        alive.append(weakref.ref(bag))
        peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
        return bag

    monkeypatch.setattr(FeatureBags, "__getitem__", spy)
    return peak


def test_evaluate_reads_one_bag_at_a_time(tmp_path, live_bags):
    models = write_cohort(tmp_path)
    table = evaluate_attack(
        splits_csv=tmp_path / "splits.csv",
        model_paths=models,
        feature_stores=stores.slide_stores([tmp_path / "features"]),
        reembedded_stores=stores.slide_stores([tmp_path / "reembedded"]),
        classes=CLASSES,
    )
    assert len(table) == 12 and table["k"].eq(2).all()
    assert live_bags[0] <= 2  # the slide scored and the previous one until its name is rebound; not 12


def test_training_reads_one_bag_per_step_and_matches_in_memory_bags(tmp_path, live_bags):
    write_cohort(tmp_path)
    spec = {
        "fold": 0,
        "model": "abmil",
        "epochs": 3,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "seed": 0,
        "patience": 5,
        "val_fraction": 0.0,
        "classes": CLASSES,
    }
    features = stores.slide_stores([tmp_path / "features"])
    train_fold(splits_csv=tmp_path / "splits.csv", feature_stores=features, spec=spec, out_model=tmp_path / "m.pt")
    assert live_bags[0] <= 2  # the step's bag and the previous one until it is replaced; not 8
    # the same training on bags held in memory gives the same head
    bags = FeatureBags(features)
    splits = pd.read_csv(tmp_path / "splits.csv")
    train = usable(splits, bags).query("fold != 0")
    in_memory = [bags[s] for s in train["slide_id"]]
    labels = [CLASSES.index(y) for y in train["label"]]
    training = MILTrainingSpec(model="abmil", epochs=3, lr=1e-3, weight_decay=0.0, seed=0, patience=5, hparams={})
    reference = train_mil(bags=in_memory, labels=labels, n_classes=2, spec=training)
    trained, _ = load_mil_checkpoint(tmp_path / "m.pt")
    for (name, a), b in zip(trained.state_dict().items(), reference.model.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_usable_reads_shapes_only(tmp_path, live_bags):
    write_cohort(tmp_path, n_slides=4)
    bags = FeatureBags(stores.slide_stores([tmp_path / "features"]))
    assert len(usable(pd.read_csv(tmp_path / "splits.csv"), bags)) == 4
    assert live_bags[0] == 0 and bags.n_tiles("s00000") == 30


def test_a_bad_later_bag_is_still_one_clear_error():
    spec = MILTrainingSpec(model="abmil", epochs=1, lr=1e-3, weight_decay=0.0, seed=0, patience=5, hparams={})
    bags = [np.zeros((3, 4), np.float32), np.zeros((3, 5), np.float32)]
    with pytest.raises(CohortError, match=r"bag 1 has shape \(3, 5\); expected \(N >= 1, 4\)"):
        train_mil(bags=bags, labels=[0, 1], n_classes=2, spec=spec)
