"""Perturbation bounds in [0, 1] pixel space: the L-inf box or the L2 ball around a clean tile.

``eps`` is always a per-value amplitude in [0, 1] pixel units (the config's ``4/255``). For the
L2 norm the radius is ``eps · sqrt(C·H·W)``: the L2 norm of the ±eps noise control, so an L2
attack and the control at the same eps spend the same energy (and the L2 ball contains the L-inf
box). Step sizes use the same convention: an L2 step of ``step_size`` moves ``step_size ·
sqrt(C·H·W)``.

Stored tiles are uint8, so every bound is re-imposed *after* rounding (``Ball.quantize``): the
reported effect is the one that survives rounding and the bound holds exactly on what is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wsiattack.attacks.params import NORMS
from wsiattack.errors import AttackError, ConfigError
from wsiattack.runtime import exact_dtype

_TINY = 1e-12


@dataclass(frozen=True)
class Ball:
    """The set of admissible adversarial tiles: within the bound of ``clean`` and inside [0, 1]."""

    norm: str
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"attack norm {self.norm!r} is unknown: use one of {', '.join(NORMS)}")
        if not 0.0 <= self.eps <= 1.0:  # 0: the null control (noise of no amplitude)
            raise ConfigError(f"attack eps {self.eps} must be in [0, 1] pixel units (e.g. 4/255)")

    def radius(self, clean: torch.Tensor) -> float:
        """The bound in its own norm for tiles shaped like ``clean`` (k, C, H, W)."""
        return self.radius_for(clean[0].numel())

    def radius_for(self, n_values: int) -> float:
        """eps (L-inf) or eps·sqrt(n_values) (L2), n_values = C·H·W."""
        return self.eps if self.norm == "linf" else self.eps * math.sqrt(n_values)

    def project(self, x: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Closest admissible point for L-inf; radial shrink then clip for L2 (both stay inside)."""
        if self.norm == "linf":
            return torch.clamp(torch.minimum(torch.maximum(x, clean - self.eps), clean + self.eps), 0.0, 1.0)
        delta = x - clean
        norms = _per_tile(delta.flatten(1).norm(dim=1))
        shrink = torch.clamp(self.radius(clean) / (norms + _TINY), max=1.0)
        return torch.clamp(clean + delta * shrink, 0.0, 1.0)  # clipping only moves towards clean

    def step(self, x: torch.Tensor, grad: torch.Tensor, size: float | torch.Tensor) -> torch.Tensor:
        """One steepest-ascent step of ``size`` per-value units (not projected)."""
        return x + size * self.direction(grad)

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """Steepest ascent direction of unit L-inf norm (sign) or unit per-value RMS (L2)."""
        if self.norm == "linf":
            return grad.sign()
        norms = _per_tile(grad.flatten(1).norm(dim=1))
        return grad / (norms + _TINY) * math.sqrt(grad[0].numel())

    def first_order_gain(self, grad: torch.Tensor) -> torch.Tensor:
        """Objective increase predicted by the linearisation for a full-bound step (dual norm)."""
        dual = grad.flatten(1).abs().sum(dim=1) if self.norm == "linf" else grad.flatten(1).norm(dim=1)
        return self.radius(grad) * dual

    def random_start(self, clean: torch.Tensor, *, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
        """A random admissible point within ``scale`` × the bound (drawn on the CPU: same bytes on any device).

        L-inf: uniform in the box; L2: Gaussian direction, radius uniform in [0, scale·radius].
        """
        if self.norm == "linf":
            noise = (torch.rand(clean.shape, generator=generator) * 2 - 1) * (self.eps * scale)
        else:
            direction = torch.randn(clean.shape, generator=generator)
            length = torch.rand(len(clean), generator=generator) * (self.radius(clean) * scale)
            noise = direction / _per_tile(direction.flatten(1).norm(dim=1)) * _per_tile(length)
        return self.project(clean + noise.to(clean.device), clean)

    def quantize(self, adversarial: torch.Tensor, clean_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (k, 3, H, W) that satisfies the bound exactly; see ``quantize_linf``/``quantize_l2``."""
        if self.norm == "linf":
            return quantize_linf(adversarial, clean_uint8, self.eps)
        return quantize_l2(adversarial, clean_uint8, self.radius(adversarial))


def _per_tile(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def quantize_linf(adversarial: torch.Tensor, clean_uint8: torch.Tensor, eps: float) -> torch.Tensor:
    """Round to uint8 and clamp into the box again, so |adv − clean| ≤ eps holds after rounding."""
    radius = int(eps * 255 + 1e-6)  # whole grey levels inside the bound
    rounded = torch.round(adversarial * 255).to(torch.int16)
    clean = clean_uint8.to(torch.int16)
    rounded = torch.minimum(torch.maximum(rounded, clean - radius), clean + radius)
    return rounded.clamp_(0, 255).to(torch.uint8)


def quantize_l2(adversarial: torch.Tensor, clean_uint8: torch.Tensor, radius: float) -> torch.Tensor:
    """Round to uint8, then undo the roundings that overshoot most until ‖adv − clean‖₂ ≤ radius.

    Nearest rounding can push the L2 norm past the radius. Moving one value a grey level back
    towards clean lowers the squared norm (in grey levels) by 2|d|−1; values that were rounded
    away from clean by the largest amount are moved first, which changes the stored tile least.
    Truncating every rounding would always fit (|d| ≤ |δ|), so this terminates within the bound.
    Runs on the tiles' device; every tensor it makes is put there (the GPU path once mixed a CPU
    scalar into ``searchsorted``), and the exact offsets are float64 except on MPS, which has none.
    """
    budget = math.floor((radius * 255) ** 2 + 1e-6)  # squared grey levels allowed
    work = exact_dtype(adversarial.device)  # float32 resolves 1e-5 of a grey level: enough on MPS
    exact = adversarial.to(work) * 255 - clean_uint8.to(work)
    levels = torch.round(adversarial * 255).to(torch.int64) - clean_uint8.to(torch.int64)
    fixed = torch.stack([_fit_tile(levels[i], exact[i], budget) for i in range(len(levels))])
    return (clean_uint8.to(torch.int64) + fixed).clamp_(0, 255).to(torch.uint8)


def _fit_tile(levels: torch.Tensor, exact: torch.Tensor, budget: int) -> torch.Tensor:
    """One tile's grey-level offsets with the fewest overshooting roundings undone to fit ``budget``."""
    flat = levels.flatten().clone()
    excess_sq = int((flat * flat).sum()) - budget
    if excess_sq <= 0:
        return levels
    overshoot = flat.abs().to(exact.dtype) - exact.flatten().abs()  # > 0 where rounding moved away from clean
    movable = torch.nonzero(flat != 0).squeeze(1)
    order = movable[torch.argsort(overshoot[movable], descending=True, stable=True)]
    savings = torch.cumsum(2 * flat[order].abs() - 1, dim=0)
    n_moves = (
        int(torch.searchsorted(savings, torch.tensor([excess_sq], dtype=savings.dtype, device=savings.device))[0]) + 1
    )
    if n_moves > len(order):
        raise AttackError(
            f"cannot round this tile into the L2 ball ({excess_sq} squared grey levels over): a bug, please report"
        )
    moved = order[:n_moves]
    flat[moved] -= flat[moved].sign()
    return flat.view_as(levels)
