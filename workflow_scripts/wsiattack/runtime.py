"""Device choice and precision for the torch rules."""

from __future__ import annotations

import contextlib

import torch

from wsiattack.errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit device that is absent is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        raise ConfigError(f"config: device: {requested!r} requested but not available on this machine; use 'auto' or 'cpu'")
    return torch.device(requested)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the encoder's safe dtype on CUDA only; CPU and MPS stay in float32.

    (UNI, for one, overflows in float16, so the dtype comes from the encoder spec.)
    """
    dtype = getattr(torch, precision)
    enabled = device.type == "cuda" and dtype != torch.float32
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)



def exact_dtype(device: torch.device) -> torch.dtype:
    """The widest float a device has: float64, except on MPS (which has none, so float32). For
    small exact computations: rounding bookkeeping, a loss whose gradient underflows in float32."""
    return torch.float32 if device.type == "mps" else torch.float64
