"""Attack methods on a batch of tiles in [0, 1] pixel space, revised for label-free objectives.

Each method is a frozen dataclass; calling it with keyword arguments ``encoder, clean,
reference, generator, objective`` returns an ``AttackOutcome`` (the best iterate per tile
before uint8 rounding; ``perturb`` rounds it with ``Ball.quantize``).

Shared guards (``attack_mode`` and ``Problem``): the encoder runs in eval mode (its previous mode
is restored), gradients are on even under ``no_grad``/``inference_mode``, the encoder runs in
the entry's ``precision`` (``runtime.attack_precision``; default float32, no autocast) while the
perturbation, its gradient and the objective are float32, every iterate is projected into the ball and [0, 1], the best iterate per
tile is kept, and NaN objectives or NaN / all-zero input gradients raise ``AttackError``.

Label-free start: the embedding distance is minimal (zero) at the clean tile, so its gradient
there is exactly zero. Every method therefore starts from a random point inside the bound (FGSM
and C&W from half the bound, as R+FGSM does) and the zero-gradient guard applies from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from wsiattack.attacks.driver import (  # noqa: F401 (re-exported)
    AttackOutcome,
    BestIterate,
    Method,
    Problem,
    attack_mode,
    resolve_step_size,
)
from wsiattack.attacks.objectives import Objective, get_objective
from wsiattack.attacks.params import FIXED_NORMS, METHOD_DEFAULTS, method_params
from wsiattack.attacks.snap import Snap, SnapMedian, SnapRandom
from wsiattack.attacks.stain import StainJitter, StainPGD


@dataclass(frozen=True, kw_only=True)
class UniformNoise(Method):
    """Control: random ±eps per value (Rademacher), the largest noise the L-inf budget allows.

    Its L2 norm is eps·sqrt(C·H·W), the L2 methods' radius: it matches either budget.
    """

    def _run(self, problem: Problem, generator: torch.Generator) -> BestIterate:
        clean = problem.clean
        signs = torch.randint(0, 2, clean.shape, generator=generator).to(clean.device) * 2.0 - 1.0
        x = self.ball.project(clean + self.eps * signs, clean)
        return BestIterate(x, problem.value(x))


@dataclass(frozen=True, kw_only=True)
class FGSM(Method):
    """FGSM (Goodfellow et al. 2015) from a random start (R+FGSM, Tramèr et al. 2018).

    The gradient is taken at a random point within half the bound (the clean tile's gradient is
    zero) and the adversarial tile is clean + eps·sign(gradient): the vertex of the box the
    linearisation prefers (L2: clean + radius·unit gradient). The start is kept if it scores higher.
    """

    def _run(self, problem: Problem, generator: torch.Generator) -> BestIterate:
        clean = problem.clean
        start = self.ball.random_start(clean, generator=generator, scale=0.5)
        value, grad = problem.value_and_grad(start)
        best = BestIterate(start, value)
        x = self.ball.project(self.ball.step(clean, grad, self.eps), clean)
        best.update(x, problem.value(x), step=1)
        return best


@dataclass(frozen=True, kw_only=True)
class PGD(Method):
    """Projected gradient ascent (Madry et al. 2018), L-inf (sign steps) or L2 (normalised steps).

    Defaults are ``params.METHOD_DEFAULTS``'s; ``step_size`` None is derived from eps and steps
    as in the config (``params.derived_step_size``).
    """

    name = "pgd"
    steps: int = METHOD_DEFAULTS["pgd"]["steps"]
    step_size: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        resolve_step_size(self)

    def _run(self, problem: Problem, generator: torch.Generator) -> BestIterate:
        return projected_ascent(problem, generator=generator, steps=self.steps, step_size=self.step_size, momentum=0.0)


@dataclass(frozen=True, kw_only=True)
class MIFGSM(PGD):
    """Momentum iterative FGSM (Dong et al. 2018): g ← μ·g + ∇/‖∇‖₁, step along sign(g)."""

    name = "mifgsm"
    steps: int = METHOD_DEFAULTS["mifgsm"]["steps"]
    momentum: float = METHOD_DEFAULTS["mifgsm"]["momentum"]

    def _run(self, problem: Problem, generator: torch.Generator) -> BestIterate:
        return projected_ascent(
            problem, generator=generator, steps=self.steps, step_size=self.step_size, momentum=self.momentum
        )


def projected_ascent(
    problem: Problem, *, generator: torch.Generator, steps: int, step_size: float, momentum: float
) -> BestIterate:
    """PGD / MI-FGSM loop from a random start; with momentum 0 the direction is the gradient's.

    The gradient is L1-normalised per tile before it is accumulated (Dong et al.); the step
    direction (sign, or unit L2) does not depend on that scale, so momentum 0 is plain PGD.
    """
    ball, clean = problem.ball, problem.clean
    x = ball.random_start(clean, generator=generator)
    best, velocity = None, torch.zeros_like(clean)
    for step in range(steps):
        value, grad = problem.value_and_grad(x)
        best = BestIterate(x, value) if best is None else best
        best.update(x, value, step=step)
        velocity = momentum * velocity + grad / (grad.flatten(1).abs().mean(dim=1).view(-1, 1, 1, 1) + 1e-12)
        x = ball.project(ball.step(x, velocity, step_size), clean)
    best.update(x, problem.value(x), step=steps)  # the last iterate needs no gradient
    return best


@dataclass(frozen=True, kw_only=True)
class APGD(Method):
    """Auto-PGD (Croce & Hein 2020) with its step-size schedule and momentum.

    Start: step size 2·eps, first step without momentum. Step: z = P(x + η·dir(∇)), x' = P(x +
    α(z − x) + (1 − α)(x − x_prev)) with α = ``momentum`` (0.75). Checkpoints after 0.22·N
    iterations, each interval 0.03·N shorter but at least 0.06·N. At a checkpoint a tile's η is
    halved and it restarts from its best iterate if (1) its objective rose in fewer than ρ of the
    interval's steps, or (2) η was not halved at the previous checkpoint and the best objective
    has not improved since. The first condition counts rises from step to step, the second
    compares best values, both per tile.
    """

    steps: int = METHOD_DEFAULTS["apgd"]["steps"]
    momentum: float = METHOD_DEFAULTS["apgd"]["momentum"]
    rho: float = METHOD_DEFAULTS["apgd"]["rho"]

    def _run(self, problem: Problem, generator: torch.Generator) -> BestIterate:
        clean, n = problem.clean, self.steps
        x = self.ball.random_start(clean, generator=generator)
        value, grad = problem.value_and_grad(x)
        best, grad_best = BestIterate(x, value), grad.clone()
        schedule = _APGDSchedule(
            n_tiles=len(clean), n_steps=n, initial=2 * self.eps, rho=self.rho, best=best.value, device=clean.device
        )
        x_prev = x
        for i in range(n):
            x_next = self._momentum_step(x, x_prev, grad, schedule.step_size, clean, first=i == 0)
            x_prev, x = x, x_next
            new_value, grad = problem.value_and_grad(x)
            improved = best.update(x, new_value, step=i + 1)
            grad_best[improved] = grad[improved]
            reduce = schedule.after_step(value=new_value, previous=value, best=best.value)
            value = new_value
            if reduce is not None and reduce.any():  # restart the halved tiles from their best
                x, grad = x.clone(), grad.clone()
                x[reduce], grad[reduce] = best.x[reduce], grad_best[reduce]
        return best

    def _momentum_step(
        self,
        x: torch.Tensor,
        x_prev: torch.Tensor,
        grad: torch.Tensor,
        step_size: torch.Tensor,
        clean: torch.Tensor,
        *,
        first: bool,
    ) -> torch.Tensor:
        z = self.ball.project(self.ball.step(x, grad, step_size), clean)
        alpha = 1.0 if first else self.momentum
        return self.ball.project(x + alpha * (z - x) + (1 - alpha) * (x - x_prev), clean)


class _APGDSchedule:
    """APGD's per-tile step sizes and checkpoint bookkeeping."""

    def __init__(
        self, *, n_tiles: int, n_steps: int, initial: float, rho: float, best: torch.Tensor, device: torch.device
    ):
        self.step_size = torch.full((n_tiles, 1, 1, 1), initial, device=device)
        self.interval = max(int(0.22 * n_steps), 1)
        self.shrink, self.minimum = max(int(0.03 * n_steps), 1), max(int(0.06 * n_steps), 1)
        self.rho = rho
        self.since_check = 0
        self.rises = torch.zeros(n_tiles, device=device)
        self.best_at_check = best.clone()
        self.reduced_at_check = torch.ones(n_tiles, dtype=torch.bool, device=device)

    def after_step(self, *, value: torch.Tensor, previous: torch.Tensor, best: torch.Tensor) -> torch.Tensor | None:
        """Record one step; at a checkpoint return the tiles whose step size was halved."""
        self.rises += (value > previous).float()
        self.since_check += 1
        if self.since_check < self.interval:
            return None
        oscillating = self.rises < self.rho * self.interval
        stalled = ~self.reduced_at_check & (best <= self.best_at_check)
        reduce = oscillating | stalled
        self.step_size[reduce] /= 2
        self.reduced_at_check, self.best_at_check = reduce, best.clone()
        self.rises.zero_()
        self.since_check = 0
        self.interval = max(self.interval - self.shrink, self.minimum)
        return reduce


