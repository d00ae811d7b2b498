"""Train MIL classifiers on clean bags, predict one bag, and store models without pickle."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from wsiattack.atomic import atomic_file
from wsiattack.errors import CohortError, ConfigError, StoreError
from wsiattack.mil.models import MILModel, build_mil_model, mil_model_name, slide_cross_entropy

CPU = torch.device("cpu")
logger = logging.getLogger(__name__)

# The one key of the safetensors metadata (a str -> str dict) that holds our JSON.
CHECKPOINT_METADATA_KEY = "wsiattack"
LOG_EVERY_EPOCHS = 10


@dataclass(frozen=True)
class MILTrainingSpec:
    """How to train one MIL model; ``hparams`` go to the model constructor.

    ``epochs`` is the most that run: with validation bags, training stops once the validation
    loss has not improved for ``patience`` epochs and the weights of its best epoch are kept.
    """

    model: str
    epochs: int
    lr: float
    weight_decay: float
    seed: int
    patience: int = 10
    hparams: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1:
            raise ConfigError(
                f"config: mil: epochs and patience must be >= 1, got epochs={self.epochs}, patience={self.patience}"
            )
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(
                f"config: mil: need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}"
            )


class BagHook(Protocol):
    """What ``train_mil`` asks of a hook: the bag to train on at a step, a call after the step, and
    a snapshot of what it learned, taken with the best epoch's weights and restored with them."""

    def bag(self, index: int, clean: Tensor) -> Tensor: ...

    def after_step(self, index: int) -> None: ...

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> None: ...


@dataclass(frozen=True)
class MILTrainingResult:
    """The trained model (eval mode) and how its training went, recorded in its checkpoint."""

    model: MILModel
    epochs_run: int
    best_epoch: int  # the epoch whose weights are kept (the last one without validation)
    best_val_loss: float | None  # mean weighted validation loss at best_epoch; None without validation

    def record(self) -> dict[str, Any]:
        return {"epochs_run": self.epochs_run, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss}


def train_mil(
    *,
    bags: Sequence[Tensor],
    labels: Sequence[int],
    n_classes: int,
    spec: MILTrainingSpec,
    val_bags: Sequence[Tensor] = (),
    val_labels: Sequence[int] = (),
    bag_hook: BagHook | None = None,
    device: torch.device | str = "cpu",
) -> MILTrainingResult:
    """Train ``spec.model`` on (bag, label) pairs, one bag per step, early-stopped on the val bags.

    ``device``: where the head trains; each bag crosses to it when its step takes it, and the
    returned head is on the CPU. (The result on a GPU differs from the CPU's in the last bits.)
    ``bag_hook`` works on CPU bags: with one, train on the CPU.

    Classes are weighted by inverse frequency in the training bags (in the validation loss too).
    Deterministic given the inputs and ``spec.seed``; the global torch RNG is left untouched.
    ``bag_hook`` (the backdoor's poisoning, ``wsiattack.backdoor``) may replace a training bag at
    each step and learns along with the head; without it, or with one that changes no bag, the
    result is the clean training's.
    """
    device = torch.device(device)
    if bag_hook is not None and device.type != "cpu":
        raise ConfigError(f"train_mil: a bag hook works on CPU bags; train on the CPU, not {device}")
    bags = _FloatBags(bags, device=device)
    targets = _check_labels(labels, n_bags=len(bags), n_classes=n_classes).to(device)
    validation = _FloatBags(val_bags, in_dim=bags.in_dim, device=device) if len(val_bags) else []
    val_targets = _check_labels(val_labels, n_bags=len(validation), n_classes=n_classes).to(device)
    class_weights = _class_balanced_weights(targets.cpu(), n_classes=n_classes).to(device)
    # Init and dropout draw from the global RNG (dropout on a GPU from its own): fork both so that
    # training is seeded by the spec alone and the caller's RNG streams are the same afterwards.
    with torch.random.fork_rng(devices=_cuda_indices(device)):
        torch.manual_seed(spec.seed)
        model = build_mil_model(spec.model, in_dim=bags.in_dim, n_classes=n_classes, **spec.hparams).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        order_generator = torch.Generator().manual_seed(spec.seed)
        best_epoch, best_loss, best_state, best_hook = 0, math.inf, None, None
        for epoch in range(1, spec.epochs + 1):
            order = torch.randperm(len(bags), generator=order_generator)
            train_loss = _train_epoch(
                model=model,
                optimizer=optimizer,
                bags=bags,
                targets=targets,
                class_weights=class_weights,
                order=order,
                bag_hook=bag_hook,
            )
            val_loss = _mean_loss(model, validation, val_targets, class_weights=class_weights) if validation else None
            if epoch == 1 or epoch % LOG_EVERY_EPOCHS == 0 or epoch == spec.epochs:
                shown = "" if val_loss is None else f", validation {val_loss:.4f}"
                logger.info(
                    "%s epoch %d/%d: mean weighted loss %.4f%s", spec.model, epoch, spec.epochs, train_loss, shown
                )
            if val_loss is None:
                best_epoch = epoch
            elif val_loss < best_loss:
                best_epoch, best_loss = epoch, val_loss
                best_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
                best_hook = bag_hook.snapshot() if bag_hook is not None else None
            elif epoch - best_epoch >= spec.patience:
                logger.info(
                    "%s: stopped after epoch %d, keeping epoch %d (validation %.4f)",
                    spec.model,
                    epoch,
                    best_epoch,
                    best_loss,
                )
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        if bag_hook is not None:
            bag_hook.restore(best_hook)
    return MILTrainingResult(
        model=model.cpu().eval(),
        epochs_run=epoch,
        best_epoch=best_epoch,
        best_val_loss=None if best_state is None else best_loss,
    )


