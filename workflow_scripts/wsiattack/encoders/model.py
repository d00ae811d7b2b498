"""The encoder wrapper: [0, 1] RGB pixels in, one embedding per tile out.

The wrapper owns resizing and normalisation, so the attack stage differentiates through exactly
the function that extraction uses, and attacks live in [0, 1] pixel space where clipping and
the uint8 rounding of the stored result are well defined. Parameters are float32 (gradients are
taken in float32); extraction autocasts to the spec's safe dtype on CUDA only.

Weights, in order of precedence: a local checkpoint, the seeded demo weights, a file bundled
with the package (the trained demo encoder) or a custom factory's own, the Hugging Face Hub
(see ``wsiattack.encoders.weights``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from torch import nn

from wsiattack.encoders import preflight, weights
from wsiattack.encoders.custom import resolve_spec
from wsiattack.encoders.registry import HUB_URL, EncoderSpec, get_spec  # noqa: F401  (re-exported)
from wsiattack.encoders.weights import state_dict_sha256
from wsiattack.errors import EncoderError

log = logging.getLogger(__name__)


class TileEncoder(nn.Module):
    """``forward(pixels)``: float (B, 3, H, W) in [0, 1] -> float (B, D) embedding."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, *, weights_id: str, weights_source: str = "seeded"):
        super().__init__()
        self.spec = spec
        self.weights_id = weights_id
        self.weights_source = weights_source
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = resize_to_input(pixels, self.spec)
        return readout(self.backbone, (pixels - self.mean) / self.std, self.spec.readout)

    def describe(self) -> dict[str, object]:
        """Identity recorded in every features store (never holds a token)."""
        s = self.spec
        return {
            "encoder": s.name,
            "architecture": s.architecture,
            "loader": s.loader,
            "weights_id": self.weights_id,
            "weights_source": self.weights_source,
            "build_kwargs": dict(s.build_kwargs),
            "input_px": s.input_px,
            "resize_px": s.resize_px,
            "interpolation": s.interpolation,
            "mean": list(s.mean),
            "std": list(s.std),
            "readout": s.readout,
            "embed_dim": s.embed_dim,
            "precision": s.precision,
        }


def resize_to_input(pixels: torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """Resize to ``resize_px`` (or ``input_px``) and centre-crop ``input_px``, like the model's transform."""
    size = spec.resize_px or spec.input_px
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode=spec.interpolation, align_corners=False, antialias=True)
    if size != spec.input_px:
        top = int(round((size - spec.input_px) / 2))
        pixels = pixels[..., top : top + spec.input_px, top : top + spec.input_px]
    return pixels


def warn_on_rescaled_tiles(spec: EncoderSpec, *, tile_px: int, label: str) -> bool:
    """Warn when the encoder will rescale the tiles (e.g. CONCH v1.5's 448 px input from 224 px
    tiles): the model then sees another magnification than it was trained at, silently. The
    remedy is tiling.tile_px (at the same target_mpp) equal to the encoder's input size."""
    size = spec.resize_px or spec.input_px
    if tile_px == size:
        return False
    log.warning(
        "%s: encoder %r takes %d px input but the tiles are %d px: they are resized by %.2fx, so the model sees "
        "them at %.2fx the tiling's magnification; set tiling.tile_px to %d (keeping target_mpp) to feed it native pixels",
        label,
        spec.name,
        size,
        tile_px,
        size / tile_px,
        size / tile_px,
        size,
    )
    return True


