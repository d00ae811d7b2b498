"""Named encoder specs. Torch-free so that config validation (at DAG build time) can use it.

Each entry says how to build the network (a timm architecture, a ``transformers`` model or
another package's loader), where its weights come from (Hugging Face Hub repository, gated or
not), what it expects (input size, normalisation), how the embedding is read from its output, and
the precision it is safe in on a GPU. The wrapper in ``wsiattack.encoders.model`` turns a spec
into a module taking [0, 1] RGB pixels.

The architecture facts of each entry are stated here, not read from the hub at run time, so that
an architecture can be built (and checked) offline and a local checkpoint needs no config file.
Each entry cites the model card or maintainers' code its facts come from.

``preflight`` fails fast, before any tile is read, when the weights cannot possibly be had.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wsiattack.errors import EncoderError
from wsiattack.names import is_valid_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bioptimus' own statistics (H-optimus-0/1 model cards, config.json "mean"/"std").
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

Readout = Literal["cls", "cls+mean", "pooled", "output"]
Precision = Literal["float32", "bfloat16", "float16"]
READOUTS: tuple[str, ...] = ("cls", "cls+mean", "pooled", "output")
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16")
HUB_URL = "https://huggingface.co"

# Loaders that need a package beyond timm: (module that must import, how to install it).
# transformers 5.x is the line that works with the huggingface_hub 2.x timm pulls in here.
LOADER_REQUIREMENTS: dict[str, tuple[str, str]] = {
    "transformers": ("transformers", "pip install transformers==5.23.0"),
    "trident": (
        "trident.patch_encoder_models.model_zoo.conchv1_5.conchv1_5",
        "pip install git+https://github.com/mahmoodlab/TRIDENT.git",
    ),
}


@dataclass(frozen=True)
class EncoderSpec:
    """How to build, feed and read one encoder (all fields plain, JSON-able values)."""

    name: str
    architecture: str  # timm model name, transformers class, or factory "module:function"
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    readout: Readout  # cls | cls+mean (CLS ++ mean of patch tokens) | pooled (model's head) | output
    embed_dim: int
    precision: Precision  # safe autocast dtype on GPU; gradients always stay float32
    weights: Literal["seeded", "bundled", "hub", "factory"]
    loader: Literal["timm", "transformers", "trident", "factory"] = "timm"
    build_kwargs: Mapping[str, Any] = field(default_factory=dict)
    hub_repo: str | None = None
    hub_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # tried in order
    gated: bool = False  # the hub repo needs accepted terms and a token
    seed: int = 0  # for weights == "seeded"
    bundled_file: str | None = None  # for weights == "bundled": a file in BUNDLED_DIR, installed with the package
    resize_px: int | None = None  # resize to this, then centre-crop input_px (the model's own transform)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    drop_modules: tuple[str, ...] = ()  # submodules replaced by Identity (ResNet50 truncated after layer 3)
    ignore_checkpoint_prefixes: tuple[str, ...] = ()  # checkpoint keys of the dropped parts
    channels_last: bool = False  # CNN: channels-last memory format pays off on CUDA
    source: str = ""  # model card / maintainers' code the facts come from


BUNDLED_DIR = Path(__file__).resolve().parent / "checkpoints"

_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}  # resolved to timm classes in model.py
_TRIDENT_LOAD = "github.com/mahmoodlab/TRIDENT trident/patch_encoder_models/load.py"

ENCODERS: dict[str, EncoderSpec] = {
    # Demo encoder: ViT-Tiny/16 with seeded random weights, so the whole workflow runs offline.
    # Random ViT features still separate colour/texture (dense dark nuclei vs stroma), which is
    # enough for the synthetic cohort; it is not a model of real tissue.
    "demo": EncoderSpec(
        name="demo",
        architecture="vit_tiny_patch16_224",
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        readout="cls",
        embed_dim=192,
        precision="float32",
        weights="seeded",
        seed=0,
        build_kwargs={"num_classes": 0, "dynamic_img_size": False},
    ),
    # Trained demo encoder: a 4-block ViT/16 (128-d) trained, supervised, on synthetic tiles of a
    # slide stream disjoint from the demo cohort's (background / normal / tumour, plus the tile's
    # tumour fraction); a stand-in for a model whose features separate tissue classes, about 4x
    # cheaper per tile than ViT-Ti/16. Rebuilt by wsiattack.encoders.demo_training.
    "demo_trained": EncoderSpec(
        name="demo_trained",
        architecture="vit_tiny_patch16_224",
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        readout="cls",
        embed_dim=128,
        precision="float32",
        weights="bundled",
        bundled_file="demo_trained.safetensors",
        build_kwargs={
            "patch_size": 16,
            "embed_dim": 128,
            "depth": 4,
            "num_heads": 4,
            "num_classes": 0,
            "dynamic_img_size": False,
        },
        source="python -m wsiattack.encoders.demo_training (synthetic tiles, wsiattack.synthetic)",
    ),
    # UNI: ViT-L/16, LayerScale init 1e-5 (needed for the ls*.gamma keys), 1024-d CLS.
    # https://huggingface.co/MahmoodLab/UNI (timm.create_model("hf-hub:MahmoodLab/uni",
    # init_values=1e-5, dynamic_img_size=True)); kwargs and ImageNet normalisation from
    # UNIInferenceEncoder in github.com/mahmoodlab/TRIDENT trident/patch_encoder_models/load.py.
    # bfloat16, not float16: UNI's activations are reported to overflow to NaN in float16.
    "uni": EncoderSpec(
        name="uni",
        architecture="vit_large_patch16_224",
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        readout="cls",
        embed_dim=1024,
        precision="bfloat16",
        weights="hub",
        hub_repo="MahmoodLab/UNI",
        hub_files=("pytorch_model.bin",),
        gated=True,
        build_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        source=f"{HUB_URL}/MahmoodLab/UNI; {_TRIDENT_LOAD} (UNIInferenceEncoder)",
    ),
    # UNI2-h: ViT-H/14-like giant (24 blocks, 1536-d, 24 heads), SwiGLU MLP (SwiGLUPacked + SiLU,
    # mlp_ratio 2.66667*2), 8 register tokens, no pos-embed for the prefix tokens; 1536-d CLS.
    # https://huggingface.co/MahmoodLab/UNI2-h (timm_kwargs on vit_giant_patch14_224); bfloat16
    # from UNIv2InferenceEncoder in github.com/mahmoodlab/TRIDENT trident/patch_encoder_models/load.py.
    "uni2_h": EncoderSpec(
        name="uni2_h",
        architecture="vit_giant_patch14_224",
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        readout="cls",
        embed_dim=1536,
        precision="bfloat16",
        weights="hub",
        hub_repo="MahmoodLab/UNI2-h",
        hub_files=("pytorch_model.bin",),
        gated=True,
        build_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        source=f"{HUB_URL}/MahmoodLab/UNI2-h; {_TRIDENT_LOAD} (UNIv2InferenceEncoder)",
    ),
    # Virchow2: ViT-H/14 (1280-d), SwiGLUPacked + SiLU, 4 register tokens; the tile embedding is
    # the class token concatenated with the mean of the patch tokens (output[:, 5:], registers
    # excluded) -> 2560-d; the card recommends float16 autocast. https://huggingface.co/paige-ai/Virchow2;
    # timm kwargs (mlp_ratio 5.3375, init_values 1e-5, global_pool "") from Virchow2InferenceEncoder
    # in github.com/mahmoodlab/TRIDENT trident/patch_encoder_models/load.py.
    "virchow2": EncoderSpec(
        name="virchow2",
        architecture="vit_huge_patch14_224",
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        readout="cls+mean",
        embed_dim=2560,
        precision="float16",
        weights="hub",
        hub_repo="paige-ai/Virchow2",
        gated=True,
        interpolation="bicubic",
        build_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        source=f"{HUB_URL}/paige-ai/Virchow2; {_TRIDENT_LOAD} (Virchow2InferenceEncoder)",
    ),
    # Prov-GigaPath tile encoder: ViT-g built on timm's vit_giant_patch14_dinov2 (SwiGLUPacked + SiLU
    # by default) but with 16 px patches; model_args of the hub config.json (img_size 224,
    # patch_size 16, embed_dim 1536, depth 40, num_heads 24, init_values 1e-5, mlp_ratio 5.33334);
    # 1536-d CLS (global_pool "token"). Transform Resize(256, bicubic) + CenterCrop(224) + ImageNet:
    # github.com/prov-gigapath/prov-gigapath demo/3_load_tile_encoder.py; float16 from
    # GigaPathInferenceEncoder in github.com/mahmoodlab/TRIDENT trident/patch_encoder_models/load.py.
    "prov_gigapath": EncoderSpec(
        name="prov_gigapath",
        architecture="vit_giant_patch14_dinov2",
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        readout="cls",
        embed_dim=1536,
        precision="float16",
        weights="hub",
        hub_repo="prov-gigapath/prov-gigapath",
        hub_files=("pytorch_model.bin",),
        gated=True,
        resize_px=256,
        interpolation="bicubic",
        build_kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        source=f"{HUB_URL}/prov-gigapath/prov-gigapath; github.com/prov-gigapath/prov-gigapath demo/3_load_tile_encoder.py",
    ),
    # H-optimus-0: ViT-g/14 with 4 registers (timm vit_giant_patch14_reg4_dinov2, SwiGLU), 224 px,
    # Bioptimus mean/std, 1536-d CLS (config.json global_pool "token"); float16 autocast as the card
    # recommends. https://huggingface.co/bioptimus/H-optimus-0 (README, config.json). Gated (🔒 in
    # the licence column of github.com/mahmoodlab/TRIDENT README.md).
    "h_optimus_0": EncoderSpec(
        name="h_optimus_0",
        architecture="vit_giant_patch14_reg4_dinov2",
        input_px=224,
        mean=BIOPTIMUS_MEAN,
        std=BIOPTIMUS_STD,
        readout="cls",
        embed_dim=1536,
        precision="float16",
        weights="hub",
        hub_repo="bioptimus/H-optimus-0",
        hub_files=("pytorch_model.bin",),
        gated=True,
        build_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "dynamic_img_size": False,
            "num_classes": 0,
            "global_pool": "token",
        },
        source=f"{HUB_URL}/bioptimus/H-optimus-0; {_TRIDENT_LOAD} (HOptimus0InferenceEncoder)",
    ),
    # H-optimus-1: same architecture and normalisation as H-optimus-0, new weights.
    # https://huggingface.co/bioptimus/H-optimus-1; HOptimus1InferenceEncoder in
    # github.com/mahmoodlab/TRIDENT trident/patch_encoder_models/load.py (float16).
    "h_optimus_1": EncoderSpec(
        name="h_optimus_1",
        architecture="vit_giant_patch14_reg4_dinov2",
        input_px=224,
        mean=BIOPTIMUS_MEAN,
        std=BIOPTIMUS_STD,
        readout="cls",
        embed_dim=1536,
        precision="float16",
        weights="hub",
        hub_repo="bioptimus/H-optimus-1",
        gated=True,
        build_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "dynamic_img_size": False,
            "num_classes": 0,
            "global_pool": "token",
        },
        source=f"{HUB_URL}/bioptimus/H-optimus-1; {_TRIDENT_LOAD} (HOptimus1InferenceEncoder)",
    ),
    # Phikon-v2: a transformers Dinov2Model, ViT-L/16 (1024-d, 24 layers, 16 heads), no registers,
    # 224 px, ImageNet normalisation; embedding = last_hidden_state[:, 0] (1024-d); not gated.
    # https://huggingface.co/owkin/phikon-v2 (AutoModel, last_hidden_state[:, 0, :]); arXiv 2409.09173
    # (ViT-L/16, DINOv2); float32 from Phikonv2InferenceEncoder in github.com/mahmoodlab/TRIDENT
    # trident/patch_encoder_models/load.py.
    "phikon_v2": EncoderSpec(
        name="phikon_v2",
        architecture="Dinov2Model",
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        readout="cls",
        embed_dim=1024,
        precision="float32",
        weights="hub",
        loader="transformers",
        hub_repo="owkin/phikon-v2",
        hub_files=("model.safetensors",),
        build_kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 16,
            "image_size": 224,
            "mlp_ratio": 4,
            "layerscale_value": 1e-5,
            "layer_norm_eps": 1e-6,
        },
        source=f"{HUB_URL}/owkin/phikon-v2; {_TRIDENT_LOAD} (Phikonv2InferenceEncoder)",
    ),
    # CONCH v1.5: ViT-L/16 trunk at 448 px with an attentional pooler and LayerNorm -> 768-d; its
    # loader lives in TRIDENT (model_zoo/conchv1_5/conchv1_5.py, create_model_from_pretrained,
    # weights pytorch_model_vision.bin, ImageNet normalisation, 448 px); float16 from
    # Conchv15InferenceEncoder in github.com/mahmoodlab/TRIDENT trident/patch_encoder_models/load.py.
    # https://huggingface.co/MahmoodLab/conchv1_5
    "conch_v1_5": EncoderSpec(
        name="conch_v1_5",
        architecture="trident CONCHVisionTower",
        input_px=448,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        readout="output",
        embed_dim=768,
        precision="float16",
        weights="hub",
        loader="trident",
        hub_repo="MahmoodLab/conchv1_5",
        hub_files=("pytorch_model_vision.bin",),
        gated=True,
        source=f"{HUB_URL}/MahmoodLab/conchv1_5; {_TRIDENT_LOAD} (Conchv15InferenceEncoder)",
    ),
    # ResNet50-trunc (CLAM): ImageNet ResNet50 (torchvision weights, timm resnet50.tv_in1k) cut after
    # layer 3, global average pooling -> 1024-d. github.com/mahmoodlab/CLAM models/timm_wrapper.py
    # (TimmCNNEncoder: features_only, out_indices (3,), AdaptiveAvgPool2d(1)), float32 and
    # ImageNet normalisation from ResNet50InferenceEncoder in github.com/mahmoodlab/TRIDENT
    # trident/patch_encoder_models/load.py.
    "resnet50_trunc": EncoderSpec(
        name="resnet50_trunc",
        architecture="resnet50",
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        readout="pooled",
        embed_dim=1024,
        precision="float32",
        weights="hub",
        hub_repo="timm/resnet50.tv_in1k",
        build_kwargs={"num_classes": 0},
        drop_modules=("layer4",),
        ignore_checkpoint_prefixes=("layer4.", "fc."),
        channels_last=True,
        source=f"github.com/mahmoodlab/CLAM models/timm_wrapper.py; {HUB_URL}/timm/resnet50.tv_in1k",
    ),
}


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise EncoderError(f"unknown encoder {name!r} (known: {', '.join(ENCODERS)})") from None


def resolve_spec(name: str, *, custom: EncoderSpec | Mapping[str, Any] | None = None) -> EncoderSpec:
    """The registry entry ``name``, or the custom spec given for it (a spec or its mapping)."""
    if custom is None:
        return get_spec(name)
    spec = custom if isinstance(custom, EncoderSpec) else custom_spec(name, custom)
    if spec.name != name:
        raise EncoderError(f"custom encoder {name!r}: the spec given is named {spec.name!r}")
    return spec


# --- custom encoders: a user's own torch.nn.Module factory ---------------------------------------

CUSTOM_KEYS = ("factory", "input_px", "mean", "std", "embed_dim", "readout", "precision", "kwargs")
CUSTOM_REQUIRED = ("factory", "input_px", "embed_dim", "readout")
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def custom_spec(name: str, mapping: Mapping[str, Any]) -> EncoderSpec:
    """Validate a custom encoder entry (``{"factory": "pkg.mod:build", ...}``) into a spec.

    ``kwargs`` go to the factory; mean/std default to ImageNet's; precision to float32.
    """
    where = f"custom encoder {name!r}"
    _check_custom_keys(where, name, mapping)
    return EncoderSpec(
        name=name,
        architecture=_factory_path(where, mapping["factory"]),
        input_px=_positive_int(where, "input_px", mapping["input_px"]),
        mean=_triple(where, "mean", mapping.get("mean", IMAGENET_MEAN), positive=False),
        std=_triple(where, "std", mapping.get("std", IMAGENET_STD), positive=True),
        readout=_choice(where, "readout", mapping["readout"], READOUTS),
        embed_dim=_positive_int(where, "embed_dim", mapping["embed_dim"]),
        precision=_choice(where, "precision", mapping.get("precision", "float32"), PRECISIONS),
        weights="factory",
        loader="factory",
        build_kwargs=_json_kwargs(where, mapping.get("kwargs", {})),
        source=f"factory {mapping['factory']}",
    )


def _check_custom_keys(where: str, name: str, mapping: Mapping[str, Any]) -> None:
    if not is_valid_name(name):
        raise EncoderError(f"{where}: names are letters, digits, '_', '.', '-' (used in output paths)")
    if name in ENCODERS:
        raise EncoderError(f"{where}: the name is taken by a registry encoder; choose another name")
    if not isinstance(mapping, Mapping):
        raise EncoderError(f"{where}: expected a mapping of {', '.join(CUSTOM_KEYS)}")
    unknown = sorted(set(mapping) - set(CUSTOM_KEYS))
    if unknown:
        raise EncoderError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(CUSTOM_KEYS)})")
    missing = [key for key in CUSTOM_REQUIRED if key not in mapping]
    if missing:
        raise EncoderError(f"{where}: missing key {missing[0]!r} (required: {', '.join(CUSTOM_REQUIRED)})")


def _factory_path(where: str, value: Any) -> str:
    if not isinstance(value, str) or not _FACTORY.match(value):
        raise EncoderError(f"{where}: factory: {value!r} is not of the form 'package.module:function'")
    return value


def _positive_int(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise EncoderError(f"{where}: {key}: {value!r} is not a positive integer")
    return value


def _triple(where: str, key: str, value: Any, *, positive: bool) -> tuple[float, float, float]:
    ok = isinstance(value, list | tuple) and len(value) == 3
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not ok or (positive and min(value) <= 0):
        kind = "three positive numbers" if positive else "three numbers"
        raise EncoderError(f"{where}: {key}: {value!r} is not {kind} (one per RGB channel)")
    return (float(value[0]), float(value[1]), float(value[2]))


def _choice(where: str, key: str, value: Any, allowed: tuple[str, ...]) -> Any:
    if value not in allowed:
        raise EncoderError(f"{where}: {key}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _json_kwargs(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise EncoderError(f"{where}: kwargs: expected a mapping of argument names to values")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError):
        raise EncoderError(f"{where}: kwargs: values must be plain (numbers, strings, lists, mappings)") from None


# --- preflight: can the weights possibly be had? -----------------------------------------------


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
    path = BUNDLED_DIR / str(spec.bundled_file)
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
