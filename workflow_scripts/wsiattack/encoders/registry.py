"""Named encoder specs. Torch-free so that config validation (at DAG build time) can use it.

Each entry says how to build the network (a timm architecture, a ``transformers`` model or
another package's loader), where its weights come from (Hugging Face Hub repository, gated or
not), what it expects (input size, normalisation), how the embedding is read from its output, and
the precision it is safe in on a GPU. The wrapper in ``wsiattack.encoders.model`` turns a spec
into a module taking [0, 1] RGB pixels.

The architecture facts of each entry are stated here, not read from the hub at run time, so that
an architecture can be built (and checked) offline and a local checkpoint needs no config file.
Each entry cites the model card or maintainers' code its facts come from.

Custom encoders (a user's own factory) are checked in ``encoders.custom``; ``encoders.preflight``
fails fast, before any tile is read, when the weights cannot possibly be had.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from wsiattack.errors import EncoderError

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
    # Values in the state dict (parameters and buffers), counted on the meta device (tests check
    # them); sizes a GPU job's memory (cluster.encoder_host_mb). None: unknown (custom, unsized).
    n_params: int | None = None


BUNDLED_DIR = Path(__file__).resolve().parent / "checkpoints"

_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}  # resolved to timm classes in model.py
_TRIDENT_LOAD = "github.com/mahmoodlab/TRIDENT trident/patch_encoder_models/load.py"

ENCODERS: dict[str, EncoderSpec] = {
    # Demo encoder: ViT-Tiny/16 with seeded random weights, so the whole workflow runs offline.
    # Random ViT features still separate colour/texture (dense dark nuclei vs stroma), which is
    # enough for the synthetic cohort; it is not a model of real tissue.
    "demo": EncoderSpec(
        name="demo",
        n_params=5_524_416,
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
        n_params=917_120,
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
        n_params=303_350_784,
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
        n_params=681_394_176,
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
        n_params=631_239_424,
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
        n_params=1_134_953_984,
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
        n_params=1_134_774_272,
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
        n_params=1_134_774_272,
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
        n_params=303_351_808,
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
        n_params=310_000_000,  # approximate: ViT-L/16 at 448 px plus its pooler (TRIDENT is not on PyPI: not counted here)
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
        n_params=8_573_931,
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

# For transfer studies (README, "Transfer attacks"): second instances (the same architecture from
# another seed: what initialisation and the training run alone change) and a real architecture
# with seeded random weights (what architecture alone changes, with nothing to download).
ENCODERS.update(
    {
        "demo_seed1": replace(ENCODERS["demo"], name="demo_seed1", seed=1, source="demo's architecture, seed 1"),
        "demo_trained_seed1": replace(
            ENCODERS["demo_trained"],
            name="demo_trained_seed1",
            bundled_file="demo_trained_seed1.safetensors",
            source="python -m wsiattack.encoders.demo_training --seed 1 (synthetic tiles, wsiattack.synthetic)",
        ),
        "resnet50_trunc_random": replace(
            ENCODERS["resnet50_trunc"],
            name="resnet50_trunc_random",
            weights="seeded",
            hub_repo=None,
            ignore_checkpoint_prefixes=(),
            source="resnet50_trunc's architecture (CLAM's ResNet50 cut after layer 3) with seeded random weights",
        ),
    }
)


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise EncoderError(f"unknown encoder {name!r} (known: {', '.join(ENCODERS)})") from None