def readout(backbone: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The embedding of normalised input ``x``: CLS, CLS ++ mean of patch tokens, pooled, or output."""
    if kind == "output":  # forward() already returns (B, D)
        return backbone(x)
    tokens = backbone.forward_features(x)
    if kind == "pooled":  # the model's own pooling (global average for CNNs)
        return backbone.forward_head(tokens, pre_logits=True)
    cls = tokens[:, 0]
    if kind == "cls":
        return cls
    n_prefix = getattr(backbone, "num_prefix_tokens", 1)  # CLS + register tokens are not patches
    return torch.cat([cls, tokens[:, n_prefix:].mean(dim=1)], dim=-1)  # "cls+mean" (Virchow2)


class HFTokens(nn.Module):
    """A transformers vision model seen as a token backbone (``forward_features`` -> (B, T, D))."""

    num_prefix_tokens = 1

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf_model(pixel_values=x).last_hidden_state


# --- architectures -------------------------------------------------------------------------------

_TIMM_LAYERS = {"swiglu_packed": SwiGLUPacked}


def build_architecture(spec: EncoderSpec, *, device: torch.device | str = "cpu") -> nn.Module:
    """The spec's network with fresh weights on ``device`` (``"meta"``: shapes only, no memory)."""
    problem = preflight.missing_requirement(spec)
    if problem:
        raise EncoderError(problem)
    with torch.device(device):
        return _BUILDERS[spec.loader](spec)


def _timm_architecture(spec: EncoderSpec) -> nn.Module:
    kwargs = {k: _TIMM_LAYERS.get(v, v) if k == "mlp_layer" else v for k, v in spec.build_kwargs.items()}
    model = timm.create_model(spec.architecture, pretrained=False, **kwargs)
    for name in spec.drop_modules:  # e.g. ResNet50 truncated after layer 3
        setattr(model, name, nn.Identity())
    return model


def _transformers_architecture(spec: EncoderSpec) -> nn.Module:
    import transformers

    model_class = getattr(transformers, spec.architecture)
    return HFTokens(model_class(model_class.config_class(**spec.build_kwargs)))


def _trident_architecture(spec: EncoderSpec) -> nn.Module:
    from trident.patch_encoder_models.model_zoo.conchv1_5.conchv1_5 import CONCHVisionTower

    return CONCHVisionTower()


def _factory_architecture(spec: EncoderSpec) -> nn.Module:
    module_name, function_name = spec.architecture.split(":")
    where = f"custom encoder {spec.name!r}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EncoderError(
            f"{where}: cannot import {module_name!r} ({error}); install it or add it to PYTHONPATH"
        ) from error
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise EncoderError(f"{where}: module {module_name!r} has no function {function_name!r}")
    model = factory(**spec.build_kwargs)
    if not isinstance(model, nn.Module):
        raise EncoderError(
            f"{where}: {spec.architecture}(**kwargs) returned {type(model).__name__}, not a torch.nn.Module"
        )
    _check_readout_support(spec, model)
    return model


def _check_readout_support(spec: EncoderSpec, model: nn.Module) -> None:
    needs = {
        "cls": ("forward_features",),
        "cls+mean": ("forward_features",),
        "pooled": ("forward_features", "forward_head"),
    }
    lacking = [m for m in needs.get(spec.readout, ()) if not callable(getattr(model, m, None))]
    if lacking:
        raise EncoderError(
            f"custom encoder {spec.name!r}: readout {spec.readout!r} needs the module to have {lacking[0]}() (timm style); use readout 'output' if forward(x) already returns (B, D)"
        )


_BUILDERS = {
    "timm": _timm_architecture,
    "transformers": _transformers_architecture,
    "trident": _trident_architecture,
    "factory": _factory_architecture,
}


# --- weights -------------------------------------------------------------------------------------


def build_encoder(
    name: str, *, checkpoint: str | None = None, custom: EncoderSpec | Mapping[str, Any] | None = None
) -> TileEncoder:
    """Build an encoder on the CPU in eval mode with frozen float32 parameters.

    ``checkpoint``: local weights (a .safetensors/.bin/.pth file or a folder holding one), used
    instead of the hub. ``custom``: a custom spec (``encoders.custom.custom_spec``) or its mapping.
    """
    spec = resolve_spec(name, custom=custom)
    preflight.preflight(name, checkpoint=checkpoint, custom=spec)
    backbone, source, path = _backbone_with_weights(spec, checkpoint)
    backbone = backbone.float()  # gradients in float32; autocast lowers precision for extraction only
    module = _weights_module(backbone)
    full = state_dict_sha256(module) if path is None else weights.cached_state_dict_sha256(module, path=path, spec=spec)
    digest = full[:16]
    seeded = spec.weights == "seeded" and checkpoint is None
    weights_id = f"seeded:{spec.seed}:sha256:{digest}" if seeded else f"sha256:{digest}"
    log.info("encoder %s: %s, weights %s from %s", name, spec.architecture, weights_id, source)
    encoder = TileEncoder(spec, backbone, weights_id=weights_id, weights_source=source)
    return encoder.eval().requires_grad_(False)


