"""Stain-space attacks: bounded changes of the haematoxylin, eosin and DAB concentrations.

Colour deconvolution (Ruifrok & Johnston 2001) as scikit-image's ``rgb2hed`` does it, in torch so
that attacks differentiate through it: optical density ``od = log(max(x, 1e-6)) / log(1e-6)``
per RGB value (so ``od`` is in [0, 1]), concentrations ``hed = od @ HED_FROM_RGB``, and back
``x = exp(log(1e-6) · hed @ RGB_FROM_HED)`` clipped to [0, 1]. scikit-image also clips the
concentrations at 0; the attack does not, so that the identity jitter reproduces the tile
exactly (``rgb_to_hed(..., clip=True)`` is scikit-image's, for the check against it).

A perturbation is HED-jitter's (Tellez et al. 2018): per tile and stain, ``hed' = α·hed + β``
with α ∈ [1 − σ, 1 + σ] and β ∈ [−σ, σ], σ being the attack's ``eps`` in the concentration
units above. To a pathologist this reads as ordinary variation of the staining, not as a pattern;
the pixel change it causes is stored as for every attack (``linf``, ``l2`` of the uint8 tile), so
it can be compared with pixel attacks of equal visual change. ``StainPGD`` optimises (α, β) by
sign-gradient ascent on the attack objective; ``StainJitter`` is its control, one random
(α, β) from the same box.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from wsiattack.attacks.driver import BestIterate, Method, Problem, resolve_step_size
from wsiattack.attacks.params import METHOD_DEFAULTS
from wsiattack.errors import ConfigError

# Ruifrok & Johnston's H&E-DAB stain vectors (rows: RGB optical density of H, E, DAB), as in
# scikit-image; tests check the whole transform against skimage.color.rgb2hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_FLOOR = 1e-6
_LOG_FLOOR = float(np.log(_FLOOR))
STAINS = ("haematoxylin", "eosin", "dab")


def _matrix(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def rgb_to_hed(x: torch.Tensor, *, clip: bool = False) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> stain concentrations (B, 3, H, W): H, E, DAB."""
    od = torch.log(x.clamp_min(_FLOOR)) / _LOG_FLOOR
    hed = torch.einsum("bchw,cd->bdhw", od, _matrix(HED_FROM_RGB, x))
    return hed.clamp_min(0.0) if clip else hed


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Stain concentrations (B, 3, H, W) -> RGB in [0, 1] (scikit-image's ``hed2rgb``)."""
    od = torch.einsum("bdhw,dc->bchw", hed, _matrix(RGB_FROM_HED, hed))
    return torch.exp(od * _LOG_FLOOR).clamp(0.0, 1.0)


def jitter(hed: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """RGB of ``α·hed + β``; ``params`` (B, 6) holds α (three stains) then β."""
    alpha, beta = params[:, :3, None, None], params[:, 3:, None, None]
    return hed_to_rgb(alpha * hed + beta)


@dataclass(frozen=True)
class StainBox:
    """The admissible (α, β) of each tile: |α − 1| ≤ σ and |β| ≤ σ for every stain.

    It stands where the pixel methods have their ``bounds.Ball``: ``norm`` names the space in the
    store's ``bound`` attrs, and ``quantize`` rounds the recomposed tile to uint8 (the bound is on
    the stain parameters, which rounding does not change).
    """

    eps: float
    norm: str = "stain"

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps < 1.0:
            raise ConfigError(f"stain attack eps (sigma) {self.eps} must be in [0, 1): alpha in [1 - sigma, 1 + sigma]")

    def radius_for(self, n_values: int) -> float:
        return self.eps

    def identity(self, n_tiles: int, *, device: torch.device) -> torch.Tensor:
        return torch.cat([torch.ones(n_tiles, 3), torch.zeros(n_tiles, 3)], dim=1).to(device)

    def project(self, params: torch.Tensor) -> torch.Tensor:
        identity = self.identity(len(params), device=params.device)
        return torch.minimum(torch.maximum(params, identity - self.eps), identity + self.eps)

    def random_point(self, n_tiles: int, *, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Uniform in the box (drawn on the CPU: the same bytes on any device)."""
        offsets = (torch.rand(n_tiles, 6, generator=generator) * 2 - 1) * self.eps
        return self.identity(n_tiles, device=device) + offsets.to(device)

    def quantize(self, adversarial: torch.Tensor, clean_uint8: torch.Tensor) -> torch.Tensor:
        return torch.round(adversarial * 255).clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True, kw_only=True)
class _StainMethod(Method):
    norm: str = "stain"
    ball: StainBox = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ball", StainBox(self.eps))


@dataclass(frozen=True, kw_only=True)
class StainJitter(_StainMethod):
    """Control: one uniformly random (α, β) per tile from the box (HED-jitter augmentation)."""

    def _run(self, problem: Problem, generator: torch.Generator) -> BestIterate:
        clean = problem.clean
        params = self.ball.random_point(len(clean), generator=generator, device=clean.device)
        x = jitter(rgb_to_hed(clean), params)
        return BestIterate(x, problem.value(x))


@dataclass(frozen=True, kw_only=True)
class StainPGD(_StainMethod):
    """Projected sign-gradient ascent on (α, β) from a random point of the box; best iterate kept.

    ``step_size`` None is 2.5·σ/steps, as for PGD. The gradient reaches (α, β) through the
    recomposition: d objective/d pixels (``Problem``, with its guards) pulled back by autograd.
    """

    name = "stain_pgd"
    steps: int = METHOD_DEFAULTS["stain_pgd"]["steps"]
    step_size: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        resolve_step_size(self)

    def _run(self, problem: Problem, generator: torch.Generator) -> BestIterate:
        clean = problem.clean
        hed = rgb_to_hed(clean)
        params = self.ball.random_point(len(clean), generator=generator, device=clean.device)
        best = None
        for step in range(self.steps):
            params = params.detach().requires_grad_(True)
            x = jitter(hed, params)
            value, pixel_grad = problem.value_and_grad(x)
            (grad,) = torch.autograd.grad(x, params, pixel_grad)
            best = BestIterate(x, value) if best is None else best
            best.update(x, value, step=step)
            params = self.ball.project(params.detach() + self.step_size * grad.sign())
        x = jitter(hed, params).detach()
        best.update(x, problem.value(x), step=self.steps)  # the last iterate needs no gradient
        return best