def _train_epoch(
    *,
    model: MILModel,
    optimizer: torch.optim.Optimizer,
    bags: Sequence[Tensor],
    targets: Tensor,
    class_weights: Tensor,
    order: Tensor,
    bag_hook: BagHook | None = None,
) -> float:
    model.train()
    total = 0.0
    for index in order.tolist():
        optimizer.zero_grad()
        bag = bags[index] if bag_hook is None else bag_hook.bag(index, bags[index])
        loss = model.loss(bag, targets[index : index + 1], class_weights=class_weights)
        loss.backward()
        optimizer.step()
        if bag_hook is not None:
            bag_hook.after_step(index)
        total += loss.item()
    return total / len(order)


def _mean_loss(model: MILModel, bags: Sequence[Tensor], targets: Tensor, *, class_weights: Tensor) -> float:
    """Mean weighted slide cross-entropy in eval mode (the early-stopping criterion)."""
    model.eval()
    with torch.inference_mode():
        losses = [
            slide_cross_entropy(model(bag)[0], targets[i : i + 1], class_weights=class_weights).item()
            for i, bag in enumerate(bags)
        ]
    return float(np.mean(losses))


class _FloatBags(Sequence[Tensor]):
    """float32 CPU bags, each converted and checked when a step takes it: the bags may be read
    from disk on demand (``mil.folds.LazyBags``), so the cohort is never in memory at once."""

    def __init__(self, bags: Sequence[Tensor], *, in_dim: int | None = None, device: torch.device = CPU):
        if len(bags) == 0:
            raise CohortError("train_mil needs at least one bag")
        self._bags, self._device = bags, device
        first = torch.as_tensor(bags[0], dtype=torch.float32, device="cpu")  # read once, checked before training
        self.in_dim = int(first.shape[-1]) if in_dim is None else in_dim
        self._checked(0, first)

    def __getitem__(self, index):  # noqa: ANN001 (int)
        bag = self._checked(index, torch.as_tensor(self._bags[index], dtype=torch.float32, device="cpu"))
        return bag.to(self._device)

    def _checked(self, index: int, bag: Tensor) -> Tensor:
        if bag.ndim != 2 or bag.shape[0] == 0 or bag.shape[1] != self.in_dim:
            raise CohortError(f"bag {index} has shape {tuple(bag.shape)}; expected (N >= 1, {self.in_dim})")
        return bag

    def __len__(self) -> int:
        return len(self._bags)


def _cuda_indices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return list(range(torch.cuda.device_count()))  # manual_seed reseeds every GPU: fork them all


def _check_labels(labels: Sequence[int], *, n_bags: int, n_classes: int) -> Tensor:
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if targets.shape != (n_bags,):
        raise CohortError(f"got {n_bags} bags but labels of shape {tuple(targets.shape)}")
    if n_bags and (targets.min() < 0 or targets.max() >= n_classes):
        raise CohortError(f"labels must be class indices in [0, {n_classes}), got {sorted(set(targets.tolist()))}")
    return targets


def _class_balanced_weights(targets: Tensor, *, n_classes: int) -> Tensor:
    """Inverse class frequency, scaled so the mean weight over training bags is 1.

    Classes absent from the training bags get weight 0 (they never occur as a target).
    """
    counts = torch.bincount(targets, minlength=n_classes).to(torch.float32)
    present = counts > 0
    weights = torch.zeros(n_classes)
    weights[present] = len(targets) / (int(present.sum()) * counts[present])
    return weights


def predict_bag(model: nn.Module, features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One bag -> (class probabilities (n_classes,), attention (N,)) as float64, in eval mode."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.inference_mode():
            logits, attention = model(torch.as_tensor(features, dtype=torch.float32, device=device))
            probabilities = torch.softmax(logits, dim=-1)
    finally:
        model.train(was_training)
    return probabilities.double().cpu().numpy(), attention.double().cpu().numpy()


def save_mil_checkpoint(path: Path, *, model: nn.Module, meta: Mapping[str, Any]) -> None:
    """Write weights + JSON metadata to one safetensors file, atomically (no pickle).

    ``meta`` must be JSON-serialisable; model, in_dim, n_classes and hparams are recorded from the
    model itself, so ``meta`` may repeat them (e.g. a rule's spec) but not contradict them.
    """
    path = Path(path)
    recorded = {
        "model": mil_model_name(model),
        "in_dim": model.in_dim,
        "n_classes": model.n_classes,
        "hparams": dict(model.hparams),
    }
    contradicting = sorted(key for key in set(meta) & set(recorded) if meta[key] != recorded[key])
    if contradicting:
        found = {key: recorded[key] for key in contradicting}
        raise ValueError(f"meta contradicts the model on {contradicting}: the model has {found}")
    metadata = {**meta, **recorded}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={CHECKPOINT_METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def load_mil_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_mil_checkpoint`; return (model in eval mode, metadata).

    The metadata holds model, in_dim, n_classes, hparams and the keys of the saved ``meta``.
    """
    with safe_open(str(path), framework="pt") as checkpoint:
        stored = (checkpoint.metadata() or {}).get(CHECKPOINT_METADATA_KEY)
    if stored is None:
        raise StoreError(f"{path}: not a wsiattack MIL checkpoint (no {CHECKPOINT_METADATA_KEY!r} metadata)")
    metadata = json.loads(stored)
    model = build_mil_model(
        metadata["model"], in_dim=metadata["in_dim"], n_classes=metadata["n_classes"], **metadata["hparams"]
    )
    model.load_state_dict(load_file(path), strict=True)
    return model.eval(), metadata
