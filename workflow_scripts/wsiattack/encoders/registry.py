"""Named encoder specs. Torch-free so that config validation (at DAG build time) can use it.

Each entry says how to build the network, what it expects (input size, normalisation), how the
embedding is read from its output, and the precision it is safe in. The wrapper in
``wsiattack.encoders.model`` turns a spec into a module taking [0, 1] RGB pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from wsiattack.errors import EncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Readout = Literal["cls", "cls+mean", "pooled"]


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    timm_name: str  # timm architecture, or "hf-hub:<org>/<repo>" for hub weights
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    readout: Readout
    embed_dim: int
    precision: Literal["float32", "bfloat16", "float16"]  # safe autocast dtype on GPU
    weights: Literal["seeded", "hub", "local"]
    gated: bool = False
    seed: int = 0  # for weights == "seeded"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


ENCODERS: dict[str, EncoderSpec] = {
    # Demo encoder: ViT-Tiny/16 with seeded random weights, so the whole workflow runs offline.
    # Random ViT features still separate colour/texture (dense dark nuclei vs stroma), which is
    # enough for the synthetic cohort; it is not a model of real tissue.
    "demo": EncoderSpec(
        name="demo",
        timm_name="vit_tiny_patch16_224",
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        readout="cls",
        embed_dim=192,
        precision="float32",
        weights="seeded",
        seed=0,
        timm_kwargs={"num_classes": 0, "dynamic_img_size": False},
    ),
}


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise EncoderError(f"unknown encoder {name!r} (known: {', '.join(ENCODERS)})") from None
