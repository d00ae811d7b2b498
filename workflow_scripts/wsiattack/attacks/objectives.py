"""Objectives to maximise: how far a perturbed tile's output moved from its reference.

An objective is a callable ``(output (k, D), reference (k, ...)) -> (k,)`` per tile. The
label-free ones compare the perturbed tile's embedding with the clean tile's embedding and need
neither a label nor the downstream model.

Oracle objective (not label-free, only when an attack entry asks for it): ``mil_cross_entropy``,
the slide-level cross-entropy of a trained MIL head against the slide's true label, on the bag
whose attacked rows are the perturbed tiles' embeddings and whose other rows are the clean
features. It needs the head, the bag and the rows of the batch, so its callable is bound per
batch (``oracle.MILHead.objective_for``); the registry entry only names it. How outputs are
marked (``label_free``, ``threat_model``) is decided in one place: ``params.threat_marking``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsiattack.attacks import params
from wsiattack.attacks.params import ORACLE_OBJECTIVES
from wsiattack.errors import AttackError, ConfigError

ObjectiveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_distance(embedding: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """1 − cos(f(x'), f(x)) per tile, in [0, 2]: scale-free, what MIL heads on normalised features see."""
    return 1.0 - F.cosine_similarity(embedding, clean, dim=-1)


def l2_distance(embedding: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """‖f(x') − f(x)‖₂ per tile, in embedding units."""
    return (embedding - clean).norm(dim=-1)


def _needs_binding(embedding: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    raise AttackError(
        "objective 'mil_cross_entropy' needs the slide's MIL head and bag: bind it with oracle.MILHead.objective_for"
    )


@dataclass(frozen=True)
class Objective:
    name: str
    fn: ObjectiveFn

    @property
    def needs_mil_head(self) -> bool:
        return self.name in ORACLE_OBJECTIVES


OBJECTIVES: dict[str, Objective] = {
    "cosine": Objective("cosine", cosine_distance),
    "l2": Objective("l2", l2_distance),
    "mil_cross_entropy": Objective("mil_cross_entropy", _needs_binding),
}


assert tuple(OBJECTIVES) == params.OBJECTIVES, "attacks.params.OBJECTIVES names the objectives implemented here"


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"unknown attack objective {name!r}: use one of {', '.join(OBJECTIVES)}") from None
