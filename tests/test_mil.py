"""MIL models, cross-validation splits, training and checkpoints."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from wsiattack.errors import ConfigError
from wsiattack.mil import (
    MIL_MODELS,
    MILTrainingSpec,
    build_mil_model,
    load_mil_checkpoint,
    make_splits,
    predict_bag,
    save_mil_checkpoint,
    train_mil,
)
from wsiattack.mil.models import NystromAttention, _iterative_pinv, _nystrom_mix
from wsiattack.mil.splits import inner_validation

IN_DIM = 16
SPEC = MILTrainingSpec(
    model="abmil",
    epochs=15,
    lr=1e-3,
    weight_decay=1e-4,
    seed=3,
    hparams={"hidden_dim": 32, "attention_dim": 16, "dropout": 0.1},
)


# --- models (every registered head) ------------------------------------------------------------

HEADS = sorted(MIL_MODELS)
ORDER_INVARIANT = [name for name in HEADS if name != "transmil"]  # TransMIL's PPEG sees tile order
SMALL = {"hidden_dim": 8}


def _head(name: str, **hparams) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mil_model(name, in_dim=IN_DIM, n_classes=3, **{**SMALL, **hparams}).eval()


def test_the_six_heads_are_registered() -> None:
    assert set(MIL_MODELS) == {"abmil", "clam_sb", "dsmil", "transmil", "max", "mean"}


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("n_tiles", [1, 2, 7, 50])  # 50 > TransMIL's 4 landmarks at hidden_dim 8: Nyström path
def test_head_shapes_and_tile_weights_are_a_distribution(name: str, n_tiles: int) -> None:
    logits, weights = _head(name)(torch.randn(n_tiles, IN_DIM))
    assert logits.shape == (3,) and weights.shape == (n_tiles,)
    assert torch.isfinite(logits).all()
    assert (weights >= 0).all()
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ORDER_INVARIANT)
def test_head_is_permutation_invariant(name: str) -> None:
    model, features, permutation = _head(name), torch.randn(11, IN_DIM), torch.randperm(11)
    logits, weights = model(features)
    permuted_logits, permuted_weights = model(features[permutation])
    torch.testing.assert_close(permuted_weights, weights[permutation])
    torch.testing.assert_close(permuted_logits, logits)


def test_transmil_sees_tile_order() -> None:
    model, features = _head("transmil"), torch.randn(11, IN_DIM)
    assert not torch.allclose(model(features)[0], model(features.flip(0))[0])


@pytest.mark.parametrize("name", HEADS)
def test_head_rejects_wrong_feature_shape(name: str) -> None:
    model = _head(name)
    for bad in (torch.randn(1, 4, IN_DIM), torch.randn(0, IN_DIM), torch.randn(3, IN_DIM + 1)):
        with pytest.raises(ValueError, match="expected one non-empty bag"):
            model(bad)


def test_pooling_heads_are_the_mean_and_the_max_of_instance_logits() -> None:
    features = torch.randn(9, IN_DIM)
    for name, pool in (("mean", lambda x: x.mean(0)), ("max", lambda x: x.max(0).values)):
        model = _head(name)
        instance_logits = model.classifier(model.embed(features))
        logits, weights = model(features)
        torch.testing.assert_close(logits, pool(instance_logits))
        # weights rank tiles by the predicted class's instance score
        assert torch.equal(weights.argsort(), instance_logits[:, logits.argmax()].argsort())


def test_nystrom_is_exact_with_one_landmark_per_token_and_pinv_converges() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 4, generator=generator) for _ in range(3))
    exact = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    torch.testing.assert_close(_nystrom_mix(q, k, v, landmarks=12, pinv_iterations=20), exact, atol=1e-4, rtol=1e-3)
    kernel = torch.softmax(torch.randn(2, 6, 6, generator=generator), dim=-1)
    torch.testing.assert_close(_iterative_pinv(kernel, 20), torch.linalg.pinv(kernel), atol=1e-3, rtol=1e-3)
    attention = NystromAttention(8, heads=2, landmarks=4, dropout=0.0)
    assert attention.query_attention(torch.randn(5, 8), row=0).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_clam_instance_loss_trains_the_bag_class_instance_classifier() -> None:
    model = _head("clam_sb", k_sample=3).train()
    features, target, weights = torch.randn(10, IN_DIM), torch.tensor([2]), torch.ones(3)
    loss = model.loss(features, target, class_weights=weights)
    loss.backward()
    grads = [classifier.weight.grad for classifier in model.instance_classifiers]
    assert grads[2] is not None and grads[2].abs().sum() > 0
    assert grads[0] is None and grads[1] is None  # binary clustering: the other classes' are untouched
    model.eval()  # one tile has no pairs to contrast: the bag loss alone
    torch.testing.assert_close(
        model.loss(features[:1], target, class_weights=weights),
        torch.nn.functional.cross_entropy(model(features[:1])[0][None], target, reduction="sum"),
    )


def test_dsmil_loss_is_the_mean_of_its_two_streams() -> None:
    model = _head("dsmil")
    features, target, weights = torch.randn(10, IN_DIM), torch.tensor([1]), torch.ones(3)
    max_logits, bag_logits, attention = model._streams(features)
    expected = 0.5 * sum(torch.nn.functional.cross_entropy(x[None], target) for x in (max_logits, bag_logits))
    torch.testing.assert_close(model.loss(features, target, class_weights=weights), expected)
    torch.testing.assert_close(attention.sum(0), torch.ones(3))  # per class, a distribution over tiles


def test_build_mil_model_passes_hparams_and_rejects_unknown_ones() -> None:
    assert build_mil_model("transmil", in_dim=IN_DIM, n_classes=2, hidden_dim=8, heads=2).hparams["heads"] == 2
    with pytest.raises(TypeError):
        build_mil_model("mean", in_dim=IN_DIM, n_classes=2, attention_dim=8)
    with pytest.raises(ValueError, match="not divisible by heads"):
        build_mil_model("transmil", in_dim=IN_DIM, n_classes=2, hidden_dim=10, heads=4)
    with pytest.raises(ValueError, match="dropout"):
        build_mil_model("abmil", in_dim=IN_DIM, n_classes=2, dropout=1.0)


def test_build_mil_model_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError, match=r"unknown MIL model 'vit'.*abmil.*transmil"):
        build_mil_model("vit", in_dim=IN_DIM, n_classes=2)


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


def test_too_few_slides_per_class_fails_the_split_rule_with_one_line(tmp_path, capsys) -> None:
    """Through the rule script itself: one line naming the class and the fold count, exit 1, no splits."""

    rows = []
    for i, label in enumerate(["A"] * 6 + ["B"] * 2):
        (tmp_path / f"s{i}.tiff").write_bytes(b"")
        rows.append({"slide_id": f"s{i}", "path": f"s{i}.tiff", "label": label})
    pd.DataFrame(rows).to_csv(tmp_path / "samples.csv", index=False)
    out = tmp_path / "splits.csv"
    smk = SimpleNamespace(
        input=SimpleNamespace(samples=str(tmp_path / "samples.csv")),
        output=SimpleNamespace(splits=str(out)),
        params=SimpleNamespace(spec=json.dumps({"folds": 3, "seed": 0, "classes": ["A", "B"]})),
        log=[str(tmp_path / "split.log")],
        threads=1,
    )
    script = Path(__file__).resolve().parents[1] / "workflow_scripts" / "split.py"
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), init_globals={"snakemake": smk}, run_name="__main__")
    assert exited.value.code == 1 and not out.exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and re.search(r"class 'B' has 2 slides.*folds=3", errors[0])
    assert "Traceback" not in (tmp_path / "split.log").read_text()


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
    return train_mil(bags=bags, labels=labels, n_classes=2, spec=SPEC).model


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
    first = train_mil(bags=bags, labels=labels, n_classes=2, spec=spec).model.state_dict()
    assert torch.equal(torch.get_rng_state(), rng_state)
    torch.manual_seed(123)  # a different global state must not matter either
    second = train_mil(bags=bags, labels=labels, n_classes=2, spec=spec).model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_train_mil_takes_a_device_and_returns_a_cpu_head() -> None:
    """The device path (bags, targets and weights moved per step; the head back on the CPU) as far
    as a CPU shows it; tests/gpu/check.py trains the same head on a GPU and on the CPU and compares."""
    bags, labels, _ = _synthetic_bags(n_bags=6, seed=4)
    spec = MILTrainingSpec(model="abmil", epochs=2, lr=1e-3, weight_decay=0.0, seed=5, hparams={"hidden_dim": 8})
    default = train_mil(bags=bags, labels=labels, n_classes=2, spec=spec).model
    on_cpu = train_mil(bags=bags, labels=labels, n_classes=2, spec=spec, device=torch.device("cpu")).model
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    assert all(
        torch.equal(a, b) for a, b in zip(default.state_dict().values(), on_cpu.state_dict().values(), strict=True)
    )
    with pytest.raises(ConfigError, match="a bag hook works on CPU bags"):
        train_mil(bags=bags, labels=labels, n_classes=2, spec=spec, bag_hook=object(), device="cuda")


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


# --- every head trained, early stopping, inner validation ---------------------------------------

HEAD_SPEC = {"epochs": 12, "lr": 2e-3, "weight_decay": 1e-4, "seed": 3}


@pytest.fixture(scope="module")
def trained_heads() -> dict[str, torch.nn.Module]:
    bags, labels, _ = _synthetic_bags(n_bags=80, seed=1)
    return {
        name: train_mil(
            bags=bags,
            labels=labels,
            n_classes=2,
            spec=MILTrainingSpec(model=name, hparams={"hidden_dim": 32}, **HEAD_SPEC),
        ).model
        for name in HEADS
    }


@pytest.mark.parametrize("name", HEADS)
def test_every_head_learns_a_toy_mil_task_and_weighs_the_key_instances(name: str, trained_heads, held_out) -> None:
    model = trained_heads[name]
    predictions, on_shifted, on_others = [], [], []
    for bag, label, shifted in zip(*held_out, strict=True):
        probabilities, weights = predict_bag(model, bag)
        predictions.append(int(np.argmax(probabilities)))
        if label == 1:
            on_shifted.append(weights[shifted.numpy()].mean())
            on_others.append(weights[~shifted.numpy()].mean())
    assert np.mean(np.array(predictions) == np.array(held_out[1])) >= 0.9
    assert np.mean(on_shifted) > 2 * np.mean(on_others)


@pytest.mark.parametrize("name", HEADS)
def test_every_head_survives_a_checkpoint_round_trip(tmp_path, name: str, trained_heads, held_out) -> None:
    path = tmp_path / f"{name}.safetensors"
    save_mil_checkpoint(path, model=trained_heads[name], meta={"fold": 0})
    loaded, metadata = load_mil_checkpoint(path)
    assert type(loaded) is type(trained_heads[name]) and metadata["model"] == name
    assert metadata["hparams"] == trained_heads[name].hparams
    for bag in held_out[0][:3]:
        for original, reloaded in zip(predict_bag(trained_heads[name], bag), predict_bag(loaded, bag), strict=True):
            np.testing.assert_array_equal(original, reloaded)


def test_early_stopping_keeps_the_best_validation_epoch() -> None:
    bags, labels, _ = _synthetic_bags(n_bags=20, seed=5)
    val_bags, val_labels, _ = _synthetic_bags(n_bags=10, seed=6)
    noisy = [1 - label if i % 3 == 0 else label for i, label in enumerate(labels)]  # overfits: val loss turns
    spec = MILTrainingSpec(
        model="abmil", epochs=60, lr=5e-3, weight_decay=0.0, seed=0, patience=3, hparams={"hidden_dim": 16}
    )
    result = train_mil(bags=bags, labels=noisy, n_classes=2, spec=spec, val_bags=val_bags, val_labels=val_labels)
    assert result.epochs_run < spec.epochs
    assert result.epochs_run - result.best_epoch == spec.patience
    from wsiattack.mil.training import _class_balanced_weights, _mean_loss

    weights = _class_balanced_weights(torch.tensor(noisy), n_classes=2)
    kept = _mean_loss(
        result.model, [torch.as_tensor(b) for b in val_bags], torch.tensor(val_labels), class_weights=weights
    )
    assert kept == pytest.approx(result.best_val_loss, rel=1e-6)
    without = train_mil(bags=bags, labels=noisy, n_classes=2, spec=spec)
    assert (without.epochs_run, without.best_epoch, without.best_val_loss) == (60, 60, None)


def test_inner_validation_is_stratified_grouped_and_seeded() -> None:
    samples = _patient_slides()
    mask = inner_validation(samples, fraction=0.25, seed=0)
    assert mask.index.equals(samples.index)
    assert 0.15 < mask.mean() < 0.35
    assert set(samples["label"][mask]) == set(samples["label"][~mask]) == {"A", "B"}
    patients_in_val = set(samples["patient_id"][mask])
    assert patients_in_val.isdisjoint(samples["patient_id"][~mask])
    assert mask.equals(inner_validation(samples, fraction=0.25, seed=0))
    assert not mask.equals(inner_validation(samples, fraction=0.25, seed=1))


def test_inner_validation_refuses_too_few_slides_per_class() -> None:
    with pytest.raises(
        ValueError, match=r"inner validation split \(val_fraction=0.2\).*class 'B' has 3 slides.*set it to 0"
    ):
        inner_validation(_slides(10, 3), fraction=0.2, seed=0)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 0.5\)"):
        inner_validation(_slides(10, 10), fraction=0.5, seed=0)
