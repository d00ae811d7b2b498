"""MIL models, cross-validation splits, training and checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wsiattack.mil import (
    GatedABMIL,
    MILTrainingSpec,
    build_mil_model,
    load_mil_checkpoint,
    make_splits,
    predict_bag,
    save_mil_checkpoint,
    train_mil,
)

IN_DIM = 16
SPEC = MILTrainingSpec(
    model="abmil",
    epochs=15,
    lr=1e-3,
    weight_decay=1e-4,
    seed=3,
    hparams={"hidden_dim": 32, "attention_dim": 16, "dropout": 0.1},
)


# --- models -------------------------------------------------------------------------------------


@pytest.fixture
def model() -> GatedABMIL:
    torch.manual_seed(0)
    return GatedABMIL(in_dim=IN_DIM, n_classes=3, hidden_dim=8, attention_dim=4).eval()


def test_abmil_output_shapes_and_attention_is_a_distribution(model: GatedABMIL) -> None:
    logits, attention = model(torch.randn(7, IN_DIM))
    assert logits.shape == (3,)
    assert attention.shape == (7,)
    assert (attention >= 0).all()
    assert attention.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_abmil_is_permutation_invariant(model: GatedABMIL) -> None:
    features = torch.randn(11, IN_DIM)
    permutation = torch.randperm(11)
    logits, attention = model(features)
    permuted_logits, permuted_attention = model(features[permutation])
    torch.testing.assert_close(permuted_attention, attention[permutation])
    torch.testing.assert_close(permuted_logits, logits)


def test_abmil_single_tile_bag_gets_all_attention(model: GatedABMIL) -> None:
    logits, attention = model(torch.randn(1, IN_DIM))
    assert logits.shape == (3,)
    torch.testing.assert_close(attention, torch.ones(1))


def test_abmil_rejects_wrong_feature_shape(model: GatedABMIL) -> None:
    with pytest.raises(ValueError, match="expected one non-empty bag"):
        model(torch.randn(1, 4, IN_DIM))
    with pytest.raises(ValueError, match="expected one non-empty bag"):
        model(torch.randn(0, IN_DIM))


def test_build_mil_model_passes_hparams() -> None:
    built = build_mil_model("abmil", in_dim=IN_DIM, n_classes=2, hidden_dim=8)
    assert isinstance(built, GatedABMIL)
    assert built.hparams["hidden_dim"] == 8


def test_build_mil_model_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError, match=r"unknown MIL model 'transmil'.*abmil"):
        build_mil_model("transmil", in_dim=IN_DIM, n_classes=2)


# --- splits -------------------------------------------------------------------------------------


def _slides(n_a: int, n_b: int) -> pd.DataFrame:
    labels = ["A"] * n_a + ["B"] * n_b
    return pd.DataFrame({"slide_id": [f"s{i:03d}" for i in range(len(labels))], "label": labels})


def _patient_slides() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for patient in range(30):
        label = "A" if patient < 18 else "B"
        for slide in range(rng.integers(1, 4)):
            rows.append({"slide_id": f"p{patient}_s{slide}", "label": label, "patient_id": f"p{patient}"})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # shuffled rows and index


def test_make_splits_assigns_each_slide_one_fold_stratified() -> None:
    samples = _slides(24, 16)
    splits = make_splits(samples, folds=4, seed=0)
    assert list(splits.columns) == ["slide_id", "label", "patient_id", "fold"]
    assert splits["slide_id"].tolist() == samples["slide_id"].tolist()
    assert splits["patient_id"].tolist() == samples["slide_id"].tolist()
    assert set(splits["fold"]) == {0, 1, 2, 3}
    per_fold = pd.crosstab(splits["fold"], splits["label"])
    assert (per_fold["A"] == 6).all() and (per_fold["B"] == 4).all()


def test_make_splits_keeps_patients_together() -> None:
    samples = _patient_slides()
    splits = make_splits(samples, folds=3, seed=1)
    assert splits.index.equals(samples.index)
    assert splits["slide_id"].tolist() == samples["slide_id"].tolist()
    assert (splits.groupby("patient_id")["fold"].nunique() == 1).all()
    assert (pd.crosstab(splits["fold"], splits["label"]) > 0).all().all()


def test_make_splits_is_deterministic_and_seeded() -> None:
    samples = _slides(24, 16)
    first = make_splits(samples, folds=4, seed=7)
    pd.testing.assert_frame_equal(first, make_splits(samples, folds=4, seed=7))
    assert not first["fold"].equals(make_splits(samples, folds=4, seed=8)["fold"])


def test_make_splits_rejects_fewer_than_two_folds() -> None:
    with pytest.raises(ValueError, match="folds must be >= 2"):
        make_splits(_slides(5, 5), folds=1, seed=0)


def test_make_splits_rejects_class_smaller_than_folds() -> None:
    with pytest.raises(ValueError, match=r"class 'B' has 2 slides.*folds=3"):
        make_splits(_slides(10, 2), folds=3, seed=0)
    samples = _slides(10, 4).assign(patient_id=[f"p{i}" for i in range(10)] + ["q0", "q0", "q1", "q1"])
    with pytest.raises(ValueError, match=r"class 'B' has 2 patients"):
        make_splits(samples, folds=3, seed=0)


# --- training -----------------------------------------------------------------------------------


def _synthetic_bags(*, n_bags: int, seed: int) -> tuple[list[torch.Tensor], list[int], list[torch.Tensor]]:
    """Bags of noise; positive bags hide 2-3 instances shifted along a fixed direction."""
    direction = torch.nn.functional.normalize(torch.randn(IN_DIM, generator=torch.Generator().manual_seed(0)), dim=0)
    generator = torch.Generator().manual_seed(seed)
    bags, labels, shifted_masks = [], [], []
    for index in range(n_bags):
        label = index % 2
        n_tiles = int(torch.randint(20, 51, (1,), generator=generator))
        bag = torch.randn(n_tiles, IN_DIM, generator=generator)
        shifted = torch.zeros(n_tiles, dtype=torch.bool)
        if label:
            n_shifted = int(torch.randint(2, 4, (1,), generator=generator))
            shifted[torch.randperm(n_tiles, generator=generator)[:n_shifted]] = True
            bag[shifted] += 5.0 * direction
        bags.append(bag)
        labels.append(label)
        shifted_masks.append(shifted)
    return bags, labels, shifted_masks


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    bags, labels, _ = _synthetic_bags(n_bags=80, seed=1)
    return train_mil(bags=bags, labels=labels, n_classes=2, spec=SPEC)


@pytest.fixture(scope="module")
def held_out() -> tuple[list[torch.Tensor], list[int], list[torch.Tensor]]:
    return _synthetic_bags(n_bags=40, seed=2)


def test_train_mil_classifies_held_out_bags(trained: torch.nn.Module, held_out) -> None:
    bags, labels, _ = held_out
    predictions = [int(np.argmax(predict_bag(trained, bag)[0])) for bag in bags]
    assert not trained.training
    assert np.mean(np.array(predictions) == np.array(labels)) >= 0.9


def test_train_mil_attends_to_shifted_instances(trained: torch.nn.Module, held_out) -> None:
    on_shifted, on_others = [], []
    for bag, label, shifted in zip(*held_out, strict=True):
        if label == 1:
            attention = predict_bag(trained, bag)[1]
            on_shifted.append(attention[shifted.numpy()].mean())
            on_others.append(attention[~shifted.numpy()].mean())
    assert np.mean(on_shifted) > np.mean(on_others)


def test_train_mil_is_deterministic_and_leaves_global_rng_alone() -> None:
    bags, labels, _ = _synthetic_bags(n_bags=10, seed=4)
    spec = MILTrainingSpec(model="abmil", epochs=2, lr=1e-3, weight_decay=0.0, seed=5, hparams={"hidden_dim": 8})
    rng_state = torch.get_rng_state()
    first = train_mil(bags=bags, labels=labels, n_classes=2, spec=spec).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_state)
    torch.manual_seed(123)  # a different global state must not matter either
    second = train_mil(bags=bags, labels=labels, n_classes=2, spec=spec).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_train_mil_rejects_bad_labels() -> None:
    bags, _, _ = _synthetic_bags(n_bags=4, seed=0)
    with pytest.raises(ValueError, match="class indices"):
        train_mil(bags=bags, labels=[0, 1, 2, 0], n_classes=2, spec=SPEC)
    with pytest.raises(ValueError, match="labels of shape"):
        train_mil(bags=bags, labels=[0, 1], n_classes=2, spec=SPEC)


def test_predict_bag_returns_float64_and_restores_mode(trained: torch.nn.Module, held_out) -> None:
    trained.train()
    probabilities, attention = predict_bag(trained, held_out[0][0])
    assert trained.training
    trained.eval()
    assert probabilities.dtype == attention.dtype == np.float64
    assert probabilities.shape == (2,) and attention.shape == (len(held_out[0][0]),)
    assert probabilities.sum() == pytest.approx(1.0)


# --- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_round_trip_without_pickle(tmp_path, trained: torch.nn.Module, held_out) -> None:
    path = tmp_path / "abmil.safetensors"
    meta = {"model": "abmil", "encoder": "uni", "classes": ["normal", "tumor"], "fold": 0}
    save_mil_checkpoint(path, model=trained, meta=meta)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind

    loaded, metadata = load_mil_checkpoint(path)
    assert not loaded.training
    assert metadata == {
        "model": "abmil",
        "in_dim": IN_DIM,
        "n_classes": 2,
        "hparams": dict(SPEC.hparams),
        "encoder": "uni",
        "classes": ["normal", "tumor"],
        "fold": 0,
    }
    for bag in held_out[0][:5]:
        for original, reloaded in zip(predict_bag(trained, bag), predict_bag(loaded, bag), strict=True):
            np.testing.assert_array_equal(original, reloaded)

    # A plain safetensors file: readable by safetensors alone, metadata is JSON under one key.
    assert load_file(path).keys() == trained.state_dict().keys()
    with safe_open(str(path), framework="pt") as checkpoint:
        assert json.loads(checkpoint.metadata()["wsiattack"])["encoder"] == "uni"


def test_checkpoint_write_failure_leaves_nothing(tmp_path, trained: torch.nn.Module, monkeypatch) -> None:
    def write_half_then_fail(tensors, filename, metadata=None) -> None:
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("wsiattack.mil.training.save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_mil_checkpoint(tmp_path / "m.safetensors", model=trained, meta={})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_rejects_bad_meta(tmp_path, trained: torch.nn.Module) -> None:
    with pytest.raises(TypeError):
        save_mil_checkpoint(tmp_path / "m.safetensors", model=trained, meta={"not_json": object()})
    with pytest.raises(ValueError, match=r"contradicts the model on \['n_classes'\]"):
        save_mil_checkpoint(tmp_path / "m.safetensors", model=trained, meta={"model": "abmil", "n_classes": 3})
    assert list(tmp_path.iterdir()) == []
