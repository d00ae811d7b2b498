"""The extraction loop: uint8 tiles (zarr, numpy or a ``TileReader``) in, checked float32
embeddings out, with background reads, pinned-memory transfers and autocast on CUDA."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from wsiattack import runtime
from wsiattack.encoders.model import TileEncoder, warn_on_rescaled_tiles
from wsiattack.errors import EncoderError

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 15.0


def channels_first(tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) as stored -> uint8 (B, 3, H, W) as torch models take it."""
    return torch.as_tensor(tiles).permute(0, 3, 1, 2)


def to_unit_pixels(tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1]."""
    return channels_first(tiles).float().div_(255.0)


def iter_batches(array, *, batch_size: int, prefetch: int = 2) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, uint8 batch) from a zarr (or numpy) array or a ``TileReader``, reading
    ahead in background threads.

    zarr decompression and slide decoding release the GIL, so reading the next batches overlaps
    the forward pass.
    """
    if hasattr(array, "iter_batches"):  # a TileReader decodes slide blocks on its own threads
        yield from array.iter_batches(batch_size=batch_size)
        return
    starts = range(0, array.shape[0], batch_size)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(array.__getitem__, slice(s, s + batch_size)) for s in starts[:prefetch]]
        for i, start in enumerate(starts):
            batch = pending.pop(0).result()
            if i + prefetch < len(starts):
                nxt = starts[i + prefetch]
                pending.append(pool.submit(array.__getitem__, slice(nxt, nxt + batch_size)))
            yield start, np.asarray(batch)


def _device_pixels(batch: np.ndarray, device: torch.device, *, channels_last: bool) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1] on ``device``.

    uint8 crosses the bus (4x fewer bytes than float) from pinned memory; the conversion runs
    on the device, in one pass into the memory layout the model wants (ViTs: plain NCHW, as
    in a forward pass on in-memory tensors; CNNs on CUDA: channels-last).
    """
    tiles = torch.from_numpy(batch)
    if device.type == "cuda":
        tiles = tiles.pin_memory().to(device, non_blocking=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    nchw = channels_first(tiles)
    pixels = torch.empty(nchw.shape, dtype=torch.float32, device=device, memory_format=layout)
    return pixels.copy_(nchw).div_(255.0)


@torch.inference_mode()
def embed_tiles(encoder: TileEncoder, tiles, *, batch_size: int, device: torch.device, label: str) -> np.ndarray:
    """Embed uint8 tiles (zarr or numpy, (N, T, T, 3)) -> float32 (N, D); checks every batch.

    ``label`` (the slide id) names the culprit when a batch has NaN/Inf embeddings.
    """
    encoder = encoder.to(device)
    channels_last = device.type == "cuda" and encoder.spec.channels_last  # CNNs gain on CUDA only
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    n_tiles = tiles.shape[0]
    warn_on_rescaled_tiles(encoder.spec, tile_px=int(tiles.shape[1]), label=label)
    out = np.empty((n_tiles, encoder.spec.embed_dim), dtype=np.float32)
    progress = _Progress(label=label, total=n_tiles)
    for start, batch in iter_batches(tiles, batch_size=batch_size):
        pixels = _device_pixels(batch, device, channels_last=channels_last)
        with runtime.autocast(device, encoder.spec.precision):
            embedding = encoder(pixels).float()
        _check_batch(embedding, encoder=encoder, start=start, label=label)
        out[start : start + len(batch)] = embedding.cpu().numpy()
        progress.update(start + len(batch))
    return out


def _check_batch(embedding: torch.Tensor, *, encoder: TileEncoder, start: int, label: str) -> None:
    spec = encoder.spec
    if embedding.shape[1:] != (spec.embed_dim,):
        raise EncoderError(
            f"{label}: encoder {spec.name!r} returned embeddings of shape {tuple(embedding.shape)} but its spec says embed_dim {spec.embed_dim}; fix embed_dim or the readout"
        )
    bad = ~torch.isfinite(embedding).all(dim=1)
    if bad.any():
        first = start + int(torch.nonzero(bad)[0])
        raise EncoderError(
            f"{label}: non-finite embedding for tile {first} with encoder {spec.name!r} ({spec.precision})"
        )


class _Progress:
    """Log lines "embedded n/N tiles (x tiles/s)" at most every PROGRESS_EVERY_S, and at the end."""

    def __init__(self, *, label: str, total: int):
        self.label, self.total = label, total
        self.started = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        log.info("%s: embedded %d/%d tiles (%.1f tiles/s)", self.label, done, self.total, rate)
