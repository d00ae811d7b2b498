"""Tile input-transform defences on batches (B, 3, H, W) in [0, 1], and the adaptive attacker's model.

``forward`` is what the defended pipeline computes before the encoder. How an adaptive attacker
gets a gradient through it (Athalye, Carlini and Wagner 2018):

==============  ===================================  =========================================
defence         forward                              gradient for the adaptive attacker
==============  ===================================  =========================================
jpeg            uint8 round trip through PIL's JPEG  straight-through (BPDA, identity)
bit_depth       rounding to ``bits`` per channel     straight-through (BPDA, identity)
gaussian        separable Gaussian, mirrored border  exact
median          median of a size x size window       exact (the median element's)
reinhard        per-tile CIELAB mean/std matching    exact
noise           additive Gaussian noise, clipped     exact per draw, EOT over draws
==============  ===================================  =========================================

``straight_through=False`` gives the exact (zero or absent) gradient of the non-differentiable
steps: that is the naive attacker whom these defences mask gradients from, kept for tests and
for showing the masking. Borders mirror without repeating the edge pixel, as scipy.ndimage's
``mode="mirror"`` (the references in tests/test_defences.py).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from wsiattack.defences.params import ATTACKER_KEYS


class TileDefence(nn.Module):
    """A transform of tiles in [0, 1]; ``randomised`` defences draw anew at every call."""

    randomised = False
    entry: Mapping[str, object] = {}  # the config entry it was built from (build_defence)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: expected tiles (B, 3, H, W), got {tuple(x.shape)}")
        return self.transform(x)

    def transform(self, x: Tensor) -> Tensor:
        raise NotImplementedError


def straight_through(x: Tensor, y: Tensor) -> Tensor:
    """``y`` in the forward pass, the identity's gradient in the backward pass (BPDA)."""
    return x + (y - x).detach()


def to_uint8(x: Tensor) -> Tensor:
    """Tiles in [0, 1] as the grey levels a stored tile would have."""
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


class JPEG(TileDefence):
    """Re-compression at ``quality`` with PIL's defaults (4:2:0 chroma subsampling below 95)."""

    def __init__(self, *, quality: int, straight_through: bool = True) -> None:
        super().__init__()
        if not 1 <= quality <= 95:
            raise ValueError(f"jpeg quality must be in [1, 95] (PIL's range), got {quality}")
        self.quality, self.straight_through = quality, straight_through

    def transform(self, x: Tensor) -> Tensor:
        tiles = to_uint8(x.detach()).permute(0, 2, 3, 1).cpu().numpy()
        decoded = np.stack([jpeg_round_trip(tile, quality=self.quality) for tile in tiles])
        y = torch.from_numpy(decoded).to(x.device).permute(0, 3, 1, 2).to(x.dtype) / 255
        return straight_through(x, y) if self.straight_through else y


def jpeg_round_trip(tile: np.ndarray, *, quality: int) -> np.ndarray:
    """One uint8 (H, W, 3) tile encoded as JPEG in memory and decoded."""
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


class BitDepth(TileDefence):
    """Colour-depth reduction to ``bits`` per channel (Xu et al. 2018's feature squeezing)."""

    def __init__(self, *, bits: int, straight_through: bool = True) -> None:
        super().__init__()
        if not 1 <= bits <= 7:
            raise ValueError(f"bit_depth bits must be in [1, 7] (8 is the stored depth), got {bits}")
        self.levels, self.straight_through = 2**bits - 1, straight_through

    def transform(self, x: Tensor) -> Tensor:
        y = torch.round(x.clamp(0, 1) * self.levels) / self.levels
        return straight_through(x, y) if self.straight_through else y


class GaussianBlur(TileDefence):
    """Gaussian smoothing of each channel, truncated at ``truncate`` sigmas (scipy's radius rule)."""

    def __init__(self, *, sigma_px: float, truncate: float = 4.0) -> None:
        super().__init__()
        if sigma_px <= 0:
            raise ValueError(f"gaussian sigma_px must be > 0, got {sigma_px}")
        radius = int(truncate * sigma_px + 0.5)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / sigma_px) ** 2)
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)
        self.radius = radius

    def transform(self, x: Tensor) -> Tensor:
        kernel = self.kernel.to(device=x.device, dtype=x.dtype)
        r = self.radius
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


class MedianBlur(TileDefence):
    """Median of each pixel's ``size`` x ``size`` window (odd sizes: the median is one element)."""

    def __init__(self, *, size_px: int) -> None:
        super().__init__()
        if size_px < 3 or size_px % 2 == 0:
            raise ValueError(f"median size_px must be odd and >= 3, got {size_px}")
        self.size = size_px

    def transform(self, x: Tensor) -> Tensor:
        r = self.size // 2
        windows = F.pad(x, (r, r, r, r), mode="reflect").unfold(2, self.size, 1).unfold(3, self.size, 1)
        return windows.flatten(-2).median(dim=-1).values


# sRGB (D65) <-> CIELAB with scikit-image's constants (skimage.color.rgb2lab / lab2rgb)
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def _apply(matrix: np.ndarray, x: Tensor) -> Tensor:
    return torch.einsum("ij,bjhw->bihw", torch.as_tensor(matrix, dtype=x.dtype, device=x.device), x)


