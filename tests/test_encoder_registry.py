"""The encoder registry: each entry's architecture facts (built on the meta device, no weights,
no downloads), the loaders that need another package, preflight, and custom-encoder specs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from helpers import ROOT
from wsiattack.encoders import custom, preflight, registry
from wsiattack.encoders.model import TileEncoder, build_architecture, build_encoder
from wsiattack.errors import EncoderError

# name: (parameters, patch px, prefix tokens (CLS + registers), token width, MLP fc1 rows)
# Parameter counts match the published sizes: UNI 0.3B, UNI2-h 681M, Virchow2 632M,
# Prov-GigaPath and H-optimus 1.1B.
TIMM_FACTS = {
    "uni": (303_350_784, 16, 1, 1024, 4096),
    "uni2_h": (681_394_176, 14, 9, 1536, 8192),
    "virchow2": (631_239_424, 14, 5, 1280, 6832),
    "prov_gigapath": (1_134_953_984, 16, 1, 1536, 8192),
    "h_optimus_0": (1_134_774_272, 14, 5, 1536, 8192),
    "h_optimus_1": (1_134_774_272, 14, 5, 1536, 8192),
}


@pytest.fixture
def no_hub_access(monkeypatch, tmp_path):
    """No HF_TOKEN and an empty hub cache."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_registry_holds_the_target_encoders_with_sources():
    assert set(registry.ENCODERS) == {
        "demo",
        "demo_trained",
        "uni",
        "uni2_h",
        "virchow2",
        "prov_gigapath",
        "h_optimus_0",
        "h_optimus_1",
        "phikon_v2",
        "conch_v1_5",
        "resnet50_trunc",
        "demo_seed1",
        "demo_trained_seed1",
        "resnet50_trunc_random",
    }
    for name, spec in registry.ENCODERS.items():
        assert spec.name == name and spec.readout in registry.READOUTS and spec.precision in registry.PRECISIONS
        if name.startswith("demo_trained"):  # trained by a script here, shipped in the package
            assert spec.weights == "bundled" and "demo_training" in spec.source
        elif name.startswith("demo") or name.endswith("_random"):  # seeded random weights
            assert spec.weights == "seeded" and spec.hub_repo is None
        else:
            assert spec.source and spec.hub_repo and spec.weights == "hub"


