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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from wsiattack.attacks.budget import tiles_to_attack
from wsiattack.attacks.selection import random_selection
from wsiattack.errors import CohortError, ConfigError

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
    ):
        self.encoder, self.trigger, self.poisoned, self.step_size = encoder.eval(), trigger, dict(poisoned), step_size
        self.encoder.requires_grad_(False)
        self.device = device
        self.delta = trigger.initial_delta(tile_px, device=device)
        self._fixed: dict[int, Tensor] = {}  # patch-only: the triggered embeddings never change
        self.noise_steps = 0

    def embed(self, tiles: Tensor) -> Tensor:
        return self.encoder(self.trigger.apply(tiles.to(self.device), self.delta)).float().cpu()

    def bag(self, index: int, clean: Tensor) -> Tensor:
        if index not in self.poisoned:
            return clean
        entry = self.poisoned[index]
        if not self.trigger.learns_noise:
            if index not in self._fixed:
                with torch.no_grad():
                    self._fixed[index] = self.embed(entry.tiles)
            embedded = self._fixed[index]
        else:
            self.delta.requires_grad_(True)
            self.delta.grad = None
            embedded = self.embed(entry.tiles)
        bag = clean.clone()
        bag[entry.rows] = embedded.to(bag.dtype)
        return bag

    def after_step(self, index: int) -> None:
        """A signed step of the noise against the loss's gradient, then the ε box (BAPLe lines 15-16)."""
        if index not in self.poisoned or not self.trigger.learns_noise:
            return
        with torch.no_grad():
            step = self.delta.grad.sign() * self.step_size
            self.delta = (self.delta - step).clamp(-self.trigger.eps, self.trigger.eps).detach()
        self.noise_steps += 1


def triggered_bag(
    clean: Tensor, *, rows: Tensor, tiles: Tensor, encoder: nn.Module, trigger: Trigger, delta: Tensor | None
) -> Tensor:
    """A test bag with the trigger on ``rows`` (their clean pixels ``tiles``), re-embedded."""
    device = next(iter(encoder.parameters()), torch.empty(0)).device
    with torch.no_grad():
        embedded = encoder(trigger.apply(tiles.to(device), None if delta is None else delta.to(device))).float().cpu()
    bag = torch.as_tensor(clean, dtype=torch.float32).clone()
    bag[rows] = embedded
    return bag


def backdoor_accuracy(predictions: Sequence[int], labels: Sequence[int], *, target: int) -> dict[str, float]:
    """BA on all slides and on those whose true class is not the target (the ones the trigger must move)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    others = labels != target
    return {
        "backdoor_accuracy": float(np.mean(predictions == target)),
        "backdoor_accuracy_non_target": float(np.mean(predictions[others] == target)) if others.any() else float("nan"),
    }
