"""The encoder wrapper: [0, 1] RGB pixels in, one embedding per tile out.

The wrapper owns resizing and normalisation, so the attack stage differentiates through exactly
the function that extraction uses, and attacks live in [0, 1] pixel space where clipping and
the uint8 rounding of the stored result are well defined.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from wsiattack import runtime
from wsiattack.errors import EncoderError
from wsiattack.encoders.registry import EncoderSpec, get_spec

log = logging.getLogger(__name__)


class TileEncoder(nn.Module):
    """``forward(pixels)``: float (B, 3, H, W) in [0, 1] -> float (B, D) embedding."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, *, weights_id: str):
        super().__init__()
        self.spec = spec
        self.weights_id = weights_id
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.spec.input_px, self.spec.input_px):
            pixels = F.interpolate(pixels, size=(self.spec.input_px,) * 2, mode="bilinear", align_corners=False, antialias=True)
        tokens = self.backbone.forward_features((pixels - self.mean) / self.std)
        return readout(self.backbone, tokens, self.spec.readout)

    def describe(self) -> dict[str, object]:
        """Identity recorded in every features store."""
        s = self.spec
        return {
            "encoder": s.name, "architecture": s.timm_name, "weights_id": self.weights_id,
            "input_px": s.input_px, "mean": list(s.mean), "std": list(s.std), "readout": s.readout,
            "embed_dim": s.embed_dim, "precision": s.precision,
        }


def readout(backbone: nn.Module, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "pooled":
        return backbone.forward_head(tokens, pre_logits=True)
    cls = tokens[:, 0]
    if kind == "cls":
        return cls
    n_prefix = getattr(backbone, "num_prefix_tokens", 1)  # CLS + register tokens
    return torch.cat([cls, tokens[:, n_prefix:].mean(dim=1)], dim=-1)  # "cls+mean" (Virchow2)


def build_encoder(name: str) -> TileEncoder:
    """Build a registry encoder on the CPU in eval mode with frozen parameters."""
    spec = get_spec(name)
    if spec.weights != "seeded":
        raise EncoderError(f"encoder {name!r}: loading {spec.weights} weights is not supported yet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        backbone = timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs)
    encoder = TileEncoder(spec, backbone, weights_id=f"seeded:{spec.seed}:sha256:{state_dict_sha256(backbone)[:16]}")
    return encoder.eval().requires_grad_(False)


def state_dict_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def channels_first(tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) as stored -> uint8 (B, 3, H, W) as torch models take it."""
    return torch.as_tensor(tiles).permute(0, 3, 1, 2)


def to_unit_pixels(tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1]."""
    return channels_first(tiles).float().div_(255.0)


def iter_batches(array, *, batch_size: int, prefetch: int = 2) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, uint8 batch) from a zarr (or numpy) array, reading ahead in a thread.

    zarr decompression releases the GIL, so reading the next batches overlaps the forward pass.
    """
    starts = range(0, array.shape[0], batch_size)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(array.__getitem__, slice(s, s + batch_size)) for s in starts[:prefetch]]
        for i, start in enumerate(starts):
            batch = pending.pop(0).result()
            if i + prefetch < len(starts):
                nxt = starts[i + prefetch]
                pending.append(pool.submit(array.__getitem__, slice(nxt, nxt + batch_size)))
            yield start, np.asarray(batch)


@torch.inference_mode()
def embed_tiles(encoder: TileEncoder, tiles, *, batch_size: int, device: torch.device, label: str) -> np.ndarray:
    """Embed uint8 tiles (zarr or numpy, (N, T, T, 3)) -> float32 (N, D); checks every batch.

    ``label`` (the slide id) names the culprit when a batch has NaN/Inf embeddings.
    """
    encoder = encoder.to(device)
    out = np.empty((tiles.shape[0], encoder.spec.embed_dim), dtype=np.float32)
    pin = device.type == "cuda"
    for start, batch in iter_batches(tiles, batch_size=batch_size):
        pixels = to_unit_pixels(batch)
        if pin:
            pixels = pixels.pin_memory()
        with runtime.autocast(device, encoder.spec.precision):
            embedding = encoder(pixels.to(device, non_blocking=pin)).float()
        bad = ~torch.isfinite(embedding).all(dim=1)
        if bad.any():
            first = start + int(torch.nonzero(bad)[0])
            raise EncoderError(f"{label}: non-finite embedding for tile {first} with encoder {encoder.spec.name!r} ({encoder.spec.precision})")
        out[start : start + len(batch)] = embedding.cpu().numpy()
        if (start // batch_size) % 20 == 0:
            log.info("%s: embedded %d/%d tiles", label, start + len(batch), tiles.shape[0])
    return out