@pytest.mark.parametrize("name", sorted(TIMM_FACTS))
def test_vit_entries_have_the_published_architecture(name):
    """Built on the meta device: shapes, token layout and the read-out width, no memory, no weights."""
    spec = registry.get_spec(name)
    n_params, patch, n_prefix, width, fc1_rows = TIMM_FACTS[name]
    model = build_architecture(spec, device="meta")
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert model.patch_embed.patch_size == (patch, patch) and model.patch_embed.img_size == (224, 224)
    assert model.num_prefix_tokens == n_prefix and model.embed_dim == width
    assert model.blocks[0].mlp.fc1.weight.shape == (fc1_rows, width)
    assert hasattr(model.blocks[0].ls1, "gamma")  # LayerScale (init_values) holds checkpoint keys
    tokens = model.forward_features(torch.empty(2, 3, 224, 224, device="meta"))
    assert tokens.shape == (2, n_prefix + (224 // patch) ** 2, width)
    encoder = TileEncoder(spec, model, weights_id="meta").to("meta")
    assert encoder(torch.empty(2, 3, 256, 256, device="meta")).shape == (2, spec.embed_dim)


@pytest.mark.parametrize("name", sorted(registry.ENCODERS))
def test_each_entrys_parameter_count_is_what_its_architecture_holds(name):
    """``n_params`` sizes the GPU jobs' memory (wsiattack.cluster): the state dict's values."""
    spec = registry.get_spec(name)
    if preflight.missing_requirement(spec):
        pytest.skip(f"{name}: its loader's package is not installed here")
    model = build_architecture(spec, device="meta")
    assert spec.n_params == sum(tensor.numel() for tensor in model.state_dict().values())


def test_virchow2_reads_cls_and_mean_of_patch_tokens():
    spec = registry.get_spec("virchow2")
    assert spec.readout == "cls+mean" and spec.embed_dim == 2 * 1280 and spec.precision == "float16"


def test_swiglu_entries_use_packed_swiglu_with_silu():
    for name in ("uni2_h", "virchow2", "prov_gigapath", "h_optimus_0"):
        mlp = build_architecture(registry.get_spec(name), device="meta").blocks[0].mlp
        assert type(mlp).__name__ == "GluMlp" and isinstance(mlp.act, torch.nn.SiLU), name
        assert mlp.fc2.weight.shape[1] * 2 == mlp.fc1.weight.shape[0]  # packed: gate and value


def test_normalisation_and_input_of_each_entry():
    assert registry.get_spec("h_optimus_0").mean == (0.707223, 0.578729, 0.703617)
    assert registry.get_spec("h_optimus_1").std == (0.211883, 0.230117, 0.177517)
    for name in ("uni", "uni2_h", "virchow2", "prov_gigapath", "phikon_v2", "conch_v1_5", "resnet50_trunc"):
        assert registry.get_spec(name).mean == registry.IMAGENET_MEAN, name
    assert registry.get_spec("prov_gigapath").resize_px == 256  # Resize(256) + CenterCrop(224)
    assert registry.get_spec("conch_v1_5").input_px == 448


def test_resnet50_trunc_is_cut_after_layer3_and_pools_to_1024():
    spec = registry.get_spec("resnet50_trunc")
    model = build_architecture(spec)
    assert isinstance(model.layer4, torch.nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == 8_543_296
    with torch.no_grad():
        out = TileEncoder(spec, model.eval(), weights_id="random")(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 1024)


@pytest.mark.parametrize(
    ("name", "install"),
    [
        ("phikon_v2", "pip install transformers==5.23.0"),
        ("conch_v1_5", "pip install git+https://github.com/mahmoodlab/TRIDENT.git"),
    ],
)
def test_loader_package_missing_says_what_to_install(name, install, tmp_path):
    checkpoint = tmp_path / "w.safetensors"
    checkpoint.write_bytes(b"")
    for attempt in (
        lambda: build_encoder(name, checkpoint=str(checkpoint)),
        lambda: preflight.preflight(name, checkpoint=None),
    ):
        with pytest.raises(
            EncoderError, match=rf"encoder '{name}' needs the package .*which is not installed: {re.escape(install)}"
        ):
            attempt()


def test_preflight_refuses_a_gated_model_without_token(no_hub_access):
    with pytest.raises(
        EncoderError,
        match=r"encoder 'uni2_h': its weights are gated .* terms at https://huggingface.co/MahmoodLab/UNI2-h and set HF_TOKEN .* or set a local checkpoint path",
    ):
        preflight.preflight("uni2_h", checkpoint=None)
    preflight.preflight("resnet50_trunc", checkpoint=None)  # not gated
    preflight.preflight("demo", checkpoint=None)


def test_preflight_passes_with_token_checkpoint_or_cached_weights(no_hub_access, monkeypatch, tmp_path):
    checkpoint = tmp_path / "uni.bin"
    checkpoint.write_bytes(b"x")
    preflight.preflight("uni", checkpoint=str(checkpoint))
    with pytest.raises(EncoderError, match=r"encoder 'uni': checkpoint .*missing.bin does not exist"):
        preflight.preflight("uni", checkpoint=str(tmp_path / "missing.bin"))
    snapshot = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--MahmoodLab--UNI"
    (snapshot / "snapshots" / "abc").mkdir(parents=True)
    (snapshot / "snapshots" / "abc" / "pytorch_model.bin").write_bytes(b"x")
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("abc")
    preflight.preflight("uni", checkpoint=None)  # downloaded once: works offline without token
    with pytest.raises(EncoderError):
        preflight.preflight("uni2_h", checkpoint=None)
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    preflight.preflight("uni2_h", checkpoint=None)


def test_registry_and_preflight_do_not_import_torch(tmp_path):
    code = (
        "import sys; sys.path.insert(0, 'workflow_scripts')\n"
        "from wsiattack.encoders import custom, preflight\n"
        "from wsiattack.errors import EncoderError\n"
        "preflight.preflight('resnet50_trunc', checkpoint=None)\n"
        "try:\n    preflight.preflight('uni', checkpoint=None)\nexcept EncoderError:\n    pass\n"
        "else:\n    raise SystemExit('gated model passed without token')\n"
        "custom.custom_spec('mine', {'factory': 'a.b:c', 'input_px': 224, 'embed_dim': 8, 'readout': 'output'})\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_HUB_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


CUSTOM = {
    "factory": "mypkg.models:build",
    "input_px": 224,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "embed_dim": 768,
    "readout": "cls+mean",
    "precision": "bfloat16",
    "kwargs": {"depth": 2},
}


def test_custom_spec_from_a_mapping():
    spec = custom.custom_spec("mine", CUSTOM)
    assert (spec.architecture, spec.loader, spec.weights) == ("mypkg.models:build", "factory", "factory")
    assert (spec.input_px, spec.mean, spec.std, spec.embed_dim) == (224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 768)
    assert (spec.readout, spec.precision, dict(spec.build_kwargs)) == ("cls+mean", "bfloat16", {"depth": 2})
    minimal = custom.custom_spec("m2", {"factory": "a:b", "input_px": 256, "embed_dim": 3, "readout": "output"})
    assert minimal.mean == registry.IMAGENET_MEAN and minimal.precision == "float32"
    assert minimal.n_params is None and custom.custom_spec("m3", {**CUSTOM, "n_params": 86_000_000}).n_params == 86e6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 3}, r"unknown key 'epochs' \(allowed: factory, input_px"),
        (
            {"factory": "mypkg.models.build"},
            r"factory: 'mypkg.models.build' is not of the form 'package.module:function'",
        ),
        ({"readout": "mean"}, r"readout: 'mean' is not one of cls, cls\+mean, pooled, output"),
        ({"input_px": 0}, r"input_px: 0 is not a positive integer"),
        ({"embed_dim": True}, r"embed_dim: True is not a positive integer"),
        ({"std": [0.2, 0.0, 0.2]}, r"std: \[0.2, 0.0, 0.2\] is not three positive numbers"),
        ({"mean": [0.5, 0.5]}, r"mean: \[0.5, 0.5\] is not three numbers"),
        ({"precision": "float64"}, r"precision: 'float64' is not one of float32"),
        ({"kwargs": {"f": object()}}, r"kwargs: values must be plain"),
        ({"n_params": 0}, r"n_params: 0 is not a positive integer"),
    ],
)
def test_custom_spec_rejects_bad_entries(change, message):
    with pytest.raises(EncoderError, match=rf"custom encoder 'mine': {message}"):
        custom.custom_spec("mine", {**CUSTOM, **change})


def test_custom_spec_name_and_required_keys():
    with pytest.raises(EncoderError, match=r"custom encoder 'uni': the name is taken by a registry encoder"):
        custom.custom_spec("uni", CUSTOM)
    with pytest.raises(EncoderError, match=r"custom encoder 'a/b': names are letters"):
        custom.custom_spec("a/b", CUSTOM)
    with pytest.raises(EncoderError, match=r"custom encoder 'mine': missing key 'embed_dim'"):
        custom.custom_spec("mine", {k: v for k, v in CUSTOM.items() if k != "embed_dim"})


def test_custom_factory_module_missing_fails_preflight():
    with pytest.raises(
        EncoderError,
        match=r"custom encoder 'mine': cannot find module 'mypkg.models' .* install it or add it to PYTHONPATH",
    ):
        preflight.preflight("mine", checkpoint=None, custom=CUSTOM)
