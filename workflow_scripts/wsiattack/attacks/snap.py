"""Sporadic naturalistic adversarial patches (SNAP; Kumar, Sharma & Narayan 2024).

A tile is changed only under a mask ``m`` that is a union of small nucleus-shaped blobs scattered
over it, ``x' = (1 − m) ⊙ x + m ⊙ δ``, and every channel of ``δ`` stays inside the clean tile's
own range ``[min_c x, max_c x]`` ("naturalistic": no colour the tile does not already have).

Masks (``blob_mask``), per tile and drawn from the attack's generator, so the method and its
controls at the same seed and selection get the same masks:

- ``mask_source: nuclei`` takes the shapes from the tile's own nuclei: the haematoxylin channel
  of the colour deconvolution (``attacks.stain.rgb_to_hed``), lightly smoothed, above its Otsu
  threshold, split into connected components; those whose equivalent diameter lies in
  ``blob_um`` are the shapes. Each blob is one of them, rotated by a multiple of 90°, placed
  uniformly at random. A tile with no such nucleus falls back to ellipses.
- ``mask_source: ellipses``: ellipses of equivalent diameter uniform in ``blob_um`` and axis
  ratio uniform in [0.6, 1], at a random angle.

``blob_um`` is in µm and converted with the tiles' ``target_mpp``, so blobs keep their physical
size at any magnification. ``blobs`` blobs are placed in turn; one that would take the mask's
area over ``eps`` (a fraction of the tile's area: the attack's budget) is skipped, so the stored
mask never exceeds it. The store keeps each tile's mask, its area fraction and its blob count.

``Snap`` starts ``δ`` at the tile's median colour (the paper found that better than a random
start) and takes signed gradient steps on ``δ`` under the mask, clipped to the colour box,
keeping the best iterate; the paper's stop at 95 % target confidence has no label-free analogue,
so it runs ``steps`` steps. Controls: ``snap_median`` (the masks filled with the median colour)
and ``snap_random`` (uniform random colour from the box, per pixel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from wsiattack.attacks.driver import BestIterate, Method, Problem
from wsiattack.attacks.params import MASK_SOURCES, METHOD_DEFAULTS
from wsiattack.attacks.stain import rgb_to_hed
from wsiattack.errors import AttackError, ConfigError
from wsiattack.tissue import otsu_threshold

_ASPECT_RANGE = (0.6, 1.0)  # minor / major axis of the fallback ellipses
_SMOOTH_PX = 1.0  # Gaussian sigma on the haematoxylin map before thresholding


@dataclass(frozen=True)
class MaskBudget:
    """What bounds a SNAP perturbation: the mask's area, at most ``eps`` of the tile's.

    It stands where the pixel methods have their ``bounds.Ball`` (``norm`` names it in the store's
    ``bound`` attrs); the colour box is per tile and enforced by construction.
    """

    eps: float
    norm: str = "mask"

    def __post_init__(self) -> None:
        if not 0.0 < self.eps <= 1.0:
            raise ConfigError(f"SNAP eps (the mask's largest share of the tile's area) {self.eps} must be in (0, 1]")

    def radius_for(self, n_values: int) -> float:
        return self.eps

    def quantize(self, adversarial: torch.Tensor, clean_uint8: torch.Tensor) -> torch.Tensor:
        # the box ends are grey levels, so rounding stays inside it; unmasked pixels are exact
        return torch.round(adversarial * 255).clamp_(0, 255).to(torch.uint8)


def nucleus_shapes(tile: np.ndarray, *, diameter_px: tuple[float, float]) -> list[np.ndarray]:
    """Boolean crops of the tile's nuclei (uint8 (H, W, 3)) whose equivalent diameter is in range."""
    pixels = torch.as_tensor(tile, dtype=torch.float32).permute(2, 0, 1)[None] / 255
    haematoxylin = ndimage.gaussian_filter(rgb_to_hed(pixels)[0, 0].numpy(), _SMOOTH_PX)
    if np.ptp(haematoxylin) == 0:
        return []
    labels, _ = ndimage.label(haematoxylin > otsu_threshold(haematoxylin, value_range=None))
    shapes = []
    for number, window in enumerate(ndimage.find_objects(labels), start=1):
        shape = labels[window] == number
        if diameter_px[0] <= 2 * np.sqrt(shape.sum() / np.pi) <= diameter_px[1]:  # equivalent diameter
            shapes.append(shape)
    return shapes


def ellipse_shape(rng: np.random.Generator, *, diameter_px: tuple[float, float]) -> np.ndarray:
    """A filled ellipse with the area of a disc of uniform diameter in range, random axis ratio and angle."""
    diameter, aspect, angle = rng.uniform(*diameter_px), rng.uniform(*_ASPECT_RANGE), rng.uniform(0, np.pi)
    major, minor = diameter / 2 / np.sqrt(aspect), diameter / 2 * np.sqrt(aspect)
    half = int(np.ceil(major))
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    u, v = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
    shape = (u / major) ** 2 + (v / minor) ** 2 <= 1
    return shape if shape.any() else np.ones((1, 1), dtype=bool)


