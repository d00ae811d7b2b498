"""Preflight: can an encoder's weights possibly be had (local checkpoint, bundled file, hub cache,
or a token for a gated repository)? Fails fast, before any tile is read. Torch-free."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsiattack.encoders import registry
from wsiattack.encoders.custom import resolve_spec
from wsiattack.encoders.registry import HUB_URL, LOADER_REQUIREMENTS, EncoderSpec
from wsiattack.errors import EncoderError


def hub_token() -> str | None:
    """The Hugging Face token from ``HF_TOKEN`` (never logged, never written anywhere)."""
    token = os.environ.get("HF_TOKEN", "").strip()
    return token or None


def access_message(spec: EncoderSpec) -> str:
    """What to do when gated hub weights cannot be fetched."""
    return (
        f"encoder {spec.name!r}: its weights are gated on the Hugging Face Hub: accept the model's terms at "
        f"{HUB_URL}/{spec.hub_repo} and set HF_TOKEN to an access token of that account, or set a local "
        f"checkpoint path (config encoder_weights: {{{spec.name}: /path/to/weights}})"
    )


def missing_requirement(spec: EncoderSpec) -> str | None:
    """The install instruction if the spec's loader package is missing (checked without importing)."""
    if spec.loader == "factory":
        module = spec.architecture.split(":")[0]
        if not _module_available(module):
            return f"custom encoder {spec.name!r}: cannot find module {module!r} of factory {spec.architecture!r}; install it or add it to PYTHONPATH"
        return None
    requirement = LOADER_REQUIREMENTS.get(spec.loader)
    if requirement and not _module_available(requirement[0]):
        package = requirement[0].split(".")[0]
        return f"encoder {spec.name!r} needs the package {package!r} (module {requirement[0]}), which is not installed: {requirement[1]}"
    return None


def preflight(name: str, *, checkpoint: str | None, custom: EncoderSpec | Mapping[str, Any] | None = None) -> None:
    """Raise EncoderError now if the encoder's weights cannot possibly be available.

    Checks, without torch and without the network: the loader package is installed, a local
    checkpoint or bundled weights file exists, and a gated hub model has HF_TOKEN (or is already
    in the local hub cache).
    """
    spec = resolve_spec(name, custom=custom)
    problem = missing_requirement(spec)
    if problem:
        raise EncoderError(problem)
    if checkpoint is None and spec.weights == "bundled":
        bundled_weights(spec)
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise EncoderError(
                f"encoder {name!r}: checkpoint {checkpoint} does not exist; fix the path "
                f"(config encoder_weights.{name}) or remove it to use the encoder's published weights"
            )
        return
    if spec.weights == "hub" and spec.gated and hub_token() is None and not hub_cached(spec):
        raise EncoderError(access_message(spec))


def bundled_weights(spec: EncoderSpec) -> Path:
    """The packaged weights file of a ``bundled`` encoder; one clear error if it is missing."""
    path = registry.BUNDLED_DIR / str(spec.bundled_file)  # looked up at call time: tests point it elsewhere
    if not path.is_file():
        raise EncoderError(
            f"encoder {spec.name!r}: its bundled weights {path} are missing; reinstall wsiattack (the file is "
            f"package data) or rebuild it with: python -m wsiattack.encoders.demo_training --out {path}"
        )
    return path


def hub_cached(spec: EncoderSpec) -> bool:
    """True if one of the spec's weight files is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(spec.hub_repo, f), str) for f in spec.hub_files)


def _module_available(dotted: str) -> bool:
    """Whether ``dotted`` can be imported, looked up on disk without importing the package.

    (``trident`` on PyPI is an unrelated package, so the submodule path is what counts.)
    """
    if dotted in sys.modules:
        return True
    top, *rest = dotted.split(".")
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if found is None:
        return False
    locations = [Path(p) for p in (found.submodule_search_locations or [])]
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        candidates = [loc / part for loc in locations]
        if last and any(c.with_suffix(".py").is_file() or (c / "__init__.py").is_file() for c in candidates):
            return True
        locations = [c for c in candidates if c.is_dir()]
        if not locations:
            return False
    return not rest
