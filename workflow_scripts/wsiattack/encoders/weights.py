"""Encoder weights: local checkpoints and Hugging Face Hub downloads, checked against the architecture.

Only tensors are ever deserialised: ``.safetensors`` files, or ``.bin/.pth/.pt`` state dicts through
``torch.load(weights_only=True)``; a checkpoint holding arbitrary pickled objects is refused.
The hub token comes from ``HF_TOKEN`` and goes to huggingface_hub only: it is never logged, never
put in a message, and never written into a store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors.torch import load_file
from torch import nn

from wsiattack.encoders.preflight import access_message, hub_token
from wsiattack.encoders.registry import HUB_URL, EncoderSpec
from wsiattack.errors import EncoderError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
StateDict = dict[str, torch.Tensor]


def _set_path_hint(spec: EncoderSpec) -> str:
    return f"set a local checkpoint path (config encoder_weights: {{{spec.name}: /path/to/weights}})"


def resolve_checkpoint(path: str | Path, *, spec: EncoderSpec) -> Path:
    """The weights file of a local checkpoint: the file itself, or the known file in a folder."""
    path = Path(path)
    if path.is_dir():
        names = dict.fromkeys((*spec.hub_files, "model.safetensors", "pytorch_model.bin"))
        for name in names:
            if (path / name).is_file():
                return path / name
        raise EncoderError(
            f"encoder {spec.name!r}: checkpoint folder {path} holds none of {', '.join(names)}; point encoder_weights.{spec.name} at the weights file"
        )
    if not path.is_file():
        raise EncoderError(
            f"encoder {spec.name!r}: checkpoint {path} does not exist; fix encoder_weights.{spec.name} or remove it to use the published weights"
        )
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise EncoderError(
            f"encoder {spec.name!r}: checkpoint {path} is not a {'/'.join(CHECKPOINT_SUFFIXES)} file; save the state dict with safetensors (preferred) or torch.save"
        )
    return path


def read_state_dict(path: Path, *, encoder: str) -> StateDict:
    """Tensors of a checkpoint file, on the CPU (torch files memory-mapped when possible)."""
    try:
        state = load_file(path, device="cpu") if path.suffix == ".safetensors" else _torch_load(path)
    except pickle.UnpicklingError as error:
        first = str(error).splitlines()[0][:200]
        raise EncoderError(
            f"encoder {encoder!r}: {path} is not a plain state dict of tensors and arbitrary pickles are not loaded "
            f"({first}); re-save it with safetensors or torch.save(model.state_dict())"
        ) from None
    except Exception as error:  # truncated file, foreign format, ...
        raise EncoderError(
            f"encoder {encoder!r}: cannot read checkpoint {path} ({type(error).__name__}: {str(error)[:200]}); check that the file is complete"
        ) from error
    return _unwrap(state, path=path, encoder=encoder)


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:  # legacy (non-zip) files cannot be memory-mapped
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(state: object, *, path: Path, encoder: str) -> StateDict:
    """Accept ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and DataParallel's ``module.``."""
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(
            f"encoder {encoder!r}: {path} does not hold a state dict of tensors; save model.state_dict()"
        )
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def match_state_dict(model: nn.Module, state: StateDict, *, spec: EncoderSpec, source: str) -> StateDict:
    """``state`` restricted to ``model``'s keys; one clear error if names or shapes differ."""
    expected = model.state_dict()
    dropped = spec.ignore_checkpoint_prefixes  # parts of the published model the architecture cuts off
    state = {k: v for k, v in state.items() if k in expected or not (dropped and k.startswith(dropped))}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise EncoderError(
            f"encoder {spec.name!r}: checkpoint {source} does not match the architecture {spec.architecture}: "
            + _mismatch(missing, unexpected, wrong, state, expected)
            + f"; use the weights published for this encoder ({_published(spec)}) or {_set_path_hint(spec)} to matching weights"
        )
    return state


def _mismatch(
    missing: list[str], unexpected: list[str], wrong: list[str], state: StateDict, expected: StateDict
) -> str:
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} shape mismatch(es) (e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        )
    if missing:
        parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})")
    return ", ".join(parts)


def _published(spec: EncoderSpec) -> str:
    return f"{HUB_URL}/{spec.hub_repo}" if spec.hub_repo else spec.source or spec.architecture


def fetch_hub_weights(spec: EncoderSpec) -> Path:
    """Path of the spec's weights file in the local hub cache, downloading it if needed."""
    token = hub_token()
    log.info("%s: weights from %s/%s (HF_TOKEN %s)", spec.name, HUB_URL, spec.hub_repo, "set" if token else "not set")
    for filename in spec.hub_files:
        path = _download(spec, filename, token=token)
        if path is not None:
            return path
    raise EncoderError(
        f"encoder {spec.name!r}: none of {', '.join(spec.hub_files)} is in {HUB_URL}/{spec.hub_repo}; {_set_path_hint(spec)}"
    )


def _download(spec: EncoderSpec, filename: str, *, token: str | None) -> Path | None:
    """One file from the hub (cache first, so a cached gated model needs no token); None if absent."""
    try:
        return Path(hf_hub_download(spec.hub_repo, filename, token=token, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    where = f"{spec.hub_repo}/{filename}"
    try:
        return Path(hf_hub_download(spec.hub_repo, filename, token=token))
    except GatedRepoError:
        raise EncoderError(access_message(spec)) from None
    except RepositoryNotFoundError:  # what the hub answers for a gated repo without a token, too
        if spec.gated:
            raise EncoderError(access_message(spec)) from None
        raise EncoderError(
            f"encoder {spec.name!r}: no repository {HUB_URL}/{spec.hub_repo}; {_set_path_hint(spec)}"
        ) from None
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        raise EncoderError(
            f"encoder {spec.name!r}: cannot reach the Hugging Face Hub to download {where} and it is not in the local cache; connect to the network or {_set_path_hint(spec)}"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise EncoderError(
            f"encoder {spec.name!r}: downloading {where} failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); retry or {_set_path_hint(spec)}"
        ) from error


def cached_state_dict_sha256(module: nn.Module, *, path: Path, spec: EncoderSpec) -> str:
    """``state_dict_sha256`` of weights loaded from ``path``, remembered per (file, size, mtime).

    Hashing a 1-5 GB checkpoint costs every job seconds of CPU; the digest is a function of the
    file's bytes and of how the spec loads them, so it is kept in a small file named by the hash
    of (spec, resolved path, size, mtime_ns) under ``$WSIATTACK_CACHE_DIR`` (default
    ``$XDG_CACHE_HOME/wsiattack`` or ``~/.cache/wsiattack``). A replaced or touched file misses
    the cache; an unwritable cache directory only costs the hash.
    """
    stat = path.stat()
    identity = json.dumps(
        [spec.name, spec.architecture, spec.loader, str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    )
    entry = _cache_dir() / "weights-sha256" / hashlib.sha256(identity.encode()).hexdigest()
    try:
        cached = entry.read_text().strip()
        if len(cached) == 64:
            return cached
    except OSError:
        pass
    digest = state_dict_sha256(module)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        tmp.replace(entry)  # atomic: a concurrent job reads the old entry or the whole new one
    except OSError as error:
        log.warning("weights hash cache %s not writable (%s): the digest is recomputed next time", entry.parent, error)
    return digest


def _cache_dir() -> Path:
    if os.environ.get("WSIATTACK_CACHE_DIR"):
        return Path(os.environ["WSIATTACK_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsiattack"


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over the sorted (name, raw bytes) of a module's state dict: the weights' identity."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())  # raw bytes, whatever the dtype (bfloat16 too)
    return digest.hexdigest()