def blob_mask(
    tile: np.ndarray,
    *,
    blobs: int,
    diameter_px: tuple[float, float],
    max_area_fraction: float,
    source: str,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """A boolean (H, W) mask of up to ``blobs`` blobs within the area budget, and how many were placed."""
    if source not in MASK_SOURCES:
        raise ConfigError(f"SNAP mask_source {source!r}: use one of {', '.join(MASK_SOURCES)}")
    height, width = tile.shape[:2]
    shapes = nucleus_shapes(tile, diameter_px=diameter_px) if source == "nuclei" else []
    limit = int(np.floor(max_area_fraction * height * width))
    mask, placed = np.zeros((height, width), dtype=bool), 0
    for _ in range(blobs):
        if shapes:
            shape = np.rot90(shapes[int(rng.integers(len(shapes)))], int(rng.integers(4)))
        else:
            shape = ellipse_shape(rng, diameter_px=diameter_px)
        shape = shape[:height, :width]
        top, left = int(rng.integers(height - shape.shape[0] + 1)), int(rng.integers(width - shape.shape[1] + 1))
        candidate = mask.copy()
        candidate[top : top + shape.shape[0], left : left + shape.shape[1]] |= shape
        if candidate.sum() <= limit:
            mask, placed = candidate, placed + 1
    return mask, placed


def colour_box(clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile and channel, the clean tile's smallest and largest value, (B, 3, 1, 1) each."""
    flat = clean.flatten(2)
    return flat.amin(dim=2)[..., None, None], flat.amax(dim=2)[..., None, None]


def median_colour(clean: torch.Tensor) -> torch.Tensor:
    """Per tile and channel, the median value (a grey level, inside the colour box), (B, 3, 1, 1)."""
    return clean.flatten(2).median(dim=2).values[..., None, None]


@dataclass(frozen=True, kw_only=True)
class _SnapMethod(Method):
    """Shared by SNAP and its controls: masks, colour box and the outcome with its masks."""

    norm: str = "mask"
    blobs: int = METHOD_DEFAULTS["snap"]["blobs"]
    blob_um: tuple[float, float] = tuple(METHOD_DEFAULTS["snap"]["blob_um"])
    mask_source: str = METHOD_DEFAULTS["snap"]["mask_source"]
    tile_mpp: float | None = None  # µm per pixel of the tiles (the tiles store's target_mpp)
    ball: MaskBudget = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ball", MaskBudget(self.eps))
        object.__setattr__(self, "blob_um", tuple(float(value) for value in self.blob_um))
        if self.tile_mpp is None or self.tile_mpp <= 0:
            raise AttackError(f"{self.name}: blob sizes are in µm and need the tiles' resolution (tile_mpp)")
        low, high = self.blob_um
        if not 0 < low <= high:
            raise ConfigError(
                f"{self.name}: blob_um {list(self.blob_um)} must be [smallest, largest] µm with 0 < smallest <= largest"
            )

    @property
    def diameter_px(self) -> tuple[float, float]:
        return self.blob_um[0] / self.tile_mpp, self.blob_um[1] / self.tile_mpp

    def masks(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) float masks on the tiles' device and (B,) blob counts, from ``generator``."""
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
        tiles = torch.round(clean * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        drawn = [
            blob_mask(
                tile,
                blobs=self.blobs,
                diameter_px=self.diameter_px,
                max_area_fraction=self.eps,
                source=self.mask_source,
                rng=rng,
            )
            for tile in tiles
        ]
        masks = torch.as_tensor(np.stack([mask for mask, _ in drawn]))[:, None].to(clean.device, clean.dtype)
        return masks, torch.as_tensor([placed for _, placed in drawn], dtype=torch.int64)

    def _solve(self, problem: Problem, generator: torch.Generator) -> tuple[BestIterate, dict[str, torch.Tensor]]:
        masks, blobs = self.masks(problem.clean, generator)  # one set of masks: no restarts
        return self._fill(problem, masks, generator), {"masks": masks[:, 0] > 0, "blobs": blobs}

    def _fill(self, problem: Problem, masks: torch.Tensor, generator: torch.Generator) -> BestIterate:
        raise NotImplementedError


def patched(clean: torch.Tensor, masks: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``(1 − m) ⊙ x + m ⊙ δ``; exact outside the mask (m is 0 or 1)."""
    return clean * (1 - masks) + delta * masks


@dataclass(frozen=True, kw_only=True)
class SnapMedian(_SnapMethod):
    """Control: the masks filled with the tile's median colour."""

    name = "snap_median"

    def _fill(self, problem: Problem, masks: torch.Tensor, generator: torch.Generator) -> BestIterate:
        x = patched(problem.clean, masks, median_colour(problem.clean))
        return BestIterate(x, problem.value(x))


@dataclass(frozen=True, kw_only=True)
class SnapRandom(_SnapMethod):
    """Control: the masks filled with uniform random colour from the tile's box, per pixel."""

    name = "snap_random"

    def _fill(self, problem: Problem, masks: torch.Tensor, generator: torch.Generator) -> BestIterate:
        low, high = colour_box(problem.clean)
        uniform = torch.rand(problem.clean.shape, generator=generator).to(problem.clean.device)
        x = patched(problem.clean, masks, low + (high - low) * uniform)
        return BestIterate(x, problem.value(x))


@dataclass(frozen=True, kw_only=True)
class Snap(_SnapMethod):
    """Signed gradient ascent on the patch colours from the median colour, clipped to the tile's box."""

    name = "snap"
    steps: int = METHOD_DEFAULTS["snap"]["steps"]
    step_size: float = METHOD_DEFAULTS["snap"]["step_size"]

    def _fill(self, problem: Problem, masks: torch.Tensor, generator: torch.Generator) -> BestIterate:
        clean = problem.clean
        low, high = colour_box(clean)
        delta = median_colour(clean).expand_as(clean).clone()
        best = None
        for step in range(self.steps):
            x = patched(clean, masks, delta)
            value, grad = problem.value_and_grad(x)
            best = BestIterate(x, value) if best is None else best
            best.update(x, value, step=step)
            delta = torch.minimum(torch.maximum(delta + self.step_size * grad.sign() * masks, low), high)
        x = patched(clean, masks, delta)
        best.update(x, problem.value(x), step=self.steps)
        return best
