"""Device choice and precision for the torch rules."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from wsiattack.attacks.params import ATTACK_PRECISIONS
from wsiattack.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit device that is absent is an error. CUDA with
    several visible GPUs: the first GPU no other job of this machine holds (``claim_gpu``)."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "auto":
        requested = "cuda" if cuda else "mps" if mps else "cpu"
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        raise ConfigError(
            f"config: device: {requested!r} requested but not available on this machine; use 'auto' or 'cpu'"
        )
    return claim_gpu() if requested == "cuda" else torch.device(requested)


_HELD_GPU_LOCKS: list = []  # open lock files: held until the process ends (or is killed)


def claim_gpu(*, lock_dir: str | None = None) -> torch.device:
    """A GPU of its own for this job among the visible ones.

    Every job used ``cuda:0`` before, so ``--resources gpu=8`` on an 8-GPU workstation stacked
    eight jobs on one GPU. Each visible GPU has a lock file (in ``$WSIATTACK_GPU_LOCK_DIR``,
    default the temp dir); a job takes the first it can lock exclusively and keeps it for its
    lifetime: the kernel releases it when the process ends, even when killed. One visible GPU (a
    cluster job under ``CUDA_VISIBLE_DEVICES``, a workstation with one): ``cuda``, no lock. All
    held (more GPU jobs than GPUs): the GPU of index pid mod count, with a warning.
    """
    count = torch.cuda.device_count()
    if count <= 1:
        return torch.device("cuda")
    directory = Path(lock_dir or os.environ.get("WSIATTACK_GPU_LOCK_DIR") or tempfile.gettempdir())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "-")
    for index in range(count):
        handle = open(directory / f"wsiattack-uid{os.getuid()}-gpus{visible}-{index}.lock", "a")  # noqa: SIM115 (held open)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _HELD_GPU_LOCKS.append(handle)
        return torch.device("cuda", index)
    index = os.getpid() % count
    log.warning(
        "all %d visible GPUs are held by other jobs: sharing cuda:%d (give Snakemake --resources gpu=%d)",
        count,
        index,
        count,
    )
    return torch.device("cuda", index)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the encoder's safe dtype on CUDA only; CPU and MPS stay in float32.

    (UNI, for one, overflows in float16, so the dtype comes from the encoder spec.)
    """
    dtype = getattr(torch, precision)
    enabled = device.type == "cuda" and dtype != torch.float32
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


@contextlib.contextmanager
def attack_precision(device: torch.device, *, mode: str, encoder_precision: str) -> Iterator[None]:
    """The encoder's forward passes in an attack (``attacks.params.ATTACK_PRECISIONS``); the
    perturbation, its gradient and the objective stay float32 in every mode (callers evaluate
    the objective under ``exact_arithmetic``).

    ``float32``: exact, no autocast and no TF32 (cuDNN's convolutions, TF32 by default, too).
    ``tf32``: float32 tensors, TF32 matmuls and convolutions on CUDA (Ampere and later; ~10 bits
    of mantissa in the products). ``encoder``: autocast to the encoder's safe dtype, as clean
    extraction does for a half-precision encoder (a float32 CNN's extraction still lets cuDNN
    use TF32, which no mode but ``tf32`` does). Off CUDA all three are float32. float16 gradients
    are not loss-scaled: an fp16 encoder in ``encoder`` mode may lose the smallest ones.
    """
    if mode not in ATTACK_PRECISIONS:
        raise ConfigError(f"attack precision {mode!r}: use one of {', '.join(ATTACK_PRECISIONS)}")
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = [flag.allow_tf32 for flag in flags]
    for flag in flags:
        flag.allow_tf32 = mode == "tf32"
    try:
        if mode == "encoder":
            with autocast(device, encoder_precision):
                yield
        else:
            with torch.autocast(device_type=device.type, enabled=False):
                yield
    finally:
        for flag, value in zip(flags, saved, strict=True):
            flag.allow_tf32 = value


def exact_arithmetic(device: torch.device) -> contextlib.AbstractContextManager:
    """float32 without autocast or TF32, whatever context encloses it: for objectives and heads."""
    return attack_precision(device, mode="float32", encoder_precision="float32")


def exact_dtype(device: torch.device) -> torch.dtype:
    """The widest float a device has: float64, except on MPS (which has none, so float32). For
    small exact computations: rounding bookkeeping, a loss whose gradient underflows in float32."""
    return torch.float32 if device.type == "mps" else torch.float64