def _backbone_with_weights(spec: EncoderSpec, checkpoint: str | None) -> tuple[nn.Module, str, Path | None]:
    """The backbone with its weights, where they came from, and the file they were read from (if any)."""
    if checkpoint is not None:
        path = weights.resolve_checkpoint(checkpoint, spec=spec)
        source = f"local:{path}"
    elif spec.weights == "seeded":
        return _seeded_architecture(spec), "seeded", None
    elif spec.weights == "bundled":
        path = preflight.bundled_weights(spec)
        source = f"bundled:{path.name}"
    elif spec.weights == "factory":
        return build_architecture(spec), f"factory:{spec.architecture}", None
    else:
        path = weights.fetch_hub_weights(spec)
        source = f"hf-hub:{spec.hub_repo}"
    if spec.loader == "trident":
        return _trident_pretrained(spec, path, source=source), source, path
    return _load_weights(spec, weights.read_state_dict(path, encoder=spec.name), source=source), source, path


def _seeded_architecture(spec: EncoderSpec) -> nn.Module:
    """The architecture with seeded random weights that are the same on every machine.

    torch's initialisers are not: their vectorised kernels (e.g. erfinv in trunc_normal_) differ
    in the last bits between CPU capabilities (AVX2 / AVX-512) and thread counts. So each
    tensor keeps only the scale of its torch initialisation (mean and std, rounded to 6
    significant digits) and is redrawn from numpy's PCG64, which gives the same numbers
    everywhere; constant tensors (norm weights, biases) stay as initialised.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = build_architecture(spec)
    with torch.no_grad():
        for i, (_name, tensor) in enumerate(sorted(model.state_dict().items())):
            if not tensor.is_floating_point() or tensor.numel() < 2:
                continue
            values = tensor.double()
            std = float(f"{values.std().item():.6g}")
            if std == 0:
                continue
            mean = float(f"{values.mean().item():.6g}")
            draw = np.random.default_rng([spec.seed, i]).standard_normal(tensor.numel())
            tensor.copy_(torch.from_numpy(mean + std * draw).reshape(tensor.shape))
    return model


def _load_weights(spec: EncoderSpec, state: weights.StateDict, *, source: str) -> nn.Module:
    """Build on the meta device and adopt the checkpoint tensors (no second copy, no random init).

    Custom factories are built for real: they may do work of their own.
    """
    on_meta = spec.loader != "factory"
    backbone = build_architecture(spec, device="meta" if on_meta else "cpu")
    state = weights.match_state_dict(_weights_module(backbone), state, spec=spec, source=source)
    _weights_module(backbone).load_state_dict(state, strict=True, assign=on_meta)
    if on_meta and any(t.is_meta for t in chain(backbone.parameters(), backbone.buffers())):
        backbone = build_architecture(spec)  # non-persistent buffers need a real build
        _weights_module(backbone).load_state_dict(state, strict=True)
    return backbone


def _trident_pretrained(spec: EncoderSpec, path: Path, *, source: str) -> nn.Module:
    """CONCH v1.5 through its maintainers' loader (it also resizes the position embedding)."""
    from trident.patch_encoder_models.model_zoo.conchv1_5.conchv1_5 import create_model_from_pretrained

    try:
        model, _ = create_model_from_pretrained(checkpoint_path=str(path), img_size=spec.input_px)
    except (RuntimeError, KeyError, ValueError) as error:
        raise EncoderError(
            f"encoder {spec.name!r}: checkpoint {source} does not load into {spec.architecture} ({str(error)[:200]}); use {HUB_URL}/{spec.hub_repo}'s pytorch_model_vision.bin"
        ) from error
    return model


def _weights_module(backbone: nn.Module) -> nn.Module:
    """The module whose state dict is the published checkpoint (adapters add no weights)."""
    return backbone.hf_model if isinstance(backbone, HFTokens) else backbone
