"""Objectives to maximise: how far a perturbed tile's output moved from its reference.

An objective is a callable ``(output (k, D), reference (k, ...)) -> (k,)`` per tile. The
label-free ones compare the perturbed tile's embedding with the clean tile's embedding and need
neither a label nor the downstream model.

Extension point for oracle objectives (not label-free, e.g. the cross-entropy of a trained MIL
head on the bag with this tile's feature swapped in): register an ``Objective`` with
``label_free=False`` whose callable maps the encoder output and a reference (the label, or the
rest of the bag) to a per-tile value; ``perturb_slide`` then records ``label_free: false`` in the
attack store. The methods only ever see the callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsiattack.errors import ConfigError

ObjectiveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_distance(embedding: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """1 − cos(f(x'), f(x)) per tile, in [0, 2]: scale-free, what MIL heads on normalised features see."""
    return 1.0 - F.cosine_similarity(embedding, clean, dim=-1)


def l2_distance(embedding: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """‖f(x') − f(x)‖₂ per tile, in embedding units."""
    return (embedding - clean).norm(dim=-1)


@dataclass(frozen=True)
class Objective:
    name: str
    fn: ObjectiveFn
    label_free: bool


OBJECTIVES: dict[str, Objective] = {
    "cosine": Objective("cosine", cosine_distance, label_free=True),
    "l2": Objective("l2", l2_distance, label_free=True),
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"unknown attack objective {name!r}: use one of {', '.join(OBJECTIVES)}") from None
