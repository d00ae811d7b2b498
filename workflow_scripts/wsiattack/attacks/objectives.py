"""Label-free objectives: how far a perturbed tile's embedding moved from its clean embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_distance(embedding: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """1 − cos(f(x'), f(x)) per tile, in [0, 2]; needs no label, only the clean embedding."""
    return 1.0 - F.cosine_similarity(embedding, clean, dim=-1)


OBJECTIVES = {"cosine": cosine_distance}


def get_objective(name: str):
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})") from None
