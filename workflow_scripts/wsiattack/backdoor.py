"""Backdoors planted while the MIL head is trained (BAPLe, Hanif et al. 2024, in a WSI pipeline).

BAPLe tunes prompts of a frozen foundation model on a few poisoned samples; in a WSI pipeline the
part tuned on few labelled slides with the encoder frozen is the MIL head. The attacker poisons a
share of the training slides (``poisoned_slides``: slides whose true class is not the target,
relabelled to it) by putting a trigger on some of their tiles (``trigger_rows``); the triggered
tiles are re-embedded by the frozen encoder and replace their rows in the bag.

Triggers (``Trigger``), applied in pixel space to tiles in [0, 1], ``B(x) = clip(x + δ) ⊕ p``:

- ``bapl``: a learnable noise ``δ`` with ‖δ‖∞ ≤ eps (BAPLe: 8/255) plus a patch ``p``;
- ``patch``: the patch alone (BadNets, nothing learned);
- ``noise``: the learnable noise alone.

The patch is a fixed random RGB pattern of ``patch_px`` pixels (seeded) pasted in a corner
(BAPLe: 24 px, bottom-left). ``δ`` is one (3, T, T) pattern shared by every triggered tile.

Training (``BackdoorHook`` inside ``mil.training.train_mil``) follows BAPLe's Algorithm 1 with
two choices the paper leaves open, stated here: ``δ`` starts at 0 (the algorithm gives no
initialisation), and it moves by signed steps of ``step_size`` (0.01, as the issue's reading of
BAPLe) after each optimiser step of the head on a poisoned bag, then is clipped to the box; the
head's Adam and the noise thus learn jointly, one bag per step, and the clean bags train the head
as in clean training (a run with no poisoned slide is the clean head exactly).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from wsiattack import stores
from wsiattack.atomic import atomic_file
from wsiattack.attacks.budget import slide_rng, tiles_to_attack
from wsiattack.attacks.selection import random_selection
from wsiattack.encoders.embedding import embed_tiles, to_unit_pixels
from wsiattack.encoders.model import TileEncoder
from wsiattack.errors import CohortError, ConfigError
from wsiattack.mil.folds import FoldData, LazyBags, fold_data, read_features, training_spec, usable
from wsiattack.mil.training import predict_bag, train_mil
from wsiattack.names import BACKDOOR_ALL_SHOTS, BACKDOOR_CLEAN_HEAD
from wsiattack.tilereader import TileReader

log = logging.getLogger(__name__)

TRIGGER_KINDS = ("bapl", "patch", "noise")
CORNERS = ("bottom_left", "bottom_right", "top_left", "top_right")


@dataclass(frozen=True, kw_only=True)
class Trigger:
    """A backdoor trigger: learnable noise within ``eps`` and/or a fixed patch in a corner."""

    kind: str
    eps: float = 8 / 255
    patch_px: int = 24
    corner: str = "bottom_left"
    patch_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TRIGGER_KINDS:
            raise ConfigError(f"backdoor trigger kind {self.kind!r}: use one of {', '.join(TRIGGER_KINDS)}")
        if self.corner not in CORNERS:
            raise ConfigError(f"backdoor trigger corner {self.corner!r}: use one of {', '.join(CORNERS)}")
        if self.learns_noise and not 0 < self.eps <= 1:
            raise ConfigError(f"backdoor trigger eps {self.eps} must be in (0, 1]")
        if self.has_patch and self.patch_px < 1:
            raise ConfigError(f"backdoor trigger patch_px {self.patch_px} must be >= 1")

    @property
    def learns_noise(self) -> bool:
        return self.kind in ("bapl", "noise")

    @property
    def has_patch(self) -> bool:
        return self.kind in ("bapl", "patch")

    def patch(self) -> Tensor:
        """The (3, p, p) patch in [0, 1]: whole grey levels drawn from ``patch_seed`` (CPU, any device alike)."""
        generator = torch.Generator().manual_seed(self.patch_seed)
        return torch.randint(0, 256, (3, self.patch_px, self.patch_px), generator=generator).float() / 255

    def apply(self, tiles: Tensor, delta: Tensor | None) -> Tensor:
        """``clip(x + δ) ⊕ p`` for (B, 3, T, T) tiles in [0, 1]; ``delta`` (3, T, T) or None."""
        out = tiles
        if self.learns_noise:
            out = (out + delta).clamp(0.0, 1.0)
        if self.has_patch:
            side = tiles.shape[-1]
            if self.patch_px > side:
                raise ConfigError(f"backdoor trigger patch_px {self.patch_px} is larger than the {side} px tiles")
            top = side - self.patch_px if self.corner.startswith("bottom") else 0
            left = side - self.patch_px if self.corner.endswith("right") else 0
            out = out.clone()
            out[:, :, top : top + self.patch_px, left : left + self.patch_px] = self.patch().to(out)
        return out

    def initial_delta(self, tile_px: int, *, device: torch.device) -> Tensor | None:
        return torch.zeros(3, tile_px, tile_px, device=device) if self.learns_noise else None


def poisoned_slides(train: pd.DataFrame, *, target: int, rate: float, rng: np.random.Generator) -> list[str]:
    """``rate`` of the training slides (at least one when rate > 0), drawn from those whose class
    is not ``target``; ``train`` has columns slide_id and label (class index)."""
    if not 0 <= rate <= 1:
        raise ConfigError(f"backdoor poison_rate {rate} must be in [0, 1]")
    if rate == 0:
        return []
    candidates = sorted(train.loc[train["label"] != target, "slide_id"])
    if not candidates:
        raise CohortError(f"backdoor: no training slide outside the target class {target} to poison")
    n = min(len(candidates), max(1, round(rate * len(train))))
    return sorted(rng.choice(candidates, size=n, replace=False).tolist())


def few_shot(train: pd.DataFrame, *, shots: int | None, rng: np.random.Generator) -> pd.DataFrame:
    """At most ``shots`` training slides per class (all with None), drawn without replacement."""
    if shots is None:
        return train
    picked = [
        group.iloc[np.sort(rng.choice(len(group), size=min(shots, len(group)), replace=False))]
        for _, group in train.groupby("label", sort=True)
    ]
    return pd.concat(picked).sort_values("slide_id").reset_index(drop=True)


def trigger_rows(n_tiles: int, *, fraction: float, min_tiles: int, rng: np.random.Generator) -> np.ndarray:
    """The sorted rows of a slide's bag that carry the trigger: ``fraction`` of its tiles, at least
    ``min_tiles`` (the attacks' budget and random selection)."""
    return random_selection(n_tiles, k=tiles_to_attack(n_tiles, fraction=fraction, min_tiles=min_tiles), rng=rng).index


@dataclass
class TriggeredBag:
    """The rows of one bag that carry the trigger and their clean pixels (m, 3, T, T) in [0, 1]."""

    rows: Tensor
    tiles: Tensor


class BackdoorHook:
    """Puts the trigger on the poisoned bags at every step and learns its noise (``train_mil``'s hook).

    ``poisoned`` maps a training bag's index to its ``TriggeredBag``; the caller relabels those
    bags to the target. The encoder is frozen (no gradient to its weights); only ``delta`` learns.

    Memory stays bounded by ``chunk_tiles`` however many tiles carry the trigger: ``bag`` embeds
    the triggered tiles without a graph and puts them in the bag as a leaf; once the head's loss
    has been back-propagated to that leaf, ``after_step`` re-runs the encoder chunk by chunk and
    pulls the leaf's gradient back to ``delta`` (the same gradient as one pass over all tiles).
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        trigger: Trigger,
        poisoned: Mapping[int, TriggeredBag],
        tile_px: int,
        step_size: float,
        device: torch.device,
        chunk_tiles: int = 32,
    ):
        self.encoder, self.trigger, self.poisoned, self.step_size = encoder.eval(), trigger, dict(poisoned), step_size
        self.encoder.requires_grad_(False)
        self.device, self.chunk_tiles = device, chunk_tiles
        self.delta = trigger.initial_delta(tile_px, device=device)
        self._fixed: dict[int, Tensor] = {}  # patch-only: the triggered embeddings never change
        self._leaf: Tensor | None = None  # this step's triggered embeddings, as the head saw them
        self.noise_steps = 0

    def embed(self, tiles: Tensor) -> Tensor:
        """The triggered tiles' float32 embeddings on the CPU, without a graph (autocast off, as in the attacks)."""
        chunks = (tiles[start : start + self.chunk_tiles] for start in range(0, len(tiles), self.chunk_tiles))
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            return torch.cat(
                [self.encoder(self.trigger.apply(c.to(self.device), self.delta)).float().cpu() for c in chunks]
            )

    def bag(self, index: int, clean: Tensor) -> Tensor:
        if index not in self.poisoned:
            return clean
        entry = self.poisoned[index]
        if self.trigger.learns_noise:
            self._leaf = self.embed(entry.tiles).requires_grad_(True)
            embedded = self._leaf
        else:
            if index not in self._fixed:
                self._fixed[index] = self.embed(entry.tiles)
            embedded = self._fixed[index]
        return clean.index_put((entry.rows,), embedded.to(clean.dtype))

    def noise_gradient(self, index: int) -> Tensor:
        """d loss / d delta, from the gradient the loss left on this step's triggered embeddings."""
        upstream, self._leaf = self._leaf.grad, None
        clean_tiles, grad = self.poisoned[index].tiles, torch.zeros_like(self.delta)
        with torch.enable_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            for start in range(0, len(clean_tiles), self.chunk_tiles):
                delta = self.delta.detach().requires_grad_(True)
                tiles = clean_tiles[start : start + self.chunk_tiles].to(self.device)
                embedded = self.encoder(self.trigger.apply(tiles, delta)).float()
                embedded.backward(upstream[start : start + len(tiles)].to(self.device))
                grad += delta.grad
        return grad

    def after_step(self, index: int) -> None:
        """A signed step of the noise against the loss's gradient, then the ε box (BAPLe lines 15-16)."""
        if index not in self.poisoned or not self.trigger.learns_noise:
            return
        grad = self.noise_gradient(index)
        with torch.no_grad():
            self.delta = (self.delta - grad.sign() * self.step_size).clamp(-self.trigger.eps, self.trigger.eps)
        self.noise_steps += 1

    def snapshot(self) -> tuple[Tensor | None, int]:
        """The noise as it is now: ``train_mil`` keeps it with the best epoch's head."""
        return (None if self.delta is None else self.delta.clone(), self.noise_steps)

    def restore(self, snapshot: tuple[Tensor | None, int]) -> None:
        self.delta, self.noise_steps = snapshot


def triggered_bag(clean: Tensor, *, rows: Tensor, triggered_embeddings: Tensor) -> Tensor:
    """A bag whose ``rows`` are replaced by the re-embedded triggered tiles (float32, CPU)."""
    bag = torch.as_tensor(clean, dtype=torch.float32).clone()
    bag[rows] = torch.as_tensor(triggered_embeddings, dtype=torch.float32).cpu()
    return bag


def quantize(pixels: Tensor) -> np.ndarray:
    """(B, 3, T, T) in [0, 1] -> uint8 (B, T, T, 3): the triggered tile as an image holds it."""
    return torch.round(pixels.detach().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def backdoor_accuracy(predictions: Sequence[int], labels: Sequence[int], *, target: int) -> dict[str, float]:
    """BA on all slides and on those whose true class is not the target (the ones the trigger must move)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    others = labels != target
    return {
        "backdoor_accuracy": float(np.mean(predictions == target)),
        "backdoor_accuracy_non_target": float(np.mean(predictions[others] == target)) if others.any() else float("nan"),
    }


# --- the workflow's job: one (encoder, MIL model, trigger, target, shots), every fold ------------

CLEAN_HEAD = BACKDOOR_CLEAN_HEAD  # nothing poisoned; tested with the patch (its δ would be 0)
BACKDOOR_STREAM = 5  # random streams: 0 attacked tiles, 1 probe, 2 shuffles, 3 universal training tiles


def trigger_of(settings: Mapping[str, Any]) -> Trigger:
    """The job's trigger; the clean head is tested with the patch alone (its δ would be 0)."""
    kind = "patch" if settings["trigger"] == CLEAN_HEAD else settings["trigger"]
    shape = {key: settings[key] for key in ("eps", "patch_px", "corner") if key in settings}  # a kind's own keys
    return Trigger(kind=kind, patch_seed=settings["seed"], **shape)


def slide_trigger_rows(slide_id: str, n_tiles: int, *, settings: Mapping[str, Any]) -> np.ndarray:
    """The rows of a slide that carry the trigger, in training and test alike: the same for every
    trigger, target and shots setting of a seed, so their results are paired."""
    rng = slide_rng(settings["seed"], slide_id, stream=BACKDOOR_STREAM)
    return trigger_rows(n_tiles, fraction=settings["tile_fraction"], min_tiles=settings["min_tiles"], rng=rng)


def fold_training_slides(data: FoldData, *, settings: Mapping[str, Any], fold: int) -> tuple[pd.DataFrame, list[str]]:
    """The fold's training slides after the few-shot draw (``label`` as class index), and the
    poisoned ones among them. The few-shot draw depends on seed and fold only (every trigger and
    target sees the same slides), the poisoned draw also on the target (every trigger poisons the
    same slides)."""
    train = data.train.assign(label=[data.classes.index(label) for label in data.train["label"]])
    shots = None if settings["shots"] == BACKDOOR_ALL_SHOTS else int(settings["shots"])
    train = few_shot(train, shots=shots, rng=slide_rng(settings["seed"], f"fold{fold}/shots", stream=BACKDOOR_STREAM))
    if settings["trigger"] == CLEAN_HEAD:
        return train, []
    target = data.classes.index(settings["target"])
    rng = slide_rng(settings["seed"], f"fold{fold}/poison/{settings['target']}", stream=BACKDOOR_STREAM)
    return train, poisoned_slides(train, target=target, rate=settings["poison_rate"], rng=rng)


@dataclass(frozen=True, kw_only=True)
class _Job:
    """What every fold of a job shares."""

    settings: Mapping[str, Any]
    trigger: Trigger
    encoder: TileEncoder
    device: torch.device
    batch_size: int
    tile_px: int
    tiles_of: Mapping[str, Path]
    features: Mapping[str, np.ndarray]

    def clean_tiles(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """A slide's trigger rows and their clean uint8 tiles."""
        rows = slide_trigger_rows(slide_id, len(self.features[slide_id]), settings=self.settings)
        with TileReader(self.tiles_of[slide_id]) as reader:
            return rows, reader.read(rows)

    def embed_triggered(
        self, tiles_uint8: np.ndarray, delta: Tensor | None, *, label: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The triggered tiles, quantised to uint8 as an image holds them, and their embeddings,
        computed exactly as the clean features were (``embed_tiles``: batches, precision)."""
        pixels = to_unit_pixels(tiles_uint8).to(self.device)
        triggered = quantize(self.trigger.apply(pixels, None if delta is None else delta.to(self.device)))
        embedded = embed_tiles(self.encoder, triggered, batch_size=self.batch_size, device=self.device, label=label)
        return triggered, embedded


def run_backdoor(
    *,
    splits_csv: str | Path,
    feature_stores: Sequence[str | Path],
    tile_stores: Sequence[str | Path],
    encoder: TileEncoder,
    spec: Mapping[str, Any],
    device: torch.device,
    batch_size: int,
    out_csv: str | Path,
    out_store: str | Path,
) -> pd.DataFrame:
    """Train one head per fold with the job's poisoning and test its test slides clean and triggered.

    ``spec``: ``backdoor`` (trigger, target, shots, poison_rate, tile_fraction, min_tiles, eps,
    step_size, patch_px, corner, seed) and ``mil`` (the MIL model's training spec with classes).
    Writes the per-slide CSV (one row per test slide: predictions and each class's probability,
    clean and triggered) and a store with each fold's learned δ, the patch and one example tile.
    """
    settings = spec["backdoor"]
    splits = pd.read_csv(splits_csv, dtype={"slide_id": str})
    features = read_features(feature_stores)
    job = _Job(
        settings=settings,
        trigger=trigger_of(settings),
        encoder=encoder.to(device).eval(),
        device=device,
        batch_size=batch_size,
        tile_px=int(spec["tile_px"]),
        tiles_of={stores.slide_id_of(store): Path(store) for store in tile_stores},
        features=features,
    )
    records, deltas, folds, example = [], [], {}, None
    classes = list(spec["mil"]["classes"])
    test_slides = usable(splits, features)
    for fold in sorted(int(f) for f in splits["fold"].unique()):
        model, delta, record = _train_fold(job, splits, fold=fold, mil=spec["mil"])
        deltas.append(delta.numpy())
        folds[str(fold)] = record
        of_fold = {"fold_poisoned": len(record["poisoned_slides"]), "fold_train_slides": len(record["train_slides"])}
        test = test_slides[test_slides["fold"] == fold]
        for slide_id, label in zip(test["slide_id"], test["label"], strict=True):
            row, tiles = _test_slide(job, slide_id, model=model, delta=delta, classes=classes)
            records.append({"slide_id": slide_id, "fold": fold, "label": label, **of_fold, **row})
            example = example or tiles
    job_keys = {
        "encoder": encoder.spec.name,
        "mil": spec["mil"]["model"],
        "trigger": settings["trigger"],
        "target": settings["target"] or "",
        "shots": settings["shots"],
    }
    table = pd.DataFrame([{**job_keys, **record} for record in records]).sort_values("slide_id", ignore_index=True)
    attrs = {"spec": dict(spec), "encoder": encoder.describe(), "device_type": device.type, "folds": folds}
    with stores.atomic_store(out_store, kind=stores.BACKDOOR, attrs=attrs) as group:
        stores.write_array(group, "delta", np.stack(deltas).astype(np.float32))
        stores.write_array(group, "patch", quantize(job.trigger.patch()[None])[0])
        if example is not None:
            stores.write_array(group, "example_clean", example[0])
            stores.write_array(group, "example_triggered", example[1])
    with atomic_file(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return table


def _train_fold(job: _Job, splits: pd.DataFrame, *, fold: int, mil: Mapping[str, Any]):
    """The fold's head trained on its (few-shot, poisoned) training slides; (model, δ, record)."""
    data = fold_data(splits, job.features, spec={**mil, "fold": fold})
    train, poisoned = fold_training_slides(data, settings=job.settings, fold=fold)
    target = None if job.settings["trigger"] == CLEAN_HEAD else data.classes.index(job.settings["target"])
    bags = LazyBags(job.features, train["slide_id"])
    labels = [target if s in poisoned else int(y) for s, y in zip(train["slide_id"], train["label"], strict=True)]
    entries = {}
    for index, slide_id in enumerate(train["slide_id"]):
        if slide_id in poisoned:
            rows, tiles = job.clean_tiles(slide_id)
            entries[index] = TriggeredBag(rows=torch.as_tensor(rows), tiles=to_unit_pixels(tiles))
    hook = BackdoorHook(
        encoder=job.encoder,
        trigger=job.trigger,
        poisoned=entries,
        tile_px=job.tile_px,
        step_size=job.settings.get("step_size", 0.0),  # absent where nothing is learned (patch, clean head)
        device=job.device,
    )
    val_bags, val_labels = data.bags_and_labels(data.val, job.features)
    result = train_mil(
        bags=bags,
        labels=labels,
        n_classes=len(data.classes),
        spec=training_spec(mil, seed=data.seed),
        val_bags=val_bags,
        val_labels=val_labels,
        bag_hook=hook if entries else None,
    )
    delta = hook.delta if hook.delta is not None else torch.zeros(3, job.tile_px, job.tile_px)
    record = {
        "train_slides": train["slide_id"].tolist(),
        "val_slides": data.val["slide_id"].tolist(),
        "poisoned_slides": poisoned,
        "noise_steps": hook.noise_steps,
        "delta_linf": float(delta.abs().max()),
        **result.record(),
    }
    log.info(
        "fold %d: %s head on %d slides, %d poisoned (trigger %s), %d noise steps, kept epoch %d",
        fold,
        mil["model"],
        len(train),
        len(poisoned),
        job.trigger.kind,
        hook.noise_steps,
        result.best_epoch,
    )
    return result.model, delta.detach().cpu(), record


def _test_slide(job: _Job, slide_id: str, *, model: nn.Module, delta: Tensor, classes: Sequence[str]):
    """One test slide's clean and triggered predictions; (CSV fields, (clean, triggered) first tile)."""
    clean = torch.from_numpy(job.features[slide_id])
    rows, tiles = job.clean_tiles(slide_id)
    triggered, embedded = job.embed_triggered(tiles, delta, label=f"{slide_id} (triggered)")
    clean_prob, _ = predict_bag(model, clean)
    triggered_prob, _ = predict_bag(
        model, triggered_bag(clean, rows=torch.as_tensor(rows), triggered_embeddings=torch.from_numpy(embedded))
    )
    fields = {
        "n_tiles": len(clean),
        "n_triggered": len(rows),
        "clean_pred": classes[int(np.argmax(clean_prob))],
        "triggered_pred": classes[int(np.argmax(triggered_prob))],
        **{f"clean_prob_{name}": float(p) for name, p in zip(classes, clean_prob, strict=True)},
        **{f"triggered_prob_{name}": float(p) for name, p in zip(classes, triggered_prob, strict=True)},
    }
    return fields, ((tiles[0], triggered[0]) if len(rows) else None)
