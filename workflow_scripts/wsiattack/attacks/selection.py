"""Which k tiles of a slide are perturbed.

- ``random`` (label-free): seeded uniform choice; an attack and its noise control with the same
  seed and budget pick the same tiles.
- ``vulnerability`` (label-free): one gradient probe on every tile of the slide, batched: from a
  random start inside the bound, the objective there plus the increase a full-bound step would
  give to first order (eps·‖∇‖₁ for L-inf, radius·‖∇‖₂ for L2); the top k are attacked. It costs
  one forward + backward pass per tile of the slide (plus a forward when no clean features are
  given), i.e. more than clean extraction: its cost is reported separately.
- ``centrality`` (label-free): the tiles whose clean embedding is closest (Euclidean) to the
  slide's mean embedding, the ones a mean-like pooling leans on; needs the clean features.
- ``attention`` (gray-box oracle): the top attention scores of the trained MIL head of the fold in
  which the slide is a test slide (``oracle.load_fold_head``) on the slide's clean bag; attack
  stores made with it say ``label_free: false`` and ``threat_model: gray-box``.

Scores are "higher = attack first"; ties go to the lower tile index, so selection is
deterministic.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wsiattack.attacks.bounds import Ball
from wsiattack.attacks.driver import Problem, attack_mode
from wsiattack.attacks.objectives import ObjectiveFn
from wsiattack.attacks.params import GRAY_BOX_SELECTIONS, SELECTIONS  # noqa: F401  (re-exported)
from wsiattack.encoders.embedding import iter_batches, to_unit_pixels
from wsiattack.errors import AttackError
from wsiattack.mil.training import predict_bag

log = logging.getLogger(__name__)

GRAY_BOX = GRAY_BOX_SELECTIONS


@dataclass
class Selection:
    index: np.ndarray  # (k,) int64, sorted
    scores: np.ndarray  # (k,) float32 score of each selected tile (NaN for random)
    probe_tiles: int = 0  # tiles that went through the vulnerability probe
    probe_evaluations: int = 0  # gradient evaluations (batches) the probe spent


def random_selection(n_tiles: int, *, k: int, rng: np.random.Generator) -> Selection:
    index = np.sort(rng.choice(n_tiles, size=k, replace=False)).astype(np.int64)
    return Selection(index, np.full(k, np.nan, dtype=np.float32))


def top_k_selection(scores: np.ndarray, *, k: int, what: str) -> Selection:
    """The k highest scores (ties: lower index first), returned in tile order."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not np.isfinite(scores).all():
        raise AttackError(
            f"{what}: need one finite score per tile, got shape {scores.shape} with {int((~np.isfinite(scores)).sum())} non-finite"
        )
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    index = np.sort(order).astype(np.int64)
    return Selection(index, scores[index].astype(np.float32))


def centrality_scores(features: np.ndarray) -> np.ndarray:
    """−‖f_i − mean‖₂: the tiles nearest the slide's mean embedding score highest."""
    features = np.asarray(features, dtype=np.float64)
    return -np.linalg.norm(features - features.mean(axis=0), axis=1)


def attention_scores(*, head: nn.Module, bag: np.ndarray) -> np.ndarray:
    """The trained head's attention on each tile of the clean bag (N,): where it looks most."""
    _, attention = predict_bag(head, torch.as_tensor(np.asarray(bag), dtype=torch.float32))
    return attention


@dataclass(frozen=True)
class Probe:
    """What the vulnerability probe needs besides the tiles."""

    encoder: nn.Module
    ball: Ball
    objective: ObjectiveFn
    device: torch.device
    batch_size: int = 32
    precision: str = "float32"  # of its forward passes, as the attack's (runtime.attack_precision)


def vulnerability_scores(
    tiles, *, probe: Probe, reference: np.ndarray | None, generator: torch.Generator, label: str
) -> tuple[np.ndarray, int]:
    """Per tile: objective at a random start + first-order gain of one full-bound step; and the batches used.

    ``tiles`` is a uint8 (N, T, T, 3) zarr/numpy array; ``reference`` the clean features
    (N, D), valid only where they were computed as the probe computes (off CUDA: float32, the
    same batches), or None to compute them here (one extra forward pass per tile). On CUDA the
    caller passes None: extraction autocasts, runs in other batches and lets cuDNN use TF32,
    each of which can move an embedding as much as the probe's step.
    """
    started, scores, evaluations = time.perf_counter(), np.empty(tiles.shape[0], dtype=np.float64), 0
    with attack_mode(probe.encoder, device=probe.device, precision=probe.precision):
        for start, batch in iter_batches(tiles, batch_size=probe.batch_size):
            clean = to_unit_pixels(batch).to(probe.device)
            ref = _reference(probe, clean, None if reference is None else reference[start : start + len(batch)])
            problem = Problem(
                encoder=probe.encoder, clean=clean, reference=ref, objective=probe.objective, ball=probe.ball
            )
            value, grad = problem.value_and_grad(probe.ball.random_start(problem.clean, generator=generator))
            scores[start : start + len(batch)] = (value + probe.ball.first_order_gain(grad)).cpu().numpy()
            evaluations += 1
    seconds = time.perf_counter() - started
    log.info(
        "%s: vulnerability probe of %d tiles in %.1f s (%.3f s/tile)",
        label,
        len(scores),
        seconds,
        seconds / max(len(scores), 1),
    )
    return scores, evaluations


def _reference(probe: Probe, clean: torch.Tensor, rows: np.ndarray | None) -> torch.Tensor:
    if rows is not None:
        return torch.as_tensor(np.asarray(rows), dtype=torch.float32, device=probe.device)
    with torch.no_grad():
        return probe.encoder(clean).float()
