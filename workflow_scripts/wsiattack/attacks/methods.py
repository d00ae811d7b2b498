"""Attack methods on a batch of tiles in [0, 1] pixel space.

Each method is a small class with one call: ``method(encoder, clean_pixels, clean_embedding,
generator) -> AttackOutcome``. The best iterate per tile is kept, every iterate is clipped to
[0, 1] and to the L-inf ball, and the stored result is the uint8 rounding of it, projected back
into the ball so the bound holds exactly after rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wsiattack.attacks.objectives import get_objective
from wsiattack.errors import AttackError


@dataclass
class AttackOutcome:
    adversarial: torch.Tensor  # float (k, 3, H, W) in [0, 1], best iterate before rounding
    objective: torch.Tensor  # (k,) objective of that iterate
    iterations: int


def project(x: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.clamp(torch.minimum(torch.maximum(x, clean - eps), clean + eps), 0.0, 1.0)


def quantize(adversarial: torch.Tensor, clean_uint8: torch.Tensor, eps: float) -> torch.Tensor:
    """Round to uint8 and project into the ball again, so |adv − clean| ≤ eps holds after rounding."""
    radius = int(eps * 255 + 1e-6)  # whole grey levels inside the bound
    rounded = torch.round(adversarial * 255).to(torch.int16)
    clean = clean_uint8.to(torch.int16)
    rounded = torch.minimum(torch.maximum(rounded, clean - radius), clean + radius)
    return rounded.clamp_(0, 255).to(torch.uint8)


class UniformNoise:
    """Control: random ±eps per pixel (Rademacher), the largest noise the L-inf budget allows."""

    def __init__(self, *, eps: float, **_):
        self.eps = eps

    def __call__(self, encoder, clean, clean_embedding, generator, objective) -> AttackOutcome:
        signs = torch.randint(0, 2, clean.shape, generator=generator).to(clean.device) * 2.0 - 1.0
        adversarial = project(clean + self.eps * signs, clean, self.eps)
        with torch.no_grad():
            value = objective(encoder(adversarial), clean_embedding)
        return AttackOutcome(adversarial, value, iterations=1)


class PGD:
    """Label-free L-inf PGD (Madry et al. 2018) with a random start and the best iterate kept.

    The random start matters more here than with a label: the embedding distance is at its
    minimum at the clean tile, where its gradient is exactly zero.
    """

    def __init__(self, *, eps: float, steps: int, step_size: float, **_):
        self.eps, self.steps, self.step_size = eps, steps, step_size

    def __call__(self, encoder, clean, clean_embedding, generator, objective) -> AttackOutcome:
        start = (torch.rand(clean.shape, generator=generator) * 2 - 1).to(clean.device) * self.eps
        x = project(clean + start, clean, self.eps)
        best = x.clone()
        best_value = torch.full((len(clean),), -torch.inf, device=clean.device)
        for _ in range(self.steps + 1):  # the last pass only scores the final iterate
            x.requires_grad_(True)
            with torch.enable_grad():
                value = objective(encoder(x), clean_embedding)
                (grad,) = torch.autograd.grad(value.sum(), x)
            with torch.no_grad():
                improved = value > best_value
                best[improved], best_value[improved] = x[improved], value[improved]
                check_gradient(grad)
                x = project(x + self.step_size * grad.sign(), clean, self.eps)
        return AttackOutcome(best.detach(), best_value.detach(), iterations=self.steps)


def check_gradient(grad: torch.Tensor) -> None:
    """NaN or all-zero input gradients mean a broken wrapper or gradient masking, not robustness."""
    if not torch.isfinite(grad).all():
        raise AttackError("non-finite input gradient: the encoder is not differentiable in float32 here")
    flat = grad.flatten(1).abs().amax(dim=1)
    if (flat == 0).any():
        raise AttackError(f"all-zero input gradient for {int((flat == 0).sum())} tile(s): gradient masking or a detached wrapper")


METHODS = {"pgd": PGD, "noise": UniformNoise}


def build_method(spec: dict):
    """An attack callable and its objective function from a normalised attack spec."""
    try:
        method = METHODS[spec["method"]]
    except KeyError:
        raise ValueError(f"unknown attack method {spec['method']!r} (known: {', '.join(METHODS)})") from None
    return method(**spec), get_objective(spec["objective"])
