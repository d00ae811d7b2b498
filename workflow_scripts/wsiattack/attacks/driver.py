"""What every attack method shares: the problem of one batch (``Problem``: objective, gradient and
its guards), the best iterate per tile (``BestIterate``), the mode attacks run in
(``attack_mode``) and the driver class with restarts (``Method``). The methods are in
``attacks.methods``; the guards are described there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from wsiattack import runtime
from wsiattack.attacks.bounds import Ball
from wsiattack.attacks.objectives import ObjectiveFn
from wsiattack.attacks.params import derived_step_size
from wsiattack.errors import AttackError


@dataclass
class AttackOutcome:
    adversarial: torch.Tensor  # float (k, 3, H, W) in [0, 1]: best iterate, before rounding
    objective: torch.Tensor  # (k,) objective of that iterate
    iterations: torch.Tensor  # (k,) int64: gradient evaluations spent on the tile
    best_step: torch.Tensor  # (k,) int64: step that produced the kept iterate (0 = the start)
    masks: torch.Tensor | None = None  # (k, H, W) bool: where a masked method (attacks.snap) may change pixels
    blobs: torch.Tensor | None = None  # (k,) int64: blobs that make up each mask


@contextlib.contextmanager
def attack_mode(encoder: nn.Module, *, device: torch.device, precision: str = "float32") -> Iterator[None]:
    """Eval mode, gradients on, forward passes in the attack's ``precision`` (``runtime.attack_precision``;
    an encoder's own precision from its spec); the encoder's previous train/eval mode is restored."""
    was_training = encoder.training
    encoder.eval()
    try:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            forward_precision(encoder, device=device, mode=precision),
        ):
            yield
    finally:
        encoder.train(was_training)


def forward_precision(encoder: nn.Module, *, device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """``runtime.attack_precision`` for ``encoder``: its safe dtype from its spec (a bare module: float32)."""
    encoder_precision = getattr(getattr(encoder, "spec", None), "precision", "float32")
    return runtime.attack_precision(device, mode=mode, encoder_precision=encoder_precision)


class Problem:
    """One batch: the encoder, the clean tiles, their reference output, the objective, the ball."""

    def __init__(
        self, *, encoder: nn.Module, clean: torch.Tensor, reference: torch.Tensor, objective: ObjectiveFn, ball: Ball
    ):
        # clone: tensors made under inference_mode cannot take part in autograd
        self.encoder, self.objective, self.ball = encoder, objective, ball
        self.clean = clean.detach().clone().float()
        self.reference = reference.detach().clone()
        self.reference = self.reference.float() if self.reference.is_floating_point() else self.reference
        self.evaluations = 0

    def value(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._checked_value(x)

    def value_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective per tile and its fp32 input gradient at ``x``; refuses NaN or all-zero gradients."""
        x = x.detach().float().requires_grad_(True)
        value = self._checked_value(x)
        (grad,) = torch.autograd.grad(value.sum(), x)
        check_gradient(grad)
        self.evaluations += 1
        return value.detach(), grad.detach()

    def _checked_value(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.encoder(x).float()
        with runtime.exact_arithmetic(x.device):  # an oracle's MIL head must not autocast with the encoder
            value = self.objective(embedding, self.reference)
        if not torch.isfinite(value).all():
            raise AttackError(
                "non-finite attack objective: the encoder produced NaN/Inf embeddings for a perturbed tile"
            )
        return value


def check_gradient(grad: torch.Tensor) -> None:
    """NaN or all-zero input gradients mean a broken wrapper or gradient masking, not robustness."""
    if not torch.isfinite(grad).all():
        raise AttackError("non-finite input gradient: the encoder is not differentiable in float32 here")
    flat = grad.flatten(1).abs().amax(dim=1)
    if (flat == 0).any():
        raise AttackError(
            f"all-zero input gradient for {int((flat == 0).sum())} tile(s) at a point inside the bound: gradient masking or a detached wrapper"
        )


class BestIterate:
    """Per-tile best iterate under a lexicographic key (primary, secondary), larger is better.

    Methods maximising the objective use (0, objective); C&W uses (success, −distortion) on
    success and (0, objective) otherwise.
    """

    def __init__(
        self,
        x: torch.Tensor,
        value: torch.Tensor,
        *,
        primary: torch.Tensor | None = None,
        secondary: torch.Tensor | None = None,
    ):
        self.x, self.value = x.detach().clone(), value.detach().clone()
        self.primary = torch.zeros_like(value) if primary is None else primary.float()
        self.secondary = value.clone() if secondary is None else secondary.clone()
        self.step = torch.zeros(len(value), dtype=torch.int64, device=value.device)

    def update(
        self,
        x: torch.Tensor,
        value: torch.Tensor,
        *,
        step: int,
        primary: torch.Tensor | None = None,
        secondary: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Keep ``x`` where it beats the best so far; return the mask of improved tiles."""
        primary = torch.zeros_like(value) if primary is None else primary.float()
        secondary = value if secondary is None else secondary
        improved = (primary > self.primary) | ((primary == self.primary) & (secondary > self.secondary))
        self.x[improved], self.value[improved] = x.detach()[improved], value[improved]
        self.primary[improved], self.secondary[improved] = primary[improved], secondary[improved]
        self.step[improved] = step
        return improved

    def merge(self, other: BestIterate) -> BestIterate:
        """Per tile, the better of two runs (restarts)."""
        improved = self.update(other.x, other.value, step=0, primary=other.primary, secondary=other.secondary)
        self.step[improved] = other.step[improved]
        return self


@dataclass(frozen=True, kw_only=True)
class Method:
    """Shared driver: guards, restarts, bookkeeping. Subclasses implement ``_run``."""

    eps: float
    restarts: int = 1
    norm: str = "linf"
    precision: str = "float32"  # of the forward passes: attacks.params.ATTACK_PRECISIONS
    ball: Ball = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ball", Ball(self.norm, self.eps))

    def __call__(
        self,
        *,
        encoder: nn.Module,
        clean: torch.Tensor,
        reference: torch.Tensor,
        generator: torch.Generator,
        objective: ObjectiveFn,
    ) -> AttackOutcome:
        with attack_mode(encoder, device=clean.device, precision=self.precision):
            problem = Problem(encoder=encoder, clean=clean, reference=reference, objective=objective, ball=self.ball)
            best, extras = self._solve(problem, generator)
        iterations = torch.full_like(best.step, problem.evaluations)
        return AttackOutcome(best.x, best.value, iterations, best.step, **extras)

    def _solve(self, problem: Problem, generator: torch.Generator) -> tuple[BestIterate, dict[str, torch.Tensor]]:
        """The best iterate over the restarts, and extra outcome fields (a masked method's masks)."""
        best = self._run(problem, generator)
        for _ in range(self.restarts - 1):
            best = best.merge(self._run(problem, generator))
        return best, {}

    def _run(self, problem: Problem, generator: torch.Generator) -> BestIterate:
        raise NotImplementedError


def resolve_step_size(method: Method) -> None:
    """Fill a null ``step_size`` of an iterative method (frozen) with its derived default."""
    if method.step_size is None:
        object.__setattr__(method, "step_size", derived_step_size(method.name, eps=method.eps, steps=method.steps))