@dataclass(frozen=True, kw_only=True)
class CarliniWagnerL2(Method):
    """C&W-L2 (Carlini & Wagner 2017) for a label-free objective, with a hard L2 budget.

    Variable: u(w) = (tanh w + 1)/2, the tanh box re-parametrisation onto [0, 1]; the attacked tile
    is x = P(u), its (differentiable) radial projection onto the L2 ball of radius
    eps·sqrt(C·H·W), so the budget is a hard constraint. Loss per tile: ‖u − clean‖₂² / radius²
    + (c / g₀) · max(kappa − objective(x), 0), minimised with Adam (``lr``) for ``steps`` per
    round. Both terms are scale-free so that one c fits any encoder, objective and eps: the
    distortion is divided by radius² (the whole budget costs 1) and the objective by g₀ =
    radius·‖∇objective‖₂ at the random start, the gain the whole budget promises to first order
    (one extra gradient evaluation per tile). c = 1 thus weighs "spend the whole budget" against
    "gain what the linearisation promises"; the default c = 10 leans to the objective.

    Success (what the binary search on c sees): objective ≥ ``kappa`` at some iterate of the
    round. Success → c ← (lower + upper)/2 with upper = c (try less distortion); failure →
    lower = c and c ← 10·c until an upper bound exists, then bisect. The kept iterate is the
    successful one with the least distortion, or, for a tile that never succeeded, the one with
    the highest objective. ``kappa: null`` (default) means unreachable: c grows tenfold every
    round and the attack maximises the objective within the L2 budget.

    The first round starts from a random point within half the radius (the clean tile's gradient
    is zero); every later round continues from the best iterate so far. Restarting each round
    from the same point, as the original does, made rounds 2–5 repeat round 1 whenever success
    is unreachable (``kappa: null``): Adam is invariant to the loss's scale, and once c
    dominates the penalty a larger c changes nothing, so ~80 % of the budget bought nothing.
    Every round's gradient evaluations count in the stored ``iterations``.
    """

    norm: str = FIXED_NORMS["cw"]
    steps: int = METHOD_DEFAULTS["cw"]["steps"]
    binary_search_steps: int = METHOD_DEFAULTS["cw"]["binary_search_steps"]
    c: float = METHOD_DEFAULTS["cw"]["c"]
    lr: float = METHOD_DEFAULTS["cw"]["lr"]
    kappa: float | None = METHOD_DEFAULTS["cw"]["kappa"]

    def _run(self, problem: Problem, generator: torch.Generator) -> BestIterate:
        clean = problem.clean
        start = self.ball.random_start(clean, generator=generator, scale=0.5)
        w_start = torch.atanh((2 * start - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        _, grad = problem.value_and_grad(start)
        scale = self.ball.first_order_gain(grad)  # objective units of "the whole budget"
        search = _BinarySearch(initial=self.c, n_tiles=len(clean), device=clean.device)
        best = None
        for round_ in range(self.binary_search_steps):
            best, succeeded = self._round(problem, w_start, search.c / scale, best, first_step=round_ * self.steps)
            search.update(succeeded)
            w_start = torch.atanh((2 * best.x - 1).clamp(-1 + 1e-6, 1 - 1e-6))  # the next round goes on from here
        return best

    def _round(
        self, problem: Problem, w_start: torch.Tensor, c: torch.Tensor, best: BestIterate | None, *, first_step: int
    ) -> tuple[BestIterate, torch.Tensor]:
        clean, radius_sq = problem.clean, self.ball.radius(problem.clean) ** 2
        kappa = math.inf if self.kappa is None else self.kappa
        w = w_start.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([w], lr=self.lr)
        succeeded = torch.zeros(len(clean), dtype=torch.bool, device=clean.device)
        for step in range(self.steps):
            unbounded = (torch.tanh(w) + 1) / 2
            x = self.ball.project(unbounded, clean)
            value, grad = problem.value_and_grad(x)
            # The penalty is on the unprojected point: outside the ball the projected distortion
            # is flat (= radius²) and could never pull w back in.
            penalty = distortion_of(unbounded, clean) / radius_sq
            success = value >= kappa
            key = {"primary": success, "secondary": torch.where(success, -distortion_of(x.detach(), clean), value)}
            best = BestIterate(x, value, **key) if best is None else best
            best.update(x, value, step=first_step + step, **key)
            succeeded |= success
            # d/dx of c·max(kappa − f, 0) is −c·∇f where f < kappa: a linear surrogate carries it to w
            pull = (-c * (~success).float()).view(-1, 1, 1, 1) * grad
            loss = penalty + (pull * x).flatten(1).sum(dim=1)
            optimiser.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimiser.step()
        return best, succeeded


def distortion_of(x: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """‖x − clean‖₂² per tile."""
    return (x - clean).flatten(1).pow(2).sum(dim=1)


class _BinarySearch:
    """C&W's per-tile search for the smallest trade-off constant c that reaches success."""

    def __init__(self, *, initial: float, n_tiles: int, device: torch.device):
        self.c = torch.full((n_tiles,), float(initial), device=device)
        self.lower = torch.zeros_like(self.c)
        self.upper = torch.full_like(self.c, math.inf)

    def update(self, succeeded: torch.Tensor) -> None:
        self.upper = torch.where(succeeded, torch.minimum(self.upper, self.c), self.upper)
        self.lower = torch.where(succeeded, self.lower, torch.maximum(self.lower, self.c))
        bounded = torch.isfinite(self.upper)
        self.c = torch.where(bounded, (self.lower + self.upper) / 2, self.c * 10)


METHODS: dict[str, type[Method]] = {
    "fgsm": FGSM,
    "pgd": PGD,
    "mifgsm": MIFGSM,
    "apgd": APGD,
    "cw": CarliniWagnerL2,
    "noise": UniformNoise,
    "stain_pgd": StainPGD,
    "stain_jitter": StainJitter,
    "snap": Snap,
    "snap_median": SnapMedian,
    "snap_random": SnapRandom,
}


def build_method(spec: dict[str, Any], *, tile_mpp: float | None = None) -> tuple[Method, Objective]:
    """The attack callable and its objective from an attack entry (method defaults filled in).

    ``tile_mpp`` (µm per pixel of the tiles) is passed to the methods that size things in µm (SNAP's blobs).
    """
    where = f"attacks.{spec.get('name', '?')}"
    params = method_params(spec, where=where, strict=False)
    method = METHODS[spec["method"]]
    accepted = {f.name for f in fields(method) if f.init}
    if "tile_mpp" in accepted:
        params["tile_mpp"] = tile_mpp
    precision = spec.get("precision", "float32")
    kwargs = {k: v for k, v in params.items() if k in accepted}
    return method(eps=float(spec["eps"]), precision=precision, **kwargs), get_objective(spec.get("objective", "cosine"))
