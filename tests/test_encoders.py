"""The encoder wrapper (resize, normalise, read-out), weights (local checkpoints, the hub, the
token), custom factories, and the extraction loop with its device plumbing."""

import dataclasses
import json
import logging
import os
import sys
import types

import httpx2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError
from safetensors.torch import save_file
from torch import nn
from wsiattack import extraction, runtime, stores
from wsiattack.encoders import registry, weights
from wsiattack.encoders.embedding import _device_pixels, embed_tiles, iter_batches, to_unit_pixels
from wsiattack.encoders.model import TileEncoder, build_architecture, build_encoder, state_dict_sha256
from wsiattack.errors import ConfigError, EncoderError

DEMO_WEIGHTS_ID = "seeded:0:sha256:65319c0552bf38c6"  # must never change: features stores record it (same on every CPU)
CANARY = "hf_canaryTOKEN0123456789"


@pytest.fixture(scope="module")
def demo():
    return build_encoder("demo")


def unit(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def normalise(x, spec):
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


# --- the wrapper --------------------------------------------------------------------------------


def test_demo_encoder_is_seeded_frozen_and_in_eval_mode(demo):
    again = build_encoder("demo")
    assert demo.weights_id == again.weights_id == DEMO_WEIGHTS_ID
    assert not demo.training and not any(p.requires_grad for p in demo.parameters())
    assert all(p.dtype == torch.float32 for p in demo.parameters())
    x = unit(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(demo(x), again(x))
        assert demo(x).shape == (2, registry.ENCODERS["demo"].embed_dim)


def test_cls_readout_equals_model_of_normalised_resized_pixels(demo):
    x = unit(2, 3, 256, 256, seed=1)
    resized = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        by_hand = demo.backbone.forward_features(normalise(resized, demo.spec))[:, 0]
        torch.testing.assert_close(demo(x), by_hand)


def test_cls_plus_mean_readout_excludes_register_tokens():
    """A Virchow2-shaped ViT (4 registers, SwiGLU), shrunk: CLS ++ mean of patch tokens only."""
    small = {**registry.get_spec("virchow2").build_kwargs, "embed_dim": 32, "depth": 2, "num_heads": 2}
    spec = dataclasses.replace(registry.get_spec("virchow2"), build_kwargs=small, embed_dim=64)
    torch.manual_seed(0)
    encoder = TileEncoder(spec, build_architecture(spec).eval(), weights_id="random")
    x = unit(2, 3, 240, 240, seed=2)
    resized = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        tokens = encoder.backbone.forward_features(normalise(resized, spec))
        assert tokens.shape[1] == 1 + 4 + 16 * 16
        torch.testing.assert_close(encoder(x), torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))
        assert not torch.allclose(encoder(x)[:, 32:], tokens[:, 1:].mean(1))  # registers would shift it


def test_pooled_readout_of_resnet50_trunc_is_the_mean_of_layer3():
    spec = registry.get_spec("resnet50_trunc")
    torch.manual_seed(0)
    encoder = TileEncoder(spec, build_architecture(spec).eval(), weights_id="random")
    m = encoder.backbone
    x = unit(1, 3, 200, 200, seed=3)
    with torch.no_grad():
        h = normalise(F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True), spec)
        h = m.maxpool(m.act1(m.bn1(m.conv1(h))))
        h = m.layer3(m.layer2(m.layer1(h)))
        assert h.shape == (1, 1024, 14, 14)
        torch.testing.assert_close(encoder(x), h.mean(dim=(2, 3)))


def test_resize_then_centre_crop_like_prov_gigapath(demo):
    spec = dataclasses.replace(registry.get_spec("demo"), resize_px=256, interpolation="bicubic")
    encoder = TileEncoder(spec, demo.backbone, weights_id=demo.weights_id)
    x = unit(1, 3, 224, 224, seed=4)
    crop = F.interpolate(x, size=(256, 256), mode="bicubic", align_corners=False, antialias=True)[..., 16:240, 16:240]
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), encoder.backbone.forward_features(normalise(crop, spec))[:, 0])