def rgb_to_lab(x: Tensor) -> Tensor:
    """sRGB tiles in [0, 1] (B, 3, H, W) -> CIELAB (L in [0, 100]). Branches are clamped so
    that the unselected side of each ``where`` has a finite gradient."""
    linear = torch.where(x > 0.04045, ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = _apply(_XYZ_FROM_RGB / _WHITE_D65[:, None], linear)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIELAB -> sRGB in [0, 1] (clipped, as scikit-image does)."""
    light, a, b = lab.unbind(1)
    fy = (light + 16) / 116
    f = torch.stack([a / 500 + fy, fy, (fy - b / 200).clamp_min(0)], dim=1)
    xyz = torch.where(f > 0.2068966, f.clamp_min(0.2068966) ** 3, (f - 16 / 116) / 7.787)
    linear = _apply(np.linalg.inv(_XYZ_FROM_RGB) * _WHITE_D65[None, :], xyz)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0.0031308) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0, 1)


class Reinhard(TileDefence):
    """Reinhard et al. (2001) stain normalisation: each tile's CIELAB channel means and standard
    deviations are matched to a target's. ``fitted`` takes the target from reference tiles."""

    def __init__(self, *, target_mean: Sequence[float], target_std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("target_mean", torch.tensor(target_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("target_std", torch.tensor(target_std, dtype=torch.float32).view(1, 3, 1, 1))
        if (self.target_std <= 0).any():
            raise ValueError(f"reinhard target_std must be > 0, got {list(target_std)}")

    @classmethod
    def fitted(cls, tiles: Tensor) -> Reinhard:
        """The mean over ``tiles`` (B, 3, H, W) of their per-tile channel means and stds."""
        mean, std = _lab_moments(rgb_to_lab(tiles.float()))
        return cls(target_mean=mean.mean(0).flatten().tolist(), target_std=std.mean(0).flatten().tolist())

    def transform(self, x: Tensor) -> Tensor:
        lab = rgb_to_lab(x)
        mean, std = _lab_moments(lab)
        target_mean, target_std = self.target_mean.to(lab), self.target_std.to(lab)
        return lab_to_rgb((lab - mean) / std * target_std + target_mean)


def _lab_moments(lab: Tensor) -> tuple[Tensor, Tensor]:
    # the floor keeps a flat tile (std 0) finite: it is shifted to the target mean, not stretched
    return lab.mean(dim=(2, 3), keepdim=True), lab.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)


class GaussianNoise(TileDefence):
    """Additive Gaussian noise of ``sigma`` (in [0, 1] units), clipped to [0, 1], drawn anew at
    every call from the module's own seeded generator (one per device), so a run is repeatable."""

    randomised = True

    def __init__(self, *, sigma: float, seed: int = 0) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"noise sigma must be > 0, got {sigma}")
        self.sigma, self.seed = sigma, seed
        self._generators: dict[str, torch.Generator] = {}

    def transform(self, x: Tensor) -> Tensor:
        key = str(x.device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=x.device).manual_seed(self.seed)
        noise = torch.randn(x.shape, generator=self._generators[key], device=x.device, dtype=x.dtype)
        return (x + self.sigma * noise).clamp(0, 1)


class DefendedEncoder(nn.Module):
    """The defended pipeline as one model, ``encoder(defence(x))``: what the adaptive attacker
    differentiates. For a randomised defence the output is the mean embedding over
    ``eot_samples`` draws (expectation over transformation, on the embedding)."""

    def __init__(self, *, defence: TileDefence, encoder: nn.Module, eot_samples: int = 1) -> None:
        super().__init__()
        if eot_samples < 1 or (eot_samples > 1 and not defence.randomised):
            raise ValueError(f"eot_samples must be 1 for a deterministic defence and >= 1 otherwise, got {eot_samples}")
        self.defence, self.encoder, self.eot_samples = defence, encoder, eot_samples
        # the TileEncoder's identity, so extraction, attack and re-embedding take it as an encoder
        self.spec = getattr(encoder, "spec", None)
        self.weights_id = getattr(encoder, "weights_id", None)
        self.weights_source = getattr(encoder, "weights_source", None)

    def describe(self) -> dict[str, object]:
        """The encoder's identity plus the defence entry (recorded in every store it writes)."""
        return {**self.encoder.describe(), "defence": dict(self.defence.entry), "eot_samples": self.eot_samples}

    def forward(self, x: Tensor) -> Tensor:
        total = sum(self.encoder(self.defence(x)).float() for _ in range(self.eot_samples))
        return total / self.eot_samples


DEFENCES = {
    "jpeg": JPEG,
    "bit_depth": BitDepth,
    "gaussian": GaussianBlur,
    "median": MedianBlur,
    "reinhard": Reinhard,
    "noise": GaussianNoise,
}


def build_defence(spec: dict) -> TileDefence:
    """A tile defence from its config entry ``{kind: ..., <its parameters>}``."""
    kind = spec.get("kind")
    if kind not in DEFENCES:
        raise ValueError(f"unknown tile defence {kind!r}; known: {', '.join(DEFENCES)}")
    params = {key: value for key, value in spec.items() if key not in ("kind", "name", *ATTACKER_KEYS)}
    try:
        defence = DEFENCES[kind](**params)
    except TypeError as error:
        raise ValueError(f"tile defence {kind!r}: {error}") from None
    defence.entry = dict(spec)
    return defence