def test_wrapper_is_differentiable_in_pixel_space(demo):
    x = torch.rand(1, 3, 224, 224, requires_grad=True)
    # (Not .sum(): the final LayerNorm makes the sum of the features a constant.)
    (demo(x) * torch.linspace(-1, 1, demo.spec.embed_dim)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- custom factories ---------------------------------------------------------------------------


class TinyEncoder(nn.Module):
    """forward(x) -> (B, D): a strided conv and global average pooling."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, kernel_size=8, stride=8)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def tiny_factory(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return TinyEncoder(width)


TINY = {
    "factory": f"{__name__}:tiny_factory",
    "input_px": 64,
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.3, 0.4],
    "embed_dim": 6,
    "readout": "output",
    "kwargs": {"width": 6},
}


def test_custom_factory_output_readout():
    encoder = build_encoder("tiny", custom=TINY)
    spec = encoder.spec
    assert encoder.weights_id == f"sha256:{state_dict_sha256(encoder.backbone)[:16]}"
    assert encoder.describe()["weights_source"] == f"factory:{__name__}:tiny_factory"
    x = unit(3, 3, 80, 80, seed=5)
    resized = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), tiny_factory(6)(normalise(resized, spec)))
    assert encoder(x).shape == (3, 6)


def test_custom_factory_errors():
    with pytest.raises(EncoderError, match=r"readout 'cls' needs the module to have forward_features\(\)"):
        build_encoder("tiny", custom={**TINY, "readout": "cls"})
    with pytest.raises(EncoderError, match=rf"module '{__name__}' has no function 'nope'"):
        build_encoder("tiny", custom={**TINY, "factory": f"{__name__}:nope"})
    wrong_dim = build_encoder("tiny", custom={**TINY, "embed_dim": 7})
    with pytest.raises(
        EncoderError, match=r"s1: encoder 'tiny' returned embeddings of shape \(2, 6\) but its spec says embed_dim 7"
    ):
        embed_tiles(wrong_dim, np.zeros((2, 64, 64, 3), np.uint8), batch_size=2, device=torch.device("cpu"), label="s1")


# --- local checkpoints --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_state():
    torch.manual_seed(123)
    model = build_architecture(registry.get_spec("demo"))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_local_checkpoint_loads_with_its_hash_as_identity(demo_state, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    save_file(demo_state, path) if suffix == ".safetensors" else torch.save(demo_state, path)
    encoder = build_encoder("demo", checkpoint=str(path))
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, demo_state[key]), key
    reference = build_architecture(registry.get_spec("demo"))
    reference.load_state_dict(demo_state)
    assert encoder.weights_id == f"sha256:{state_dict_sha256(reference)[:16]}" != DEMO_WEIGHTS_ID
    assert encoder.describe()["weights_source"] == f"local:{path}"
    assert not any(p.requires_grad or p.is_meta for p in encoder.parameters())


def test_checkpoint_folder_and_wrapped_state_dict(demo_state, tmp_path):
    torch.save({"state_dict": {f"module.{k}": v for k, v in demo_state.items()}}, tmp_path / "pytorch_model.bin")
    encoder = build_encoder("demo", checkpoint=str(tmp_path))
    assert torch.equal(encoder.backbone.cls_token, demo_state["cls_token"])


def test_truncated_resnet_drops_layer4_and_fc_of_a_full_checkpoint(tmp_path):
    torch.manual_seed(1)
    full = dict(build_architecture(registry.get_spec("resnet50_trunc")).state_dict())
    full |= {
        "layer4.0.conv1.weight": torch.ones(512, 1024, 1, 1),
        "fc.weight": torch.ones(1000, 2048),
    }  # as in timm/resnet50.tv_in1k
    save_file(full, tmp_path / "resnet50.safetensors")
    encoder = build_encoder("resnet50_trunc", checkpoint=str(tmp_path / "resnet50.safetensors"))
    assert torch.equal(encoder.backbone.layer3[0].conv1.weight, full["layer3.0.conv1.weight"])
    assert not any(k.startswith(("layer4.", "fc.")) for k in encoder.backbone.state_dict())


def test_mismatched_checkpoint_is_one_clear_error(demo_state, tmp_path):
    wider = {**demo_state, "blocks.0.mlp.fc1.weight": torch.zeros(1536, 384)}  # a ViT-S block
    save_file(wider, tmp_path / "vits.safetensors")
    with pytest.raises(
        EncoderError,
        match=r"encoder 'demo': checkpoint local:.*vits.safetensors does not match the architecture vit_tiny_patch16_224: 1 shape mismatch\(es\) \(e.g. blocks.0.mlp.fc1.weight: checkpoint \(1536, 384\) vs model \(768, 192\)\).*set a local checkpoint path",
    ):
        build_encoder("demo", checkpoint=str(tmp_path / "vits.safetensors"))
    partial = {k: v for k, v in demo_state.items() if not k.startswith("blocks.11.")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(EncoderError, match=r"\d+ missing key\(s\) \(e.g. blocks.11."):
        build_encoder("demo", checkpoint=str(tmp_path / "partial.safetensors"))


@dataclasses.dataclass
class NotATensor:
    payload: str = "code"


def test_arbitrary_pickles_and_foreign_files_are_refused(tmp_path):
    torch.save({"weight": NotATensor()}, tmp_path / "pickle.pth")
    with pytest.raises(
        EncoderError, match=r"is not a plain state dict of tensors and arbitrary pickles are not loaded"
    ):
        build_encoder("demo", checkpoint=str(tmp_path / "pickle.pth"))
    (tmp_path / "weights.npz").write_bytes(b"PK")
    with pytest.raises(EncoderError, match=r"weights.npz is not a .safetensors/.bin/.pth/.pt file"):
        build_encoder("demo", checkpoint=str(tmp_path / "weights.npz"))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(
        EncoderError, match=r"cannot read checkpoint .*cut.safetensors .*check that the file is complete"
    ):
        build_encoder("demo", checkpoint=str(tmp_path / "cut.safetensors"))


# --- the hub and the token ----------------------------------------------------------------------


@pytest.fixture
def hub_demo(demo_state, tmp_path):
    """A gated hub spec with the demo architecture, and its weights file."""
    path = tmp_path / "model.safetensors"
    save_file(demo_state, path)
    return dataclasses.replace(registry.get_spec("demo"), weights="hub", hub_repo="org/tiny", gated=True), path


def test_gated_model_without_token_fails_before_any_work(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(weights, "hf_hub_download", pytest.fail)  # no download attempt
    with pytest.raises(
        EncoderError,
        match=r"encoder 'virchow2': its weights are gated on the Hugging Face Hub: accept the model's terms at https://huggingface.co/paige-ai/Virchow2 and set HF_TOKEN",
    ):
        build_encoder("virchow2")


def test_hub_weights_use_the_token_and_never_record_it(hub_demo, monkeypatch, tmp_path, caplog):
    spec, path = hub_demo
    seen = []

    def fake_download(repo_id, filename, *, token, local_files_only=False):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        seen.append((repo_id, filename, token))
        return str(path)

    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setattr(weights, "hf_hub_download", fake_download)
    caplog.set_level(logging.DEBUG)
    encoder = build_encoder("demo", custom=spec)
    assert seen == [("org/tiny", "model.safetensors", CANARY)]
    assert encoder.weights_id.startswith("sha256:") and encoder.describe()["weights_source"] == "hf-hub:org/tiny"
    tiles = stores_with_tiles(tmp_path, n=3)
    extraction.extract_slide(
        slide_id="s1",
        tiles_store=tiles,
        encoder=encoder,
        batch_size=2,
        device=torch.device("cpu"),
        out_store=tmp_path / "f.zarr",
    )
    attrs = dict(stores.open_store(tmp_path / "f.zarr", kind=stores.FEATURES).attrs)
    assert attrs["weights_id"] == encoder.weights_id
    for text in (json.dumps(encoder.describe()), json.dumps(attrs), caplog.text, repr(encoder)):
        assert CANARY not in text


def test_hub_errors_say_what_to_do(hub_demo, monkeypatch):
    spec, _ = hub_demo
    monkeypatch.setenv("HF_TOKEN", CANARY)

    def gated(repo_id, filename, *, token, local_files_only=False):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        raise GatedRepoError(
            "403 gated", response=httpx2.Response(403, request=httpx2.Request("GET", "https://huggingface.co"))
        )

    monkeypatch.setattr(weights, "hf_hub_download", gated)
    with pytest.raises(
        EncoderError, match=r"accept the model's terms at https://huggingface.co/org/tiny and set HF_TOKEN"
    ) as error:
        build_encoder("demo", custom=spec)
    assert CANARY not in str(error.value)

    def offline(repo_id, filename, *, token, local_files_only=False):
        raise LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(weights, "hf_hub_download", offline)
    with pytest.raises(
        EncoderError,
        match=r"cannot reach the Hugging Face Hub to download org/tiny/model.safetensors and it is not in the local cache",
    ):
        build_encoder("demo", custom=spec)


def test_transformers_loader_wraps_the_model_and_loads_its_checkpoint(monkeypatch, tmp_path):
    """The Phikon-v2 path with a stand-in ``transformers`` (the real one is not installed here)."""

    class Config:
        def __init__(self, hidden_size, patch_size, **_):
            self.hidden_size, self.patch_size = hidden_size, patch_size

    class Dinov2Model(nn.Module):
        config_class = Config

        def __init__(self, config):
            super().__init__()
            self.patch = nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size)
            self.cls = nn.Parameter(torch.randn(1, 1, config.hidden_size))

        def forward(self, pixel_values):
            patches = self.patch(pixel_values).flatten(2).transpose(1, 2)
            return types.SimpleNamespace(
                last_hidden_state=torch.cat(
                    [self.cls.expand(len(patches), -1, -1) + patches.mean(1, keepdim=True), patches], 1
                )
            )

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(Dinov2Model=Dinov2Model))
    reference = Dinov2Model(Config(1024, 16))
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    encoder = build_encoder("phikon_v2", checkpoint=str(tmp_path))
    x = unit(2, 3, 224, 224, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(x), reference(pixel_values=normalise(x, encoder.spec)).last_hidden_state[:, 0]
        )
    assert encoder.weights_id == f"sha256:{state_dict_sha256(reference)[:16]}"


# --- the extraction loop ------------------------------------------------------------------------


def stores_with_tiles(tmp_path, *, n):
    tiles = np.random.default_rng(0).integers(0, 256, size=(n, 224, 224, 3), dtype=np.uint8)
    with stores.atomic_store(tmp_path / "tiles.zarr", kind=stores.TILES, attrs={"slide_id": "s1"}) as group:
        stores.create_tiles_array(group, n_tiles=n, tile_px=224)[...] = tiles
    return tmp_path / "tiles.zarr"


def test_uint8_tiles_become_unit_pixels():
    tiles = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    tiles[0, :, :, 0] = 255
    pixels = to_unit_pixels(tiles)
    assert pixels.shape == (1, 3, 4, 4) and pixels.dtype == torch.float32
    assert pixels[0, 0].min() == 1.0 and pixels[0, 1:].max() == 0.0
    cl = _device_pixels(np.ascontiguousarray(tiles), torch.device("cpu"), channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, pixels)


def test_prefetching_batches_cover_the_array_in_order():
    array = np.arange(10 * 2).reshape(10, 2)
    got = list(iter_batches(array, batch_size=3))
    assert [s for s, _ in got] == [0, 3, 6, 9]
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), array)


def test_extract_slide_matches_a_direct_forward_pass_and_logs_progress(demo, tmp_path, caplog):
    tiles_store = stores_with_tiles(tmp_path, n=5)
    caplog.set_level(logging.INFO, logger="wsiattack")
    n = extraction.extract_slide(
        slide_id="s1",
        tiles_store=tiles_store,
        encoder=demo,
        batch_size=2,
        device=torch.device("cpu"),
        out_store=tmp_path / "f.zarr",
    )
    group = stores.open_store(tmp_path / "f.zarr", kind=stores.FEATURES)
    with torch.no_grad():
        direct = demo(to_unit_pixels(stores.open_store(tiles_store, kind=stores.TILES)["tiles"][...])).numpy()
    assert n == 5
    np.testing.assert_allclose(group["features"][...], direct, rtol=1e-4, atol=1e-5)
    assert group.attrs["weights_id"] == DEMO_WEIGHTS_ID and group.attrs["readout"] == "cls"
    assert "s1: embedded 5/5 tiles" in caplog.text


def test_non_finite_embedding_names_slide_and_tile(demo, monkeypatch):
    tiles = np.zeros((4, 224, 224, 3), dtype=np.uint8)
    tiles[3] = 255
    original = type(demo).forward

    def broken(self, pixels):  # NaN wherever a tile is all white
        out = original(self, pixels)
        return torch.where(pixels.flatten(1).amin(1, keepdim=True) == 1.0, torch.nan, out)

    monkeypatch.setattr(type(demo), "forward", broken)
    with pytest.raises(EncoderError, match=r"slide7: non-finite embedding for tile 3 with encoder 'demo'"):
        embed_tiles(demo, tiles, batch_size=2, device=torch.device("cpu"), label="slide7")


def test_device_resolution_and_autocast_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match=r"config: device: 'cuda' requested but not available"):
        runtime.resolve_device("cuda")
    with runtime.autocast(torch.device("cpu"), "bfloat16"):  # autocast stays off on the CPU
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto").type == "cuda"


def test_unknown_encoder():
    with pytest.raises(EncoderError, match=r"unknown encoder 'nope' \(known: demo"):
        registry.get_spec("nope")


def test_each_gpu_job_claims_its_own_gpu_and_frees_it_when_it_ends(monkeypatch, tmp_path):
    """--resources gpu=N on an N-GPU machine: N jobs on N GPUs, not all on cuda:0."""
    import subprocess
    import sys

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(runtime, "_HELD_GPU_LOCKS", [])
    claimed = [runtime.claim_gpu(lock_dir=str(tmp_path)) for _ in range(3)]  # three jobs' worth of locks
    assert claimed == [torch.device("cuda", i) for i in range(3)]
    assert runtime.claim_gpu(lock_dir=str(tmp_path)).index in range(3)  # a fourth shares one, warned
    for handle in runtime._HELD_GPU_LOCKS[1:]:
        handle.close()  # jobs 2 and 3 end: their GPUs are free again
    # another process (another job) gets the first free GPU while this one still holds cuda:0
    code = "import torch, sys; torch.cuda.device_count = lambda: 3; from wsiattack import runtime; print(runtime.claim_gpu(lock_dir=sys.argv[1]))"
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(runtime.__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()
    assert out == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime.claim_gpu(lock_dir=str(tmp_path)) == torch.device("cuda")  # one visible GPU: no lock


def test_an_encoder_that_rescales_the_tiles_is_named_in_a_warning(caplog):
    """CONCH v1.5 takes 448 px: 224 px tiles are upsampled 2x, i.e. seen at twice the magnification."""
    from wsiattack.encoders.model import warn_on_rescaled_tiles

    conch = registry.get_spec("conch_v1_5")
    with caplog.at_level("WARNING"):
        assert warn_on_rescaled_tiles(conch, tile_px=224, label="slide_1")
        assert not warn_on_rescaled_tiles(conch, tile_px=448, label="slide_1")
        assert not warn_on_rescaled_tiles(registry.get_spec("demo"), tile_px=224, label="slide_1")
    assert len(caplog.records) == 1
    assert (
        "slide_1: encoder 'conch_v1_5' takes 448 px input but the tiles are 224 px" in caplog.text
        and "set tiling.tile_px to 448" in caplog.text
    )


def test_weights_hash_is_cached_by_file_size_and_mtime(demo_state, tmp_path, monkeypatch):
    """The second build of the same file does not hash the weights again; a changed file does."""
    path = tmp_path / "weights.safetensors"
    save_file(demo_state, path)
    monkeypatch.setenv("WSIATTACK_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = weights.state_dict_sha256
    monkeypatch.setattr(weights, "state_dict_sha256", lambda m: calls.append(1) or real(m))
    first = build_encoder("demo", checkpoint=str(path)).weights_id
    assert build_encoder("demo", checkpoint=str(path)).weights_id == first
    assert len(calls) == 1
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in demo_state.items()}
    save_file(changed, path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert build_encoder("demo", checkpoint=str(path)).weights_id != first
    assert len(calls) == 2


def test_unwritable_weights_hash_cache_only_costs_the_hash(demo_state, tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    save_file(demo_state, path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("WSIATTACK_CACHE_DIR", str(blocker))
    reference = build_architecture(registry.get_spec("demo"))
    reference.load_state_dict(demo_state)
    assert build_encoder("demo", checkpoint=str(path)).weights_id == f"sha256:{state_dict_sha256(reference)[:16]}"
